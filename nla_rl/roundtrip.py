"""The round trip ``ĥ = AR(AV(h))`` with Hugging Face models: explain vectors, reconstruct the
explanations, score the reconstruction.

This is the reference path (no engine, no Ray): the pipeline's sanity stage uses it at
initialisation, and the engines are checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nla_rl.injection import InjectionSpec, inject  # noqa: F401  (InjectionSpec re-exported)
from nla_rl.metrics import cosine, fve
from nla_rl.rewards import apply_failures, normalized_mse, REWARDS
from nla_rl.templates import av_prompt_ids, extract_explanation
from nla_rl.tokens import MarkerTokens, find_marker_positions


@dataclass
class RoundTrip:
    """Per-vector results and aggregate metrics of one round trip."""

    texts: list[str]
    explanations: list[str | None]
    predictions: torch.Tensor
    mse: torch.Tensor
    rewards: torch.Tensor
    injections_applied: int
    metrics: dict[str, float]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask: generation continues every row at the same column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids, mask


def explain(av_model, tokenizer, vectors: torch.Tensor, *, marker: MarkerTokens, template: str,
            injection: InjectionSpec, max_new_tokens: int, prefill: str = "",
            depth_pct: int | None = None, do_sample: bool = False) -> tuple[list[str], int]:
    """Generate one explanation text per vector with the AV (HF ``generate``, injection hooked in).

    Returns the decoded continuations (``prefill`` prepended, so they parse) and how many rows the
    injection hook wrote — which must equal the number of vectors.
    """
    prompt = av_prompt_ids(tokenizer, template, marker.char, depth_pct=depth_pct, prefill=prefill)
    ids, mask = left_pad([prompt] * len(vectors), tokenizer.pad_token_id)
    positions = find_marker_positions(ids, marker, expected=len(vectors))
    with torch.no_grad(), inject(av_model, family=injection.family, vectors=injection.av_input(vectors), positions=positions,
                                 scale=injection.scale, layer=injection.layer,
                                 coeff=injection.coeff) as handle:
        out = av_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=do_sample, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return [prefill + t for t in texts], handle.applied


def round_trip(av_model, av_tokenizer, ar, ar_tokenizer, vectors: torch.Tensor, *, marker: MarkerTokens,
               av_template: str, ar_template: str, injection: InjectionSpec, mse_scale: float,
               max_new_tokens: int, reward: str = "neg_mse", prefill: str = "",
               depth_pct: int | None = None) -> RoundTrip:
    """Explain ``vectors``, reconstruct them from the explanations, and score the result.

    Reward per vector: ``r = REWARDS[reward](MSE(n(ĥ), n(h)))``; a vector whose explanation cannot
    be extracted gets the orthogonal-equivalent failure penalty.
    """
    texts, applied = explain(av_model, av_tokenizer, vectors, marker=marker, template=av_template,
                             injection=injection, max_new_tokens=max_new_tokens, prefill=prefill,
                             depth_pct=depth_pct)
    explanations = [extract_explanation(t) for t in texts]
    failed = torch.tensor([e is None for e in explanations])
    # A failed rollout still needs a prediction shape-wise; it is scored by the penalty only.
    with torch.no_grad():
        preds = ar.reconstruct(ar_tokenizer, [e or "" for e in explanations], template=ar_template)
    mse = normalized_mse(preds, vectors, mse_scale)
    rewards = apply_failures(REWARDS[reward](mse), failed, reward)
    metrics = {
        "roundtrip/fve": fve(preds, vectors, mse_scale),
        "roundtrip/cosine": float(cosine(preds, vectors).mean()),
        "roundtrip/mse": float(mse.mean()),
        "roundtrip/reward": float(rewards.mean()),
        "health/extraction_failure_rate": float(failed.float().mean()),
        "health/injections_applied": float(applied),
    }
    return RoundTrip(texts, explanations, preds, mse, rewards, applied, metrics)
