"""RL batches: a resumable order, hard negatives drawn from the mined lists, clear errors."""

import numpy as np
import pytest

from nla_rl.checkpoint import DataCursor
from nla_rl.data.build import mine_rl_negatives
from nla_rl.data.negatives import read_negatives, read_negatives_params, write_negatives
from nla_rl.data.store import activations_table, write_table_atomic
from nla_rl.errors import ConfigError, NLAError
from nla_rl.rl_data import RLData


@pytest.fixture
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(12, 8)).astype(np.float32)
    table = activations_table(np.arange(12) // 2, np.full(12, 5), 2, vectors,
                              attributes=[[f"subject=s{i}"] for i in range(12)])
    write_table_atomic(table, tmp_path / "rl.parquet")
    mine_rl_negatives(tmp_path, top_k=4, exclude_same_doc=True, method="exact")
    return tmp_path


def test_batches_follow_a_resumable_order(data_dir):
    data = RLData(data_dir, seed=3)
    first = [data.next_batch(5, step) for step in range(2)]
    saved = DataCursor(**data.cursor.state_dict())
    later = data.next_batch(5, 2)
    resumed = RLData(data_dir, seed=3, cursor=saved).next_batch(5, 2)
    assert np.array_equal(later.rows, resumed.rows)
    seen = np.concatenate([b.rows for b in first] + [later.rows])
    assert sorted(seen[:12].tolist()) == list(range(12))  # an epoch visits every row once
    assert np.array_equal(later.vectors, data.vectors[later.rows])
    assert later.attributes == [[f"subject=s{r}"] for r in later.rows]


def test_negatives_come_from_the_mined_lists_of_other_documents(data_dir):
    data = RLData(data_dir, seed=0, per_sample=3)
    batch = data.next_batch(6, step=7)
    assert batch.negatives.shape == (6, 3, 8)
    for row, negs in zip(batch.rows, batch.negatives):
        idx = [int(np.flatnonzero((data.vectors == n).all(1))[0]) for n in negs]
        assert set(idx) <= set(data.neighbors[row].tolist())
        assert all(data.doc_ids[i] != data.doc_ids[row] for i in idx) and len(set(idx)) == 3
    again = RLData(data_dir, seed=0, per_sample=3)
    assert np.array_equal(again.next_batch(6, step=7).negatives, batch.negatives)


def test_errors(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="per_sample=5 exceeds the mined top_k 4"):
        RLData(data_dir, seed=0, per_sample=5)
    with pytest.raises(ConfigError, match="datagen"):
        RLData(tmp_path / "nowhere", seed=0)
    with pytest.raises(ConfigError, match="saved for 99 rl rows"):
        RLData(data_dir, seed=0, cursor=DataCursor(99, 0))
    (data_dir / "rl.negatives.parquet").unlink()
    with pytest.raises(ConfigError, match="negatives.enabled"):
        RLData(data_dir, seed=0, per_sample=2)


def test_negatives_mined_for_another_split_are_refused(data_dir):
    """A negatives file whose row indices point into the eval split must not be read as rl rows."""
    path = data_dir / "rl.negatives.parquet"
    neighbors, scores = read_negatives(path)
    params = {**read_negatives_params(path), "source_split": "eval.parquet"}
    write_negatives(path, neighbors, scores, params)
    with pytest.raises(NLAError, match="eval") as info:
        RLData(data_dir, seed=0, per_sample=2)
    assert "rl" in str(info.value)
