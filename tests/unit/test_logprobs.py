"""Lean log-probs (nla_rl.logprobs): equal to the full-vocabulary formula, values and gradients,
on the qwen2, llama and gemma3 families (Gemma with its final soft-cap), through the GRPO and
AV-SFT losses, under peft; never a whole [B, T, V] tensor; the full path where lean cannot match."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from nla_rl.errors import NLAError
from nla_rl.grpo import PolicyLossSettings
from nla_rl.logprobs import head_logprobs, lean_head, next_token_logprobs
from nla_rl.rl_batch import build_policy_batch, grpo_micro_loss, token_logprobs
from nla_rl.roundtrip import InjectionSpec
from nla_rl.sft import av_sft_loss, build_av_sft_batch
from nla_rl.templates import DEFAULT_AV_TEMPLATE, av_prompt_ids
from nla_rl.tokens import marker_tokens

FAMILIES = ("qwen2", "llama", "gemma3")
SPEC = InjectionSpec("replace", 8.0)
SETTINGS = PolicyLossSettings(clip_low=0.2, clip_high=0.28, kl_beta=0.05, kl_estimator="k3",
                              is_cap=2.0, mismatch_threshold=None, loss_agg="token_mean")


def reference_logprobs(model, ids, mask, select, temperature):
    """Today's formula, verbatim: full logits, fp32, / T, log_softmax over V, gather, select."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)[select]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def ragged_rows(vocab, seed=0):
    """Three right-padded rows; scored columns from 4 on, fewer in the padded row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    select = torch.zeros(3, 13, dtype=torch.bool)
    select[:, 4:] = True
    select[1, 8:] = False
    return ids, mask, select


@pytest.fixture(params=FAMILIES + ("gemma3-softcap",))
def lm(request, tiny_models):
    family = request.param.split("-")[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family].path, dtype=torch.float32)
    if request.param.endswith("softcap"):  # Gemma-2/3's final cap (off in Gemma-3 by default)
        model.config.final_logit_softcapping = 3.0
    return model


def assert_same_values_and_grads(model, run_lean, run_full, weights, atol=1e-5):
    model.zero_grad()
    lean = run_lean()
    (lean * weights).sum().backward()
    lean_grads = grads(model)
    model.zero_grad()
    full = run_full()
    (full * weights).sum().backward()
    full_grads = grads(model)
    assert lean.dtype == torch.float32 and lean.shape == full.shape
    assert torch.allclose(lean, full, atol=atol), (lean - full).abs().max()
    assert lean_grads.keys() == full_grads.keys() and full_grads
    for name, g in full_grads.items():
        assert torch.allclose(lean_grads[name], g, atol=atol, rtol=1e-4), name


def test_lean_equals_the_full_formula_values_and_gradients(lm):
    ids, mask, select = ragged_rows(lm.config.vocab_size)
    assert lean_head(lm) is not None
    weights = torch.linspace(-1.0, 2.0, int(select.sum()))
    # chunk=4 splits the 25 scored positions unevenly, so chunk edges are exercised.
    assert_same_values_and_grads(
        lm, lambda: next_token_logprobs(lm, ids, mask, select, temperature=0.7, chunk=4),
        lambda: reference_logprobs(lm, ids, mask, select, 0.7), weights)
    if lm.config.model_type == "gemma3_text" and lm.config.final_logit_softcapping:
        with torch.no_grad():  # the cap is really applied (and restored after the lean call)
            logits = lm(input_ids=ids, attention_mask=mask).logits
        assert float(logits.abs().max()) <= 3.0


def test_grpo_loss_lean_equals_full(lm, tiny_models):
    tok = tiny_models[lm.config.model_type.replace("_text", "")].tokenizer
    marker = marker_tokens(tok, DEFAULT_AV_TEMPLATE, None)
    prompt = av_prompt_ids(tok, DEFAULT_AV_TEMPLATE, marker.char)
    completions = [[5, 9, 11, 12], [7], [13, 14, 15, 16, 17], []]
    torch.manual_seed(0)
    vectors = torch.randn(4, lm.config.hidden_size)
    logp = [[-2.0 - 0.1 * i for i in range(len(c))] for c in completions]
    batch = build_policy_batch([prompt] * 4, completions, vectors, [1.0, -1.0, 0.5, 2.0],
                               marker=marker, pad_id=tok.pad_token_id, engine_logp=logp,
                               old_logp=logp, ref_logp=[[v - 0.3 for v in r] for r in logp])

    def loss(lean):
        return grpo_micro_loss(lm, batch, SPEC, SETTINGS, 0.9, lean=lean).loss_sum.reshape(1)

    assert_same_values_and_grads(lm, lambda: loss(True), lambda: loss(False), torch.ones(1))
    with torch.no_grad():
        lean = token_logprobs(lm, batch, SPEC, 0.9)
    assert not lean[~batch.response_mask].any()  # unscored columns are 0, not junk


def test_av_sft_loss_lean_equals_full(lm, tiny_models):
    tok = tiny_models[lm.config.model_type.replace("_text", "")].tokenizer
    marker = marker_tokens(tok, DEFAULT_AV_TEMPLATE, None)
    batch = build_av_sft_batch(tok, ["the red cat sits", "two dogs", "a calm blue ocean and birds"],
                               torch.randn(3, lm.config.hidden_size), marker=marker,
                               template=DEFAULT_AV_TEMPLATE)

    def loss(lean):
        value, count = av_sft_loss(lm, batch, SPEC, lean=lean)
        assert count == batch.num_target_tokens()
        return value.reshape(1)

    assert_same_values_and_grads(lm, lambda: loss(True), lambda: loss(False), torch.ones(1),
                                 atol=1e-4)


def test_lora_adapter_gradients_match(qwen):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(qwen.path),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    assert lean_head(model) is not None
    ids, mask, select = ragged_rows(model.config.vocab_size, seed=1)
    weights = torch.linspace(-1.0, 1.0, int(select.sum()))
    assert_same_values_and_grads(
        model, lambda: next_token_logprobs(model, ids, mask, select, temperature=1.3, chunk=7),
        lambda: reference_logprobs(model, ids, mask, select, 1.3), weights)
    assert all("lora_" in name for name in grads(model))  # the frozen head got no gradient


def test_head_logprobs_with_bias_and_bf16():
    torch.manual_seed(0)
    h = torch.randn(9, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    y = torch.randint(0, 50, (9,))
    out = head_logprobs(h, w, b, y, temperature=0.5, cap=4.0, chunk=2)
    z = torch.tanh((h @ w.T + b) / 4.0) * 4.0
    ref = torch.log_softmax(z / 0.5, -1).gather(-1, y[:, None])[:, 0]
    assert torch.allclose(out, ref, atol=1e-5)
    got = torch.autograd.grad(out.sum(), (h, w, b))
    want = torch.autograd.grad(ref.sum(), (h, w, b))
    for a, e in zip(got, want):
        assert torch.allclose(a, e, atol=1e-4)
    hb, wb = h.detach().bfloat16(), w.detach().bfloat16()  # the head runs in the model's dtype
    out = head_logprobs(hb, wb, None, y, chunk=4)
    ref = torch.log_softmax((hb @ wb.T).float(), -1).gather(-1, y[:, None])[:, 0]
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any operator produces (forward and backward), leaving out
    those shaped like a weight (``ignore``: the head's weight and its gradient)."""

    def __init__(self, ignore: tuple[int, int]):
        super().__init__()
        self.ignore, self.largest = {ignore, ignore[::-1]}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) not in self.ignore:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_whole_vocabulary_tensor_is_ever_built(qwen):
    model = AutoModelForCausalLM.from_pretrained(qwen.path)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    ids, mask, select = ragged_rows(vocab)
    with LargestOutput(ignore=(vocab, hidden)) as lean:
        next_token_logprobs(model, ids, mask, select, chunk=4).sum().backward()
    with LargestOutput(ignore=(vocab, hidden)) as full:
        reference_logprobs(model, ids, mask, select, 1.0).sum().backward()
    whole = ids.shape[0] * (ids.shape[1] - 1) * vocab
    assert full.largest >= whole  # the old path does build [B, T-1, V]
    # The lean one: one chunk of logits (4 positions), or something without a vocabulary axis.
    assert lean.largest <= max(4 * vocab, ids.numel() * 4 * hidden) < whole


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_models_the_lean_path_cannot_match_take_the_full_one(qwen):
    class Scaled(Qwen2ForCausalLM):  # a subclass may change the forward: never lean
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    scaled = Scaled.from_pretrained(qwen.path)
    ids, mask, select = ragged_rows(scaled.config.vocab_size)
    assert lean_head(scaled) is None
    with torch.no_grad():
        got = next_token_logprobs(scaled, ids, mask, select)
        assert torch.allclose(got, reference_logprobs(scaled, ids, mask, select, 1.0))

    from peft import LoraConfig, get_peft_model

    head_lora = get_peft_model(copy.deepcopy(qwen.model),
                               LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    assert lean_head(head_lora) is None  # a LoRA-wrapped head is not a plain Linear


def test_bad_input(qwen):
    ids, mask, select = ragged_rows(qwen.model.config.vocab_size)
    with pytest.raises(NLAError, match="temperature"):
        next_token_logprobs(qwen.model, ids, mask, select, temperature=0)
    with pytest.raises(NLAError, match=r"select: expected shape \[B, T-1\]"):
        next_token_logprobs(qwen.model, ids, mask, select[:, :-1])
    with pytest.raises(NLAError, match="targets: expected one per selected position"):
        next_token_logprobs(qwen.model, ids, mask, select, targets=torch.zeros(3))
