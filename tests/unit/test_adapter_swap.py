"""The LoRA adapter the engines load is swapped in whole (actors.coordinator.save_adapter)."""

import pytest
import torch
from safetensors.torch import load_file

from actors.coordinator import save_adapter
from actors.learner_models import LoraSpec

LORA = LoraSpec(rank=2, alpha=4.0, target_modules=("q_proj",))


def _state(value: float) -> dict:
    return {"base_model.model.layers.0.q_proj.lora_A.default.weight": torch.full((2, 8), value),
            "base_model.model.layers.0.q_proj.lora_B.default.weight": torch.full((8, 2), value),
            "base_model.model.layers.0.q_proj.base_layer.weight": torch.zeros(8, 8)}


def _weights(adapter_dir) -> dict:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_a_new_adapter_replaces_the_old_one(tmp_path):
    out = tmp_path / "adapter"
    assert save_adapter(_state(1.0), LORA, out) == str(out)
    save_adapter(_state(2.0), LORA, out)
    weights = _weights(out)
    assert set(weights) == {"base_model.model.layers.0.q_proj.lora_A.weight",
                            "base_model.model.layers.0.q_proj.lora_B.weight"}  # LoRA only
    assert all(float(t.mean()) == 2.0 for t in weights.values())
    assert (out / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp dirs left


def test_a_failure_mid_write_leaves_the_old_adapter_whole(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    save_adapter(_state(1.0), LORA, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(self, *args, **kwargs):  # the tensors are written; the config write dies
        raise OSError("disk full")

    monkeypatch.setattr("peft.LoraConfig.save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(_state(2.0), LORA, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_failed_swap_puts_the_old_adapter_back(tmp_path, monkeypatch):
    """The window the old code had: the live adapter deleted, the new one not yet renamed in."""
    import os

    out = tmp_path / "adapter"
    save_adapter(_state(1.0), LORA, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rename = os.rename

    def failing_rename(src, dst, *args, **kwargs):
        if os.fspath(dst) == os.fspath(out) and ".tmp" in os.path.basename(os.fspath(src)):
            raise OSError("crashed while swapping")
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="crashed while swapping"):
        save_adapter(_state(2.0), LORA, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
