"""Document-level train/eval splits: a document's rows always land in one split.

Splitting rows instead of documents leaks near-duplicate context between training and
evaluation (several reimplementations found inflated eval numbers that way). Each document gets a
uniform number ``u = hash(seed, doc_id) ∈ [0, 1)`` (BLAKE2b, independent of Python's hash seed,
the corpus order and the other documents) and goes to the first split, in the fixed order
:data:`SPLIT_ORDER`, whose cumulative fraction exceeds ``u``. Fractions may sum to less than 1: the
remaining documents are in no split. Adding documents never moves existing ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nla_rl.errors import ConfigError

SPLIT_ORDER = ("av_sft", "ar_sft", "rl", "eval")
_TWO_64 = float(2 ** 64)


def doc_uniform(seed: int, doc_id: int) -> float:
    """The document's position in [0, 1) for ``seed`` (deterministic across runs and machines)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(doc_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _TWO_64


def _check_fractions(fractions: Mapping[str, float]) -> None:
    unknown = sorted(set(fractions) - set(SPLIT_ORDER))
    if unknown:
        raise ConfigError(f"splits: unknown split name(s) {unknown}; expected some of {list(SPLIT_ORDER)}")
    bad = {k: v for k, v in fractions.items() if not 0.0 <= float(v) <= 1.0}
    if bad:
        raise ConfigError(f"splits: fractions must lie in [0, 1], found {bad}")
    total = sum(float(v) for v in fractions.values())
    if total > 1.0 + 1e-9:
        raise ConfigError(f"splits: fractions must sum to at most 1, found {total:g} ({dict(fractions)})")


def split_documents(doc_ids: Iterable[int], fractions: Mapping[str, float],
                    seed: int) -> dict[str, set[int]]:
    """Assign each document to at most one split (see the module docstring).

    Returns one set per name in ``fractions`` (in :data:`SPLIT_ORDER` order), possibly empty.
    """
    _check_fractions(fractions)
    names = [s for s in SPLIT_ORDER if s in fractions]
    bounds = np.cumsum([float(fractions[s]) for s in names])
    out: dict[str, set[int]] = {s: set() for s in names}
    for doc_id in dict.fromkeys(int(d) for d in doc_ids):
        i = int(np.searchsorted(bounds, doc_uniform(seed, doc_id), side="right"))
        if i < len(names):
            out[names[i]].add(doc_id)
    return out


def split_table(table: pa.Table, assignment: Mapping[str, set[int]]) -> dict[str, pa.Table]:
    """The rows of each split (by ``doc_id``, original row order kept). Rows of documents in no
    split are dropped; a document in two splits is an error."""
    seen: dict[int, str] = {}
    for name, ids in assignment.items():
        for doc_id in ids:
            if doc_id in seen:
                raise ConfigError(f"splits: document {doc_id} is in both {seen[doc_id]!r} and {name!r}")
            seen[doc_id] = name
    if "doc_id" not in table.column_names:
        raise ConfigError(f"split_table: no 'doc_id' column; columns found: {table.column_names}")
    out = {}
    for name, ids in assignment.items():
        values = pa.array(sorted(ids), type=pa.int64())
        out[name] = table.filter(pc.is_in(table["doc_id"].cast(pa.int64()), value_set=values))
    return out
