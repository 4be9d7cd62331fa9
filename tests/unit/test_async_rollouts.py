"""``rl.async_level``: the real RL loop (actors.coordinator.rl_loop), checkpointing
(launch.rl.save_both) and resume (launch.rl.resume) over fake actors that record which policy
version generated each batch and when generation and training ran.

- Level L: step t's rollouts come from version max(0, t - L) exactly, logged per step.
- Level 0 is the synchronous loop (nothing overlaps); level ≥ 1 overlaps the next batch's
  generation with the current update.
- A run interrupted after a checkpoint and resumed logs exactly what the uninterrupted run did.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from actors.coordinator import RLWorld, rl_loop, sync_engines
from actors.rollouts_ahead import INFLIGHT_FILE
from launch.rl import resume, save_both
from nla_rl.checkpoint import CheckpointManager, DataCursor
from nla_rl.config import recipe_from_dict
from nla_rl.rl_data import RLBatch
from rollout.base import RolloutRequest, Sample

STEPS, ROWS, DIM = 6, 12, 4
WORK_S = 0.15  # each fake generate and train_step takes this long


class Clock:
    """Intervals of named work, in the order it started."""

    def __init__(self):
        self.events, self._lock = [], threading.Lock()

    def run(self, name: str, step: int, work):
        started = time.perf_counter()
        time.sleep(WORK_S)
        out = work()
        with self._lock:
            self.events.append((name, step, started, time.perf_counter()))
        return out

    def interval(self, name: str, step: int) -> tuple[float, float]:
        return next((a, b) for n, s, a, b in self.events if n == name and s == step)


class FakePolicy:
    """The AV group: version = updates applied; log-probs depend on the version, so stale
    rollouts really differ from the learner; checkpoints through a real manager."""

    def __init__(self, root, cfg, clock: Clock, crash_at: int | None = None):
        self.version, self.clock, self.crash_at, self.world_size = 0, clock, crash_at, 1
        self.checkpoints = CheckpointManager.for_recipe(root, cfg, "rl_av", keep_last=2)
        self.spec = SimpleNamespace(model=SimpleNamespace(lora=SimpleNamespace(rank=0)))

    def train_step(self, rows, loss):
        step = self.version
        if step == self.crash_at:
            raise RuntimeError("the run is killed here")

        def update():
            self.version += 1
            return {"loss": float(np.mean(rows["advantages"])) + step}
        return self.clock.run("train", step, update)

    def av_logprobs(self, prompts, completions, vectors, reference=False, temperature=1.0):
        return [torch.full((len(c),), -0.01 * (1 + self.version)) for c in completions]

    def full_state_dict(self, phase=""):
        return {"version": torch.tensor([self.version])}

    def save(self, step, *, extra_files=None):
        def write(staging):
            (staging / "version.txt").write_text(str(self.version))
            extra_files(staging)
        return self.checkpoints.save(step, write)

    def load_state(self, path):
        self.version = int((path / "version.txt").read_text())


class FakeCritic:
    """The AR group: ĥ is a hash of the explanation (so the reward depends on what was written)."""

    def __init__(self, root, cfg):
        self.world_size, self.trained = 1, 0
        self.checkpoints = CheckpointManager.for_recipe(root, cfg, "rl_ar", keep_last=3)
        self.spec = SimpleNamespace(ema_decay=0.0, model=SimpleNamespace(reward_basis=""))

    def reconstruct(self, texts, ema=False, reference=False):
        seeds = [int(hashlib.sha1(t.encode()).hexdigest()[:8], 16) for t in texts]
        return torch.stack([torch.from_numpy(np.random.default_rng(s).normal(size=DIM)).float()
                            for s in seeds])

    def train_step(self, rows, loss):
        self.trained += 1
        return {"loss": 0.5}

    def save(self, step, *, extra_files=None):
        return self.checkpoints.save(step, lambda staging: (staging / "ar.txt").write_text("ar"))

    def load_state(self, path):
        pass


class FakeEngines:
    """The engine pool: serves the version last synced; what it writes depends on the version
    and the sampling seed (the step), so a regenerated batch equals the original."""

    def __init__(self, clock: Clock):
        self.version, self.clock, self.generated = 0, clock, {}

    def generate(self, requests, sampling):
        step = int(requests[0].request_id.split(":")[0])
        version = self.version

        def write():
            self.generated[step] = version
            return [[Sample(f"<explanation>v{version} s{sampling.seed + i} {j}</explanation>",
                            [5, 6, 7], [-0.01 * (1 + version)] * 3, "stop", True)
                     for j in range(sampling.n)] for i in range(len(requests))]
        return self.clock.run("generate", step, write)

    def sync_weights(self, items):
        self.version = int(dict(items)["version"])

    def verify_sync(self, expected, probe, tol):
        return 0.0

    def drain_replacements(self):
        return []

    def heartbeat(self):
        return {}


class FakeData:
    """RLData's draw: rows from a seeded cursor (what a checkpoint saves)."""

    def __init__(self, seed: int):
        self.vectors = np.random.default_rng(0).normal(size=(ROWS, DIM)).astype(np.float32)
        self.cursor = DataCursor(ROWS, seed)

    def next_batch(self, size, step):
        rows = np.asarray(self.cursor.next_indices(size), dtype=np.int64)
        return RLBatch(rows, self.vectors[rows], rows, None, None)


class FakeTracker:
    def __init__(self):
        self.rows, self.samples = {}, {}

    def log(self, step, metrics, stage):
        self.rows[step] = dict(metrics)

    def log_samples(self, step, rows):
        self.samples[step] = rows


def recipe(level: int):
    return recipe_from_dict({}, [f"rl.steps={STEPS}", f"rl.async_level={level}",
                                 "rl.prompts_per_step=2", "rl.group_size=2", "rl.kl_beta=0",
                                 "rl.frozen_ar_every=0", "rl.save_every=2", "rl.samples_every=1",
                                 "rl.stop_on_unhealthy=false", "run.resume=true"])


def fake_world(root, level: int, crash_at: int | None = None) -> RLWorld:
    cfg, clock = recipe(level), Clock()
    data = FakeData(cfg.rl_seed)
    probe = ([RolloutRequest([1, 2], torch.zeros(DIM), "probe")], [[5, 6]])
    return RLWorld(cfg=cfg, policy=FakePolicy(root / "av", cfg, clock, crash_at),
                   critic=FakeCritic(root / "ar", cfg), engines=FakeEngines(clock), data=data,
                   tracker=FakeTracker(), prompt_ids=[1, 2], prefill="", eos_ids=frozenset({0}),
                   mse_scale=None, probe=probe, checkpoint=save_both, warn=lambda _: None)


def learning_metrics(rows: dict) -> dict:
    """Everything logged except wall times (which differ between two runs) and the probe's
    sync check (a resumed process verifies its first sync; the run it continues did not), with
    NaN (no negatives here: no gap) made comparable."""
    return {step: {k: "nan" if v != v else v for k, v in m.items()
                   if not k.startswith("perf/") and k != "health/sync_logp_delta"}
            for step, m in rows.items()}


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return min(a[1], b[1]) - max(a[0], b[0]) > 0.02


@pytest.mark.parametrize("level", [0, 1, 2])
def test_each_step_uses_the_policy_exactly_async_level_versions_old(tmp_path, level):
    world = fake_world(tmp_path, level)
    rl_loop(world, 0)
    expected = {t: max(0, t - level) for t in range(STEPS)}
    assert world.engines.generated == expected
    logged = world.tracker.rows
    assert [logged[t + 1]["rollout/policy_version"] for t in range(STEPS)] == list(expected.values())
    assert [logged[t + 1]["rollout/staleness"] for t in range(STEPS)] == \
        [min(t, level) for t in range(STEPS)]
    assert {r["policy_version"] for r in world.tracker.samples[STEPS]} == {expected[STEPS - 1]}
    assert world.policy.version == STEPS and world.critic.trained == STEPS
    # The stale rollouts are what the truncated importance weights correct: the learner's
    # log-probs differ from the engine's by exactly the staleness (0.01 per version).
    mismatch = [logged[t + 1]["health/logp_mismatch_mean"] for t in range(STEPS)]
    assert mismatch == pytest.approx([0.01 * min(t, level) for t in range(STEPS)], abs=1e-6)


def test_level_0_is_the_synchronous_loop_and_level_1_overlaps_generation(tmp_path):
    sync = fake_world(tmp_path / "sync", 0)
    rl_loop(sync, 0)
    clock = sync.policy.clock
    for t in range(STEPS):  # generate(t) → train(t) → generate(t+1): nothing overlaps
        assert clock.interval("generate", t)[1] <= clock.interval("train", t)[0]
        if t + 1 < STEPS:
            assert clock.interval("train", t)[1] <= clock.interval("generate", t + 1)[0]

    ahead = fake_world(tmp_path / "ahead", 1)
    rl_loop(ahead, 0)
    clock = ahead.policy.clock
    for t in range(STEPS - 1):  # the next batch is generated while this step trains
        assert overlaps(clock.interval("generate", t + 1), clock.interval("train", t))
    # Same work, less wall time: one WORK_S of overlap per step.
    wall = lambda w: sum(r["perf/step_s"] for r in w.tracker.rows.values())  # noqa: E731
    assert wall(ahead) < wall(sync) - (STEPS - 2) * WORK_S * 0.5


@pytest.mark.parametrize("level", [1, 2])
def test_a_resumed_run_logs_exactly_what_the_uninterrupted_run_did(tmp_path, level):
    whole = fake_world(tmp_path / "whole", level)
    rl_loop(whole, 0)

    crashed = fake_world(tmp_path / "crashed", level, crash_at=4)  # killed in step 5's update
    with pytest.raises(RuntimeError, match="killed"):
        rl_loop(crashed, 0)
    saved = json.loads((crashed.policy.checkpoints.step_path(4) / INFLIGHT_FILE).read_text())
    assert [r["step"] for r in saved["rollouts"]] == list(range(4, 4 + level))
    assert [r["version"] for r in saved["rollouts"]] == [t - level for t in range(4, 4 + level)]

    resumed = fake_world(tmp_path / "crashed", level)  # a new process on the same directory
    start = resume(resumed, resumed.cfg)
    assert start == 4
    sync_engines(resumed)  # what launch.rl does: the engines get the checkpoint's weights
    rl_loop(resumed, start)
    assert learning_metrics(resumed.tracker.rows) == \
        {s: m for s, m in learning_metrics(whole.tracker.rows).items() if s > start}
    assert {t: v for t, v in resumed.engines.generated.items()} == \
        {t: t - level for t in range(start + level, STEPS)}  # only R_{s+L}.. regenerated


def test_rollouts_saved_at_another_level_are_regenerated_and_said(tmp_path):
    crashed = fake_world(tmp_path, 1, crash_at=4)
    with pytest.raises(RuntimeError):
        rl_loop(crashed, 0)
    resumed, said = fake_world(tmp_path, 2), []
    resumed.warn = said.append
    start = resume(resumed, resumed.cfg)
    sync_engines(resumed)
    rl_loop(resumed, start)
    assert "regenerated by the restored policy" in said[0]
    assert resumed.engines.generated == {4: 4, 5: 4}  # both from the checkpoint's policy
