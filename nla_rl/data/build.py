"""Turning extracted activations into the training data: labels, document splits with sidecars,
and the hard negatives of the rl split. Pure (no Ray): the datagen stage calls these after the
(possibly distributed) extraction has written ``base.parquet``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nla_rl.data.corpus import Document
from nla_rl.data.negatives import mine_hard_negatives, negatives_params, write_negatives
from nla_rl.data.splits import split_documents, split_table
from nla_rl.data.store import read_activations, write_table_atomic
from nla_rl.data.teachers import TeacherCache, TeacherRequest, label_cached, teacher_metadata
from nla_rl.data.toyworld import (DEFAULT_P_SLOT, ToyWorld, attributes_by_position, teacher_rng,
                                  toy_teacher_explanation)
from nla_rl.sidecar import DatasetSidecar, write_dataset_sidecar

NEGATIVES_FILE = "rl.negatives.parquet"


def toyworld_documents(seed: int, n_docs: int, ending: str = "end",
                       p_slot: float = DEFAULT_P_SLOT) -> list[Document]:
    """The first ``n_docs`` toy-world documents as corpus documents, each cut after its readout
    token (the activation there does not depend on what follows), so ``data.positions: last``
    reads the readout."""
    world = ToyWorld(seed, ending=ending, p_slot=p_slot)
    return [Document(d.doc_id, d.readout_text) for d in world.documents(n_docs)]


def toy_teacher_meta(p_include: float, p_wrong: float) -> dict:
    """The toy teacher as the data sidecars' ``api_summaries`` record it."""
    return {"name": "toyworld", "model": "toyworld-partial", "p_include": p_include,
            "p_wrong": p_wrong}


def label_with_toy_teacher(table: pa.Table, tokenizer, *, seed: int, p_include: float,
                           p_wrong: float, ending: str = "end",
                           p_slot: float = DEFAULT_P_SLOT) -> tuple[pa.Table, dict]:
    """Add ``attributes`` (ground truth at each row's position) and the partial teacher's
    ``explanation``; rows the teacher refuses (no attribute named) are dropped and counted."""
    world = ToyWorld(seed, ending=ending, p_slot=p_slot)
    attrs_cache: dict[int, list[frozenset[str]]] = {}
    attributes, explanations = [], []
    for doc_id, pos in zip(table["doc_id"].to_pylist(), table["position"].to_pylist()):
        if doc_id not in attrs_cache:
            attrs_cache[doc_id] = attributes_by_position(tokenizer, world.document(doc_id))
        truth = attrs_cache[doc_id][pos]
        attributes.append(sorted(truth))
        explanations.append(toy_teacher_explanation(truth, teacher_rng(seed, doc_id, pos),
                                                    p_include=p_include, p_wrong=p_wrong))
    table = table.append_column("attributes", pa.array(attributes, pa.list_(pa.string())))
    table = table.append_column("explanation", pa.array(explanations, pa.string()))
    kept = table.filter(pc.is_valid(table["explanation"]))
    stats = {"total": table.num_rows, "ok": kept.num_rows, "refused": table.num_rows - kept.num_rows}
    return kept, {"teacher": toy_teacher_meta(p_include, p_wrong), "teacher_stats": stats}


def relabel_with_toy_teacher(path: Path, *, seed: int, p_include: float, p_wrong: float) -> int:
    """Re-explain the split ``path`` (with its ``attributes`` column) by a toy teacher naming each
    true attribute with probability ``p_include`` (the AR's teacher, ``toyworld.ar_p_include``),
    same per-row RNG as the first labelling; rows it refuses are dropped. The parquet and its
    sidecar (row count, ``api_summaries``) are rewritten atomically; returns the rows kept."""
    import pyarrow.parquet as pq

    path = Path(path)
    table = pq.read_table(path)
    explanations = [toy_teacher_explanation(truth, teacher_rng(seed, doc_id, pos),
                                            p_include=p_include, p_wrong=p_wrong)
                    for truth, doc_id, pos in zip(table["attributes"].to_pylist(),
                                                  table["doc_id"].to_pylist(),
                                                  table["position"].to_pylist())]
    column = table.column_names.index("explanation")
    table = table.set_column(column, "explanation", pa.array(explanations, pa.string()))
    table = table.filter(pc.is_valid(table["explanation"]))
    return _rewrite_ar_split(path, table, toy_teacher_meta(p_include, p_wrong))


def relabel_with_teacher(path: Path, teacher, cache_dir: Path) -> tuple[int, dict]:
    """Re-explain the split ``path`` (with its ``text_prefix`` column) by ``teacher``, the AR's
    own (``data.ar_teacher``), through the teacher cache; rows it fails on are dropped. The
    parquet and its sidecar (row count, ``api_summaries`` with ``role: ar``) are rewritten
    atomically; returns the rows kept and the teacher's counts."""
    import pyarrow.parquet as pq

    path = Path(path)
    table = pq.read_table(path)
    if "explanation" in table.column_names:
        table = table.drop_columns(["explanation"])
    table, info = label_with_teacher(table, teacher, cache_dir)
    return _rewrite_ar_split(path, table, info["teacher"]), info["teacher_stats"]


def _rewrite_ar_split(path: Path, table: pa.Table, teacher_meta: dict) -> int:
    """Write the re-explained AR-SFT split over ``path`` and its sidecar (row count, the AR's
    teacher with ``role: ar``), each atomically; returns the rows written."""
    from nla_rl.sidecar import read_dataset_sidecar

    meta = read_dataset_sidecar(path)
    write_table_atomic(table, path)
    write_dataset_sidecar(path, replace(meta, row_count=table.num_rows,
                                        api_summaries={**teacher_meta, "role": "ar"}))
    return table.num_rows


def label_with_teacher(table: pa.Table, teacher, cache_dir: Path) -> tuple[pa.Table, dict]:
    """Add the teacher's ``explanation`` of each row's ``text_prefix``; failures are dropped and
    counted (never crash the run). The cache makes reruns and resumes free."""
    if "text_prefix" not in table.column_names:
        raise ValueError("labelling needs the text_prefix column: extract with text_prefix on")
    requests = [TeacherRequest(f"{d}:{p}", prefix) for d, p, prefix in zip(
        table["doc_id"].to_pylist(), table["position"].to_pylist(), table["text_prefix"].to_pylist())]
    results, stats = label_cached(teacher, requests, TeacherCache(cache_dir))
    table = table.append_column("explanation", pa.array([r.explanation for r in results], pa.string()))
    kept = table.filter(pc.is_valid(table["explanation"]))
    return kept, {"teacher": teacher_metadata(teacher), "teacher_stats": stats}


def write_splits(table: pa.Table, data_dir: Path, fractions: dict[str, float], seed: int,
                 base_sidecar: DatasetSidecar) -> dict[str, int]:
    """Split by document into ``<split>.parquet`` + sidecars; returns the row count per split."""
    doc_ids = sorted(set(table["doc_id"].to_pylist()))
    assignment = split_documents(doc_ids, fractions, seed)
    counts = {}
    for split, part in split_table(table, assignment).items():
        path = Path(data_dir) / f"{split}.parquet"
        write_table_atomic(part, path)
        extras = dict(base_sidecar.extras)
        extras["split"] = {"seed": seed, "fractions": dict(fractions),
                           "documents": len(assignment[split])}
        write_dataset_sidecar(path, replace(base_sidecar, dataset_id=f"{base_sidecar.dataset_id}-{split}",
                                            stage=split, row_count=part.num_rows,
                                            parent_datasets=("base.parquet",), extras=extras))
        counts[split] = part.num_rows
    return counts


def mine_rl_negatives(data_dir: Path, *, top_k: int, exclude_same_doc: bool, method: str) -> dict:
    """Hard negatives of ``rl.parquet`` → ``rl.negatives.parquet``; returns the parameters."""
    import pyarrow.parquet as pq

    rl_path = Path(data_dir) / "rl.parquet"
    vectors = read_activations(rl_path)
    doc_ids = pq.read_table(rl_path, columns=["doc_id"])["doc_id"].to_numpy()
    neighbors, scores = mine_hard_negatives(vectors, doc_ids, top_k=top_k,
                                            exclude_same_doc=exclude_same_doc, method=method)
    params = negatives_params(neighbors, top_k=top_k, exclude_same_doc=exclude_same_doc,
                              method=method, split_name=rl_path.name, split_row_count=len(vectors))
    write_negatives(Path(data_dir) / NEGATIVES_FILE, neighbors, scores, params)
    return params


def activation_norm_stats(vectors: np.ndarray) -> dict:
    """Mean and spread of the raw norms: the replace family's scale is chosen a little above the
    mean raw norm."""
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    return {"mean": float(norms.mean()), "std": float(norms.std()), "max": float(norms.max())}

