"""The replace scale "chosen from data" is chosen once, at datagen (1.1 × the mean norm of the
AV-SFT rows with an explanation), recorded in the data sidecars and read by every later stage;
a run made before it was recorded gets the same number from the same rule. InjectionSpec is the
one place that says what a valid scale is."""

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from launch.common import (DATA_SCALE_KEY, choose_data_scale, data_scale, injection_of,
                           record_data_scale)
from launch.datagen import _record_injection_scale
from nla_rl.data.store import activations_table, write_table_atomic
from nla_rl.errors import InjectionError
from nla_rl.injection import InjectionSpec, scale_from_data
from nla_rl.sidecar import DatasetSidecar, ModelSidecar, read_dataset_sidecar, write_dataset_sidecar

D = 8


def _write(path: Path, vectors: np.ndarray, explanations: list) -> None:
    n = len(vectors)
    write_table_atomic(activations_table(range(n), [0] * n, 2, vectors, explanation=explanations), path)
    write_dataset_sidecar(path, DatasetSidecar("t", "base", n, "toy", D, 2, "toy", 1))


def _data_dir(tmp_path: Path, scale_of_rows: float = 1.0) -> Path:
    """A run's data: base (every row) and the splits, the AV-SFT rows partly unlabelled."""
    rng = np.random.default_rng(0)
    data = tmp_path / "run" / "data"
    data.mkdir(parents=True)
    av = (rng.normal(size=(6, D)) * scale_of_rows).astype(np.float32)
    rl = (rng.normal(size=(5, D)) * 7.0).astype(np.float32)
    _write(data / "av_sft.parquet", av, ["a", "", "b", None, "c", "d"])
    _write(data / "rl.parquet", rl, ["x"] * 5)
    _write(data / "base.parquet", np.concatenate([av, rl]), ["a", "", "b", None, "c", "d"] + ["x"] * 5)
    return data


def _av_meta(scale=None, family="replace", centre=None) -> ModelSidecar:
    return SimpleNamespace(injection_family=family, injection_scale=scale, injection_add_layer=1,
                           injection_add_coeff=1.0, injection_centre=centre, d_model=D)


def test_the_scale_is_chosen_from_the_labelled_av_sft_rows(tmp_path):
    data = _data_dir(tmp_path)
    from nla_rl.data.store import read_activations

    labelled = read_activations(data / "av_sft.parquet")[[0, 2, 4, 5]]
    scale, rows = choose_data_scale(data)
    assert scale == 1.1 * float(np.linalg.norm(labelled, axis=1).mean()) == scale_from_data(labelled)
    assert "av_sft" in rows


def test_recorded_once_and_read_everywhere(tmp_path):
    data = _data_dir(tmp_path)
    record_data_scale(data, 12.5, "test rows")
    for name in ("base", "av_sft", "rl"):
        entry = read_dataset_sidecar(data / f"{name}.parquet").extras[DATA_SCALE_KEY]
        assert entry["scale_from_data"] == 12.5 and entry["rows"] == "test rows"
    # the recorded value is what every stage reads, not a recomputation
    assert data_scale(data) == 12.5
    assert injection_of(_av_meta(), data.parent) == InjectionSpec("replace", 12.5)
    # a scale the AV's sidecar records (the recipe's, or SFT's) wins; add has none
    assert injection_of(_av_meta(3.0), data.parent).scale == 3.0
    assert injection_of(_av_meta(family="add"), data.parent) == InjectionSpec("add")


def test_an_old_run_without_the_record_gets_the_sft_stages_number(tmp_path):
    data = _data_dir(tmp_path)
    assert DATA_SCALE_KEY not in read_dataset_sidecar(data / "base.parquet").extras
    assert data_scale(data) == choose_data_scale(data)[0]


def test_datagen_records_the_scale(tmp_path):
    data = _data_dir(tmp_path)
    cfg = SimpleNamespace(injection=SimpleNamespace(family="replace", scale=None, centre=False))
    scale = _record_injection_scale(cfg, data)
    assert scale == choose_data_scale(data)[0] and data_scale(data) == scale


def test_a_replace_recipe_resolving_to_scale_0_is_refused_at_datagen(tmp_path):
    data = _data_dir(tmp_path, scale_of_rows=0.0)
    cfg = SimpleNamespace(injection=SimpleNamespace(family="replace", scale=None, centre=False))
    with pytest.raises(InjectionError, match=r"injection\.scale: family 'replace' needs a finite "
                                             r"scale > 0, found 0\.0"):
        _record_injection_scale(cfg, data)
    # an add recipe never uses it; a recipe with its own scale neither
    for injection in (SimpleNamespace(family="add", scale=None, centre=False),
                      SimpleNamespace(family="replace", scale=5.0, centre=False)):
        assert _record_injection_scale(SimpleNamespace(injection=injection), data) == 0.0


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf])
def test_injection_spec_is_the_one_validity_check(scale):
    with pytest.raises(InjectionError, match="injection.scale"):
        InjectionSpec("replace", scale)


def test_injection_spec_refuses_unknown_families_and_an_add_scale():
    with pytest.raises(InjectionError, match="family"):
        InjectionSpec("multiply", 1.0)
    with pytest.raises(InjectionError, match="takes no scale"):
        InjectionSpec("add", 2.0)
    assert not InjectionSpec("replace").resolved and InjectionSpec("replace", 2.0).resolved
    assert InjectionSpec("add").resolved
