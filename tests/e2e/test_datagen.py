"""The datagen stage on the toy world: determinism, kill + resume, Ray workers, outputs."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from launch.train import main
from nla_rl.data.negatives import check_negatives_match, read_negatives, read_negatives_params
from nla_rl.data.store import read_activations
from nla_rl.sidecar import read_dataset_sidecar
from tests.e2e.conftest import FAST, TINY
from tests.unit.test_teachers import api  # noqa: F401 (the scripted local API server fixture)

DATA_FILES = ("base.parquet", "av_sft.parquet", "ar_sft.parquet", "rl.parquet", "eval.parquet",
              "rl.negatives.parquet")


def _datagen(run_dir, *extra):
    return [TINY, f"run.dir={run_dir}", "run.stages=[prepare,datagen]", *FAST, *extra]


def _bytes(run_dir):
    return {name: (run_dir / "data" / name).read_bytes() for name in DATA_FILES}


def test_datagen_outputs_and_byte_identical_rerun(new_run):
    a, b = new_run("a"), new_run("b")
    assert main(_datagen(a, "data.workers=0")) == 0
    assert main(_datagen(b, "data.workers=0")) == 0
    assert _bytes(a) == _bytes(b)

    data = a / "data"
    splits = {s: pq.read_table(data / f"{s}.parquet") for s in ("av_sft", "ar_sft", "rl", "eval")}
    docs = [set(t["doc_id"].to_pylist()) for t in splits.values()]
    assert all(not (x & y) for i, x in enumerate(docs) for y in docs[i + 1:]), "document leak"
    base = read_dataset_sidecar(data / "base.parquet")
    assert sum(t.num_rows for t in splits.values()) == base.extras["stats"]["ok"]
    assert base.extras["stats"]["refused"] > 0  # the partial teacher drops rows, and counts them
    for split, table in splits.items():
        sc = read_dataset_sidecar(data / f"{split}.parquet")
        assert sc.stage == split and sc.row_count == table.num_rows and sc.d_model == 128
        assert {"explanation", "attributes", "activation_vector"} <= set(table.column_names)
    # Positions respect min_pos; every explanation names only attributes of its slot vocabulary.
    assert min(splits["rl"]["position"].to_pylist()) >= 8
    vectors = read_activations(data / "rl.parquet")
    assert vectors.dtype == np.float32 and vectors.flags["C_CONTIGUOUS"]
    neighbors, _ = read_negatives(data / "rl.negatives.parquet")
    assert neighbors.shape[0] == len(vectors)
    check_negatives_match(read_negatives_params(data / "rl.negatives.parquet"), len(vectors), "rl")
    rl_docs = splits["rl"]["doc_id"].to_numpy()
    valid = neighbors >= 0
    rows = np.nonzero(valid)
    assert (rl_docs[neighbors[rows]] != rl_docs[rows[0]]).all(), "same-document negative"


def test_ray_workers_give_the_same_bytes(new_run):
    local, ray_run = new_run("local"), new_run("ray")
    assert main(_datagen(local, "data.workers=0")) == 0
    assert main(_datagen(ray_run, "data.workers=2", "data.cpus_per_worker=0.5")) == 0
    assert _bytes(local) == _bytes(ray_run)


def test_killed_datagen_resumes(new_run):
    straight, killed = new_run("straight"), new_run("killed")
    # Same shard size on both sides: extraction batches within a shard, and fp32 sums over
    # different padding widths differ in the last bits, so the shard size is part of the recipe.
    # 600 documents in 120 shards: extraction lasts ≈ 1 s, long enough to kill it midway (60
    # documents took 0.1 s, and a run could finish between two polls).
    sharded = ("data.workers=0", "data.docs_per_shard=5", "data.num_docs=600")
    assert main(_datagen(straight, *sharded)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "launch.train", *_datagen(killed, *sharded)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = killed / "data" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("shard-*.parquet"))) < 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in shards.glob("shard-*.parquet"))
    assert 2 <= len(done_before) < 120, "kill the run mid-extraction"
    mtimes = {p: (shards / p).stat().st_mtime_ns for p in done_before}
    assert main(_datagen(killed, *sharded)) == 0
    assert all((shards / p).stat().st_mtime_ns == t for p, t in mtimes.items()), "finished shards redone"
    assert _bytes(killed) == _bytes(straight)


def test_short_documents_are_counted_not_fatal(new_run):
    run = new_run()
    assert main(_datagen(run, "data.workers=0", "data.min_pos=40", "data.max_tokens=96")) == 0
    stats = read_dataset_sidecar(run / "data" / "base.parquet").extras["stats"]
    assert stats["too_short"] > 0 and stats["rows"] > 0


def test_local_text_corpus_with_a_tiny_model(tmp_path):
    corpus = TINY.replace("tiny.yaml", "data/tiny_corpus.txt")
    run = tmp_path / "text"
    assert main([TINY, f"run.dir={run}", "run.stages=[prepare,datagen]", "model.base=tiny:qwen2",
                 f"data.corpus={corpus}", "data.teacher.kind=none", "data.workers=0"]) == 0
    base = read_dataset_sidecar(run / "data" / "base.parquet")
    assert base.corpus == corpus and base.extras["stats"]["documents"] == 64
    assert base.d_model == 64 and base.row_count == read_activations(run / "data/base.parquet").shape[0]


def test_the_ars_own_teacher_re_explains_only_the_ar_split(new_run, api, monkeypatch):
    """data.ar_teacher: datagen keeps each row's text prefix, the AR's teacher (its own model)
    re-explains the AR-SFT split (a refusal drops its row), every other split keeps the toy
    teacher's explanations, and the split's sidecar records the AR's teacher."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-ar-teacher")
    api.answer = lambda prefix: f"The text has {len(prefix)} characters.\n\nIt is a toy story."
    refusal = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": "I can't help with that."}}]}
    api.script = [(200, {}, refusal, 0.0)]
    run = new_run()
    assert main(_datagen(run, "data.workers=0", "toyworld.ar_p_include=null",
                         "data.ar_teacher.kind=openai", f"data.ar_teacher.base_url={api.url}/v1",
                         "data.ar_teacher.model=gpt-ar", "data.ar_teacher.max_concurrency=1")) == 0

    data = run / "data"
    ar = pq.read_table(data / "ar_sft.parquet")
    assert {r["body"]["model"] for r in api.requests} == {"gpt-ar"}
    assert ar.num_rows == len(set(api.prefixes)) - 1  # one prefix per row; the refused one left
    for prefix, explanation in zip(ar["text_prefix"].to_pylist(), ar["explanation"].to_pylist()):
        assert explanation == f"The text has {len(prefix)} characters.\n\nIt is a toy story."
    meta = read_dataset_sidecar(data / "ar_sft.parquet")
    assert meta.row_count == ar.num_rows
    assert (meta.api_summaries["model"], meta.api_summaries["role"]) == ("gpt-ar", "ar")
    for split in ("av_sft", "rl", "eval"):
        explanations = pq.read_table(data / f"{split}.parquet")["explanation"].to_pylist()
        assert explanations and not any(e.startswith("The text has") for e in explanations)
        assert read_dataset_sidecar(data / f"{split}.parquet").api_summaries.get("role") != "ar"
