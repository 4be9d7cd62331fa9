"""vLLM worker extension: the ``add`` injection inside vLLM's forward pass, and weight loading.

vLLM mixes it into its worker class (``LLM(worker_extension_cls="rollout.vllm_worker.NLAWorkerExtension")``);
the engine calls its methods through ``collective_rpc``.

How the ``add`` family finds its rows. Each request carries its vector and marker column in
``SamplingParams.extra_args[EXTRA_KEY]`` (they travel with the request, also to the ``n`` child
requests vLLM forks from it). A forward hook on decoder block ``layer`` reads, from the model
runner's host-side state, which requests the flattened token batch holds (``input_batch.req_ids``),
their rows (``query_start_loc``) and where each request's chunk starts in its sequence
(``num_computed_tokens_cpu``, from which vLLM computes the positions). A request's marker token is computed exactly once per prefill: in whichever prefill
chunk reaches it. Decode tokens sit past the prompt and are never touched; a preempted request
whose prompt is recomputed gets the injection again, as it must.

vLLM decoder blocks return ``(hidden, residual)`` with the residual stream ``h = hidden + residual``;
the norm is taken of that sum (a reimplementation that used ``hidden`` alone was ≈50× too weak),
and the update ``c·‖h‖·v/‖v‖`` is added to ``hidden``, which the next block's fused add-norm
folds into the residual.
"""

from __future__ import annotations

import numpy as np
import torch

from nla_rl.injection import get_decoder_layers
from nla_rl.vectors import normalize_to

EXTRA_KEY = "nla_add"


class NLAWorkerExtension:
    """Methods added to vLLM's worker (``self`` is the worker: ``self.model_runner`` etc.)."""

    def nla_arm_add(self, layer: int, coeff: float) -> int:
        """Register the ``add`` hook on block ``layer``; returns the number of blocks."""
        runner = self.model_runner
        layers = get_decoder_layers(runner.get_model())
        if not 0 <= layer < len(layers):
            raise ValueError(f"injection layer {layer} outside 0..{len(layers) - 1}")
        self._nla_coeff = float(coeff)
        self._nla_applied: dict[int, set[str]] = {}
        self._nla_vectors: dict[str, torch.Tensor] = {}
        if getattr(self, "_nla_handle", None) is not None:
            self._nla_handle.remove()
        self._nla_handle = layers[layer].register_forward_hook(self._nla_add_hook)
        return len(layers)

    def _nla_add_hook(self, module, args, output):
        runner = self.model_runner
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        if num_reqs == 0 or not isinstance(output, tuple):
            return None
        hidden, residual = output[0], output[1]
        # Host-side bookkeeping only (no device sync): request i's tokens are rows
        # starts[i]..starts[i+1] of the batch, at positions computed[i], computed[i] + 1, ...
        starts = runner.query_start_loc.np[: num_reqs + 1]
        computed = batch.num_computed_tokens_cpu[:num_reqs]
        rows, vectors = [], []
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            spec = self._nla_spec(runner, req_id)
            if spec is None:
                continue
            offset = int(spec["position"]) - int(computed[i])
            if 0 <= offset < int(starts[i + 1] - starts[i]):
                rows.append(int(starts[i]) + offset)
                vectors.append(self._nla_vector(req_id, spec))
                self._nla_applied.setdefault(int(spec["tag"]), set()).add(req_id)
        if not rows:
            return None
        idx = torch.tensor(rows, device=hidden.device)
        full = hidden[idx].float() + residual[idx].float()
        direction = normalize_to(torch.stack(vectors).to(hidden.device), 1.0)
        delta = self._nla_coeff * full.norm(dim=-1, keepdim=True) * direction
        hidden = hidden.index_add(0, idx, delta.to(hidden.dtype))
        return (hidden, residual, *output[2:])

    @staticmethod
    def _nla_spec(runner, req_id: str) -> dict | None:
        state = runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        return extra.get(EXTRA_KEY)

    def _nla_vector(self, req_id: str, spec: dict) -> torch.Tensor:
        vec = self._nla_vectors.get(req_id)
        if vec is None:
            vec = self._nla_vectors[req_id] = torch.tensor(spec["vector"], dtype=torch.float32)
        return vec

    def nla_take_applied(self) -> dict[int, int]:
        """``{request tag: number of distinct (child) requests injected}`` since the last call."""
        applied = {tag: len(ids) for tag, ids in getattr(self, "_nla_applied", {}).items()}
        self._nla_applied, self._nla_vectors = {}, {}
        return applied

    def nla_load_weights(self, named_tensors: list) -> int:
        """Load one bucket of Hugging Face-named weights (whole modules) in place.

        ``reload_weights`` re-runs the CPU weight repacking that a plain ``load_weights`` skips.
        Items are ``(name, tensor)`` in-process, or ``(name, dtype, shape, raw bytes)`` when the
        engine core runs in its own process (tensors do not survive that transport).
        """
        tensors = [item if len(item) == 2 else (item[0], decode_tensor(*item[1:])) for item in named_tensors]
        self.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
        return len(tensors)


def pack_tensor(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], np.ndarray]:
    """``(dtype, shape, its bytes as a uint8 numpy view)``: Ray stores numpy arrays out of band
    (one copy into the object store, read back zero-copy), whereas a torch tensor is pickled in
    band through ``torch.save`` (several host copies on each side). The view also carries bf16,
    which numpy has no dtype for."""
    tensor = tensor.detach().to("cpu").contiguous()
    return str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), \
        tensor.reshape(-1).view(torch.uint8).numpy()


def unpack_tensor(dtype: str, shape: tuple[int, ...], raw: np.ndarray) -> torch.Tensor:
    """The tensor :func:`pack_tensor` packed, sharing ``raw``'s memory (no copy). From the object
    store ``raw`` is read-only: the engines only read it (their weight loaders copy into their own
    parameters), and torch's warning about a non-writable array is silenced for that reason."""
    import warnings

    if raw.size == 0:  # numpy gives an empty array stride 0, which torch cannot reinterpret
        return torch.empty(shape, dtype=getattr(torch, dtype))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        flat = torch.from_numpy(raw)
    return flat.view(getattr(torch, dtype)).reshape(shape)


def encode_tensor(tensor: torch.Tensor) -> tuple[str, list[int], bytes]:
    """``(dtype name, shape, raw bytes)`` of a CPU tensor, for a multiprocess ``collective_rpc``."""
    dtype, shape, raw = pack_tensor(tensor)
    return dtype, list(shape), raw.tobytes()


def decode_tensor(dtype: str, shape: list[int], raw) -> torch.Tensor:
    """The tensor :func:`encode_tensor` encoded, in one copy: the ``bytearray`` is already a
    private, writable buffer that the tensor keeps alive."""
    return unpack_tensor(dtype, tuple(shape), np.frombuffer(bytearray(raw), dtype=np.uint8))
