"""The toy world: corpus, ground truth per position, partial teacher, scorer and the toy base LM."""

import json
import math
import os
import random
from collections import Counter

import numpy as np
import pytest

from nla_rl.data import toy_lm
from nla_rl.data.build import toyworld_documents
from nla_rl.data.toy_lm import (build_toy_tokenizer, last_token_activations, linear_probe_accuracy,
                                train_toy_lm)
from nla_rl.data.toyworld import (SLOTS, ToyWorld, attributes_at, attributes_by_position,
                                  full_explanation, parse_attributes, score_explanation,
                                  score_explanations, score_slots, teacher_rng,
                                  toy_teacher_explanation, toy_tokenizer_texts)
from nla_rl.testing.tiny import TINY_MARKER_CHAR, build_tiny_tokenizer

TRUTH = frozenset({"subject=cat", "colour=red", "place=forest", "mood=happy"})
# Short training that still reaches the loss floor's neighbourhood (≈15 s on one thread).
PROBE_LM = dict(seed=0, steps=150, batch_size=16, lr=2e-3)


@pytest.fixture(scope="module")
def toy_tok(tmp_path_factory):
    return build_toy_tokenizer(tmp_path_factory.mktemp("toy_tok"))


@pytest.fixture(scope="module")
def toy_lm_dir(tmp_path_factory):
    return train_toy_lm(tmp_path_factory.mktemp("lm") / "base", progress=False, **PROBE_LM)


def test_corpus_is_deterministic_and_random_access():
    a, b = ToyWorld(3).documents(30), ToyWorld(3).documents(30)
    assert [d.text for d in a] == [d.text for d in b] and [d.attributes for d in a] == [
        d.attributes for d in b]
    assert ToyWorld(3).document(17) == a[17]
    assert ToyWorld(3).documents(5, start=10) == a[10:15]
    assert [d.text for d in ToyWorld(4).documents(30)] != [d.text for d in a]
    assert len({d.text for d in ToyWorld(0).documents(2000)}) == 2000  # no memorisable repeats


def test_documents_mention_exactly_their_attributes(toy_tok):
    docs = ToyWorld(1).documents(1000)
    for d in docs:
        assert parse_attributes(d.text) == d.attribute_set
        assert d.attributes["subject"] in SLOTS["subject"] and d.text.endswith("The end.")
    sizes = Counter(len(d.attributes) for d in docs)
    assert set(sizes) >= {3, 4, 5, 6}
    lengths = [len(toy_tok(d.text)["input_ids"]) for d in ToyWorld(1, ending="recap").documents(1000)]
    assert 30 <= np.median(lengths) <= 60 and max(lengths) <= 96


def test_recap_lists_the_revealed_values_after_the_readout(toy_tok):
    """v2: the readout (the cue's last token) precedes a recap of every revealed value in a
    random order, so the LM must hold them all there; the readout sees every attribute."""
    docs = ToyWorld(2, ending="recap").documents(400)
    orders = set()
    for d in docs:
        head, recap = d.text.split(" In short: ")
        named = recap.rstrip(".").split(", ")
        assert sorted(named) == sorted(d.attributes.values()) and head.endswith("The end.")
        orders.add(tuple(named))
        ids = toy_tok(d.text)["input_ids"]
        readout = len(toy_tok(d.readout_text)["input_ids"]) - 1
        assert ids[: readout + 1] == toy_tok(d.readout_text)["input_ids"]
        assert attributes_by_position(toy_tok, d)[readout] == d.attribute_set
    assert len(orders) > 300  # random order: the next token at the readout is any value
    v1 = ToyWorld(2, ending="end").documents(50)
    assert all(a.text == b.text.split(" In short:")[0] and a.readout_text == a.text
               for a, b in zip(v1, docs))  # the same stories; v1 ends at "The end."
    with pytest.raises(ValueError, match="ending"):
        ToyWorld(0, ending="recapitulate")


def test_value_words_are_single_tokens_and_marker_intact(toy_tok):
    for value in (v for vals in SLOTS.values() for v in vals):
        assert len(toy_tok.encode(" " + value, add_special_tokens=False)) == 1, value
    ids = toy_tok.encode(f"<concept>{TINY_MARKER_CHAR}</concept>", add_special_tokens=False)
    pieces = [toy_tok.decode([i]) for i in ids]
    assert TINY_MARKER_CHAR in pieces and pieces[pieces.index(TINY_MARKER_CHAR) - 1] == ">"
    assert len(toy_tok.encode(TINY_MARKER_CHAR, add_special_tokens=False)) == 1


def test_attributes_grow_monotonically_and_match_text(toy_tok):
    for doc in ToyWorld(2).documents(60):
        sets = attributes_by_position(toy_tok, doc)
        offsets = toy_tok(doc.text, return_offsets_mapping=True)["offset_mapping"]
        assert len(sets) == len(offsets) and sets[-1] == doc.attribute_set
        assert all(a <= b for a, b in zip(sets, sets[1:]))
        for pos, ((_, end), got) in enumerate(zip(offsets, sets)):
            assert got == parse_attributes(doc.text[:end])
        grown = [i for i in range(1, len(sets)) if sets[i] != sets[i - 1]]
        assert sets[0] == frozenset() and len(grown) == len(doc.attributes)  # one per value token
        assert attributes_at(toy_tok, doc, len(sets) // 2) == sets[len(sets) // 2]


def test_bos_position_sees_nothing(tmp_path):
    tok = build_tiny_tokenizer("llama", tmp_path, vocab_size=1024, texts=toy_tokenizer_texts())
    doc = ToyWorld(0).document(0)
    sets = attributes_by_position(tok, doc)
    assert tok(doc.text)["input_ids"][0] == tok.bos_token_id
    assert sets[0] == frozenset() and sets[1] == frozenset() and sets[-1] == doc.attribute_set


def test_teacher_is_deterministic_per_row():
    one = toy_teacher_explanation(TRUTH, teacher_rng(0, 5, 17), p_include=0.9)
    assert one == toy_teacher_explanation(TRUTH, teacher_rng(0, 5, 17), p_include=0.9)
    many = {toy_teacher_explanation(TRUTH, teacher_rng(0, 5, p), p_include=0.9) for p in range(40)}
    assert len(many) > 10


def test_teacher_is_partial_unordered_and_rarely_wrong():
    world = ToyWorld(0)
    mentioned = wrong = refused = 0
    sizes, first_slots, pair_orders = Counter(), Counter(), set()
    for i, doc in enumerate(world.documents(3000)):
        truth = doc.attribute_set
        text = toy_teacher_explanation(truth, random.Random(i), p_include=0.4, p_wrong=0.05)
        if text is None:
            refused += 1
            continue
        named = parse_attributes(text)
        mentioned += len(named)
        wrong += len(named - truth)
        assert {a.split("=")[0] for a in named} <= {a.split("=")[0] for a in truth}
        sizes[len(named)] += 1
        slots = [a.split("=")[0] for a in _in_text_order(text)]
        first_slots[slots[0]] += 1
        pair_orders.update(zip(slots, slots[1:]))
    assert abs(wrong / mentioned - 0.05) < 0.015
    assert len(sizes) >= 4 and sizes[1] > 0 and sizes[3] > 0  # variable length
    assert len(first_slots) == len(SLOTS)  # no fixed slot order
    assert ("colour", "place") in pair_orders and ("place", "colour") in pair_orders
    assert 0.02 < refused / 3000 < 0.2  # ≈ E[0.6^n] over n ≈ 4.5 attributes


def test_teacher_refusal_rule_and_exact_rows():
    assert toy_teacher_explanation(frozenset(), random.Random(0)) is None
    assert toy_teacher_explanation(TRUTH, random.Random(0), p_include=0.0) is None
    text = toy_teacher_explanation(TRUTH, random.Random(0), p_include=1.0, p_wrong=0.0)
    assert parse_attributes(text) == TRUTH
    assert all(parse_attributes(toy_teacher_explanation(TRUTH, random.Random(s), p_include=1.0,
                                                        p_wrong=1.0)).isdisjoint(TRUTH)
               for s in range(20))
    assert parse_attributes(full_explanation(TRUTH)) == TRUTH


def test_scorer_on_constructed_explanations():
    assert score_explanation("A red cat in the forest.", TRUTH) == (0.75, 1.0)
    assert score_explanation("The cat is BLUE and happy.", TRUTH) == (0.5, 2 / 3)
    assert score_explanation("A red cat, a red cat.", TRUTH) == (0.5, 1.0)  # repeats count once
    assert score_explanation("Bored cats scattered.", TRUTH)[0] == 0  # whole words only
    recall, precision = score_explanation("Nothing here.", TRUTH)
    assert recall == 0 and math.isnan(precision)
    assert math.isnan(score_explanation("cat", frozenset())[0])
    scores = score_explanations(["red cat", None, "blue"], [TRUTH, TRUTH, TRUTH])
    assert scores.recall == pytest.approx((0.5 + 0 + 0) / 3)
    assert scores.precision == pytest.approx(0.5)  # (1 + 0) / 2: the None row is excluded
    assert (scores.n, scores.n_no_mention) == (3, 1)
    # Slots regardless of value: "blue" names the colour slot (wrong value, right slot).
    # Optional slots regardless of value ("blue" names the colour slot with a wrong value); the
    # subject, which every document reveals, is not scored.
    assert score_slots("The cat is BLUE and happy.", TRUTH) == (2 / 3, 1.0)
    assert score_slots("A black dog at night.", TRUTH) == (1 / 3, 0.5)  # time was not revealed
    assert math.isnan(score_slots("A dog.", TRUTH)[1])  # names only the subject: no claim
    assert scores.slot_recall == pytest.approx((1 / 3 + 0 + 1 / 3) / 3)
    assert scores.slot_precision == pytest.approx(1.0)
    with pytest.raises(ValueError):
        score_explanations(["x"], [])


def test_teacher_round_trip_has_precision_one(toy_tok):
    world = ToyWorld(5)
    texts, truths = [], []
    for doc in world.documents(200):
        pos = len(toy_tok(doc.text)["input_ids"]) * 2 // 3
        truth = attributes_at(toy_tok, doc, pos)
        texts.append(toy_teacher_explanation(truth, teacher_rng(5, doc.doc_id, pos), p_wrong=0.0))
        truths.append(truth)
    kept = [(t, a) for t, a in zip(texts, truths) if t is not None]
    scores = score_explanations(*zip(*kept))
    assert scores.precision == 1.0 and 0.3 < scores.recall < 0.55 and scores.n_no_mention == 0


def test_toy_lm_trains_and_caches(toy_lm_dir, monkeypatch):
    meta = json.loads((toy_lm_dir / "toy_lm.json").read_text())
    curve = meta["loss_curve"]
    assert len(curve) == PROBE_LM["steps"] and curve[0] > 6 and meta["final_loss"] < 1.2
    assert meta["final_loss"] < meta["entropy_floor_nats"] + 0.35
    assert (toy_lm_dir / "model.safetensors").is_file()
    assert (toy_lm_dir / "tokenizer.json").is_file()
    assert not [p for p in toy_lm_dir.parent.iterdir() if p.name.startswith(".")]  # no temp left
    mtime = os.path.getmtime(toy_lm_dir / "model.safetensors")
    monkeypatch.setattr(toy_lm, "_train", lambda *a, **k: pytest.fail("retrained a cached LM"))
    assert train_toy_lm(toy_lm_dir, progress=False, **PROBE_LM) == toy_lm_dir
    assert os.path.getmtime(toy_lm_dir / "model.safetensors") == mtime
    with pytest.raises(ValueError, match=r"other settings \(steps\)"):
        train_toy_lm(toy_lm_dir, progress=False, **{**PROBE_LM, "steps": 151})
    with pytest.raises(ValueError, match=r"other settings \(p_slot, world\)"):  # another corpus
        train_toy_lm(toy_lm_dir, progress=False, **{**PROBE_LM, "p_slot": 0.9})
    # An LM cached from an older toy world (other corpus or tokenizer texts) is not reused.
    monkeypatch.setattr(toy_lm, "world_fingerprint", lambda *args, **kwargs: "an-older-world")
    with pytest.raises(ValueError, match="the toy world .* changed"):
        train_toy_lm(toy_lm_dir, progress=False, **PROBE_LM)


def test_p_slot_sets_how_many_slots_a_document_reveals():
    """``toyworld.p_slot`` reaches the documents datagen reads and the teacher labels."""
    def mean_slots(p_slot):
        return np.mean([len(d.attributes) for d in ToyWorld(0, p_slot=p_slot).documents(400)])

    assert mean_slots(1.0) == 6 and 4.2 < mean_slots(0.7) < 4.8 and mean_slots(0.9) > 5.3
    docs = toyworld_documents(0, 50, "recap", p_slot=1.0)
    world = ToyWorld(0, ending="recap", p_slot=1.0)
    assert [d.text for d in docs] == [d.readout_text for d in world.documents(50)]
    assert [d.text for d in docs] != [d.text for d in toyworld_documents(0, 50, "recap")]


def test_toy_lm_write_is_atomic(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(toy_lm, "_write_meta", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        train_toy_lm(tmp_path / "lm", steps=2, hidden=64, heads=2, layers=1, batch_size=2,
                     progress=False)
    assert list(tmp_path.iterdir()) == []  # neither a half-written lm/ nor a temp dir
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        train_toy_lm(tmp_path / "busy", steps=2, progress=False)


def test_block2_activations_encode_the_subject(toy_lm_dir):
    """Linear probe (ridge, centred) on block-2 output at the last token of held-out docs.

    Note: an untrained model passes this too (attention averages the word embeddings); the point
    is that the *trained* LM's readout position still carries the attributes.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(toy_lm_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(toy_lm_dir)
    docs = ToyWorld(123).documents(2000)  # ids and seed unseen in training
    x = last_token_activations(model, tok, [d.text for d in docs], layer=2)
    y = [d.attributes["subject"] for d in docs]
    acc = linear_probe_accuracy(x[:1500], y[:1500], x[1500:], y[1500:], l2=0.1)
    shuffled = linear_probe_accuracy(x[:1500], y[:1500][::-1], x[1500:], y[1500:], l2=0.1)
    # chance 1/8; seeds 0-3 of this setting gave 0.61-0.82, the label-shuffled control ≈ chance
    assert acc >= 0.45 and shuffled < 0.25, (acc, shuffled)


def _in_text_order(text):
    from nla_rl.data.toyworld import attribute_mentions

    return [a for _, a in attribute_mentions(text)]


def test_the_ar_split_can_have_its_own_fuller_teacher(tmp_path):
    """``toyworld.ar_p_include``: datagen re-explains only the AR-SFT split, from the rows' own
    ground truth, by a teacher naming each attribute with that probability; the parquet and its
    sidecar stay consistent and say which teacher wrote it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from launch.datagen import _relabel_ar_split
    from nla_rl.config import load_recipe
    from nla_rl.data.build import relabel_with_toy_teacher
    from nla_rl.data.store import activations_table, write_table_atomic
    from nla_rl.sidecar import DatasetSidecar, read_dataset_sidecar, write_dataset_sidecar
    from tests.unit.test_config import TINY_RECIPE

    world = ToyWorld(0)
    truths = [sorted(doc.attribute_set) for doc in world.documents(200)]
    partial = [toy_teacher_explanation(t, teacher_rng(0, i, 3), p_include=0.6, min_mentions=0)
               for i, t in enumerate(truths)]
    vectors = np.zeros((len(truths), 4), np.float32)
    for split in ("ar_sft", "av_sft"):
        path = tmp_path / f"{split}.parquet"
        table = activations_table(range(len(truths)), [3] * len(truths), 2, vectors,
                                  explanation=partial)
        write_table_atomic(table.append_column("attributes", pa.array(truths)), path)
        write_dataset_sidecar(path, DatasetSidecar("t", "base", len(truths), "toy", 4, 2, "toy", 1,
                                                   api_summaries={"p_include": 0.6}))
    before = pq.read_table(tmp_path / "av_sft.parquet")

    cfg = load_recipe(TINY_RECIPE, ["toyworld.ar_p_include=1.0", "toyworld.p_wrong=0.0"])
    counts = _relabel_ar_split(cfg, tmp_path, {"ar_sft": len(truths), "av_sft": len(truths)})
    assert counts == {"ar_sft": len(truths), "av_sft": len(truths)}  # p 1: no row refused
    relabelled = pq.read_table(tmp_path / "ar_sft.parquet")
    assert [parse_attributes(e) for e in relabelled["explanation"].to_pylist()] == \
        [frozenset(t) for t in truths]  # every true attribute, none wrong (p_wrong 0)
    assert sum(len(parse_attributes(e)) for e in partial) < 0.8 * sum(map(len, truths))
    assert pq.read_table(tmp_path / "av_sft.parquet").equals(before)  # the AV's split untouched
    meta = read_dataset_sidecar(tmp_path / "ar_sft.parquet")
    assert meta.api_summaries["p_include"] == 1.0 and meta.api_summaries["role"] == "ar"

    kept = relabel_with_toy_teacher(tmp_path / "ar_sft.parquet", seed=0, p_include=0.1,
                                    p_wrong=0.05)  # a sparse teacher refuses rows: dropped
    assert kept < len(truths) == len(partial)
    assert read_dataset_sidecar(tmp_path / "ar_sft.parquet").row_count == kept == \
        pq.read_table(tmp_path / "ar_sft.parquet").num_rows
    # off (null) or equal to the AV's teacher: nothing rewritten
    assert _relabel_ar_split(load_recipe(TINY_RECIPE, ["toyworld.ar_p_include=null"]), tmp_path,
                             {"ar_sft": kept}) == {"ar_sft": kept}
