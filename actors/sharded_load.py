"""Sharded loading for FSDP2: each rank reads only its own rows of every tensor of a checkpoint.

The whole-model path (``from_pretrained`` on every rank, then ``fully_shard``) holds the full
fp32 model in each rank's host memory while it starts: 8 ranks of a 7B model on one node need
≈ 240 GB. Here instead every rank

1. builds the model's modules with their parameters on the ``meta`` device (no memory; buffers,
   e.g. the rotary ``inv_freq``, are computed for real by the modules' own ``__init__``, as a
   normal load computes them) — :func:`empty_weights`;
2. shards it with ``fully_shard`` exactly as the whole-model path does;
3. materialises its shards on its device (``to_empty``) and fills each from the checkpoint's
   safetensors files with ``get_slice(name)[start:stop]``, the rows FSDP2's ``Shard(0)`` gives
   this rank (``torch.chunk`` pieces, as in :func:`actors.backends.fsdp2.gather_full_state`) —
   :func:`fill_shards`.

So a rank's host memory while loading is about its shard plus one slice in flight. Tensors that
were real before ``to_empty`` (buffers, a LoRA adapter's freshly initialised weights) keep their
values. DeepSpeed and one-rank groups load the whole model (:func:`whole_load_reason`).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nla_rl.errors import NLAError

INDEX_FILE = "model.safetensors.index.json"
# Where a module tensor lives: (file, key inside it); None: not in the checkpoint.
Locate = Callable[[str], "tuple[Path, str] | None"]


class ShardedLoadError(NLAError):
    """A checkpoint cannot be loaded shard by shard into this model."""


@dataclass
class LoadStats:
    """What one rank read while loading (tests and logs check that it read only its shards)."""

    tensors: int = 0
    bytes_read: int = 0
    largest_read: int = 0  # bytes of the largest single slice read
    reads: list = field(default_factory=list)  # (key, start, stop, bytes) of every read

    def as_dict(self) -> dict:
        return {"tensors": self.tensors, "bytes_read": self.bytes_read,
                "largest_read": self.largest_read}


def checkpoint_keys(model_dir: str | Path) -> dict[str, Path] | None:
    """Every tensor key of the safetensors checkpoint in ``model_dir`` and the file holding it
    (one ``model.safetensors`` or the shards an index names); None when the directory holds no
    safetensors weights (e.g. a ``.bin`` checkpoint: that loads whole)."""
    from safetensors import safe_open

    root = Path(model_dir)
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        missing = sorted({f for f in weight_map.values() if not (root / f).is_file()})
        if missing:
            raise ShardedLoadError(f"{index}: names shard file(s) {missing[:4]} that are not in "
                                   f"{root}; the checkpoint is incomplete")
        return {key: root / name for key, name in weight_map.items()}
    single = root / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(str(single), framework="pt") as handle:
        return {key: single for key in handle.keys()}


def whole_load_reason(*, backend: str, world_size: int, model_dir: str | Path,
                      trust_remote_code: bool, enabled: bool = True) -> str | None:
    """Why a learner group loads the whole model on every rank instead of its shards; None when
    sharded loading applies."""
    if not enabled:
        return "learner.sharded_load is false"
    if backend != "fsdp2":
        return f"the {backend} backend loads the whole model (ZeRO-3 partitions it afterwards)"
    if world_size < 2:
        return "one rank holds the whole model anyway"
    if trust_remote_code:  # custom modules may fill parameters in __init__ in ways we cannot see
        return "model.trust_remote_code is set"
    try:
        keys = checkpoint_keys(model_dir)
    except Exception as err:  # the whole-model loader, next, says what is wrong with it
        return f"its checkpoint cannot be listed ({err})"
    if keys is None:
        return f"{model_dir} holds no model.safetensors (or index); other formats load whole"
    return None


@contextlib.contextmanager
def empty_weights():
    """Build modules with parameters on ``meta`` and buffers for real (computed by each module's
    ``__init__``, e.g. rotary ``inv_freq``, exactly as ``from_pretrained`` computes them: the
    integration test compares them)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def own_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(local, start, stop)``: the storage this rank fills and the rows of the full tensor it
    holds. A ``Shard(0)`` DTensor holds rows ``[rank·c, rank·c + c)`` clipped to its length, with
    ``c = ceil(rows / world)`` (``torch.chunk``'s piece size); anything else is held whole."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return tensor.data, 0, (tensor.shape[0] if tensor.dim() else 0)
    if tuple(tensor.placements) != (Shard(0),):
        raise ShardedLoadError(f"expected a Shard(0) DTensor, found {tensor.placements}")
    world, rank = tensor.device_mesh.size(), tensor.device_mesh.get_local_rank()
    rows = tensor.shape[0]
    piece = -(-rows // world)
    start = min(rank * piece, rows)
    stop = min(start + piece, rows)
    local = tensor.to_local()
    if local.shape[0] != stop - start:  # FSDP2 changed its layout: refuse rather than mis-load
        raise ShardedLoadError(f"a shard of {rows} rows holds {local.shape[0]} on rank {rank} "
                               f"of {world}; expected {stop - start} (torch.chunk pieces)")
    return local, start, stop


def _named_tensors(module: torch.nn.Module) -> dict[int, tuple[list[str], torch.Tensor]]:
    """Every parameter and buffer once, by identity, with all its names (tied weights: one
    tensor, two names)."""
    found: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)]:
        found.setdefault(id(tensor), ([], tensor))[0].append(name)
    return found


class _Reader:
    """Open safetensors files (each opened once) and the bytes read from them."""

    def __init__(self):
        self.handles, self.stats = {}, LoadStats()

    def rows(self, path: Path, key: str, start: int, stop: int, full: bool) -> torch.Tensor:
        from safetensors import safe_open

        if path not in self.handles:
            self.handles[path] = safe_open(str(path), framework="pt")
        piece = self.handles[path].get_slice(key)
        value = piece[:] if full else piece[start:stop]  # only these rows leave the file
        size = value.numel() * value.element_size()
        self.stats.tensors += 1
        self.stats.bytes_read += size
        self.stats.largest_read = max(self.stats.largest_read, size)
        self.stats.reads.append((key, start, stop, size))
        return value


def _locate_all(names: list[str], locate: Locate) -> tuple[Path, str] | None:
    for name in names:  # a tied weight is stored under one of its names
        where = locate(name)
        if where is not None:
            return where
    return None


def _fill_one(reader: _Reader, names: list[str], tensor: torch.Tensor, where, kept) -> None:
    local, start, stop = own_rows(tensor)
    if where is not None:
        path, key = where
        value = reader.rows(path, key, start, stop, full=tensor.dim() == 0)
        if tuple(value.shape[1:]) != tuple(tensor.shape[1:]) or value.shape[:1] != local.shape[:1]:
            raise ShardedLoadError(f"{path}: {key} has rows of shape {list(value.shape[1:])}, "
                                   f"the model's {names[0]} {list(tensor.shape)}")
        local.copy_(value)  # copy_ casts a bf16/fp16 checkpoint to the fp32 master weights
    else:
        local.copy_(kept[names[0]])


def _retie(module: torch.nn.Module, tied: list[list[str]]) -> None:
    """Share again the tensors that were one before ``to_empty``: it materialises each module's
    tensors apart, so an unsharded tied ``lm_head`` would get its own (FSDP2's sharded
    parameters stay shared)."""
    for names in tied:
        first = module.get_parameter(names[0]) if _is_param(module, names[0]) else None
        for alias in names[1:]:
            owner, _, leaf = alias.rpartition(".")
            sub = module.get_submodule(owner)
            if first is not None and sub._parameters.get(leaf) is not first:
                sub._parameters[leaf] = first


def _is_param(module: torch.nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in module.get_submodule(owner)._parameters


def fill_shards(module: torch.nn.Module, *, device, locate: Locate, source: str,
                expected: set[tuple[Path, str]] | None = None) -> LoadStats:
    """Materialise a sharded meta ``module`` on ``device`` and fill this rank's shards.

    ``locate(name)``: the (file, key) of a module tensor, None when the checkpoint lacks it — it
    must then have been real before (a buffer, a LoRA weight), or the load fails naming it.
    ``expected``: the (file, key) pairs that must all be used (an AR refuses unexpected
    weights, as its whole-model load does). Returns what this rank read.
    """
    tensors = _named_tensors(module)
    # Real before to_empty: keep their values (small: buffers, adapters), checkpoint wins.
    kept = {names[0]: own_rows(t)[0].detach().clone() for names, t in tensors.values()
            if not t.is_meta}  # this rank's part: a sharded adapter keeps its own rows
    tied = [names for names, _ in tensors.values() if len(names) > 1]
    module.to_empty(device=device)
    _retie(module, tied)
    tensors = _named_tensors(module)  # to_empty may swap tensor objects
    reader, used, missing = _Reader(), set(), []
    with torch.no_grad():
        for names, tensor in tensors.values():
            where = _locate_all(names, locate)
            if where is None and names[0] not in kept:
                missing.append(names[0])
                continue
            if where is not None:
                used.add(where)
            _fill_one(reader, names, tensor, where, kept)
    unexpected = sorted(key for _, key in (expected or set()) - used)
    if missing or unexpected:
        raise ShardedLoadError(
            f"loading {source} shard by shard: the checkpoint lacks {missing[:8]} and has "
            f"unexpected {unexpected[:8]}. Check that the directory is a complete checkpoint of "
            f"this architecture (or set learner.sharded_load=false to load it whole)")
    return reader.stats


def shard_bytes(shape: tuple[int, ...], world: int, element: int = 4) -> int:
    """Bytes of the largest ``torch.chunk`` piece of a tensor of ``shape`` over ``world``."""
    if not shape:
        return element
    return element * -(-shape[0] // world) * math.prod(shape[1:])
