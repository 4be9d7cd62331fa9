"""The basis the reward's MSE is measured in, for when the variance is not where the meaning is.

An activation's largest directions need not be the ones an explanation is about (in the toy world,
which slots a document revealed carries ~75% of the variance and the values almost none), so
``-MSE`` in the raw basis barely rewards a true value. A :class:`RewardBasis` maps activations to
a basis fitted on training activations, and the reward compares the mapped vectors:

    B(v) = (v / |v| - μ) W                              (μ, W fitted on unit-norm training rows)
    MSE_B(ĥ, h) = mean_d (n_s(B(ĥ)) - n_s(B(h)))²      (n_s: normalise to s = mse_scale)

Inputs are scaled to unit norm first because the AR's output norm is free (its loss, like the
raw reward, normalises both vectors): on the tiny run the AR-SFT predicts norm 12.7 for
activations of norm 2.5, so ``v - μ`` on raw vectors subtracts the activations' mean from a
vector five times longer (centred cosine of true explanations 0.106 raw-scale, 0.394 unit).
A basis written before this (no ``inputs`` in its metadata) is read as it was fitted: raw inputs.

- ``raw``: no basis (``B`` = identity, today's reward; nothing is stored).
- ``centre``: ``W = I``, only the training mean is removed. Raw cosine is dominated by the
  direction every activation shares (toy world: every vector within cos 0.99 of the mean), so
  hub negatives win the contrastive term; centred, the cosine compares what differs between
  activations. Only ``μ`` is stored (no ``[d, d]`` matrix: 70B widths stay cheap).
- ``standardize``: ``W = diag(1 / (σ_j + ε·mean σ))``, each dimension z-scored.
- ``whiten``: ZCA, ``W = U diag(1 / sqrt(λ_k + ε·mean λ)) Uᵀ`` from the covariance ``U Λ Uᵀ``
  of the training activations: every direction of the training data counts the same.

ε keeps dimensions or directions with (almost) no variance from being blown up into noise.
The basis is fitted once on the RL stage's training activations and stored as
``reward_basis.safetensors`` beside the AR (the AR's sidecar names it, under ``extraction``),
so the RL reward, the online AR's loss, export, eval and inference all use the same numbers.
FVE is always measured in the raw basis (the paper's definition), so it stays comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nla_rl.errors import NLAError, mismatch

BASIS_KINDS = ("raw", "centre", "standardize", "whiten")
BASIS_FILE = "reward_basis.safetensors"
_FORMAT = "nla_reward_basis/1"


class RewardBasisError(NLAError):
    """A reward basis that cannot be fitted, read or applied."""


@dataclass(frozen=True)
class RewardBasis:
    """``B(v) = (v / |v| - mean) @ transform`` (fp32; ``transform`` [d, d], None for ``centre``;
    ``unit_inputs=False``: ``v`` as it is, as bases written before unit inputs were fitted)."""

    kind: str
    mean: torch.Tensor  # [d]
    transform: torch.Tensor | None  # [d, d]; None: the identity (kind centre)
    unit_inputs: bool = True

    def __post_init__(self):
        if self.kind not in BASIS_KINDS[1:]:
            raise RewardBasisError(mismatch("reward basis kind", " | ".join(BASIS_KINDS[1:]),
                                            self.kind))
        d = self.mean.shape[0]
        if (self.transform is None) != (self.kind == "centre"):
            raise RewardBasisError(f"a {self.kind} reward basis "
                                   f"{'has no' if self.kind == 'centre' else 'needs a'} transform")
        shape = None if self.transform is None else list(self.transform.shape)
        if self.mean.dim() != 1 or shape not in (None, [d, d]):
            raise RewardBasisError(mismatch("reward basis shapes", "mean [d], transform [d, d]",
                                            f"{list(self.mean.shape)}, {shape}"))
        tensors = [self.mean] if self.transform is None else [self.mean, self.transform]
        if not all(torch.isfinite(t).all() for t in tensors):
            raise RewardBasisError("the reward basis has non-finite entries; refit it")

    @property
    def d_model(self) -> int:
        return int(self.mean.shape[0])

    def to(self, device) -> RewardBasis:
        """The same basis with its tensors on ``device``."""
        return replace(self, mean=self.mean.to(device),
                       transform=None if self.transform is None else self.transform.to(device))

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """``B(v)`` for ``v`` [..., d] → fp32 [..., d] (NaN rows stay NaN: failures stay visible)."""
        if v.shape[-1] != self.d_model:
            raise RewardBasisError(mismatch("vector width for the reward basis", self.d_model,
                                            v.shape[-1], "use the basis fitted for this model"))
        v = torch.nn.functional.normalize(v.float(), dim=-1) if self.unit_inputs else v.float()
        centred = v - self.mean.to(v.device)
        return centred if self.transform is None else centred @ self.transform.to(v.device)

    def save(self, path: str | Path) -> Path:
        """Write atomically as safetensors (the kind in the metadata)."""
        from safetensors.torch import save_file

        from nla_rl.atomic import atomic_path

        with atomic_path(path) as tmp:
            tensors = {"mean": self.mean.contiguous()}
            if self.transform is not None:
                tensors["transform"] = self.transform.contiguous()
            save_file(tensors, str(tmp), metadata={"format": _FORMAT, "kind": self.kind,
                                                   "inputs": "unit" if self.unit_inputs else "raw"})
        return Path(path)


def apply_basis(basis: RewardBasis | None, v: torch.Tensor) -> torch.Tensor:
    """``B(v)``, or ``v`` unchanged when there is no basis (the raw reward)."""
    return v if basis is None else basis.apply(v)


def fit_reward_basis(vectors: torch.Tensor, kind: str, eps: float = 1e-3) -> RewardBasis | None:
    """Fit ``kind`` on training activations [n, d] (formulas: module docstring); ``raw`` → None."""
    if kind not in BASIS_KINDS:
        raise RewardBasisError(mismatch("rl.reward_basis", " | ".join(BASIS_KINDS), kind))
    if kind == "raw":
        return None
    x = torch.as_tensor(vectors).double()
    if x.dim() != 2 or x.shape[0] < 2 or not bool(torch.isfinite(x).all()):
        raise RewardBasisError(f"fitting a {kind} reward basis needs ≥ 2 finite activation rows "
                               f"[n, d]; found shape {list(x.shape)}")
    x = torch.nn.functional.normalize(x, dim=1)  # B applies to unit vectors (module docstring)
    mean = x.mean(dim=0)
    centred = x - mean
    if kind == "centre":
        return RewardBasis(kind, mean.float(), None)
    if kind == "standardize":
        std = centred.pow(2).mean(dim=0).sqrt()
        transform = torch.diag(1.0 / (std + eps * std.mean()))
    else:
        cov = centred.T @ centred / x.shape[0]
        eigvals, eigvecs = torch.linalg.eigh(cov)
        eigvals = eigvals.clamp(min=0.0)
        inv_sqrt = 1.0 / torch.sqrt(eigvals + eps * eigvals.mean())
        transform = eigvecs @ torch.diag(inv_sqrt) @ eigvecs.T
    return RewardBasis(kind, mean.float(), transform.float())


def load_reward_basis(path: str | Path, *, d_model: int | None = None) -> RewardBasis:
    """Read a basis written by :meth:`RewardBasis.save` (safetensors only: no pickle)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise RewardBasisError(f"{path}: the reward basis file is missing; it is written by the "
                               "RL stage beside the AR (rl.reward_basis) — copy it with the AR")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for garbage files
        raise RewardBasisError(f"{path}: not a readable safetensors reward basis ({err})") from None
    kind, inputs = meta.get("kind", ""), meta.get("inputs", "raw")
    if inputs not in ("raw", "unit"):
        raise RewardBasisError(mismatch(f"{path}: reward basis inputs", "unit | raw", inputs))
    expected = {"mean"} if kind == "centre" else {"mean", "transform"}
    if meta.get("format") != _FORMAT or set(tensors) != expected:
        raise RewardBasisError(f"{path}: not an nla-rl reward basis (format "
                               f"{meta.get('format')!r}, kind {kind!r}, tensors {sorted(tensors)})")
    transform = tensors.get("transform")
    basis = RewardBasis(kind, tensors["mean"].float(),
                        None if transform is None else transform.float(), inputs == "unit")
    if d_model is not None and basis.d_model != d_model:
        raise RewardBasisError(mismatch(f"{path}: reward basis width", d_model, basis.d_model,
                                        "this basis was fitted for another model"))
    return basis
