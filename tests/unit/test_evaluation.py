"""Round-trip metrics of the eval report (nla_rl.evaluation): raw vs centred top-1."""

from __future__ import annotations

import numpy as np
import torch

from nla_rl.evaluation import eval_negatives, round_trip_metrics


def _round_trip(pred: torch.Tensor, gold: torch.Tensor, doc_ids: np.ndarray) -> dict:
    negatives = eval_negatives(gold.numpy(), doc_ids, top_k=4)
    return round_trip_metrics(pred, gold, mse_scale=gold.shape[1] ** 0.5, texts=[""] * len(gold),
                              explanations=["x"] * len(gold), negatives=negatives)


def test_centred_top1_sees_a_right_but_shrunk_deviation_that_raw_cosine_misses():
    """Rows ``μ + δ`` with ``|μ| ≫ |δ|``: ĥ = μ + 0.3δ (the right deviation, pulled toward the
    mean) loses, by raw cosine, to negatives nearer the mean, and wins once all are centred."""
    gen = torch.Generator().manual_seed(0)
    n, d = 64, 16
    radius = torch.linspace(0.05, 1.0, n)[:, None]  # some rows sit near the mean: hub negatives
    deviation = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1) * radius
    gold = 5.0 + deviation
    pred = 5.0 + 0.3 * deviation
    out = _round_trip(pred, gold, np.arange(n))
    assert out["top1_centred"] > 0.9 and out["top1"] < 0.5, out
    assert _round_trip(gold, gold, np.arange(n))["top1_centred"] == 1.0


def test_centred_top1_of_an_uninformative_prediction_is_near_zero():
    gen = torch.Generator().manual_seed(1)
    gold = 5.0 + torch.randn(64, 16, generator=gen)
    out = _round_trip(gold.mean(0).expand(64, 16) + 1e-3 * torch.randn(64, 16, generator=gen),
                      gold, np.arange(64))
    assert out["top1_centred"] < 0.35  # chance among 1 gold + 4 negatives is 0.2


def test_without_negatives_both_top1_are_nan():
    gold = torch.randn(4, 8)
    out = round_trip_metrics(gold, gold, mse_scale=None, texts=[""] * 4, explanations=["x"] * 4,
                             negatives=None)
    assert np.isnan(out["top1"]) and np.isnan(out["top1_centred"])


def test_centred_top1_ignores_the_length_of_the_prediction():
    gen = torch.Generator().manual_seed(2)
    gold = 5.0 + torch.randn(32, 16, generator=gen)
    pred = gold + 0.5 * torch.randn(32, 16, generator=gen)
    ids = np.arange(32)
    assert _round_trip(pred, gold, ids)["top1_centred"] == _round_trip(7 * pred, gold, ids)["top1_centred"]
