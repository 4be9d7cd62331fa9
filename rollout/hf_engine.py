"""The transformers rollout engine: ``generate`` with the injection hooks of :mod:`nla_rl.injection`.

It is the parity reference for the vLLM engine and the fallback where vLLM cannot be imported.
Slow (no paged KV cache, no continuous batching) but exact: its log-probs are those a learner
computes by a teacher-forced forward (:func:`teacher_forced_logprobs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch

from nla_rl.errors import NLAError
from nla_rl.injection import generate_with_injection, inject
from nla_rl.logprobs import next_token_logprobs
from nla_rl.roundtrip import InjectionSpec, left_pad
from nla_rl.tokens import MarkerTokens
from rollout.base import (RolloutEngine, RolloutRequest, Sample, SamplingSpec, check_injection,
                          check_requests)


def _injection_kwargs(spec: InjectionSpec) -> dict:
    if spec.family == "replace":
        return dict(family="replace", scale=spec.scale)
    return dict(family="add", scale=None, layer=spec.layer, coeff=spec.coeff)


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def teacher_forced_logprobs(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                            vectors: torch.Tensor, marker_cols: Sequence[int], injection: InjectionSpec,
                            *, temperature: float = 1.0, pad_id: int = 0) -> list[list[float]]:
    """Log-probs of ``completions[i]`` after ``prompts[i]`` as a learner computes them:
    ``log softmax(logits / T)`` of one forward over prompt + completion (right padded, so
    positions are 0..L-1 as in generation), with ``vectors[i]`` injected at ``marker_cols[i]``."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    select = torch.zeros((len(seqs), width - 1), dtype=torch.bool)  # the completions' columns
    for row, (seq, p, c) in enumerate(zip(seqs, prompts, completions)):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        select[row, len(p) - 1:len(p) - 1 + len(c)] = True
    positions = torch.tensor([[row, col] for row, col in enumerate(marker_cols)])
    with torch.no_grad(), inject(model, vectors=vectors, positions=positions, **_injection_kwargs(injection)):
        values = next_token_logprobs(model, ids, mask, select, temperature=temperature or 1.0)
    return [part.tolist() for part in values.split([len(c) for c in completions])]


class HFEngine(RolloutEngine):
    """Rollouts with ``model.generate`` (float32 by default) and the injection hooks."""

    kind = "hf"

    def __init__(self, model_dir: str, *, marker: MarkerTokens, injection: InjectionSpec,
                 dtype: torch.dtype | str = torch.float32, device: str = "cpu", num_threads: int | None = None,
                 **_ignored):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        if isinstance(dtype, str):  # a recipe's "float32" / "bfloat16", as the vLLM engine takes it
            dtype = getattr(torch, dtype)
        self.model_dir, self.marker, self.injection = str(model_dir), marker, check_injection(injection)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.base_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.model = self.base_model
        self.device = device
        self.eos_ids = _eos_ids(self.base_model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.stats = {"generate_calls": 0, "samples": 0, "injections_applied": 0, "syncs": 0}

    @property
    def d_model(self) -> int:
        return int(self.base_model.config.get_text_config().hidden_size)

    # -- generation
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSpec) -> list[list[Sample]]:
        cols = check_requests(requests, self.marker, self.d_model)
        ids, mask = left_pad([list(r.prompt_ids) for r in requests], self.pad_id)
        shift = ids.shape[1] - torch.tensor([len(r.prompt_ids) for r in requests])
        positions = torch.stack([torch.arange(len(requests)), torch.tensor(cols) + shift], dim=1)
        vectors = self.injection.av_input(torch.stack([r.vector for r in requests]))
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.n,
                      output_scores=True, return_dict_in_generate=True, pad_token_id=self.pad_id,
                      eos_token_id=sorted(self.eos_ids))
        if sampling.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(sampling.seed)
            out, handle = generate_with_injection(
                self.model, self.tokenizer, ids.to(self.device), mask.to(self.device), vectors=vectors,
                positions=positions, **_injection_kwargs(self.injection), **kwargs)
        rows_applied = handle.applied == len(requests) * sampling.n
        samples = self._samples(out, ids.shape[1], rows_applied)
        self.stats["generate_calls"] += 1
        self.stats["samples"] += len(samples)
        self.stats["injections_applied"] += handle.applied
        n = sampling.n
        return [samples[i * n:(i + 1) * n] for i in range(len(requests))]

    def _samples(self, out, prompt_width: int, applied: bool) -> list[Sample]:
        new = out.sequences[:, prompt_width:].cpu()
        logp = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1).cpu()
        chosen = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        samples = []
        for row in range(new.shape[0]):
            tokens = new[row].tolist()
            stop = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            length = len(tokens) if stop is None else stop + 1
            tokens = tokens[:length]
            samples.append(Sample(
                text=self.tokenizer.decode(tokens, skip_special_tokens=True), token_ids=tokens,
                logprobs=chosen[row, :length].tolist(), finish_reason="length" if stop is None else "stop",
                injection_applied=applied))
        return samples

    def logprobs(self, requests: Sequence[RolloutRequest], completions: Sequence[Sequence[int]]) -> list[list[float]]:
        cols = check_requests(requests, self.marker, self.d_model)
        return teacher_forced_logprobs(
            self.model, [r.prompt_ids for r in requests], completions,
            self.injection.av_input(torch.stack([r.vector for r in requests])), cols, self.injection,
            pad_id=self.pad_id)

    # -- weights
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.model is not self.base_model:
            raise NLAError("this HF engine serves a LoRA adapter: sync it with sync_adapter, or build "
                           "a new engine for full-weight training")
        state = {name: t.detach() for name, t in named_tensors}
        result = self.base_model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise NLAError(f"sync_weights: {len(result.unexpected_keys)} name(s) are not parameters "
                           f"of the model, e.g. {result.unexpected_keys[:3]}; send Hugging Face names")
        self.stats["syncs"] += 1

    def sync_adapter(self, adapter_dir: str) -> None:
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        if self.model is self.base_model:
            self.model = PeftModel.from_pretrained(self.base_model, adapter_dir, is_trainable=False).eval()
        else:
            weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
            result = set_peft_model_state_dict(self.model, weights)
            if getattr(result, "unexpected_keys", None):
                raise NLAError(f"adapter {adapter_dir}: keys {result.unexpected_keys[:3]} do not fit "
                               "the adapter first loaded (a different LoRA config needs a new engine)")
        self.stats["syncs"] += 1

    def health(self) -> dict:
        return {"kind": self.kind, "model_dir": self.model_dir, "lora": self.model is not self.base_model,
                **self.stats}
