"""Rollouts as a training batch for the policy: prompt + completion rows, per-token log-probs.

A row is ``prompt_ids + completion_ids`` (right-padded). The logit at column ``t`` scores token
``t + 1``, so per-token quantities live on ``[B, T - 1]`` and the response tokens of row ``b`` are
columns ``len(prompt_b) - 1 … len(prompt_b) + len(completion_b) - 2``. Completions are trimmed at
their first EOS (kept, so the policy learns to stop) before anything is counted.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch

from nla_rl.errors import NLAError
from nla_rl.grpo import PolicyLoss, PolicyLossSettings, loss_normalizer, policy_loss
from nla_rl.injection import inject
from nla_rl.logprobs import next_token_logprobs
from nla_rl.roundtrip import InjectionSpec
from nla_rl.tokens import MarkerTokens, find_marker_positions


@dataclass
class PolicyBatch:
    """Right-padded rows and their per-token targets (``[B, T-1]`` tensors are aligned with
    ``logits[:, :-1]``)."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    marker_positions: torch.Tensor  # [B, 2] (row, column) pairs for inject()
    vectors: torch.Tensor  # [B, d] float32
    response_mask: torch.Tensor  # [B, T-1] bool
    advantages: torch.Tensor  # [B]
    engine_logp: torch.Tensor | None = None  # [B, T-1]
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    # How the learner scores it (carried along so a micro-batch knows its own normaliser).
    settings: PolicyLossSettings | None = None
    temperature: float = 1.0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device) -> "PolicyBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def num_loss_units(self) -> int:
        """Tokens (or rollouts) this batch adds to the step's loss normaliser."""
        return loss_normalizer(self.response_mask, self.settings, self.old_logp, self.engine_logp)

    def slice(self, start: int, stop: int) -> "PolicyBatch":
        """Rows ``start:stop`` trimmed to their longest row; marker rows re-indexed."""
        width = int(self.attention_mask[start:stop].sum(1).max())
        cut = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, torch.Tensor) or f.name in ("marker_positions", "vectors",
                                                                  "advantages"):
                continue
            per_token = f.name not in ("input_ids", "attention_mask")
            cut[f.name] = value[start:stop, :width - 1 if per_token else width]
        markers = self.marker_positions[start:stop].clone()
        markers[:, 0] -= start
        return replace(self, **cut, marker_positions=markers, vectors=self.vectors[start:stop],
                       advantages=self.advantages[start:stop])

    def take(self, rows) -> "PolicyBatch":
        """Rows ``rows`` (any order: a token-budget micro-batch) trimmed to their longest row;
        marker rows re-indexed."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= len(self):
            raise NLAError(f"rows {rows.tolist()} are empty or outside a batch of {len(self)}")
        width = int(self.attention_mask[rows].sum(1).max())
        cut = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and f.name != "marker_positions":
                value = value[rows]
                if f.name not in ("vectors", "advantages"):  # [B, T] or [B, T-1]
                    per_token = f.name not in ("input_ids", "attention_mask")
                    value = value[:, :width - 1 if per_token else width]
                cut[f.name] = value
        markers = self.marker_positions[rows].clone()
        markers[:, 0] = torch.arange(len(rows), device=markers.device)
        return replace(self, **cut, marker_positions=markers)


def trim_at_eos(token_ids: Sequence[int], eos_ids: set[int] | frozenset[int]) -> list[int]:
    """``token_ids`` up to and including the first EOS (all of them when there is none)."""
    for i, tok in enumerate(token_ids):
        if int(tok) in eos_ids:
            return [int(t) for t in token_ids[:i + 1]]
    return [int(t) for t in token_ids]


def _per_token(values: Sequence[Sequence[float]] | None, prompts, completions, shape):
    """Scatter per-completion-token values onto the ``[B, T-1]`` grid (zeros elsewhere)."""
    if values is None:
        return None
    out = torch.zeros(shape, dtype=torch.float32)
    for b, (p, c, v) in enumerate(zip(prompts, completions, values)):
        v = torch.as_tensor(v, dtype=torch.float32).reshape(-1)[:len(c)]
        if v.numel() != len(c):
            raise NLAError(f"row {b}: {v.numel()} log-probs for {len(c)} completion tokens")
        out[b, len(p) - 1:len(p) - 1 + len(c)] = v
    return out


def build_policy_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                       vectors, advantages, *, marker: MarkerTokens, pad_id: int,
                       engine_logp=None, old_logp=None, ref_logp=None) -> PolicyBatch:
    """Rows ``prompt + completion`` (completions already trimmed at EOS), right-padded.

    Every prompt must hold the marker once (a missing marker is an error, never a silent
    un-injected row); empty completions are allowed and contribute no tokens.
    """
    if not (len(prompts) == len(completions) == len(vectors) == len(advantages)):
        raise NLAError(f"policy batch: {len(prompts)} prompts, {len(completions)} completions, "
                       f"{len(vectors)} vectors and {len(advantages)} advantages must match")
    rows = [list(map(int, p)) + list(map(int, c)) for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    response = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for b, (row, p, c) in enumerate(zip(rows, prompts, completions)):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, :len(row)] = 1
        response[b, len(p) - 1:len(p) - 1 + len(c)] = True
    positions = find_marker_positions(ids, marker, expected=len(rows))
    if not torch.equal(positions[:, 0], torch.arange(len(rows))):
        raise NLAError("policy batch: every prompt must hold the marker exactly once")
    shape = (len(rows), width - 1)
    # Copies (torch.tensor): arrays arriving through Ray are read-only.
    return PolicyBatch(
        ids, mask, positions, torch.tensor(np.asarray(vectors), dtype=torch.float32).reshape(
            len(rows), -1),
        response, torch.tensor(np.asarray(advantages), dtype=torch.float32).reshape(-1),
        _per_token(engine_logp, prompts, completions, shape),
        _per_token(old_logp, prompts, completions, shape),
        _per_token(ref_logp, prompts, completions, shape))


def token_logprobs(model, batch: PolicyBatch, injection: InjectionSpec,
                   temperature: float = 1.0, *, lean: bool = True) -> torch.Tensor:
    """``log softmax(logits / T)`` of each next token, ``[B, T-1]`` (fp32, with gradients).

    Divided by the sampling temperature so that it is the distribution the engine sampled from
    (engines report post-temperature log-probs). Only the response columns are scored (0
    elsewhere): with ``lean`` their logits are computed alone and in chunks
    (:func:`nla_rl.logprobs.next_token_logprobs`), never as one ``[B, T, V]`` tensor.
    """
    if temperature <= 0:
        raise NLAError(f"temperature: expected > 0 for policy log-probs, found {temperature}")
    with inject(model, family=injection.family, vectors=injection.av_input(batch.vectors),
                positions=batch.marker_positions, scale=injection.scale, layer=injection.layer,
                coeff=injection.coeff):
        values = next_token_logprobs(model, batch.input_ids, batch.attention_mask,
                                     batch.response_mask, temperature=temperature, lean=lean)
    out = values.new_zeros(batch.response_mask.shape)
    out[batch.response_mask.to(out.device)] = values
    return out


def grpo_micro_loss(model, batch: PolicyBatch, injection: InjectionSpec,
                    settings: PolicyLossSettings, temperature: float = 1.0, *,
                    lean: bool = True) -> PolicyLoss:
    """The GRPO loss of one micro-batch (:func:`nla_rl.grpo.policy_loss` on the policy's
    current token log-probs): ``loss_sum`` to be divided by the step's global normaliser.
    ``lean=False``: the full-vocabulary log-prob formula (kept for comparison benchmarks)."""
    logp = token_logprobs(model, batch, injection, temperature, lean=lean)
    return policy_loss(logp, batch.advantages, batch.response_mask, settings,
                       old_logp=batch.old_logp, engine_logp=batch.engine_logp,
                       ref_logp=batch.ref_logp)
