"""An exponential moving average of a learner rank's trainable weights (the online AR's scorer).

    ema ← decay · ema + (1 − decay) · θ            after every applied optimiser step

Each rank keeps the EMA of the weights it stores: its FSDP2 shards (the DTensor's local tensor)
or the whole parameter (DeepSpeed ZeRO-2; ZeRO-3 is refused by the learner group). Scoring with
the EMA swaps it into those same tensors for the forward pass and swaps the live weights back
afterwards, so no second model is built and every backend's forward works unchanged. FSDP2
modules are resharded (:func:`actors.backends.fsdp2.reshard`) before the shards are read or
written, and again before the live values go back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from actors.backends.fsdp2 import reshard

EMA_FILE = "ema_rank{rank}.safetensors"


def local_weight_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The storage this rank holds for each trainable parameter, in a stable order."""
    reshard(module)
    out = []
    for param in module.parameters():
        if not param.requires_grad:
            continue
        if hasattr(param, "to_local"):  # FSDP2 DTensor: this rank's shard
            out.append(param.to_local().data)
        else:
            out.append(param.data)
    return out


class WeightEMA:
    """EMA of ``tensors`` (see the module doc); ``decay`` in [0, 1)."""

    def __init__(self, tensors: list[torch.Tensor], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), found {decay}")
        self.decay = decay
        self.shadow = [t.detach().to(torch.float32, copy=True) for t in tensors]

    @torch.no_grad()
    def update(self, tensors: list[torch.Tensor]) -> None:
        for ema, live in zip(self.shadow, tensors, strict=True):
            ema.lerp_(live.to(torch.float32), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self, module: torch.nn.Module):
        """Within the block ``module`` computes with the EMA; its live weights are restored after."""
        tensors = local_weight_tensors(module)
        with torch.no_grad():
            live = [t.clone() for t in tensors]
            for t, ema in zip(tensors, self.shadow, strict=True):
                t.copy_(ema)
        try:
            yield
        finally:
            reshard(module)  # the next forward gathers the live weights, not these
            with torch.no_grad():
                for t, saved in zip(tensors, live):
                    t.copy_(saved)

    def save(self, directory: Path, rank: int) -> None:
        from safetensors.torch import save_file

        save_file({str(i): t.contiguous() for i, t in enumerate(self.shadow)},
                  str(Path(directory) / EMA_FILE.format(rank=rank)))

    def load(self, directory: Path, rank: int) -> None:
        from safetensors.torch import load_file

        path = Path(directory) / EMA_FILE.format(rank=rank)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the checkpoint has no EMA weights for rank {rank} "
                                    "(saved without rl.ar_ema_decay?); resume with the same recipe")
        state = load_file(str(path))
        if len(state) != len(self.shadow):
            raise ValueError(f"{path}: {len(state)} EMA tensors, the model has {len(self.shadow)}")
        for i, ema in enumerate(self.shadow):
            ema.copy_(state[str(i)])
