"""A teacher that runs an instruct model in-process with transformers.

Prompts go through the tokenizer's chat template (rendered to a string, then tokenised without
special tokens, so templates that already contain BOS do not get a second one), are sorted by
length, left-padded and generated in batches of ``batch_size``; greedy when ``temperature`` is 0,
sampled (seeded) otherwise.

The vLLM path for large teachers is ``rollout.vllm_teacher.VLLMLocalTeacher``, a subclass that
replaces only :meth:`LocalTeacher._load` and :meth:`LocalTeacher._generate` (same name, prompt,
cleaning and cache keys); this module deliberately imports neither vLLM nor Ray.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from nla_rl.data.teachers.base import (DEFAULT_PROMPT, TeacherRequest, TeacherResult,
                                       prompt_version_for, render_prompt, result_from_raw)
from nla_rl.errors import ConfigError

log = logging.getLogger(__name__)


class LocalTeacher:
    """Label prefixes with the chat model in ``model_dir`` (any ``AutoModelForCausalLM``).

    The model is loaded on the first :meth:`label` call. ``dtype`` is ``"auto"`` or a torch dtype
    name (``"bfloat16"``, ``"float32"`` …); ``device`` defaults to CUDA when available. ``model``
    (the cache-key name) defaults to the resolved directory path; pass ``model_name`` to give a
    stable name to a model that may move.
    """

    name = "local"

    def __init__(self, model_dir: str | Path, *, max_new_tokens: int = 256, batch_size: int = 8,
                 dtype: str = "auto", trust_remote_code: bool = False, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, device: str | None = None,
                 model_name: str | None = None, prompt: str = DEFAULT_PROMPT,
                 system_prompt: str | None = None, min_features: int = 2):
        if max_new_tokens < 1 or batch_size < 1 or temperature < 0:
            raise ConfigError(f"LocalTeacher: need max_new_tokens ≥ 1, batch_size ≥ 1 and "
                              f"temperature ≥ 0; found {max_new_tokens}, {batch_size}, {temperature}")
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise ConfigError(f"{type(self).__name__}: {str(self.model_dir)!r} is not a model "
                              f"directory (no config.json there); set data.teacher.model to a local "
                              f"directory holding an instruct model's config, tokenizer and weights")
        self.model = model_name or str(self.model_dir.resolve())
        self.max_new_tokens, self.batch_size, self.dtype = max_new_tokens, batch_size, dtype
        self.trust_remote_code, self.temperature, self.top_p, self.seed = (
            trust_remote_code, temperature, top_p, seed)
        self.device = device
        self.prompt, self.system_prompt, self.min_features = prompt, system_prompt, min_features
        self.prompt_version = prompt_version_for(prompt, system_prompt)
        self._model = self._tokenizer = None

    def __repr__(self) -> str:
        return (f"LocalTeacher(model_dir={str(self.model_dir)!r}, batch_size={self.batch_size}, "
                f"max_new_tokens={self.max_new_tokens}, temperature={self.temperature})")

    def _torch_dtype(self):
        """``"auto"`` or the torch dtype named by ``self.dtype`` (a clear error for a bad name)."""
        import torch

        if self.dtype != "auto" and not isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
            raise ConfigError(f"{type(self).__name__} dtype: expected 'auto' or a torch dtype name "
                              f"such as 'bfloat16', found {self.dtype!r}")
        return self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)

    def _load_tokenizer(self):
        """The chat tokenizer, left-padded (shared by every backend, so prompts are identical)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=self.trust_remote_code)
        if not tok.chat_template:
            raise ConfigError(f"{type(self).__name__}: the tokenizer in {self.model_dir} has no "
                              f"chat template; use an instruct/chat model as the teacher")
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def _load(self):
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM

        dtype = self._torch_dtype()
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        tok = self._load_tokenizer()
        model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=dtype, trust_remote_code=self.trust_remote_code)
        self._model, self._tokenizer = model.to(self.device).eval(), tok
        log.info("LocalTeacher: loaded %s on %s", self.model_dir, self.device)

    def _chat(self, prefix: str) -> str:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": render_prompt(prefix, self.prompt)})
        return self._tokenizer.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=True)

    def label(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        """One result per request, in request order (batched by prompt length internally)."""
        if not requests:
            return []
        self._load()
        answers = self._generate([self._chat(r.prefix) for r in requests])
        return [result_from_raw(r.key, a, self.min_features) for r, a in zip(requests, answers)]

    def _generate(self, texts: list[str]) -> list[str]:
        """The decoded answer to each rendered chat prompt, in order (transformers ``generate``)."""
        import torch

        tok, model = self._tokenizer, self._model
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        gen = dict(max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id)
        if self.temperature > 0:
            gen.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
            torch.manual_seed(self.seed)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        answers: dict[int, str] = {}
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = tok([texts[i] for i in idx], add_special_tokens=False, padding=True,
                      return_tensors="pt").to(self.device)
            with torch.inference_mode():
                out = model.generate(**enc, **gen)
            decoded = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            answers.update(zip(idx, decoded))
        return [answers[i] for i in range(len(texts))]
