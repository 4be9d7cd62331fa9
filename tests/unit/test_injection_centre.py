"""A centred injection (``injection.centre: true``): the AV reads ``h/‖h‖ - μ``, μ the mean unit
activation of the AV-SFT rows. Fitted once at datagen into the run's data, carried beside every
trained and exported AV (named in its sidecar), and applied by the one method every injection
site calls (``InjectionSpec.av_input``), so training, rollouts, export and inference agree."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nla_rl.export as export
from launch.common import injection_of, write_data_centre
from launch.datagen import _write_injection_centre
from nla_rl.errors import InjectionError, SidecarError
from nla_rl.inference import NLA
from nla_rl.injection import (CENTRE_FILE, InjectionSpec, fit_injection_centre, load_injection_centre,
                              save_injection_centre)
from nla_rl.sidecar import read_model_sidecar, write_model_sidecar
from tests.unit.test_injection_scale import D, _av_meta, _data_dir
from tests.unit.test_inference import make_pair


def _hub_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Rows sharing one direction far larger than their differences (as the toy LM's do: every
    row within cos 0.99 of the mean), with random norms."""
    gen = torch.Generator().manual_seed(seed)
    hub = F.normalize(torch.randn(d, generator=gen), dim=0) * 8 * d ** 0.5
    rows = hub + torch.randn(n, d, generator=gen)
    return rows * (1 + torch.rand(n, 1, generator=gen) * 3)


def _mean_offdiag_cos(x: torch.Tensor) -> float:
    u = F.normalize(x, dim=1)
    sims = u @ u.T
    return float(sims[~torch.eye(len(x), dtype=torch.bool)].mean())


def test_the_centred_av_input_is_what_differs_between_activations():
    rows = _hub_rows(64, 32)
    centre = fit_injection_centre(rows)
    spec = InjectionSpec("replace", 5.0, centre=centre)
    assert InjectionSpec("replace", 5.0).av_input(rows) is rows  # off: the vector as extracted
    centred = spec.av_input(rows)
    torch.testing.assert_close(centred, F.normalize(rows, dim=1) - centre)
    torch.testing.assert_close(spec.av_input(rows * 7.0), centred)  # the norm no longer matters
    # raw rows all point one way; centred, the injected rows are nearly orthogonal
    assert _mean_offdiag_cos(rows) > 0.95 and abs(_mean_offdiag_cos(centred)) < 0.1
    assert spec == InjectionSpec("replace", 5.0)  # the centre is data, not identity


def test_the_input_map_moves_to_a_device_once_and_never_travels_with_the_spec():
    import pickle

    rows, _ = _value_rows(256, 16)
    spec = InjectionSpec("replace", 5.0, centre=fit_injection_centre(rows, whiten=0.1))
    meta = torch.device("meta")  # stands in for a GPU: a device the stored map is not on
    first = spec.av_input(rows.to(meta))
    assert first.device == meta and first.shape == rows.shape
    assert spec._centre_on(meta) is spec._centre_on(meta)  # one copy per device, reused
    assert spec._centre_on(torch.device("cpu")) is spec.centre  # already there: no copy
    clone = pickle.loads(pickle.dumps(spec))  # what Ray sends to an actor
    assert "_device_copies" not in clone.__dict__ and "_device_copies" in spec.__dict__
    torch.testing.assert_close(clone.av_input(rows), spec.av_input(rows))
    wide = InjectionSpec("replace", 5.0, centre=spec.centre.double())  # float64: cast once
    torch.testing.assert_close(wide.av_input(rows), spec.av_input(rows))
    assert wide._centre_on(torch.device("cpu")).dtype == torch.float32


def _value_rows(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hub rows whose centred variance is mostly one 'presence' direction, with a weak 'value'
    direction beside it (the toy world's shape); returns (rows, value sign per row)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
    hub, presence, value = basis[:, 0] * 40, basis[:, 1], basis[:, 2]
    signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    present = torch.randint(0, 2, (n, 1), generator=gen).float()
    rows = (hub + present * 6 * presence + signs[:, None] * 0.3 * value
            + 0.05 * torch.randn(n, d, generator=gen))
    return rows, signs


def test_whitening_gives_every_direction_unit_variance_and_stays_one_file(tmp_path):
    rows, signs = _value_rows(2000, 16)
    fitted = fit_injection_centre(rows, whiten=0.0)
    assert fitted.shape == (17, 16)
    centre, w = fitted[0], fitted[1:]
    torch.testing.assert_close(centre, fit_injection_centre(rows))  # the same μ as centring alone
    torch.testing.assert_close(w, w.T)  # ZCA: symmetric
    spec = InjectionSpec("replace", 5.0, centre=fitted)
    assert spec.whitened and not InjectionSpec("replace", 5.0, centre=centre).whitened
    white = spec.av_input(rows).double()
    torch.testing.assert_close(torch.cov(white.T), torch.eye(16, dtype=torch.float64),
                               atol=2e-3, rtol=0)
    torch.testing.assert_close(white.float(), (F.normalize(rows, dim=1) - centre) @ w)
    # centred, the value is a sliver of the injected (normalised) row; whitened, a large part
    def value_gap(x):  # distance between the two values' mean injected rows
        unit = F.normalize(x.float(), dim=1)
        return float((unit[signs > 0].mean(0) - unit[signs < 0].mean(0)).norm())
    centred_gap = value_gap(F.normalize(rows, dim=1) - centre)
    assert centred_gap < 0.25 and value_gap(white) > 2 * centred_gap
    # λ shrinks the gain of the weakest directions only, relative to the mean variance
    ridged = InjectionSpec("replace", 5.0, centre=fit_injection_centre(rows, whiten=1.0))
    assert float(ridged.av_input(rows).var(0).max()) < 1.0
    assert float(fit_injection_centre(rows * 9, whiten=1.0).sub(
        fit_injection_centre(rows, whiten=1.0)).abs().max()) < 1e-3  # the norm does not matter
    path = tmp_path / CENTRE_FILE
    save_injection_centre(fitted, path)
    torch.testing.assert_close(load_injection_centre(path, 16), fitted)
    with pytest.raises(InjectionError, match="λ ≥ 0"):
        fit_injection_centre(rows, whiten=-1.0)
    with pytest.raises(InjectionError, match="2 activation rows"):
        fit_injection_centre(rows[:1], whiten=0.1)


def test_datagen_writes_the_centre_and_every_stage_reads_it(tmp_path):
    data = _data_dir(tmp_path)
    _write_injection_centre(SimpleNamespace(injection=SimpleNamespace(centre=False, whiten=None)),
                            data.parent)
    assert not (data / CENTRE_FILE).exists()  # a recipe that does not centre gets no file
    _write_injection_centre(SimpleNamespace(injection=SimpleNamespace(centre=True, whiten=None)),
                            data.parent)
    path = data / CENTRE_FILE
    assert path.is_file() and write_data_centre(data) == path
    from nla_rl.data.store import read_activations

    labelled = read_activations(data / "av_sft.parquet")[[0, 2, 4, 5]]  # the rows AV-SFT trains on
    expected = torch.from_numpy(labelled / np.linalg.norm(labelled, axis=1, keepdims=True)).mean(0)
    torch.testing.assert_close(load_injection_centre(path, D), expected.float())
    spec = injection_of(_av_meta(3.0, centre=CENTRE_FILE), data.parent)
    torch.testing.assert_close(spec.centre, expected.float())
    assert injection_of(_av_meta(3.0), data.parent).centre is None
    # injection.whiten: the same file holds [μ; W], fitted on the same rows
    _write_injection_centre(SimpleNamespace(injection=SimpleNamespace(centre=True, whiten=0.5)),
                            data.parent)
    whitened = load_injection_centre(path, D)
    assert whitened.shape == (D + 1, D)
    torch.testing.assert_close(whitened, fit_injection_centre(labelled, whiten=0.5))
    assert injection_of(_av_meta(3.0, centre=CENTRE_FILE), data.parent).whitened
    (data / CENTRE_FILE).unlink()
    with pytest.raises(InjectionError, match="rerun datagen"):
        injection_of(_av_meta(3.0, centre=CENTRE_FILE), data.parent)


@pytest.mark.parametrize("whiten", [None, 1.0], ids=["centred", "whitened"])
def test_fit_store_export_inference_inject_the_same_rows(tmp_path, qwen, whiten):
    """centre beside the AV → export copies it → NLA injects h/‖h‖ - μ (or (h/‖h‖ - μ) W): its
    explanations are those of the plain AV given the mapped vectors."""
    av_dir, ar_dir = make_pair(tmp_path / "src", qwen)
    plain = NLA.from_pretrained(av_dir, ar_dir)
    centre = fit_injection_centre(_hub_rows(128, qwen.d_model), whiten)
    save_injection_centre(centre, av_dir / CENTRE_FILE)
    meta = read_model_sidecar(av_dir)
    write_model_sidecar(av_dir, dataclasses.replace(meta, injection_centre=CENTRE_FILE))

    exported_av, exported_ar = export.export_pair(av_dir, ar_dir, tmp_path / "export")
    assert read_model_sidecar(exported_av.path).injection_centre == CENTRE_FILE
    torch.testing.assert_close(load_injection_centre(exported_av.path / CENTRE_FILE), centre)
    assert not list(exported_av.path.glob("*centre*.safetensors"))  # vLLM would load it as weights

    nla = NLA.from_pretrained(exported_av.path, exported_ar.path)
    torch.testing.assert_close(nla.injection.centre, centre)
    assert nla.injection.whitened == (whiten is not None)
    vectors = _hub_rows(4, qwen.d_model, seed=1)
    ours = nla.generate(vectors, max_new_tokens=6)
    assert ours.injections_applied == 4
    assert ours.texts == plain.generate(nla.injection.av_input(vectors), max_new_tokens=6).texts


def test_bad_centres_are_one_clear_error(tmp_path, qwen):
    path = tmp_path / CENTRE_FILE
    save_injection_centre(torch.zeros(8), path)
    with pytest.raises(InjectionError, match="shape"):
        load_injection_centre(path, d_model=16)
    save_injection_centre(torch.zeros(10, 8), path)  # neither μ [8] nor [μ; W] [9, 8]
    with pytest.raises(InjectionError, match=r"shape \[10, 8\]"):
        load_injection_centre(path)
    with pytest.raises(InjectionError, match="shape"):
        InjectionSpec("replace", 1.0, centre=torch.zeros(10, 8))
    with pytest.raises(InjectionError, match="missing"):
        load_injection_centre(tmp_path / "absent.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InjectionError, match="not an injection centre"):
        load_injection_centre(tmp_path / "objects.npy")  # never unpickled
    np.save(tmp_path / "nan.npy", np.full(8, np.nan, np.float32))
    with pytest.raises(InjectionError, match="non-finite"):
        load_injection_centre(tmp_path / "nan.npy")
    with pytest.raises(InjectionError, match="finite"):
        fit_injection_centre(np.full((3, 8), np.nan))
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temp file

    av_dir, ar_dir = make_pair(tmp_path / "pair", qwen)
    meta = read_model_sidecar(av_dir)
    with pytest.raises(SidecarError, match="extraction.injection_centre"):
        dataclasses.replace(meta, injection_centre="../data/injection_centre.npy")
    write_model_sidecar(av_dir, dataclasses.replace(meta, injection_centre=CENTRE_FILE))
    with pytest.raises(InjectionError, match="missing"):
        NLA.from_pretrained(av_dir, ar_dir)
