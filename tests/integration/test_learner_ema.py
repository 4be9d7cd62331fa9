"""The online AR's EMA scorer on real learner groups (2 gloo ranks, FSDP2 and DeepSpeed ZeRO-2).

The reference EMA is computed here from the full state dicts gathered after every step, so the
test checks the sharded bookkeeping (each rank averages only its shard or partition), the swap in
and out around the forward pass, and that the EMA survives a checkpoint round trip.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from actors.learner import LearnerError, LearnerGroup
from nla_rl.ar_model import ActivationReconstructor
from nla_rl.checkpoint import CheckpointManager
from nla_rl.templates import DEFAULT_AR_TEMPLATE
from tests.integration.test_learner import RANKS, ar_spec, models, step_rows  # noqa: F401

DECAY, STEPS = 0.5, 3
TEXTS = ["one", "two words", "three words here", "the blue sea and cats"]


def local_predictions(root, tok, state: dict) -> torch.Tensor:
    model = ActivationReconstructor.from_pretrained(root / "ar")
    model.load_state_dict(state)
    return model.reconstruct(tok, TEXTS, template=DEFAULT_AR_TEMPLATE)


@pytest.mark.parametrize("backend,zero_stage", [("fsdp2", 3), ("deepspeed", 2)])
def test_ema_scorer_matches_a_reference_average_and_resumes(backend, zero_stage, ray_cluster,
                                                            models, tmp_path):
    root, tok = models
    spec = dataclasses.replace(ar_spec(root, backend), ema_decay=DECAY, zero_stage=zero_stage)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2, fingerprint="ema")
    group = LearnerGroup(spec, world_size=RANKS, num_cpus_per_rank=0.5, checkpoints=manager)
    try:
        ema = {k: v.clone() for k, v in group.full_state_dict().items()}
        for step in range(STEPS):
            group.train_step(step_rows(step), loss="ar_sft")
            live = group.full_state_dict()
            ema = {k: DECAY * ema[k] + (1 - DECAY) * live[k] for k in ema}
        scored = group.reconstruct(TEXTS, ema=True)
        after = group.reconstruct(TEXTS)  # the live weights are back after the EMA pass
        group.save(STEPS)
    finally:
        group.shutdown()

    expected_ema = local_predictions(root, tok, ema)
    expected_live = local_predictions(root, tok, live)
    assert (expected_ema - expected_live).abs().max() > 1e-3  # the two differ: the test can fail
    torch.testing.assert_close(scored, expected_ema, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, expected_live, atol=1e-5, rtol=1e-5)

    resumed = LearnerGroup(spec, world_size=RANKS, num_cpus_per_rank=0.5, checkpoints=manager)
    try:
        resumed.load()
        torch.testing.assert_close(resumed.reconstruct(TEXTS, ema=True), scored, atol=1e-6,
                                   rtol=1e-6)
    finally:
        resumed.shutdown()


def test_ema_scoring_without_an_ema_or_on_zero3_is_refused(ray_cluster, models):
    root, _ = models
    with pytest.raises(LearnerError, match="ZeRO-3"):
        LearnerGroup(dataclasses.replace(ar_spec(root, "deepspeed"), ema_decay=0.9),
                     world_size=RANKS, num_cpus_per_rank=0.5)
    group = LearnerGroup(ar_spec(root, "fsdp2"), world_size=RANKS, num_cpus_per_rank=0.5)
    try:
        with pytest.raises(LearnerError, match="ema_decay"):  # Ray re-raises the rank's type
            group.reconstruct(TEXTS, ema=True)
    finally:
        group.shutdown()
