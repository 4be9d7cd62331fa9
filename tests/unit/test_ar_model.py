import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import nla_rl.ar_model as ar_model
from nla_rl.ar_model import VALUE_HEAD_FILE, ActivationReconstructor, ARModelError, last_token_index
from nla_rl.errors import NLAError
from nla_rl.templates import DEFAULT_AR_TEMPLATE, ar_text
from nla_rl.testing.tiny import tiny_config

TEXTS = ["the cat sits", "a red house near the river and many birds sing quickly", "x", "two dogs"]


def _base_last_hidden(model, tokenizer, text, k):
    """Block-K output of the base model at the last token of the unpadded text."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[k + 1][0, -1]


def _batch(tokenizer, texts, side):
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        return tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = previous


def _safetensors_keys(directory):
    keys = set()
    for path in directory.glob("model*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("k", [0, 2])
def test_init_prediction_equals_base_block_output(tiny, k):
    ar = ActivationReconstructor.from_base(tiny.path, k)
    assert ar.layer_index == k and ar.d_model == tiny.d_model
    assert k + 1 < tiny.model.config.num_hidden_layers  # so hidden_states[k+1] is pre-final-norm
    expected = torch.stack([_base_last_hidden(tiny.model, tiny.tokenizer, t, k) for t in TEXTS])
    for side in ("left", "right"):
        enc = _batch(tiny.tokenizer, TEXTS, side)
        assert (enc.attention_mask == 0).any()  # texts of different lengths really are padded
        with torch.no_grad():
            pred = ar(enc.input_ids, enc.attention_mask)
        assert pred.dtype == torch.float32 and pred.shape == (len(TEXTS), tiny.d_model)
        torch.testing.assert_close(pred, expected, atol=1e-5, rtol=0)


def test_last_block_is_taken_before_the_final_norm(tiny):
    k = tiny.model.config.num_hidden_layers - 1
    ar = ActivationReconstructor.from_base(tiny.path, k)
    captured = {}
    hook = tiny.model.model.layers[k].register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        ids = tiny.tokenizer(TEXTS[1], return_tensors="pt").input_ids
        with torch.no_grad():
            tiny.model(ids)
            pred = ar(ids, torch.ones_like(ids))
    finally:
        hook.remove()
    torch.testing.assert_close(pred[0], captured["h"][0, -1], atol=1e-5, rtol=0)


def test_value_head_is_identity_and_bias_free(qwen):
    ar = ActivationReconstructor.from_base(qwen.path, 1)
    assert ar.value_head.bias is None
    assert torch.equal(ar.value_head.weight, torch.eye(qwen.d_model))
    assert isinstance(ar.backbone.lm_head, torch.nn.Identity)
    assert isinstance(ar.backbone.model.norm, torch.nn.Identity)


def test_saved_layout(tiny, tmp_path):
    k = 1
    ar = ActivationReconstructor.from_base(tiny.path, k)
    out = ar.save_pretrained(tmp_path / "ar", tokenizer=tiny.tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == k + 1
    if "layer_types" in config:
        assert len(config["layer_types"]) == k + 1
    keys = _safetensors_keys(out)
    assert keys and not any(key.startswith("lm_head") or key.startswith("model.norm") for key in keys)
    layers = {int(key.split(".")[2]) for key in keys if key.startswith("model.layers.")}
    assert layers == set(range(k + 1))
    head = load_file(str(out / VALUE_HEAD_FILE))
    assert list(head) == ["weight"] and head["weight"].shape == (tiny.d_model, tiny.d_model)
    assert AutoTokenizer.from_pretrained(out).padding_side == "right"
    assert tiny.tokenizer.padding_side == "left"  # the caller's tokenizer is left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ar"]  # no temp dir left behind
    # An ordinary HF directory: plain AutoModelForCausalLM loads it (norm/lm_head aside).
    lm = AutoModelForCausalLM.from_pretrained(out)
    assert lm.config.num_hidden_layers == k + 1


def test_save_load_roundtrip_after_perturbation(tiny, tmp_path):
    ar = ActivationReconstructor.from_base(tiny.path, 1)
    before = ar.reconstruct(tiny.tokenizer, TEXTS)
    torch.manual_seed(1)
    with torch.no_grad():
        ar.value_head.weight.add_(0.1 * torch.randn_like(ar.value_head.weight))
        ar.backbone.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    perturbed = ar.reconstruct(tiny.tokenizer, TEXTS)
    assert not torch.allclose(before, perturbed, atol=1e-3)
    ar.save_pretrained(tmp_path / "ar", tokenizer=tiny.tokenizer)
    loaded = ActivationReconstructor.from_pretrained(tmp_path / "ar")
    assert loaded.layer_index == 1
    torch.testing.assert_close(loaded.reconstruct(tiny.tokenizer, TEXTS), perturbed, atol=0, rtol=0)


def test_reconstruct_uses_template_with_special_tokens(tiny):
    k = 2
    ar = ActivationReconstructor.from_base(tiny.path, k)
    pred = ar.reconstruct(tiny.tokenizer, TEXTS, batch_size=3)
    assert pred.shape == (len(TEXTS), tiny.d_model) and pred.device.type == "cpu"
    for i, text in enumerate(TEXTS):
        full = ar_text(DEFAULT_AR_TEMPLATE, text)
        ids = tiny.tokenizer(full)["input_ids"]
        if tiny.family in ("llama", "gemma3"):
            assert ids[0] == tiny.tokenizer.bos_token_id
        expected = _base_last_hidden(tiny.model, tiny.tokenizer, full, k)
        torch.testing.assert_close(pred[i], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ar.reconstruct(tiny.tokenizer, TEXTS, batch_size=1), pred, atol=1e-5, rtol=0)
    assert ar.reconstruct(tiny.tokenizer, []).shape == (0, tiny.d_model)


def test_layer_index_beyond_base_is_refused(qwen):
    layers = qwen.model.config.num_hidden_layers
    with pytest.raises(ARModelError, match="decoder blocks") as info:
        ActivationReconstructor.from_base(qwen.path, layers)
    assert isinstance(info.value, NLAError)


def test_missing_value_head_is_named(qwen, tmp_path):
    out = ActivationReconstructor.from_base(qwen.path, 1).save_pretrained(tmp_path / "ar")
    (out / VALUE_HEAD_FILE).unlink()
    with pytest.raises(ARModelError, match=VALUE_HEAD_FILE):
        ActivationReconstructor.from_pretrained(out)


def test_wrong_value_head_contents_are_refused(qwen, tmp_path):
    out = ActivationReconstructor.from_base(qwen.path, 1).save_pretrained(tmp_path / "ar")
    d = qwen.d_model
    save_file({"weight": torch.eye(d), "bias": torch.zeros(d)}, str(out / VALUE_HEAD_FILE))
    with pytest.raises(ARModelError, match="exactly one tensor"):
        ActivationReconstructor.from_pretrained(out)
    save_file({"weight": torch.eye(d + 1)}, str(out / VALUE_HEAD_FILE))
    with pytest.raises(ARModelError, match="exactly one tensor"):
        ActivationReconstructor.from_pretrained(out)


def test_missing_backbone_weight_is_refused(qwen, tmp_path):
    out = ActivationReconstructor.from_base(qwen.path, 1).save_pretrained(tmp_path / "ar")
    weights = load_file(str(out / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ARModelError, match="up_proj"):
        ActivationReconstructor.from_pretrained(out)


def test_untied_lm_head_base(qwen, tmp_path):
    config = tiny_config("qwen2", len(qwen.tokenizer), tokenizer=qwen.tokenizer)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    ar = ActivationReconstructor.from_base(tmp_path / "base", 1)
    out = ar.save_pretrained(tmp_path / "ar")
    assert not any(key.startswith("lm_head") for key in _safetensors_keys(out))
    loaded = ActivationReconstructor.from_pretrained(out)
    ids = qwen.tokenizer(TEXTS[:1], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), ar(ids), atol=0, rtol=0)


def test_loading_is_quiet_and_restores_verbosity(qwen, tmp_path):
    from transformers.utils import logging as hf_logging

    out = ActivationReconstructor.from_base(qwen.path, 1).save_pretrained(tmp_path / "ar")
    records = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    level = hf_logging.get_verbosity()
    try:
        ActivationReconstructor.from_pretrained(out)
        ActivationReconstructor.from_base(qwen.path, 1)
    finally:
        root.removeHandler(handler)
    assert not [r for r in records if "LOAD REPORT" in r.getMessage()]
    assert hf_logging.get_verbosity() == level


def test_gradients_flow(qwen):
    ar = ActivationReconstructor.from_base(qwen.path, 1)
    enc = _batch(qwen.tokenizer, TEXTS, "right")
    target = torch.randn(len(TEXTS), qwen.d_model)
    optimizer = torch.optim.SGD(ar.parameters(), lr=1e-2)
    before = ar(enc.input_ids, enc.attention_mask).detach()
    loss = torch.nn.functional.mse_loss(ar(enc.input_ids, enc.attention_mask), target)
    loss.backward()
    assert ar.value_head.weight.grad is not None and ar.value_head.weight.grad.abs().sum() > 0
    assert ar.backbone.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    optimizer.step()
    after = ar(enc.input_ids, enc.attention_mask).detach()
    assert not torch.allclose(before, after)
    assert torch.nn.functional.mse_loss(after, target) < loss


def test_failed_save_leaves_previous_checkpoint(qwen, tmp_path, monkeypatch):
    ar = ActivationReconstructor.from_base(qwen.path, 1)
    out = ar.save_pretrained(tmp_path / "ar", tokenizer=qwen.tokenizer)
    saved = ar.reconstruct(qwen.tokenizer, TEXTS)
    with torch.no_grad():
        ar.value_head.weight.mul_(2.0)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ar_model, "_write_value_head", boom)
    with pytest.raises(OSError, match="disk full"):
        ar.save_pretrained(out, tokenizer=qwen.tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ar"]
    loaded = ActivationReconstructor.from_pretrained(out)
    torch.testing.assert_close(loaded.reconstruct(qwen.tokenizer, TEXTS), saved, atol=0, rtol=0)


def test_save_replaces_existing_and_runs_extra_files_hook(qwen, tmp_path):
    ar = ActivationReconstructor.from_base(qwen.path, 1)
    out = ar.save_pretrained(tmp_path / "ar")
    with torch.no_grad():
        ar.value_head.weight.mul_(3.0)
    ar.save_pretrained(out, extra_files=lambda d: (d / "nla_meta.yaml").write_text("kind: nla_model\n"))
    assert (out / "nla_meta.yaml").read_text() == "kind: nla_model\n"
    assert torch.equal(load_file(str(out / VALUE_HEAD_FILE))["weight"], 3.0 * torch.eye(qwen.d_model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ar"]


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 0, 4]
    with pytest.raises(ARModelError, match="no real token"):
        last_token_index(torch.tensor([[0, 0]]))
