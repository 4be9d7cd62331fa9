"""Activation injection: both families, prompt embeddings, generation, checkpointing, peft."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, Gemma3TextConfig, Qwen2Config

from nla_rl.errors import InjectionError
from nla_rl.injection import (build_batch_prompt_embeds, build_prompt_embeds, embed_multiplier,
                              generate_with_injection, get_decoder_layers, get_embedding_module,
                              inject)
from nla_rl.templates import DEFAULT_AV_TEMPLATE, av_prompt_ids
from nla_rl.testing.tiny import TINY_MARKER_CHAR, tiny_config
from nla_rl.tokens import find_marker_positions, marker_tokens

FAMILY_KW = {"replace": dict(family="replace", scale=37.5), "add": dict(family="add", layer=1)}


# ----------------------------------------------------------------------------- helpers

def prompt_batch(tok, prefills=("",)):
    """Left-padded AV prompts (one per prefill), attention mask, and marker positions."""
    seqs = [av_prompt_ids(tok, DEFAULT_AV_TEMPLATE, TINY_MARKER_CHAR, prefill=p) for p in prefills]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    marker = marker_tokens(tok, DEFAULT_AV_TEMPLATE, TINY_MARKER_CHAR)
    return ids, mask, find_marker_positions(ids, marker, len(seqs))


def random_vectors(n, d, seed=0, norm=123.0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g)
    return v / v.norm(dim=-1, keepdim=True) * norm


def capture(module, store, key):
    """Register a forward hook that stores the module's (first) output under ``store[key]``."""
    def hook(mod, args, out):
        store[key] = (out[0] if isinstance(out, tuple) else out).detach().clone()
    return module.register_forward_hook(hook)


def position_ids(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def fresh(tiny, train=False):
    model = AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.float32)
    return model.train() if train else model.eval()


def lm_loss(model, ids, **kw):
    logits = model(input_ids=ids, **kw).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


# ----------------------------------------------------------------------------- structure

def test_decoder_layers_and_embeddings_found(tiny):
    layers = get_decoder_layers(tiny.model)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 4
    assert get_embedding_module(tiny.model) is tiny.model.get_input_embeddings()


def test_unknown_architecture_is_refused():
    with pytest.raises(InjectionError, match="decoder blocks"):
        get_decoder_layers(torch.nn.Linear(3, 3))


def test_embed_multiplier_matches_gemma_module(tiny):
    mult = embed_multiplier(tiny.model)
    if tiny.family == "gemma3":
        assert mult == 8.0 == embed_multiplier(tiny.model.config)
        ids = torch.tensor([[1, 2, 3]])
        emb = get_embedding_module(tiny.model)
        with torch.no_grad():
            torch.testing.assert_close(emb(ids), emb.weight[ids] * mult, rtol=0, atol=0)
    else:
        assert mult == 1.0 == embed_multiplier(tiny.model.config)


def test_embed_multiplier_rounds_like_the_model_in_bf16():
    # Gemma-3-12B: d = 3840, sqrt = 61.9677..., which bf16 rounds to 62.0 inside the model.
    cfg = Gemma3TextConfig(hidden_size=3840)
    assert embed_multiplier(cfg) == float(torch.tensor(3840 ** 0.5))
    assert embed_multiplier(cfg, torch.bfloat16) == 62.0
    assert embed_multiplier(Qwen2Config(hidden_size=3584), torch.bfloat16) == 1.0


# ----------------------------------------------------------------------------- replace

def test_replace_normalizes_to_scale(tiny):
    ids, mask, pos = prompt_batch(tiny.tokenizer)
    got = {}
    for raw_norm in (0.003, 5000.0):  # multiply-by-scale would give 0.003·s and 5000·s
        v = random_vectors(1, tiny.d_model, norm=raw_norm)
        with torch.no_grad(), inject(tiny.model, vectors=v, positions=pos, **FAMILY_KW["replace"]):
            h = capture(get_embedding_module(tiny.model), got, "emb")
            tiny.model(input_ids=ids, attention_mask=mask)
            h.remove()
        row = got["emb"][0, pos[0, 1]]
        assert row.norm().item() == pytest.approx(37.5, rel=1e-6)
        torch.testing.assert_close(row, v[0] / v[0].norm() * 37.5, rtol=1e-5, atol=1e-6)


def test_replace_changes_only_the_marker_row(tiny):
    """Other rows keep their ordinary (for Gemma: √d-scaled) embeddings; the marker row is n_s(v),
    not n_s(v)·√d."""
    ids, mask, pos = prompt_batch(tiny.tokenizer)
    emb = get_embedding_module(tiny.model)
    got = {}
    with torch.no_grad():
        h = capture(emb, got, "plain")
        tiny.model(input_ids=ids, attention_mask=mask)
        h.remove()
        v = random_vectors(1, tiny.d_model)
        with inject(tiny.model, vectors=v, positions=pos, **FAMILY_KW["replace"]) as inj:
            h = capture(emb, got, "inj")
            tiny.model(input_ids=ids, attention_mask=mask)
            h.remove()
    col = int(pos[0, 1])
    others = torch.ones(ids.shape[1], dtype=torch.bool)
    others[col] = False
    torch.testing.assert_close(got["inj"][0, others], got["plain"][0, others], rtol=0, atol=0)
    torch.testing.assert_close(got["plain"][0], emb.weight[ids[0]] * embed_multiplier(tiny.model),
                               rtol=0, atol=0)
    assert got["inj"][0, col].norm().item() == pytest.approx(37.5, rel=1e-6)  # not 37.5·√d
    assert inj.applied == 1 and inj.passes == 1


@pytest.mark.parametrize("family", ["replace", "add"])
def test_prompt_embeds_equal_in_model_injection(tiny, family):
    """model(inputs_embeds=build_prompt_embeds(...)) == model(input_ids) inside inject(replace);
    with the add family, plain prompt embeddings + inject == input_ids + inject."""
    ids, mask, pos = prompt_batch(tiny.tokenizer)
    v = random_vectors(1, tiny.d_model, seed=3)
    w = get_embedding_module(tiny.model).weight
    with torch.no_grad():
        with inject(tiny.model, vectors=v, positions=pos, **FAMILY_KW[family]) as inj:
            ref = tiny.model(input_ids=ids, attention_mask=mask).logits
            if family == "replace":
                embeds = build_prompt_embeds(w, ids[0].tolist(), v[0], int(pos[0, 1]), scale=37.5,
                                             multiplier=embed_multiplier(tiny.model))[None]
            else:
                embeds = w[ids] * embed_multiplier(tiny.model)
                got = tiny.model(inputs_embeds=embeds, attention_mask=mask).logits
        if family == "replace":  # outside the context: the embeddings carry the injection
            got = tiny.model(inputs_embeds=embeds, attention_mask=mask).logits
        plain = tiny.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (ref - plain).abs().max() > 1e-3  # the injection did something
    assert inj.applied == (1 if family == "replace" else 2)


def test_batch_prompt_embeds_match_single(qwen):
    ids, mask, pos = prompt_batch(qwen.tokenizer, ("", "<explanation>"))
    v = random_vectors(2, qwen.d_model)
    w = get_embedding_module(qwen.model).weight.detach()
    batch = build_batch_prompt_embeds(w, ids, v, pos, scale=9.0)
    for i in range(2):
        single = build_prompt_embeds(w, ids[i], v[i], int(pos[i, 1]), scale=9.0)
        torch.testing.assert_close(batch[i], single, rtol=0, atol=0)
    with pytest.raises(InjectionError, match="outside"):
        build_batch_prompt_embeds(w, ids, v, pos + torch.tensor([0, 999]), scale=9.0)


# ----------------------------------------------------------------------------- add

@pytest.mark.parametrize("layer,coeff", [(1, 1.0), (2, 0.5)])
def test_add_matches_hand_computation(tiny, layer, coeff):
    ids, mask, pos = prompt_batch(tiny.tokenizer)
    v = random_vectors(1, tiny.d_model, norm=0.7)
    layers = get_decoder_layers(tiny.model)
    plain, got = {}, {}
    with torch.no_grad():
        hs = [capture(layers[i], plain, i) for i in range(4)]
        tiny.model(input_ids=ids, attention_mask=mask)
        [h.remove() for h in hs]
        with inject(tiny.model, family="add", vectors=v, positions=pos, layer=layer, coeff=coeff):
            hs = [capture(layers[i], got, i) for i in range(4)]
            tiny.model(input_ids=ids, attention_mask=mask)
            [h.remove() for h in hs]
    col = int(pos[0, 1])
    h = plain[layer][0, col]  # the full residual stream at the block output
    expected = h + coeff * h.norm() * v[0] / v[0].norm()
    torch.testing.assert_close(got[layer][0, col], expected, rtol=1e-6, atol=1e-6)
    others = torch.ones(ids.shape[1], dtype=torch.bool)
    others[col] = False
    torch.testing.assert_close(got[layer][0, others], plain[layer][0, others], rtol=0, atol=0)
    for i in range(layer):  # earlier blocks untouched
        torch.testing.assert_close(got[i], plain[i], rtol=0, atol=0)
    # Later positions of later blocks see the change (it is the residual stream, not a side copy).
    assert (got[layer + 1][0, col:] - plain[layer + 1][0, col:]).abs().max() > 1e-3
    # A norm taken from anything but the full residual would not give this ratio.
    ratio = (got[layer][0, col] - h).norm() / h.norm()
    assert ratio.item() == pytest.approx(coeff, rel=1e-5)


def test_add_only_on_prompt_pass_during_generation(tiny):
    ids, mask, pos = prompt_batch(tiny.tokenizer, ("", "<explanation>"))
    v = random_vectors(2, tiny.d_model, seed=5)
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
               return_dict_in_generate=True, pad_token_id=tiny.tokenizer.pad_token_id)
    with torch.no_grad(), inject(tiny.model, family="add", vectors=v, positions=pos) as inj:
        out = tiny.model.generate(input_ids=ids, attention_mask=mask, **gen)
        assert inj.applied == 2 and inj.passes == 1  # one prompt pass, five decode steps untouched
        # A single full forward over prompt + generated tokens (marker injected once, no cache)
        # reproduces every decode step's logits.
        seq = out.sequences[:, :-1]
        full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
        full = tiny.model(input_ids=seq, attention_mask=full_mask,
                          position_ids=position_ids(full_mask)).logits
    for t, step in enumerate(out.logits):
        torch.testing.assert_close(step, full[:, ids.shape[1] - 1 + t], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["replace", "add"])
def test_chunked_prefill_injects_at_the_right_offset(tiny, family):
    """A prompt fed in two KV-cache chunks, the marker in the second one, equals the full pass:
    the hook finds the marker at (col - chunk start) and injects exactly once."""
    ids, mask, pos = prompt_batch(tiny.tokenizer)
    v = random_vectors(1, tiny.d_model, seed=9)
    cut = int(pos[0, 1]) - 3
    with torch.no_grad(), inject(tiny.model, vectors=v, positions=pos, **FAMILY_KW[family]) as inj:
        full = tiny.model(input_ids=ids).logits
        assert inj.applied == 1
        cache = DynamicCache(config=tiny.model.config)
        tiny.model(input_ids=ids[:, :cut], past_key_values=cache, use_cache=True)
        assert inj.applied == 1
        second = tiny.model(input_ids=ids[:, cut:], past_key_values=cache, use_cache=True).logits
        assert inj.applied == 2
    torch.testing.assert_close(second, full[:, cut:], rtol=1e-4, atol=1e-4)


def test_bf16_gemma_prompt_embeds_are_bit_exact():
    """In bf16 with a √d that bf16 must round (d = 96), build_prompt_embeds reproduces the
    embedding module's output (with the replace hook) bit for bit."""
    cfg = tiny_config("gemma3", 512, hidden=96, heads=3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    assert embed_multiplier(model) == embed_multiplier(cfg, torch.bfloat16) != math.sqrt(96)
    ids = torch.randint(0, 512, (2, 12))
    pos = torch.tensor([[0, 4], [1, 7]])
    v = random_vectors(2, 96, seed=1)
    emb, got = get_embedding_module(model), {}
    with torch.no_grad(), inject(model, family="replace", vectors=v, positions=pos, scale=80000.0):
        h = capture(emb, got, "emb")
        model(input_ids=ids)
        h.remove()
    built = build_batch_prompt_embeds(emb.weight.detach(), ids, v, pos, scale=80000.0,
                                      multiplier=embed_multiplier(model))
    assert built.dtype == torch.bfloat16 and torch.equal(built, got["emb"])


# ----------------------------------------------------------------------------- generation, batches

@pytest.mark.parametrize("family_name", ["qwen2", "gemma3"])
def test_generate_replace_matches_prompt_embeds(tiny_models, family_name):
    tiny = tiny_models[family_name]
    ids, mask, pos = prompt_batch(tiny.tokenizer)
    v = random_vectors(1, tiny.d_model, seed=11)
    gen = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
               pad_token_id=tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        a, inj = generate_with_injection(tiny.model, tiny.tokenizer, ids, mask, vectors=v,
                                         positions=pos, **FAMILY_KW["replace"], **gen)
        embeds = build_prompt_embeds(get_embedding_module(tiny.model).weight, ids[0], v[0],
                                     int(pos[0, 1]), scale=37.5,
                                     multiplier=embed_multiplier(tiny.model))
        b = tiny.model.generate(inputs_embeds=embeds[None], attention_mask=mask, **gen)
        # Same, but forgetting Gemma's √d on the ordinary rows (what this test must catch).
        wrong = build_prompt_embeds(get_embedding_module(tiny.model).weight, ids[0], v[0],
                                    int(pos[0, 1]), scale=37.5)
        c = tiny.model.model(inputs_embeds=wrong[None]).last_hidden_state
        d = tiny.model.model(inputs_embeds=embeds[None]).last_hidden_state
    assert a.sequences[0, ids.shape[1]:].tolist() == b.sequences[0].tolist()
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert inj.applied == 1
    assert torch.equal(c, d) == (family_name != "gemma3")


@pytest.mark.parametrize("family", ["replace", "add"])
def test_left_padded_batch_matches_each_alone(tiny, family):
    prefills = ("", "<explanation>\nthe red cat sits")
    ids, mask, pos = prompt_batch(tiny.tokenizer, prefills)
    assert ids.shape[1] > len(av_prompt_ids(tiny.tokenizer, DEFAULT_AV_TEMPLATE, TINY_MARKER_CHAR))
    assert pos[0, 1] != pos[1, 1]  # different columns because of left padding
    v = random_vectors(2, tiny.d_model, seed=2)
    with torch.no_grad():
        with inject(tiny.model, vectors=v, positions=pos, **FAMILY_KW[family]) as inj:
            both = tiny.model(input_ids=ids, attention_mask=mask,
                              position_ids=position_ids(mask)).logits[:, -1]
        assert inj.applied == 2
        for i, p in enumerate(prefills):
            one_ids, one_mask, one_pos = prompt_batch(tiny.tokenizer, (p,))
            with inject(tiny.model, vectors=v[i:i + 1], positions=one_pos, **FAMILY_KW[family]):
                alone = tiny.model(input_ids=one_ids, attention_mask=one_mask).logits[0, -1]
            torch.testing.assert_close(both[i], alone, rtol=1e-4, atol=1e-4)
        # Swapping the vectors changes both rows: each row got its own vector.
        with inject(tiny.model, vectors=v.flip(0), positions=pos, **FAMILY_KW[family]):
            swapped = tiny.model(input_ids=ids, attention_mask=mask,
                                 position_ids=position_ids(mask)).logits[:, -1]
    assert ((swapped - both).abs().amax(-1) > 1e-4).all()


def test_num_return_sequences_expands_vectors(qwen):
    ids, mask, pos = prompt_batch(qwen.tokenizer, ("", "<explanation>"))
    v = random_vectors(2, qwen.d_model, seed=4)
    with torch.no_grad():
        out, inj = generate_with_injection(qwen.model, qwen.tokenizer, ids, mask, vectors=v,
                                           positions=pos, num_return_sequences=3, max_new_tokens=3,
                                           do_sample=False, **FAMILY_KW["replace"])
    assert out.shape[0] == 6 and inj.applied == 6
    assert torch.equal(out[0], out[2]) and torch.equal(out[3], out[5])  # greedy: same per prompt
    with torch.no_grad(), pytest.raises(InjectionError, match="batch size"):
        with inject(qwen.model, vectors=v, positions=pos, **FAMILY_KW["replace"]):
            qwen.model(input_ids=ids[:1])


def test_counts_accumulate_per_pass(qwen):
    ids, mask, pos = prompt_batch(qwen.tokenizer, ("", "<explanation>"))
    v = random_vectors(2, qwen.d_model)
    with torch.no_grad(), inject(qwen.model, vectors=v, positions=pos, **FAMILY_KW["replace"]) as inj:
        qwen.model(input_ids=ids, attention_mask=mask)
        qwen.model(input_ids=ids, attention_mask=mask)
        qwen.model(input_ids=ids[:, :int(pos[:, 1].min())], attention_mask=mask[:, :int(pos[:, 1].min())])
    assert inj.applied == 4 and inj.passes == 2  # the truncated pass has no marker column


# ----------------------------------------------------------------------------- bad input, cleanup

@pytest.mark.parametrize("case,match", [
    ("zero", "all zeros"),
    ("nan", "NaN"),
    ("width", r"expected shape \[n, 64\]"),
    ("count", "1 marker position.*2 vector"),
    ("family", "injection family"),
    ("no_scale", "needs a finite injection scale"),
    ("add_scale", "takes no scale"),
    ("layer", "injection layer"),
    ("positions_shape", r"\[n, 2\]"),
])
def test_bad_input_is_refused(qwen, case, match):
    ids, mask, pos = prompt_batch(qwen.tokenizer)
    v = random_vectors(1, qwen.d_model)
    kw = dict(family="replace", vectors=v, positions=pos, scale=10.0)
    if case == "zero":
        kw["vectors"] = torch.zeros(1, qwen.d_model)
    elif case == "nan":
        kw["vectors"] = v.clone().index_fill_(1, torch.tensor([3]), float("nan"))
    elif case == "width":
        kw["vectors"] = torch.ones(1, qwen.d_model + 1)
    elif case == "count":
        kw["vectors"] = random_vectors(2, qwen.d_model)
    elif case == "family":
        kw["family"] = "multiply"
    elif case == "no_scale":
        kw["scale"] = None
    elif case == "add_scale":
        kw["family"] = "add"
    elif case == "layer":
        kw.update(family="add", scale=None, layer=4)
    elif case == "positions_shape":
        kw["positions"] = torch.tensor([[0, 1, 2]])
    with pytest.raises(InjectionError, match=match):
        with inject(qwen.model, **kw):
            pass


@pytest.mark.parametrize("family", ["replace", "add"])
def test_hooks_removed_after_context(qwen, family):
    ids, mask, pos = prompt_batch(qwen.tokenizer)
    model = qwen.model
    modules = list(model.modules())
    before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules]
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with pytest.raises(RuntimeError, match="boom"):
            with inject(model, vectors=random_vectors(1, qwen.d_model), positions=pos,
                        **FAMILY_KW[family]):
                assert (model(input_ids=ids, attention_mask=mask).logits - plain).abs().max() > 1e-3
                raise RuntimeError("boom")
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(after, plain)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules] == before


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("family", ["replace", "add"])
@pytest.mark.parametrize("order", ["before", "after", "reentrant"])
def test_gradient_checkpointing_consistent(tiny_models, family, order):
    """Checkpointing enabled before or after entering inject (or reentrant): same loss and grads
    as without; the loss differs from the un-injected one; the vector (requires_grad) gets a grad."""
    tiny = tiny_models["qwen2"]
    ids, mask, pos = prompt_batch(tiny.tokenizer, ("", "<explanation>"))

    def run(checkpointing):
        torch.manual_seed(0)
        model = fresh(tiny, train=True)
        v = random_vectors(2, tiny.d_model, seed=8).requires_grad_(True)
        if checkpointing and order != "after":
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": order == "reentrant"})
        with inject(model, vectors=v, positions=pos, **FAMILY_KW[family]) as inj:
            if checkpointing and order == "after":
                model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing == checkpointing
            loss = lm_loss(model, ids, attention_mask=mask)
            loss.backward()
        with torch.no_grad():  # eval: no checkpointing under no_grad (dropout is 0 anyway)
            plain = lm_loss(model.eval(), ids, attention_mask=mask)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), plain, grads, v.grad, inj.applied

    loss0, plain0, grads0, vgrad0, applied0 = run(False)
    loss1, plain1, grads1, vgrad1, applied1 = run(True)
    assert abs(loss1 - loss0) <= 1e-6 and abs(loss0 - plain0) > 1e-4
    assert torch.equal(plain0, plain1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 10
    for name in grads0:
        assert torch.isfinite(grads1[name]).all()
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-5)
    assert vgrad1 is not None and torch.isfinite(vgrad1).all() and vgrad1.abs().max() > 0
    torch.testing.assert_close(vgrad1, vgrad0, rtol=1e-5, atol=1e-6)
    assert applied0 == applied1 == 2  # the checkpoint recompute is not counted again


def test_replace_with_frozen_vectors_backprops_to_weights(qwen):
    model = fresh(qwen, train=True)
    ids, mask, pos = prompt_batch(qwen.tokenizer)
    with inject(model, vectors=random_vectors(1, qwen.d_model), positions=pos, **FAMILY_KW["replace"]):
        lm_loss(model, ids, attention_mask=mask).backward()
    emb_grad = get_embedding_module(model).weight.grad
    assert emb_grad is not None and torch.isfinite(emb_grad).all()


@pytest.mark.parametrize("family", ["replace", "add"])
def test_peft_wrapped_model(tiny_models, family):
    peft = pytest.importorskip("peft")
    tiny = tiny_models["qwen2"]
    ids, mask, pos = prompt_batch(tiny.tokenizer)
    v = random_vectors(1, tiny.d_model, seed=6)
    with torch.no_grad(), inject(tiny.model, vectors=v, positions=pos, **FAMILY_KW[family]):
        ref = tiny.model(input_ids=ids, attention_mask=mask).logits
    lora = peft.get_peft_model(fresh(tiny), peft.LoraConfig(r=4, lora_alpha=8,
                                                            target_modules=["q_proj", "v_proj"]))
    assert len(get_decoder_layers(lora)) == 4
    with torch.no_grad(), inject(lora, vectors=v, positions=pos, **FAMILY_KW[family]) as inj:
        got = lora(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # LoRA B = 0 at init
    assert inj.applied == 1
    # Training through the adapter with checkpointing: the LoRA weights get finite gradients.
    lora.train()
    lora.gradient_checkpointing_enable()
    with inject(lora, vectors=v, positions=pos, **FAMILY_KW[family]):
        lm_loss(lora, ids, attention_mask=mask).backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)
    assert not math.isnan(float(ref.sum()))


def test_d_model_looks_through_a_wrapper_whose_config_is_not_the_models(qwen):
    """A DeepSpeed engine wraps the model as ``.module`` and has a dict ``config`` of its own."""
    from nla_rl.injection import d_model_of

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.config = module, {"train_batch_size": 8}

    assert d_model_of(Engine(qwen.model)) == qwen.model.config.hidden_size
