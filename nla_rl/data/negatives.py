"""Hard negatives: for each activation, its nearest *other* activations by cosine.

``mine_hard_negatives`` returns ``neighbors`` int32 [n, top_k] (row indices, best first) and
``scores`` float32 [n, top_k] (cosines). Self is always excluded; same-document rows too by
default (they are near-duplicates, reference §7). A row with fewer than ``top_k`` candidates (a
tiny split, a document holding most rows) is **padded at the end with -1 / NaN** rather than
failing; ``negatives_params`` counts such rows and ``sample_negatives`` skips the padding. Equal
scores are ordered by lower row index, also across the top-k boundary.

Exact mining multiplies one block of normalised query rows by all rows at a time (``_mm``) and
selects with ``torch.topk`` on group maxima, so the extra memory is one block (``budget_bytes``)
plus the normalised float32 copy of the input and the output. Threads: torch's setting.
``rl.negatives.parquet`` stores ``neighbors`` list<int32> / ``scores`` list<float32> without the
padding; ``read_negatives`` restores it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nla_rl.atomic import atomic_path
from nla_rl.errors import NLAError, mismatch

METHODS = ("exact", "faiss")
PARAMS_KEY = b"nla_rl.negatives"  # parquet schema metadata: the params as JSON
_GROUP = 64  # columns per group in _top
_MATCH_KEYS = ("metric", "top_k", "n_rows", "source_split", "source_row_count")


def _prepare(vectors, doc_ids, top_k: int, method: str):
    """Validate; return (row-normalised float32 copy, int64 doc ids, input, float64 norms)."""
    v = np.asarray(vectors)
    if v.ndim != 2 or 0 in v.shape or not np.issubdtype(v.dtype, np.floating):
        raise NLAError(mismatch("vectors", "a non-empty float array [n, d]",
                                f"{v.dtype} {v.shape}"))
    docs = np.asarray(doc_ids)
    if docs.shape != (v.shape[0],) or not np.issubdtype(docs.dtype, np.integer):
        raise NLAError(mismatch("doc_ids", f"an integer array of shape ({v.shape[0]},)",
                                f"{docs.dtype} {docs.shape}"))
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise NLAError(mismatch("top_k", "an int >= 1", top_k))
    if method not in METHODS:
        raise NLAError(mismatch("method", f"one of {METHODS}", method))
    x = np.array(v, dtype=np.float32, order="C")  # the one copy; normalised in place below
    sq = np.einsum("ij,ij->i", x, x)
    bad = np.flatnonzero(~np.isfinite(sq) | (sq <= 0))
    if bad.size:
        r = int(bad[0])
        what = "non-finite" if not np.isfinite(x[r]).all() else ("zero" if sq[r] == 0 else "huge")
        raise NLAError(f"vectors: {bad.size} row(s) zero, non-finite or overflowing float32 "
                       f"(first: row {r}, {what}); cosine needs finite non-zero vectors: drop or "
                       "re-extract those rows")
    x /= np.sqrt(sq)[:, None]
    norms = np.concatenate([np.linalg.norm(v[a:a + 1024].astype(np.float64), axis=1)
                            for a in range(0, len(v), 1024)])  # exact, for the re-scoring
    return x, docs.astype(np.int64, copy=False), v, norms


def _same_doc_pairs(docs: np.ndarray):
    """A function rows -> (local row, column) pairs of every same-document entry (self included)."""
    _, inv, counts = np.unique(docs, return_inverse=True, return_counts=True)
    order = np.argsort(inv, kind="stable")
    starts = np.cumsum(counts) - counts

    def pairs(lo: int, hi: int):
        cnt = counts[inv[lo:hi]]
        local = np.repeat(np.arange(hi - lo), cnt)
        offs = np.arange(local.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        return local, order[offs + np.repeat(starts[inv[lo:hi]], cnt)]

    return pairs, counts[inv]


def _mm(q: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """``out = q @ x.T``: NumPy's BLAS when torch runs one thread (15-20% faster than torch.mm
    here), else torch.mm: one thread pool, as OpenBLAS workers spinning beside torch's slow both."""
    if torch.get_num_threads() == 1:
        np.matmul(q, x.T, out=out)
    else:
        torch.mm(torch.from_numpy(q), torch.from_numpy(x).T, out=torch.from_numpy(out))


def _rescore(rows: np.ndarray, idx: np.ndarray, v: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """float64 cosines of input rows ``rows`` [c] with rows ``idx`` [c, w], from the raw input."""
    out = np.empty(idx.shape)
    for a in range(0, len(rows), 64):  # 64 query rows at a time: a few MB
        r, j = rows[a:a + 64], idx[a:a + 64]
        dots = np.einsum("cd,cwd->cw", v[r].astype(np.float64), v[j].astype(np.float64))
        out[a:a + 64] = dots / norms[r][:, None] / norms[j]
    return out


def _top(s: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(s, m)`` (values sorted), faster on long rows: the m largest values of a row
    lie in its m groups of ``_GROUP`` columns with the largest maxima, and are >= the m-th of
    those maxima (ties included), so only those few go through topk."""
    c, n = s.shape
    if n < 4 * m * _GROUP:
        return torch.topk(s, m, dim=1)
    full = n - n % _GROUP
    gmax = torch.as_strided(s, (c, full // _GROUP, _GROUP), (n, _GROUP, 1)).amax(dim=2)
    if full < n:  # a short last group
        gmax = torch.cat([gmax, s[:, full:].amax(dim=1, keepdim=True)], dim=1)
    gtop, groups = torch.topk(gmax, m, dim=1, sorted=False)
    cols = (groups[:, :, None] * _GROUP + torch.arange(_GROUP)).reshape(c, -1)
    pad = cols >= n
    vals = torch.gather(s, 1, cols.clamp_(max=n - 1)).masked_fill_(pad, -torch.inf)
    r, p = torch.nonzero(vals >= gtop.amin(1, keepdim=True), as_tuple=True)  # >= m a row, ~m
    cnt = torch.bincount(r, minlength=c)
    at = (r, torch.arange(len(r)) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt))
    kept = torch.full((c, int(cnt.max())), -torch.inf).index_put_(at, vals[r, p])
    top, pos = torch.topk(kept, m, dim=1)
    where = torch.zeros(kept.shape, dtype=torch.long).index_put_(at, cols[r, p])
    return top, torch.gather(where, 1, pos)


def _select(s: np.ndarray, rows: np.ndarray, v, norms, k: int, margin: int = 4):
    """Top-k columns of each row of ``s`` (masked = -inf), best first, ties by lower column.

    ``k + margin`` candidates are picked by the float32 scores, lower columns first among equal
    ones (a tie straddling the boundary sends the row to a full scan: topk's own pick never
    decides); their float64 cosines from the raw input order them, so BLAS rounding does not.
    """
    n = s.shape[1]
    w = min(k + margin, n)
    parts = [_top(torch.from_numpy(s[a:a + 256]), min(w + 1, n)) for a in range(0, len(s), 256)]
    vals, idx = (torch.cat(t).numpy() for t in zip(*parts))  # 256 rows at a time: small temps
    ties = np.flatnonzero((vals[:, w] == vals[:, w - 1]) & np.isfinite(vals[:, w])) if w < n else []
    vals, idx = vals[:, :w], idx[:, :w]
    score = np.where(np.isfinite(vals), _rescore(rows, idx, v, norms), -np.inf)
    o = np.lexsort((idx, -score), axis=1)[:, :k]
    score, idx = np.take_along_axis(score, o, 1), np.take_along_axis(idx, o, 1)
    for r in ties:  # of the values equal to the w-th, the lowest columns fill the w candidates
        gt, eq = np.flatnonzero(s[r] > vals[r, w - 1]), np.flatnonzero(s[r] == vals[r, w - 1])
        cand = np.concatenate([gt, eq[: w - len(gt)]])
        sc = _rescore(rows[r:r + 1], cand[None], v, norms)[0]
        o = np.lexsort((cand, -sc))[:k]
        score[r], idx[r] = sc[o], cand[o]
    return score, idx


def blocks(n: int, chunk_rows: int | None = None, budget_bytes: int = 256 << 20) -> list:
    """The (lo, hi) query-row blocks mining uses: ``chunk_rows`` rows, or as many as fit
    ``budget_bytes`` at 6 bytes per score (4 for the score, up to 2 for the same-doc mask)."""
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or int(chunk_rows) < 1):
        raise NLAError(mismatch("chunk_rows", "an int >= 1", chunk_rows))
    rows = min(max(int(chunk_rows or budget_bytes // (6 * n)), 1), n)
    return [(lo, min(lo + rows, n)) for lo in range(0, n, rows)]


def mine_hard_negatives(vectors: np.ndarray, doc_ids: np.ndarray, *, top_k: int = 20,
                        exclude_same_doc: bool = True, chunk_rows: int | None = None,
                        budget_bytes: int = 256 << 20, method: str = "exact",
                        faiss_nlist: int | None = None, faiss_nprobe: int = 16
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``top_k`` nearest other rows by cosine: (neighbors int32, scores float32).

    ``chunk_rows`` (default: ``budget_bytes // (6 n)``) query rows are scored per block. The
    result does not depend on it: candidates are re-scored in float64 from the raw input, so the
    order is exact and the scores are exact cosines rounded to float32. Rows short of candidates
    are padded with -1 / NaN. ``method="faiss"`` uses faiss ``IndexFlatIP`` or, with
    ``faiss_nlist``, an (approximate) IVF index; same output contract. Bad input: ``NLAError``.
    """
    x, docs, v, norms = _prepare(vectors, doc_ids, top_k, method)
    n = x.shape[0]
    bounds = blocks(n, chunk_rows, budget_bytes)
    pairs, doc_count = _same_doc_pairs(docs)
    neighbors, scores = np.full((n, top_k), -1, np.int32), np.full((n, top_k), np.nan, np.float32)
    if method == "faiss":
        _mine_faiss(x, v, norms, docs, bounds, neighbors, scores, exclude_same_doc, doc_count,
                    faiss_nlist, faiss_nprobe)
        return neighbors, scores
    buf = np.empty((max(hi - lo for lo, hi in bounds), n), dtype=np.float32)
    for lo, hi in bounds:
        s = buf[: hi - lo]
        _mm(x[lo:hi], x, s)
        if exclude_same_doc and doc_count[lo:hi].sum() > s.size // 32:  # big documents:
            step = max(1, (hi - lo) // 4)  # a dense mask, a quarter block at a time
            for a in range(lo, hi, step):
                b = min(a + step, hi)
                np.putmask(s[a - lo:b - lo], docs[a:b, None] == docs[None, :], -np.inf)
        elif exclude_same_doc:
            s[pairs(lo, hi)] = -np.inf
        else:
            s[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf
        vals, idx = _select(s, np.arange(lo, hi), v, norms, top_k)
        ok = np.isfinite(vals)
        neighbors[lo:hi, : idx.shape[1]] = np.where(ok, idx, -1)
        scores[lo:hi, : vals.shape[1]] = np.where(ok, vals, np.nan)
    return neighbors, scores


def _mine_faiss(x, v, norms, docs, bounds, neighbors, scores, exclude_same_doc, doc_count,
                nlist, nprobe):
    """Fill neighbors/scores with faiss: search wider, drop self/same-doc, widen while short.
    Float64 re-scoring orders what faiss returns; ties at the boundary are faiss's pick."""
    try:
        import faiss
    except ImportError as e:
        raise NLAError("method='faiss' needs the faiss package: pip install faiss-cpu "
                       "(or use method='exact')") from e
    (n, d), k = x.shape, neighbors.shape[1]
    index = quantizer = faiss.IndexFlatIP(d)  # the IVF index needs its quantizer kept alive
    if nlist:
        index = faiss.IndexIVFFlat(quantizer, d, int(nlist), faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = int(nprobe)
    index.add(x)
    drop = doc_count if exclude_same_doc else np.ones(n, dtype=np.int64)  # excluded rows per row
    for lo, hi in bounds:
        todo, want = np.arange(lo, hi), min(n, 2 * k + 1)
        while todo.size:
            _, idx = index.search(x[todo], want)  # faiss picks, float64 re-scoring orders
            ok = (idx >= 0) & (idx != todo[:, None])
            if exclude_same_doc:
                ok &= docs[np.maximum(idx, 0)] != docs[todo][:, None]
            vals = np.where(ok, _rescore(todo, np.maximum(idx, 0), v, norms), -np.inf)
            o = np.lexsort((idx, -vals), axis=1)[:, :k]
            vals, idx = np.take_along_axis(vals, o, 1), np.take_along_axis(idx, o, 1)
            good = np.isfinite(vals)
            neighbors[todo, : idx.shape[1]] = np.where(good, idx, -1)
            scores[todo, : vals.shape[1]] = np.where(good, vals, np.nan)
            short = (good.sum(1) < k) & (want < np.minimum(n, k + drop[todo]))
            todo, want = todo[short], min(n, 2 * want)


def negatives_params(neighbors: np.ndarray, *, top_k: int, exclude_same_doc: bool, method: str,
                     split_name: str, split_row_count: int) -> dict:
    """The record for the dataset sidecar's extras (and the parquet metadata) of one mining run."""
    nb = np.asarray(neighbors)
    if nb.shape[0] != split_row_count:
        raise NLAError(mismatch("negatives rows", split_row_count, nb.shape[0],
                                f"mine the negatives of {split_name} itself"))
    valid = (nb >= 0).sum(1)
    return {"metric": "cosine", "top_k": int(top_k), "exclude_same_doc": bool(exclude_same_doc),
            "method": method, "n_rows": int(nb.shape[0]), "source_split": Path(split_name).name,
            "source_row_count": int(split_row_count), "n_short_rows": int((valid < top_k).sum()),
            "min_valid": int(valid.min()) if valid.size else 0}


def check_negatives_match(params: dict, split_row_count: int, split_name: str) -> None:
    """Raise ``NLAError`` if ``params`` were not mined from this split (name or row count)."""
    missing = [key for key in _MATCH_KEYS if key not in (params or {})]
    if missing:
        raise NLAError(f"negatives params: missing {missing}; re-mine the hard negatives")
    stem = lambda s: Path(str(s)).name.removesuffix(".parquet")  # noqa: E731
    fix = f"re-mine the hard negatives of {split_name}"
    if stem(params["source_split"]) != stem(split_name):
        raise NLAError(mismatch("negatives source split", stem(split_name),
                                stem(params["source_split"]), fix))
    for key in ("source_row_count", "n_rows"):
        if int(params[key]) != int(split_row_count):
            raise NLAError(mismatch(f"negatives {key}", int(split_row_count), params[key], fix))
    if params["metric"] != "cosine":
        raise NLAError(mismatch("negatives metric", "cosine", params["metric"], fix))


def write_negatives(path, neighbors: np.ndarray, scores: np.ndarray, params: dict) -> Path:
    """Write ``rl.negatives.parquet`` atomically; the -1 / NaN padding is not stored."""
    nb, sc = np.asarray(neighbors), np.asarray(scores)
    if nb.ndim != 2 or sc.shape != nb.shape:
        raise NLAError(mismatch("neighbors/scores shapes", "equal [n, k]", (nb.shape, sc.shape)))
    valid, n = nb >= 0, nb.shape[0]
    if nb.max(initial=-1) >= n or params.get("n_rows", n) != n:
        raise NLAError(mismatch("neighbors", f"indices < {n} (its row count) and params n_rows {n}",
                                f"max {nb.max(initial=-1)}, n_rows {params.get('n_rows')}"))
    if (valid[:, 1:] & ~valid[:, :-1]).any() or np.isnan(sc[valid]).any():
        raise NLAError("neighbors: padding (-1) must come after every valid neighbour of a row, "
                       "and valid neighbours need finite scores; pass mine_hard_negatives' output")
    offsets = np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32)
    table = pa.table({
        "neighbors": pa.ListArray.from_arrays(offsets, nb[valid].astype(np.int32)),
        "scores": pa.ListArray.from_arrays(offsets, sc[valid].astype(np.float32)),
    }).replace_schema_metadata({PARAMS_KEY: json.dumps(params).encode()})
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_negatives_params(path) -> dict:
    """The params stored with a negatives file ({} if it has none)."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[PARAMS_KEY]) if PARAMS_KEY in meta else {}


def read_negatives(path) -> tuple[np.ndarray, np.ndarray]:
    """(neighbors int32 [n, k], scores float32 [n, k]), padded with -1 / NaN to the stored top_k."""
    table = pq.read_table(path)
    if not {"neighbors", "scores"} <= set(table.column_names):
        raise NLAError(mismatch(f"{path} columns", ["neighbors", "scores"], table.column_names))
    nb_col, sc_col = (table.column(c).combine_chunks() for c in ("neighbors", "scores"))
    lens = np.asarray(nb_col.value_lengths().fill_null(0), dtype=np.int64)
    if not np.array_equal(lens, np.asarray(sc_col.value_lengths().fill_null(0))):
        raise NLAError(f"{path}: neighbors and scores lists differ in length; re-mine the file")
    k = max(int(read_negatives_params(path).get("top_k", 0)), int(lens.max(initial=0)))
    n = len(lens)
    neighbors, scores = np.full((n, k), -1, np.int32), np.full((n, k), np.nan, np.float32)
    r = np.repeat(np.arange(n), lens)
    c = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    neighbors[r, c] = nb_col.flatten().to_numpy(zero_copy_only=False)
    scores[r, c] = sc_col.flatten().to_numpy(zero_copy_only=False)
    return neighbors, scores


def sample_negatives(neighbors: np.ndarray, rows, per_sample: int,
                     rng: np.random.Generator | int) -> np.ndarray:
    """``per_sample`` distinct valid neighbours of each of ``rows`` (int64 [len(rows), per_sample]),
    uniformly without replacement from the row's own list; -1 where a row has fewer valid ones."""
    nb = np.asarray(neighbors)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if nb.ndim != 2:
        raise NLAError(mismatch("neighbors", "an array [n, k]", nb.shape))
    if not 1 <= per_sample <= nb.shape[1]:
        raise NLAError(mismatch("per_sample", f"1..{nb.shape[1]} (the mined top_k)", per_sample,
                                "lower it or re-mine with a larger top_k"))
    if rows.size and (rows.min() < 0 or rows.max() >= nb.shape[0]):
        raise NLAError(mismatch("rows", f"indices in [0, {nb.shape[0]})",
                                f"[{rows.min()}, {rows.max()}]"))
    rng = np.random.default_rng(rng)  # a Generator passes through; an int seeds one
    cand = nb[rows]
    keys = np.where(cand >= 0, rng.random(cand.shape), np.inf)
    pick = np.argsort(keys, axis=1, kind="stable")[:, :per_sample]
    out = np.take_along_axis(cand, pick, 1).astype(np.int64)
    out[np.isinf(np.take_along_axis(keys, pick, 1))] = -1
    return out
