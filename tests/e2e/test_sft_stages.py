"""The ar_sft and av_sft stages on a tiny run directory, as `python -m launch.train` runs them.

Learning quality on the tiny data is not asserted beyond what a few steps show (the train losses
fall, the AR fits its training batches better); the held-out AR FVE and the AV's
real-vs-shuffled gap are logged and checked finite (see the report of issue 4 for the numbers).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from launch.train import main
from nla_rl.ar_model import ActivationReconstructor
from nla_rl.sidecar import read_model_sidecar
from tests.e2e.conftest import FAST, TINY

pytestmark = pytest.mark.slow

DATA = [o for o in FAST if not o.startswith("rl.")] + ["data.num_docs=120"]
SFT = ["ar_sft.steps=6", "av_sft.steps=6", "ar_sft.batch_size=8", "av_sft.batch_size=8",
       "ar_sft.micro_batch_size=2", "av_sft.micro_batch_size=2", "ar_sft.eval_every=3",
       "av_sft.eval_every=3", "ar_sft.warmup_steps=1", "av_sft.warmup_steps=1",
       "ar_sft.save_every=3", "av_sft.save_every=3", "ar_sft.keep_last=3"]


def run(run_dir: Path, *overrides: str) -> int:
    return main([TINY, f"run.dir={run_dir}", *DATA, *SFT, *overrides])


@pytest.fixture(scope="module")
def data_run(tmp_path_factory, toy_base) -> Path:
    """prepare + datagen once; each test copies it."""
    run_dir = tmp_path_factory.mktemp("sft") / "data_run"
    run_dir.mkdir()
    shutil.copytree(toy_base, run_dir / "base")
    assert run(run_dir, "run.stages=[prepare,datagen]") == 0
    return run_dir


@pytest.fixture(scope="module")
def trained(data_run, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sft") / "trained"
    shutil.copytree(data_run, run_dir)
    assert run(run_dir, "run.stages=[ar_sft,av_sft]", "wandb.enabled=true",
               "wandb.mode=offline") == 0
    return run_dir


def metrics(run_dir: Path, stage: str) -> list[dict]:
    lines = (run_dir / "logs/metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == stage]


def test_stages_log_the_metrics(trained):
    ar, av = metrics(trained, "ar_sft"), metrics(trained, "av_sft")
    assert [r["step"] for r in ar] == [1, 2, 3, 4, 5, 6] == [r["step"] for r in av]
    for name in ("train/ar/loss", "train/ar/fve", "train/ar/grad_norm", "train/ar/lr",
                 "perf/ar/tokens_per_s", "health/skipped_steps"):
        assert all(r[name] is not None for r in ar), name
    assert ar[-1]["health/skipped_steps"] == 0 == av[-1]["health/skipped_steps"]
    assert ar[-1]["eval/ar/fve"] is not None and ar[2]["eval/ar/fve"] is not None
    for key in ("train/av/shuffled_loss", "train/av/shuffle_gap", "eval/av/shuffle_gap"):
        assert av[-1][key] is not None, key
    assert av[-1]["train/av/shuffle_gap"] == pytest.approx(
        av[-1]["train/av/shuffled_loss"] - av[-1]["train/av/loss"])
    assert av[-1]["train/av/loss"] < av[0]["train/av/loss"]  # it learns the explanation format
    assert min(r["train/ar/loss"] for r in ar[3:]) < ar[0]["train/ar/loss"]


def test_wandb_holds_the_sft_history(trained):
    """An SFT-only run with W&B on: one offline run whose history has each SFT step's metrics
    (as ar_sft/* and av_sft/*, against the stage's own step), equal to metrics.jsonl."""
    from tests.wandb_history import exit_code, history

    rows = history(trained / "logs")
    for stage, role in (("ar_sft", "ar"), ("av_sft", "av")):
        logged = [r for r in rows if f"{stage}/step" in r]
        assert [r[f"{stage}/step"] for r in logged] == [1, 2, 3, 4, 5, 6]
        assert [r[f"{stage}/train/{role}/loss"] for r in logged] == pytest.approx(
            [r[f"train/{role}/loss"] for r in metrics(trained, stage)])
    assert exit_code(trained / "logs") == 0


def test_final_models_load_with_their_sidecars(trained):
    from transformers import AutoModelForCausalLM

    ar_meta = read_model_sidecar(trained / "ar_sft/final")
    av_meta = read_model_sidecar(trained / "av_sft/final")
    assert (ar_meta.stage, av_meta.stage) == ("ar_sft", "av_sft")
    assert av_meta.injection_scale is not None and av_meta.injection_scale > 0
    ar = ActivationReconstructor.from_pretrained(trained / "ar_sft/final")
    init = ActivationReconstructor.from_pretrained(trained / "init/ar")
    assert not torch.equal(ar.value_head.weight, init.value_head.weight)  # trained
    # The last checkpoint's gathered weights are what final/ holds.
    saved = load_file(str(trained / "ar_sft/step_000006/model.safetensors"))
    assert torch.equal(saved["value_head.weight"], ar.value_head.weight)
    av = AutoModelForCausalLM.from_pretrained(trained / "av_sft/final")
    assert av.config.hidden_size == av_meta.d_model
    assert (trained / "ar_sft/latest").read_text().strip() == "step_000006"
    assert not list(trained.rglob("*.partial")) and not list(trained.rglob("*.tmp*"))


def test_the_ar_sft_loss_terms_are_fitted_stored_and_trained_with(trained, data_run, tmp_path):
    """ar_sft.loss_basis=whiten and ar_sft.contrast_weight: the basis and the contrast bank (a
    sample of contrast_bank_rows rows) are fitted on the AR-SFT split, written beside the
    stage's checkpoints and recorded in the final AR's sidecar; the AR trains on the sum (other
    weights than the raw loss's from the same seed and rows), and train/ar/fve is the fit term's."""
    import numpy as np
    import pyarrow.parquet as pq

    from launch.sft import LOSS_BASIS_FILE
    from nla_rl.reward_basis import fit_reward_basis, load_reward_basis
    from nla_rl.sft import CONTRAST_FILE, load_contrast_bank

    run_dir = tmp_path / "basis"
    shutil.copytree(data_run, run_dir)
    assert run(run_dir, "run.stages=[ar_sft]", "ar_sft.loss_basis=whiten",
               "ar_sft.loss_basis_weight=1.0", "ar_sft.contrast_weight=0.01",
               "ar_sft.contrast_bank_rows=10") == 0
    meta = read_model_sidecar(run_dir / "ar_sft/final")
    basis = load_reward_basis(run_dir / "ar_sft" / LOSS_BASIS_FILE, d_model=meta.d_model)
    rows = pq.read_table(run_dir / "data/ar_sft.parquet").column("activation_vector").to_pylist()
    fitted = fit_reward_basis(torch.from_numpy(np.array(rows, np.float32)), "whiten", 0.1)
    assert basis.kind == "whiten" and torch.allclose(basis.transform, fitted.transform, atol=1e-5)
    assert meta.training["loss_basis"] == {"kind": "whiten", "eps": 0.1, "weight": 1.0}
    bank = load_contrast_bank(run_dir / "ar_sft" / CONTRAST_FILE, 0.01, 0.1).bank
    assert bank.shape == (10, meta.d_model) and len(rows) > 10  # sampled down to 10 rows
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(10))
    assert meta.training["contrast"] == {"weight": 0.01, "tau": 0.1, "bank_rows": 10}
    assert meta.reward_basis is None  # a training detail: NLA.score stays the published MSE
    with_term = load_file(str(run_dir / "ar_sft/step_000006/model.safetensors"))
    raw = load_file(str(trained / "ar_sft/step_000006/model.safetensors"))
    assert not torch.equal(with_term["value_head.weight"], raw["value_head.weight"])
    fves = [r["train/ar/fve"] for r in metrics(run_dir, "ar_sft") if "train/ar/fve" in r]
    assert len(fves) == 6 and all(math.isfinite(f) for f in fves)


def test_resume_continues_exactly(trained, data_run, tmp_path):
    """Steps 1-3 checkpointed, the run's later state removed, resumed: same final weights."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(data_run, run_dir)
    assert run(run_dir, "run.stages=[ar_sft]") == 0
    shutil.rmtree(run_dir / "ar_sft/step_000006")
    shutil.rmtree(run_dir / "ar_sft/final")
    (run_dir / "ar_sft/latest").write_text("step_000003\n")
    assert run(run_dir, "run.stages=[ar_sft]", "run.resume=true") == 0
    resumed = load_file(str(run_dir / "ar_sft/step_000006/model.safetensors"))
    straight = load_file(str(trained / "ar_sft/step_000006/model.safetensors"))
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_bad_inputs_are_one_clear_error(data_run, tmp_path, capsys):
    run_dir = tmp_path / "bad"
    shutil.copytree(data_run, run_dir)
    (run_dir / "data/ar_sft.parquet").rename(run_dir / "ar.parquet")
    assert run(run_dir, "run.stages=[ar_sft]") == 2
    assert "ar_sft.parquet does not exist" in capsys.readouterr().err
    (run_dir / "ar.parquet").rename(run_dir / "data/ar_sft.parquet")

    sidecar = run_dir / "data/av_sft.parquet.nla_meta.yaml"
    meta = yaml.safe_load(sidecar.read_text())
    meta["extraction"]["d_model"] = 4096
    sidecar.write_text(yaml.safe_dump(meta))
    assert run(run_dir, "run.stages=[av_sft]") == 2
    err = capsys.readouterr().err
    assert "extraction.d_model is 4096" in err and "Traceback" not in err
    shutil.copy(data_run / "data/av_sft.parquet.nla_meta.yaml", sidecar)

    assert run(run_dir, "run.stages=[av_sft]", "learner.lora_rank=4",
               "learner.lora_target_modules=[nonexistent_proj]") == 2
    assert "nonexistent_proj" in capsys.readouterr().err

    assert run(run_dir, "run.stages=[ar_sft]", "ar_sft.steps=3") == 0
    assert run(run_dir, "run.stages=[ar_sft]", "run.resume=true", "injection.add_coeff=2.0") == 2
    assert "recipe mismatch" in capsys.readouterr().err
