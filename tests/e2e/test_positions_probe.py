"""The tiny recipe's data must carry what the toy world's scorer measures: the activations at
the sampled positions encode several latent attributes, not just the subject."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from launch.train import run
from nla_rl.data.store import read_activations
from nla_rl.data.toy_lm import slot_probe_accuracies
from nla_rl.data.toyworld import SLOTS

from .conftest import LM_STEPS, TINY

pytestmark = pytest.mark.slow

DATA = [f"toyworld.lm_steps={LM_STEPS}", "data.num_docs=400", "data.docs_per_shard=200", "data.workers=0",
        "run.stages=[prepare,datagen]"]


def _probe(run_dir, shuffle_labels=False):
    data = run_dir / "data"
    def load(names):
        x = np.concatenate([read_activations(data / f"{n}.parquet") for n in names])
        attrs = sum((pq.read_table(data / f"{n}.parquet").column("attributes").to_pylist()
                     for n in names), [])
        return x, attrs
    x_train, a_train = load(["av_sft", "ar_sft", "rl"])
    x_test, a_test = load(["eval"])
    if shuffle_labels:
        a_train = a_train[::-1]
    return slot_probe_accuracies(x_train, a_train, x_test, a_test, SLOTS)


def test_last_positions_encode_several_slots(new_run):
    run_dir = new_run("last")
    run(TINY, [f"run.dir={run_dir}", *DATA])
    rows = pq.read_table(run_dir / "data" / "base.parquet", columns=["doc_id", "position"])
    assert rows.num_rows == 400  # positions_per_doc=1 in last mode: one row per document
    assert len(set(rows.column("doc_id").to_pylist())) == 400
    scores = _probe(run_dir)
    encoded = [s for s, (acc, majority) in scores.items() if acc >= majority + 0.15]
    assert len(encoded) >= 4, scores
    control = _probe(run_dir, shuffle_labels=True)  # label-shuffled probe: no better than chance
    assert sum(acc >= majority + 0.15 for acc, majority in control.values()) <= 1, control
