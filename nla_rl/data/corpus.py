"""Reading a text corpus from local files: one :class:`Document` per source row.

Formats (chosen by the path):

* ``*.txt`` — one document per line (the line break is not part of the text);
* ``*.jsonl`` — one JSON object per line, text under ``text_column``;
* ``*.parquet`` — text under ``text_column``;
* a directory written by ``datasets.Dataset.save_to_disk`` — its ``data-*.arrow`` files (Arrow IPC
  *stream* format) are read with pyarrow directly, in the order ``state.json`` lists them.

``doc_id`` is the row index in the source (the line index for ``.txt``/``.jsonl``), so it is stable
across reruns and ``limit`` values. ``limit`` caps the number of *source rows* read (rows
``0..limit-1``, i.e. ``corpus_slice = (0, limit)``). Empty documents (null or whitespace only) are
skipped and counted in :class:`CorpusStats`; a corpus with no non-empty document is an error.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nla_rl.errors import NLAError

FORMATS = (".txt", ".jsonl", ".parquet", "datasets save_to_disk directory")


class CorpusError(NLAError):
    """A corpus file is missing, in an unknown format, lacks the text column, or is empty."""


@dataclass(frozen=True)
class Document:
    """One corpus document; ``doc_id`` is its row index in the source."""

    doc_id: int
    text: str


@dataclass(frozen=True)
class CorpusStats:
    """What :func:`read_corpus` saw: source rows read, empty documents skipped, documents kept."""

    rows_read: int
    empty_skipped: int
    documents: int


def read_corpus(path: str | Path, *, text_column: str = "text",
                limit: int | None = None) -> tuple[list[Document], CorpusStats]:
    """Read the documents of a local corpus (see the module docstring for formats and ids).

    Returns ``(documents, stats)``. Raises :class:`CorpusError` for a missing path, an unknown
    format, a missing text column (listing the columns found) and a corpus with no text.
    """
    path = Path(path)
    if limit is not None and limit < 0:
        raise CorpusError(f"limit: expected ≥ 0 or None, found {limit}")
    if not path.exists():
        raise CorpusError(f"corpus {path}: no such file or directory")
    docs, rows, empty = [], 0, 0
    try:
        for doc_id, text in _rows(path, text_column, limit):
            if limit is not None and rows >= limit:
                break
            rows += 1
            if text is None or not str(text).strip():
                empty += 1
                continue
            if not isinstance(text, str):
                raise CorpusError(f"corpus {path}: row {doc_id}: column {text_column!r} must hold "
                                  f"text, found {type(text).__name__} {text!r:.60}")
            docs.append(Document(doc_id, text))
    except UnicodeDecodeError as err:
        raise CorpusError(f"corpus {path}: not UTF-8 text (byte {err.object[err.start]:#04x} "
                          f"after {rows} good row(s)); convert it to UTF-8, e.g. "
                          f"iconv -f latin1 -t utf-8") from None
    if not docs:
        raise CorpusError(f"corpus {path}: no non-empty document in {rows} row(s) read "
                          f"({empty} empty); check the file and the text column")
    return docs, CorpusStats(rows_read=rows, empty_skipped=empty, documents=len(docs))


def _rows(path: Path, column: str, limit: int | None) -> Iterator[tuple[int, object]]:
    if path.is_dir():
        return _arrow_rows(path, _datasets_files(path), column, limit, stream=True)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _txt_rows(path)
    if suffix == ".jsonl":
        return _jsonl_rows(path, column)
    if suffix == ".parquet":
        return _arrow_rows(path, [path], column, limit, stream=False)
    raise CorpusError(f"corpus {path}: unknown format {suffix or '(no suffix)'!r}; "
                      f"supported: {', '.join(FORMATS)}")


def _txt_rows(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        for i, line in enumerate(f):
            yield i, line.rstrip("\r\n")


def _jsonl_rows(path: Path, column: str) -> Iterator[tuple[int, object]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                yield i, None
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"corpus {path}: line {i + 1} is not valid JSON ({e})") from e
            if not isinstance(record, dict):
                raise CorpusError(f"corpus {path}: line {i + 1}: expected a JSON object, "
                                  f"found {type(record).__name__}")
            if column not in record:
                raise _missing_column(path, column, list(record), where=f" (line {i + 1})")
            yield i, record[column]


def _datasets_files(path: Path) -> list[Path]:
    """The ``data-*.arrow`` files of a ``save_to_disk`` directory, in their listed order."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise CorpusError(f"corpus {path}: a DatasetDict directory; pass one split's "
                          f"subdirectory, e.g. {path / (splits[0] if splits else 'train')}")
    state = path / "state.json"
    files = []
    if state.is_file():
        files = [path / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    files = files or sorted(path.glob("data-*.arrow"))
    if not files:
        raise CorpusError(f"corpus {path}: a directory without data-*.arrow files; expected a "
                          f"`datasets` save_to_disk directory, or pass a file ({', '.join(FORMATS[:3])})")
    for f in files:
        if not f.is_file():
            raise CorpusError(f"corpus {path}: {f.name} is listed in state.json but missing")
    return files


def _arrow_rows(path: Path, files: list[Path], column: str, limit: int | None,
                *, stream: bool) -> Iterator[tuple[int, object]]:
    """Rows of ``column`` from parquet files or Arrow IPC stream files, batch by batch."""
    row = 0
    for file in files:
        if stream:
            source = pa.memory_map(str(file))
            reader = pa.ipc.open_stream(source)
            schema, batches = reader.schema, iter(reader)
        else:
            pf = pq.ParquetFile(file)
            schema = pf.schema_arrow
            batches = pf.iter_batches(batch_size=4096, columns=[column]) if column in schema.names else None
        if column not in schema.names:
            raise _missing_column(path, column, schema.names)
        for batch in batches:
            for text in batch.column(column).to_pylist():
                yield row, text
                row += 1
                if limit is not None and row >= limit:
                    return


def _missing_column(path: Path, column: str, found: list[str], where: str = "") -> CorpusError:
    close = difflib.get_close_matches(column, found, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; pass text_column= to choose one"
    return CorpusError(f"corpus {path}{where}: no text column {column!r}; columns found: "
                       f"{sorted(found)}{hint}")
