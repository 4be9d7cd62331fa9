"""The export stage on a prepared run: which source it picks, checkpoints, the CLI, bad input."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from launch.cli import main
from launch.export import export_run
from launch.train import run
from nla_rl.ar_model import ActivationReconstructor
from nla_rl.checkpoint import CheckpointManager
from nla_rl.config import load_recipe
from nla_rl.export import ExportError
from nla_rl.injection import (CENTRE_FILE, fit_injection_centre, load_injection_centre,
                              save_injection_centre)
from nla_rl.sidecar import read_model_sidecar, write_model_sidecar

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny.yaml")
SCALE = 2.5  # the replace scale "training" resolved (the recipe leaves it null)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("export-stage") / "run"
    run_dir = run(TINY, ["run.stages=[prepare]", "model.base=tiny:qwen2", f"run.dir={directory}"])
    if read_model_sidecar(run_dir / "init" / "av").injection_centre:  # what datagen would write
        rows = torch.randn(32, read_model_sidecar(run_dir / "init" / "av").d_model,
                           generator=torch.Generator().manual_seed(0)) + 3.0
        save_injection_centre(fit_injection_centre(rows), run_dir / "data" / CENTRE_FILE)
    return run_dir


@pytest.fixture
def run_dir(prepared, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(prepared, copy)
    return copy


def _fake_final(run_dir: Path, role: str, target: Path, stage: str) -> Path:
    """A trained model directory: the init one restamped (the stage's sidecar, resolved scale)."""
    shutil.copytree(run_dir / "init" / role, target)
    meta = read_model_sidecar(target)
    if meta.injection_centre:  # a trained AV carries the centre it trained with
        shutil.copyfile(run_dir / "data" / CENTRE_FILE, target / meta.injection_centre)
    write_model_sidecar(target, dataclasses.replace(
        meta, stage=stage, injection_scale=SCALE if role == "av" else None))
    return target


def _checkpoint(run_dir: Path, role: str, step: int) -> Path:
    """An RL checkpoint of ``role`` (perturbed weights) as LearnerGroup.save writes it."""
    init = run_dir / "init" / role
    model = (ActivationReconstructor.from_pretrained(init) if role == "ar"
             else AutoModelForCausalLM.from_pretrained(init))
    gen = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    cfg = load_recipe(run_dir / "recipe.yaml")
    manager = CheckpointManager.for_recipe(run_dir / "rl" / role, cfg, f"rl_{role}", keep_last=None)
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    return manager.save(step, lambda d: save_file(state, str(d / "model.safetensors")))


def _exported_source(run_dir: Path, role: str) -> str:
    return read_model_sidecar(run_dir / "export" / role).training["export"]["source"]


def test_default_source_is_the_most_trained_pair(run_dir, capsys):
    export_run(run_dir)
    assert "source: init (the most trained present)" in capsys.readouterr().out
    assert _exported_source(run_dir, "av") == str(run_dir / "init" / "av")

    _fake_final(run_dir, "av", run_dir / "av_sft" / "final", "av_sft")
    export_run(run_dir)
    assert "source: sft" in capsys.readouterr().out
    assert _exported_source(run_dir, "av") == str(run_dir / "av_sft" / "final")
    assert _exported_source(run_dir, "ar") == str(run_dir / "init" / "ar")  # no AR-SFT: RL's pair
    assert read_model_sidecar(run_dir / "export" / "av").injection_scale == SCALE

    for role in ("av", "ar"):
        _fake_final(run_dir, role, run_dir / "rl" / "final" / role, "rl")
    export_run(run_dir)
    assert "source: rl" in capsys.readouterr().out
    assert _exported_source(run_dir, "ar") == str(run_dir / "rl" / "final" / "ar")
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["ar", "av"]

    export_run(run_dir, source="init")  # an explicit source wins
    assert _exported_source(run_dir, "av") == str(run_dir / "init" / "av")


def test_checkpoints_latest_or_chosen_step(run_dir, capsys):
    _fake_final(run_dir, "av", run_dir / "av_sft" / "final", "av_sft")
    with pytest.raises(ExportError, match="no valid checkpoint for the AV"):
        export_run(run_dir, source="checkpoint")
    steps = {role: [_checkpoint(run_dir, role, s) for s in (2, 4)] for role in ("av", "ar")}

    av, ar = export_run(run_dir, source="checkpoint")
    out = capsys.readouterr().out
    assert "source: rl checkpoints" in out and f"config {run_dir / 'av_sft' / 'final'}" in out
    assert (av.step, ar.step) == (4, 4)
    meta = read_model_sidecar(run_dir / "export" / "av")
    assert meta.stage == "export" and meta.training["export"]["source"] == str(steps["av"][1])
    assert meta.injection_scale == SCALE  # the scale RL trained with, from its start model
    if meta.injection_centre:  # and the centre it read its vectors with, from the run's data
        torch.testing.assert_close(
            load_injection_centre(run_dir / "export" / "av" / meta.injection_centre),
            load_injection_centre(run_dir / "data" / CENTRE_FILE))

    av, ar = export_run(run_dir, source="checkpoint", step=2)
    assert (av.step, ar.step) == (2, 2)
    assert _exported_source(run_dir, "ar") == str(steps["ar"][0])
    with pytest.raises(ExportError, match=r"no checkpoint of step 3 .*\[2, 4\]"):
        export_run(run_dir, source="checkpoint", step=3)
    with pytest.raises(ExportError, match="--step .* with --from checkpoint"):
        export_run(run_dir, step=2)


def test_cli_and_stage(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--from", "rl"]) == 2
    assert "--from rl: no such models" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty")]) == 2
    assert "nothing to export" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--from", "init"]) == 0
    assert "AR →" in capsys.readouterr().out
    shutil.rmtree(run_dir / "export")
    run(TINY, ["run.stages=[export]", "model.base=tiny:qwen2", f"run.dir={run_dir}"])
    assert read_model_sidecar(run_dir / "export" / "ar").stage == "export"
