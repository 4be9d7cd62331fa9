"""The local teacher on vLLM: :class:`nla_rl.data.teachers.local.LocalTeacher` with vLLM generation.

Everything but the generation is inherited: the name (``"local"``), prompt, chat rendering (the
Hugging Face tokenizer's chat template, tokenised without special tokens), answer cleaning,
``min_features``, ``prompt_version`` and so the cache keys — labels cached by either backend are
reused by the other. The token ids of each rendered prompt go to ``vllm.LLM.generate`` in one call
per :meth:`label` (vLLM batches them itself, at most ``batch_size`` sequences at a time), and the
answer tokens are decoded with the same tokenizer, so greedy labels equal the transformers
teacher's for the same float32 model.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: a few seconds to start
instead of ≈17 s on CPU). In-process vLLM has side effects on its host, which are undone after
start-up and around every call: the variable is set only while the engine starts (the rest of the
environment is restored too and vLLM's frozen copy of it released), the caller's Python, NumPy and
torch random states are kept (vLLM reseeds them), and ``torch.set_num_threads`` (replaced by a
no-op by vLLM's CPU worker) is put back. vLLM's CPU worker still initialises a one-process
``torch.distributed`` group in this process.

A prompt longer than ``max_model_len - max_new_tokens`` tokens cannot be generated; it gives an
``error`` result (never cached) instead of failing the whole batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import Iterator, Sequence

from nla_rl.data.teachers.base import TeacherRequest, TeacherResult
from nla_rl.data.teachers.local import LocalTeacher
from nla_rl.errors import ConfigError

log = logging.getLogger(__name__)

GIB = 1 << 30


@contextlib.contextmanager
def host_state_kept(env: dict[str, str] | None = None) -> Iterator[None]:
    """Run in-process vLLM code with ``env`` set, then restore the host's environment, random
    states and ``torch.set_num_threads`` (see the module docstring for why each is needed)."""
    import numpy as np
    import torch

    saved_env, saved_py, saved_np = dict(os.environ), random.getstate(), np.random.get_state()
    saved_set_threads, saved_threads = torch.set_num_threads, torch.get_num_threads()
    os.environ.update(env or {})
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            yield
    finally:
        if os.environ != saved_env:
            _restore_environ(saved_env)
            with contextlib.suppress(ImportError, AttributeError):
                from vllm import envs  # noqa: PLC0415 — only once vLLM is in use

                envs.disable_envs_cache()  # else vLLM keeps reading the values frozen at start-up
        random.setstate(saved_py)
        np.random.set_state(saved_np)
        torch.set_num_threads = saved_set_threads
        if torch.get_num_threads() != saved_threads:
            torch.set_num_threads(saved_threads)


def _restore_environ(saved: dict[str, str]) -> None:
    """Put ``os.environ`` back to ``saved`` key by key (never cleared: vLLM threads may read it)."""
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


class VLLMLocalTeacher(LocalTeacher):
    """:class:`LocalTeacher` whose generation runs on an in-process ``vllm.LLM``.

    Extra arguments: ``kv_cache_gib`` (KV cache size, passed as ``kv_cache_memory_bytes``; raise it
    on a GPU for throughput), ``max_model_len`` (None = the model's own limit), ``enforce_eager``
    (no CUDA graphs / compilation: fastest start, which matters more than speed for a one-off
    labelling pass on CPU), ``llm_kwargs`` (anything else for ``vllm.LLM``). ``batch_size`` is
    vLLM's ``max_num_seqs``. ``device`` is ignored (vLLM picks its platform). Sampling with
    ``temperature > 0`` is seeded per request (``seed + index``), so it is reproducible but not
    equal to the transformers teacher's samples.
    """

    def __init__(self, model_dir, *, batch_size: int = 64, kv_cache_gib: float = 1.0,
                 max_model_len: int | None = None, enforce_eager: bool = True,
                 llm_kwargs: dict | None = None, **kwargs):
        super().__init__(model_dir, batch_size=batch_size, **kwargs)
        if kv_cache_gib <= 0 or (max_model_len is not None and max_model_len <= self.max_new_tokens):
            raise ConfigError(f"VLLMLocalTeacher: need kv_cache_gib > 0 and max_model_len > "
                              f"max_new_tokens ({self.max_new_tokens}); found {kv_cache_gib}, "
                              f"{max_model_len}")
        self.kv_cache_gib, self.max_model_len = kv_cache_gib, max_model_len
        self.enforce_eager, self.llm_kwargs = enforce_eager, dict(llm_kwargs or {})
        self._llm = None

    def __repr__(self) -> str:
        return (f"VLLMLocalTeacher(model_dir={str(self.model_dir)!r}, batch_size={self.batch_size}, "
                f"max_new_tokens={self.max_new_tokens}, temperature={self.temperature}, "
                f"kv_cache_gib={self.kv_cache_gib})")

    def _load(self):
        if self._llm is not None:
            return
        dtype = self._vllm_dtype()
        self._tokenizer = self._load_tokenizer()
        with host_state_kept({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}):
            from vllm import LLM  # inside: importing vLLM's stack edits the environment too

            self._llm = LLM(model=str(self.model_dir), tokenizer=str(self.model_dir),
                            dtype=dtype, seed=self.seed, max_model_len=self.max_model_len,
                            max_num_seqs=self.batch_size, enforce_eager=self.enforce_eager,
                            kv_cache_memory_bytes=int(self.kv_cache_gib * GIB),
                            trust_remote_code=self.trust_remote_code,
                            **self.llm_kwargs)
        self.max_model_len = self._llm.llm_engine.model_config.max_model_len
        log.info("VLLMLocalTeacher: loaded %s (max_model_len %d)", self.model_dir, self.max_model_len)

    def _vllm_dtype(self) -> str:
        """``dtype`` as transformers reads it: ``"auto"`` is the checkpoint's own dtype (vLLM's
        ``"auto"`` would serve a float32 checkpoint in bfloat16 on CPU, and labels would differ)."""
        from transformers import AutoConfig

        if self._torch_dtype() != "auto":  # the same clear error as the transformers teacher
            return self.dtype
        config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=self.trust_remote_code)
        dtype = getattr(config.get_text_config(), "dtype", None) or getattr(config, "dtype", None)
        return str(dtype).removeprefix("torch.") if dtype is not None else "auto"

    def label(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        """As :meth:`LocalTeacher.label`; prompts too long for the engine give ``error`` results."""
        if not requests:
            return []
        self._load()
        limit = self.max_model_len - self.max_new_tokens
        lengths = [len(self._prompt_ids(r.prefix)) for r in requests]
        fits = [r for r, n in zip(requests, lengths) if n <= limit]
        labelled = iter(super().label(fits))
        return [next(labelled) if n <= limit else TeacherResult(
                    key=r.key, explanation=None, status="error",
                    error=f"prompt of {n} tokens is longer than max_model_len - max_new_tokens = "
                          f"{limit}; shorten the prefix or raise max_model_len")
                for r, n in zip(requests, lengths)]

    def _prompt_ids(self, prefix: str) -> list[int]:
        return self._tokenizer(self._chat(prefix), add_special_tokens=False)["input_ids"]

    def _generate(self, texts: list[str]) -> list[str]:
        """Greedy or seeded sampling of every prompt in one ``generate`` call; decoded like the
        transformers teacher (same tokenizer, special tokens skipped)."""
        from vllm import SamplingParams

        tok = self._tokenizer
        prompts = [{"prompt_token_ids": ids}
                   for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        sampled = self.temperature > 0
        # transformers' generate applies the model's generation_config.json on top of the
        # arguments (repetition_penalty always, top_k/min_p when sampling); vLLM does not for
        # explicit SamplingParams, so pass the same values for the two backends to agree.
        defaults = self._llm.llm_engine.model_config.get_diff_sampling_param()
        inherited = ("repetition_penalty", "top_k", "min_p") if sampled else ("repetition_penalty",)
        extra = {k: defaults[k] for k in inherited if k in defaults}
        params = [SamplingParams(max_tokens=self.max_new_tokens, detokenize=False,
                                 temperature=self.temperature if sampled else 0.0,
                                 top_p=self.top_p if sampled else 1.0, seed=self.seed + i, **extra)
                  for i in range(len(prompts))]
        with host_state_kept():
            outputs = self._llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return [tok.decode(out.outputs[0].token_ids, skip_special_tokens=True) for out in outputs]

    def close(self) -> None:
        """Shut the engine down and free its KV cache (the teacher reloads it if used again)."""
        if self._llm is None:
            return
        with contextlib.suppress(AttributeError):
            self._llm.llm_engine.engine_core.shutdown()
        self._llm = None
