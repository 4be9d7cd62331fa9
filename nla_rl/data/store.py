"""Activation tables on disk: building, atomic deterministic writing, and fast loading.

Layout (see :mod:`nla_rl.data`): ``doc_id`` int64, ``position`` int32, ``layer`` int16,
``activation_vector`` ``fixed_size_list<float32>[d]`` plus optional extra columns.

Two file formats, chosen by the suffix:

* ``.parquet`` — the storage contract's format. :func:`read_activations` decodes it in small
  batches into **one preallocated contiguous** ``float32 [n, d]`` array (no per-row Python lists),
  so resident memory after loading ≈ 1.0× the raw bytes (P6 goal ≤ 1.2×; peak ≈ 1.3×).
* ``.arrow`` — an Arrow IPC *file*, an optional cache beside the parquet. Written as a single
  record batch, it is memory-mapped and returned **zero-copy** (a read-only view of the map).

Writing is deterministic (same table → same bytes: fixed options, no timestamps; pyarrow puts only
its version in ``created_by``) and atomic (temp file in the same directory + ``os.replace``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nla_rl.errors import NLAError
from nla_rl.sidecar import dataset_sidecar_path, read_dataset_sidecar

VECTOR_COLUMN = "activation_vector"
ROW_GROUP_BYTES = 64 << 20  # target size of one row group's vectors
READ_BATCH_BYTES = 4 << 20  # parquet is decoded this many vector bytes at a time
_PARQUET_OPTIONS = dict(compression="zstd", compression_level=3, use_dictionary=False,
                        write_statistics=False, write_page_index=False, store_schema=True)


class StoreError(NLAError):
    """An activation file is missing, malformed, or disagrees with the data it is combined with."""


def activations_table(doc_ids, positions, layer: int, vectors: np.ndarray, **extra_columns) -> pa.Table:
    """The contract's table: one row per activation (``vectors`` [n, d] float32, stored raw).

    ``extra_columns`` (``text_prefix=[...]``, ``explanation=[...]`` …) are appended as given.
    The vector column shares ``vectors``' memory when it is C-contiguous float32.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise StoreError(f"vectors: expected a 2-D array [n, d], found shape {vectors.shape}")
    n, d = vectors.shape
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    columns = {
        "doc_id": pa.array(np.asarray(doc_ids, dtype=np.int64)),
        "position": pa.array(np.asarray(positions, dtype=np.int32)),
        "layer": pa.array(np.full(n, layer, dtype=np.int16)),
        VECTOR_COLUMN: pa.FixedSizeListArray.from_arrays(flat, d),
    }
    for name, values in extra_columns.items():
        columns[name] = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) != 1:
        raise StoreError(f"columns must all have {n} rows (one per vector), found {lengths}")
    return pa.table(columns)


def vector_dim(schema: pa.Schema) -> int:
    """``d`` of the schema's fixed-size vector column (error if absent or not fixed-size)."""
    if VECTOR_COLUMN not in schema.names:
        raise StoreError(f"no {VECTOR_COLUMN!r} column; columns found: {schema.names}")
    t = schema.field(VECTOR_COLUMN).type
    if not pa.types.is_fixed_size_list(t):
        raise StoreError(f"{VECTOR_COLUMN}: expected fixed_size_list<float32>[d], found {t}")
    return t.list_size


def _row_group_size(schema: pa.Schema) -> int:
    d = vector_dim(schema) if VECTOR_COLUMN in schema.names else 256
    return max(1, ROW_GROUP_BYTES // (4 * max(d, 1)))


class ActivationWriter:
    """Write (or append to) an activation file shard by shard, atomically on :meth:`close`.

    ``append=True`` copies an existing file's rows first; its ``d`` — and that of its dataset
    sidecar, if any — must equal ``d_model``. Every shard's ``d`` and schema must match too.
    Use as a context manager: on error the temp file is removed and ``path`` is left untouched.
    """

    def __init__(self, path: str | Path, d_model: int, *, append: bool = False):
        self.path, self.d_model, self.rows = Path(path), int(d_model), 0
        self._parquet = self.path.suffix == ".parquet"
        if not self._parquet and self.path.suffix != ".arrow":
            raise StoreError(f"{self.path}: expected a .parquet or .arrow path")
        self._writer, self._schema = None, None
        self._existing = self.path if append and self.path.exists() else None
        if append and dataset_sidecar_path(self.path).is_file():
            sc = read_dataset_sidecar(self.path)
            if sc.d_model != self.d_model:
                raise StoreError(f"{self.path}: cannot append d={self.d_model} rows: the sidecar "
                                 f"says extraction.d_model={sc.d_model} (a different base model?)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            for table in _iter_tables(self._existing) if self._existing is not None else ():
                self.write(table, what=f"existing file {self._existing}")
        except BaseException:
            self.abort()
            raise

    def write(self, table: pa.Table, *, what: str = "shard") -> None:
        """Append ``table``'s rows (its ``d`` and schema must match)."""
        d = vector_dim(table.schema)
        if d != self.d_model:
            raise StoreError(f"{self.path}: {what} has d={d} vectors, expected d_model={self.d_model}; "
                             f"shards of one file must come from the same base model")
        if self._writer is None:
            self._schema = table.schema
            if self._parquet:
                self._writer = pq.ParquetWriter(self._tmp, table.schema, **_PARQUET_OPTIONS)
            else:
                self._sink = pa.OSFile(self._tmp, "wb")
                self._writer = pa.ipc.new_file(self._sink, table.schema)
        elif not table.schema.equals(self._schema):
            raise StoreError(f"{self.path}: {what} schema differs from the first shard's:\n"
                             f"{table.schema}\nvs\n{self._schema}")
        if self._parquet:
            self._writer.write_table(table, row_group_size=_row_group_size(table.schema))
        elif table.num_rows:  # one record batch per shard
            self._writer.write_batch(table.combine_chunks().to_batches()[0])
        self.rows += table.num_rows

    def close(self) -> Path:
        """Finish the file and move it into place; returns ``path``."""
        if self._writer is None:
            self.abort()
            raise StoreError(f"{self.path}: nothing was written")
        self._writer.close()
        if not self._parquet:
            self._sink.close()
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self.path)
        self._writer = None
        return self.path

    def abort(self) -> None:
        """Drop the temp file; ``path`` is untouched."""
        if self._writer is not None:
            self._writer.close()
            if not self._parquet:
                self._sink.close()
            self._writer = None
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort() if exc_type is not None else self.close()


def write_table_atomic(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` to ``path`` (.parquet or .arrow) deterministically and atomically."""
    with ActivationWriter(path, vector_dim(table.schema)) as w:
        w.write(table)
    return Path(path)


def _iter_tables(path: Path):
    """The file's rows, one table per row group (parquet) or record batch (arrow)."""
    if path.suffix == ".parquet":
        pf = pq.ParquetFile(path)
        for i in range(pf.num_row_groups):
            yield pf.read_row_group(i)
    else:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        for i in range(reader.num_record_batches):
            yield pa.Table.from_batches([reader.get_batch(i)])


def _flat_values(chunk: pa.Array, d: int) -> np.ndarray:
    """The float32 values of a vector chunk, flat (zero-copy for fixed-size float32 lists)."""
    if chunk.null_count:
        raise StoreError(f"{VECTOR_COLUMN}: {chunk.null_count} null vector(s)")
    if pa.types.is_fixed_size_list(chunk.type):
        values = chunk.flatten()
    elif pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):  # reference-style list<float>
        lengths = np.diff(chunk.offsets.to_numpy())
        if len(lengths) and (lengths != d).any():
            found = sorted(set(lengths.tolist()))[:5]
            raise StoreError(f"{VECTOR_COLUMN}: vectors of lengths {found}, expected {d}")
        values = chunk.flatten()
    else:
        raise StoreError(f"{VECTOR_COLUMN}: expected a list of floats, found {chunk.type}")
    if values.type != pa.float32():
        values = values.cast(pa.float32())
    return values.to_numpy(zero_copy_only=True)


def read_activations(path: str | Path, *, memory_map: bool = True) -> np.ndarray:
    """All vectors of an activation file as one C-contiguous ``float32 [n, d]`` array.

    ``.parquet``: decoded in small batches into a preallocated array (a private, writable copy;
    resident ≈ 1.0× the raw bytes, peak ≈ 1.3×). ``memory_map`` is ignored for parquet: mapping
    would only add the file's pages to the resident set while decoding.
    ``.arrow`` with one record batch and ``memory_map=True``: a zero-copy, read-only view of the
    memory-mapped file (keep the array, and so the map, alive as long as needed); otherwise copied.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such activation file")
    if path.suffix == ".parquet":
        # Small batches, no pre-buffering, no memory map: the transient Arrow buffers stay a few
        # MiB (the allocator keeps what it frees) and the file's pages are not mapped into RSS.
        with pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20) as pf:
            d = _schema_dim(pf.schema_arrow, path)
            out = np.empty((pf.metadata.num_rows, d), dtype=np.float32)
            row, batch_rows = 0, max(1, READ_BATCH_BYTES // (4 * d))
            for batch in pf.iter_batches(batch_size=batch_rows, columns=[VECTOR_COLUMN],
                                         use_threads=False):
                out[row:row + batch.num_rows] = _flat_values(batch.column(0), d).reshape(-1, d)
                row += batch.num_rows
                del batch
        pa.default_memory_pool().release_unused()
        if row != len(out):
            raise StoreError(f"{path}: read {row} vectors, the footer says {len(out)}")
        return out
    if path.suffix != ".arrow":
        raise StoreError(f"{path}: expected a .parquet or .arrow activation file")
    source = pa.memory_map(str(path)) if memory_map else pa.OSFile(str(path))
    reader = pa.ipc.open_file(source)
    d = _schema_dim(reader.schema, path)
    n_batches = reader.num_record_batches
    if n_batches == 1 and memory_map:
        chunk = reader.get_batch(0).column(VECTOR_COLUMN)
        return _flat_values(chunk, d).reshape(-1, d)  # view of the map (read-only)
    n = reader.count_rows()
    out, row = np.empty((n, d), dtype=np.float32), 0
    for i in range(n_batches):
        chunk = reader.get_batch(i).column(VECTOR_COLUMN)
        out[row:row + len(chunk)] = _flat_values(chunk, d).reshape(-1, d)
        row += len(chunk)
    return out


def _schema_dim(schema: pa.Schema, path: Path) -> int:
    if VECTOR_COLUMN not in schema.names:
        raise StoreError(f"{path}: no {VECTOR_COLUMN!r} column; columns found: {schema.names}")
    t = schema.field(VECTOR_COLUMN).type
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    sc_path = dataset_sidecar_path(path)
    if sc_path.is_file():
        return read_dataset_sidecar(path).d_model
    raise StoreError(f"{path}: {VECTOR_COLUMN} is {t}, not fixed-size, and there is no sidecar "
                     f"giving d_model; rewrite it with nla_rl.data.store.activations_table")


def read_rows(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Metadata columns of an activation file (default: every column except the vectors)."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such activation file")
    if path.suffix == ".parquet":
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    else:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        names = reader.schema.names
    columns = [c for c in names if c != VECTOR_COLUMN] if columns is None else list(columns)
    missing = [c for c in columns if c not in names]
    if missing:
        raise StoreError(f"{path}: no column(s) {missing}; columns found: {names}")
    if path.suffix == ".parquet":
        return pf.read(columns=columns)
    return reader.read_all().select(columns)
