"""Next-token log-probs of selected positions without materialising ``[B, T, V]`` logits.

Today's formula is ``log softmax(z / T)[y]`` with ``z = lm_head(h)`` over every column of every row.
At a real vocabulary (V = 151,936) one ``[B, T, V]`` fp32 copy of a 8 × 256 micro-batch is 1.2 GB,
and the formula makes three (logits, ``/ T``, ``log_softmax``) plus what autograd saves. Only the
scored positions (completion or target tokens) need logits, so this module:

1. runs the model's own forward (every wrapper's hooks fire: FSDP2, DeepSpeed ZeRO-3, peft,
   injection) with its output head temporarily replaced by a function that receives the final
   hidden states ``[B, T, d]`` inside the head's call (so a sharded head's weight is gathered);
2. keeps only the hidden rows of the selected positions, ``[N, d]``;
3. computes ``log p = z[y] - logsumexp(z)`` with ``z = softcap(h Wᵀ + b) / T`` a chunk of positions
   at a time (:class:`_ChunkedHeadLogProbs`), saving only ``h``, ``W`` and the ``[N]`` log-sum-exps;
   the backward recomputes each chunk's logits, so at most one chunk of ``[chunk, V]`` fp32 logits
   exists at a time, forward or backward, and ``dW`` is accumulated in one fp32 buffer.

The result equals the full formula within fp32 rounding (the head is applied in the model's dtype
and, for Gemma-2/3, soft-capped in that dtype, exactly as their forward does; then upcast).
Models whose forward does something else after the head (Cohere's ``logit_scale``, Granite's
``logits_scaling``, …), or whose head is not a plain ``nn.Linear`` (e.g. a LoRA-wrapped head),
take the full path; only the head classes listed in :data:`PLAIN_HEAD_CLASSES` and
:data:`SOFTCAP_HEAD_CLASSES` (read from transformers' source) take the lean one.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from nla_rl.errors import NLAError

# Forward = ``logits = self.lm_head(hidden_states[:, slice_indices, :])`` and nothing else.
PLAIN_HEAD_CLASSES = frozenset({
    "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
    "LlamaForCausalLM", "MistralForCausalLM", "GemmaForCausalLM", "Phi3ForCausalLM",
    "Olmo2ForCausalLM", "Gemma3ForConditionalGeneration",
})
# The same, then ``cap · tanh(logits / cap)`` with ``cap = config.final_logit_softcapping``.
SOFTCAP_HEAD_CLASSES = frozenset({"Gemma2ForCausalLM", "Gemma3ForCausalLM"})
# Positions per chunk: this many bytes of fp32 logits (≈ 55 positions at V = 151,936).
CHUNK_BYTES = 32 * 2**20


def chunk_positions(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Positions per chunk so that one chunk's fp32 logits take about ``chunk_bytes``."""
    return max(1, int(chunk_bytes) // (4 * int(vocab_size)))


def _causal_lm(model):
    """The transformers model under peft / DeepSpeed / DDP wrappers (FSDP2 keeps the class)."""
    seen = []
    while model is not None and not any(model is s for s in seen):
        seen.append(model)
        if _head_kind(model) is not None:
            return model
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else None
        model = base if base is not None and base is not model else getattr(model, "module", None)
    return None


def _head_kind(model) -> str | None:
    """``plain`` / ``softcap`` for a listed class; a subclass (which may change the forward) is
    not listed. FSDP2's dynamic ``FSDP<Class>`` wrapper class is looked through."""
    cls = next((c for c in type(model).__mro__
                if not c.__module__.startswith("torch.distributed")), None)
    if cls is None or not cls.__module__.startswith("transformers."):
        return None
    if cls.__name__ in PLAIN_HEAD_CLASSES:
        return "plain"
    if cls.__name__ in SOFTCAP_HEAD_CLASSES:
        return "softcap"
    return None


def lean_head(model):
    """``(causal_lm, head, softcap)`` when the lean path reproduces ``model``'s logits, else None."""
    lm = _causal_lm(model)
    if lm is None:
        return None
    head = lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # a LoRA / quantised / custom head: full path
        return None
    cap = getattr(lm.config, "final_logit_softcapping", None) if _head_kind(lm) == "softcap" \
        else None
    return lm, head, (float(cap) if cap else None)


def _chunk_logits(h, weight, bias, cap, temperature):
    """``softcap(h Wᵀ + b) / T`` in fp32 (head and cap in the model's dtype, as its forward)."""
    z = F.linear(h, weight, bias)
    if cap is not None:
        z = torch.tanh(z / cap) * cap
    return z.float() / temperature, z  # a new tensor even at T = 1 (callers write into it)


class _ChunkedHeadLogProbs(torch.autograd.Function):
    """``log p_i = z_i[y_i] - logsumexp(z_i)``, ``z_i = softcap(h_i Wᵀ + b) / T``, chunk by chunk.

    Gradient (``g_i`` the incoming gradient, ``p_i = softmax(z_i)``):
    ``∂/∂z_i = g_i (onehot(y_i) - p_i)``, through ``/T`` and the cap
    (``d cap·tanh(a/cap) / da = 1 - tanh²(a/cap)``) to ``∂/∂a_i``; ``dh_i = ∂a_i W``,
    ``dW = Σ_i ∂a_iᵀ h_i``, ``db = Σ_i ∂a_i`` — logits recomputed per chunk, never saved.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, cap, chunk):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk):
            z, _ = _chunk_logits(hidden[s:s + chunk], weight, bias, cap, temperature)
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            out[s:s + chunk] = z.gather(-1, targets[s:s + chunk, None])[:, 0] - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.cap, ctx.chunk = temperature, cap, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if need_b and bias is not None else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s:s + ctx.chunk]
            dz, raw = _chunk_logits(h, weight, bias, ctx.cap, ctx.temperature)
            if ctx.cap is None:
                del raw  # only the cap's derivative needs it
            g = grad_out[s:s + ctx.chunk].float()
            # In place on the fresh fp32 logits: at most two [chunk, V] tensors at once.
            dz.sub_(lse[s:s + ctx.chunk, None]).exp_().mul_(-g[:, None])  # -g·p
            dz.scatter_add_(-1, targets[s:s + ctx.chunk, None], g[:, None])  # + g·onehot(y)
            dz.div_(ctx.temperature)
            if ctx.cap is not None:
                dz.mul_(1 - (raw.float() / ctx.cap).square())  # raw = cap·tanh(a/cap)
                del raw
            if grad_h is not None:
                grad_h[s:s + ctx.chunk] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(dz.t(), h.float())
            if grad_b is not None:
                grad_b += dz.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None,
                None, None, None, None)


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  targets: torch.Tensor, *, temperature: float = 1.0, cap: float | None = None,
                  chunk: int | None = None) -> torch.Tensor:
    """``log softmax(softcap(h Wᵀ + b) / T)[y]`` for each row of ``hidden`` [N, d] and target
    ``y`` [N]: fp32 [N], differentiable in ``hidden``, ``weight`` and ``bias``, computed
    ``chunk`` rows at a time (default :func:`chunk_positions`)."""
    if temperature <= 0:
        raise NLAError(f"temperature: expected > 0 for log-probs, found {temperature}")
    chunk = chunk or chunk_positions(weight.shape[0])
    return _ChunkedHeadLogProbs.apply(hidden, weight, bias, targets.long(), float(temperature),
                                      cap, int(chunk))


@contextmanager
def _head_replaced(lm, head, compute):
    """Within the block, ``head(x)`` returns ``compute(head, x)``; the model's own soft-cap is
    switched off (``compute`` applies it), so the forward returns ``compute``'s value as logits."""
    config, had_cap = lm.config, hasattr(lm.config, "final_logit_softcapping")
    cap = getattr(config, "final_logit_softcapping", None)
    own = head.__dict__.get("forward")  # e.g. accelerate's hooked forward
    head.forward = lambda x: compute(head, x)
    if had_cap:
        config.final_logit_softcapping = None
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
        if had_cap:
            config.final_logit_softcapping = cap


def next_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        select: torch.Tensor, *, targets: torch.Tensor | None = None,
                        temperature: float = 1.0, lean: bool = True,
                        chunk: int | None = None) -> torch.Tensor:
    """``log softmax(z_{b,t} / T)[x_{b,t+1}]`` for every ``select[b, t]`` (``select`` is
    ``[B, T-1]``: column ``t`` predicts token ``t + 1``), flattened row-major to fp32 ``[N]``.
    ``targets`` [N] replaces the scored tokens ``x_{b,t+1}`` (e.g. SFT labels).

    ``lean`` (and a head :func:`lean_head` accepts): logits only at the selected positions, in
    chunks (module doc); otherwise the full ``[B, T, V]`` formula. Call it inside any injection
    context: it runs one forward of ``model`` either way.
    """
    if temperature <= 0:
        raise NLAError(f"temperature: expected > 0 for log-probs, found {temperature}")
    select = select.to(input_ids.device, torch.bool)
    if select.shape != (input_ids.shape[0], input_ids.shape[1] - 1):
        raise NLAError(f"select: expected shape [B, T-1] = {[input_ids.shape[0], input_ids.shape[1] - 1]}"
                       f" for input_ids {list(input_ids.shape)}, found {list(select.shape)}")
    if targets is None:
        targets = input_ids[:, 1:][select]
    elif targets.shape != (int(select.sum()),):
        raise NLAError(f"targets: expected one per selected position ({int(select.sum())}), "
                       f"found shape {list(targets.shape)}")
    targets = targets.to(input_ids.device, torch.long)
    found = lean_head(model) if lean else None
    if found is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        return logp[select].gather(-1, targets[:, None])[:, 0]
    lm, head, cap = found
    calls = []

    def compute(head, hidden):  # hidden: [B, T, d], the final (normed) hidden states
        calls.append(hidden.shape)
        return head_logprobs(hidden[:, :-1][select], head.weight, head.bias, targets,
                             temperature=temperature, cap=cap, chunk=chunk)

    with _head_replaced(lm, head, compute):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    if len(calls) != 1 or tuple(calls[0][:2]) != tuple(input_ids.shape):
        raise NLAError(f"{type(lm).__name__}: its forward did not pass the full hidden states "
                       f"through its output head once (calls: {calls}); call with lean=False")
    return out
