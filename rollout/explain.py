"""Rollout engines as generation back-ends of the inference API (:class:`nla_rl.inference.NLA`).

The core never imports vLLM, so the engine is handed to it as a factory:

    from rollout.explain import engine_factory
    nla = NLA.from_pretrained(av_dir, ar_dir, engine="vllm", engine_factory=engine_factory("vllm"))
"""

from __future__ import annotations

from pathlib import Path

import torch

from nla_rl.inference import EngineFactory, GenerateFn, GenerationParams
from nla_rl.roundtrip import InjectionSpec
from nla_rl.sidecar import ModelSidecar
from rollout.base import RolloutRequest, SamplingSpec, make_engine


def engine_factory(kind: str, **engine_kwargs) -> EngineFactory:
    """A factory that builds engine ``kind`` (``vllm`` | ``hf`` | ``auto``) on the AV directory
    and adapts its ``generate`` to the inference API (greedy at temperature 0)."""

    def build(av_dir: Path, meta: ModelSidecar, injection: InjectionSpec, dtype: str,
              device: str) -> GenerateFn:
        kwargs = dict(engine_kwargs)
        if kind == "hf":
            from nla_rl.base_model import DTYPES
            kwargs.update(dtype=DTYPES[dtype], device=device)
        else:
            kwargs.setdefault("dtype", dtype)
        engine = make_engine(kind, model_dir=str(av_dir), marker=meta.marker, injection=injection,
                             **kwargs)

        def generate(prompt_ids: list[int], vectors: torch.Tensor,
                     params: GenerationParams) -> tuple[list[str], int]:
            requests = [RolloutRequest(tuple(prompt_ids), v, request_id=str(i))
                        for i, v in enumerate(vectors)]
            sampling = SamplingSpec(n=1, temperature=params.temperature, top_p=1.0,
                                    max_new_tokens=params.max_new_tokens, seed=params.seed)
            samples = [group[0] for group in engine.generate(requests, sampling)]
            return [s.text for s in samples], sum(s.injection_applied for s in samples)

        generate.engine = engine  # the engine lives as long as the function does
        return generate

    return build
