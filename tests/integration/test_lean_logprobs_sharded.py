"""Lean log-probs through the learners' sharding: FSDP2 and DeepSpeed ZeRO-3 over 2 gloo ranks.

The lean path runs inside the output head's own call, so the sharded head weight is gathered
there; values and gradients must equal the unsharded full-vocabulary formula's.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.placement import free_port

WORLD = 2


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    select = torch.zeros(3, 11, dtype=torch.bool)
    select[:, 4:] = True
    select[2, 8:] = False
    return ids, mask, select


def _worker(rank: int, port: int, path: str, backend: str) -> None:
    from transformers import AutoModelForCausalLM

    from nla_rl.logprobs import lean_head, next_token_logprobs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = AutoModelForCausalLM.from_pretrained(path)
    ref = copy.deepcopy(model)
    ids, mask, select = _inputs()
    expected = next_token_logprobs(ref, ids, mask, select, temperature=0.7, lean=False)
    (expected * 2.0).sum().backward()
    if backend == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        module = model
    else:
        from actors.backends import OptimSpec
        from actors.backends.deepspeed import DeepSpeedBackend

        ds = DeepSpeedBackend(model, OptimSpec(1e-3, 0.0, 0, 10, "constant", 1.0),
                              device=torch.device("cpu"), zero_stage=3)
        module = ds.module
    assert lean_head(module) is not None
    got = next_token_logprobs(module, ids, mask, select, temperature=0.7, chunk=5)
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    if backend == "fsdp2":
        (got * 2.0).sum().backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    else:
        from deepspeed.utils import safe_get_full_grad

        ds.engine.set_gradient_accumulation_boundary(True)  # grads averaged over ranks (equal)
        ds.engine.backward((got * 2.0).sum(), scale_wrt_gas=False)
        grads = {n: safe_get_full_grad(p) for n, p in ds.engine.module.named_parameters()}
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"{backend} {name}: {m}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip gloo's racy interpreter teardown (see test_fsdp2_gather)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from nla_rl.testing.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("lean_sharded") / "qwen2"
    build_tiny_model("qwen2", path, seed=0)
    return str(path)


@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_lean_logprobs_match_under_sharding(tiny_dir, backend):
    mp.spawn(_worker, args=(free_port(), tiny_dir, backend), nprocs=WORLD, join=True)
