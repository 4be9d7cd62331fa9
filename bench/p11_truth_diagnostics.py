"""P11: why a toy-world run's reward does (not) follow the truth, from a finished run directory.

Five measurements, no training:

* **AR ceiling.** Ridge FVE from the attributes an explanation names → the activation
  (L2-normalised, trained on ``ar_sft``, scored on ``eval``): from the teacher's explanations (what
  the AR-SFT sees) and from every true attribute (what an AV naming everything would give). Compare
  with the AR-SFT's logged ``eval/ar/fve``: far below the teacher's ceiling is an undertrained AR.
* **Does the reward prefer the truth?** The AR-SFT final on full true explanations of the eval
  rows against the same explanation with one value changed, every value changed, or one attribute
  dropped: P(r(true) > r(variant)) and the mean difference over the reward's spread across rows,
  in each reward basis (raw, centre, standardize, whiten at several ε). GRPO ranks within a group, so
  the probability is what the policy gradient sees.
* **The break-even precision**: the confidence above which naming a value raises the reward
  (right: the reward of the truth; wrong: one value changed; left out: that attribute dropped).
* **Top-1 among hard negatives, raw vs centred cosine**, for the exported pair's greedy
  explanations: raw cosine is dominated by the shared mean direction (hub negatives win).
* **The AR on the full truth**: FVE and top-1 (the eval report's definitions) of the AR-SFT final
  and the AR after RL on complete, true explanations: what a perfect AV could earn; and the
  top-1 of ridge read-outs of the full attribute set, linear and with every pair of values.
  The ridge is the MSE-optimal read-out, not the most discriminating one: an AR trained with a
  whitened loss term (``ar_sft.loss_basis``) ranks the gold first more often than the ridge.

Reward: ``r = -|n(B(ĥ)) - n(B(h))|²`` (n: unit norm; B: the basis), the RL reward's MSE up to the
constant ``mse_scale² / d``.

Run: ``OMP_NUM_THREADS=1 python bench/p11_truth_diagnostics.py runs/tiny`` (about 10 s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from nla_rl.data.toyworld import SLOTS, full_explanation, parse_attributes
from nla_rl.inference import NLA
from nla_rl.reward_basis import fit_reward_basis

ROWS = 256


def _split(run: Path, name: str) -> dict:
    return pq.read_table(run / "data" / f"{name}.parquet").to_pydict()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _features(attribute_sets) -> tuple[np.ndarray, np.ndarray]:
    slots = list(SLOTS)
    presence = np.array([[any(a.startswith(s + "=") for a in attrs) for s in slots]
                         for attrs in attribute_sets], float)
    values = np.array([[f"{s}={v}" in attrs for s in slots for v in SLOTS[s]]
                       for attrs in attribute_sets], float)
    return presence, np.hstack([presence, values])


def _pair_features(attribute_sets) -> np.ndarray:
    """Presence, values and every product of two values: a read-out that may depend on which
    values occur together (a non-linear function of the attribute set, up to second order)."""
    presence, features = _features(attribute_sets)
    values = features[:, presence.shape[1]:]
    i, j = np.triu_indices(values.shape[1], 1)
    return np.hstack([features, values[:, i] * values[:, j]])


def ridge_predict(x_train, f_train, f_test, l2: float = 1.0) -> np.ndarray:
    """``(f - f̄) W + x̄`` with ``W`` the ridge solution on the training rows."""
    mu, f_mean = x_train.mean(0), f_train.mean(0)
    a = f_train - f_mean
    w = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ (x_train - mu))
    return (f_test - f_mean) @ w + mu


def ridge_fve(x_train, f_train, x_test, f_test, l2: float = 1.0) -> float:
    """FVE of the ridge prediction :func:`ridge_predict` on the test rows."""
    residual = (ridge_predict(x_train, f_train, f_test, l2) - x_test) ** 2
    return float(1 - residual.sum() / ((x_test - x_test.mean(0)) ** 2).sum())


def ar_ceiling(run: Path) -> dict:
    train, test = _split(run, "ar_sft"), _split(run, "eval")
    x_train, x_test = (_unit(np.array(t["activation_vector"])) for t in (train, test))
    out = {}
    for name, attrs_of in (("teacher", lambda t: [parse_attributes(e) for e in t["explanation"]]),
                           ("every_true", lambda t: [frozenset(a) for a in t["attributes"]])):
        (p_train, pv_train), (p_test, pv_test) = _features(attrs_of(train)), _features(attrs_of(test))
        out[name] = {"presence": ridge_fve(x_train, p_train, x_test, p_test),
                     "presence_values": ridge_fve(x_train, pv_train, x_test, pv_test)}
    return out


def _variants(attrs: list[list[str]], rng: random.Random) -> dict[str, list[list[str]]]:
    def other(slot, value):
        return rng.choice([v for v in SLOTS[slot] if v != value])

    def one_wrong(a):
        a = list(a)
        i = rng.randrange(len(a))
        slot, value = a[i].split("=")
        a[i] = f"{slot}={other(slot, value)}"
        return a

    def drop_one(a):
        a = list(a)
        a.pop(rng.randrange(len(a)))
        return a

    return {"one_wrong": [one_wrong(a) for a in attrs],
            "all_wrong": [[f"{s}={other(s, v)}" for s, v in (x.split("=") for x in a)]
                          for a in attrs],
            "one_dropped": [drop_one(a) if len(a) > 1 else a for a in attrs]}


def _reward(pred: torch.Tensor, gold: torch.Tensor, basis) -> torch.Tensor:
    if basis is not None:
        pred, gold = basis.apply(pred), basis.apply(gold)
    pred, gold = (torch.nn.functional.normalize(v, dim=1) for v in (pred, gold))
    return -((pred - gold) ** 2).sum(1)


def reward_preference(run: Path) -> dict:
    test, rl = _split(run, "eval"), _split(run, "rl")
    gold = torch.tensor(np.array(test["activation_vector"][:ROWS]), dtype=torch.float32)
    attrs = [list(a) for a in test["attributes"][:ROWS]]
    nla = NLA.from_pretrained(run / "av_sft" / "final", run / "ar_sft" / "final")
    texts = {"true": attrs, **_variants(attrs, random.Random(0))}
    preds = {k: nla.reconstruct([full_explanation(a, random.Random(i)) for i, a in enumerate(v)])
             for k, v in texts.items()}
    multi = torch.tensor([len(a) > 1 for a in attrs])  # dropping needs a second attribute
    train = torch.tensor(np.array(rl["activation_vector"]), dtype=torch.float32)
    bases = {"raw": None, "centre": fit_reward_basis(train, "centre"),
             "standardize": fit_reward_basis(train, "standardize", 1e-3)}
    for eps in (1e-3, 1e-1, 1.0):
        bases[f"whiten eps={eps:g}"] = fit_reward_basis(train, "whiten", eps)
    out = {}
    for name, basis in bases.items():
        r_true = _reward(preds["true"], gold, basis)
        row = {"r_true_mean": float(r_true.mean()), "r_true_std": float(r_true.std())}
        for k in ("one_wrong", "all_wrong", "one_dropped"):
            keep = multi if k == "one_dropped" else torch.ones_like(multi)
            diff = (r_true - _reward(preds[k], gold, basis))[keep]
            row[k] = {"p_true_wins": float((diff > 0).float().mean()),
                      "effect": float(diff.mean() / r_true.std())}
        out[name] = row
    return out


def break_even_precision(run: Path) -> dict:
    """The precision above which naming a value pays under the reward, per basis: for one
    attribute of each full true explanation (rows with ≥ 2), the reward with it right
    (``r_true``), wrong (``r_wrong``) and left out (``r_omit``). Naming it is worth
    ``p·r_true + (1-p)·r_wrong`` against ``r_omit``, so it pays when
    ``p > p* = E[r_omit - r_wrong] / E[r_true - r_wrong]``. GRPO pushes the AV's stated values
    towards that confidence, not above it."""
    test, rl = _split(run, "eval"), _split(run, "rl")
    rng = random.Random(1)
    rows = [i for i, a in enumerate(test["attributes"][:ROWS]) if len(a) > 1]
    texts = {"true": [], "wrong": [], "omit": []}
    for i in rows:
        attrs = list(test["attributes"][i])
        k = rng.randrange(len(attrs))
        slot, value = attrs[k].split("=")
        wrong = list(attrs)
        wrong[k] = f"{slot}={rng.choice([v for v in SLOTS[slot] if v != value])}"
        for name, a in (("true", attrs), ("wrong", wrong), ("omit", attrs[:k] + attrs[k + 1:])):
            texts[name].append(full_explanation(a, random.Random(i)))
    gold = torch.tensor(np.array(test["activation_vector"]), dtype=torch.float32)[rows]
    nla = NLA.from_pretrained(run / "av_sft" / "final", run / "ar_sft" / "final")
    preds = {k: nla.reconstruct(v) for k, v in texts.items()}
    train = torch.tensor(np.array(rl["activation_vector"]), dtype=torch.float32)
    out = {}
    for name, basis in (("raw", None), ("centre", fit_reward_basis(train, "centre"))):
        r = {k: _reward(v, gold, basis) for k, v in preds.items()}
        out[name] = float((r["omit"] - r["wrong"]).mean() / (r["true"] - r["wrong"]).mean())
    return out


def _top1(pred, gold, negatives) -> float:
    pred, gold = (torch.nn.functional.normalize(v, dim=1) for v in (pred, gold))
    positive = (pred * gold).sum(1)
    hardest = (pred[:, None] * gold[negatives]).sum(-1).max(1).values
    return float((positive > hardest).float().mean())


def top1_raw_vs_centred(run: Path, negatives_per_row: int = 8) -> dict:
    test, rl = _split(run, "eval"), _split(run, "rl")
    unit = lambda v: torch.nn.functional.normalize(torch.tensor(np.array(v), dtype=torch.float32), dim=1)  # noqa: E731
    gold, mean = unit(test["activation_vector"][:ROWS]), unit(rl["activation_vector"]).mean(0)
    docs = np.array(test["doc_id"][:ROWS])
    sims = gold @ gold.T  # mined like the eval report: nearest by raw cosine, other documents
    sims[torch.tensor(docs[:, None] == docs[None, :])] = -2.0
    negatives = sims.topk(negatives_per_row, dim=1).indices
    nla = NLA.from_pretrained(run / "export" / "av", run / "export" / "ar")
    texts = nla.explain(gold, max_new_tokens=48)  # None (no explanation) reconstructs as ""
    pred = torch.nn.functional.normalize(nla.reconstruct(texts), dim=1)
    return {"raw": _top1(pred, gold, negatives),
            "centred": _top1(pred - mean, gold - mean, negatives),
            "chance": 1 / (negatives_per_row + 1)}


def ar_on_full_truth(run: Path) -> dict:
    """What a complete, true explanation earns under the run's ARs: FVE and top-1 among the
    eval report's 8 hard negatives (raw / centred) of ``AR(full_explanation(attributes))`` on
    the first ROWS eval rows, for the AR-SFT final and (when present) the AR after RL."""
    from nla_rl.evaluation import eval_negatives, round_trip_metrics

    test = _split(run, "eval")
    gold = torch.tensor(np.array(test["activation_vector"][:ROWS]), dtype=torch.float32)
    negatives = eval_negatives(gold.numpy(), np.array(test["doc_id"][:ROWS]), 8)
    texts = [full_explanation(a, random.Random(i)) for i, a in enumerate(test["attributes"][:ROWS])]
    out = {}
    for name, ar in (("ar_sft", run / "ar_sft" / "final"), ("rl", run / "rl" / "final" / "ar")):
        if not ar.is_dir():
            continue
        nla = NLA.from_pretrained(run / "av_sft" / "final", ar)
        m = round_trip_metrics(nla.reconstruct(texts), gold, mse_scale=nla.mse_scale, texts=texts,
                               explanations=texts, negatives=negatives)
        out[name] = {k: m[k] for k in ("fve", "top1", "top1_centred")}
    # MSE-optimal read-outs of the attribute set: ridge fits from every true attribute (trained
    # on ar_sft), linear and with every pair of values (second-order interactions)
    train = _split(run, "ar_sft")
    sets = [[frozenset(a) for a in t["attributes"]]
            for t in (train, {"attributes": test["attributes"][:ROWS]})]
    for name, featurise in (("ridge_every_true", lambda a: _features(a)[1]),
                            ("ridge_pairs_every_true", _pair_features)):
        pred = ridge_predict(_unit(np.array(train["activation_vector"])), featurise(sets[0]),
                             featurise(sets[1]))
        m = round_trip_metrics(torch.tensor(pred, dtype=torch.float32), gold, mse_scale=None,
                               texts=texts, explanations=texts, negatives=negatives)
        out[name] = {"top1": m["top1"], "top1_centred": m["top1_centred"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished toy-world run directory (runs/tiny)")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"ar_ceiling": ar_ceiling(args.run), "reward_preference": reward_preference(args.run),
              "break_even_precision": break_even_precision(args.run),
              "top1": top1_raw_vs_centred(args.run), "ar_on_full_truth": ar_on_full_truth(args.run)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
