"""What the stages share: where a run keeps its files, reading the data splits, the injection a
stage trains with, the learner spec of a role, saving a trained model, and the step/cursor that
a checkpoint resumes from.

The stage modules (``datagen``, ``stages``, ``sft``, ``rl``, ``export``, ``eval``) use this
module and never each other, so the launch layer has no import cycle
(``tests/unit/test_layering.py`` checks it).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nla_rl.config import RecipeConfig, SFTConfig
from nla_rl.errors import NLAError
from nla_rl.injection import (CENTRE_FILE, DATA_SCALE_FACTOR, InjectionSpec, fit_injection_centre,
                              load_injection_centre, save_injection_centre, scale_from_data)
from nla_rl.sidecar import (MODEL_SIDECAR_NAME, ModelSidecar, read_dataset_sidecar, read_model_sidecar,
                            write_dataset_sidecar)

ROLES = ("av", "ar")
ROLE_OF = {"ar_sft": "ar", "av_sft": "av"}
CURSOR_FILE = "data_cursor.json"
PROGRESS_FILE = "progress.json"
# The data sidecars' record of the replace scale chosen from data (top-level key, see datagen).
DATA_SCALE_KEY = "injection"
DATA_SCALE_SPLIT = "av_sft"  # the rows the scale is chosen from (the AV's training data)


class SFTStageError(NLAError):
    """A stage's inputs are missing or do not belong together."""


# --------------------------------------------------------------------------- the run directory

@dataclass(frozen=True)
class RunPaths:
    """Where everything lives inside one run directory."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        """``<run>/data/<name>.parquet`` (base, ar_sft, av_sft, rl, eval)."""
        return self.data / f"{name}.parquet"

    def init(self, role: str) -> Path:
        return self.root / "init" / role

    def stage(self, stage: str) -> Path:
        """A training stage's checkpoint root: ``ar_sft``, ``av_sft``, or ``rl/<role>`` as
        ``rl_av`` / ``rl_ar``."""
        if stage.startswith("rl_"):
            return self.root / "rl" / stage[3:]
        return self.root / stage

    def final(self, stage: str, role: str | None = None) -> Path:
        """``<run>/<stage>/final`` (SFT) or ``<run>/rl/final/<role>``."""
        return self.root / "rl" / "final" / role if stage == "rl" else self.root / stage / "final"

    @property
    def rl(self) -> Path:
        return self.root / "rl"

    @property
    def logs(self) -> Path:
        return self.root / "logs" / "metrics.jsonl"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"


def has_model(path: Path) -> bool:
    return (path / MODEL_SIDECAR_NAME).is_file()


def trained_or_initial(run_dir: Path, role: str) -> Path:
    """The SFT model of ``role`` when the SFT stage ran, else the initial one."""
    run = RunPaths(run_dir)
    for path in (run.final(f"{role}_sft"), run.init(role)):
        if has_model(path):
            return path
    raise SFTStageError(f"rl: no {role.upper()} to start from in {run_dir} (neither "
                        f"{role}_sft/final nor init/{role}); run.stages must include prepare")


# ---------------------------------------------------------------------------------- the data

@dataclass
class Split:
    """One data split: explanations and their activations [n, d] (fp32)."""

    explanations: list[str]
    vectors: np.ndarray

    def rows(self, indices) -> dict:
        return {"explanations": [self.explanations[i] for i in indices],
                "vectors": self.vectors[np.asarray(indices)]}


def labelled(path: Path) -> Split:
    """The rows of ``path`` that have an explanation (possibly none: a run without a teacher,
    ``data.teacher.kind=none``, writes no explanation column)."""
    import pyarrow.parquet as pq

    from nla_rl.data.store import read_activations, read_rows

    if "explanation" not in pq.read_schema(path).names:
        return Split([], np.empty((0, 0), dtype=np.float32))
    texts = read_rows(path, columns=["explanation"])["explanation"].to_pylist()
    keep = [i for i, t in enumerate(texts) if t and t.strip()]
    vectors = read_activations(path)[np.asarray(keep, dtype=np.int64)]
    return Split([texts[i] for i in keep], np.ascontiguousarray(vectors, dtype=np.float32))


def load_split(path: Path, *, init: ModelSidecar, stage: str) -> Split:
    """Rows with an explanation, after checking the file's sidecar matches the initial model."""
    if not path.is_file():
        raise SFTStageError(f"{stage}: {path} does not exist; the datagen stage writes it "
                            "(run.stages must include datagen before this stage)")
    meta = read_dataset_sidecar(path)
    for name, found, expected in (("extraction.base_model", meta.base_model, init.base_checkpoint),
                                  ("extraction.d_model", meta.d_model, init.d_model),
                                  ("extraction.layer_index", meta.layer_index,
                                   init.extraction_layer_index)):
        if found != expected:
            raise SFTStageError(
                f"{path}: {name} is {found!r} but the initial {init.role.upper()} was built for "
                f"{expected!r}; regenerate the data (datagen) for this model, or point run.dir at "
                "the run the data belongs to")
    split = labelled(path)
    if not split.explanations:
        raise SFTStageError(f"{stage}: {path} has no rows with an explanation; the teacher "
                            "labelled nothing (check data.teacher)")
    return split


# ------------------------------------------------------------------------------ the injection

def _av_data_rows(data_dir: Path) -> tuple[np.ndarray, str]:
    """The rows the AV's input statistics are chosen from, and their name: the AV-SFT rows with
    an explanation (the rows AV-SFT trains on), or every row when there are none."""
    from nla_rl.data.store import read_activations

    path = Path(data_dir) / f"{DATA_SCALE_SPLIT}.parquet"
    rows = labelled(path).vectors if path.is_file() else np.empty((0, 0), np.float32)
    if len(rows):
        return rows, f"{DATA_SCALE_SPLIT}.parquet rows with an explanation"
    return read_activations(Path(data_dir) / "base.parquet"), "base.parquet"


def choose_data_scale(data_dir: Path) -> tuple[float, str]:
    """The replace scale chosen from data (``1.1 × mean ‖h‖`` over :func:`_av_data_rows`) and
    the rows it was chosen from."""
    rows, name = _av_data_rows(data_dir)
    return scale_from_data(rows), name


def record_data_scale(data_dir: Path, scale: float, rows: str) -> None:
    """Record the scale chosen from data in every data sidecar of ``data_dir`` (datagen)."""
    entry = {"scale_from_data": scale, "rule": f"{DATA_SCALE_FACTOR} x mean activation norm",
             "rows": rows}
    for path in sorted(Path(data_dir).glob("*.parquet")):
        try:
            meta = read_dataset_sidecar(path)
        except NLAError:
            continue  # not a data split (e.g. the hard-negative index)
        write_dataset_sidecar(path, dataclasses.replace(
            meta, extras={**meta.extras, DATA_SCALE_KEY: entry}))


def write_data_centre(data_dir: Path, whiten: float | None = None) -> Path:
    """Fit the injection centre μ (and, with ``whiten`` = λ, the whitening W) on the rows the
    scale is chosen from (:func:`_av_data_rows`) and write it into ``data_dir`` (datagen,
    ``injection.centre: true``)."""
    out = Path(data_dir) / CENTRE_FILE
    save_injection_centre(fit_injection_centre(_av_data_rows(data_dir)[0], whiten), out)
    return out


def data_scale(data_dir: Path) -> float:
    """The replace scale datagen recorded; for a run made before it was recorded, the same rule
    on the same rows (what the AV-SFT stage computed), so an old run gets the same number."""
    base = Path(data_dir) / "base.parquet"
    try:
        entry = read_dataset_sidecar(base).extras.get(DATA_SCALE_KEY)
    except NLAError:
        entry = None
    if isinstance(entry, dict) and entry.get("scale_from_data") is not None:
        return float(entry["scale_from_data"])
    if not base.is_file() and not (Path(data_dir) / f"{DATA_SCALE_SPLIT}.parquet").is_file():
        raise SFTStageError(f"the injection scale is chosen from the data (injection.scale: null) "
                            f"but {data_dir} holds no data; run the datagen stage first")
    return choose_data_scale(data_dir)[0]


def injection_of(meta: ModelSidecar, run_dir: Path) -> InjectionSpec:
    """The injection an AV with sidecar ``meta`` trains and runs with: the sidecar's; a replace
    scale it leaves null is the one datagen recorded for the run's data, and a centre it names is
    the one datagen wrote there."""
    scale = None
    if meta.injection_family == "replace":
        scale = meta.injection_scale
        if scale is None:
            scale = data_scale(RunPaths(run_dir).data)
    centre = None
    if meta.injection_centre is not None:
        centre = load_injection_centre(RunPaths(run_dir).data / meta.injection_centre, meta.d_model)
    return InjectionSpec(meta.injection_family, scale, meta.injection_add_layer,
                         meta.injection_add_coeff, centre=centre)


# ------------------------------------------------------------------------------- the learners

def learner_spec(cfg: RecipeConfig, stage: str, init_dir: Path, meta: ModelSidecar,
                 injection: InjectionSpec | None):
    """The LearnerSpec of an SFT stage (and its rank count), from the recipe and the initial
    model's sidecar; RL derives its own from it."""
    from actors.backends import OptimSpec
    from actors.learner import LearnerSpec
    from actors.learner_models import LoraSpec, ModelSpec

    sft: SFTConfig = getattr(cfg, stage)
    lc = cfg.learner
    role = ROLE_OF[stage]
    lora = LoraSpec(lc.lora_rank if role == "av" else 0, lc.lora_alpha, lc.lora_dropout,
                    lc.use_rslora, tuple(lc.lora_target_modules))
    depth = None
    if "{depth_pct}" in meta.av_template:
        from transformers import AutoConfig

        from nla_rl.templates import depth_percent
        layers = AutoConfig.from_pretrained(init_dir).num_hidden_layers
        depth = depth_percent(meta.extraction_layer_index, layers)
    model = ModelSpec(role=role, model_dir=str(init_dir), dtype=cfg.model.dtype,
                      trust_remote_code=cfg.model.trust_remote_code, lora=lora,
                      gradient_checkpointing=lc.gradient_checkpointing, injection=injection,
                      marker=meta.marker, av_template=meta.av_template,
                      av_prefill=cfg.templates.av_prefill, depth_pct=depth,
                      ar_template=meta.ar_template or "", mse_scale=meta.mse_scale)
    optim = OptimSpec(lr=sft.lr, weight_decay=sft.weight_decay, warmup_steps=sft.warmup_steps,
                      total_steps=sft.steps, schedule=sft.schedule, grad_clip=sft.grad_clip)
    ranks = lc.ranks_ar if role == "ar" else lc.ranks_av
    return LearnerSpec(model=model, optim=optim, backend=lc.backend, zero_stage=lc.zero_stage,
                       micro_batch_size=sft.micro_batch_size,
                       micro_batch_tokens=lc.micro_batch_tokens, seed=cfg.run.seed,
                       sharded_load=lc.sharded_load), ranks


# ------------------------------------------------------------------------- progress / cursor

@dataclass(frozen=True)
class Progress:
    """Where a resumed stage starts: the first step, the data cursor, skipped steps so far."""

    step: int
    cursor: object  # nla_rl.checkpoint.DataCursor
    skipped_steps: float


def save_progress(staging: Path, cursor, step: int, skipped_steps: float) -> None:
    """Write the data cursor and the step count into a checkpoint being staged."""
    from nla_rl.atomic import atomic_write_json
    from nla_rl.checkpoint import save_data_cursor

    save_data_cursor(cursor, staging / CURSOR_FILE)
    atomic_write_json(staging / PROGRESS_FILE, {"step": step, "skipped_steps": skipped_steps})


def load_progress(path: Path, *, num_items: int, seed: int) -> Progress:
    """The progress a checkpoint directory holds (its cursor must match the data and seed)."""
    from nla_rl.checkpoint import load_data_cursor

    cursor = load_data_cursor(path / CURSOR_FILE, num_items=num_items, seed=seed)
    progress = json.loads((path / PROGRESS_FILE).read_text())
    return Progress(int(progress["step"]), cursor, float(progress["skipped_steps"]))


# ---------------------------------------------------------------------------- trained models

def save_av(model, tokenizer, meta: ModelSidecar, out_dir: Path, *,
            centre: torch.Tensor | None = None) -> None:
    """The AV checkpoint: an ordinary HF causal-LM dir + tokenizer + sidecar, written atomically;
    a trained AV whose sidecar names an injection centre carries it (the initial AV's is resolved
    from the run's data, which does not exist yet at prepare)."""
    from nla_rl.atomic import atomic_dir
    from nla_rl.sidecar import write_model_sidecar

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_model_sidecar(tmp, meta)
        if centre is not None and meta.injection_centre is not None:
            save_injection_centre(centre, Path(tmp) / meta.injection_centre)


def save_trained(cfg, group, role: str, source_dir: Path, meta: ModelSidecar, out_dir: Path, *,
                 stage: str, injection: InjectionSpec | None, trained_on: str, training: dict,
                 lora=None, reward_basis: str | Path | None = None) -> Path:
    """The group's trained weights as an HF directory at ``out_dir`` (built on the config of
    ``source_dir``, LoRA merged) with a validated sidecar for ``stage``; written atomically. An AR
    trained against a reward basis carries it (the file, named in its sidecar)."""
    from transformers import AutoTokenizer

    from nla_rl.sidecar import validate_model_sidecar, write_model_sidecar

    state = group.full_state_dict()
    tokenizer = AutoTokenizer.from_pretrained(source_dir, local_files_only=True,
                                              trust_remote_code=cfg.model.trust_remote_code)
    sidecar = dataclasses.replace(
        meta, stage=stage, created_at="",
        injection_scale=injection.scale if injection is not None else meta.injection_scale,
        trained_on=(trained_on,), parent_checkpoints=(str(source_dir),), training=training)
    if role == "ar":
        from nla_rl.ar_model import ActivationReconstructor
        from nla_rl.reward_basis import BASIS_FILE

        if reward_basis:
            sidecar = dataclasses.replace(sidecar, reward_basis=BASIS_FILE)

        def extra_files(d: Path) -> None:
            write_model_sidecar(d, sidecar)
            if reward_basis:
                shutil.copyfile(reward_basis, d / BASIS_FILE)

        model = ActivationReconstructor.from_pretrained(source_dir)
        model.load_state_dict(state)
        model.save_pretrained(out_dir, tokenizer, extra_files=extra_files)
    else:
        from nla_rl.base_model import DTYPES, load_causal_lm

        model, _ = load_causal_lm(source_dir, dtype="float32",
                                  trust_remote_code=cfg.model.trust_remote_code)
        if lora is not None and lora.rank > 0:
            from actors.learner_models import apply_lora

            model = apply_lora(model, lora)
            model.load_state_dict(state)
            model = model.merge_and_unload()
        else:
            model.load_state_dict(state)
        save_av(model.to(DTYPES[cfg.model.dtype]), tokenizer, sidecar, out_dir,
                centre=injection.centre if injection is not None else None)
    validate_model_sidecar(read_model_sidecar(out_dir), tokenizer, model.config, role=role)
    print(f"[{stage}] wrote {out_dir}")
    return out_dir
