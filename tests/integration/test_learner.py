"""Learner groups on Ray: 2 CPU ranks (gloo), FSDP2 and DeepSpeed ZeRO-3, tiny models.

Each backend trains the AR on the same rows as a single-process reference (same micro-batches,
same AdamW, same schedule, same guarded step). Tolerances: fp32 sums in another order (gradients
reduced over ranks) differ from the reference by ~1e-7 relative; after 3 AdamW steps the weights
agree to 1e-5 and the losses to 1e-5 relative, hence the two backends to 2e-5.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.backends import OptimSpec
from actors.learner import LearnerError, LearnerGroup, LearnerSpec, split_rows
from actors.learner_models import LoraSpec, ModelSpec
from nla_rl.ar_model import ActivationReconstructor
from nla_rl.checkpoint import CheckpointManager, CheckpointWarning, RecipeMismatchError
from nla_rl.errors import ConfigError
from nla_rl.optim import build_optimizer, build_scheduler, guarded_step
from nla_rl.roundtrip import InjectionSpec
from nla_rl.sft import ar_sft_loss, build_ar_sft_batch, micro_batches
from nla_rl.sidecar import make_token_meta
from nla_rl.templates import DEFAULT_AR_TEMPLATE, DEFAULT_AV_TEMPLATE, av_prompt_ids
from nla_rl.testing.tiny import build_tiny_model

D, RANKS, MICRO, ROWS, STEPS = 128, 2, 2, 8, 6
OPTIM = OptimSpec(lr=1e-3, weight_decay=0.01, warmup_steps=1, total_steps=STEPS,
                  schedule="cosine", grad_clip=1.0)
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("learner_models")
    _, tok = build_tiny_model("qwen2", root / "av", seed=0, hidden=D, heads=4, kv_heads=2)
    ActivationReconstructor.from_base(root / "av", 2).save_pretrained(root / "ar", tok)
    return root, tok


def step_rows(step: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    words = ["cats", "the blue sea", "a red house with a door", "numbers", "rain"]
    texts = [f"{words[(step + i) % 5]} and {words[i % 5]} " * (1 + i % 3) for i in range(ROWS)]
    return {"explanations": texts, "vectors": torch.randn(ROWS, D, generator=g).numpy()}


def ar_spec(root: Path, backend: str) -> LearnerSpec:
    model = ModelSpec(role="ar", model_dir=str(root / "ar"), ar_template=DEFAULT_AR_TEMPLATE,
                      mse_scale=D ** 0.5)
    return LearnerSpec(model=model, optim=OPTIM, backend=backend, zero_stage=3,
                       micro_batch_size=MICRO)


def reference_run(root: Path, tok, steps: int):
    """Single process: the same shares, micro-batches and step; returns (losses, state)."""
    torch.manual_seed(0)
    model = ActivationReconstructor.from_pretrained(root / "ar")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(named, lr=OPTIM.lr, weight_decay=OPTIM.weight_decay)
    sched = build_scheduler(opt, warmup_steps=OPTIM.warmup_steps, total_steps=OPTIM.total_steps,
                            schedule=OPTIM.schedule)
    losses = []
    for step in range(steps):
        total = 0.0
        for share in split_rows(step_rows(step), RANKS):
            batch = build_ar_sft_batch(tok, share["explanations"], share["vectors"],
                                       template=DEFAULT_AR_TEMPLATE)
            for micro in micro_batches(batch, MICRO):
                value, _ = ar_sft_loss(model, micro, D ** 0.5)
                (value / ROWS).backward()
                total += float(value.detach())
        guarded_step([p for _, p in named], opt, sched, max_norm=OPTIM.grad_clip)
        losses.append(total / ROWS)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(models):
    return reference_run(*models, steps=STEPS)


@pytest.fixture(scope="module", params=["fsdp2", "deepspeed"])
def trained(request, ray_cluster, models, tmp_path_factory):
    """Per backend: 6 straight steps with a checkpoint after step 3, then the group is killed
    and a new one resumes from that checkpoint and redoes steps 4-6."""
    root, _ = models
    ckpt = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    manager = CheckpointManager(ckpt, keep_last=3, fingerprint="recipe-a")
    group = LearnerGroup(ar_spec(root, request.param), world_size=RANKS, num_cpus_per_rank=0.5,
                         checkpoints=manager)
    try:
        losses = []
        for step in range(STEPS):
            losses.append(group.train_step(step_rows(step), loss="ar_sft"))
            if step + 1 == 3:
                group.save(3)
        straight = group.full_state_dict()
        preds = group.reconstruct(["one", "two words", "three words here"])
        placements = group.placements()
    finally:
        group.shutdown()  # ray.kill of every rank: nothing survives but the files
    resumed_group = LearnerGroup(ar_spec(root, request.param), world_size=RANKS,
                                 num_cpus_per_rank=0.5, checkpoints=manager)
    try:
        assert resumed_group.load() == ckpt / "step_000003"
        resumed_losses = [resumed_group.train_step(step_rows(s), loss="ar_sft")
                          for s in range(3, STEPS)]
        resumed = resumed_group.full_state_dict()
    finally:
        resumed_group.shutdown()
    return dict(backend=request.param, losses=losses, straight=straight, resumed=resumed,
                resumed_losses=resumed_losses, preds=preds, ckpt=ckpt, placements=placements)


def test_losses_and_weights_match_a_single_process_reference(trained, reference):
    ref_losses, ref_state = reference
    got = [s["loss"] for s in trained["losses"]]
    np.testing.assert_allclose(got, ref_losses, rtol=LOSS_RTOL)
    assert all(s["count"] == ROWS and s["skipped"] == 0 for s in trained["losses"])
    assert set(trained["straight"]) == set(ref_state)
    for name, ref in ref_state.items():
        torch.testing.assert_close(trained["straight"][name], ref, atol=WEIGHT_ATOL, rtol=0,
                                   msg=lambda m: f"{trained['backend']} {name}: {m}")
    assert ref_losses[-1] < ref_losses[0]  # it learns, so agreement is not trivial


def test_the_host_memory_check_counts_every_rank_on_the_host(trained):
    """All ranks load the model into host memory at once: on this one-host cluster the memory
    plan's start-up check counts all of them, not one."""
    assert [p["ranks_on_host"] for p in trained["placements"]] == [RANKS] * RANKS


def test_resume_after_kill_is_exact(trained):
    assert [s["loss"] for s in trained["resumed_losses"]] == [s["loss"] for s in trained["losses"][3:]]
    for name, value in trained["straight"].items():
        assert torch.equal(trained["resumed"][name], value), name


def test_reconstruct_uses_the_trained_weights(trained, models):
    root, tok = models
    model = ActivationReconstructor.from_pretrained(root / "ar")
    model.load_state_dict(trained["straight"])
    expected = model.reconstruct(tok, ["one", "two words", "three words here"],
                                 template=DEFAULT_AR_TEMPLATE)
    torch.testing.assert_close(trained["preds"], expected, atol=1e-5, rtol=1e-5)


def test_damaged_checkpoint_falls_back_and_other_recipe_is_refused(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained["ckpt"], ckpt)
    older = ckpt / "step_000002"
    shutil.copytree(ckpt / "step_000003", older)  # a second, complete-looking checkpoint
    manifest = (older / "manifest.json").read_text().replace('"step": 3', '"step": 2')
    (older / "manifest.json").write_text(manifest)
    (ckpt / "step_000003" / "model.safetensors").write_bytes(b"truncated")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert CheckpointManager(ckpt, fingerprint="recipe-a").latest_valid() == older
    assert any(issubclass(w.category, CheckpointWarning) for w in caught)
    with pytest.raises(RecipeMismatchError, match="recipe mismatch"), warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)  # the damaged step 3 is skipped first
        CheckpointManager(ckpt, fingerprint="recipe-b").latest_valid()


def test_backends_agree(trained, reference):
    """Both backends are compared to one reference, so they agree within twice its tolerance."""
    ref_losses, _ = reference
    got = np.array([s["loss"] for s in trained["losses"]])
    assert np.all(np.abs(got - ref_losses) <= LOSS_RTOL * np.abs(ref_losses))


# ----------------------------------------------------------------------------- AV, LoRA, errors

def av_spec(root: Path, tok, *, targets=("q_proj", "v_proj")) -> LearnerSpec:
    meta = make_token_meta(tok, DEFAULT_AV_TEMPLATE, None)
    model = ModelSpec(role="av", model_dir=str(root / "av"), marker=meta.marker,
                      av_template=DEFAULT_AV_TEMPLATE,
                      injection=InjectionSpec("replace", 4.0),
                      lora=LoraSpec(rank=4, alpha=8.0, use_rslora=True, target_modules=targets))
    return LearnerSpec(model=model, optim=OPTIM, backend="fsdp2", micro_batch_size=MICRO)


def test_av_lora_logprobs_and_reference(ray_cluster, models):
    from transformers import AutoModelForCausalLM

    from actors.losses import completion_logprobs

    root, tok = models
    spec = av_spec(root, tok)
    group = LearnerGroup(spec, world_size=RANKS, num_cpus_per_rank=0.5)
    try:
        prompt = av_prompt_ids(tok, DEFAULT_AV_TEMPLATE, spec.model.marker.char)
        completions = [tok.encode(t, add_special_tokens=False) for t in ("a cat", "blue sea x")] * 2
        vectors = torch.randn(3, D).numpy()
        before = group.av_logprobs([prompt] * 3, completions[:3], vectors)
        other = group.av_logprobs([prompt] * 3, completions[:3], -vectors)
        stats = group.train_step(step_rows(0), loss="av_sft")
        after = group.av_logprobs([prompt] * 3, completions[:3], vectors)
        ref = group.av_logprobs([prompt] * 3, completions[:3], vectors, reference=True)
        adapter, full = group.trainable_state_dict(), group.full_state_dict()
    finally:
        group.shutdown()
    base = AutoModelForCausalLM.from_pretrained(root / "av")
    expected = completion_logprobs(base, [prompt] * 3, completions[:3], torch.from_numpy(vectors),
                                   marker=spec.model.marker, injection=spec.model.injection,
                                   pad_id=tok.pad_token_id, device="cpu")
    assert [len(x) for x in before] == [len(c) for c in completions[:3]]
    assert not torch.allclose(before[0], other[0], atol=1e-6)  # the injection reaches the ranks
    for b, r, e, a in zip(before, ref, expected, after):
        torch.testing.assert_close(b, e, atol=1e-5, rtol=1e-5)  # LoRA B = 0 at init
        torch.testing.assert_close(r, e, atol=1e-5, rtol=1e-5)  # adapter disabled = base
        assert not torch.allclose(a, e, atol=1e-4)  # the adapter trained
    assert stats["count"] > 0 and np.isfinite(stats["loss"])
    # The LoRA weight sync gathers the adapter alone: exactly the full state's LoRA tensors.
    assert adapter and sorted(adapter) == sorted(k for k in full if "lora_" in k)
    for name, value in adapter.items():
        assert torch.equal(value, full[name]), name


def test_token_budget_micro_batches_keep_the_exact_step_mean(ray_cluster, models, reference):
    """learner.micro_batch_tokens: rows grouped by padded tokens (not MICRO rows in order; in
    some steps the ranks' budgets give different numbers of micro-batches, which they must
    agree on or FSDP2's gathers deadlock), and the losses and weights still equal the
    single-process reference's."""
    from nla_rl.sft import token_budget_groups

    root, tok = models

    def lengths(step):
        return [build_ar_sft_batch(tok, share["explanations"], share["vectors"],
                                   template=DEFAULT_AR_TEMPLATE).attention_mask.sum(1).tolist()
                for share in split_rows(step_rows(step), RANKS)]

    first = lengths(0)[0]
    budget = max(first) + min(first)
    counts = [[len(token_budget_groups(rank, budget)) for rank in lengths(s)] for s in range(STEPS)]
    assert any(len(set(c)) > 1 for c in counts), counts  # ranks disagree before agreeing
    assert any(c != [ROWS // RANKS // MICRO] * RANKS for c in counts), counts
    spec = dataclasses.replace(ar_spec(root, "fsdp2"), micro_batch_tokens=budget)
    group = LearnerGroup(spec, world_size=RANKS, num_cpus_per_rank=0.5)
    try:
        losses = [group.train_step(step_rows(s), loss="ar_sft") for s in range(STEPS)]
        state = group.full_state_dict()
    finally:
        group.shutdown()
    ref_losses, ref_state = reference
    np.testing.assert_allclose([s["loss"] for s in losses], ref_losses, rtol=LOSS_RTOL)
    assert all(s["count"] == ROWS for s in losses)
    for name, ref in ref_state.items():
        torch.testing.assert_close(state[name], ref, atol=WEIGHT_ATOL, rtol=0)


def test_bad_inputs(ray_cluster, models):
    root, tok = models
    with pytest.raises(ConfigError, match="nonexistent_proj"):
        LearnerGroup(av_spec(root, tok, targets=("nonexistent_proj",)), world_size=RANKS,
                     num_cpus_per_rank=0.5)
    with pytest.raises(LearnerError, match="split evenly"):
        split_rows({"explanations": ["a", "b", "c"], "vectors": np.zeros((3, D))}, RANKS)
    with pytest.raises(LearnerError, match="same number of rows"):
        split_rows({"explanations": ["a", "b"], "vectors": np.zeros((3, D))}, RANKS)
