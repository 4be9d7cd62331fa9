"""Supervised warm starts of the AV and the AR: batch builders and the two losses.

Pure torch + transformers (no Ray): the distributed learners call these on each micro-batch.

Both losses return ``(sum, count)`` rather than a mean, so that gradient accumulation over
micro-batches and ranks gives the exact mean over the whole optimiser batch: the learner sums the
counts over micro-batches and ranks (an all-reduce) and divides the summed loss by that total.

* AV-SFT: next-token cross entropy on the teacher explanation (``<explanation>\\n…\\n</explanation>``)
  plus the chat turn-close token, with the activation injected at the marker of the AV prompt.
* AR-SFT: normalised MSE between ``AR(explanation)`` and the activation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from nla_rl.errors import NLAError, mismatch
from nla_rl.injection import inject
from nla_rl.logprobs import lean_head, next_token_logprobs
from nla_rl.rewards import normalized_mse
from nla_rl.roundtrip import InjectionSpec
from nla_rl.templates import ar_text, av_prompt_ids, av_sft_target, encode_prompt_text
from nla_rl.tokens import MarkerTokens, find_marker_positions

IGNORE_INDEX = -100  # label of every position that is not trained on (the prompt, the padding)
_SENTINEL = "NLASFTSENTINELCONTENT"


class SFTError(NLAError):
    """An SFT batch cannot be built or scored as asked."""


# ------------------------------------------------------------------------------------ batches

def _slice_rows(batch, i: int, j: int, seq_fields: tuple[str, ...]):
    """Rows ``i:j`` of a dataclass batch, trimmed to the longest row (right padding only)."""
    if not 0 <= i < j <= len(batch):
        raise SFTError(f"slice [{i}:{j}] is empty or outside a batch of {len(batch)} rows")
    width = int(batch.attention_mask[i:j].sum(dim=1).max())
    values = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        value = value[i:j] if isinstance(value, torch.Tensor) else value
        values[f.name] = value[:, :width] if f.name in seq_fields else value
    return replace(batch, **values)


def _take_rows(batch, rows: torch.Tensor, seq_fields: tuple[str, ...]):
    """Rows ``rows`` (any order) of a dataclass batch, trimmed to their longest row."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= len(batch):
        raise SFTError(f"rows {rows.tolist()} are empty or outside a batch of {len(batch)} rows")
    width = int(batch.attention_mask[rows].sum(dim=1).max())
    values = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        value = value[rows.to(value.device)] if isinstance(value, torch.Tensor) else value
        values[f.name] = value[:, :width] if f.name in seq_fields else value
    return replace(batch, **values)


@dataclass
class AVBatch:
    """One AV-SFT batch, right-padded.

    ``labels`` equal ``input_ids`` on the trained tokens (the explanation target and the
    turn-close token) and :data:`IGNORE_INDEX` elsewhere; ``vectors`` [B, d] are fp32 activations;
    ``marker_positions`` [B] is the marker's column in each row (the injection position).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    vectors: torch.Tensor
    marker_positions: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device) -> AVBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def slice(self, i: int, j: int) -> AVBatch:
        """Rows ``i:j`` (a micro-batch), trimmed to their longest row."""
        return _slice_rows(self, i, j, ("input_ids", "attention_mask", "labels"))

    def take(self, rows) -> AVBatch:
        """Rows ``rows`` (a token-budget micro-batch), trimmed to their longest row."""
        return _take_rows(self, rows, ("input_ids", "attention_mask", "labels"))

    def num_target_tokens(self) -> int:
        """Tokens the loss is computed on (the denominator of the token-mean loss)."""
        return int((self.labels != IGNORE_INDEX).sum())

    def injection_positions(self) -> torch.Tensor:
        """``[B, 2]`` (row, column) positions in the form :func:`nla_rl.injection.inject` takes."""
        rows = torch.arange(len(self), device=self.marker_positions.device)
        return torch.stack([rows, self.marker_positions], dim=1)


@dataclass
class ARBatch:
    """One AR-SFT batch: right-padded AR inputs and their fp32 target activations [B, d]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device) -> ARBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def slice(self, i: int, j: int) -> ARBatch:
        """Rows ``i:j`` (a micro-batch), trimmed to their longest row."""
        return _slice_rows(self, i, j, ("input_ids", "attention_mask"))

    def take(self, rows) -> ARBatch:
        """Rows ``rows`` (a token-budget micro-batch), trimmed to their longest row."""
        return _take_rows(self, rows, ("input_ids", "attention_mask"))


def token_budget_groups(lengths, max_tokens: int, min_groups: int = 1) -> list[list[int]]:
    """Row indices in groups whose padded size (rows × longest row) is at most ``max_tokens``.

    Rows are sorted by length (ties in row order) and filled greedily, so rows of similar length
    share a micro-batch and padding stays small; a row longer than the budget is a group alone.
    Every row is in exactly one group, so sums over the groups are sums over the batch. While
    there are fewer than ``min_groups`` groups, the one with the most padded tokens is halved
    (ranks of a sharded model must run the same number of forwards).
    """
    if max_tokens < 1:
        raise SFTError(f"micro-batch tokens: expected >= 1, found {max_tokens}")
    lengths = [int(n) for n in lengths]
    if min_groups > len(lengths):
        raise SFTError(f"{min_groups} micro-batches asked of {len(lengths)} rows")
    groups, current = [], []
    for row in sorted(range(len(lengths)), key=lambda r: (lengths[r], r)):
        if current and (len(current) + 1) * lengths[row] > max_tokens:  # sorted: row is longest
            groups.append(current)
            current = []
        current.append(row)
    groups += [current] if current else []
    while len(groups) < min_groups:
        i = max((i for i, g in enumerate(groups) if len(g) > 1),
                key=lambda i: len(groups[i]) * lengths[groups[i][-1]])
        half = len(groups[i]) // 2
        groups[i:i + 1] = [groups[i][:half], groups[i][half:]]
    return groups


def micro_batches(batch, size: int, max_tokens: int | None = None, min_count: int = 1):
    """Consecutive slices of at most ``size`` rows (each trimmed to its longest row); with
    ``max_tokens``, the :func:`token_budget_groups` of the rows' lengths instead (``size`` unused;
    at least ``min_count`` of them), so the padded token count, not the longest row, sets a
    micro-batch's size."""
    if size < 1:
        raise SFTError(f"micro-batch size: expected >= 1, found {size}")
    if max_tokens is not None:
        lengths = batch.attention_mask.sum(dim=1).tolist()
        for rows in token_budget_groups(lengths, max_tokens, min_count):
            yield batch.take(rows)
        return
    for i in range(0, len(batch), size):
        yield batch.slice(i, min(i + size, len(batch)))


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise SFTError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


def _right_pad(rows: list[list[int]], pad_id: int, fill_labels: list[list[int]] | None = None):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, :len(row)] = 1
        if fill_labels is not None:
            labels[b, :len(row)] = torch.tensor(fill_labels[b], dtype=torch.long)
    return ids, mask, labels


def _check_vectors(vectors, n: int) -> torch.Tensor:
    vectors = torch.as_tensor(vectors)
    if vectors.dim() != 2 or vectors.shape[0] != n:
        raise SFTError(mismatch("vectors shape", f"[{n}, d_model] (one row per explanation)",
                                list(vectors.shape)))
    if not bool(torch.isfinite(vectors).all()):
        raise SFTError("vectors contain NaN or Inf; drop those rows from the dataset first")
    return vectors.to(torch.float32)


# ------------------------------------------------------------------------------- turn close

def turn_close_ids(tokenizer) -> list[int]:
    """Token ids that close an assistant turn in the tokenizer's chat format.

    Read from the chat template itself: a conversation ending in an assistant message is rendered
    and the text after the message content is kept, up to and including its first special token
    (ChatML ``<|im_end|>``, Llama-3 ``<|eot_id|>``, Gemma ``<end_of_turn>``); trailing whitespace
    is not part of it. Falls back to the eos token when the template writes nothing after the content.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise SFTError("the tokenizer has no chat template; the AV needs a chat (instruct) tokenizer")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
        tokenize=False,
    )
    if _SENTINEL not in text:
        raise SFTError("the chat template does not render the assistant message content verbatim; "
                       "cannot derive the turn-close token")
    suffix = text[text.rindex(_SENTINEL) + len(_SENTINEL):].rstrip()
    ids = encode_prompt_text(tokenizer, suffix) if suffix else []
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    special |= set(tokenizer.all_special_ids)
    for k, token_id in enumerate(ids):
        if token_id in special:
            return ids[:k + 1]
    if ids:
        return ids
    if tokenizer.eos_token_id is None:
        raise SFTError("the chat template writes nothing after an assistant message and the "
                       "tokenizer has no eos token: cannot tell the model where to stop")
    return [int(tokenizer.eos_token_id)]


# ------------------------------------------------------------------------------------- AV-SFT

def _target_text(explanation: str, prefill: str) -> str:
    """The SFT target after the prompt: the full target minus the part prefilled in the prompt."""
    target = av_sft_target(explanation.strip())
    if not target.startswith(prefill):
        raise SFTError(f"templates.av_prefill {prefill!r} is not a prefix of the AV-SFT target "
                       f"{target[:40]!r}…; the prefill must be the target's beginning, e.g. "
                       "'<explanation>'")
    return target[len(prefill):]


def build_av_sft_batch(tokenizer, explanations: list[str], vectors, *, marker: MarkerTokens,
                       template: str, prefill: str = "", depth_pct: int | None = None,
                       max_length: int | None = None) -> AVBatch:
    """Tokenise AV-SFT rows: the AV chat prompt (same for every row), then the target.

    Row ``b`` = ``av_prompt_ids(template, marker, prefill)`` + ``tok(target_b)`` + turn-close ids,
    where ``target_b = av_sft_target(explanation_b)`` minus the prefill already in the prompt.
    The prompt string is encoded without special tokens (it already holds BOS where the family
    has one); the target likewise. Rows longer than ``max_length`` lose the end of their target.
    """
    if not explanations:
        raise SFTError("no explanations: an SFT batch needs at least one row")
    vectors = _check_vectors(vectors, len(explanations))
    prompt = av_prompt_ids(tokenizer, template, marker.char, depth_pct=depth_pct, prefill=prefill)
    close = turn_close_ids(tokenizer)
    if max_length is not None and max_length <= len(prompt):
        raise SFTError(f"max_length {max_length} leaves no room for the target after the "
                       f"{len(prompt)}-token AV prompt; raise max_length")
    rows, labels = [], []
    for explanation in explanations:
        target = encode_prompt_text(tokenizer, _target_text(explanation, prefill)) + close
        row = (prompt + target)[:max_length]
        rows.append(row)
        labels.append([IGNORE_INDEX] * len(prompt) + row[len(prompt):])
    ids, mask, label_tensor = _right_pad(rows, _pad_id(tokenizer), labels)
    positions = find_marker_positions(ids, marker, expected=len(rows))
    if not torch.equal(positions[:, 0], torch.arange(len(rows))):
        raise SFTError("each AV prompt must contain the marker exactly once")
    return AVBatch(ids, mask, label_tensor, vectors, positions[:, 1].clone())


def av_sft_loss(model, batch: AVBatch, injection: InjectionSpec, *,
                lean: bool = True) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of the target tokens with the activation injected, and their count.

    ``L_sum = Σ_{b,t: y_bt ≠ -100} -log softmax(z_b,t-1)[y_bt]`` where ``z = model(ids | inject
    v_b at marker_b)`` (logits in fp32) and ``y = labels``; returns ``(L_sum, N)`` with
    ``N = #{y_bt ≠ -100}``. The learner divides the sum over micro-batches and ranks by the global
    ``N``, which gives the exact token mean ``L = L_sum / N`` of the optimiser batch.
    Logits are only computed at the target positions, in chunks
    (:func:`nla_rl.logprobs.next_token_logprobs`): the vocabulary projection is the largest cost.
    Models the lean path does not cover (or ``lean=False``) score from the first target column on
    (``logits_to_keep``).
    """
    targets = batch.labels != IGNORE_INDEX
    count = int(targets.sum())
    if count == 0:
        raise SFTError("the batch has no target tokens (all labels are -100)")
    with inject(model, family=injection.family, vectors=injection.av_input(batch.vectors),
                positions=batch.injection_positions(), scale=injection.scale,
                layer=injection.layer, coeff=injection.coeff):
        if lean and lean_head(model) is not None:
            select = targets[:, 1:]
            logp = next_token_logprobs(model, batch.input_ids, batch.attention_mask, select,
                                       targets=batch.labels[:, 1:][select])
            return -logp.sum(), count
        first = int(targets.float().argmax(dim=1)[targets.any(dim=1)].min())  # earliest target
        keep = batch.input_ids.shape[1] - first + 1  # logits of columns first-1 … T-1
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    use_cache=False, logits_to_keep=keep)
    logits = out.logits[:, :-1].float()  # position t predicts token t+1
    labels = batch.labels[:, first:].to(logits.device)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, count


def shuffled(batch: AVBatch, seed: int) -> AVBatch:
    """The same batch with its vectors permuted across rows: a derangement when ``B > 1``.

    The real-vs-shuffled control: if the AV uses the injected activation, the loss with each
    explanation paired to another row's vector must be higher than with its own.
    """
    n = len(batch)
    if n < 2:
        return replace(batch)
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=g)
    # One n-cycle through a random order: row order[k] takes the vector of row order[k+1].
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return replace(batch, vectors=batch.vectors[perm.to(batch.vectors.device)])


# ------------------------------------------------------------------------------------- AR-SFT

def build_ar_sft_batch(tokenizer, explanations: list[str], vectors, *, template: str,
                       max_length: int | None = None) -> ARBatch:
    """Tokenise AR-SFT rows: ``ar_text(template, explanation)`` with special tokens (BOS for the
    families that have one), right-padded, with the activations as fp32 targets.

    The AR predicts at the last real token, so a row longer than ``max_length`` is refused rather
    than cut (cutting would drop the template's closing text, which the AR reads last).
    """
    if not explanations:
        raise SFTError("no explanations: an SFT batch needs at least one row")
    vectors = _check_vectors(vectors, len(explanations))
    rows = tokenizer([ar_text(template, e.strip()) for e in explanations],
                     add_special_tokens=True)["input_ids"]
    longest = max(len(r) for r in rows)
    if max_length is not None and longest > max_length:
        raise SFTError(f"an AR input has {longest} tokens > max_length {max_length}; raise "
                       "max_length or shorten the explanations")
    ids, mask, _ = _right_pad([list(r) for r in rows], _pad_id(tokenizer))
    return ARBatch(ids, mask, vectors)


@dataclass(frozen=True)
class ContrastBank:
    """``ar_sft.contrast_weight``'s bank: ``bank`` [m, d] = ``c(h_j)`` of m AR-SFT activations,
    with ``c(v) = n(n(v) - μ)`` (n: unit norm; ``mean`` μ [d], the split's mean unit vector)."""

    bank: torch.Tensor
    mean: torch.Tensor
    weight: float
    tau: float

    @functools.cached_property
    def _centre(self):
        """The centre reward basis ``n(v) - μ``, built (and checked) once per bank."""
        from nla_rl.reward_basis import RewardBasis

        return RewardBasis("centre", self.mean, None)

    def centred(self, v: torch.Tensor) -> torch.Tensor:
        """``c(v)`` [..., d] fp32: the centre reward basis, normalised."""
        return F.normalize(self._centre.apply(v), dim=-1)

    def to(self, device) -> ContrastBank:
        return replace(self, bank=self.bank.to(device), mean=self.mean.to(device))


CONTRAST_FILE = "contrast_bank.safetensors"  # ar_sft.contrast_weight, in <run>/ar_sft/


def fit_contrast_bank(vectors: torch.Tensor, max_rows: int, seed: int) -> tuple[torch.Tensor,
                                                                                 torch.Tensor]:
    """``(bank, μ)``: μ the mean unit vector of ``vectors`` [n, d], and ``c(h)`` of at most
    ``max_rows`` of them (a sample seeded by ``seed`` when n is larger)."""
    from nla_rl.reward_basis import fit_reward_basis

    vectors = torch.as_tensor(vectors)
    centre = fit_reward_basis(vectors, "centre")  # μ: the mean unit vector, fitted on every row
    if vectors.shape[0] > max_rows:
        rows = torch.randperm(vectors.shape[0], generator=torch.Generator().manual_seed(seed))
        vectors = vectors[rows[:max_rows].sort().values]
    return F.normalize(centre.apply(vectors), dim=-1), centre.mean


def save_contrast_bank(bank: torch.Tensor, mean: torch.Tensor, path) -> None:
    """Write the bank atomically as safetensors (no pickle)."""
    from safetensors.torch import save_file

    from nla_rl.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file({"bank": bank.contiguous(), "mean": mean.contiguous()}, str(tmp))


def load_contrast_bank(path, weight: float, tau: float) -> ContrastBank:
    """A bank written by :func:`save_contrast_bank`, with the term's weight and τ."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return ContrastBank(tensors["bank"], tensors["mean"], weight, tau)


SAME_ROW_COS = 1 - 1e-5  # a bank row this close to the gold is the gold itself (not a negative)


def contrastive_term(preds: torch.Tensor, targets: torch.Tensor, contrast: ContrastBank
                     ) -> torch.Tensor:
    """Per-row InfoNCE [rows]:
    ``-log softmax_0([c(ĥ)·c(h), c(ĥ)·c(h_j) for bank rows j] / τ)``, the gold first and the
    bank's copy of the gold (cos ≥ SAME_ROW_COS) left out."""
    pred, gold = contrast.centred(preds), contrast.centred(targets)
    bank = contrast.bank.to(pred.device)
    positive = (pred * gold).sum(-1, keepdim=True)
    negatives = (pred @ bank.T).masked_fill(gold @ bank.T >= SAME_ROW_COS, float("-inf"))
    logits = torch.cat([positive, negatives], dim=1) / contrast.tau
    return -torch.log_softmax(logits, dim=1)[:, 0]


def ar_sft_loss_parts(ar_model, batch: ARBatch, mse_scale: float | None, basis=None, *,
                      term_basis=None, term_weight: float = 0.0,
                      contrast: ContrastBank | None = None
                      ) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The AR's summed loss, the row count and the summed fit term (detached).

    ``L_sum = Σ_b [mean_d (n_s(B(AR(x_b))) - n_s(B(h_b)))²
                   + w · mean_d (n_s(C(AR(x_b))) - n_s(C(h_b)))²
                   + w_c · InfoNCE_b]``
    with ``n_s`` normalising to ``s = mse_scale`` (``None``: raw vectors), ``B`` the reward
    basis (:mod:`nla_rl.reward_basis`; ``None`` = identity), and the second term only with a
    ``term_basis`` ``C`` (``ar_sft.loss_basis``, weight ``w = term_weight``): raw MSE spends the
    AR on the directions of largest variance, while in a whitened ``C`` the quiet directions
    that tell one value from another count as much. The third term only with a ``contrast``
    bank (``ar_sft.contrast_weight`` = w_c; :func:`contrastive_term`): the prediction must be
    nearer its own activation than the bank's, the objective of top-1 among hard negatives.
    The fit term is the first sum alone
    (``train/ar/fve`` is computed from it). At ``s = √d`` each term is ``2 (1 - cos)``; the
    learner divides by the global row count for the batch mean.
    """
    from nla_rl.reward_basis import apply_basis

    preds = ar_model(batch.input_ids, batch.attention_mask)
    targets = batch.targets.to(preds.device)
    fit = normalized_mse(apply_basis(basis, preds), apply_basis(basis, targets), mse_scale)
    loss = fit
    if term_basis is not None:
        term = normalized_mse(term_basis.apply(preds), term_basis.apply(targets), mse_scale)
        loss = loss + term_weight * term
    if contrast is not None:
        loss = loss + contrast.weight * contrastive_term(preds, targets, contrast)
    return loss.sum(), len(batch), fit.detach().sum()


def ar_sft_loss(ar_model, batch: ARBatch, mse_scale: float | None, basis=None, *,
                term_basis=None, term_weight: float = 0.0) -> tuple[torch.Tensor, int]:
    """``(L_sum, rows)`` of :func:`ar_sft_loss_parts` (formula there)."""
    loss, rows, _ = ar_sft_loss_parts(ar_model, batch, mse_scale, basis,
                                      term_basis=term_basis, term_weight=term_weight)
    return loss, rows
