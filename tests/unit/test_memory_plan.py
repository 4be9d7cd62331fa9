"""A learner rank's memory plan: counts read from checkpoint headers, the formulas of
``nla_rl.memory_plan``, and one clear error (naming the keys to change) for a plan that cannot fit."""

from types import SimpleNamespace

import pytest

from actors.learner import LearnerRank, LearnerSpec, raise_bad_input
from actors.learner_models import LoraSpec, ModelSpec, apply_lora
from actors.backends import OptimSpec
from nla_rl import memory_plan
from nla_rl.memory_plan import (GIB, MemoryPlanError, ModelShape, check_static_fits,
                                check_step_fits, plan_rank, read_shape)

# Qwen2.5-7B's shape (config.json of the published model), params as counted by its index.
QWEN7B = ModelShape(params=7_615_616_512, d_model=3584, layers=28, intermediate=18944,
                    vocab=152_064, linear_shapes={})


def test_counts_come_from_the_headers_and_match_the_model(tiny):
    shape = read_shape(tiny.path)
    assert shape.params == sum(p.numel() for p in tiny.model.parameters())
    config = tiny.model.config
    assert (shape.d_model, shape.layers, shape.vocab) == (
        config.hidden_size, config.num_hidden_layers, config.vocab_size)


def test_lora_count_equals_peft_trainable_parameters(qwen):
    targets = ("q_proj", "v_proj", "down_proj")
    from transformers import AutoModelForCausalLM

    shape = read_shape(qwen.path)
    fresh = AutoModelForCausalLM.from_pretrained(qwen.path)  # peft edits the model it wraps
    model = apply_lora(fresh, LoraSpec(rank=4, target_modules=targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert shape.lora_params(4, targets) == trainable


def _plan(**kw):
    args = dict(role="av", world_size=1, sharded_weights=True, compute_dtype="bfloat16")
    return plan_rank(QWEN7B, **{**args, **kw})


def test_the_formulas_move_the_way_each_key_should():
    one, eight = _plan(), _plan(world_size=8)
    assert one.weights == 4 * QWEN7B.params and one.optimizer == 16 * QWEN7B.params
    assert eight.static == pytest.approx(one.static / 8, rel=1e-6)  # FSDP2 / ZeRO-3 shard all
    zero2 = _plan(world_size=8, sharded_weights=False)
    assert zero2.weights == one.weights and zero2.gradients == eight.gradients
    lora = _plan(lora_rank=16, with_reference=True)  # LoRA: no frozen copy, tiny optimizer
    assert lora.reference == 0 and lora.gradients == 0 == lora.optimizer  # no shapes: no targets
    assert _plan(with_reference=True).reference == one.weights
    tokens = 4096
    # checkpointing keeps each block's input (d) instead of its 8·d + 4·i tensors
    block = 8 * QWEN7B.d_model + 4 * QWEN7B.intermediate
    ratio = (QWEN7B.d_model * QWEN7B.layers + block) / (QWEN7B.layers * block)
    checkpointed = _plan(gradient_checkpointing=True).parts(tokens)["activations"]
    assert checkpointed == pytest.approx(ratio * one.parts(tokens)["activations"])
    full = _plan(lean_logprobs=False)
    assert full.parts(tokens)["logits"] == 3 * 4 * QWEN7B.vocab * tokens  # 7.5 GiB
    assert one.parts(tokens)["logits"] == 3 * 32 * 2**20  # lean: three 32 MiB chunks
    assert plan_rank(QWEN7B, role="ar", world_size=1, sharded_weights=True,
                     compute_dtype="bfloat16", lean_logprobs=False).parts(tokens)["logits"] == 0


def test_a_full_7b_on_one_80gib_gpu_is_refused_naming_the_keys():
    with pytest.raises(MemoryPlanError) as err:
        check_static_fits(_plan(with_reference=True), device_free=80 * GIB, host_free=10**13,
                          ranks_on_host=1, what="the AV learner (rank 0 of 1)", device="cuda:0")
    message = str(err.value)
    need = 4 * QWEN7B.params * (1 + 1 + 1 + 4) / GIB  # weights, reference, gradients, AdamW
    assert f"the AV learner (rank 0 of 1): each rank needs about {need:.1f} GiB" in message
    assert "80.0 GiB free" in message and "learner.lora_rank" in message
    assert "learner.ranks_av" in message and "learner.zero_stage=3" in message
    # eight FSDP2 ranks, or LoRA on one, fit
    check_static_fits(_plan(world_size=8, with_reference=True), device_free=80 * GIB,
                      host_free=10**13, ranks_on_host=1, what="av", device="cuda:0")
    lora = plan_rank(QWEN7B, role="av", world_size=1, sharded_weights=True,
                     compute_dtype="bfloat16", lora_rank=16, with_reference=True)
    check_static_fits(lora, device_free=80 * GIB, host_free=10**13, ranks_on_host=1,
                      what="av", device="cuda:0")


def test_the_host_load_of_every_rank_is_checked():
    load = 8 * 4 * QWEN7B.params / GIB
    with pytest.raises(MemoryPlanError, match=rf"8 rank\(s\) on this host: {load:.1f} GiB\) but "
                                              r"the host has 200.0 GiB free"):
        check_static_fits(_plan(world_size=8), device_free=80 * GIB, host_free=200 * GIB,
                          ranks_on_host=8, what="av", device="cuda:0")


def test_a_micro_batch_too_big_for_its_activations_is_refused_before_its_forward():
    plan = _plan(world_size=8)
    with pytest.raises(MemoryPlanError) as err:
        check_step_fits(plan, tokens=16 * 1024, rows=16, device_free=40 * GIB, what="av",
                        device="cuda:0", micro_batch_tokens=None, checkpointing=False)
    message = str(err.value)
    need = (16 * 1024 * 28 * 2 * (8 * 3584 + 4 * 18944) + 3 * 32 * 2**20) / GIB
    assert f"a micro-batch of 16384 tokens needs about {need:.1f} GiB" in message
    assert "learner.micro_batch_tokens (now None" in message
    assert "learner.gradient_checkpointing" in message
    check_step_fits(_plan(world_size=8, gradient_checkpointing=True), tokens=16 * 1024,
                    rows=16, device_free=40 * GIB, what="av", device="cuda:0",
                    micro_batch_tokens=None, checkpointing=True)


def _rank(path, role="av") -> LearnerRank:
    spec = LearnerSpec(model=ModelSpec(role=role, model_dir=str(path), with_reference=True),
                       optim=OptimSpec(lr=1e-4, weight_decay=0.0, warmup_steps=0, total_steps=1,
                                       schedule="constant", grad_clip=1.0))
    return LearnerRank(spec, rank=1, world_size=2)


def test_a_rank_checks_its_plan_before_loading_and_ray_shows_the_error_itself(qwen, monkeypatch):
    rank = _rank(qwen.path)
    plan = rank._check_memory_plan()  # the tiny model fits this machine
    assert plan.weights == 4 * sum(p.numel() for p in qwen.model.parameters()) // 2
    monkeypatch.setattr(memory_plan, "host_free_bytes", lambda: 1000)
    with pytest.raises(MemoryPlanError, match=r"the AV learner \(rank 1 of 2\): each rank needs"):
        rank._check_memory_plan()
    # a rank's NLAError reaches the driver as itself, after the group is shut down
    stopped = []
    wrapped = SimpleNamespace(cause=MemoryPlanError("does not fit"))
    with pytest.raises(MemoryPlanError, match="^does not fit$"):
        raise_bad_input(wrapped, lambda: stopped.append(True))
    assert stopped == [True]
    raise_bad_input(SimpleNamespace(cause=RuntimeError("a bug")))  # not bad input: left as is


def test_an_unreadable_checkpoint_is_left_to_the_loader_to_report(tmp_path, qwen):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(qwen.path, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MemoryPlanError, match="cannot read the model's shape"):
        read_shape(broken)
    assert _rank(broken)._check_memory_plan() is None  # no plan: build_model's error comes next
