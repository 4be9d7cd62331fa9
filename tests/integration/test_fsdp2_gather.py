"""The FSDP2 backend's one-collective full-state gather equals torch's own, uneven shards too."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.placement import free_port

WORLD = 2


class Odd(torch.nn.Module):
    """Sizes that do not divide by the world: chunks of unequal length, one rank with no rows."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 3)
        self.proj = torch.nn.Linear(3, 5)
        self.single = torch.nn.Parameter(torch.randn(1, 4))
        self.low = torch.nn.Linear(3, 2).to(torch.bfloat16)  # a second dtype: a second gather
        self.register_buffer("steps", torch.tensor([3.0, 1.0]))


def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from actors.backends.fsdp2 import gather_full_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = Odd()
    frozen = Odd()
    frozen.load_state_dict(model.state_dict())
    for sub in (frozen.embed, frozen.low):  # a LoRA run's frozen base, in miniature
        sub.requires_grad_(False)
    mesh = init_device_mesh("cpu", (WORLD,))
    for sub in (model.embed, model.proj, model.low):
        fully_shard(sub, mesh=mesh)
    fully_shard(model, mesh=mesh)
    with torch.no_grad():
        model.proj(model.embed(torch.tensor([[1, 2]])))  # leaves the root's weights gathered
    ours = gather_full_state(model)
    theirs = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
    for sub in (frozen.embed, frozen.proj, frozen.low):
        fully_shard(sub, mesh=mesh)
    fully_shard(frozen, mesh=mesh)
    gathered, all_gather = [], dist.all_gather

    def counted(tensors, tensor, *args, **kwargs):  # what one rank sends to the gather
        gathered.append(tensor.numel())
        return all_gather(tensors, tensor, *args, **kwargs)

    dist.all_gather = counted
    try:
        trainable = gather_full_state(frozen, trainable_only=True)
    finally:
        dist.all_gather = all_gather
    if rank == 0:
        torch.save({"ours": ours, "theirs": theirs, "trainable": trainable,
                    "gathered": gathered}, out)
    else:
        assert ours == {} and trainable == {}
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: gloo's threads there abort ("terminate called without an
    # active exception") now and then; everything checked above has already passed.
    os._exit(0)


def test_gather_equals_get_model_state_dict(tmp_path):
    out = str(tmp_path / "states.pt")
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    states = torch.load(out, weights_only=True)
    ours, theirs = states["ours"], states["theirs"]
    assert list(ours) == list(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name
    assert ours["single"].shape == (1, 4) and ours["embed.weight"].shape == (11, 3)


def test_trainable_only_gathers_nothing_else(tmp_path):
    """A LoRA sync's gather: the trainable parameters alone, and only their pieces are sent."""
    out = str(tmp_path / "states.pt")
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    states = torch.load(out, weights_only=True)
    trainable, full = states["trainable"], states["ours"]
    assert sorted(trainable) == ["proj.bias", "proj.weight", "single"]
    for name, value in trainable.items():
        assert torch.equal(value, full[name]), name
    # One fp32 gather of the per-rank pieces padded to torch.chunk's size: proj.weight 3 of 5
    # rows × 3, proj.bias 3, single 1 row × 4 — the frozen embed and bf16 layer never travel.
    assert states["gathered"] == [3 * 3 + 3 + 4]
