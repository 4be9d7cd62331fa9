"""Evaluation metrics of a trained AV/AR pair on held-out activations (pure functions).

Everything a report needs from one round trip ``ĥ = AR(AV(h))``:

* ``fve`` (the paper's definition, :func:`nla_rl.metrics.fve`), mean ``cosine``, mean normalised
  ``mse`` (2 = orthogonal at ``s = √d``);
* ``gap`` and ``top1`` against hard negatives mined *within the evaluated rows*, rows of the same
  document excluded (same-document neighbours are near-duplicates); ``top1_centred``, the same with
  unit vectors centred on the evaluated rows' unit mean: raw cosine is dominated by the direction all
  activations share, so an ĥ pulled toward the mean is nearest to the most central negatives;
* ``extraction_failure_rate`` and ``cjk_rate`` (the signature of a lost injection);
* the **prefix curve**: FVE when the AR reads only the first n tokens of each explanation. How fast
  it rises says whether the information sits up front or is spread through the text;
* toy-world attribute ``recall``/``precision`` when the split knows the true attributes.

The model calls are the caller's (:class:`nla_rl.inference.NLA`); here only numbers are computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from nla_rl.data.negatives import mine_hard_negatives
from nla_rl.data.toyworld import score_explanations
from nla_rl.errors import NLAError
from nla_rl.health import cjk_rate
from nla_rl.metrics import cosine, fve, hard_negative_gap, top1_retrieval
from nla_rl.reward_basis import fit_reward_basis
from nla_rl.rewards import normalized_mse

EVAL_NEGATIVES = 8  # hard negatives per row (the LoRA release mines 20 and draws 3)


def eval_negatives(vectors: np.ndarray, doc_ids: np.ndarray, top_k: int = EVAL_NEGATIVES
                   ) -> np.ndarray | None:
    """Indices [n, m] of each row's m nearest other rows by cosine (other documents only), with
    ``m = min(top_k, the fewest candidates any row has)``; ``None`` when some row has none."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    if len(vectors) < 2:
        return None
    _, counts = np.unique(doc_ids, return_counts=True)
    k = min(top_k, len(vectors) - int(counts.max()))
    if k < 1:
        return None
    neighbors, _ = mine_hard_negatives(vectors, doc_ids, top_k=k, exclude_same_doc=True)
    return neighbors.astype(np.int64)


def round_trip_metrics(pred: torch.Tensor, gold: torch.Tensor, *, mse_scale: float | None,
                       texts: Sequence[str], explanations: Sequence[str | None],
                       negatives: np.ndarray | None = None) -> dict[str, float]:
    """The headline numbers of one round trip (keys without a group prefix; NaN = undefined)."""
    gold = gold.float()
    out = {
        "fve": fve(pred, gold, mse_scale),  # NaN for fewer than two rows (no variance)
        "cosine": float(cosine(pred, gold).mean()),
        "mse": float(normalized_mse(pred, gold, mse_scale).mean()),
        "extraction_failure_rate": sum(e is None for e in explanations) / max(len(explanations), 1),
        "cjk_rate": cjk_rate(list(texts)),
        "gap": math.nan, "top1": math.nan, "top1_centred": math.nan,
    }
    if negatives is not None:
        index = torch.from_numpy(np.asarray(negatives))
        neg = gold[index]  # [n, m, d]
        out["gap"] = hard_negative_gap(pred, gold, neg)
        out["top1"] = top1_retrieval(pred, gold, neg)
        # the centre basis fitted on the evaluated rows (their unit mean: no per-row information)
        centre = fit_reward_basis(gold, "centre")
        centred_gold = centre.apply(gold)
        out["top1_centred"] = top1_retrieval(centre.apply(pred), centred_gold, centred_gold[index])
    return out


def toy_metrics(explanations: Sequence[str | None], attributes: Iterable[Iterable[str]]) -> dict[str, float]:
    """Toy-world attribute recall and precision of the explanations (NaN where undefined), and
    the same for the slots named whatever their value."""
    scores = score_explanations(list(explanations), [list(a or ()) for a in attributes])
    return {"toy_recall": scores.recall, "toy_precision": scores.precision,
            "toy_slot_recall": scores.slot_recall, "toy_slot_precision": scores.slot_precision}


def prefix_lengths(max_tokens: int, steps: int = 6) -> list[int]:
    """Token counts for the prefix curve: 0, then about ``steps`` roughly geometric steps ending
    at ``max_tokens`` (the full explanations)."""
    if max_tokens < 1:
        return [0]
    points = np.unique(np.round(np.geomspace(1, max_tokens, num=max(steps, 1))).astype(int))
    return [0, *[int(p) for p in points if p < max_tokens], int(max_tokens)]


def prefix_texts(tokenizer, explanations: Sequence[str | None], n_tokens: int) -> list[str]:
    """The first ``n_tokens`` tokens of each explanation, decoded (None reads as "")."""
    out = []
    for text in explanations:
        ids = tokenizer.encode(text or "", add_special_tokens=False)
        out.append(tokenizer.decode(ids[:n_tokens], skip_special_tokens=True))
    return out


def prefix_curve(reconstruct: Callable[[list[str]], torch.Tensor], tokenizer,
                 explanations: Sequence[str | None], gold: torch.Tensor, *,
                 mse_scale: float | None, steps: int = 6) -> list[dict[str, float]]:
    """``[{"tokens": n, "fve": …, "cosine": …}]``: the AR's FVE reading only the first n tokens of
    each explanation, for n from 0 (the empty explanation) to the longest explanation."""
    if len(explanations) != len(gold):
        raise NLAError(f"prefix_curve: {len(explanations)} explanations for {len(gold)} vectors")
    longest = max((len(tokenizer.encode(e or "", add_special_tokens=False)) for e in explanations),
                  default=0)
    curve = []
    for n in prefix_lengths(longest, steps):
        pred = reconstruct(prefix_texts(tokenizer, explanations, n))
        curve.append({"tokens": n, "fve": fve(pred, gold, mse_scale),
                      "cosine": float(cosine(pred, gold).mean())})
    return curve


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A permutation of ``range(n)`` with no fixed point (the shuffled control: every row gets
    another row's vector). Identity for n < 2."""
    if n < 2:
        return np.arange(n)
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)  # one random n-cycle: row order[k] gets row order[k + 1]
    return perm
