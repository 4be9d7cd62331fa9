"""Sharded activation extraction on Ray: N workers, each holding a replica of blocks 0..K.

Documents are cut into fixed shards (shard i = documents [i·S, (i+1)·S)), so the shard a document
lands in never depends on how many workers run. Every shard is written to its own parquet file
atomically; a rerun skips shards whose file exists, which is how a killed run resumes. The merge
reads shards in index order, so the merged file is the same whatever order workers finished in.
Finished shards are reused only if ``shards.json`` says they came from the same extraction spec,
sharding and documents; otherwise they are stale and deleted before extracting again.
A worker that does not finish a shard within its deadline (:mod:`actors.deadline`) stops the
stage with :class:`ExtractionHungError`; the finished shards stay, so a rerun resumes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nla_rl.atomic import atomic_write_json
from nla_rl.data.corpus import Document
from nla_rl.data.extract import ActivationExtractor, ExtractStats
from nla_rl.data.store import write_table_atomic
from nla_rl.errors import NLAError

SHARD_PATTERN = "shard-{:06d}.parquet"


class ExtractionHungError(NLAError):
    """An extraction worker did not finish its shard within the deadline."""


@dataclass(frozen=True)
class ExtractionSpec:
    """Everything a worker needs to build its extractor (picklable, sent once per worker)."""

    base_dir: str
    layer_index: int
    positions_per_doc: int
    min_pos: int
    max_tokens: int
    seed: int
    batch_size: int = 8
    positions: str = "random"
    text_prefix: bool = True
    extractor_kwargs: dict = field(default_factory=dict)

    def build(self) -> ActivationExtractor:
        return ActivationExtractor(
            self.base_dir, self.layer_index, positions_per_doc=self.positions_per_doc,
            min_pos=self.min_pos, max_tokens=self.max_tokens, positions=self.positions,
            seed=self.seed,
            batch_size=self.batch_size, text_prefix=self.text_prefix, **self.extractor_kwargs)


def extract_shard(extractor: ActivationExtractor, docs: Sequence[Document], path: Path) -> dict:
    """Extract one shard and write it (temp file + rename); its counts go beside it as JSON.

    The counts are written first: a shard's parquet file existing is what marks it finished.
    """
    table, stats = extractor.extract(docs)
    atomic_write_json(path.with_suffix(".stats.json"), stats.as_dict(), indent=None,
                      sort_keys=True)
    write_table_atomic(table, path)
    return stats.as_dict()


class ExtractionWorker:
    """Ray actor body: one model replica, many shards."""

    def __init__(self, spec: ExtractionSpec, num_threads: int = 1, logs=None):
        import torch

        from nla_rl.run_logs import redirect_process_output

        redirect_process_output(logs, "datagen")

        torch.set_num_threads(num_threads)  # one thread per process: 2 cores, several workers
        self.extractor = spec.build()

    def run(self, shard_index: int, docs: Sequence[Document], path: str) -> tuple[int, int, dict]:
        return shard_index, len(docs), extract_shard(self.extractor, docs, Path(path))


def shard_documents(docs: Sequence[Document], docs_per_shard: int) -> list[list[Document]]:
    """Fixed shards of ``docs_per_shard`` documents, in document order."""
    return [list(docs[i:i + docs_per_shard]) for i in range(0, len(docs), docs_per_shard)]


def run_extraction(spec: ExtractionSpec, docs: Sequence[Document], shard_dir: Path, *,
                   docs_per_shard: int, num_workers: int, cpus_per_worker: float = 1.0,
                   gpus_per_worker: float = 0.0, progress: bool = True,
                   deadline=None) -> ExtractStats:
    """Extract every unfinished shard; ``num_workers=0`` runs in this process (no Ray).
    ``deadline``: how long a worker may take per shard (:class:`actors.deadline.CallDeadline`,
    fed the shard times; default from the recipe defaults).

    Returns the summed counts of all shards (finished earlier or now).
    """
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    shards = shard_documents(docs, docs_per_shard)
    _discard_stale_shards(shard_dir, _shard_key(spec, docs, docs_per_shard))
    todo = [i for i in range(len(shards)) if not shard_path(shard_dir, i).exists()]
    bar = tqdm(total=len(docs), initial=sum(len(shards[i]) for i in range(len(shards)) if i not in todo),
               unit="doc", desc="extract", disable=not progress, smoothing=0.1)
    started = time.perf_counter()
    if num_workers == 0:
        extractor = spec.build() if todo else None
        for i in todo:
            extract_shard(extractor, shards[i], shard_path(shard_dir, i))
            bar.update(len(shards[i]))
    elif todo:
        from actors.deadline import CallDeadline

        _run_on_ray(spec, shards, todo, shard_dir, num_workers, (cpus_per_worker, gpus_per_worker),
                    bar, deadline or CallDeadline.from_run())
    bar.close()
    if todo and progress:
        done = sum(len(shards[i]) for i in todo)
        print(f"[datagen] extracted {done} docs in {time.perf_counter() - started:.1f}s "
              f"({done / max(time.perf_counter() - started, 1e-9):.1f} docs/s)")
    return sum((_read_stats(shard_path(shard_dir, i)) for i in range(len(shards))), ExtractStats())


def _run_on_ray(spec, shards, todo, shard_dir, num_workers, resources, bar, deadline) -> None:
    """Each worker takes the next unfinished shard when it is free; a shard's time (from its
    launch) is a step of the ``deadline``, which bounds every shard still running."""
    import ray

    from actors.cluster import current_actor_logs

    num_cpus, num_gpus = resources
    worker_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(ExtractionWorker)
    workers = [worker_cls.remote(spec, logs=current_actor_logs())
               for _ in range(min(num_workers, len(todo)))]
    jobs, idle = iter(todo), list(range(len(workers)))
    running: dict = {}  # ref -> (worker, shard, launched)
    try:
        while True:
            while idle and (i := next(jobs, None)) is not None:
                w = idle.pop()
                ref = workers[w].run.remote(i, shards[i], str(shard_path(shard_dir, i)))
                running[ref] = (w, i, time.perf_counter())
            if not running:
                return
            limit = deadline.seconds()
            due = min(launched for _, _, launched in running.values()) + limit
            ready, _ = ray.wait(list(running), num_returns=1,
                                timeout=max(0.0, due - time.perf_counter()))
            if not ready:
                w, i, _ = min(running.values(), key=lambda job: job[2])
                raise ExtractionHungError(
                    f"datagen: extraction worker {w} did not finish shard {i} "
                    f"({shard_path(shard_dir, i).name}) within {limit:.3g}s; the stage is stopped. "
                    f"The finished shards are kept in {shard_dir}: rerunning the datagen stage "
                    "resumes at the first unfinished one. See <run>/logs/datagen.log (or "
                    "--verbose); if extraction is merely slow, raise run.call_timeout_floor_s")
            w, _, launched = running.pop(ready[0])
            _, n_docs, _ = ray.get(ready[0])
            deadline.observe(time.perf_counter() - launched)
            idle.append(w)
            bar.update(n_docs)
    finally:
        for worker in workers:
            ray.kill(worker)


def _shard_key(spec: ExtractionSpec, docs: Sequence[Document], docs_per_shard: int) -> dict:
    """What a finished shard depends on: the spec, the sharding and the documents themselves."""
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(f"{doc.doc_id}\x00{doc.text}\x01".encode())
    spec_fields = {k: v for k, v in spec.__dict__.items() if k != "extractor_kwargs"}
    return {"spec": spec_fields, "extractor_kwargs": repr(sorted(spec.extractor_kwargs.items())),
            "docs_per_shard": docs_per_shard, "documents": len(docs), "docs_sha256": digest.hexdigest()}


def _discard_stale_shards(shard_dir: Path, key: dict) -> None:
    """Delete shards written for another spec/corpus (they would be silently mixed in), then
    record the current key. The key is written before any shard, so a kill cannot orphan one."""
    key_path = shard_dir / "shards.json"
    old = json.loads(key_path.read_text()) if key_path.is_file() else None
    if old != key:
        stale = sorted(shard_dir.glob("shard-*"))
        if stale and old is not None:
            changed = sorted(k for k in key if old.get(k) != key[k])
            print(f"[datagen] {len(stale)} shard files were extracted with different "
                  f"{', '.join(changed)}; extracting again")
        for path in stale:
            path.unlink()
        atomic_write_json(key_path, key, indent=None, sort_keys=True)


def merge_shards(shard_dir: Path, n_shards: int, out_path: Path) -> int:
    """Concatenate shards 0..n-1 in index order into ``out_path`` (atomic); returns the row count."""
    paths = [shard_path(shard_dir, i) for i in range(n_shards)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"cannot merge: shards {missing[:5]} are missing in {shard_dir}; "
                                "rerun the datagen stage to extract them")
    tables = [pq.read_table(p) for p in paths]
    # One contiguous chunk per column: the file's layout must not depend on the shard size.
    merged = pa.concat_tables(tables).combine_chunks()
    write_table_atomic(merged, out_path)
    return merged.num_rows


def shard_path(shard_dir: Path, index: int) -> Path:
    return Path(shard_dir) / SHARD_PATTERN.format(index)


def _read_stats(path: Path) -> ExtractStats:
    return ExtractStats(**json.loads(path.with_suffix(".stats.json").read_text()))
