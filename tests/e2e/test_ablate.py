"""``nla-rl ablate``: RL variants from one SFT pair (2-step smoke run), and its truth metrics."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml

from launch.ablate import COLUMNS, ablate
from nla_rl.errors import ConfigError
from tests.e2e.conftest import FAST, TINY

pytestmark = pytest.mark.slow


def test_two_variants_from_one_sft_pair(tiny_pipeline, tmp_path):
    run_dir = tmp_path / "ablate"
    shutil.copytree(tiny_pipeline, run_dir)  # the session's whole tiny run: its SFT pair is reused
    with pytest.raises(ConfigError, match="unknown variant"):
        ablate(TINY, run_dir, ["recipe", "no_such_variant"], [0], FAST)
    assert not (run_dir / "ablate").exists()  # refused before any run

    # one seed each keeps CI short; seed 1 still shows rl.seed moves apart from run.seed
    summary = ablate(TINY, run_dir, ["recipe", "basis_raw"], [1], FAST, steps=2)
    assert [s["variant"] for s in summary] == ["recipe", "basis_raw"]
    assert all(s["seeds"] == [1] for s in summary)
    table = (run_dir / "ablate" / "table.md").read_text()
    assert "| recipe | 1 |" in table and "| basis_raw | 1 |" in table
    rows = json.loads((run_dir / "ablate" / "table.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["rl_s"] > 0 for r in rows)
    assert all(set(r) >= {key for key, _ in COLUMNS} for r in rows)  # every column, every row
    for key in ("top1", "top1_centred", "fve", "diversity"):  # defined even for a 2-step AV
        assert all(isinstance(r[key], float) and math.isfinite(r[key]) for r in rows), key
    for name in ("recipe-s1", "basis_raw-s1"):
        variant = run_dir / "ablate" / name
        assert (variant / "av_sft").resolve() == (run_dir / "av_sft").resolve()  # same SFT pair
        assert (variant / "eval" / "report.json").is_file()
        logged = [json.loads(line) for line in
                  (variant / "logs" / "metrics.jsonl").read_text().splitlines()]
        rl = [r for r in logged if r.get("stage") == "rl"]
        assert len(rl) == 2
        for key in ("rollout/diversity/cross_group", "rollout/toy/recall",
                    "health/reward_up_truth_down"):
            assert key in rl[-1], key
        # rl.frozen_ar_every=1: the frozen AR scores whatever the live one scores
        assert ("rollout/fve" in rl[0]) == ("rollout/fve_frozen_ar" in rl[0])
    centre = run_dir / "ablate" / "recipe-s1"  # the tiny recipe's reward basis is centre
    recipe = yaml.safe_load((centre / "recipe.yaml").read_text())
    assert recipe["rl"]["seed"] == 1 and recipe["run"]["seed"] == 0
    assert recipe["rl"]["reward_basis"] == "centre"
    # the basis travels with the AR: RL checkpoint, final, export; eval scores with it
    for ar in (centre / "rl" / "ar" / "step_000002", centre / "rl" / "final" / "ar",
               centre / "export" / "ar"):
        assert (ar / "reward_basis.safetensors").is_file(), ar
    report = json.loads((centre / "eval" / "report.json").read_text())
    assert report["settings"]["reward_basis"] == "centre"
    assert report["metrics"]["reward_mse"] != pytest.approx(report["metrics"]["mse"])
    plain = json.loads((run_dir / "ablate" / "basis_raw-s1" / "eval" / "report.json").read_text())
    assert plain["settings"]["reward_basis"] == "raw"
    assert plain["metrics"]["reward_mse"] == pytest.approx(plain["metrics"]["mse"])


def test_ablate_needs_an_sft_pair(tmp_path):
    with pytest.raises(ConfigError, match="run the recipe through av_sft first"):
        ablate(TINY, tmp_path, ["recipe"], [0], FAST)
