"""No silent hangs, with real Ray actors that stall on purpose (sleep "forever").

An engine that stalls in generate is killed after its deadline and replaced, and the re-run
slice equals what it would have produced; a learner rank that stalls stops its group with one
error naming the rank, the phase and the last checkpoint; a stalled datagen worker stops the
stage. Each test works with a generous deadline first, then makes it tiny (``floor_s``) just
before the stalled call, so it fails in seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import actors.datagen as datagen
from actors.datagen import ExtractionHungError, ExtractionSpec, run_extraction
from actors.deadline import CallDeadline
from actors.learner import LearnerGroup, LearnerHungError, LearnerRank, LearnerSpec
from actors.learner_models import ModelSpec
from actors.rollout import EngineLostError, RolloutActor, RolloutPool, replacement_metrics
from nla_rl.ar_model import ActivationReconstructor
from nla_rl.checkpoint import CheckpointManager
from nla_rl.data.corpus import Document
from nla_rl.templates import DEFAULT_AR_TEMPLATE
from rollout.base import EngineSpec, SamplingSpec
from tests.integration._engine_setup import INJECTIONS, build_model, make_requests, marker_of

STALL_S = 1e6  # "forever": the actor is killed long before
SAMPLED = SamplingSpec(n=2, temperature=1.0, max_new_tokens=6, seed=4)


class StallOnceActor(RolloutActor):
    """generate stalls while a ``stall_once`` file lies beside the model; the actor that stalls
    takes the file away, so its replacement serves normally."""

    def generate(self, requests, sampling):
        flag = Path(self.engine.model_dir).parent / "stall_once"
        try:
            flag.unlink()
        except FileNotFoundError:
            return super().generate(requests, sampling)
        time.sleep(STALL_S)


class StallOncePool(RolloutPool):
    actor_body = StallOnceActor


class StallingRank(LearnerRank):
    """Rank 1 stalls after its second update, past the step's last collective (rank 0 answers)."""

    def train_step(self, rows, loss_name):
        out = super().train_step(rows, loss_name)
        self.updates = getattr(self, "updates", 0) + 1
        if self.rank == 1 and self.updates == 2:
            time.sleep(STALL_S)
        return out


class StallingGroup(LearnerGroup):
    rank_body = StallingRank


class NeverStartingActor(RolloutActor):
    """An engine whose start-up (the model load) never ends."""

    def __init__(self, spec, **kwargs):
        time.sleep(STALL_S)


class NeverStartingPool(RolloutPool):
    actor_body = NeverStartingActor


class NeverSetUpRank(LearnerRank):
    """A rank whose setup (model load, process group) never ends."""

    def setup(self, address, port):
        time.sleep(STALL_S)


class NeverSetUpGroup(LearnerGroup):
    rank_body = NeverSetUpRank


class StallingWorker:
    """An extraction worker that never finishes a shard."""

    def __init__(self, spec, num_threads: int = 1, logs=None):
        pass

    def run(self, shard_index, docs, path):
        time.sleep(STALL_S)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hang_model")
    model, tok = build_model(root / "model", seed=3)
    ActivationReconstructor.from_base(root / "model", 1).save_pretrained(root / "ar", tok)
    return {"root": root, "tok": tok,
            "requests": make_requests(tok, marker_of(tok), model.config.hidden_size),
            "kwargs": dict(model_dir=str(root / "model"), marker=marker_of(tok),
                           injection=INJECTIONS["replace"])}


def token_ids(groups):
    return [[s.token_ids for s in group] for group in groups]


def test_a_stalled_engine_is_killed_and_replaced(ray_cluster, tiny, capfd):
    deadline = CallDeadline(floor_s=120.0, factor=2.0)
    pool = StallOncePool(EngineSpec.from_kwargs("hf", **tiny["kwargs"]),
                         num_engines=1, num_cpus_per_engine=1,
                         deadline=deadline)
    try:
        expected = token_ids(pool.generate(tiny["requests"], SAMPLED))  # timed: bounds the next
        stalled, pid = pool.actors[0], pool.health()[0]["pid"]
        pool.heartbeat()
        deadline.floor_s = 0.5  # now 2 x the first generate's time
        limit = deadline.seconds("generate")
        (tiny["root"] / "stall_once").touch()
        started = time.perf_counter()
        assert token_ids(pool.generate(tiny["requests"], SAMPLED)) == expected
        assert time.perf_counter() - started < limit + 30  # the deadline, a restart, a re-run
        [event] = pool.drain_replacements()
        assert (event.engine, event.method, event.missed_deadline) == (0, "generate", True)
        assert event.cause == f"no answer within {limit:.3g}s during generate"
        metrics = {**replacement_metrics([event], step=1), **pool.heartbeat()}
        assert metrics["health/engine_deadline_misses"] == 1.0
        assert 0 < metrics["health/engine_last_call_s"] < limit + 30
        assert metrics["health/engine_deadline_s"] == deadline.seconds("generate")
        assert pool.actors[0] is not stalled and pool.health()[0]["pid"] != pid
        with pytest.raises(ray_cluster.exceptions.RayActorError):  # killed, not left sleeping
            ray_cluster.get(stalled.health.remote(), timeout=30)
    finally:
        pool.shutdown()
    assert "engine actor 0 lost (no answer within" in capfd.readouterr().out


def test_a_stalled_learner_rank_stops_the_group_naming_it(ray_cluster, tiny, tmp_path):
    spec = LearnerSpec(model=ModelSpec(role="ar", model_dir=str(tiny["root"] / "ar"),
                                       ar_template=DEFAULT_AR_TEMPLATE, mse_scale=8.0),
                       micro_batch_size=2, optim=_optim())
    manager = CheckpointManager(tmp_path / "rl" / "ar", keep_last=2, fingerprint="x")
    deadline = CallDeadline(floor_s=120.0, factor=2.0)
    group = StallingGroup(spec, world_size=2, num_cpus_per_rank=0.5, name="rl_ar",
                          checkpoints=manager, deadline=deadline)
    try:
        rows = {"explanations": ["a red cat", "the sea", "a door", "rain"],
                "vectors": _vectors(4, tiny["tok"], tiny["root"])}
        group.train_step(rows, loss="ar_sft")
        saved = group.save(1)
        deadline.floor_s = 0.5  # now 2 x the first update's time
        started = time.perf_counter()
        with pytest.raises(LearnerHungError) as err:
            group.train_step(rows, loss="ar_sft")
        assert time.perf_counter() - started < deadline.seconds("ar step") + 10
    finally:
        group.shutdown()
    message = str(err.value)
    assert message.startswith("learner rl_ar: rank 1 did not answer (rank 0 did) within")
    assert "during ar step; the run is stopped" in message
    assert f"Last completed checkpoint: {saved}." in message
    assert group.ranks == []


def test_an_engine_that_never_starts_is_named_within_the_deadline(ray_cluster, tiny):
    started = time.perf_counter()
    with pytest.raises(EngineLostError, match=r"rollout engine actor 0 did not start: no answer "
                                              r"within 3s during engine start.*engine.log"):
        NeverStartingPool(EngineSpec.from_kwargs("hf", **tiny["kwargs"]), num_engines=1,
                          num_cpus_per_engine=1, deadline=CallDeadline(floor_s=3.0, factor=1.0))
    assert time.perf_counter() - started < 20


def test_a_learner_group_that_never_starts_is_named_within_the_deadline(ray_cluster, tiny):
    spec = LearnerSpec(model=ModelSpec(role="ar", model_dir=str(tiny["root"] / "ar"),
                                       ar_template=DEFAULT_AR_TEMPLATE, mse_scale=8.0),
                       micro_batch_size=2, optim=_optim())
    started = time.perf_counter()
    with pytest.raises(LearnerHungError) as err:
        NeverSetUpGroup(spec, world_size=2, num_cpus_per_rank=0.5, name="rl_ar",
                        deadline=CallDeadline(floor_s=8.0, factor=1.0))
    assert time.perf_counter() - started < 40
    message = str(err.value)
    assert message.startswith("learner rl_ar: ") and "within 8s during start-up" in message
    assert "Last completed checkpoint: none (this group keeps no checkpoints)" in message


def test_a_stalled_datagen_worker_stops_the_stage(ray_cluster, monkeypatch, tmp_path):
    monkeypatch.setattr(datagen, "ExtractionWorker", StallingWorker)
    docs = [Document(i, "the cat sat on the mat " * 4) for i in range(4)]
    spec = ExtractionSpec("unused", 1, positions_per_doc=1, min_pos=2, max_tokens=64, seed=0)
    started = time.perf_counter()
    with pytest.raises(ExtractionHungError,
                       match=r"worker 0 did not finish shard 0 \(shard-000000.parquet\) within 1s"
                             r".*resumes at the first unfinished one"):
        run_extraction(spec, docs, tmp_path / "shards", docs_per_shard=2, num_workers=1,
                       progress=False, deadline=CallDeadline(floor_s=1.0, factor=1.0))
    assert time.perf_counter() - started < 15


def _optim():
    from actors.backends import OptimSpec

    return OptimSpec(lr=1e-3, weight_decay=0.0, warmup_steps=0, total_steps=4,
                     schedule="constant", grad_clip=1.0)


def _vectors(n: int, tok, root: Path):
    import json

    import numpy as np

    d = json.loads((root / "model" / "config.json").read_text())["hidden_size"]
    return np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
