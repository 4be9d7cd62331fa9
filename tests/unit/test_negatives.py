"""Hard-negative mining, storage and sampling (nla_rl.data.negatives)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nla_rl.data import negatives
from nla_rl.data.negatives import (blocks, check_negatives_match, mine_hard_negatives,
                                   negatives_params, read_negatives, read_negatives_params,
                                   sample_negatives, write_negatives)
from nla_rl.errors import NLAError


def _random(n=500, d=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, 60, n)


def _clustered(n=500, d=32, seed=1):
    """Documents of 8 consecutive rows sharing a centre: same-doc rows are the nearest ones."""
    rng = np.random.default_rng(seed)
    docs = np.arange(n) // 8
    x = rng.standard_normal((docs.max() + 1, d))[docs] + 0.3 * rng.standard_normal((n, d))
    return x.astype(np.float32), docs


def _brute(x, docs, k, exclude_same_doc):
    """Full float64 cosine matrix; each row's k best (ties by lower index), -1 / NaN padded."""
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    s = xn @ xn.T
    same = docs[:, None] == docs[None, :] if exclude_same_doc else np.eye(len(x), dtype=bool)
    s[same] = -np.inf
    nb, sc = np.full((len(x), k), -1), np.full((len(x), k), np.nan)
    for i, row in enumerate(s):
        best = np.lexsort((np.arange(len(row)), -row))[:k]
        best = best[np.isfinite(row[best])]
        nb[i, : len(best)], sc[i, : len(best)] = best, row[best]
    return nb, sc


@pytest.mark.parametrize("data", [_random, _clustered])
@pytest.mark.parametrize("exclude", [True, False])
def test_exact_equals_brute_force(data, exclude):
    x, docs = data()
    nb, sc = mine_hard_negatives(x, docs, top_k=20, exclude_same_doc=exclude)
    bnb, bsc = _brute(x, docs, 20, exclude)
    assert nb.dtype == np.int32 and sc.dtype == np.float32 and nb.shape == sc.shape == (500, 20)
    assert np.array_equal(nb, bnb)  # float64 order, as the brute force
    np.testing.assert_allclose(sc, bsc, rtol=0, atol=1e-7)  # float64 cosines rounded to float32
    rows = np.arange(500)[:, None]
    assert not (nb == rows).any()  # never self
    if exclude:
        assert not (docs[nb] == docs[:, None]).any()
    else:  # the clustered data's nearest neighbours are in the same document
        assert data is _random or (docs[nb[:, 0]] == docs).mean() > 0.9


def test_chunk_size_does_not_change_the_result():
    x, docs = _clustered()
    ref = mine_hard_negatives(x, docs, top_k=20, chunk_rows=1000)
    # 1- and 2-row products take other BLAS kernels (other float32 rounding): still identical
    for kwargs in ({"chunk_rows": 7}, {"chunk_rows": 499}, {"chunk_rows": 1}, {"chunk_rows": 2},
                   {"budget_bytes": 6 * 500 * 9}):
        nb, sc = mine_hard_negatives(x, docs, top_k=20, **kwargs)
        assert np.array_equal(nb, ref[0]) and np.array_equal(sc, ref[1]), kwargs


def test_blocks_cover_all_rows_within_the_budget():
    assert blocks(10, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert blocks(500, None, budget_bytes=6 * 500 * 100)[0] == (0, 100)
    assert blocks(500, None, budget_bytes=1) == [(i, i + 1) for i in range(500)]
    for n, rows in ((1, None), (2, 1), (97, 7), (5000, None)):
        b = blocks(n, rows)
        assert b[0][0] == 0 and b[-1][1] == n and all(p[1] == q[0] for p, q in zip(b, b[1:]))


def test_order_is_best_first():
    x, docs = _random(seed=3)
    _, sc = mine_hard_negatives(x, docs, top_k=20)
    assert (np.diff(sc, axis=1) <= 0).all()


def test_ties_are_broken_by_lower_row_index_also_across_the_top_k_boundary():
    # 30 one-hot rows e_{i % 3}: nine exact cos=1 ties per row, the rest exactly 0
    x = np.eye(3, dtype=np.float32)[np.arange(30) % 3]
    docs = np.arange(30)
    for rows in (2, 7, 30):
        nb, sc = mine_hard_negatives(x, docs, top_k=12, chunk_rows=rows)
        assert nb[0].tolist() == [3, 6, 9, 12, 15, 18, 21, 24, 27, 1, 2, 4]
        assert nb[1].tolist() == [4, 7, 10, 13, 16, 19, 22, 25, 28, 0, 2, 3]
        assert sc[0].tolist() == [1.0] * 9 + [0.0] * 3
        nb5, _ = mine_hard_negatives(x, docs, top_k=5, chunk_rows=rows)
        assert nb5[2].tolist() == [5, 8, 11, 14, 17] and np.array_equal(nb5, nb[:, :5])


def test_many_exact_duplicates_stay_cheap_and_pick_the_lowest_rows():
    """E.g. the BOS activation of every document: thousands of cos = 1 ties per row."""
    x, _ = _random(n=3000, d=16, seed=8)
    x[::2] = x[0]  # 1500 identical rows, each in its own document
    nb, sc = mine_hard_negatives(x, np.arange(3000), top_k=20, chunk_rows=500)
    assert nb[0].tolist() == list(range(2, 42, 2)) and nb[2].tolist()[:3] == [0, 4, 6]
    assert (sc[::2] == 1).all()


def test_tiny_inputs_are_padded_and_counted():
    x, _ = _random(n=4, seed=5)
    nb, sc = mine_hard_negatives(x, np.array([0, 0, 1, 1]), top_k=5)
    assert nb.shape == (4, 5)
    assert nb[0, :2].tolist() == sorted([2, 3], key=lambda j: -sc[0, nb[0].tolist().index(j)])
    assert (nb[:, 2:] == -1).all() and np.isnan(sc[:, 2:]).all() and np.isfinite(sc[:, :2]).all()
    p = negatives_params(nb, top_k=5, exclude_same_doc=True, method="exact", split_name="rl",
                         split_row_count=4)
    assert p["n_short_rows"] == 4 and p["min_valid"] == 2
    one_nb, one_sc = mine_hard_negatives(x[:1], np.array([7]), top_k=3)
    assert (one_nb == -1).all() and np.isnan(one_sc).all()


def test_big_document_uses_the_dense_mask_and_pads_its_rows():
    x, _ = _random(n=300, seed=6)
    docs = np.concatenate([np.zeros(250, np.int64), np.arange(1, 51)])  # one 250-row document
    for rows in (5, 300):
        nb, sc = mine_hard_negatives(x, docs, top_k=60, chunk_rows=rows)
        bnb, bsc = _brute(x, docs, 60, True)
        np.testing.assert_allclose(sc, bsc, rtol=0, atol=1e-7)
        assert np.array_equal(nb, bnb)
        assert ((nb[:250] >= 0).sum(1) == 50).all() and ((nb[250:] >= 0).sum(1) == 60).all()


def test_write_read_round_trip(tmp_path):
    x, docs = _clustered(n=64)
    nb, sc = mine_hard_negatives(x, docs, top_k=60)  # 60 > 56 candidates: every row padded
    params = negatives_params(nb, top_k=60, exclude_same_doc=True, method="exact",
                              split_name="data/rl.parquet", split_row_count=64)
    path = write_negatives(tmp_path / "data" / "rl.negatives.parquet", nb, sc, params)
    rnb, rsc = read_negatives(path)
    assert rnb.dtype == np.int32 and rsc.dtype == np.float32
    assert np.array_equal(rnb, nb) and np.array_equal(rsc, sc, equal_nan=True)
    schema = pq.read_schema(path)
    assert schema.field("neighbors").type == pa.list_(pa.int32())
    assert schema.field("scores").type == pa.list_(pa.float32())
    stored = pq.read_table(path).column("neighbors").to_pylist()
    assert all(len(r) == 56 and -1 not in r for r in stored)  # padding is not stored
    assert read_negatives_params(path) == params and params["source_split"] == "rl.parquet"
    write_negatives(path, nb[:, :3], sc[:, :3], {**params, "top_k": 3})  # atomic overwrite
    assert read_negatives(path)[0].shape == (64, 3)
    assert [p.name for p in path.parent.iterdir()] == ["rl.negatives.parquet"]  # no temp left


def test_write_rejects_malformed_arrays(tmp_path):
    nb = np.array([[1, -1, 2], [0, 2, -1], [0, 1, -1]], np.int32)
    sc = np.where(nb >= 0, 0.5, np.nan).astype(np.float32)
    with pytest.raises(NLAError, match="padding"):
        write_negatives(tmp_path / "n.parquet", nb, sc, {})
    with pytest.raises(NLAError, match="shapes"):
        write_negatives(tmp_path / "n.parquet", nb, sc[:2], {})
    with pytest.raises(NLAError, match="n_rows"):
        write_negatives(tmp_path / "n.parquet", np.sort(nb)[:, ::-1], sc, {"n_rows": 5})
    assert not list(tmp_path.iterdir())


def test_check_negatives_match():
    nb = np.zeros((10, 3), np.int32)
    p = negatives_params(nb, top_k=3, exclude_same_doc=True, method="exact",
                         split_name="/run/data/rl.parquet", split_row_count=10)
    assert p["metric"] == "cosine" and p["n_rows"] == 10 and p["source_row_count"] == 10
    check_negatives_match(p, 10, "rl.parquet")
    check_negatives_match(p, 10, "rl")
    with pytest.raises(NLAError, match="row_count.*expected 11, found 10"):
        check_negatives_match(p, 11, "rl.parquet")
    with pytest.raises(NLAError, match="source split.*'eval'.*'rl'"):
        check_negatives_match(p, 10, "eval.parquet")
    with pytest.raises(NLAError, match="missing"):
        check_negatives_match({"top_k": 3}, 10, "rl")
    with pytest.raises(NLAError, match="rows"):
        negatives_params(nb, top_k=3, exclude_same_doc=True, method="exact", split_name="rl",
                         split_row_count=11)


def test_sampler_draws_distinct_valid_neighbours_of_the_row_deterministically():
    x, docs = _random(n=200, seed=7)
    nb, _ = mine_hard_negatives(x, docs, top_k=20)
    nb[5, 2:] = -1  # a row with only 2 valid neighbours
    rows = np.arange(200).repeat(3)
    draws = sample_negatives(nb, rows, 3, np.random.default_rng(0))
    assert draws.shape == (600, 3)
    for r, d in zip(rows, draws):
        if r == 5:
            assert sorted(d[:2]) == sorted(nb[5, :2]) and d[2] == -1
            continue
        assert len(set(d)) == 3 and set(d) <= set(nb[r]) and -1 not in d
    again = sample_negatives(nb, rows, 3, np.random.default_rng(0))
    assert np.array_equal(draws, again)
    assert not np.array_equal(draws, sample_negatives(nb, rows, 3, np.random.default_rng(1)))
    assert np.array_equal(sample_negatives(nb, [4], 3, 9), sample_negatives(nb, [4], 3, 9))
    many = sample_negatives(nb, np.zeros(4000, np.int64), 3, np.random.default_rng(2))
    freq = np.array([(many == j).sum() for j in nb[0]]) / 4000
    assert np.allclose(freq, 3 / 20, atol=0.03)  # uniform over the row's top-k


def test_sampler_rejects_bad_arguments():
    nb = np.zeros((4, 5), np.int32)
    with pytest.raises(NLAError, match="per_sample"):
        sample_negatives(nb, [0], 6, np.random.default_rng(0))
    with pytest.raises(NLAError, match="rows"):
        sample_negatives(nb, [4], 2, np.random.default_rng(0))


@pytest.mark.parametrize("edit, match", [
    (lambda x, d: (x.at_nan(), d), "non-finite"),
    (lambda x, d: (x.at_inf(), d), "non-finite"),
    (lambda x, d: (x.at_zero(), d), "zero"),
    (lambda x, d: (x.a[0], d), "vectors"),
    (lambda x, d: (x.a.astype(np.int64), d), "vectors"),
    (lambda x, d: (x.a, d[:-1]), "doc_ids"),
    (lambda x, d: (x.a, d.astype(np.float32)), "doc_ids"),
])
def test_bad_inputs_raise_clear_errors(edit, match):
    class X:
        a = _random(n=20)[0]

        def at_nan(self):
            b = self.a.copy(); b[3, 1] = np.nan; return b  # noqa: E702

        def at_inf(self):
            b = self.a.copy(); b[3, 1] = np.inf; return b  # noqa: E702

        def at_zero(self):
            b = self.a.copy(); b[3] = 0; return b  # noqa: E702

    vectors, docs = edit(X(), np.arange(20))
    with pytest.raises(NLAError, match=match):
        mine_hard_negatives(vectors, docs)


@pytest.mark.parametrize("kwargs, match", [
    ({"top_k": 0}, "top_k"), ({"method": "annoy"}, "method"), ({"chunk_rows": 0}, "chunk_rows")])
def test_bad_options_raise_clear_errors(kwargs, match):
    x, docs = _random(n=20)
    with pytest.raises(NLAError, match=match):
        mine_hard_negatives(x, docs, **kwargs)


def test_faiss_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    x, docs = _random(n=20)
    with pytest.raises(NLAError, match="pip install faiss-cpu"):
        mine_hard_negatives(x, docs, method="faiss")


def test_faiss_path_matches_exact_with_a_stand_in_index(monkeypatch):
    """A brute-force stand-in for faiss.IndexFlatIP: same output contract, widening searches."""
    searches = []

    class IndexFlatIP:
        def __init__(self, d):
            self.x = np.zeros((0, d), np.float32)

        def add(self, x):
            self.x = np.concatenate([self.x, x])

        def search(self, q, k):
            searches.append(k)
            s = q @ self.x.T
            idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(s, idx, 1), idx

    class IndexIVFFlat(IndexFlatIP):
        def __init__(self, quantizer, d, nlist, metric):
            super().__init__(d)
            self.nlist, self.nprobe, self.trained = nlist, 1, False

        def train(self, x):
            self.trained = True

        def search(self, q, k):
            assert self.trained and self.nprobe == 16
            return super().search(q, k)

    fake = types.SimpleNamespace(IndexFlatIP=IndexFlatIP, IndexIVFFlat=IndexIVFFlat,
                                 METRIC_INNER_PRODUCT=0)
    monkeypatch.setitem(sys.modules, "faiss", fake)
    x, docs = _clustered(n=200)
    docs = docs.copy()
    docs[:40] = 0  # a 40-row document: its rows need a wider search than 2k + 1
    for exclude, nlist in ((True, None), (False, None), (True, 8)):
        nb, sc = mine_hard_negatives(x, docs, top_k=10, exclude_same_doc=exclude, method="faiss",
                                     faiss_nlist=nlist)
        enb, esc = mine_hard_negatives(x, docs, top_k=10, exclude_same_doc=exclude)
        assert np.array_equal(nb, enb) and np.array_equal(sc, esc)
    assert max(searches) > 21
    nb, _ = mine_hard_negatives(x[:5], docs[:5], top_k=10, method="faiss")  # all one doc
    assert (nb == -1).all()


@pytest.mark.parametrize("group", [3, 4])
def test_group_maxima_preselection_equals_plain_topk(monkeypatch, group):
    """Long rows pre-select candidates by group maxima (64 columns a group by default, rows of at
    least 6400 columns); small groups here put 500-row tests on that path, short last group too."""
    monkeypatch.setattr(negatives, "_GROUP", group)
    for data in (_random, _clustered):
        x, docs = data()
        nb, sc = mine_hard_negatives(x, docs, top_k=20, chunk_rows=64)
        bnb, bsc = _brute(x, docs, 20, True)
        assert np.array_equal(nb, bnb) and np.allclose(sc, bsc, rtol=0, atol=1e-7)
    x = np.eye(3, dtype=np.float32)[np.arange(600) % 3]  # ties everywhere
    nb, _ = mine_hard_negatives(x, np.arange(600), top_k=5)
    assert nb[0].tolist() == [3, 6, 9, 12, 15] and nb[599].tolist() == [2, 5, 8, 11, 14]
    s = torch.from_numpy(np.random.default_rng(0).standard_normal((50, 500)).astype(np.float32))
    s[:, 100:] = -torch.inf  # fewer finite values than asked
    for m in (5, 21, 120):
        top, idx = negatives._top(s, m)
        ref = torch.topk(s, m, dim=1)
        assert torch.equal(top, ref.values) and (idx < 500).all()
        assert torch.equal(torch.gather(s, 1, idx), top)


def test_torch_matmul_backend_gives_the_same_result():
    """With torch threads > 1 the products go through torch.mm (MKL: at d=256 most float32
    products differ from OpenBLAS's in the last bit); the float64 re-scoring hides that."""
    x, docs = _clustered(d=256)
    ref = mine_hard_negatives(x, docs, top_k=20)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        nb, sc = mine_hard_negatives(x, docs, top_k=20)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(nb, ref[0]) and np.array_equal(sc, ref[1])
