"""The reward basis (nla_rl.reward_basis): what it does to the reward, and that the RL reward, the
online AR's loss, export and inference all measure the same numbers with it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import nla_rl.export as export
from nla_rl.config import RLConfig
from nla_rl.errors import SidecarError
from nla_rl.inference import NLA, Generation
from nla_rl.reward_basis import (BASIS_FILE, RewardBasis, RewardBasisError, fit_reward_basis,
                                 load_reward_basis)
from nla_rl.rewards import normalized_mse
from nla_rl.rl_rewards import step_rewards
from nla_rl.sft import (ARBatch, ContrastBank, ar_sft_loss, ar_sft_loss_parts, contrastive_term,
                        fit_contrast_bank, load_contrast_bank, save_contrast_bank)
from nla_rl.sidecar import read_model_sidecar, write_model_sidecar
from tests.unit.test_inference import make_pair

BIG, SMALL = 4, 4  # dimensions carrying "which slots" (large variance) and "which values" (small)


def _presence_and_values(n: int, seed: int = 0) -> torch.Tensor:
    """Rows whose variance sits in BIG dimensions (std 10), the meaning in SMALL ones (std 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([10 * torch.randn(n, BIG, generator=gen),
                      0.1 * torch.randn(n, SMALL, generator=gen)], dim=1) + 3.0


def test_whitening_and_standardising_give_unit_variance_on_the_training_rows():
    x = _presence_and_values(2000) @ torch.linalg.qr(torch.randn(8, 8))[0]  # correlated dims
    white = fit_reward_basis(x, "whiten", eps=1e-9).apply(x)
    cov = torch.cov(white.T, correction=0)
    torch.testing.assert_close(cov, torch.eye(8), atol=1e-3, rtol=0)
    torch.testing.assert_close(white.mean(0), torch.zeros(8), atol=1e-4, rtol=0)
    z = fit_reward_basis(x, "standardize", eps=1e-9).apply(x)
    torch.testing.assert_close(z.var(0, correction=0), torch.ones(8), atol=1e-3, rtol=0)
    assert fit_reward_basis(x, "raw") is None


def test_a_true_value_earns_reward_in_the_whitened_basis_and_almost_none_in_the_raw_one():
    train = _presence_and_values(2000)
    gold = _presence_and_values(64, seed=1)
    noise = torch.randn(64, BIG, generator=torch.Generator().manual_seed(2))
    true = gold + torch.cat([noise, torch.zeros(64, SMALL)], dim=1)  # presence noisy, values true
    false = true.clone()
    false[:, BIG:] = gold.roll(1, dims=0)[:, BIG:]  # the same slots, another row's values
    scale = 8 ** 0.5

    def value_bonus(basis) -> float:
        def mse(p):
            return normalized_mse(basis.apply(p), basis.apply(gold), scale) if basis else \
                normalized_mse(p, gold, scale)
        return float((mse(false) - mse(true)).mean() / mse(true).mean())

    raw, white = value_bonus(None), value_bonus(fit_reward_basis(train, "whiten"))
    std = value_bonus(fit_reward_basis(train, "standardize"))
    # relative MSE increase for a false value: ~4% raw, over 100× that whitened; standardised
    # over 10× (unit inputs: each row's norm, set by the loud dimensions, scales the quiet ones)
    assert raw < 0.05 and white > 100 * raw and std > 10 * raw, (raw, white, std)


def _rl(group: int = 4) -> RLConfig:
    return RLConfig(group_size=group, length_penalty_coef=0.0)


def test_step_rewards_measure_reward_gap_and_top1_in_the_basis():
    train = _presence_and_values(500)
    basis = fit_reward_basis(train, "whiten")
    gold = _presence_and_values(8, seed=2)
    pred = gold + 0.5 * torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    negatives = _presence_and_values(8 * 3, seed=4).reshape(8, 3, 8)
    kw = dict(scale=8 ** 0.5, eos_token_ids=[0], hard_negatives=negatives)
    ids = [[5, 6, 0]] * 8
    out = step_rewards(pred, gold, ids, ["stop"] * 8, _rl(), basis=basis, **kw)
    expected = normalized_mse(basis.apply(pred), basis.apply(gold), 8 ** 0.5)
    torch.testing.assert_close(out.rewards, -expected)
    raw = step_rewards(pred, gold, ids, ["stop"] * 8, _rl(), **kw)
    assert not torch.allclose(raw.rewards, out.rewards)
    assert out.metrics["reward/mse"] == pytest.approx(float(expected.mean()))


class _FixedAR(torch.nn.Module):
    """An AR whose predictions are a parameter (the loss's gradient reaches it)."""

    def __init__(self, preds: torch.Tensor):
        super().__init__()
        self.preds = torch.nn.Parameter(preds.clone())

    def forward(self, input_ids, attention_mask):
        return self.preds


def test_the_online_ar_loss_is_the_reward_mse_in_the_same_basis():
    basis = fit_reward_basis(_presence_and_values(500), "standardize")
    gold = _presence_and_values(6, seed=5)
    model = _FixedAR(gold + torch.randn(6, 8, generator=torch.Generator().manual_seed(6)))
    batch = ARBatch(torch.zeros(6, 3, dtype=torch.long), torch.ones(6, 3, dtype=torch.long), gold)
    loss, rows = ar_sft_loss(model, batch, 8 ** 0.5, basis)
    reward = step_rewards(model.preds.detach(), gold, [[1, 0]] * 6, ["stop"] * 6, _rl(2),
                          scale=8 ** 0.5, eos_token_ids=[0], basis=basis)
    assert rows == 6 and float(loss.detach()) == pytest.approx(float(-reward.rewards.sum()), rel=1e-5)
    loss.backward()
    assert bool(torch.isfinite(model.preds.grad).all())


def test_the_ar_sft_loss_basis_term_makes_the_quiet_directions_count():
    """ar_sft.loss_basis: L = raw MSE + w · MSE in the basis. A prediction wrong only in the
    quiet (value) dimensions costs the raw term almost nothing; the whitened term sees it, and
    its gradient pulls those dimensions back."""
    basis = fit_reward_basis(_presence_and_values(2000), "whiten", 0.1)
    gold = _presence_and_values(6, seed=5)
    wrong_values = gold.clone()
    wrong_values[:, BIG:] += 0.3 * torch.randn(6, SMALL, generator=torch.Generator().manual_seed(7))
    batch = ARBatch(torch.zeros(6, 3, dtype=torch.long), torch.ones(6, 3, dtype=torch.long), gold)
    grads = {}
    for w in (0.0, 0.1):
        model = _FixedAR(wrong_values)
        loss, rows, fit = ar_sft_loss_parts(model, batch, 8 ** 0.5, term_basis=basis,
                                            term_weight=w)
        raw = normalized_mse(wrong_values, gold, 8 ** 0.5).sum()
        term = normalized_mse(basis.apply(wrong_values), basis.apply(gold), 8 ** 0.5).sum()
        assert rows == 6 and float(fit) == pytest.approx(float(raw), rel=1e-5)
        assert float(loss.detach()) == pytest.approx(float(raw + w * term), rel=1e-5)
        loss.backward()
        grads[w] = model.preds.grad[:, BIG:].norm()
    assert float(raw) < 0.2 * float(term)  # raw, the wrong values cost little
    assert float(grads[0.1]) > 1.5 * float(grads[0.0]), grads
    # without a basis the term is off, whatever its weight: the published loss
    loss, _ = ar_sft_loss(_FixedAR(wrong_values), batch, 8 ** 0.5, term_weight=0.1)
    assert float(loss.detach()) == pytest.approx(float(raw), rel=1e-5)


def test_the_ar_sft_contrast_term_is_infonce_against_the_bank(tmp_path):
    """ar_sft.contrast_weight: w_c · InfoNCE of c(ĥ) against c(gold) and the bank, the bank's copy
    of the gold left out; lowest when the prediction is the gold, not one of its neighbours."""
    rows = _presence_and_values(40, seed=3)
    bank, mean = fit_contrast_bank(rows, max_rows=100, seed=0)
    unit = torch.nn.functional.normalize(rows, dim=1)
    torch.testing.assert_close(mean, unit.mean(0))
    torch.testing.assert_close(bank, torch.nn.functional.normalize(unit - mean, dim=1))
    contrast = ContrastBank(bank, mean, weight=0.5, tau=0.1)
    gold = rows[:4]
    pred = gold + 0.05 * torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    term = contrastive_term(pred, gold, contrast)
    c = contrast.centred
    logits = (c(pred) @ bank.T) / 0.1  # the bank holds each gold at its own index
    own = torch.arange(4)
    expected = torch.logsumexp(logits, dim=1) - logits[own, own]
    torch.testing.assert_close(term, expected)  # same as a softmax over the bank, gold once
    assert float(contrastive_term(gold, gold, contrast).mean()) < float(
        contrastive_term(rows[4:8], gold, contrast).mean())  # a neighbour's prediction costs more
    batch = ARBatch(torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long), gold)
    loss, n, fit = ar_sft_loss_parts(_FixedAR(pred), batch, 8 ** 0.5, contrast=contrast)
    raw = normalized_mse(pred, gold, 8 ** 0.5).sum()
    assert n == 4 and float(fit) == pytest.approx(float(raw), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(raw + 0.5 * term.sum()), rel=1e-5)
    # a bank larger than contrast_bank_rows is a seeded sample; written and read back as is
    small, _ = fit_contrast_bank(rows, max_rows=10, seed=1)
    assert small.shape == (10, 8)
    torch.testing.assert_close(small, fit_contrast_bank(rows, max_rows=10, seed=1)[0])
    save_contrast_bank(small, mean, tmp_path / "bank.safetensors")
    read = load_contrast_bank(tmp_path / "bank.safetensors", 0.5, 0.1)
    torch.testing.assert_close(read.bank, small)
    assert (read.weight, read.tau) == (0.5, 0.1)


def test_fit_store_export_inference_give_the_reward_of_the_rl_stage(tmp_path, qwen):
    """fit → store (beside the AR, named in its sidecar) → export → NLA.score = the RL reward."""
    d = qwen.d_model
    av_dir, ar_dir = make_pair(tmp_path / "src", qwen)
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(256, d, generator=gen) * torch.linspace(0.05, 5.0, d)
    basis = fit_reward_basis(train, "whiten")
    basis.save(ar_dir / BASIS_FILE)
    meta = read_model_sidecar(ar_dir)
    write_model_sidecar(ar_dir, dataclasses.replace(meta, reward_basis=BASIS_FILE))

    exported_av, exported_ar = export.export_pair(av_dir, ar_dir, tmp_path / "export")
    assert read_model_sidecar(exported_ar.path).reward_basis == BASIS_FILE
    stored = load_reward_basis(exported_ar.path / BASIS_FILE, d_model=d)
    assert stored.kind == "whiten" and torch.equal(stored.transform, basis.transform)

    nla = NLA.from_pretrained(exported_av.path, exported_ar.path)
    gold = torch.randn(4, d, generator=gen) * torch.linspace(0.05, 5.0, d)
    texts = ["a red cat", "the old house", "two birds", "night"]
    result = nla.score_generation(gold, Generation(texts, texts, 4, None))
    rl_reward = step_rewards(result.predictions, gold, [[1, 0]] * 4, ["stop"] * 4, _rl(2),
                             scale=meta.mse_scale, eos_token_ids=[0], basis=basis)
    torch.testing.assert_close(result.mse, -rl_reward.rewards)
    assert not torch.allclose(result.mse, normalized_mse(result.predictions, gold, meta.mse_scale))


def test_bad_bases_are_one_clear_error(tmp_path):
    basis = fit_reward_basis(_presence_and_values(100), "whiten")
    path = basis.save(tmp_path / BASIS_FILE)
    with pytest.raises(RewardBasisError, match="another model"):
        load_reward_basis(path, d_model=16)
    with pytest.raises(RewardBasisError, match="vector width"):
        basis.apply(torch.zeros(2, 16))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(RewardBasisError, match="not a readable safetensors"):
        load_reward_basis(garbage)
    with pytest.raises(RewardBasisError, match="missing"):
        load_reward_basis(tmp_path / "absent.safetensors")
    with pytest.raises(RewardBasisError, match="rl.reward_basis"):
        fit_reward_basis(_presence_and_values(10), "pca")
    with pytest.raises(RewardBasisError, match="≥ 2 finite"):
        fit_reward_basis(torch.full((4, 8), float("nan")), "whiten")
    with pytest.raises(RewardBasisError, match="non-finite"):
        RewardBasis("whiten", torch.zeros(8), torch.full((8, 8), float("inf")))
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temp file


def test_a_sidecar_basis_must_be_a_file_beside_the_checkpoint(tmp_path, qwen):
    _, ar_dir = make_pair(tmp_path, qwen)
    meta = read_model_sidecar(ar_dir)
    with pytest.raises(SidecarError, match="extraction.reward_basis"):
        dataclasses.replace(meta, reward_basis="../elsewhere/basis.safetensors")
    write_model_sidecar(ar_dir, dataclasses.replace(meta, reward_basis=BASIS_FILE))
    with pytest.raises(RewardBasisError, match="copy it with the AR"):
        NLA.from_pretrained(tmp_path / "av", ar_dir)


def _hub_rows(n: int, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``μ + δ`` with a shared mean far larger than the deviations (as every real residual
    stream has), and the mean."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.full((d,), 3.0)
    return mean + 0.3 * torch.randn(n, d, generator=gen), mean


def test_the_centred_basis_lets_the_gold_beat_central_hub_negatives():
    """ĥ pulled toward the mean (an AR's typical error) is nearest, by raw cosine, to the most
    central negatives; with the mean removed it is nearest to its own gold."""
    train, mean = _hub_rows(2000)
    gold, _ = _hub_rows(8, seed=1)
    pred = mean + 0.3 * (gold - mean)  # the right deviation, shrunk toward the mean
    central = mean + 0.02 * torch.randn(8, 3, 16, generator=torch.Generator().manual_seed(2))
    kw = dict(scale=16 ** 0.5, eos_token_ids=[0], hard_negatives=central)
    ids, stops = [[5, 0]] * 8, ["stop"] * 8
    centre = fit_reward_basis(train, "centre")
    raw = step_rewards(pred, gold, ids, stops, _rl(), **kw).metrics
    centred = step_rewards(pred, gold, ids, stops, _rl(), basis=centre, **kw).metrics
    assert raw["reward/top1"] == 0.0 and centred["reward/top1"] == 1.0
    assert raw["reward/gap"] < 0 < centred["reward/gap"]
    unit = torch.nn.functional.normalize
    torch.testing.assert_close(centre.apply(gold), unit(gold, dim=1) - unit(train, dim=1).mean(0))


def test_a_centred_basis_stores_only_its_mean(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    basis = fit_reward_basis(_hub_rows(100)[0], "centre")
    assert basis.kind == "centre" and basis.transform is None
    path = basis.save(tmp_path / BASIS_FILE)
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["mean"]
    loaded = load_reward_basis(path, d_model=16)
    assert loaded.kind == "centre" and torch.equal(loaded.mean, basis.mean)
    with pytest.raises(RewardBasisError, match="has no transform"):
        RewardBasis("centre", torch.zeros(16), torch.eye(16))
    with pytest.raises(RewardBasisError, match="needs a transform"):
        RewardBasis("whiten", torch.zeros(16), None)
    bad = tmp_path / "bad.safetensors"
    save_file({"mean": torch.zeros(16)}, str(bad),
              metadata={"format": "nla_reward_basis/1", "kind": "whiten"})
    with pytest.raises(RewardBasisError, match="not an nla-rl reward basis"):
        load_reward_basis(bad)


@pytest.mark.parametrize("kind", ["centre", "standardize", "whiten"])
def test_the_reward_in_a_basis_ignores_the_length_of_the_prediction(kind):
    """The AR's output norm is free (its loss normalises), as in the raw reward: ĥ and 5·ĥ earn
    the same reward in every basis."""
    train, _ = _hub_rows(500)
    basis = fit_reward_basis(train, kind)
    gold, _ = _hub_rows(8, seed=1)
    pred = gold + 0.1 * torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    kw = dict(scale=4.0, eos_token_ids=[0])
    short = step_rewards(pred, gold, [[5, 0]] * 8, ["stop"] * 8, _rl(), basis=basis, **kw)
    long = step_rewards(5 * pred, gold, [[5, 0]] * 8, ["stop"] * 8, _rl(), basis=basis, **kw)
    torch.testing.assert_close(short.rewards, long.rewards, atol=1e-5, rtol=1e-5)


def test_a_basis_written_before_unit_inputs_is_applied_as_it_was_fitted(tmp_path):
    from safetensors.torch import save_file

    mean = torch.full((16,), 2.0)
    path = tmp_path / BASIS_FILE
    save_file({"mean": mean}, str(path), metadata={"format": "nla_reward_basis/1", "kind": "centre"})
    old = load_reward_basis(path)
    assert not old.unit_inputs
    v = torch.full((1, 16), 3.0)
    torch.testing.assert_close(old.apply(v), v - mean)
    new = load_reward_basis(RewardBasis("centre", mean / 4, None).save(tmp_path / "new.safetensors"))
    assert new.unit_inputs
    torch.testing.assert_close(new.apply(v), torch.full((1, 16), 0.25) - mean / 4)


@pytest.mark.parametrize("kind", ["centre", "whiten"])
def test_a_learner_rank_reads_every_kind_of_basis_onto_its_device(tmp_path, kind):
    """The online AR's loss reads the basis file on its rank (actors.losses): a centre basis
    has no transform to move."""
    from actors.losses import _basis_on

    train, _ = _hub_rows(200)
    basis = fit_reward_basis(train, kind)
    path = basis.save(tmp_path / f"{kind}.safetensors")
    on_rank = _basis_on(str(path), "cpu")
    assert on_rank.kind == kind and on_rank.unit_inputs
    torch.testing.assert_close(on_rank.apply(train[:4]), basis.apply(train[:4]))
