"""The RL split as batches: activations, their documents, attributes, and drawn hard negatives.

The order is a :class:`~nla_rl.checkpoint.DataCursor` (a seeded permutation per epoch), so a
resumed run draws exactly the rows the interrupted one would have; negatives are drawn with an
RNG seeded by (seed, step), so they too are the same after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nla_rl.checkpoint import DataCursor
from nla_rl.data.negatives import check_negatives_match, read_negatives, read_negatives_params, sample_negatives
from nla_rl.data.store import read_activations, read_rows
from nla_rl.errors import ConfigError


@dataclass
class RLBatch:
    rows: np.ndarray  # int64 [P], indices into the split
    vectors: np.ndarray  # float32 [P, d], raw golds
    doc_ids: np.ndarray  # int64 [P]
    attributes: list | None  # toy world: the true attribute set of each row
    negatives: np.ndarray | None  # float32 [P, n, d]; rows lacking neighbours repeat the closest


class RLData:
    """Batches of the ``rl`` split of ``data_dir`` (with hard negatives when ``per_sample``)."""

    def __init__(self, data_dir: str | Path, *, seed: int, per_sample: int = 0,
                 cursor: DataCursor | None = None):
        path = Path(data_dir) / "rl.parquet"
        if not path.is_file():
            raise ConfigError(f"the rl stage reads {path}, which the datagen stage writes; run "
                              "datagen first (run.stages)")
        self.vectors = read_activations(path)
        if len(self.vectors) == 0:
            raise ConfigError(f"{path} has no rows; give data.splits.rl a larger fraction")
        table = read_rows(path, columns=None)
        self.doc_ids = np.asarray(table["doc_id"].to_numpy(), dtype=np.int64)
        self.attributes = (table["attributes"].to_pylist()
                           if "attributes" in table.column_names else None)
        self.seed, self.per_sample = seed, per_sample
        self.neighbors = self._neighbors(Path(data_dir)) if per_sample else None
        self.cursor = cursor or DataCursor(len(self.vectors), seed)
        if self.cursor.num_items != len(self.vectors):
            raise ConfigError(f"the data cursor was saved for {self.cursor.num_items} rl rows but "
                              f"{path} has {len(self.vectors)}; the data changed since the "
                              "checkpoint: start a new run directory")

    def _neighbors(self, data_dir: Path) -> np.ndarray:
        path = data_dir / "rl.negatives.parquet"
        if not path.is_file():
            raise ConfigError(f"negatives.enabled needs {path} (written by datagen); rerun datagen "
                              "or set negatives.enabled=false")
        check_negatives_match(read_negatives_params(path), len(self.vectors), "rl")
        neighbors, _ = read_negatives(path)
        if self.per_sample > neighbors.shape[1]:
            raise ConfigError(f"negatives.per_sample={self.per_sample} exceeds the mined top_k "
                              f"{neighbors.shape[1]}; lower it or rerun datagen with a larger top_k")
        return neighbors

    def next_batch(self, size: int, step: int) -> RLBatch:
        rows = np.asarray(self.cursor.next_indices(size), dtype=np.int64)
        negatives = None
        if self.neighbors is not None:
            picked = sample_negatives(self.neighbors, rows, self.per_sample,
                                      np.random.default_rng([self.seed, step]))
            # A row with too few valid neighbours reuses its closest one (column 0 of the list).
            fallback = np.maximum(self.neighbors[rows, :1], 0)
            picked = np.where(picked >= 0, picked, fallback)
            negatives = self.vectors[picked]
        return RLBatch(rows, self.vectors[rows], self.doc_ids[rows],
                       None if self.attributes is None else [self.attributes[r] for r in rows],
                       negatives)
