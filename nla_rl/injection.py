"""Injecting activation vectors into a Hugging Face causal LM at the marker positions.

Two families; a checkpoint is only correct with the family it was trained with.

* ``replace`` (reference implementation; Qwen2.5 / Gemma-3 / Llama releases): the marker token's
  *input embedding* is replaced by ``n_s(h) = h · s / sqrt(Σh² + ε)`` (``s = injection scale``,
  computed in fp32, then cast to the model dtype). The hook sits on the embedding module's *output*,
  so for Gemma (whose embedding module multiplies by √d) the injected row is **not** scaled by √d
  while every other row is.
* ``add`` ("Karvonen", norm-matched; the Qwen3-8B seed): at the output of decoder block ``layer``
  (default 1), at the marker position, ``h' = h + c · ‖h‖ · v/‖v‖`` with ``h`` the full residual
  stream there (in HF the decoder block's output *is* the residual) and ``v`` the raw activation.

Either family may read the vector centred (``injection.centre``, our extension): ``h/‖h‖ - μ`` in
place of ``h``, μ the mean unit activation of the AV-SFT rows, and optionally whitened as well
(``injection.whiten: λ``): ``(h/‖h‖ - μ) W`` with ``W = (Σ + λ·tr(Σ)/d·I)^(-1/2)``, Σ the
covariance of those unit rows (:meth:`InjectionSpec.av_input`, which every injection site calls;
the file :data:`CENTRE_FILE` beside the AV holds μ ``[d]``, or ``[μ; W]`` ``[d+1, d]`` when
whitened).

Both apply only to the forward pass whose token chunk contains the marker column, i.e. the
prompt pass: KV-cache decode steps start past the prompt and are never touched. The start of the
chunk is read from the KV cache length (``past_key_values.get_seq_length()``) on the way into the
base model. Hooks live inside the decoder blocks' ``nn.Module.__call__``, so HF gradient
checkpointing (enabled before or after :func:`inject`) replays them identically on recompute; the
recompute is not counted twice in :attr:`Injection.applied`.

For engines that take prompt embeddings (vLLM ``prompt_embeds``), :func:`build_prompt_embeds`
builds exactly what the ``replace`` hook produces inside the model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from nla_rl.errors import InjectionError
from nla_rl.vectors import check_vectors, normalize_to

FAMILIES = ("replace", "add")
# Model types whose embedding module multiplies by sqrt(hidden_size) (when only a config is known).
SCALED_EMBEDDING_MODEL_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})
# Where decoder blocks live, relative to a (possibly unwrapped) model.
_LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers",
                "language_model.layers", "layers", "model.decoder.layers", "transformer.h",
                "gpt_neox.layers")
# A replace scale left null ("choose from data") is this factor times the mean raw norm of the
# AV-SFT rows (the releases' rule); datagen records it once in the data sidecars.
DATA_SCALE_FACTOR = 1.1
# The centre μ of a centred injection (injection.centre): written by datagen into the run's data
# directory and beside every AV trained or exported with it (its sidecar names the file). Not a
# .safetensors file: vLLM loads every *.safetensors in a model directory as weights.
CENTRE_FILE = "injection_centre.npy"


def scale_from_data(vectors: np.ndarray) -> float:
    """The replace scale chosen from data: ``1.1 × mean ‖h‖`` over the rows ``[n, d]`` (float32
    norms, as the SFT stage always computed it, so recorded and recomputed values agree)."""
    return DATA_SCALE_FACTOR * float(np.linalg.norm(vectors, axis=1).mean())


def fit_injection_centre(vectors, whiten: float | None = None) -> torch.Tensor:
    """The AV's input map fitted on the rows ``[n, d]`` (fp64, fp32 result).

    ``whiten=None``: μ ``[d]``, the mean of the unit-norm rows ``u``. ``whiten=λ ≥ 0``: ``[μ; W]``
    ``[d+1, d]`` with ``W = (Σ + λ·tr(Σ)/d·I)^(-1/2)`` (symmetric, ZCA), Σ the covariance of ``u``:
    every direction in which the activations differ reaches the AV with unit variance, not only
    the few that hold most of it (toy world: 54% of the centred variance is one slot-presence
    direction, the values share about 20%). λ is relative to the mean variance, so it means the
    same at every width; it caps the gain of directions with almost no variance.
    """
    x = torch.as_tensor(np.asarray(vectors)).double()
    if x.dim() != 2 or x.shape[0] < 1 or not bool(torch.isfinite(x).all()):
        raise InjectionError(f"fitting the injection centre needs ≥ 1 finite activation row [n, d]; "
                             f"found shape {list(x.shape)}")
    unit = F.normalize(x, dim=1)
    centre = unit.mean(dim=0)
    if whiten is None:
        return centre.float()
    if not math.isfinite(float(whiten)) or whiten < 0:
        raise InjectionError(f"injection.whiten: expected λ ≥ 0 (or null), found {whiten!r}")
    if x.shape[0] < 2:
        raise InjectionError("whitening the injection needs ≥ 2 activation rows to fit a covariance")
    diffs = unit - centre
    cov = diffs.T @ diffs / (x.shape[0] - 1)
    d = cov.shape[0]
    ridge = float(whiten) * float(torch.trace(cov)) / d
    eigvals, eigvecs = torch.linalg.eigh(cov + ridge * torch.eye(d, dtype=cov.dtype))
    floor = 1e-12 * max(float(eigvals.max()), 1e-30)  # λ = 0 on rank-deficient data: no inf
    w = eigvecs @ torch.diag(eigvals.clamp_min(floor).rsqrt()) @ eigvecs.T
    return torch.cat([centre[None], w]).float()


def _input_map_problem(centre: torch.Tensor, d_model: int | None) -> str | None:
    """Why ``centre`` is not a valid input map (μ ``[d]`` or ``[μ; W]`` ``[d+1, d]``), or None."""
    d = centre.shape[-1] if centre.dim() else None
    shape_ok = centre.dim() == 1 or (centre.dim() == 2 and centre.shape[0] == centre.shape[1] + 1)
    if not shape_ok or (d_model is not None and d != d_model):
        want = "[d]" if d_model is None else f"[{d_model}] or [{d_model + 1}, {d_model}]"
        return (f"has shape {list(centre.shape)}, expected {want} (μ, or μ then the whitening "
                "matrix W)")
    if not bool(torch.isfinite(centre).all()):
        return "has non-finite entries"
    return None


def save_injection_centre(centre: torch.Tensor, path) -> None:
    """Write μ atomically as a float32 ``.npy`` (read back without pickle)."""
    from nla_rl.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, centre.detach().cpu().float().numpy(), allow_pickle=False)


def load_injection_centre(path, d_model: int | None = None) -> torch.Tensor:
    """μ from a file written by :func:`save_injection_centre` (``allow_pickle=False``)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise InjectionError(f"{path}: the injection centre is missing. The AV reads centred vectors "
                             "(its sidecar's extraction.injection_centre): keep the file beside it "
                             "(nla-rl export copies it), or rerun datagen for a run's data")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise InjectionError(f"{path}: not an injection centre file (a float32 .npy): {e}") from None
    centre = torch.from_numpy(np.asarray(array, np.float32))
    problem = _input_map_problem(centre, d_model)
    if problem is not None:
        raise InjectionError(f"{path}: the injection centre {problem}; use the centre of this "
                             "model's data (rerun datagen)")
    return centre


@dataclass(frozen=True)
class InjectionSpec:
    """How vectors enter the AV (read from the sidecar or the recipe). The one place that says
    what a valid spec is: a known family; ``replace`` with a scale (when known) finite and > 0;
    ``add`` with no scale."""

    family: str  # "replace" | "add"
    scale: float | None = None  # replace: the injected row's norm (None: not resolved yet)
    layer: int = 1  # add: the block whose output receives the vector
    coeff: float = 1.0  # add: c in h + c·‖h‖·v/‖v‖
    # μ [d] of a centred injection (injection.centre; None: the vector as extracted, as in every
    # published checkpoint), or [μ; W] [d+1, d] of a whitened one: the AV reads h/‖h‖ - μ, or
    # (h/‖h‖ - μ) W (see av_input).
    centre: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise InjectionError(f"injection family: expected one of {FAMILIES}, found {self.family!r}")
        if self.scale is not None:
            if self.family != "replace":
                raise InjectionError(f"injection family {self.family!r} takes no scale, found "
                                     f"scale={self.scale!r}")
            if not math.isfinite(float(self.scale)) or float(self.scale) <= 0:
                raise InjectionError(
                    f"injection.scale: family 'replace' needs a finite scale > 0, found "
                    f"{self.scale!r}; set injection.scale in the recipe (null chooses 1.1 × the "
                    "mean activation norm, which is 0 only for all-zero activations)")
        if self.centre is not None:
            problem = _input_map_problem(torch.as_tensor(self.centre), None)
            if problem is not None:
                raise InjectionError(f"injection centre {problem}; refit it (nla-rl datagen)")

    def av_input(self, vectors: torch.Tensor) -> torch.Tensor:
        """The vectors as the AV reads them: ``h`` itself, or ``h/‖h‖ - μ`` (fp32) for a centred
        injection. Every activation shares one large direction (toy world: each within cos 0.99
        of the mean), so after ``n_s`` the differences the explanation is about are a few percent
        of the injected row; centred, they are all of it (the AV-SFT shuffle gap doubles).
        Whitened, ``(h/‖h‖ - μ) W``: each of those differences with the same weight."""
        if self.centre is None:
            return vectors
        unit = F.normalize(torch.as_tensor(vectors).float(), dim=-1)
        centre = self._centre_on(unit.device)
        if centre.dim() == 1:
            return unit - centre
        return (unit - centre[0]) @ centre[1:]

    def _centre_on(self, device: torch.device) -> torch.Tensor:
        """The input map as fp32 on ``device``, copied there once per spec and device: ``[μ; W]``
        is 256 MiB at d = 8192, too much to move on every call of a GPU learner or engine."""
        centre = torch.as_tensor(self.centre)
        if centre.device == device and centre.dtype == torch.float32:
            return centre
        copies = self.__dict__.setdefault("_device_copies", {})  # frozen: not a field
        if device not in copies:
            copies[device] = centre.to(device, torch.float32)
        return copies[device]

    def __getstate__(self) -> dict:
        """Pickled (Ray) without the per-device copies: they belong to this process's devices."""
        return {k: v for k, v in self.__dict__.items() if k != "_device_copies"}

    @property
    def whitened(self) -> bool:
        """Whether the AV reads whitened vectors (the centre file holds ``[μ; W]``)."""
        return self.centre is not None and torch.as_tensor(self.centre).dim() == 2

    @property
    def resolved(self) -> bool:
        """Whether the spec can inject: ``add``, or ``replace`` with its scale."""
        return self.family != "replace" or self.scale is not None


# --------------------------------------------------------------------------- model structure

def _unwrapped(model) -> list:
    """``model`` and what it wraps (peft ``get_base_model()``, ``.base_model``, DDP/FSDP ``.module``)."""
    out, todo = [], [model]
    while todo:
        m = todo.pop(0)
        if m is None or any(m is o for o in out):
            continue
        out.append(m)
        if callable(getattr(m, "get_base_model", None)):
            todo.append(m.get_base_model())
        todo += [getattr(m, "base_model", None), getattr(m, "module", None)]
    return out


def _find_layers(model) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """``(owner, layers)``: the decoder block list and the base model that owns it."""
    for root in _unwrapped(model):
        for path in _LAYER_PATHS:
            *parents, name = path.split(".")
            owner = root
            for part in parents:
                owner = getattr(owner, part, None)
            layers = getattr(owner, name, None)
            if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
                return owner, layers
    raise InjectionError(
        f"cannot find the decoder blocks of {type(model).__name__}: looked for "
        f"{', '.join(_LAYER_PATHS)} (also inside peft/DDP wrappers). Supported: Qwen2, Qwen3, Llama, "
        "Gemma-3 causal LMs; add the attribute path to nla_rl.injection._LAYER_PATHS for others"
    )


def get_decoder_layers(model) -> torch.nn.ModuleList:
    """The ``ModuleList`` of decoder blocks (Qwen2/Qwen3/Llama/Gemma-3, bare or peft-wrapped)."""
    return _find_layers(model)[1]


def get_embedding_module(model) -> torch.nn.Module:
    """The input embedding module (``model.get_input_embeddings()``; works through peft)."""
    return model.get_input_embeddings()


def _text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    if isinstance(model_or_config, torch.nn.Module) and not hasattr(cfg, "hidden_size") \
            and not hasattr(cfg, "get_text_config"):
        # A wrapper whose own ``config`` is not the model's (a DeepSpeed engine's is a dict).
        inner = [m.config for m in _unwrapped(model_or_config)[1:]
                 if hasattr(getattr(m, "config", None), "get_text_config")]
        cfg = inner[0] if inner else cfg
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def d_model_of(model) -> int:
    """``hidden_size`` of the (text) model."""
    return int(_text_config(model).hidden_size)


def embed_multiplier(model_or_config, dtype: torch.dtype | None = None) -> float:
    """The factor the model's embedding module multiplies token embeddings by.

    Gemma's ``Gemma3TextScaledWordEmbedding`` computes ``E[ids] * embed_scale.to(weight.dtype)``
    with ``embed_scale = torch.tensor(hidden_size ** 0.5)`` (fp32), so the exact factor is
    ``√d`` rounded to fp32, then to the weight dtype — e.g. bf16(√3840) = 62.0, not 61.97.
    Given a model, the embedding module's own ``embed_scale`` is read (and ``dtype`` defaults to
    its weight dtype); given a config, ``√d`` for Gemma model types, else 1.0.
    """
    if isinstance(model_or_config, torch.nn.Module):
        emb = get_embedding_module(model_or_config)
        dtype = dtype or emb.weight.dtype
        scale = getattr(emb, "embed_scale", None)
        if scale is not None:
            return float(torch.as_tensor(scale, dtype=torch.float32).to(dtype))
    cfg = _text_config(model_or_config)
    if getattr(cfg, "model_type", None) not in SCALED_EMBEDDING_MODEL_TYPES:
        return 1.0
    return float(torch.tensor(math.sqrt(cfg.hidden_size), dtype=torch.float32).to(dtype or torch.float32))


# --------------------------------------------------------------------------- hooks

def _in_backward() -> bool:
    """True while autograd runs a backward pass (i.e. during a gradient-checkpoint recompute)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _cache_length(kwargs: dict) -> int:
    """Tokens already in the KV cache = the position where this forward's chunk starts."""
    cache = kwargs.get("past_key_values")
    try:
        return int(cache.get_seq_length()) if cache is not None else 0
    except (AttributeError, TypeError, ValueError):  # a cache type without a usable length
        return 0


class Injection:
    """Hooks that inject ``vectors`` at ``positions`` (see the module docstring); use :func:`inject`.

    ``applied`` counts rows written (a health metric: it should equal the number of prompts per
    prompt pass, and not grow on decode steps); ``passes`` counts forward passes that wrote rows.
    """

    def __init__(self, model, *, family: str, vectors: torch.Tensor, positions: torch.Tensor,
                 scale: float | None = None, layer: int = 1, coeff: float = 1.0):
        if family not in FAMILIES:
            raise InjectionError(f"injection family: expected one of {FAMILIES}, found {family!r}")
        self.model, self.family, self.layer, self.coeff = model, family, layer, float(coeff)
        self.vectors = check_vectors(vectors, d_model_of(model))
        self.positions = _check_positions(positions, self.vectors.shape[0])
        if family == "replace":
            if scale is None or not math.isfinite(float(scale)) or float(scale) <= 0:
                raise InjectionError(
                    f"family 'replace' needs a finite injection scale > 0 (the sidecar's "
                    f"extraction.injection_scale, e.g. 150 for Qwen2.5-7B), found {scale!r}"
                )
            self.scale = float(scale)
        else:
            if scale is not None:
                raise InjectionError(
                    f"family 'add' is norm-matched (h + c·‖h‖·v/‖v‖) and takes no scale, found "
                    f"scale={scale!r}; pass scale=None (and coeff for the strength)"
                )
            if not math.isfinite(self.coeff):
                raise InjectionError(f"coeff must be finite, found {coeff!r}")
            self.scale = None
        self._owner, self._layers = _find_layers(model)
        if family == "add" and not 0 <= layer < len(self._layers):
            raise InjectionError(f"injection layer: expected 0..{len(self._layers) - 1}, found {layer}")
        self.applied = 0
        self.passes = 0
        self._offset = 0
        self._handles: list = []

    # -- lifecycle
    def attach(self) -> "Injection":
        if self._handles:
            raise InjectionError("this Injection is already attached")
        owner = self._owner
        self._handles = [
            owner.register_forward_pre_hook(self._enter_pass, with_kwargs=True),
            owner.register_forward_hook(self._leave_pass, always_call=True),
        ]
        if self.family == "replace":
            self._handles.append(get_embedding_module(self.model).register_forward_hook(self._replace_hook))
        else:
            self._handles.append(self._layers[self.layer].register_forward_hook(self._add_hook))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- which rows this pass covers
    def _enter_pass(self, module, args, kwargs):
        self._offset = _cache_length(kwargs)

    def _leave_pass(self, module, args, output):
        self._offset = 0

    def _select(self, batch: int, seq: int):
        """``(vector index, rows, local cols)`` of markers inside this chunk, or ``None``."""
        rows, cols = self.positions[:, 0], self.positions[:, 1] - self._offset
        keep = (cols >= 0) & (cols < seq)
        if not bool(keep.any()):
            return None
        if int(rows[keep].max()) >= batch:
            raise InjectionError(
                f"positions name batch row {int(rows[keep].max())} but the forward pass has batch "
                f"size {batch}; with num_return_sequences/beams, expand vectors and positions too "
                "(generate_with_injection does)"
            )
        idx = keep.nonzero().flatten()
        if not _in_backward():  # a gradient-checkpoint recompute replays the same rows
            self.applied += idx.numel()
            self.passes += 1
        return idx, rows[idx], cols[idx]

    # -- the two families
    def _replace_hook(self, module, args, out: torch.Tensor):
        """Embedding output ``[B, S, d]``: row (b, t) ← ``n_s(v)`` cast to the output dtype."""
        sel = self._select(out.shape[0], out.shape[1])
        if sel is None:
            return None
        idx, rows, cols = (t.to(out.device) for t in sel)
        values = normalize_to(self.vectors.to(out.device)[idx], self.scale).to(out.dtype)
        return out.index_put((rows, cols), values)  # out of place: autograd-safe

    def _add_hook(self, module, args, out):
        """Block output ``h``: ``h[b, t] ← h[b, t] + c · ‖h[b, t]‖ · v/‖v‖`` (fp32, then cast)."""
        hidden = out[0] if isinstance(out, tuple) else out
        sel = self._select(hidden.shape[0], hidden.shape[1])
        if sel is None:
            return None
        idx, rows, cols = (t.to(hidden.device) for t in sel)
        h = hidden[rows, cols].float()
        direction = normalize_to(self.vectors.to(hidden.device)[idx], 1.0)
        new = h + self.coeff * h.norm(dim=-1, keepdim=True) * direction
        hidden = hidden.index_put((rows, cols), new.to(hidden.dtype))
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def _check_positions(positions, n: int) -> torch.Tensor:
    positions = torch.as_tensor(positions)
    if positions.dim() == 1 and positions.numel() == 2:
        positions = positions.unsqueeze(0)
    if positions.dim() != 2 or positions.shape[1] != 2 or positions.dtype.is_floating_point:
        raise InjectionError(
            f"positions: expected an integer tensor [n, 2] of (row, column) from "
            f"tokens.find_marker_positions, found shape {list(positions.shape)} dtype {positions.dtype}"
        )
    if positions.shape[0] != n:
        raise InjectionError(
            f"{positions.shape[0]} marker position(s) but {n} vector(s): each vector needs exactly "
            "one marker position (row, column)"
        )
    positions = positions.detach().to("cpu", torch.long)
    if bool((positions < 0).any()):
        raise InjectionError(f"positions must be >= 0, found {positions[(positions < 0).any(1)].tolist()}")
    if positions.unique(dim=0).shape[0] != n:
        raise InjectionError("positions contain the same (row, column) twice; one vector per marker")
    return positions


@contextmanager
def inject(model, *, family: str, vectors: torch.Tensor, positions: torch.Tensor,
           scale: float | None = None, layer: int = 1, coeff: float = 1.0) -> Iterator[Injection]:
    """Inject ``vectors[i]`` at ``positions[i] = (row, col)`` while the context is open.

    ``family="replace"`` needs ``scale``; ``family="add"`` uses ``layer`` and ``coeff``. Works
    under ``torch.no_grad`` (generation) and with gradients (vectors may require grad). The hooks
    are removed on exit, also on error. Yields the :class:`Injection` (``.applied`` counter).
    """
    handle = Injection(model, family=family, vectors=vectors, positions=positions, scale=scale,
                       layer=layer, coeff=coeff).attach()
    try:
        yield handle
    finally:
        handle.remove()


# --------------------------------------------------------------------------- prompt embeddings

def build_batch_prompt_embeds(embedding_weight: torch.Tensor, input_ids: torch.Tensor,
                              vectors: torch.Tensor, positions: torch.Tensor, *, scale: float,
                              multiplier: float = 1.0) -> torch.Tensor:
    """``[B, S, d]`` prompt embeddings with the ``replace`` injection already applied.

    Ordinary rows: ``E[ids] * multiplier`` computed as the model does (the multiplier as a 0-d
    tensor in the weight dtype); marker rows: ``n_s(v)`` cast to the weight dtype, *not* multiplied.
    """
    input_ids = torch.as_tensor(input_ids, device=embedding_weight.device)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    vectors = check_vectors(vectors, embedding_weight.shape[1])
    positions = _check_positions(positions, vectors.shape[0])
    batch, seq = input_ids.shape
    if bool((positions[:, 0] >= batch).any() or (positions[:, 1] >= seq).any()):
        raise InjectionError(f"positions {positions.tolist()} fall outside input_ids of shape {[batch, seq]}")
    if scale is None or not math.isfinite(float(scale)) or float(scale) <= 0:
        raise InjectionError(f"build_prompt_embeds needs a finite injection scale > 0, found {scale!r}")
    embeds = F.embedding(input_ids.long(), embedding_weight)
    if multiplier != 1.0:
        embeds = embeds * torch.tensor(multiplier, dtype=torch.float32,
                                       device=embeds.device).to(embeds.dtype)
    values = normalize_to(vectors.to(embeds.device), float(scale)).to(embeds.dtype)
    pos = positions.to(embeds.device)
    return embeds.index_put((pos[:, 0], pos[:, 1]), values)


def build_prompt_embeds(embedding_weight: torch.Tensor, token_ids, vector: torch.Tensor,
                        position: int, *, scale: float, multiplier: float = 1.0) -> torch.Tensor:
    """``[seq, d]`` prompt embeddings of one prompt for engines that take them (vLLM
    ``prompt_embeds``): ``E[ids] * multiplier`` except row ``position`` = ``n_s(vector)``."""
    ids = torch.as_tensor(token_ids).reshape(1, -1)
    return build_batch_prompt_embeds(embedding_weight, ids, vector.reshape(1, -1),
                                     torch.tensor([[0, int(position)]]), scale=scale,
                                     multiplier=multiplier)[0]


# --------------------------------------------------------------------------- generation

def generate_with_injection(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            *, family: str, vectors: torch.Tensor, positions: torch.Tensor,
                            scale: float | None = None, layer: int = 1, coeff: float = 1.0,
                            **generate_kwargs) -> tuple[torch.Tensor, Injection]:
    """``model.generate`` inside :func:`inject`; returns ``(sequences, injection)``.

    ``num_return_sequences = k`` is handled by expanding prompts, vectors and positions here
    (row ``r`` becomes rows ``r·k … r·k + k - 1``), then generating one sequence per row.
    """
    k = int(generate_kwargs.pop("num_return_sequences", 1) or 1)
    positions = torch.as_tensor(positions)
    if k > 1:
        input_ids = input_ids.repeat_interleave(k, dim=0)
        attention_mask = attention_mask.repeat_interleave(k, dim=0)
        vectors = check_vectors(vectors, d_model_of(model)).repeat_interleave(k, dim=0)
        offsets = torch.arange(k, device=positions.device).repeat(positions.shape[0])
        positions = positions.repeat_interleave(k, dim=0)
        positions = torch.stack([positions[:, 0] * k + offsets, positions[:, 1]], dim=1)
    if tokenizer is not None and "pad_token_id" not in generate_kwargs:
        generate_kwargs["pad_token_id"] = tokenizer.pad_token_id
    with inject(model, family=family, vectors=vectors, positions=positions, scale=scale,
                layer=layer, coeff=coeff) as handle:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
    return out, handle
