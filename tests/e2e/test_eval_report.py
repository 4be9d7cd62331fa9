"""The eval stage and the explain/extract/eval commands on a tiny run (prepare + datagen)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from launch.cli import main
from launch.train import run
from nla_rl.data.store import read_activations, read_rows
from nla_rl.config import load_recipe
from nla_rl.data.toyworld import ToyWorld
from tests.e2e.conftest import FAST, TINY, TOYWORLD

LAYER = str(load_recipe(TINY).model.layer_index)

pytestmark = pytest.mark.slow
HEADLINE = ("fve", "cosine", "mse", "gap", "top1", "top1_centred", "extraction_failure_rate",
            "cjk_rate")


def _png_ok(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evalrun") / "run"
    run(TINY, [*FAST, "data.workers=0", "run.stages=[prepare,datagen,eval]", f"run.dir={run_dir}"])
    return run_dir


def test_eval_stage_writes_the_report(tiny_run):
    report = json.loads((tiny_run / "eval" / "report.json").read_text())
    assert report["models"]["label"] == "init" and report["models"]["av"].endswith("init/av")
    assert report["data"]["rows"] == read_rows(tiny_run / "data" / "eval.parquet").num_rows
    for block in (report["metrics"], *report["controls"].values()):
        for key in HEADLINE:
            assert isinstance(block[key], float) and math.isfinite(block[key]), key
        assert "toy_recall" in block  # the toy split has attributes
    assert set(report["controls"]) == {"shuffled", "no_injection"}
    assert report["baselines"] == {}  # eval.compare=[sft], and this run has no SFT pair
    assert report["prefix_curve"][0]["tokens"] == 0
    assert "control: no injection" in (tiny_run / "eval" / "report.md").read_text()
    for name in ("prefix_curve.png", "row_errors.png"):
        assert name in report["plots"] and _png_ok(tiny_run / "eval" / name)
    logged = [json.loads(x) for x in (tiny_run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/control/no_injection/fve" in row for row in logged)


def test_eval_command_plots_training_curves(tiny_run, capsys):
    with (tiny_run / "logs" / "metrics.jsonl").open("a") as fh:  # as the SFT stages log them
        for step in range(1, 6):
            fh.write(json.dumps({"step": step, "stage": "ar_sft", "train/ar/loss": 1.0 / step}) + "\n")
    assert main(["eval", str(tiny_run), "--rows", "4", "--av", str(tiny_run / "init" / "av"),
                 "--ar", str(tiny_run / "init" / "ar"), "--max-new-tokens", "4"]) == 0
    report = json.loads((tiny_run / "eval" / "report.json").read_text())
    assert report["models"]["label"] == "given" and report["data"]["rows"] == 4
    assert _png_ok(tiny_run / "eval" / "training_curves.png")
    assert report["training_curves"][0]["metrics"] == ["train/ar/loss"]  # what the figure shows
    assert "**AR-SFT: AR loss** (`train/ar/loss`)" in (tiny_run / "eval" / "report.md").read_text()
    assert "fve=" in capsys.readouterr().out
    assert main(["eval", str(tiny_run), "--av", str(tiny_run / "init" / "av")]) == 2  # --ar missing


def test_extract_then_explain(tiny_run, tmp_path, capsys):
    rows = read_rows(tiny_run / "data" / "eval.parquet")
    doc_id = int(rows["doc_id"][0].as_py())
    text = ToyWorld(0, ending=TOYWORLD.ending, p_slot=TOYWORLD.p_slot).document(doc_id).readout_text
    out = tmp_path / "v.npy"
    assert main(["extract", "--base", str(tiny_run / "base"), "--layer", LAYER, "--text", text,
                 "--max-tokens", "96", "--out", str(out)]) == 0
    vectors = np.load(out)
    # text → activation reproduces what datagen stored for that document's last position
    np.testing.assert_allclose(vectors[0], read_activations(tiny_run / "data" / "eval.parquet")[0],
                               atol=1e-4, rtol=1e-4)
    all_out = tmp_path / "all.npy"
    assert main(["extract", "--base", str(tiny_run / "base"), "--layer", LAYER, "--text", text,
                 "--positions", "all", "--out", str(all_out)]) == 0
    every = np.load(all_out)
    assert every.shape[0] > 1 and np.allclose(every[-1], vectors[0], atol=1e-5)

    results = tmp_path / "r.jsonl"
    argv = ["explain", "--av", str(tiny_run / "init" / "av"), "--ar", str(tiny_run / "init" / "ar"),
            "--max-new-tokens", "4"]
    assert main([*argv, "--vectors", str(all_out), "--out", str(results), "--limit", "3"]) == 0
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(lines) == 4 and {"explanation", "mse", "cosine"} <= lines[0].keys()
    assert "summary" in lines[-1] and "FVE over 3 rows" in capsys.readouterr().out
    assert main([*argv, "--vectors", str(tiny_run / "data" / "eval.parquet"), "--limit", "2"]) == 0
    np.save(tmp_path / "bad.npy", np.zeros((2, 7), np.float32))
    assert main([*argv, "--vectors", str(tmp_path / "bad.npy")]) == 2
    assert "vectors shape" in capsys.readouterr().err
