"""The inference API: load a trained AV/AR pair and explain, reconstruct and score activations.

    nla = NLA.from_pretrained("runs/x/export/av", "runs/x/export/ar")
    nla.explain(vectors)            # ["The subject is a fox. …", None, …]  (None: no explanation)
    nla.reconstruct(texts)          # torch.Tensor [n, d] (fp32)
    nla.score(vectors)              # explanations, predictions, per-row MSE and cosine, FVE

Both directories carry an ``nla_meta.yaml`` sidecar (ours, the reference's — minimal ones too —
or nanoNLA's copy of its dataset sidecar; see :func:`nla_rl.sidecar.read_model_sidecar`). On load
each is validated against its live tokenizer and config
(:func:`nla_rl.sidecar.validate_model_sidecar`), and the two against each other: the sidecars on
``d_model``, extraction layer, ``mse_scale`` and marker (:func:`check_pair`), the models on base
architecture and tokenizer (:func:`nla_rl.compat.same_base_problem`) — not on the recorded
``base_checkpoint`` paths, which the reference's training stages write differently for the AV and
the AR. The injection family (``replace`` with its scale, or ``add`` with its block and
coefficient) and the AV template (with the depth % when the template shows one) come from the AV's
sidecar; only a family the sidecar does not record (nanoNLA) is taken from the caller.

Generation runs in-process with transformers (``engine="hf"``). Other engines are supplied by the
caller as a factory (the core never imports vLLM): ``rollout.explain.engine_factory("vllm")``
returns one, and ``NLA.from_pretrained(..., engine="vllm", engine_factory=that)`` uses it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nla_rl.ar_model import ActivationReconstructor, quiet_transformers
from nla_rl.base_model import DTYPES, check_context, check_model_dir, load_causal_lm
from nla_rl.compat import same_base_problem
from nla_rl.errors import NLAError, mismatch
from nla_rl.injection import (DATA_SCALE_FACTOR, InjectionSpec, generate_with_injection,
                              load_injection_centre)
from nla_rl.metrics import cosine, fve
from nla_rl.reward_basis import RewardBasis, apply_basis, load_reward_basis
from nla_rl.rewards import normalized_mse
from nla_rl.roundtrip import left_pad
from nla_rl.sidecar import ModelSidecar, read_model_sidecar, validate_model_sidecar
from nla_rl.templates import av_prompt_ids, depth_pct_for, extract_explanation
from nla_rl.tokens import find_marker_positions
from nla_rl.vectors import check_norms

# Fields the AV and AR sidecars of one pair must agree on (the base model is compared on the
# loaded configs and tokenizers instead of the recorded path).
_PAIR_FIELDS = ("d_model", "extraction_layer_index", "mse_scale")
_MARKER_FIELDS = (("tokens.injection_char", "char"), ("tokens.injection_token_id", "token_id"))
logger = logging.getLogger(__name__)


class InferenceError(NLAError):
    """An AV/AR pair cannot be loaded or used as asked (mismatched pair, wrong vector width…)."""


@dataclass(frozen=True)
class GenerationParams:
    """How the AV generates: ``temperature=0`` is greedy; ``seed`` seeds sampling."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0


# An engine's generate: (prompt ids, vectors [n, d] or None = no injection, params)
# → (decoded continuations, rows the injection was applied to).
GenerateFn = Callable[[list[int], "torch.Tensor | None", GenerationParams], tuple[list[str], int]]
# What a caller passes to use another engine: (av_dir, av sidecar, injection, dtype, device) → GenerateFn.
EngineFactory = Callable[[Path, ModelSidecar, InjectionSpec, str, str], GenerateFn]


@dataclass
class Generation:
    """Raw AV output for a batch of vectors."""

    texts: list[str]  # decoded continuations (prefill prepended, so they parse)
    explanations: list[str | None]  # extracted bodies; None where there is no explanation
    injections_applied: int  # rows the injection hook wrote (= number of vectors when healthy)
    injection_scale: float | None  # the replace scale used (None for the add family)


@dataclass
class ScoreResult:
    """A round trip ``ĥ = AR(AV(h))`` of a batch, per row and aggregated."""

    explanations: list[str | None]
    texts: list[str]
    predictions: torch.Tensor  # [n, d] fp32
    # [n]: the reward's MSE, mean_d (n_s(B(ĥ)) - n_s(B(h)))², s = mse_scale (2 = orthogonal), B the
    # AR's reward basis (identity when its sidecar names none: nla_rl.reward_basis)
    mse: torch.Tensor
    cosine: torch.Tensor  # [n]
    fve: float  # the paper's definition over the batch (NaN for fewer than 2 rows)
    failed: torch.Tensor  # [n] bool: no explanation could be extracted (scored on "" anyway)
    injections_applied: int
    injection_scale: float | None

    @property
    def extraction_failure_rate(self) -> float:
        return float(self.failed.float().mean()) if len(self.failed) else 0.0

    def rows(self) -> list[dict]:
        """One plain dict per vector (what ``nla-rl explain --out`` writes)."""
        return [{"row": i, "explanation": e, "text": t, "mse": float(m), "cosine": float(c)}
                for i, (e, t, m, c) in enumerate(zip(self.explanations, self.texts,
                                                     self.mse.tolist(), self.cosine.tolist()))]


def check_pair(av: ModelSidecar, ar: ModelSidecar) -> None:
    """Raise :class:`InferenceError` naming the first field on which two sidecars disagree."""
    for role, meta in (("av", av), ("ar", ar)):
        if meta.role != role:
            raise InferenceError(mismatch(f"role of the {role.upper()} directory", role, meta.role,
                                          "pass the AV as the first directory and the AR as the second"))
    pairs = [(name, getattr(av, name), getattr(ar, name)) for name in _PAIR_FIELDS]
    # A marker a reader chose by the selection rule (not recorded) says nothing about the pair.
    pairs += [(name, getattr(av.tokens, attr), getattr(ar.tokens, attr)) for name, attr in _MARKER_FIELDS
              if name not in av.derived | ar.derived]
    for name, a, r in pairs:
        if name == "extraction_layer_index" and a is None:
            continue  # an AV sidecar may omit K; the AR's is authoritative
        if a != r:
            raise InferenceError(
                f"the AV and AR do not belong together: {name} is {a!r} in the AV's sidecar but "
                f"{r!r} in the AR's. Load the AV and AR of the same run (e.g. <run>/export/av and "
                f"<run>/export/ar)")
    if av.base_checkpoint != ar.base_checkpoint:
        logger.info("the AV's sidecar names base_checkpoint %r and the AR's %r; the pair is matched "
                    "on its models' configs and tokenizers instead", av.base_checkpoint,
                    ar.base_checkpoint)


def as_vectors(vectors, d_model: int) -> torch.Tensor:
    """``vectors`` (tensor, numpy, or one 1-D vector) as a finite fp32 CPU tensor [n, d_model]."""
    v = torch.as_tensor(np.asarray(vectors) if not isinstance(vectors, torch.Tensor) else vectors)
    v = v.detach().to("cpu", torch.float32)
    v = v.unsqueeze(0) if v.dim() == 1 else v
    if v.dim() != 2 or v.shape[1] != d_model:
        raise InferenceError(mismatch("vectors shape", f"[n, {d_model}] (d_model of the AV/AR)",
                                      list(v.shape), f"pass activations of width {d_model} read "
                                      "from the layer the pair was trained on"))
    if not bool(torch.isfinite(v).all()):
        bad = int((~torch.isfinite(v).all(dim=1)).sum())
        raise InferenceError(f"vectors: {bad} row(s) contain NaN or inf; drop or fix them")
    if v.shape[0] == 0:
        raise InferenceError("vectors: 0 rows; there is nothing to explain or score")
    check_norms(v, "vectors", InferenceError)
    return v


def _resolve_device(device) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


class NLA:
    """A loaded AV/AR pair. Build it with :meth:`from_pretrained`."""

    def __init__(self, av_model, av_tokenizer, av_meta: ModelSidecar, ar: ActivationReconstructor,
                 ar_tokenizer, ar_meta: ModelSidecar, *, injection_scale: float | None = None,
                 prefill: str = "", generate_fn: GenerateFn | None = None,
                 reward_basis: RewardBasis | None = None,
                 injection_centre: torch.Tensor | None = None):
        check_pair(av_meta, ar_meta)
        self.reward_basis = reward_basis
        self.av_model, self.av_tokenizer, self.av_meta = av_model, av_tokenizer, av_meta
        self.ar, self.ar_tokenizer, self.ar_meta = ar, ar_tokenizer, ar_meta
        self.prefill = prefill
        self.depth_pct = depth_pct_for(av_meta.av_template, av_meta.extraction_layer_index or 0,
                                       int(av_model.config.get_text_config().num_hidden_layers))
        self.prompt_ids = av_prompt_ids(av_tokenizer, av_meta.av_template, av_meta.tokens.char,
                                        depth_pct=self.depth_pct, prefill=prefill)
        scale = injection_scale if injection_scale is not None else av_meta.injection_scale
        self.injection = InjectionSpec(av_meta.injection_family,
                                       scale if av_meta.injection_family == "replace" else None,
                                       av_meta.injection_add_layer, av_meta.injection_add_coeff,
                                       centre=injection_centre)
        self._generate_fn = generate_fn

    @classmethod
    def from_pretrained(cls, av_dir, ar_dir, *, dtype: str = "float32", device=None,
                        engine: str = "hf", engine_factory: EngineFactory | None = None,
                        injection_scale: float | None = None, prefill: str = "",
                        trust_remote_code: bool = False, injection_family: str | None = None) -> NLA:
        """Load and validate an AV/AR pair (HF directories with ``nla_meta.yaml``).

        ``injection_scale`` overrides a replace-family scale; when neither it nor the sidecar has
        one (an untrained ``init`` AV), each call chooses ``1.1 × mean raw norm`` of its vectors,
        as the training stages do. ``prefill`` is text placed after the generation prompt (the
        recipe's ``templates.av_prefill``; the LoRA release uses ``<explanation>``).
        ``injection_family`` (``add`` | ``replace``): the AV's family when its sidecar does not
        record it — required for nanoNLA's layout (its Karvonen AVs: ``add``), refused when it
        contradicts the sidecar.
        """
        from transformers import AutoTokenizer

        av_dir, ar_dir = Path(av_dir), Path(ar_dir)
        if dtype not in DTYPES:
            raise InferenceError(mismatch("dtype", sorted(DTYPES), dtype))
        if engine != "hf" and engine_factory is None:
            raise InferenceError(f"engine {engine!r}: the core runs only 'hf' in-process; pass "
                                 f"engine_factory=rollout.explain.engine_factory({engine!r})")
        check_model_dir(av_dir, "AV")
        check_model_dir(ar_dir, "AR")
        av_meta = read_model_sidecar(av_dir, injection_family=injection_family)
        ar_meta = read_model_sidecar(ar_dir)
        check_pair(av_meta, ar_meta)
        device = _resolve_device(device)
        with quiet_transformers():
            av_model, av_tok = load_causal_lm(av_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        validate_model_sidecar(av_meta, av_tok, av_model.config, role="av")
        ar = ActivationReconstructor.from_pretrained(ar_dir, dtype=DTYPES[dtype],
                                                     trust_remote_code=trust_remote_code)
        ar_tok = AutoTokenizer.from_pretrained(ar_dir, local_files_only=True,
                                               trust_remote_code=trust_remote_code)
        validate_model_sidecar(ar_meta, ar_tok, ar.config, role="ar")
        basis = None if ar_meta.reward_basis is None else load_reward_basis(
            ar_dir / ar_meta.reward_basis, d_model=ar_meta.d_model)
        centre = None if av_meta.injection_centre is None else load_injection_centre(
            av_dir / av_meta.injection_centre, av_meta.d_model)
        problem = same_base_problem(av_model.config, av_tok, ar.config, ar_tok)
        if problem:
            raise InferenceError(f"the AV and AR do not belong together: {problem}. Load the AV and "
                                 "AR of the same run (e.g. <run>/export/av and <run>/export/ar)")
        nla = cls(av_model.to(device).eval(), av_tok, av_meta, ar.to(device).eval(), ar_tok, ar_meta,
                  injection_scale=injection_scale, prefill=prefill, reward_basis=basis,
                  injection_centre=centre)
        if engine != "hf":
            if nla.injection.family == "replace" and nla.injection.scale is None:
                raise InferenceError(f"engine {engine!r} needs a fixed replace scale, and the AV's "
                                     "sidecar has none (injection_scale: null): pass injection_scale")
            # The engine loads its own copy of the AV from av_dir.
            nla._generate_fn = engine_factory(av_dir, av_meta, nla.injection, dtype, device)
        return nla

    # ------------------------------------------------------------------ properties
    @property
    def d_model(self) -> int:
        return int(self.ar_meta.d_model)

    @property
    def layer_index(self) -> int:
        """K: the base-model block whose output the pair explains."""
        return int(self.ar_meta.extraction_layer_index)

    @property
    def mse_scale(self) -> float | None:
        return self.ar_meta.mse_scale

    # ------------------------------------------------------------------ AV
    def _injection_for(self, vectors: torch.Tensor) -> InjectionSpec:
        if self.injection.family != "replace" or self.injection.scale is not None:
            return self.injection
        mean_norm = float(vectors.norm(dim=-1).mean()) if len(vectors) else 1.0
        return dataclasses.replace(self.injection, scale=DATA_SCALE_FACTOR * mean_norm or 1.0)

    def _eos_ids(self) -> list[int]:
        """The generation config's stop ids and the tokenizer's EOS (the chat turn close)."""
        eos = self.av_model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        tok_eos = self.av_tokenizer.eos_token_id
        return sorted(set(eos) | ({tok_eos} if tok_eos is not None else set()))

    def _hf_generate(self, vectors: torch.Tensor | None, n: int, injection: InjectionSpec,
                     params: GenerationParams) -> tuple[list[str], int]:
        tok, device = self.av_tokenizer, next(self.av_model.parameters()).device
        ids, mask = left_pad([self.prompt_ids] * n, tok.pad_token_id)
        kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=tok.pad_token_id,
                      eos_token_id=self._eos_ids(), do_sample=params.temperature > 0)
        if params.temperature > 0:
            kwargs.update(temperature=params.temperature, top_p=1.0, top_k=0)
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # seeded, global RNG untouched
            torch.manual_seed(params.seed)
            if vectors is None:  # the no-injection control: the marker keeps its own embedding
                out = self.av_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                             **kwargs)
                applied = 0
            else:
                positions = find_marker_positions(ids, self.av_meta.marker, expected=n)
                out, handle = generate_with_injection(
                    self.av_model, None, ids.to(device), mask.to(device), family=injection.family,
                    vectors=injection.av_input(vectors).to(device), positions=positions.to(device), scale=injection.scale,
                    layer=injection.layer, coeff=injection.coeff, **kwargs)
                applied = handle.applied
        return tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True), applied

    def generate(self, vectors, *, max_new_tokens: int = 128, temperature: float = 0.0,
                 batch_size: int = 16, seed: int = 0, inject: bool = True) -> Generation:
        """The AV's raw output for each vector (``inject=False``: the same prompts with the
        injection disabled — the marker's plain embedding; the vectors only set the row count)."""
        vectors = as_vectors(vectors, self.d_model)
        if batch_size < 1 or max_new_tokens < 1 or not temperature >= 0:
            raise InferenceError(f"batch_size and max_new_tokens must be ≥ 1 and temperature ≥ 0, "
                                 f"found {batch_size}, {max_new_tokens}, {temperature}")
        check_context(self.av_model.config, len(self.prompt_ids), max_new_tokens,
                      "max_new_tokens")
        injection = self._injection_for(vectors)
        texts, applied = [], 0
        for start in range(0, len(vectors), batch_size):
            chunk = vectors[start:start + batch_size]
            params = GenerationParams(max_new_tokens, temperature, seed + start)
            if self._generate_fn is not None and inject:
                out, n_applied = self._generate_fn(self.prompt_ids, chunk, params)
            else:
                out, n_applied = self._hf_generate(chunk if inject else None, len(chunk), injection,
                                                   params)
            texts += [self.prefill + t for t in out]
            applied += n_applied
        return Generation(texts, [extract_explanation(t) for t in texts], applied,
                          injection.scale if injection.family == "replace" else None)

    def explain(self, vectors, *, max_new_tokens: int = 128, temperature: float = 0.0,
                batch_size: int = 16, seed: int = 0) -> list[str | None]:
        """One explanation per vector (``None`` where the AV wrote no ``<explanation>``; the raw
        texts are in :meth:`generate`)."""
        return self.generate(vectors, max_new_tokens=max_new_tokens, temperature=temperature,
                             batch_size=batch_size, seed=seed).explanations

    # ------------------------------------------------------------------ AR
    def reconstruct(self, texts: Sequence[str | None] | str, *, batch_size: int = 32) -> torch.Tensor:
        """Predicted activations [n, d] (fp32, CPU) of explanation ``texts`` (None reads as "")."""
        texts = [texts] if isinstance(texts, str) else [t or "" for t in texts]
        return self.ar.reconstruct(self.ar_tokenizer, texts, template=self.ar_meta.ar_template,
                                   batch_size=batch_size)

    # ------------------------------------------------------------------ round trip
    def score_generation(self, vectors, generation: Generation, *, batch_size: int = 32) -> ScoreResult:
        """Score already generated explanations against their gold ``vectors``."""
        gold = as_vectors(vectors, self.d_model)
        preds = self.reconstruct(generation.explanations, batch_size=batch_size)
        return ScoreResult(
            explanations=generation.explanations, texts=generation.texts, predictions=preds,
            mse=normalized_mse(apply_basis(self.reward_basis, preds),
                               apply_basis(self.reward_basis, gold), self.mse_scale),
            cosine=cosine(preds, gold),
            fve=fve(preds, gold, self.mse_scale),
            failed=torch.tensor([e is None for e in generation.explanations], dtype=torch.bool),
            injections_applied=generation.injections_applied,
            injection_scale=generation.injection_scale)

    def score(self, vectors, *, max_new_tokens: int = 128, temperature: float = 0.0,
              batch_size: int = 16, seed: int = 0) -> ScoreResult:
        """Explain ``vectors``, reconstruct them from the explanations, and score: per-row MSE
        (normalised to ``mse_scale``, in the AR's reward basis when it has one) and cosine, FVE over
        the batch (the paper's definition, raw basis)."""
        generation = self.generate(vectors, max_new_tokens=max_new_tokens, temperature=temperature,
                                   batch_size=batch_size, seed=seed)
        return self.score_generation(vectors, generation)


__all__ = ["NLA", "ScoreResult", "Generation", "GenerationParams", "InferenceError", "check_pair",
           "as_vectors"]
