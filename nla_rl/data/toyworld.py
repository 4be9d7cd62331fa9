"""The toy world: a seeded corpus whose documents carry known latent attributes.

It is the embedded default data and the way to measure *faithfulness*: for every token position the
ground truth of what the text has revealed so far is known, so an explanation can be scored by
recall/precision of the attributes it names, next to FVE.

* Attributes are ``slot=value`` strings (``colour=red``). Every value word belongs to exactly one
  slot and appears nowhere else in the corpus, templates or teacher phrasings, so an attribute is
  parsed from *any* text by a whole-word, case-insensitive match of the value vocabulary.
* A document opens with its subject, then reveals each other slot with probability ``p_slot``
  (one sentence each, random order, 1–3 filler sentences mixed in) and always ends with the fixed
  sentence "The end." (≈25–55 tiny-BPE tokens). The attributes at a token position are those whose
  first mention ends at or before the end of that token.
* What a trained toy LM's activations encode (ridge probes, block 2 of 4, 300 steps): at the
  fixed-context final token every revealed slot is readable well above chance (subject ≈1.0, the
  others ≈0.45–0.9); at arbitrary positions mostly the subject is — the LM keeps only what
  predicts the next token, and the local context dominates. Prefer the final token (or few,
  fixed-context positions) as NLA positions when recall should be achievable.
* The teacher is deliberately partial (like an LLM teacher): each true attribute is named with
  probability ``p_include`` in a random order and is rarely given a wrong value (``p_wrong``). Rows
  where it names nothing are refusals: ``None``, to be dropped and counted.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

SLOTS: dict[str, tuple[str, ...]] = {
    "subject": ("cat", "dog", "fox", "owl", "horse", "rabbit", "bear", "frog"),
    "colour": ("red", "blue", "green", "yellow", "white", "black"),
    "place": ("forest", "river", "city", "garden", "mountain", "beach", "village", "desert"),
    "quantity": ("two", "three", "four", "five", "six", "seven"),
    "mood": ("happy", "sad", "calm", "angry", "sleepy", "curious"),
    "time": ("morning", "afternoon", "evening", "night"),
}
VALUE_SLOT: dict[str, str] = {v: s for s, vals in SLOTS.items() for v in vals}
assert len(VALUE_SLOT) == sum(map(len, SLOTS.values())), "a value word belongs to two slots"
_VALUE_RE = re.compile(r"\b(" + "|".join(sorted(VALUE_SLOT, key=len, reverse=True)) + r")\b",
                       re.IGNORECASE)

# Corpus sentences. ``{s}`` is the subject word, ``{v}`` the slot's value.
_OPENINGS = ("Once there was {a} {s}.", "Once upon a time there lived {a} {s}.")
_COLOUR_OPENING = "Once there was {a} {v} {s}."
_BODY: dict[str, tuple[str, ...]] = {
    "colour": ("The {s} was {v}.", "Its coat was {v}.", "Everyone knew the {v} {s}."),
    "place": ("The {s} lived in the {v}.", "Its home was near the {v}.", "It walked to the {v}."),
    "quantity": ("It had {v} friends.", "The {s} found {v} stones.", "It saw {v} birds."),
    "mood": ("It felt {v}.", "The {s} was {v} that day.", "Everyone said it looked {v}."),
    "time": ("It liked the {v} best.", "Each {v} it went out.", "The story happens in the {v}."),
}
_FILLERS = ("It was a quiet day.", "Nobody knew why.", "The wind was soft.", "Then it rested.",
            "Nothing else happened.", "The sky was clear.", "The path was long.",
            "A bell rang far away.")
_CLOSING = "The end."  # a fixed last sentence: the final token is a fixed-context readout
# The recap (toy world v2): after the readout cue the document lists every revealed value in a
# random order, so the LM must hold *all* of them at the cue's last token (its next token is any
# one of them), as a real LM carries the content it will need next. The cue is the readout.
_RECAP_CUE = "In short:"
ENDINGS = ("recap", "end")

# Teacher phrasings: none contains a value word, and none fixes the slot order.
_TEACHER: dict[str, tuple[str, ...]] = {
    "subject": ("The subject is {a} {v}.", "The text is about {a} {v}.", "It describes {a} {v}."),
    "colour": ("It mentions the colour {v}.", "Something in it is {v}.", "The colour {v} appears."),
    "place": ("The scene is set in the {v}.", "It takes place in the {v}.",
              "The location is the {v}."),
    "quantity": ("The number {v} comes up.", "It counts {v} things.",
                 "A group of {v} is mentioned."),
    "mood": ("The mood is {v}.", "Someone feels {v}.", "The tone is {v}."),
    "time": ("It happens in the {v}.", "The time of day is {v}.", "It is set in the {v}."),
}


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def seeded_rng(*parts) -> random.Random:
    """A ``random.Random`` seeded from ``parts`` (stable across processes and hash seeds)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def teacher_rng(seed: int, doc_id: int, position: int) -> random.Random:
    """The teacher's RNG for one row, seeded from (seed, doc_id, position): reruns are identical."""
    return seeded_rng("teacher", seed, doc_id, position)


@dataclass(frozen=True)
class ToyDoc:
    """One document: its id, text, latent attributes (slot → value) and the natural log-probability
    mass of the generator's choices (``nats``; an upper bound on ``-log p(text)``)."""

    doc_id: int
    text: str
    attributes: dict[str, str] = field(hash=False)
    nats: float = 0.0
    readout_end: int | None = None  # chars up to the readout token; None = the whole text

    @property
    def readout_text(self) -> str:
        """The text up to and including the readout token (the whole text without a recap): a
        causal LM's activation at its last token is the readout, whatever follows it."""
        return self.text if self.readout_end is None else self.text[: self.readout_end]

    @property
    def attribute_set(self) -> frozenset[str]:
        return frozenset(f"{s}={v}" for s, v in self.attributes.items())


# Probability that a document reveals each slot other than its subject.
DEFAULT_P_SLOT = 0.7


class ToyWorld:
    """The seeded corpus generator. ``document(i)`` depends only on (seed, i).

    ``p_slot``: probability that each non-subject slot is revealed (so documents carry 1–6
    attributes, ≈4.5 on average). ``shuffle=False`` keeps the slot order fixed (subject, colour,
    place, quantity, mood, time; fillers still inserted at random) — a more regular variant whose
    ``nats`` over-count a little where fillers commute.

    ``ending``: ``recap`` (v2) closes with "The end. In short: v1, v2, …." — every
    revealed value in a random order — and the readout is the cue's last token, where the LM must
    hold every value (its next token is any of them); ``end`` (v1) closes with "The end." and the
    readout is that final token, where the LM keeps which slots were revealed but their values
    only weakly (values added ≈0.02 FVE over presence in a ridge fit).
    """

    def __init__(self, seed: int = 0, *, p_slot: float = DEFAULT_P_SLOT, shuffle: bool = True,
                 ending: str = "end"):
        if ending not in ENDINGS:
            raise ValueError(f"toy world ending: expected one of {', '.join(ENDINGS)}, "
                             f"found {ending!r}")
        self.seed, self.p_slot, self.shuffle, self.ending = seed, p_slot, shuffle, ending

    def document(self, doc_id: int) -> ToyDoc:
        """The document ``doc_id`` (random access; deterministic)."""
        rng = seeded_rng("doc", self.seed, doc_id)
        nats = 0.0

        def pick(options):
            nonlocal nats
            nats += math.log(len(options))
            return rng.choice(options)

        def coin(p):
            nonlocal nats
            hit = rng.random() < p
            nats -= math.log(p if hit else 1 - p)
            return hit

        slots = ["subject"] + [k for k in _BODY if coin(self.p_slot)]
        values = {k: pick(SLOTS[k]) for k in slots}
        s = values["subject"]
        colour_first = "colour" in slots and coin(0.25)  # colour revealed in the opening
        if colour_first:
            sentences = [_COLOUR_OPENING.format(a=_a(values["colour"]), v=values["colour"], s=s)]
        else:
            sentences = [pick(_OPENINGS).format(a=_a(s), s=s)]
        body = [pick(_BODY[k]).format(s=s, v=values[k])
                for k in slots[1:] if not (k == "colour" and colour_first)]
        n_fill = pick((1, 2, 3))
        fillers = rng.sample(_FILLERS, n_fill)
        nats += math.log(math.comb(len(_FILLERS), n_fill))
        if self.shuffle:
            body += fillers
            rng.shuffle(body)
            nats += math.lgamma(len(body) + 1)
        else:
            for f in fillers:
                body.insert(pick(range(len(body) + 1)), f)
        text = " ".join(sentences + body + [_CLOSING])
        if self.ending == "end":
            return ToyDoc(doc_id, text, values, nats)
        readout = f"{text} {_RECAP_CUE}"
        recap = list(values.values())
        rng.shuffle(recap)
        nats += math.lgamma(len(recap) + 1)
        return ToyDoc(doc_id, f"{readout} {', '.join(recap)}.", values, nats, len(readout))

    def documents(self, n: int, start: int = 0) -> list[ToyDoc]:
        """Documents ``start … start+n-1``."""
        return [self.document(i) for i in range(start, start + n)]


def parse_attributes(text: str | None) -> frozenset[str]:
    """Every ``slot=value`` named in ``text`` (whole-word, case-insensitive value match)."""
    if not text:
        return frozenset()
    return frozenset(f"{VALUE_SLOT[m.lower()]}={m.lower()}" for m in _VALUE_RE.findall(text))


def attribute_mentions(text: str) -> list[tuple[int, str]]:
    """``(end_char, "slot=value")`` of the first mention of each attribute, in text order."""
    seen, out = set(), []
    for m in _VALUE_RE.finditer(text):
        attr = f"{VALUE_SLOT[m.group(1).lower()]}={m.group(1).lower()}"
        if attr not in seen:
            seen.add(attr)
            out.append((m.end(), attr))
    return out


def attributes_by_position(tokenizer, doc: ToyDoc, *, add_special_tokens: bool = True
                           ) -> list[frozenset[str]]:
    """The ground-truth attribute set at every token position of ``tokenizer(doc.text)``.

    An attribute is revealed at the first token whose character span reaches the end of its value
    word (a value split over several tokens counts from its last piece). Special tokens (BOS) have
    the empty span ``(0, 0)`` and so see nothing before them.
    """
    enc = tokenizer(doc.text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    mentions = attribute_mentions(doc.text)
    out = []
    for _, end in enc["offset_mapping"]:
        out.append(frozenset(a for e, a in mentions if e <= end))
    # BOS (0, 0) after content is impossible; make the sets monotone against odd offset spans.
    for i in range(1, len(out)):
        out[i] = out[i] | out[i - 1]
    return out


def attributes_at(tokenizer, doc: ToyDoc, position: int, *, add_special_tokens: bool = True
                  ) -> frozenset[str]:
    """The attributes revealed up to and including token ``position`` (see
    :func:`attributes_by_position`)."""
    return attributes_by_position(tokenizer, doc, add_special_tokens=add_special_tokens)[position]


def toy_teacher_explanation(attributes: Iterable[str], rng: random.Random, p_include: float = 0.4,
                            p_wrong: float = 0.05, min_mentions: int = 1) -> str | None:
    """A partial natural-language explanation of ``attributes`` (``slot=value`` strings).

    Each true attribute is named independently with probability ``p_include`` (so the length
    varies), in a random order, each with one of a few phrasings; a named attribute gets a wrong
    value of its slot with probability ``p_wrong``. If fewer than ``min_mentions`` (default 1)
    attributes would be named, the teacher "refuses" and returns ``None``: drop and count the row.
    """
    chosen = [a for a in sorted(attributes) if rng.random() < p_include]
    if len(chosen) < min_mentions:
        return None
    rng.shuffle(chosen)
    parts = []
    for attr in chosen:
        slot, value = attr.split("=", 1)
        if rng.random() < p_wrong:
            value = rng.choice([v for v in SLOTS[slot] if v != value])
        parts.append(rng.choice(_TEACHER[slot]).format(a=_a(value), v=value))
    return " ".join(parts)


def full_explanation(attributes: Iterable[str], rng: random.Random | None = None) -> str:
    """An explanation naming every attribute (random order and phrasing) — the AR's upper bound."""
    rng = rng or random.Random(0)
    text = toy_teacher_explanation(attributes, rng, p_include=1.0, p_wrong=0.0, min_mentions=0)
    return text or ""


def score_explanation(text: str | None, true_attributes: Iterable[str]) -> tuple[float, float]:
    """``(recall, precision)`` of the attributes named in ``text`` against ``true_attributes``.

    recall = |named ∩ true| / |true| (NaN when ``true`` is empty); precision = |named ∩ true| /
    |named|, **NaN when nothing is named** (an empty or failed explanation makes no claim; it is
    already punished by recall 0, and batch means exclude NaN — see :func:`score_explanations`).
    """
    return _recall_precision(parse_attributes(text), frozenset(true_attributes))


def _recall_precision(named: frozenset, true: frozenset) -> tuple[float, float]:
    hits = len(named & true)
    return (hits / len(true) if true else math.nan, hits / len(named) if named else math.nan)


ALWAYS_REVEALED = frozenset({"subject"})  # every document opens with its subject


def score_slots(text: str | None, true_attributes: Iterable[str]) -> tuple[float, float]:
    """``(recall, precision)`` of the optional *slots* named in ``text`` (any value) against
    those of ``true_attributes``: whether an explanation says which facts the document revealed,
    apart from whether it gets their values right. The subject is left out: every document
    reveals it, so naming it says nothing about which facts this one revealed. NaN cases as in
    :func:`score_explanation`."""
    return _recall_precision(_optional_slots(parse_attributes(text)),
                             _optional_slots(true_attributes))


def _optional_slots(attributes: Iterable[str]) -> frozenset[str]:
    return frozenset(a.split("=", 1)[0] for a in attributes) - ALWAYS_REVEALED


@dataclass(frozen=True)
class ToyScores:
    """Batch means (NaN rows excluded) and the number of rows that named no attribute;
    ``slot_*`` score the optional slots named regardless of value (:func:`score_slots`)."""

    recall: float
    precision: float
    n: int
    n_no_mention: int
    slot_recall: float = math.nan
    slot_precision: float = math.nan


def score_explanations(texts: Sequence[str | None], truths: Sequence[Iterable[str]]) -> ToyScores:
    """Mean recall and precision over a batch; ``None`` texts (failed extraction) name nothing."""
    if len(texts) != len(truths):
        raise ValueError(f"{len(texts)} explanations but {len(truths)} attribute sets")
    named = [parse_attributes(t) for t in texts]  # each text parsed once
    truths = [frozenset(a) for a in truths]
    pairs = [_recall_precision(n, t) for n, t in zip(named, truths)]
    slot_pairs = [_recall_precision(_optional_slots(n), _optional_slots(t))
                  for n, t in zip(named, truths)]

    def nanmean(xs):
        xs = [x for x in xs if not math.isnan(x)]
        return sum(xs) / len(xs) if xs else math.nan

    return ToyScores(nanmean(r for r, _ in pairs), nanmean(p for _, p in pairs), len(pairs),
                     sum(1 for n in named if not n),
                     nanmean(r for r, _ in slot_pairs), nanmean(p for _, p in slot_pairs))


def toy_tokenizer_texts(seed: int = 0, n_docs: int = 400, ending: str = "end") -> list[str]:
    """Training lines for the toy BPE tokenizer: corpus samples, AV/AR templates (without the
    marker) and every teacher phrasing of every value, so all their words tokenise compactly."""
    from nla_rl.templates import (DEFAULT_AR_TEMPLATE, DEFAULT_AV_TEMPLATE, DEPTH_AV_TEMPLATE,
                                  av_sft_target)
    from nla_rl.testing.tiny import _QWEN_DEFAULT_SYSTEM

    world = ToyWorld(seed, ending=ending)
    lines = [d.text for d in world.documents(n_docs, start=2_000_000_000)]
    phrasings = [p.format(a=_a(v), v=v) for slot, ps in _TEACHER.items() for p in ps
                 for v in SLOTS[slot]]
    lines += phrasings * 3
    rng = seeded_rng("tokenizer-texts", seed)
    for _ in range(100):
        expl = " ".join(rng.sample(phrasings, rng.randint(1, 4)))
        lines += [av_sft_target(expl), DEFAULT_AR_TEMPLATE.format(explanation=expl)]
    pieces = [p for t in (DEFAULT_AV_TEMPLATE, DEPTH_AV_TEMPLATE)
              for p in t.split("{injection_char}")]
    lines += [p.replace("{depth_pct}", str(d)) for p in pieces for d in (12, 38, 62, 88)] * 5
    lines += [f"system\n{_QWEN_DEFAULT_SYSTEM}\nuser\n", "assistant\n"] * 20
    return lines
