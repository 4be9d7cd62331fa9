"""The recipe: one frozen, documented dataclass per component, loaded from YAML plus overrides.

A recipe is strict on purpose: an unknown key (a typo) or a value of the wrong type fails at load
time, naming the dotted key, what was expected and what was found, instead of silently training
with a default. ``describe()`` lists every key with its type, default and doc (``--help``).

Adding a field: add one ``param(...)`` line to its section (with ``gt/ge/le/lt`` bounds if it has
a range); a rule that involves several fields goes in the section's ``validate``. Nothing else needs
to know about it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from nla_rl.atomic import atomic_write_text
from nla_rl.data.toyworld import DEFAULT_P_SLOT
from nla_rl.errors import ConfigError
from nla_rl.templates import (AR_FIELDS, AV_FIELDS, DEFAULT_AR_TEMPLATE, DEFAULT_AV_TEMPLATE,
                              DEPTH_AV_TEMPLATE, av_sft_target, template_problem)
from nla_rl.testing.tiny import FAMILIES as TINY_FAMILIES

REDACTED = "***REDACTED***"
# prepare: base model, marker, initial checkpoints; datagen: activations, labels, splits,
# negatives; check: round trip of the initial AV/AR on held-out activations.
ALL_STAGES = ("prepare", "datagen", "check", "ar_sft", "av_sft", "rl", "export", "eval")
Stage = Literal["prepare", "datagen", "check", "ar_sft", "av_sft", "rl", "export", "eval"]
# Env vars whose values are treated as secrets by ``redact`` (defence in depth).
NAMED_AV_TEMPLATES = {"default": DEFAULT_AV_TEMPLATE, "depth": DEPTH_AV_TEMPLATE}
NAMED_AR_TEMPLATES = {"default": DEFAULT_AR_TEMPLATE}
_SECRET_ENV_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
_MIN_SECRET_LEN = 8  # shorter values ("1", "true") would redact innocent text everywhere


def param(default: Any = dataclasses.MISSING, doc: str = "", *, secret: bool = False,
          choices: Sequence[Any] | None = None, factory: Any = dataclasses.MISSING,
          gt: float | None = None, ge: float | None = None, le: float | None = None,
          lt: float | None = None) -> Any:
    """A documented dataclass field. ``secret`` fields are redacted on dump; ``choices`` (for
    enumerations not written as ``Literal``) and the bounds ``gt ge le lt`` are checked on
    construction; a null value skips the bounds."""
    bounds = {op: b for op, b in (("gt", gt), ("ge", ge), ("le", le), ("lt", lt)) if b is not None}
    meta = {"doc": doc, "secret": secret, "choices": tuple(choices) if choices else None,
            "bounds": bounds}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_BOUND_TESTS = {"gt": (">", float.__gt__), "ge": (">=", float.__ge__),
                "le": ("<=", float.__le__), "lt": ("<", float.__lt__)}


def _bounds_text(bounds: dict) -> str:
    return " and ".join(f"{_BOUND_TESTS[op][0]} {b}" for op, b in bounds.items())


def _require(ok: bool, key: str, message: str) -> None:
    """Raise a ConfigError for ``key`` (relative to its section; the loader adds the section).
    An empty ``key`` means the section as a whole."""
    if not ok:
        raise ConfigError(f"{key}: {message}" if key else f": {message}")


class ConfigSection:
    """Base of every section: checks each field's declared bounds and choices, then the section's
    own ``validate``. Subclasses are ``@dataclass(frozen=True)``."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, bounds = getattr(self, f.name), f.metadata.get("bounds")
            if bounds and value is not None:
                ok = all(_BOUND_TESTS[op][1](float(value), float(b)) for op, b in bounds.items())
                _require(ok, f.name, f"must be {_bounds_text(bounds)}, found {value!r}")
            choices = f.metadata.get("choices")
            _require(not choices or value in choices, f.name,
                     f"expected one of {list(choices or ())}, found {value!r}")
        self.validate()

    def validate(self) -> None:
        """Rules that involve several fields; the default has none."""


# ----------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RunConfig(ConfigSection):
    name: str = param("tiny", "Run name; names the run directory and the W&B run.")
    dir: str = param("", "Run directory for data, checkpoints and logs; empty means runs/<name>.")
    seed: int = param(0, "Global seed; data splits, position sampling and rollouts derive from it.")
    stages: tuple[Stage, ...] = param(ALL_STAGES, "Stages to run, in pipeline order: "
                                      + ", ".join(ALL_STAGES) + ".")
    resume: bool = param(False, "Resume from the latest checkpoint in the run directory.")
    verbose: bool = param(False, "Show third-party output (vLLM, Ray actors, transformers, "
                          "torch.distributed) on the console; off: it goes to <dir>/logs/<process "
                          "kind>.log and the console shows one line per RL step (--verbose sets it).")
    call_timeout_floor_s: float = param(
        600.0, "Least time a remote call of the RL, SFT or datagen loop (an engine's generate, a "
        "learner rank's update, a weight sync, a shard) may take before it counts as hung: an "
        "engine is then killed and replaced, a learner rank stops the run with an error naming "
        "it. Alone it bounds the first calls; raise it when a first checkpoint of a large model "
        "takes longer.", gt=0)
    call_timeout_factor: float = param(
        5.0, "A call's deadline is max(call_timeout_floor_s, this x the longest of the last 10 "
        "step times and durations of the same call).", ge=1)

    def validate(self):
        _require(bool(self.name) and "/" not in self.name, "name",
                 f"must be a non-empty name without '/', found {self.name!r}")
        _require(len(self.stages) > 0, "stages", f"is empty, so the run would do nothing; name "
                 f"the stages to run, e.g. [prepare, datagen] (all: {list(ALL_STAGES)})")
        _require(list(self.stages) == [s for s in ALL_STAGES if s in self.stages], "stages",
                 f"must list each stage once, in the pipeline order {list(ALL_STAGES)}, "
                 f"found {list(self.stages)}")
        if not self.dir:  # resolved here so the dumped recipe records where the run really lives
            object.__setattr__(self, "dir", f"runs/{self.name}")


@dataclass(frozen=True)
class ModelConfig(ConfigSection):
    base: str = param("tiny:qwen2", "Base model: a Hugging Face model directory, tiny:<family> "
                      f"for an offline tiny random model ({'|'.join(TINY_FAMILIES)}), or toyworld "
                      "(a tiny LM trained on the toy-world corpus; see the toyworld section).")
    layer_index: int = param(2, "K: activations are read at the output of decoder block K "
                             "(0-based).", ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = param("float32", "Weights/compute dtype.")
    trust_remote_code: bool = param(False, "Run the model repository's own Python code; off unless "
                                    "the recipe says so.")

    def validate(self):
        _require(bool(self.base), "base", "must name a model directory or tiny:<family>")
        family = self.base.removeprefix("tiny:")  # "toyworld" passes: it is not a tiny: name
        _require(not self.base.startswith("tiny:") or family in TINY_FAMILIES, "base",
                 f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")


@dataclass(frozen=True)
class InjectionConfig(ConfigSection):
    family: Literal["replace", "add"] = param(
        "replace", "replace: the marker's input embedding becomes n_s(h); add: h1 + c·|h1|·v/|v| "
        "at the output of block add_layer. A checkpoint only works with the family it learnt.")
    scale: float | None = param(None, "replace only: target norm s of the injected vector; null = "
                                "chosen from the data at datagen (1.1 × the mean raw norm of the AV-SFT "
                                "rows), recorded in the data sidecars and used by every stage.", gt=0)
    add_layer: int = param(1, "add only: decoder block whose output receives the vector.", ge=0)
    add_coeff: float = param(1.0, "add only: c, the injected norm relative to the residual norm.",
                             gt=0)
    centre: bool = param(False, "The AV reads h/|h| - mu instead of h (mu: the mean unit activation "
                         "of the AV-SFT rows, fitted at datagen): every activation shares one large "
                         "direction, which otherwise fills most of the injected row. Stored as "
                         "injection_centre.npy beside the AV (sidecar extraction."
                         "injection_centre; the published readers ignore it, so such an AV needs "
                         "nla-rl's loader).")
    whiten: float | None = param(
        None, "With centre: the AV reads (h/|h| - mu) W, W = (Sigma + lambda*tr(Sigma)/d*I)^(-1/2) "
        "fitted at datagen on the same rows (this value is lambda, relative to the mean variance; "
        "null = centred only). Every direction the activations differ in reaches the AV with unit "
        "variance, not only the few that hold most of it. Stored in injection_centre.npy as "
        "[mu; W] ([d+1, d] float32: 268 MB at d = 8192; fitting it is one d x d eigh).", ge=0)
    marker: str | None = param(None, "Marker character; null = the first single-token character "
                               "in U+3200-U+33FF.")

    def validate(self):
        _require(self.family == "replace" or self.scale is None, "scale",
                 f"must be null for family 'add' (it is norm-matched), found {self.scale!r}")
        _require(self.marker != "", "marker", "must be null or non-empty")
        _require(self.whiten is None or self.centre, "whiten",
                 f"whitens the centred input, so it needs injection.centre: true (found whiten="
                 f"{self.whiten!r} with centre: false); set centre: true or whiten: null")


@dataclass(frozen=True)
class TemplatesConfig(ConfigSection):
    av: str = param(DEFAULT_AV_TEMPLATE, "AV user message; must contain {injection_char}. The "
                    "names default (the paper's) and depth (with {depth_pct}, the LoRA "
                    "hard-negative release's) stand for the published texts.")
    ar: str = param(DEFAULT_AR_TEMPLATE, "AR input text; must contain {explanation}; the name "
                    "default stands for the paper's.")
    av_prefill: str = param("", "Prefilled after the AV generation prompt, e.g. <explanation>.")

    def validate(self):
        # Named templates keep recipes readable; the resolved text is what the dump records.
        object.__setattr__(self, "av", NAMED_AV_TEMPLATES.get(self.av, self.av))
        object.__setattr__(self, "ar", NAMED_AR_TEMPLATES.get(self.ar, self.ar))
        av_problem = template_problem(self.av, AV_FIELDS, NAMED_AV_TEMPLATES)
        _require(av_problem is None, "av", str(av_problem))
        ar_problem = template_problem(self.ar, AR_FIELDS, NAMED_AR_TEMPLATES)
        _require(ar_problem is None, "ar", str(ar_problem))
        # The AR predicts at the last token: the explanation must be followed by closing text.
        _require(self.ar.split("{explanation}", 1)[1].strip() != "", "ar",
                 "must have text after {explanation} (the AR reads its prediction at the last "
                 "token, e.g. '… </text> <summary>'), found none")
        # Every AV-SFT target starts '<explanation>\n'; a prefill is a prefix of that.
        _require(av_sft_target("").startswith(self.av_prefill), "av_prefill",
                 f"must be the start of '<explanation>\\n' (the beginning of every AV-SFT target), "
                 f"e.g. '<explanation>' or empty; found {self.av_prefill!r}")


@dataclass(frozen=True)
class SplitsConfig(ConfigSection):
    av_sft: float = param(0.25, "Fraction of documents for AV-SFT.", ge=0)
    ar_sft: float = param(0.25, "Fraction of documents for AR-SFT.", ge=0)
    rl: float = param(0.4, "Fraction of documents for RL.", ge=0)
    eval: float = param(0.1, "Fraction of documents held out for evaluation.", ge=0)

    def validate(self):
        total = self.av_sft + self.ar_sft + self.rl + self.eval
        _require(abs(total - 1.0) <= 1e-6, "",
                 f"av_sft + ar_sft + rl + eval must sum to 1, found {total!r}")


@dataclass(frozen=True)
class TeacherConfig(ConfigSection):
    kind: Literal["toyworld", "openai", "anthropic", "local", "none"] = param(
        "toyworld", "toyworld: the partial ground-truth teacher; openai/anthropic: an HTTP API; "
        "local: an instruct model run in-process; none: no explanations (extraction only).")
    model: str = param("", "Model name (openai/anthropic) or local model directory (local).")
    base_url: str = param("", "API base URL; empty = the provider's default.")
    api_key_env: str = param("", "NAME of the environment variable with the API key; empty = "
                             "OPENAI_API_KEY / ANTHROPIC_API_KEY.")
    max_concurrency: int = param(8, "Concurrent API requests.", gt=0)
    max_tokens: int = param(200, "Longest teacher answer in tokens.", gt=0)
    temperature: float = param(0.0, "Teacher sampling temperature.", ge=0)
    min_features: int = param(2, "Rows whose explanation has fewer features are dropped "
                              "(counted); the toyworld teacher uses 1.", gt=0)
    backend: Literal["auto", "vllm", "hf"] = param(
        "auto", "Engine of the local teacher: vllm (batched, in-process vLLM), hf (transformers "
        "generate), auto = vllm when it can be imported, else hf. Both give the same greedy labels "
        "and share the teacher cache.")
    prompt: str = param("", "The teacher's user prompt, with {prefix} where the document prefix "
                        "goes; empty = the published prompt (the 2-3 most important features). "
                        "A prompt asking for every feature suits data.ar_teacher.")

    @property
    def key_env(self) -> str:
        """The environment variable an API teacher reads its key from ("" for other kinds)."""
        defaults = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
        return (self.api_key_env or defaults[self.kind]) if self.kind in defaults else ""

    def validate(self):
        _require(self.kind not in ("openai", "anthropic", "local") or bool(self.model), "model",
                 f"must name the teacher model for kind {self.kind!r}")
        _require(not self.api_key_env or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env)
                 is not None, "api_key_env", "must be an environment variable name, not the key")
        _require(not self.prompt or "{prefix}" in self.prompt, "prompt",
                 "must contain {prefix}, where the document prefix goes (or be empty for the "
                 "published prompt)")


@dataclass(frozen=True)
class ARTeacherConfig(TeacherConfig):
    """A second teacher for the AR-SFT split: the AR learns what a complete explanation predicts
    only from complete explanations (README "An AR trained on complete explanations")."""

    kind: Literal["same", "openai", "anthropic", "local"] = param(
        "same", "same: the AR-SFT split keeps data.teacher's explanations (the toy world's own "
        "AR teacher is toyworld.ar_p_include); openai/anthropic/local: this teacher re-explains "
        "the AR-SFT split after the split, with the keys of data.teacher (a fuller prompt or a "
        "stronger model than the AV's teacher).")


@dataclass(frozen=True)
class ToyWorldConfig(ConfigSection):
    lm_steps: int = param(400, "Training steps of the toy base LM (cached in <run>/base).", gt=0)
    lm_hidden: int = param(128, "Hidden size of the toy LM (head size 32).", gt=0)
    lm_layers: int = param(4, "Decoder blocks of the toy LM.", gt=0)
    lm_kv_heads: int = param(
        1, "Key/value heads of the toy LM (of 4 query heads): 4 lets one attention layer move "
        "4 x 32 dims from earlier tokens, enough to gather every revealed value at the recap "
        "cue; 1 shares one 32-dim value space among the heads.", gt=0, le=4)
    recap_loss_weight: float = param(
        1.0, "Toy LM training: weight of the recap tokens' loss against the rest (recap world): "
        "the recap is a few tokens of each document, and without a weight a 400-step LM barely "
        "learns to predict it, so it does not gather the values at the cue.", gt=0)
    ending: Literal["recap", "end"] = param(
        "end", "recap (v2): documents end 'The end. In short: v1, v2, ….' and the readout is "
        "the cue's last token, where the LM must hold every revealed value; end (v1): documents "
        "end 'The end.', whose last token carries which slots were revealed but barely their "
        "values.")
    p_slot: float = param(
        DEFAULT_P_SLOT, "Probability that a document reveals each slot other than its subject: "
        "the more slots every document reveals, the less of the activation's variance is which "
        "slots were revealed and the more is their values (what an MSE reward sees).", gt=0, le=1)
    p_include: float = param(0.4, "Teacher: probability of mentioning each true attribute.",
                             gt=0, le=1)
    p_wrong: float = param(0.05, "Teacher: probability that a mentioned attribute's value is "
                           "replaced by a wrong one.", ge=0, lt=1)
    ar_p_include: float | None = param(
        None, "The AR's teacher: the AR-SFT split is re-explained naming each true attribute with "
        "this probability (p_wrong as above; null = p_include, one teacher for both). An AR "
        "trained on fuller explanations than the AV's learns what every attribute predicts, so "
        "the reward asks the AV for them. Like p_include, used only by the toyworld teacher.",
        gt=0, le=1)


@dataclass(frozen=True)
class DataConfig(ConfigSection):
    corpus: str = param("toyworld", "A parquet/jsonl path, or toyworld (generated offline).")
    text_column: str = param("text", "Column holding the document text.")
    max_tokens: int = param(128, "Documents are cut to this many tokens (BOS included).", gt=0)
    positions_per_doc: int = param(10, "At most this many activation positions per document.", gt=0)
    min_pos: int = param(50, "Earliest token position sampled (enough context); 50 for real "
                         "models.", ge=0)
    positions: Literal["random", "last"] = param(
        "random", "random: positions_per_doc positions drawn without replacement (seeded by "
        "seed and doc_id); last: the document's last positions_per_doc eligible tokens, where "
        "the whole document has been read (the toy world's attributes are all encoded there).")
    splits: SplitsConfig = param(factory=SplitsConfig, doc="Split by document, never by row.")
    num_docs: int | None = param(None, "Use only the first N documents; null = all (toyworld: "
                                 "how many documents to generate; null = 2000).", gt=0)
    workers: int = param(0, "Ray extraction workers, each with a replica of blocks 0..K; 0 = "
                         "extract in this process.", ge=0)
    cpus_per_worker: float = param(1.0, "Ray CPUs reserved per extraction worker.", gt=0)
    gpus_per_worker: float = param(0.0, "Ray GPUs reserved per extraction worker (extraction runs "
                                   "on CUDA whenever the process sees one).", ge=0)
    docs_per_shard: int = param(256, "Documents per shard file; finished shards are skipped on "
                                "rerun, so this is also the resume granularity.", gt=0)
    batch_size: int = param(8, "Documents per extraction forward pass.", gt=0)
    teacher: TeacherConfig = param(factory=TeacherConfig, doc="Who writes the explanations.")
    ar_teacher: ARTeacherConfig = param(
        factory=ARTeacherConfig, doc="Who writes the AR-SFT split's explanations (same = teacher).")

    def validate(self):
        _require(self.min_pos < self.max_tokens, "min_pos",
                 f"must be < max_tokens ({self.max_tokens}), found {self.min_pos}")


@dataclass(frozen=True)
class SFTConfig(ConfigSection):
    lr: float = param(2e-5, "Peak learning rate.", gt=0)
    steps: int = param(50, "Optimiser steps.", gt=0)
    batch_size: int = param(16, "Sequences per optimiser step, summed over all ranks of the role.",
                            gt=0)
    micro_batch_size: int = param(4, "Sequences per forward/backward on one rank.", gt=0)
    warmup_steps: int = param(5, "Linear warm-up steps.", ge=0)
    weight_decay: float = param(0.0, "AdamW weight decay.", ge=0)
    grad_clip: float = param(1.0, "Gradient-norm clip.", gt=0)
    schedule: Literal["cosine", "constant", "wsd"] = param(
        "cosine", "LR schedule after warm-up; wsd: constant, then a linear decay to 0 over the "
        "last 20% of the steps.")
    eval_every: int = param(10, "Held-out metrics (and the AV's real-vs-shuffled control) every "
                            "this many steps, and always after the last; 0 = only after the last.",
                            ge=0)
    eval_rows: int = param(256, "Rows of the eval split scored by the held-out metrics. FVE "
                           "needs a few hundred: on the tiny run the AR-SFT final scores 0.022 "
                           "on 64 eval rows and 0.147 / 0.153 on 256 / 1024.", gt=0)
    save_every: int = param(0, "Checkpoint every this many steps (the last step is always "
                            "saved); 0 = only the last.", ge=0)
    keep_last: int = param(2, "Checkpoints kept; older ones are deleted once a newer one is "
                           "complete.", gt=0)

    def validate(self):
        _require(self.warmup_steps <= self.steps, "warmup_steps",
                 f"must be <= steps ({self.steps}), found {self.warmup_steps}")


@dataclass(frozen=True)
class ARSFTConfig(SFTConfig):
    loss_basis: Literal["raw", "centre", "standardize", "whiten"] = param(
        "raw", "A second term of the AR-SFT loss, measured in this basis (the kinds of "
        "rl.reward_basis, fitted on the AR-SFT split's activations): L = MSE(n(ĥ), n(h)) + "
        "w·MSE(n(B(ĥ)), n(B(h))). Raw MSE spends the AR on the loudest directions (toy world: "
        "which slots a document revealed); whitened, the quiet directions that tell one value "
        "from another count as much, so the AR, and a reward it gives, tell values apart. "
        "raw: no second term. Stored as <run>/ar_sft/loss_basis.safetensors; RL's online AR "
        "keeps rl.reward_basis alone.")
    loss_basis_eps: float = param(0.1, "ε of ar_sft.loss_basis (as rl.reward_basis_eps).", gt=0)
    loss_basis_weight: float = param(0.1, "w: the weight of the ar_sft.loss_basis term against "
                                     "the raw one (each is 2(1 - cos) per row).", gt=0)
    contrast_weight: float = param(
        0.0, "w_c: weight of a contrastive term of the AR-SFT loss, w_c·InfoNCE: the prediction, "
        "centred on the AR-SFT split's unit mean, must be nearer its own activation than every "
        "activation of a bank of AR-SFT rows (temperature contrast_tau). Aims the AR at telling "
        "a row from its neighbours (top-1 among hard negatives); 0 = off.", ge=0)
    contrast_tau: float = param(0.1, "τ of ar_sft.contrast_weight's InfoNCE.", gt=0)
    contrast_bank_rows: int = param(
        65536, "At most this many AR-SFT rows in the contrast bank (a seeded sample beyond): "
        "every rank holds the bank, rows × d fp32 (65536 × 8192 = 2 GiB).", gt=0)


@dataclass(frozen=True)
class RLConfig(ConfigSection):
    steps: int = param(20, "GRPO steps.", gt=0)
    seed: int | None = param(None, "Seed of the RL stage alone (data order, sampling, length "
                             "budgets); null = run.seed. Vary it to repeat RL from one SFT pair "
                             "(nla-rl ablate --seeds).", ge=0)
    prompts_per_step: int = param(8, "Distinct activations per step.", gt=0)
    group_size: int = param(4, "Samples per activation (GRPO group); advantages compare samples "
                            "of a group, so at least 2.", ge=2)
    temperature: float = param(1.0, "Sampling temperature.", gt=0)
    top_p: float = param(1.0, "Nucleus sampling threshold.", gt=0, le=1)
    max_new_tokens: int = param(48, "Generation cap; capped rollouts get failure_penalty.", gt=0)
    av_lr: float = param(1e-5, "AV (policy) learning rate.", gt=0)
    ar_lr: float = param(3e-5, "AR learning rate when trained online.", gt=0)
    kl_beta: float = param(0.01, "Weight of the KL to the frozen SFT policy; 0 = off.", ge=0)
    kl_estimator: Literal["k1", "k3"] = param("k3", "k1: -Δ = logπ - logπ_ref; k3: exp(Δ)-Δ-1; "
                                              "Δ = logπ_ref - logπ.")
    clip_low: float = param(0.2, "PPO ratio clip below 1.", gt=0, lt=1)
    clip_high: float = param(0.28, "PPO ratio clip above 1.", gt=0)
    advantage: Literal["grpo", "drgrpo"] = param("grpo", "grpo: (r-mean)/(std+advantage_eps); "
                                                 "drgrpo: r-mean (no std division).")
    advantage_eps: float = param(
        1e-6, "epsilon of the grpo advantage (r-mean)/(std+eps), std the group's sample std. TRL "
        "uses 1e-4; NLA rewards (-MSE) can have tight groups (std near 1e-3), where 1e-4 shrinks "
        "the advantages by ~9% and 1e-6 by ~0.1% (reward/group_std logs the mean std).", gt=0)
    reward: Literal["neg_mse", "neg_log_mse"] = param("neg_mse", "-MSE, or -log(max(MSE, 1e-8)).")
    reward_basis: Literal["raw", "centre", "standardize", "whiten"] = param(
        "raw", "The basis the reward's MSE (and the online AR's loss) is measured in: raw; "
        "centre (unit vectors less their training mean: cosines compare what differs between "
        "activations); standardize (each dimension z-scored); whiten (ZCA: every direction of "
        "the training activations counts the same); all on unit-norm vectors. Fitted on the RL "
        "split at the start of RL, stored as "
        "reward_basis.safetensors beside the AR and used by export, eval and inference. For "
        "when the variance is not where the meaning is; FVE stays in the raw basis.")
    reward_basis_eps: float = param(
        1e-3, "ε of the reward basis, relative to the mean variance (whiten) or standard "
        "deviation (standardize): directions with almost no variance are not blown up.", gt=0)
    failure_penalty: float | None = param(None, "Reward of a rollout with no extractable "
                                          "explanation or that hits the cap; null = the "
                                          "orthogonal-equivalent of the reward (-2 for neg_mse, "
                                          "-log 2 for neg_log_mse).")
    is_cap: float = param(2.0, "Cap of the truncated importance weight "
                          "exp(logp_learner - logp_engine).", gt=0)
    online_ar: bool = param(True, "Train the AR on the AV's own explanations during RL.")
    async_level: int = param(
        0, "Rollouts generated ahead of the update: step t's rollouts come from the policy "
        "after max(0, t - async_level) updates, so generating the next batch overlaps the "
        "current update (the truncated importance weights correct for the stale policy; "
        "rollout/staleness logs the lag). 0 = synchronous (on-policy); 1 = one step off; 2 = "
        "two (one engine pool gives no more overlap than 1). Resume is exact at every level.",
        ge=0, le=2)
    ar_ema_decay: float = param(
        0.0, "Score rollouts with an exponential moving average of the online AR's weights "
        "(ema <- d*ema + (1-d)*weights after each AR step); 0 = score with the live AR. The "
        "exported AR is the live one.", ge=0, lt=1)
    stop_on_unhealthy: bool = param(
        True, "Stop after the first step if injection is broken or > 50% of rollouts have no "
        "extractable explanation (an untrained or mismatched AV); false only for smoke tests.")
    save_every: int = param(10, "Checkpoint both learners every this many steps (the last step "
                            "is always saved).", gt=0)
    keep_last: int = param(2, "RL checkpoints kept per learner (the AR, saved first, keeps one "
                           "more, so a crash between the two saves still leaves a complete pair "
                           "to resume).", gt=0)
    frozen_ar_every: int = param(
        1, "Also score the rollouts with the frozen AR-SFT final every this many steps "
        "(rollout/fve_frozen_ar beside the live AR's rollout/fve: a gap that opens is the AV "
        "hacking the online AR); 0 = never. Costs one AR forward per scored step.", ge=0)
    alarm_window: int = param(
        10, "Steps per window of the reward-vs-truth alarm (health/reward_up_truth_down): it "
        "fires when the reward's mean over the last window rose while frozen-AR FVE, "
        "cross-group diversity or toy-world precision fell against the window before.", gt=0)
    samples_every: int = param(5, "Log a table of rollouts (explanation, reward, MSE, gap) every "
                               "this many steps.", gt=0)
    sync_tolerance: float | None = param(
        None, "Largest |engine - learner| log-prob on the verification probe after a weight "
        "sync; null = 2e-3 in float32, 0.15 in bf16/fp16 (the sync is refused above it).", gt=0)
    verify_sync_every: int = param(
        10, "Check the weight sync on the probe after the first sync and every this many steps "
        "(every rollout's engine-vs-learner log-prob mismatch is still checked each step).", gt=0)
    is_mismatch_threshold: float | None = param(
        0.1, "Rollouts whose mean |logp_learner - logp_engine| over response tokens exceeds this "
        "are masked out of the policy loss (counted; a lost injection or a stale engine); "
        "null = never mask.", gt=0)
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = param(
        "token_mean", "token_mean: policy loss summed over every response token of the step "
        "(all micro-batches and ranks) / their number; seq_mean_token_mean: token mean within "
        "each rollout, then mean over rollouts; seq_mean_token_sum_norm (Dr.GRPO, TRL's "
        "dr_grpo): the token sum / (rollouts x max_new_tokens), a constant normaliser.")
    length_penalty_coef: float = param(
        0.01, "c of the hinge length penalty c·max(0, n_tokens - (max_new_tokens - "
        "length_penalty_margin)), n_tokens counted up to the first EOS; 0 = off.", ge=0)
    length_penalty_margin: int = param(
        16, "Tokens below max_new_tokens where the hinge starts (the published runs: 64 with "
        "max_new_tokens 150-256).", ge=0)
    random_length_budget: bool = param(
        False, "Hinge against a per-group budget drawn uniformly from [length_budget_min, "
        "max_new_tokens - length_penalty_margin] (seeded by step) instead of the fixed one.")
    length_budget_min: int = param(8, "Smallest random per-group length budget.", gt=0)

    def validate(self):
        _require(self.async_level < self.steps, "async_level",
                 f"must be < rl.steps ({self.steps}), found {self.async_level}: every rollout "
                 "would come from the starting policy and none from a trained one; lower "
                 "rl.async_level or raise rl.steps")
        _require(self.length_penalty_coef == 0 or self.length_penalty_margin < self.max_new_tokens,
                 "length_penalty_margin", f"must be < max_new_tokens ({self.max_new_tokens}) "
                 f"while length_penalty_coef > 0, found {self.length_penalty_margin}")
        budget_max = self.max_new_tokens - self.length_penalty_margin
        _require(not self.random_length_budget or (self.length_penalty_coef > 0
                 and self.length_budget_min <= budget_max), "random_length_budget",
                 f"needs length_penalty_coef > 0 and length_budget_min <= max_new_tokens - "
                 f"length_penalty_margin ({budget_max}), found coef {self.length_penalty_coef} "
                 f"and length_budget_min {self.length_budget_min}")


@dataclass(frozen=True)
class NegativesConfig(ConfigSection):
    enabled: bool = param(False, "Reward against hard negatives (nearest activations by cosine).")
    top_k: int = param(20, "Neighbours indexed per activation (self excluded).", gt=0)
    per_sample: int = param(3, "Negatives drawn per sample from its top_k.", gt=0)
    combine: Literal["max", "infonce"] = param("max", "max: cos(ĥ,h) - max_j cos(ĥ,h_j); "
                                               "infonce: log-softmax of h among the negatives.")
    temperature: float = param(0.1, "tau of the infonce combination.", gt=0)
    weight: float = param(1.0, "lambda: weight of the negatives term in the reward.", ge=0)
    exclude_same_doc: bool = param(True, "Skip same-document neighbours (near-duplicates).")
    method: Literal["exact", "faiss"] = param("exact", "exact: chunked matrix products; faiss: "
                                              "an approximate index (pip install faiss-cpu).")

    def validate(self):
        _require(self.per_sample <= self.top_k, "per_sample",
                 f"must be <= top_k ({self.top_k}), found {self.per_sample}")


@dataclass(frozen=True)
class EngineConfig(ConfigSection):
    kind: Literal["vllm", "hf"] = param("vllm", "Rollout engine: vllm, or hf (transformers).")
    num_engines: int = param(1, "Rollout engine replicas.", gt=0)
    tensor_parallel_size: int = param(1, "GPUs per engine (vLLM tensor parallelism); 1 on CPU.",
                                      gt=0)
    kv_cache_gib: float = param(1.0, "CPU KV cache GiB per engine (VLLM_CPU_KVCACHE_SPACE).", gt=0)
    gpu_memory_utilization: float = param(0.5, "Fraction of GPU memory an engine may take.",
                                          gt=0, le=1)


@dataclass(frozen=True)
class LearnerConfig(ConfigSection):
    backend: Literal["fsdp2", "deepspeed"] = param("fsdp2", "Distributed training backend.")
    zero_stage: Literal[2, 3] = param(3, "DeepSpeed ZeRO stage (deepspeed backend only).")
    ranks_av: int = param(2, "Training ranks (processes) of the AV.", gt=0)
    ranks_ar: int = param(2, "Training ranks (processes) of the AR.", gt=0)
    lora_rank: int = param(0, "LoRA rank of the AV; 0 = full fine-tune.", ge=0)
    lora_alpha: float = param(64.0, "LoRA alpha: scale alpha/r, or alpha/sqrt(r) with rsLoRA.",
                              gt=0)
    lora_dropout: float = param(0.0, "LoRA dropout.", ge=0, lt=1)
    use_rslora: bool = param(False, "Rank-stabilised LoRA scaling.")
    gradient_checkpointing: bool = param(False, "Recompute activations in backward to save memory.")
    micro_batch_tokens: int | None = param(
        None, "Token budget of one micro-batch on one rank (AV and AR: training, eval and "
        "log-prob passes): rows are sorted by length and grouped so rows x longest row <= this "
        "(a longer row goes alone), so padding no longer sets memory; null = micro_batch_size "
        "rows per micro-batch, in order.", gt=0)
    lora_target_modules: tuple[str, ...] = param(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "Names of the Linear layers that get a LoRA adapter (lora_rank > 0); each must exist in "
        "the AV.")
    sharded_load: bool = param(
        True, "FSDP2 with 2+ ranks and a safetensors checkpoint: each rank builds the model on "
        "the meta device and reads only its own shard of every tensor (host memory per rank "
        "about its shard, not the whole fp32 model); false = every rank loads the whole model "
        "before sharding (as DeepSpeed always does).")
    num_cpus_per_rank: float = param(0.5, "Ray CPUs reserved per rank.", ge=0)
    num_gpus_per_rank: float = param(0.0, "Ray GPUs reserved per rank; 0 on CPU.", ge=0)
    placement: Literal["separate", "colocated"] = param(
        "separate", "separate: each learner group has its own placement group (a bundle per "
        "rank) and each engine its own resources (tensor_parallel_size GPUs). colocated: one "
        "placement group whose bundle i holds engine i, AV rank i and AR rank i, sharing one "
        "slot of num_gpus_per_rank GPUs (a third each for Ray) and num_cpus_per_rank CPUs "
        "apiece; needs ranks_av == ranks_ar >= engine.num_engines and tensor_parallel_size 1, "
        "and a low engine.gpu_memory_utilization leaving the learners room.")


@dataclass(frozen=True)
class WandbConfig(ConfigSection):
    enabled: bool = param(False, "Log to Weights & Biases.")
    project: str = param("nla-rl", "W&B project.")
    entity: str | None = param(None, "W&B entity (team or user); null = the account's default.")
    mode: Literal["offline", "online", "disabled"] = param("offline", "W&B mode.")
    api_key_env: str = param("WANDB_API_KEY", "NAME of the environment variable holding the API "
                             "key; the key itself never goes in a recipe.")

    def validate(self):
        _require(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env) is not None,
                 "api_key_env", "must be an environment variable name, not the key itself")


@dataclass(frozen=True)
class EvalConfig(ConfigSection):
    rows: int = param(256, "First N rows of data/eval.parquet scored by the eval stage.", ge=2)
    max_new_tokens: int | None = param(None, "Greedy explanation length cap; null = "
                                       "rl.max_new_tokens.", gt=0)
    batch_size: int = param(16, "Generation batch size.", gt=0)
    compare: tuple[Literal["rl", "sft", "init"], ...] = param(
        ("sft",), "Earlier pairs of the run also scored (when present and not "
        "the evaluated pair), so the report shows what each stage added.")


@dataclass(frozen=True)
class RecipeConfig(ConfigSection):
    run: RunConfig = param(factory=RunConfig, doc="Run identity, directory and stages.")
    model: ModelConfig = param(factory=ModelConfig, doc="Base model and extraction layer.")
    injection: InjectionConfig = param(factory=InjectionConfig, doc="How h enters the AV.")
    templates: TemplatesConfig = param(factory=TemplatesConfig, doc="AV and AR prompt templates.")
    data: DataConfig = param(factory=DataConfig, doc="Corpus, positions and document splits.")
    toyworld: ToyWorldConfig = param(factory=ToyWorldConfig, doc="The toy world (corpus and "
                                     "base model toyworld).")
    ar_sft: ARSFTConfig = param(factory=ARSFTConfig, doc="AR supervised stage.")
    av_sft: SFTConfig = param(factory=SFTConfig, doc="AV supervised stage.")
    rl: RLConfig = param(factory=RLConfig, doc="GRPO on the AV with the AR's reward.")
    negatives: NegativesConfig = param(factory=NegativesConfig, doc="Hard-negative reward.")
    engine: EngineConfig = param(factory=EngineConfig, doc="Rollout engines.")
    learner: LearnerConfig = param(factory=LearnerConfig, doc="Training backend and placement.")
    wandb: WandbConfig = param(factory=WandbConfig, doc="Weights & Biases logging.")
    eval: EvalConfig = param(factory=EvalConfig, doc="The eval stage's report.")

    @property
    def rl_seed(self) -> int:
        """The RL stage's seed: ``rl.seed``, or ``run.seed`` when that is null."""
        return self.run.seed if self.rl.seed is None else self.rl.seed

    def validate(self):
        for stage, ranks in (("ar_sft", self.learner.ranks_ar), ("av_sft", self.learner.ranks_av)):
            sft = getattr(self, stage)
            _require(sft.batch_size % (sft.micro_batch_size * ranks) == 0, f"{stage}.batch_size",
                     f"must be a multiple of micro_batch_size × ranks ({sft.micro_batch_size} × "
                     f"{ranks}), found {sft.batch_size}")
        _require(self.data.ar_teacher.kind == "same" or self.toyworld.ar_p_include is None,
                 "data.ar_teacher.kind", "re-explains the AR-SFT split, and so does "
                 "toyworld.ar_p_include; keep one: set toyworld.ar_p_include=null or "
                 "data.ar_teacher.kind=same")
        learner, engine = self.learner, self.engine
        _require(learner.placement != "colocated" or (
            learner.ranks_av == learner.ranks_ar >= engine.num_engines
            and engine.tensor_parallel_size == 1), "learner.placement",
            "colocated puts engine i, AV rank i and AR rank i in one bundle, so it needs "
            "learner.ranks_av == learner.ranks_ar >= engine.num_engines and "
            "engine.tensor_parallel_size == 1; found ranks_av "
            f"{learner.ranks_av}, ranks_ar {learner.ranks_ar}, num_engines {engine.num_engines}, "
            f"tensor_parallel_size {engine.tensor_parallel_size}. Change those keys, or set "
            "learner.placement=separate")


# ----------------------------------------------------------------------------- type checking


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)  # resolves the string annotations of `from __future__`


def _found(value: Any) -> str:
    if value is None:
        return "null"
    kind = {bool: "bool", dict: "mapping", list: "list"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}"


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "|".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return f"list[{_type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


# PyYAML follows YAML 1.1, which reads `1e-5` (no dot) as a string; accept that spelling for floats.
_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` as ``tp`` (int→float, list→tuple, mapping→dataclass), or a ConfigError."""
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        # type() equality, so True does not pass for 1 nor 1 for 1.0.
        if any(value == a and type(value) is type(a) for a in args):
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        tip = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, found {_found(value)}{tip}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, found {_found(value)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, found {_found(value)}")
        return tuple(_check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
        return float(value)
    # bool is a subclass of int: reject it for int/float, and reject 1/"yes" for bool.
    ok = {bool: type(value) is bool, int: type(value) is int, str: isinstance(value, str),
          float: type(value) in (int, float)}.get(tp)
    if ok is None:
        raise TypeError(f"{key}: config type {tp!r} is not supported by the loader")
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, found {_found(value)}")
    if tp is float and not math.isfinite(value):  # .nan/.inf in YAML: always a mistake here
        raise ConfigError(f"{key}: expected a finite float, found {value!r}")
    return float(value) if tp is float else value


def _unknown_key(key: str, cls: type) -> ConfigError:
    section, _, name = key.rpartition(".")
    valid = [f.name for f in dataclasses.fields(cls)]
    hint = difflib.get_close_matches(name, valid, n=1)
    tip = f"did you mean {(section + '.' if section else '') + hint[0]!r}? " if hint else ""
    return ConfigError(f"unknown key {key!r}; {tip}valid keys in {section or 'the recipe'}: "
                       f"{', '.join(valid)}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking every key and value."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping of keys, found {_found(data)}")
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints:
            raise _unknown_key(key, cls)
        kwargs[name] = _check_value(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # __post_init__ names the field; add the section it lives in
        message = str(err)
        joiner = "" if message.startswith(":") or not prefix else "."
        raise ConfigError(f"{prefix}{joiner}{message}".removeprefix(": ")) from None


# ------------------------------------------------------------------------ loading & overrides


def _apply_override(data: dict, override: str) -> None:
    """Set ``a.b=c`` in the raw recipe mapping; ``c`` is parsed as YAML."""
    dotted, sep, text = override.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted:
        raise ConfigError(f"override {override!r}: expected key.sub=value, e.g. rl.steps=10")
    cls, node, names = RecipeConfig, data, dotted.split(".")
    for depth, name in enumerate(names):
        key, last = ".".join(names[: depth + 1]), depth == len(names) - 1
        if name not in _hints(cls):
            raise _unknown_key(key, cls)
        tp = _hints(cls)[name]
        if last and dataclasses.is_dataclass(tp):
            example = dataclasses.fields(tp)[0].name
            raise ConfigError(f"override {override!r}: {key} is a section, not a value; override "
                              f"its keys one by one, e.g. {key}.{example}=...")
        if last:
            node[name] = yaml.safe_load(text)
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override {override!r}: {key} is a value, "
                              f"it has no key {names[depth + 1]!r}")
        if node.get(name) is None:  # section absent from the file, or written as `rl:` alone
            node[name] = {}
        child = node[name]
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: expected a mapping of keys, found {_found(child)}")
        cls, node = tp, child


def recipe_from_dict(data: dict | None, overrides: Sequence[str] = ()) -> RecipeConfig:
    """A checked RecipeConfig from a plain mapping (as YAML gives it) plus ``a.b=c`` overrides."""
    data = copy.deepcopy(data or {})  # overrides must not edit the caller's mapping
    if not isinstance(data, dict):
        raise ConfigError(f"recipe: expected a mapping of sections, found {_found(data)}")
    if isinstance(overrides, str):  # a lone string would be iterated character by character
        overrides = [overrides]
    for override in overrides:
        _apply_override(data, override)
    return _build(RecipeConfig, data)


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Read a YAML recipe, apply ``a.b=c`` overrides, and check everything."""
    if not Path(path).is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist; recipes/ has one per base model "
                          "(recipes/tiny.yaml is the CPU default)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                          f"{err.start}); is it a recipe YAML file?") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:  # an empty file (or only comments): most likely a truncated copy
        raise ConfigError(f"{path}: the recipe is empty; a recipe names at least its run and "
                          f"model (start from recipes/tiny.yaml)")
    try:
        return recipe_from_dict(data, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


# ---------------------------------------------------------------------- dumping & redaction


def recipe_to_dict(cfg: Any) -> dict:
    """Plain YAML-safe data (tuples as lists) of a config dataclass; nothing redacted."""
    return _plain(cfg, redact_secrets=False)


def redact(obj: Any) -> Any:
    """Plain data of ``obj`` (a config dataclass, mapping, list or scalar) with secrets masked:
    fields marked ``secret=True``, and any substring equal to the value of an environment
    variable whose name contains KEY, TOKEN, SECRET or PASSWORD."""
    env_secrets = sorted({v for k, v in os.environ.items()
                          if _SECRET_ENV_NAME.search(k) and len(v) >= _MIN_SECRET_LEN},
                         key=len, reverse=True)  # longest first, so no partial leftovers
    return _plain(obj, redact_secrets=True, env_secrets=env_secrets)


def _plain(obj: Any, *, redact_secrets: bool, env_secrets: Sequence[str] = ()) -> Any:
    again = functools.partial(_plain, redact_secrets=redact_secrets, env_secrets=env_secrets)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        secret = {f.name for f in dataclasses.fields(obj) if f.metadata.get("secret")}
        return {name: REDACTED if redact_secrets and name in secret and value is not None
                else again(value) for name, value in values.items()}
    if isinstance(obj, dict):
        return {k: again(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [again(v) for v in obj]
    if isinstance(obj, str):
        for env_secret in env_secrets:
            obj = obj.replace(env_secret, REDACTED)
    return obj


def dump_recipe(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved, redacted recipe as YAML, atomically (tmp file + rename)."""
    text = yaml.safe_dump(redact(cfg), sort_keys=False, allow_unicode=True, width=100)
    return atomic_write_text(path, text)


# ------------------------------------------------------------------------------- describe


def describe(cls: type = RecipeConfig, prefix: str = "") -> str:
    """One line per key: ``dotted.key: type = default  # doc`` (sections as headers)."""
    lines, indent = [], "  " * prefix.count(".")
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{indent}{key}:  # {f.metadata.get('doc', '')}")
            lines.append(describe(tp, prefix=f"{key}."))
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        shown = yaml.safe_dump(_plain(default, redact_secrets=False), default_flow_style=True,
                               width=10**6).strip().removesuffix("...").strip()
        if len(shown) > 50:
            shown = shown[:47] + "..."
        bounds = f" ({_bounds_text(f.metadata['bounds'])})" if f.metadata.get("bounds") else ""
        lines.append(f"{indent}{key}: {_type_name(tp)}{bounds} = {shown}  # {f.metadata['doc']}")
    return "\n".join(lines)
