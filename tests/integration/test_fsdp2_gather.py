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
    mesh = init_device_mesh("cpu", (WORLD,))
    for sub in (model.embed, model.proj, model.low):
        fully_shard(sub, mesh=mesh)
    fully_shard(model, mesh=mesh)
    with torch.no_grad():
        model.proj(model.embed(torch.tensor([[1, 2]])))  # leaves the root's weights gathered
    ours = gather_full_state(model)
    theirs = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
    if rank == 0:
        torch.save({"ours": ours, "theirs": theirs}, out)
    else:
        assert ours == {}
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
