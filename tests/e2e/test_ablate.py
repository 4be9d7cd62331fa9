"""``nla-rl ablate``: RL variants from one SFT pair (2-step smoke run), and its truth metrics."""

from __future__ import annotations

import json

import pytest
import yaml

from launch.ablate import ablate
from launch.train import main
from nla_rl.errors import ConfigError
from tests.e2e.conftest import FAST, TINY

pytestmark = pytest.mark.slow


def test_two_variants_from_one_sft_pair(new_run):
    run_dir = new_run("ablate")
    assert main([TINY, f"run.dir={run_dir}", *FAST,
                 "run.stages=[prepare,datagen,ar_sft,av_sft]"]) == 0
    with pytest.raises(ConfigError, match="unknown variant"):
        ablate(TINY, run_dir, ["recipe", "no_such_variant"], [0], FAST)
    assert not (run_dir / "ablate").exists()  # refused before any run

    summary = ablate(TINY, run_dir, ["recipe", "negatives_off"], [0, 1], FAST, steps=2)
    assert [s["variant"] for s in summary] == ["recipe", "negatives_off"]
    assert all(s["seeds"] == [0, 1] for s in summary)
    table = (run_dir / "ablate" / "table.md").read_text()
    assert "| recipe | 0,1 |" in table and "| negatives_off | 0,1 |" in table
    rows = json.loads((run_dir / "ablate" / "table.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["rl_s"] > 0 for r in rows)
    for name in ("recipe-s0", "negatives_off-s1"):
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
    recipe = yaml.safe_load((run_dir / "ablate" / "negatives_off-s1" / "recipe.yaml").read_text())
    assert recipe["rl"]["seed"] == 1 and recipe["run"]["seed"] == 0
    assert recipe["negatives"]["enabled"] is False


def test_ablate_needs_an_sft_pair(tmp_path):
    with pytest.raises(ConfigError, match="run the recipe through av_sft first"):
        ablate(TINY, tmp_path, ["recipe"], [0], FAST)
