"""AV/AR supervised batches and losses: labels, marker, turn close, exact sums, the shuffle control."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nla_rl.ar_model import ActivationReconstructor
from nla_rl.injection import inject
from nla_rl.metrics import cosine
from nla_rl.roundtrip import InjectionSpec
from nla_rl.sft import (IGNORE_INDEX, SFTError, ar_sft_loss, av_sft_loss, build_ar_sft_batch,
                        build_av_sft_batch, micro_batches, shuffled, turn_close_ids)
from nla_rl.templates import (DEFAULT_AR_TEMPLATE, DEFAULT_AV_TEMPLATE, DEPTH_AV_TEMPLATE, ar_text,
                              av_prompt_ids, av_sft_target)
from nla_rl.testing.tiny import TINY_MARKER_CHAR, turn_close_token
from nla_rl.tokens import marker_tokens

EXPLANATIONS = ["the red cat sits near the river", "two dogs", "a calm blue ocean and many happy birds"]
SHORT_TEMPLATE = "Explain <concept>{injection_char}</concept> now."
SPECS = {"replace": InjectionSpec("replace", scale=40.0), "add": InjectionSpec("add", layer=1)}


def vectors(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3.0


def av_batch(tiny, explanations=EXPLANATIONS, **kw):
    tok = tiny.tokenizer
    template = kw.pop("template", DEFAULT_AV_TEMPLATE)
    marker = marker_tokens(tok, template, TINY_MARKER_CHAR, depth_pct=kw.get("depth_pct"))
    return build_av_sft_batch(tok, explanations, vectors(len(explanations), tiny.d_model),
                              marker=marker, template=template, **kw)


def fresh_model(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.float32)


# ------------------------------------------------------------------------------- batch builder

def test_turn_close_is_read_from_the_chat_template(tiny):
    ids = turn_close_ids(tiny.tokenizer)
    assert tiny.tokenizer.decode(ids) == turn_close_token(tiny.family)
    assert len(ids) == 1


def test_labels_are_exactly_the_target_and_turn_close(tiny):
    tok = tiny.tokenizer
    batch = av_batch(tiny)
    prompt = av_prompt_ids(tok, DEFAULT_AV_TEMPLATE, TINY_MARKER_CHAR)
    close = turn_close_token(tiny.family)
    assert batch.vectors.dtype == torch.float32 and batch.vectors.shape == (3, tiny.d_model)
    lengths = batch.attention_mask.sum(1)
    assert lengths.min() < batch.input_ids.shape[1]  # rows of different lengths really are padded
    for b, explanation in enumerate(EXPLANATIONS):
        n = int(lengths[b])
        assert batch.attention_mask[b, :n].all() and not batch.attention_mask[b, n:].any()  # right
        assert batch.input_ids[b, :len(prompt)].tolist() == prompt
        trained = batch.labels[b][batch.labels[b] != IGNORE_INDEX]
        assert tok.decode(trained) == av_sft_target(explanation) + close
        assert torch.equal(batch.labels[b, len(prompt):n], batch.input_ids[b, len(prompt):n])
        assert (batch.labels[b, :len(prompt)] == IGNORE_INDEX).all()
        assert (batch.labels[b, n:] == IGNORE_INDEX).all()
        assert batch.input_ids[b, batch.marker_positions[b]] == tok.convert_tokens_to_ids(
            tok.tokenize(TINY_MARKER_CHAR))[0]
        if tok.bos_token_id is not None and tok("x")["input_ids"][0] == tok.bos_token_id:
            assert batch.input_ids[b, :n].tolist().count(tok.bos_token_id) == 1  # no double BOS
    assert batch.num_target_tokens() == int((batch.labels != IGNORE_INDEX).sum())


def test_prefill_is_in_the_prompt_not_in_the_labels(qwen):
    batch = av_batch(qwen, prefill="<explanation>")
    trained = batch.labels[0][batch.labels[0] != IGNORE_INDEX]
    assert qwen.tokenizer.decode(trained) == "\n" + EXPLANATIONS[0] + "\n</explanation><|im_end|>"
    full = qwen.tokenizer.decode(batch.input_ids[0][batch.attention_mask[0].bool()])
    assert full.endswith("<|im_start|>assistant\n" + av_sft_target(EXPLANATIONS[0]) + "<|im_end|>")
    with pytest.raises(SFTError, match="prefix"):
        av_batch(qwen, prefill="<answer>")


def test_depth_template_and_max_length(qwen):
    batch = av_batch(qwen, template=DEPTH_AV_TEMPLATE, depth_pct=63)
    assert "63%" in qwen.tokenizer.decode(batch.input_ids[0])
    full = av_batch(qwen)
    prompt_len = int(full.labels[0].ne(IGNORE_INDEX).float().argmax())
    cut = av_batch(qwen, max_length=prompt_len + 3)
    assert cut.input_ids.shape[1] == prompt_len + 3 and cut.num_target_tokens() == 3 * 3
    with pytest.raises(SFTError, match="max_length"):
        av_batch(qwen, max_length=prompt_len)


def test_bad_vectors_are_refused(qwen):
    marker = marker_tokens(qwen.tokenizer, DEFAULT_AV_TEMPLATE, TINY_MARKER_CHAR)
    kw = dict(marker=marker, template=DEFAULT_AV_TEMPLATE)
    with pytest.raises(SFTError, match="vectors shape"):
        build_av_sft_batch(qwen.tokenizer, EXPLANATIONS, torch.ones(2, qwen.d_model), **kw)
    bad = torch.ones(3, qwen.d_model)
    bad[1, 0] = float("nan")
    with pytest.raises(SFTError, match="NaN"):
        build_av_sft_batch(qwen.tokenizer, EXPLANATIONS, bad, **kw)


def test_turn_close_falls_back_to_eos(qwen):
    tok = AutoTokenizer.from_pretrained(qwen.path)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    assert turn_close_ids(tok) == [tok.eos_token_id]
    tok.chat_template = None
    with pytest.raises(SFTError, match="chat template"):
        turn_close_ids(tok)


def test_slice_trims_padding_and_keeps_marker_columns(qwen):
    batch = av_batch(qwen)
    short = batch.slice(1, 2)  # "two dogs" is the shortest row
    assert short.input_ids.shape == (1, int(batch.attention_mask[1].sum()))
    assert short.attention_mask.all()
    assert torch.equal(short.marker_positions, batch.marker_positions[1:2])
    assert torch.equal(short.vectors, batch.vectors[1:2])
    parts = list(micro_batches(batch, 2))
    assert [len(p) for p in parts] == [2, 1]
    assert sum(p.num_target_tokens() for p in parts) == batch.num_target_tokens()
    with pytest.raises(SFTError):
        batch.slice(2, 2)


# ------------------------------------------------------------------------------------ AV loss

@pytest.mark.parametrize("family", ["replace", "add"])
def test_av_loss_equals_hand_computed_cross_entropy(tiny, family):
    model, batch, spec = tiny.model, av_batch(tiny), SPECS[family]
    with torch.no_grad():
        loss, count = av_sft_loss(model, batch, spec)
        with inject(model, family=spec.family, vectors=batch.vectors, scale=spec.scale,
                    positions=batch.injection_positions(), layer=spec.layer):
            logp = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = logp.float().log_softmax(-1)
    expected, n = 0.0, 0
    for b in range(len(batch)):
        for t in range(1, batch.input_ids.shape[1]):
            if batch.labels[b, t] != IGNORE_INDEX:
                expected -= float(logp[b, t - 1, batch.labels[b, t]])
                n += 1
    assert count == n == batch.num_target_tokens()
    assert math.isclose(float(loss), expected, rel_tol=1e-5)
    # Micro-batches: the summed pieces give the same total (right padding changes nothing).
    with torch.no_grad():
        pieces = [av_sft_loss(model, mb, spec) for mb in micro_batches(batch, 2)]
    assert sum(c for _, c in pieces) == count
    assert math.isclose(sum(float(lo) for lo, _ in pieces), float(loss), rel_tol=1e-5)


def test_shuffled_is_a_seeded_derangement(qwen):
    batch = av_batch(qwen, EXPLANATIONS * 2)
    for seed in range(5):
        out = shuffled(batch, seed)
        match = (out.vectors.unsqueeze(1) == batch.vectors.unsqueeze(0)).all(-1)  # [new, old]
        assert match.sum(1).eq(1).all() and match.sum(0).eq(1).all()  # a permutation
        assert not match.diagonal().any()  # no row keeps its own vector
        assert torch.equal(out.input_ids, batch.input_ids)
        assert torch.equal(shuffled(batch, seed).vectors, out.vectors)
    assert not torch.equal(shuffled(batch, 0).vectors, shuffled(batch, 1).vectors)
    assert torch.equal(shuffled(batch.slice(0, 1), 0).vectors, batch.vectors[:1])


def test_sft_learns_to_use_the_injected_vector(tiny_models):
    """Two rows whose only difference is the vector: after some steps the real pairing is scored
    far better than the shuffled control (the model reads the injection). Llama: the shortest
    prompt of the tiny families (no default system prompt)."""
    llama = tiny_models["llama"]
    torch.manual_seed(0)
    model = fresh_model(llama).train()
    batch = av_batch(llama, ["red cat", "blue dog"], template=SHORT_TEMPLATE)
    spec, control = SPECS["replace"], shuffled(batch, seed=0)
    with torch.no_grad():
        assert float(av_sft_loss(model, batch, spec)[0]) != float(av_sft_loss(model, control, spec)[0])
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(160):
        loss, count = av_sft_loss(model, batch, spec)
        (loss / count).backward()
        optim.step()
        optim.zero_grad()
        if step % 20 == 19:  # without the vector the loss cannot go below log(2) per row
            with torch.no_grad():
                real = float(av_sft_loss(model, batch, spec)[0]) / count
                fake = float(av_sft_loss(model, control, spec)[0]) / count
            if real < 0.2 * fake:
                break
    assert real < 0.2 * fake, (step, real, fake)


def test_av_loss_trains_a_lora_adapter(qwen):
    """Through a peft wrapper the same loss reaches the adapter (the learner's LoRA path)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(fresh_model(qwen), LoraConfig(r=4, lora_alpha=8,
                                                         target_modules=["q_proj", "v_proj"]))
    batch = av_batch(qwen)
    with torch.no_grad():
        expected, _ = av_sft_loss(qwen.model, batch, SPECS["add"])  # B = 0: same function
    loss, count = av_sft_loss(model, batch, SPECS["add"])
    assert math.isclose(float(loss.detach()), float(expected), rel_tol=1e-5)
    (loss / count).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_av_loss_needs_targets(qwen):
    batch = av_batch(qwen)
    batch.labels[:] = IGNORE_INDEX
    with pytest.raises(SFTError, match="no target"):
        av_sft_loss(qwen.model, batch, SPECS["replace"])


# ------------------------------------------------------------------------------------ AR side

def test_ar_batch_is_right_padded_with_one_bos(tiny):
    tok = tiny.tokenizer
    batch = build_ar_sft_batch(tok, EXPLANATIONS, vectors(3, tiny.d_model), template=DEFAULT_AR_TEMPLATE)
    assert batch.targets.dtype == torch.float32
    for b, explanation in enumerate(EXPLANATIONS):
        n = int(batch.attention_mask[b].sum())
        assert batch.attention_mask[b, :n].all() and not batch.attention_mask[b, n:].any()
        row = batch.input_ids[b, :n].tolist()
        assert row == tok(ar_text(DEFAULT_AR_TEMPLATE, explanation))["input_ids"]
        assert tok.decode(row, skip_special_tokens=True) == ar_text(DEFAULT_AR_TEMPLATE, explanation)
        if tiny.family in ("llama", "gemma3"):
            assert row[0] == tok.bos_token_id and row.count(tok.bos_token_id) == 1
    with pytest.raises(SFTError, match="max_length"):
        build_ar_sft_batch(tok, EXPLANATIONS, vectors(3, tiny.d_model), template=DEFAULT_AR_TEMPLATE,
                           max_length=4)


def test_ar_loss_is_summed_two_one_minus_cos(qwen):
    ar = ActivationReconstructor.from_base(qwen.path, 1)
    gold = vectors(3, qwen.d_model, seed=3)
    batch = build_ar_sft_batch(qwen.tokenizer, EXPLANATIONS, gold, template=DEFAULT_AR_TEMPLATE)
    with torch.no_grad():
        preds = ar.reconstruct(qwen.tokenizer, EXPLANATIONS, template=DEFAULT_AR_TEMPLATE)
        loss, count = ar_sft_loss(ar, batch, math.sqrt(qwen.d_model))
    assert count == 3
    expected = float((2 * (1 - cosine(preds, gold))).sum())
    assert math.isclose(float(loss), expected, rel_tol=1e-4)
    # The identity case: gold = the AR's own prediction (any norm) gives zero loss.
    same = build_ar_sft_batch(qwen.tokenizer, EXPLANATIONS, preds * 7.0, template=DEFAULT_AR_TEMPLATE)
    with torch.no_grad():
        assert float(ar_sft_loss(ar, same, math.sqrt(qwen.d_model))[0]) < 1e-4
    loss, _ = ar_sft_loss(ar, batch.slice(0, 2), math.sqrt(qwen.d_model))
    loss.backward()  # differentiable through the backbone and the head
    assert ar.value_head.weight.grad is not None and torch.isfinite(ar.value_head.weight.grad).all()
