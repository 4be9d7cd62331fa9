"""Sharded loading's pieces in one process (no process group: every tensor is one whole shard):
a meta-built model filled from the checkpoint equals ``from_pretrained``'s, for every tiny
family (tied embeddings, rotary buffers, Gemma-3's scaled embedding), the AR (backbone + value
head), a LoRA AV (peft's names), a sharded checkpoint (index) and a bf16 one; when it does not
apply, the reason. The 2-rank comparison of the two paths is tests/integration/test_sharded_load.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from actors.learner_models import LoraSpec, ModelSpec, build_empty_model, build_model
from actors.sharded_load import (ShardedLoadError, checkpoint_keys, fill_shards,
                                 whole_load_reason)
from nla_rl.ar_model import ActivationReconstructor
from nla_rl.memory_plan import host_load_bytes, read_shape


def _filled(spec: ModelSpec):
    empty = build_empty_model(spec, seed=0)
    stats = fill_shards(empty.module, device="cpu", locate=empty.locate, source=spec.model_dir,
                        expected=empty.expected)
    return empty.module, stats


def _assert_same(got: torch.nn.Module, want: torch.nn.Module) -> None:
    got_state, want_state = got.state_dict(), want.state_dict()
    assert set(got_state) == set(want_state)
    for name, value in want_state.items():
        assert torch.equal(got_state[name], value), name
    want_buffers = dict(want.named_buffers())  # non-persistent ones too (rotary inv_freq)
    for name, value in got.named_buffers():
        assert torch.equal(value, want_buffers[name]), name


def test_a_filled_meta_model_equals_from_pretrained(tiny):
    spec = ModelSpec(role="av", model_dir=str(tiny.path))
    got, stats = _filled(spec)
    _assert_same(got, build_model(spec, seed=0))
    if tiny.model.config.tie_word_embeddings:
        assert got.lm_head.weight is got.model.embed_tokens.weight
    stored = load_file(str(tiny.path / "model.safetensors"))
    assert stats.bytes_read == sum(v.numel() * v.element_size() for v in stored.values())


def test_the_ar_and_a_lora_av_fill_like_their_whole_loads(tmp_path, qwen):
    ActivationReconstructor.from_base(qwen.path, 1).save_pretrained(tmp_path / "ar")
    ar = ModelSpec(role="ar", model_dir=str(tmp_path / "ar"))
    _assert_same(_filled(ar)[0], build_model(ar, seed=0))
    lora = ModelSpec(role="av", model_dir=str(qwen.path),
                     lora=LoraSpec(rank=4, target_modules=("q_proj", "v_proj")))
    got, want = _filled(lora)[0], build_model(lora, seed=3)
    assert any("lora_A" in name for name in got.state_dict())
    assert not torch.equal(got.state_dict()[next(k for k in got.state_dict() if "lora_A" in k)],
                           want.state_dict()[next(k for k in want.state_dict() if "lora_A" in k)])
    _assert_same(got, build_model(lora, seed=0))  # the adapter's init: the seed, either path


def test_an_indexed_bf16_checkpoint_and_a_missing_tensor(tmp_path, qwen):
    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(qwen.path / "model.safetensors")).items()}
    names = sorted(state)
    half = len(names) // 2
    root = tmp_path / "indexed"
    root.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (root / f).write_bytes((qwen.path / f).read_bytes())
    parts = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for file, keys in parts.items():
        save_file({k: state[k] for k in keys}, str(root / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    assert set(checkpoint_keys(root)) == set(names)
    spec = ModelSpec(role="av", model_dir=str(root))
    _assert_same(_filled(spec)[0], build_model(spec, seed=0))  # bf16 → fp32 as from_pretrained
    del index["weight_map"][names[0]]
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ShardedLoadError, match=f"lacks \\['{names[0]}'\\]"):
        _filled(spec)


def test_where_sharded_loading_does_not_apply_the_reason_is_given(tmp_path, qwen):
    def reason(**kw):
        args = dict(backend="fsdp2", world_size=2, model_dir=qwen.path, trust_remote_code=False)
        return whole_load_reason(**{**args, **kw})

    assert reason() is None
    assert "deepspeed" in reason(backend="deepspeed")
    assert "one rank" in reason(world_size=1)
    assert "sharded_load is false" in reason(enabled=False)
    assert "trust_remote_code" in reason(trust_remote_code=True)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert "no model.safetensors" in reason(model_dir=tmp_path)


def test_the_host_plan_counts_a_shard_and_a_slice(qwen):
    shape = read_shape(qwen.path)
    rows, cols = shape.largest_shape
    assert rows * cols == max(v.numel() for v in qwen.model.state_dict().values())
    assert host_load_bytes(shape, 8, sharded_load=False) == 4 * shape.params
    assert host_load_bytes(shape, 8, sharded_load=True) == (4 * shape.params // 8
                                                           + 4 * -(-rows // 8) * cols)
