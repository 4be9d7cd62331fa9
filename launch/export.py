"""The ``export`` stage: the deliverable pair ``<run>/export/{av,ar}`` (HF directories + sidecars).

    nla-rl export RUN_DIR [--from rl|sft|init|checkpoint] [--step N]

Sources, most trained first (the default takes the first one present and says which):

* ``rl``    ``<run>/rl/final/{av,ar}`` (both needed);
* ``sft``   ``<run>/{av,ar}_sft/final``, a role without an SFT model taking ``init/<role>`` (the
  pair RL would start from); needs at least one SFT model;
* ``init``  ``<run>/init/{av,ar}`` (untrained: the base model and the identity-head AR);
* ``checkpoint`` (never the default) the latest valid training checkpoint of each role
  (``--step N``: that step): RL's ``<run>/rl/{av,ar}/step_*`` when there are any, else the SFT
  stages' ``<run>/{av,ar}_sft/step_*``; converted with :mod:`nla_rl.export` on the config of the
  directory that stage trained from, LoRA settings from the run's recipe.

Every export is verified (see :mod:`nla_rl.export`) and the pair is committed only when both
roles verified.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launch.common import ROLES, RunPaths, has_model, injection_of, trained_or_initial
from nla_rl.atomic import check_writable_dir
from nla_rl.config import RecipeConfig
from nla_rl.export import Exported, ExportError, LoraSettings, export_pair, pair_from_checkpoints
from nla_rl.injection import CENTRE_FILE
from nla_rl.sidecar import read_model_sidecar

SOURCES = ("rl", "sft", "init", "checkpoint")


@dataclass(frozen=True)
class Checkpoints:
    """One checkpoint step directory per role, and the directory each role trained from."""

    stage: str  # "rl" or "sft"
    steps: dict[str, Path]
    inits: dict[str, Path]


def final_dirs(run_dir: Path, source: str) -> dict[str, Path] | None:
    """The model directories of ``source`` (rl | sft | init) in ``run_dir``, or None if absent."""
    run = RunPaths(run_dir)
    if source == "rl":
        dirs = {role: run.final("rl", role) for role in ROLES}
    elif source == "sft":
        sft = {role: run.final(f"{role}_sft") for role in ROLES}
        if not any(has_model(p) for p in sft.values()):
            return None
        dirs = {role: p if has_model(p) else run.init(role) for role, p in sft.items()}
    else:
        dirs = {role: run.init(role) for role in ROLES}
    return dirs if all(has_model(p) for p in dirs.values()) else None


def default_source(run_dir: Path) -> str:
    """The most trained source present: rl, then sft, then init."""
    for source in ("rl", "sft", "init"):
        if final_dirs(run_dir, source) is not None:
            return source
    raise ExportError(f"nothing to export in {run_dir}: no rl/final/{{av,ar}}, no *_sft/final and no "
                      "init/{av,ar}; run the pipeline (at least the prepare stage) first, or export "
                      "training checkpoints with --from checkpoint")


def _trained_from(run_dir: Path, stage: str, role: str) -> Path:
    """The model directory the checkpoints of ``stage`` were trained from (its config and sidecar)."""
    if stage == "rl":
        return trained_or_initial(run_dir, role)
    return RunPaths(run_dir).init(role)


def find_checkpoints(run_dir: Path, cfg: RecipeConfig, step: int | None = None) -> Checkpoints:
    """The checkpoint of each role to export: RL's if it has any, else the SFT stages'."""
    from nla_rl.checkpoint import CheckpointManager

    run = RunPaths(run_dir)

    def managers(stage: str) -> dict:
        names = {r: f"rl_{r}" if stage == "rl" else f"{r}_sft" for r in ROLES}
        return {r: CheckpointManager.for_recipe(run.stage(name), cfg, name, keep_last=None)
                for r, name in names.items()}

    rl = managers("rl")
    stage = "rl" if any(m.steps() for m in rl.values()) else "sft"
    found = {}
    for role, manager in (rl if stage == "rl" else managers("sft")).items():
        if step is None:
            path = manager.latest_valid()
        elif step in manager.steps():
            path = manager.step_path(step)
            manager.check(path)
        else:
            path = None
        if path is None:
            wanted = "no valid checkpoint" if step is None else f"no checkpoint of step {step}"
            raise ExportError(f"{wanted} for the {role.upper()} in {manager.root} (steps there: "
                              f"{manager.steps() or 'none'}); train it first, or export the models "
                              "with --from rl|sft|init")
        found[role] = path
    return Checkpoints(stage, found, {r: _trained_from(run_dir, stage, r) for r in ROLES})


def resolved_scale(run_dir: Path, ckpts: Checkpoints) -> float | None:
    """The replace scale the AV was trained with when its start sidecar left it null: the stage's
    final model records it; else the one datagen recorded (as that stage read it)."""
    meta = read_model_sidecar(ckpts.inits["av"])
    if meta.injection_family != "replace" or meta.injection_scale is not None:
        return None
    run = RunPaths(run_dir)
    final = run.final("rl", "av") if ckpts.stage == "rl" else run.final("av_sft")
    if has_model(final):
        return read_model_sidecar(final).injection_scale
    return injection_of(meta, run_dir).scale


def data_centre_file(run_dir: Path, ckpts: Checkpoints) -> Path | None:
    """The injection centre file the AV trained with, when its start sidecar names one: the
    one datagen wrote into the run's data (what every stage read)."""
    meta = read_model_sidecar(ckpts.inits["av"])
    return None if meta.injection_centre is None else RunPaths(run_dir).data / meta.injection_centre


def _load_run_recipe(run_dir: Path) -> RecipeConfig:
    from nla_rl.config import load_recipe

    path = RunPaths(run_dir).recipe
    if not path.is_file():
        raise ExportError(f"{path} not found: exporting checkpoints needs the run's recipe (LoRA "
                          "settings, checkpoint fingerprints); is this a run directory?")
    return load_recipe(path)


def export_run(run_dir, *, source: str | None = None, step: int | None = None,
               cfg: RecipeConfig | None = None) -> tuple[Exported, Exported]:
    """Export ``run_dir``'s pair from ``source`` (default: the most trained present) to
    ``<run>/export/{av,ar}``; prints the source and the verification result."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"export: {run_dir} " + ("is a file; give a run directory (the run.dir "
                          "of a recipe)" if run_dir.exists() else "does not exist; give a run "
                          "directory (the run.dir of a recipe)"))
    check_writable_dir(RunPaths(run_dir).export, "export directory")
    if source is not None and source not in SOURCES:
        raise ExportError(f"export source: expected one of {SOURCES}, found {source!r}")
    if step is not None and source != "checkpoint":
        raise ExportError("--step selects a training checkpoint: use it with --from checkpoint")
    out_root = RunPaths(run_dir).export
    if source == "checkpoint":
        cfg = cfg or _load_run_recipe(run_dir)
        ckpts = find_checkpoints(run_dir, cfg, step)
        print(f"[export] source: {ckpts.stage} checkpoints — AV {ckpts.steps['av']} (config "
              f"{ckpts.inits['av']}), AR {ckpts.steps['ar']} (config {ckpts.inits['ar']})")
        pair = pair_from_checkpoints(ckpts.steps["av"], ckpts.inits["av"], ckpts.steps["ar"],
                                     ckpts.inits["ar"], out_root,
                                     lora=LoraSettings.from_learner(cfg.learner),
                                     injection_scale=resolved_scale(run_dir, ckpts),
                                     injection_centre=data_centre_file(run_dir, ckpts))
    else:
        chosen = source or default_source(run_dir)
        dirs = final_dirs(run_dir, chosen)
        if dirs is None:
            raise ExportError(f"--from {chosen}: no such models in {run_dir} ("
                              + ", ".join(str(p) for p in _expected(run_dir, chosen))
                              + "); run that stage first, or choose another source")
        print(f"[export] source: {chosen}{'' if source else ' (the most trained present)'} — "
              f"AV {dirs['av']}, AR {dirs['ar']}")
        pair = export_pair(dirs["av"], dirs["ar"], out_root,
                           av_injection_centre=RunPaths(run_dir).data / CENTRE_FILE)
    for item in pair:
        step = "" if item.step is None else f", step {item.step}"
        print(f"[export] {item.role.upper()} → {item.path} (verified: max |Δ| "
              f"{item.max_abs_diff:.2g} in {item.dtype}{step})")
    return pair


def _expected(run_dir: Path, source: str) -> list[Path]:
    run = RunPaths(run_dir)
    if source == "rl":
        return [run.final("rl", r) for r in ROLES]
    if source == "sft":
        return [run.final(f"{r}_sft") for r in ROLES]
    return [run.init(r) for r in ROLES]


def export(cfg: RecipeConfig, run_dir: Path, tracker=None) -> None:
    """The pipeline stage: export the most trained pair present (it logs no metrics)."""
    export_run(run_dir, cfg=cfg)

