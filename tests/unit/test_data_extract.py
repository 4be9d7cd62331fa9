"""Corpus reading, position sampling, activation extraction, storage and document splits."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import nla_rl.data.store as store
from nla_rl.data.corpus import CorpusError, Document, read_corpus
from nla_rl.data.extract import (ActivationExtractor, ExtractionError, sample_positions,
                                 special_token_ids, tokenize_documents)
from nla_rl.data.splits import SPLIT_ORDER, split_documents, split_table
from nla_rl.data.store import (ActivationWriter, StoreError, activations_table, read_activations,
                               read_rows, write_table_atomic)
from nla_rl.errors import ConfigError, NLAError
from nla_rl.sidecar import DatasetSidecar, read_dataset_sidecar, write_dataset_sidecar

TEXTS = ["the cat sits on the red house near the river", "", "a dog", "   ",
         "two happy birds sing quickly under the blue sky and the old tree"]
KEPT = [0, 2, 4]
WORDS = "the a red blue cat dog bird sits runs near river city sky ocean happy old new".split()


def _docs(n, seed=0, lo=3, hi=40):
    rng = np.random.default_rng(seed)
    return [Document(i, " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi)))))
            for i in range(n)]


# ------------------------------------------------------------------------------------ corpus
def _write_datasets_dir(path, texts, column="text"):
    path.mkdir()
    halves = [texts[:2], texts[2:]]
    files = []
    for i, part in enumerate(halves):
        name = f"data-{i:05d}-of-{len(halves):05d}.arrow"
        table = pa.table({column: pa.array(part, type=pa.string()), "id": list(range(len(part)))})
        with pa.OSFile(str(path / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        files.append({"filename": name})
    (path / "state.json").write_text(json.dumps({"_data_files": files, "_split": "train"}))
    (path / "dataset_info.json").write_text(json.dumps({"features": {column: {"dtype": "string"}}}))
    return path


def _write_corpus(tmp_path, fmt, texts=TEXTS, column="text"):
    if fmt == "txt":
        p = tmp_path / "c.txt"
        p.write_text("\n".join(texts) + "\n", encoding="utf-8")
    elif fmt == "jsonl":
        p = tmp_path / "c.jsonl"
        p.write_text("".join(json.dumps({column: t, "n": i}) + "\n" for i, t in enumerate(texts)))
    elif fmt == "parquet":
        p = tmp_path / "c.parquet"
        pq.write_table(pa.table({column: texts, "n": list(range(len(texts)))}), p, row_group_size=2)
    else:
        p = _write_datasets_dir(tmp_path / "ds", texts, column)
    return p


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet", "datasets"])
def test_read_corpus_every_format(tmp_path, fmt):
    path = _write_corpus(tmp_path, fmt)
    docs, stats = read_corpus(path)
    assert [d.doc_id for d in docs] == KEPT
    assert [d.text for d in docs] == [TEXTS[i] for i in KEPT]
    assert (stats.rows_read, stats.empty_skipped, stats.documents) == (5, 2, 3)
    docs, stats = read_corpus(path, limit=3)
    assert [d.doc_id for d in docs] == [0, 2] and stats.rows_read == 3


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "datasets"])
def test_missing_text_column_lists_columns_and_suggests(tmp_path, fmt):
    path = _write_corpus(tmp_path, fmt, column="texts")
    with pytest.raises(CorpusError) as e:
        read_corpus(path)
    msg = str(e.value)
    assert "'text'" in msg and "columns found" in msg and "'texts'" in msg
    if fmt != "jsonl":
        assert ("'n'" in msg) or ("'id'" in msg)
    assert "did you mean 'texts'?" in msg
    docs, _ = read_corpus(path, text_column="texts")
    assert [d.doc_id for d in docs] == KEPT


def test_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        read_corpus(tmp_path / "nope.txt")
    (tmp_path / "c.csv").write_text("text\nhello\n")
    with pytest.raises(CorpusError, match="unknown format '.csv'"):
        read_corpus(tmp_path / "c.csv")
    (tmp_path / "e.txt").write_text("\n  \n\n")
    with pytest.raises(CorpusError, match="no non-empty document"):
        read_corpus(tmp_path / "e.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(CorpusError, match="line 2"):
        read_corpus(tmp_path / "bad.jsonl")
    (tmp_path / "d").mkdir()
    with pytest.raises(NLAError, match="data-"):
        read_corpus(tmp_path / "d")


# ------------------------------------------------------------------------------------ positions
def test_sample_positions_properties():
    ids = list(range(100, 160))
    ids[20], ids[33] = 7, 8  # specials
    kw = dict(seed=3, n=10, min_pos=5, special_ids={7, 8})
    pos = sample_positions(ids, 11, **kw)
    assert pos == sample_positions(ids, 11, **kw)  # deterministic
    assert pos != sample_positions(ids, 12, **kw) and pos != sample_positions(ids, 11, **{**kw, "seed": 4})
    assert len(pos) == 10 and len(set(pos)) == 10 and pos == sorted(pos)
    assert min(pos) >= 5 and not {20, 33} & set(pos)
    many = sample_positions(ids, 11, **{**kw, "n": 1000})  # n caps at the candidates
    assert many == [p for p in range(5, 60) if p not in (20, 33)]
    assert sample_positions(ids[:5], 0, **kw) == []  # shorter than min_pos + 1
    assert sample_positions(ids[:6], 0, **kw) == [5]


def test_sample_positions_last_mode():
    ids = list(range(100, 160))
    ids[57], ids[59] = 7, 8  # specials near the end (e.g. EOS) are skipped, not counted
    kw = dict(seed=3, min_pos=5, special_ids={7, 8}, mode="last")
    assert sample_positions(ids, 11, n=1, **kw) == [58]
    assert sample_positions(ids, 11, n=3, **kw) == [55, 56, 58]
    assert sample_positions(ids, 11, n=3, **kw) == sample_positions(ids, 99, n=3, **{**kw, "seed": 0})
    assert sample_positions(ids[:6], 0, n=3, **kw) == [5]
    with pytest.raises(ExtractionError, match="positions: expected one of random, last"):
        sample_positions(ids, 0, n=1, seed=0, min_pos=0, special_ids=set(), mode="first")


def test_extractor_last_mode_reads_the_final_token(qwen):
    docs = [Document(0, " ".join(["cat"] * 20)), Document(1, " ".join(["dog"] * 30))]
    ex = ActivationExtractor(qwen.path, 1, min_pos=2, positions_per_doc=2, positions="last")
    table, _ = ex.extract(docs)
    lengths = [len(ids) for ids in ex.tokenizer([d.text for d in docs])["input_ids"]]
    assert table["position"].to_pylist() == [lengths[0] - 2, lengths[0] - 1,
                                             lengths[1] - 2, lengths[1] - 1]
    with pytest.raises(ExtractionError, match="positions"):
        ActivationExtractor(qwen.path, 1, positions="middle")


def test_tokenize_documents_bos_and_truncation(tiny_models):
    docs = _docs(3, lo=30, hi=40)
    for family, tm in tiny_models.items():
        out = tokenize_documents(tm.tokenizer, docs, 12)
        assert all(len(ids) == 12 for ids in out)
        has_bos = out[0][0] == tm.tokenizer.bos_token_id
        assert has_bos == (family in ("llama", "gemma3"))
        bos = tm.tokenizer.bos_token_id
        assert bos is None if family.startswith("qwen") else bos in special_token_ids(tm.tokenizer)


# ------------------------------------------------------------------------------------ extraction
@pytest.mark.parametrize("k", [1, 2])
def test_extraction_matches_full_model_left_padded(tiny, k):
    rng = np.random.default_rng(k)
    docs = [Document(i, " ".join(rng.choice(WORDS, size=n)))
            for i, n in enumerate([1, 3, 6, 10, 16, 30])]
    ex = ActivationExtractor(tiny.path, k, positions_per_doc=5, min_pos=2, batch_size=6,
                             max_tokens=80, text_prefix=True)
    table, stats = ex.extract(docs)
    ids = tokenize_documents(tiny.tokenizer, docs, 80)
    assert len({len(i) for i in ids}) == 6  # one left-padded batch of different lengths
    vec = table.column("activation_vector").combine_chunks().flatten().to_numpy().reshape(-1, tiny.d_model)
    got = {(d, p): v for d, p, v in zip(table["doc_id"].to_pylist(), table["position"].to_pylist(), vec)}
    expected_rows = 0
    for doc, seq in zip(docs, ids):
        pos = sample_positions(seq, doc.doc_id, seed=0, n=5, min_pos=2,
                               special_ids=special_token_ids(tiny.tokenizer))
        expected_rows += len(pos)
        with torch.no_grad():
            hs = tiny.model(torch.tensor([seq]), output_hidden_states=True).hidden_states[k + 1][0]
        for p in pos:
            np.testing.assert_allclose(got[(doc.doc_id, p)], hs[p].numpy(), atol=1e-5, rtol=1e-5)
    assert stats.rows == table.num_rows == expected_rows and stats.nonfinite_rows == 0
    assert set(table["layer"].to_pylist()) == {k}
    assert table.schema.field("activation_vector").type == pa.list_(pa.float32(), tiny.d_model)
    for d, p, prefix in zip(table["doc_id"].to_pylist(), table["position"].to_pylist(),
                            table["text_prefix"].to_pylist()):
        assert prefix and docs[d].text.startswith(prefix)  # prefix up to and including p
        assert prefix == tiny.tokenizer.decode(ids[d][:p + 1], skip_special_tokens=True)


def test_extractor_loads_only_k_plus_1_layers(qwen):
    ex = ActivationExtractor(qwen.path, 1)
    assert ex.num_loaded_layers == 2 and ex.backbone.config.num_hidden_layers == 2
    assert qwen.model.config.num_hidden_layers == 4
    with pytest.raises(ExtractionError, match=r"0 ≤ K < 4.*K=4"):
        ActivationExtractor(qwen.path, 4)


def test_too_short_documents_counted(qwen):
    ex = ActivationExtractor(qwen.path, 1, min_pos=10)
    table, stats = ex.extract([Document(0, "a"), Document(1, " ".join(["cat"] * 30))])
    assert stats.too_short == 1 and stats.documents == 2 and set(table["doc_id"].to_pylist()) == {1}


def test_rerun_is_byte_identical(qwen, tmp_path):
    docs = _docs(20, lo=5, hi=50)
    for name in ("a", "b"):
        ex = ActivationExtractor(qwen.path, 2, min_pos=3, batch_size=4, text_prefix=True)
        stats = ex.extract_to(docs, tmp_path / name / "base.parquet", dataset_id="t", corpus="c",
                              docs_per_shard=7)
    a, b = (tmp_path / n / "base.parquet" for n in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    meta = pq.ParquetFile(a).metadata
    assert meta.num_row_groups == 3 and meta.num_rows == stats.rows
    assert "parquet-cpp-arrow" in meta.created_by  # a version string only, no timestamp
    sc = read_dataset_sidecar(a)
    assert sc.row_count == stats.rows and sc.layer_index == 2 and sc.d_model == qwen.d_model
    assert sc.extras["stats"]["rows"] == stats.rows


def test_nonfinite_rows_rejected_and_counted(qwen, monkeypatch):
    original = ActivationExtractor._hidden

    def poisoned(self, ids, mask):
        h = original(self, ids, mask).clone()
        h[0, -1, 3] = float("nan")  # the longest doc's last kept position
        h[1, -1, 0] = float("inf")
        return h

    monkeypatch.setattr(ActivationExtractor, "_hidden", poisoned)
    ex = ActivationExtractor(qwen.path, 1, min_pos=2, batch_size=8, positions_per_doc=3, text_prefix=True)
    table, stats = ex.extract(_docs(5, lo=10, hi=30))
    assert stats.nonfinite_rows == 2 and stats.rows == table.num_rows
    assert table.num_rows == len(table["text_prefix"]) and table.num_rows > 0
    assert np.isfinite(table["activation_vector"].combine_chunks().flatten().to_numpy()).all()


# ------------------------------------------------------------------------------------ storage
def _table(n=50, d=16, seed=0, **extra):
    vec = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return activations_table(np.arange(n) // 3, np.arange(n) % 7 + 50, 5, vec, **extra), vec


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_read_activations_contiguous_float32(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(store, "ROW_GROUP_BYTES", 16 * 4 * 8)  # 8 rows per row group
    monkeypatch.setattr(store, "READ_BATCH_BYTES", 16 * 4 * 3)  # decoded 3 rows at a time
    table, vec = _table(text_prefix=[f"t{i}" for i in range(50)])
    path = write_table_atomic(table, tmp_path / f"x{suffix}")
    for mm in (True, False):
        out = read_activations(path, memory_map=mm)
        assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == (50, 16)
        np.testing.assert_array_equal(out, vec)
    if suffix == ".parquet":
        assert pq.ParquetFile(path).metadata.num_row_groups == 7
    else:
        assert not read_activations(path).flags.owndata  # zero-copy view of the map
    rows = read_rows(path)
    assert rows.column_names == ["doc_id", "position", "layer", "text_prefix"]
    assert read_rows(path, ["position"])["position"].to_pylist()[:2] == [50, 51]
    with pytest.raises(StoreError, match="no column"):
        read_rows(path, ["nope"])
    assert list(tmp_path.iterdir()) == [path]  # no temp files left


def test_writing_is_deterministic(tmp_path):
    table, _ = _table()
    a = write_table_atomic(table, tmp_path / "a.parquet")
    b = write_table_atomic(table, tmp_path / "b.parquet")
    assert a.read_bytes() == b.read_bytes()


def test_append_checks_d_model(tmp_path):
    path = tmp_path / "s.parquet"
    t16, v16 = _table(d=16)
    write_table_atomic(t16, path)
    with ActivationWriter(path, 16, append=True) as w:
        w.write(_table(n=5, d=16, seed=1)[0])
    assert read_activations(path).shape == (55, 16)
    np.testing.assert_array_equal(read_activations(path)[:50], v16)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="d=8 vectors, expected d_model=16"):
        with ActivationWriter(path, 16, append=True) as w:
            w.write(_table(d=8)[0])
    with pytest.raises(StoreError, match="d=16 vectors, expected d_model=8"):
        ActivationWriter(path, 8, append=True)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1
    write_dataset_sidecar(path, DatasetSidecar("s", "base", 55, "m", 32, 5, "c", 10))
    with pytest.raises(StoreError, match="d_model=32"):
        ActivationWriter(path, 16, append=True)


def test_extract_to_append_validates_sidecar(qwen, tmp_path):
    path = tmp_path / "base.parquet"
    ex = ActivationExtractor(qwen.path, 1, min_pos=2)
    first = ex.extract_to(_docs(4), path, dataset_id="t", corpus="c")
    ex.extract_to(_docs(3, seed=5), path, dataset_id="t", corpus="c", append=True)
    assert read_dataset_sidecar(path).extras["stats"]["documents"] == 7
    assert read_activations(path).shape[0] == read_dataset_sidecar(path).row_count > first.rows
    with pytest.raises(ExtractionError, match="layer"):
        ActivationExtractor(qwen.path, 2, min_pos=2).extract_to(_docs(2), path, dataset_id="t",
                                                               corpus="c", append=True)


# ------------------------------------------------------------------------------------ splits
def test_split_documents_properties():
    fractions = {"av_sft": 0.25, "ar_sft": 0.25, "rl": 0.4, "eval": 0.1}
    ids = range(10_000)
    a = split_documents(ids, fractions, seed=1)
    assert a == split_documents(reversed(ids), fractions, seed=1)  # order-independent
    assert list(a) == list(SPLIT_ORDER)
    assert sum(len(s) for s in a.values()) == 10_000 == len(set().union(*a.values()))
    for name, f in fractions.items():
        assert abs(len(a[name]) / 10_000 - f) < 0.02
    b = split_documents(ids, fractions, seed=2)
    assert a["rl"] != b["rl"]
    sub = split_documents(range(5000), fractions, seed=1)  # adding docs never moves old ones
    assert all(sub[s] == {i for i in a[s] if i < 5000} for s in fractions)
    partial = split_documents(ids, {"rl": 0.5}, seed=1)
    assert abs(len(partial["rl"]) / 10_000 - 0.5) < 0.02
    with pytest.raises(ConfigError, match="at most 1"):
        split_documents(ids, {"rl": 0.8, "eval": 0.3}, seed=0)
    with pytest.raises(ConfigError, match="unknown split"):
        split_documents(ids, {"train": 0.5}, seed=0)


def test_split_table_by_document():
    table, _ = _table(n=300)
    doc_ids = set(table["doc_id"].to_pylist())
    parts = split_table(table, split_documents(doc_ids, {"av_sft": 0.5, "rl": 0.5}, seed=0))
    assert sum(t.num_rows for t in parts.values()) == 300
    seen = [set(t["doc_id"].to_pylist()) for t in parts.values()]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == doc_ids
    with pytest.raises(ConfigError, match="both"):
        split_table(table, {"av_sft": {1, 2}, "rl": {2}})


def test_stale_shards_are_not_reused(qwen, tmp_path):
    """A rerun with the same spec reuses finished shards; another spec (or corpus) re-extracts."""
    from actors.datagen import ExtractionSpec, run_extraction, shard_path

    docs = [Document(i, " ".join(["cat", "dog"][i % 2:] * (8 + i))) for i in range(6)]
    spec = ExtractionSpec(str(qwen.path), 1, positions_per_doc=1, min_pos=2, max_tokens=64, seed=0)
    shards = tmp_path / "shards"
    run_extraction(spec, docs, shards, docs_per_shard=3, num_workers=0, progress=False)
    first = shard_path(shards, 0)
    stamp = first.stat().st_mtime_ns
    run_extraction(spec, docs, shards, docs_per_shard=3, num_workers=0, progress=False)
    assert first.stat().st_mtime_ns == stamp  # reused
    last = ExtractionSpec(**{**spec.__dict__, "positions": "last"})
    run_extraction(last, docs, shards, docs_per_shard=3, num_workers=0, progress=False)
    lengths = [len(ids) for ids in qwen.tokenizer([d.text for d in docs[:3]])["input_ids"]]
    assert pq.read_table(first)["position"].to_pylist() == [n - 1 for n in lengths]
    stamp = first.stat().st_mtime_ns
    edited = [Document(0, "bird " * 12), *docs[1:]]
    run_extraction(last, edited, shards, docs_per_shard=3, num_workers=0, progress=False)
    assert first.stat().st_mtime_ns != stamp and shard_path(shards, 1).exists()
