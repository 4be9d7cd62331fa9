"""The README's main job on the tiny recipe, start to finish, as a user runs it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from launch.train import main
from nla_rl.config import load_recipe
from nla_rl.injection import CENTRE_FILE
from nla_rl.sidecar import read_dataset_sidecar, read_model_sidecar
from tests.e2e.conftest import FAST, SECRET, TINY


@pytest.fixture(scope="module")
def tiny_run(tiny_pipeline):
    return tiny_pipeline


def test_run_writes_the_run_directory(tiny_run):
    for rel in ("recipe.yaml", "base/config.json", "data/rl.parquet", "data/rl.negatives.parquet",
                "init/av/model.safetensors", "init/av/nla_meta.yaml",
                "init/ar/value_head.safetensors", "init/ar/nla_meta.yaml", "logs/metrics.jsonl",
                "eval/check.json", "ar_sft/final/nla_meta.yaml", "av_sft/final/nla_meta.yaml",
                "rl/final/av/nla_meta.yaml", "rl/final/ar/value_head.safetensors",
                "export/av/model.safetensors", "export/av/nla_meta.yaml",
                "export/ar/value_head.safetensors", "eval/report.md", "eval/report.json",
                "eval/prefix_curve.png"):
        assert (tiny_run / rel).is_file(), rel
    # the recipe centres the AV's input: the centre datagen fitted travels with every trained AV
    centre = (tiny_run / "data" / CENTRE_FILE).read_bytes()
    for av in ("init/av", "av_sft/final", "rl/final/av", "export/av"):
        assert read_model_sidecar(tiny_run / av).injection_centre == CENTRE_FILE, av
        assert (tiny_run / av / CENTRE_FILE).read_bytes() == centre, av
    report = json.loads((tiny_run / "eval" / "report.json").read_text())
    assert report["settings"]["injection_centred"] is True
    # ... and whitens it: the file holds [μ; W] for the toy LM's width
    d_model = read_model_sidecar(tiny_run / "export/av").d_model
    assert np.load(tiny_run / "export/av" / CENTRE_FILE).shape == (d_model + 1, d_model)
    assert report["settings"]["injection_whitened"] is True
    # the AR's split was explained by the AR's own, fuller teacher; the AV's by the partial one
    recipe = load_recipe(tiny_run / "recipe.yaml").toyworld
    teachers = {split: read_dataset_sidecar(tiny_run / "data" / f"{split}.parquet").api_summaries
                for split in ("ar_sft", "av_sft")}
    assert teachers["av_sft"]["p_include"] == recipe.p_include
    assert teachers["ar_sft"]["p_include"] == (recipe.ar_p_include or recipe.p_include)
    assert not list(tiny_run.rglob("*.tmp*")), "a temp file or dir was left behind"


def test_checkpoints_are_consistent(tiny_run):
    av, ar = read_model_sidecar(tiny_run / "init/av"), read_model_sidecar(tiny_run / "init/ar")
    assert (av.role, ar.role) == ("av", "ar")
    k = load_recipe(TINY).model.layer_index
    assert av.tokens == ar.tokens and av.extraction_layer_index == ar.extraction_layer_index == k
    config = json.loads((tiny_run / "init/ar/config.json").read_text())
    assert config["num_hidden_layers"] == k + 1  # the AR: blocks 0..K of the base LM


def test_every_stage_logged(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "logs/metrics.jsonl").read_text().splitlines()]
    stages = [r.get("stage") for r in rows]
    for stage in ("check", "ar_sft", "av_sft", "rl"):
        assert stage in stages, stage
    assert stages.index("check") < stages.index("ar_sft") < stages.index("av_sft") < stages.index("rl")
    export = read_model_sidecar(tiny_run / "export/av")
    assert export.role == "av" and export.stage == "export"
    report = json.loads((tiny_run / "eval/report.json").read_text())
    # The exported (RL) pair is reported beside the SFT pair on the same rows.
    assert list(report["baselines"]) == ["sft"]
    assert report["baselines"]["sft"]["av"].endswith("av_sft/final")
    assert set(report["baselines"]["sft"]["metrics"]) == set(report["metrics"])
    assert "## Against earlier stages" in (tiny_run / "eval/report.md").read_text()
    assert any("eval/baseline/sft/fve" in r for r in rows)


def test_check_stage_metrics(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "logs/metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("stage") == "check"]
    assert len(rows) == 1
    n_eval = min(32, json.loads(json.dumps(yaml.safe_load(
        (tiny_run / "data/eval.parquet.nla_meta.yaml").read_text())))["row_count"])
    assert rows[0]["health/injections_applied"] == n_eval
    assert 0.0 <= rows[0]["roundtrip/mse"] <= 4.0
    assert 0.0 <= rows[0]["toy/recall"] <= 1.0
    report = json.loads((tiny_run / "eval/check.json").read_text())
    assert len(report["samples"]) == min(8, n_eval) and report["injection_scale"] > 0


def test_resolved_recipe_is_written_and_reloads(tiny_run):
    recipe = yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    assert recipe["run"]["dir"] == str(tiny_run)
    assert recipe["data"]["num_docs"] == 60
    assert SECRET not in (tiny_run / "recipe.yaml").read_text()


def test_rerun_reuses_the_base_model(tiny_run):
    before = (tiny_run / "base/model.safetensors").stat().st_mtime_ns
    assert main([TINY, f"run.dir={tiny_run}", *FAST, "run.stages=[prepare]"]) == 0
    assert (tiny_run / "base/model.safetensors").stat().st_mtime_ns == before


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    assert main([TINY, f"run.dir={tmp_path / 'r'}", "rl.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'rl.steps'" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists(), "a bad recipe must not create the run directory"
    assert main([TINY, f"run.dir={tmp_path / 'r'}", "run.stages=[rl,prepare]"]) == 2
    assert "in the pipeline order" in capsys.readouterr().err
    assert main([TINY, f"run.dir={tmp_path / 'r2'}", "model.base=tiny:qwen2",
                 "data.corpus=/nonexistent.txt", "run.stages=[prepare,datagen]"]) == 2
    assert "/nonexistent.txt" in capsys.readouterr().err


def test_cli_entry_point(tiny_run):
    exe = Path(sys.executable).parent / "nla-rl"
    out = subprocess.run([str(exe), "sidecar", "check", str(tiny_run / "init/ar")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "role=ar" in out.stdout and f"K={load_recipe(TINY).model.layer_index}" in out.stdout
    out = subprocess.run([str(exe), "recipe", "show", TINY, "rl.steps=7"], capture_output=True, text=True)
    assert out.returncode == 0 and yaml.safe_load(out.stdout)["rl"]["steps"] == 7
    out = subprocess.run([str(exe), "recipe", "keys"], capture_output=True, text=True)
    assert "rl.group_size" in out.stdout and "injection.family" in out.stdout


def test_the_exports_serve_the_api_and_the_cli(tiny_run, tmp_path):
    """What a user does with the deliverable: the Python API and `nla-rl explain` on it."""
    from nla_rl.data.store import read_activations
    from nla_rl.inference import NLA

    vectors = read_activations(tiny_run / "data/eval.parquet")[:3]
    nla = NLA.from_pretrained(tiny_run / "export/av", tiny_run / "export/ar")
    result = nla.score(vectors, max_new_tokens=8)
    assert result.predictions.shape == (3, vectors.shape[1]) and len(result.explanations) == 3
    np.save(tmp_path / "v.npy", vectors)
    exe = Path(sys.executable).parent / "nla-rl"
    out = subprocess.run([str(exe), "explain", "--av", str(tiny_run / "export/av"), "--ar",
                          str(tiny_run / "export/ar"), "--vectors", str(tmp_path / "v.npy"),
                          "--max-new-tokens", "8", "--out", str(tmp_path / "r.jsonl")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["row"] for r in lines[:-1]] == [0, 1, 2] and lines[-1]["summary"]["rows"] == 3
