"""The rl stage's inputs: which models it starts from, and refusing a pair from two runs."""

import shutil
from pathlib import Path

import pytest

from launch.rl import check_pair, trained_or_initial
from launch.sft import SFTStageError
from nla_rl.sidecar import read_model_sidecar

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sidecars"


def place(directory: Path, fixture: str) -> Path:
    directory.mkdir(parents=True)
    shutil.copy(FIXTURES / fixture, directory / "nla_meta.yaml")
    return directory


def test_starts_from_the_sft_final_else_the_initial_model(tmp_path):
    with pytest.raises(SFTStageError, match="neither av_sft/final nor init/av.*prepare"):
        trained_or_initial(tmp_path, "av")
    init = place(tmp_path / "init" / "av", "qwen2.5-7b-L20-av.yaml")
    assert trained_or_initial(tmp_path, "av") == init
    (tmp_path / "av_sft" / "final").mkdir(parents=True)  # a stage that died before its sidecar
    assert trained_or_initial(tmp_path, "av") == init
    final = tmp_path / "av_sft" / "final"
    shutil.copy(FIXTURES / "qwen2.5-7b-L20-av.yaml", final / "nla_meta.yaml")
    assert trained_or_initial(tmp_path, "av") == final


def test_a_pair_from_two_runs_is_refused(tmp_path):
    av = read_model_sidecar(place(tmp_path / "av", "qwen2.5-7b-L20-av.yaml"))
    same_run_ar = read_model_sidecar(place(tmp_path / "ar", "qwen2.5-7b-L20-ar.yaml"))
    check_pair(av, same_run_ar)
    other_ar = read_model_sidecar(place(tmp_path / "gemma_ar", "gemma3-12b-L32-ar.yaml"))
    with pytest.raises(SFTStageError, match="disagree on base_checkpoint"):
        check_pair(av, other_ar)
