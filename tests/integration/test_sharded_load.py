"""Sharded loading on a real 2-rank FSDP2 learner group (gloo, CPU): the same group started the
sharded way (each rank builds on meta and reads only its rows) and the whole-model way gives
bit-identical full state dicts, then the same loss and gradient norm after one step and the same
weights, for the AV with its KL reference, a LoRA AV and the AR with its reference; and each rank
read only its own rows (the ranks' bytes add up to the checkpoint's once, each at most its share).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open

from actors.learner import LearnerGroup
from actors.learner_models import LoraSpec
from tests.integration.test_learner import (D, RANKS, ar_spec, av_spec, models,  # noqa: F401
                                            step_rows)
from nla_rl.templates import DEFAULT_AV_TEMPLATE, av_prompt_ids


def stored_sizes(model_dir) -> dict[str, tuple[int, int]]:
    """Per stored tensor: its bytes and the most bytes one rank's torch.chunk piece may hold."""
    out = {}
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                t = handle.get_tensor(key)
                row = t.element_size() * (t[0].numel() if t.dim() else 1)
                out[key] = (t.numel() * t.element_size(),
                            row * -(-(t.shape[0] if t.dim() else 1) // RANKS))
    return out


def run(spec, sharded: bool, tok, loss: str) -> dict:
    """Start a group, gather its state, do one step, gather again (and the reference's view)."""
    group = LearnerGroup(dataclasses.replace(spec, sharded_load=sharded), world_size=RANKS,
                         num_cpus_per_rank=0.5)
    try:
        out = {"placements": group.placements(), "before": group.full_state_dict()}
        if spec.model.role == "av":
            prompt = av_prompt_ids(tok, DEFAULT_AV_TEMPLATE, spec.model.marker.char)
            completions = [tok.encode(t, add_special_tokens=False) for t in ("a cat", "blue sea")]
            vectors = torch.randn(2, D, generator=torch.Generator().manual_seed(1)).numpy()
            probe = lambda: group.av_logprobs([prompt] * 2, completions, vectors,  # noqa: E731
                                              reference=True)
        else:
            probe = lambda: group.reconstruct(["one", "two words"],  # noqa: E731
                                              reference=spec.model.with_reference)
        out["probe"] = probe()
        out["stats"] = group.train_step(step_rows(0), loss=loss)
        out["after"] = group.full_state_dict()
        out["probe_after"] = probe()
    finally:
        group.shutdown()
    return out


def _assert_equal_states(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name, value in a.items():
        assert value.dtype == b[name].dtype and torch.equal(value, b[name]), name


def _assert_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def with_reference(spec, **model_changes):
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, with_reference=True,
                                                               **model_changes))


CASES = {
    "av_with_reference": lambda root, tok: with_reference(av_spec(root, tok), lora=LoraSpec()),
    "av_lora": lambda root, tok: av_spec(root, tok),
    "ar_with_reference": lambda root, tok: with_reference(ar_spec(root, "fsdp2")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_and_whole_loads_are_identical(ray_cluster, models, case):  # noqa: F811
    root, tok = models
    spec = CASES[case](root, tok)
    loss = "av_sft" if spec.model.role == "av" else "ar_sft"
    sharded, whole = run(spec, True, tok, loss), run(spec, False, tok, loss)
    assert {p["load"] for p in sharded["placements"]} == {"sharded"}
    assert {p["load"] for p in whole["placements"]} == {"whole: learner.sharded_load is false"}
    _assert_equal_states(sharded["before"], whole["before"])
    _assert_equal(sharded["probe"], whole["probe"])  # the reference (or the AR) reads the same
    assert sharded["stats"]["loss"] == whole["stats"]["loss"]
    assert sharded["stats"]["grad_norm"] == whole["stats"]["grad_norm"]
    _assert_equal_states(sharded["after"], whole["after"])
    _assert_equal(sharded["probe_after"], whole["probe_after"])
    _check_each_rank_read_only_its_rows(sharded["placements"], spec)


def _check_each_rank_read_only_its_rows(placements: list[dict], spec) -> None:
    from pathlib import Path

    sizes = stored_sizes(Path(spec.model.model_dir))  # the AR's value head file included
    total, share = sum(s for s, _ in sizes.values()), sum(p for _, p in sizes.values())
    models_loaded = {"model", "reference"} if spec.model.with_reference and not \
        spec.model.lora.rank else {"model"}
    for what in models_loaded:
        read = [p["loaded"][what]["bytes_read"] for p in placements]
        assert sum(read) == total, (what, read, total)  # every row read once, by one rank
        assert all(r <= share for r in read), (what, read, share)  # none read a whole tensor
        largest = max(s for s, _ in sizes.values())
        assert all(p["loaded"][what]["largest_read"] < largest for p in placements)
