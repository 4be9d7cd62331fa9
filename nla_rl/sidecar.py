"""The ``nla_meta.yaml`` sidecars: the contract between data, training, export and inference.

Two kinds, in the reference implementation's published layout:

* **model** sidecar ``<checkpoint>/nla_meta.yaml`` (``kind: nla_model``, schema 2; schema 1 and
  the old ``actor``/``critic`` spellings are read too);
* **dataset** sidecar ``<data file>.nla_meta.yaml`` (``kind: nla_dataset``, schema 1).

Readers ignore unknown keys (released checkpoints carry extras) but fail on a missing required
key, naming the dotted field and the file. Writers are atomic (temp file + ``os.replace``).
``validate_*`` checks a sidecar against the live tokenizer and model config.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nla_rl.atomic import atomic_path
from nla_rl.errors import SidecarError, mismatch
from nla_rl.templates import depth_percent
from nla_rl.tokens import (MarkerTokens, canonical_neighbors, critic_suffix_ids, marker_token_id,
                           marker_tokens)

MODEL_SIDECAR_NAME = "nla_meta.yaml"
DATASET_SIDECAR_SUFFIX = ".nla_meta.yaml"
MODEL_KIND, MODEL_SCHEMA, MODEL_SCHEMAS_READ = "nla_model", 2, (1, 2)
DATASET_KIND, DATASET_SCHEMA = "nla_dataset", 1
ROLE_ALIASES = {"av": "av", "ar": "ar", "actor": "av", "critic": "ar"}
INJECTION_FAMILIES = ("replace", "add")
DATASET_STAGES = ("base", "av_sft", "ar_sft", "rl", "eval")
TRAINING_STAGES = ("av_sft", "ar_sft", "rl")
SQRT_D_MODEL = "sqrt_d_model"
_UNSET, _ABSENT = object(), object()


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _tuple(x):
    return None if x is None else tuple(x)


@dataclass(frozen=True)
class TokenMeta:
    """The marker and its anchors (``tokens:`` in both sidecars)."""

    char: str
    token_id: int
    left_id: int
    right_id: int
    critic_suffix_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "critic_suffix_ids", _tuple(self.critic_suffix_ids))

    @property
    def marker(self) -> MarkerTokens:
        """The ids :func:`nla_rl.tokens.find_marker_positions` needs."""
        return MarkerTokens(self.char, self.token_id, self.left_id, self.right_id)


@dataclass(frozen=True)
class ModelSidecar:
    """A checkpoint's metadata. ``role`` is normalised to ``av``/``ar``; scales are resolved
    floats or ``None`` (raw). ``extraction_layer_index`` (K) is required for the AR."""

    role: str
    stage: str
    base_checkpoint: str
    d_model: int
    extraction_layer_index: int | None
    injection_scale: float | None
    mse_scale: float | None
    tokens: TokenMeta
    av_template: str
    ar_template: str | None = None
    trained_on: tuple = ()
    parent_checkpoints: tuple = ()
    created_at: str = field(default_factory=_utc_now)
    created_by: str = "nla-rl"
    training: dict = field(default_factory=dict, hash=False)
    # Our extension (the reference ignores unknown keys): residual addition at a block's output.
    injection_family: str = "replace"
    injection_add_layer: int = 1
    injection_add_coeff: float = 1.0

    def __post_init__(self):
        role = ROLE_ALIASES.get(self.role)
        if role is None:
            raise SidecarError(mismatch("role", "av | ar (or actor | critic)", self.role))
        object.__setattr__(self, "role", role)
        if self.injection_family not in INJECTION_FAMILIES:
            raise SidecarError(mismatch("extraction.injection_family", " | ".join(INJECTION_FAMILIES),
                                        self.injection_family))
        for name in ("injection_scale", "mse_scale"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else float(value))
        object.__setattr__(self, "injection_add_coeff", float(self.injection_add_coeff))
        object.__setattr__(self, "trained_on", tuple(self.trained_on))
        object.__setattr__(self, "parent_checkpoints", tuple(self.parent_checkpoints))
        object.__setattr__(self, "training", dict(self.training or {}))
        if role == "ar":
            for name, value in (("extraction_layer_index", self.extraction_layer_index),
                                ("tokens.critic_suffix_ids", self.tokens.critic_suffix_ids),
                                ("prompt_templates.ar", self.ar_template)):
                if value is None:
                    raise SidecarError(f"{name} is required in an AR sidecar")

    @property
    def marker(self) -> MarkerTokens:
        """The marker ids (see :attr:`TokenMeta.marker`)."""
        return self.tokens.marker


@dataclass(frozen=True)
class DatasetSidecar:
    """A data file's metadata. Unknown top-level keys (our ``stats``, ``centering``, hard-negative
    parameters, …) live in ``extras`` and are written back as top-level keys."""

    dataset_id: str
    stage: str
    row_count: int
    base_model: str
    d_model: int
    layer_index: int
    corpus: str
    positions_per_doc: int
    norm: str = "none"
    corpus_slice: tuple[int, int] | None = None  # (start, length)
    tokens: TokenMeta | None = None
    av_template: str | None = None
    ar_template: str | None = None
    api_summaries: dict | None = field(default=None, hash=False)
    parent_datasets: tuple = ()
    created_at: str = field(default_factory=_utc_now)
    created_by: str = "nla-rl"
    git_commit: str | None = None
    keep_debug_metadata: bool | None = None
    extras: dict = field(default_factory=dict, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "corpus_slice", _tuple(self.corpus_slice))
        object.__setattr__(self, "parent_datasets", tuple(self.parent_datasets))
        object.__setattr__(self, "extras", dict(self.extras or {}))
        _check_dataset(self)


def _check_dataset(sc: DatasetSidecar) -> None:
    if sc.stage not in DATASET_STAGES:
        raise SidecarError(mismatch("stage", " | ".join(DATASET_STAGES), sc.stage))
    need = []
    if sc.stage in TRAINING_STAGES:
        need += [("tokens", sc.tokens), ("prompt_templates.actor", sc.av_template)]
    if sc.stage == "ar_sft":
        need += [("tokens.critic_suffix_ids", sc.tokens and sc.tokens.critic_suffix_ids),
                 ("prompt_templates.critic", sc.ar_template)]
    for name, value in need:
        if value is None:
            raise SidecarError(f"{name} is required in a stage-{sc.stage} dataset sidecar")
    clash = set(sc.extras) & set(_DATASET_KEYS)
    if clash:
        raise SidecarError(f"extras must not reuse sidecar keys: {sorted(clash)}")


_DATASET_KEYS = ("dataset_id", "stage", "row_count", "extraction", "kind", "schema_version",
                 "keep_debug_metadata", "tokens", "prompt_templates", "api_summaries",
                 "parent_datasets", "created_at", "created_by", "git_commit")


# ---------------------------------------------------------------------------- reading helpers


class _Doc:
    """A parsed YAML mapping and its file: typed, dotted-path access with errors naming both.

    Accessors take ``default`` (absent → default; no default → "missing required field") and
    ``alt`` (older spellings, tried in order). An explicit null is accepted where default is None.
    """

    def __init__(self, path: Path, what: str):
        self.path = path
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise SidecarError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise SidecarError(f"{path}: a {what} sidecar must be a YAML mapping, "
                               f"found {type(data).__name__}")
        self.data = data

    def fail(self, msg: str) -> SidecarError:
        return SidecarError(f"{self.path}: {msg}")

    def _lookup(self, dotted: str) -> Any:
        node: Any = self.data
        parts = dotted.split(".")
        for i, key in enumerate(parts):
            if not isinstance(node, dict):
                raise self.fail(f"`{'.'.join(parts[:i])}` must be a mapping, found {node!r}")
            if key not in node:
                return _ABSENT
            node = node[key]
        return node

    def get(self, dotted: str, default: Any = _UNSET, *, alt: tuple[str, ...] = ()) -> Any:
        """The raw value at ``a.b.c`` (or the first older spelling in ``alt`` present)."""
        for name in (dotted, *alt):
            value = self._lookup(name)
            if value is not _ABSENT:
                return value
        if default is _UNSET:
            older = f" (older spelling: {', '.join(f'`{a}`' for a in alt)})" if alt else ""
            raise self.fail(f"missing required field `{dotted}`{older}")
        return default

    def _typed(self, dotted, default, alt, ok, expected: str, convert=lambda v: v):
        value = self.get(dotted, default, alt=alt)
        if value is None and default is None:
            return None
        if not ok(value):
            raise self.fail(mismatch(dotted, expected, value))
        return convert(value)

    def integer(self, dotted: str, default: Any = _UNSET, *, alt=()) -> int | None:
        return self._typed(dotted, default, alt, _is_int, "an integer")

    def number(self, dotted: str, default: Any = _UNSET) -> float | None:
        return self._typed(dotted, default, (), lambda v: _is_int(v) or isinstance(v, float),
                           "a number", float)

    def string(self, dotted: str, default: Any = _UNSET, *, alt=()) -> str | None:
        # YAML turns an unquoted ISO timestamp into a datetime; keep it as text.
        return self._typed(dotted, default, alt, lambda v: isinstance(v, (str, _dt.date)),
                           "a string", lambda v: v if isinstance(v, str) else v.isoformat())

    def ids(self, dotted: str, default: Any = _UNSET) -> tuple[int, ...] | None:
        return self._typed(dotted, default, (), lambda v: isinstance(v, list) and all(map(_is_int, v)),
                           "a list of token ids", tuple)

    def listing(self, dotted: str) -> tuple:
        return self._typed(dotted, (), (), lambda v: v is None or isinstance(v, list), "a list",
                           lambda v: tuple(v or ()))

    def mapping(self, dotted: str, default: Any = None) -> dict | None:
        return self._typed(dotted, default, (), lambda v: isinstance(v, dict), "a mapping", dict)

    def scale(self, dotted: str, default: Any, d_model: int) -> float | None:
        """A scale: null = raw, ``sqrt_d_model`` = √d, a number or a number string."""
        value = self.get(dotted, default)
        if value is None:
            return None
        if value == SQRT_D_MODEL:
            return math.sqrt(d_model)
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
        raise self.fail(mismatch(dotted, f"a number, null or {SQRT_D_MODEL!r}", value))

    def check_kind(self, kind: str, schemas: tuple[int, ...]) -> None:
        found = self.get("kind")
        if found != kind:
            raise self.fail(mismatch("kind", kind, found, "this is not that kind of sidecar"))
        version = self.get("schema_version")
        if version not in schemas:
            raise self.fail(mismatch("schema_version", " or ".join(map(str, schemas)), version,
                                     "this reader does not understand that schema"))

    def tokens(self, *, need_suffix: bool) -> TokenMeta:
        return TokenMeta(
            char=self.string("tokens.injection_char"),
            token_id=self.integer("tokens.injection_token_id"),
            left_id=self.integer("tokens.injection_left_neighbor_id"),
            right_id=self.integer("tokens.injection_right_neighbor_id"),
            critic_suffix_ids=self.ids("tokens.critic_suffix_ids", _UNSET if need_suffix else None),
        )

    def build(self, cls, **kwargs):
        """``cls(**kwargs)``, naming the file in any error the class's own checks raise."""
        try:
            return cls(**kwargs)
        except SidecarError as e:
            raise self.fail(str(e)) from e


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _missing(path: Path, what: str, writer: str) -> SidecarError:
    return SidecarError(f"no {what} sidecar at {path}: it is written by {writer}")


def _tokens_dict(t: TokenMeta) -> dict:
    return {"injection_char": t.char, "injection_token_id": t.token_id,
            "injection_left_neighbor_id": t.left_id, "injection_right_neighbor_id": t.right_id,
            "critic_suffix_ids": None if t.critic_suffix_ids is None else list(t.critic_suffix_ids)}


def _plain(obj):
    """``obj`` as plain YAML-safe data: tuples → lists, numpy scalars → Python, paths → str."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return obj.item()
    return obj


def _atomic_write_yaml(path: Path, data: dict) -> Path:
    """Write ``data`` to ``path`` as YAML, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(_plain(data), f, sort_keys=False, allow_unicode=True, width=100_000)
        f.flush()
        os.fsync(f.fileno())
    return path


# ---------------------------------------------------------------------------- model sidecar


def model_sidecar_path(path_or_dir: str | Path) -> Path:
    """``<dir>/nla_meta.yaml`` for a checkpoint directory; a file path is returned unchanged."""
    p = Path(path_or_dir)
    return p / MODEL_SIDECAR_NAME if p.is_dir() or p.suffix not in (".yaml", ".yml") else p


def read_model_sidecar(path_or_dir: str | Path) -> ModelSidecar:
    """Read a checkpoint's ``nla_meta.yaml`` (pass the directory or the file), any spelling."""
    path = model_sidecar_path(path_or_dir)
    if not path.is_file():
        raise _missing(path, "model", "nla_rl.sidecar.write_model_sidecar when a checkpoint is "
                       "saved or exported; is this an NLA checkpoint directory?")
    doc = _Doc(path, "model")
    doc.check_kind(MODEL_KIND, MODEL_SCHEMAS_READ)
    role = doc.get("role")
    if role not in ROLE_ALIASES:
        raise doc.fail(mismatch("role", "av | ar (or actor | critic)", role))
    is_ar = ROLE_ALIASES[role] == "ar"
    d_model = doc.integer("d_model")
    doc.mapping("extraction", _UNSET)  # required, though the AR may leave its scales out
    ex = "extraction."
    return doc.build(
        ModelSidecar,
        role=role,
        stage=doc.string("stage"),
        base_checkpoint=doc.string("base_checkpoint"),
        d_model=d_model,
        extraction_layer_index=_layer_index(doc, required=is_ar),
        injection_scale=doc.scale(ex + "injection_scale", None if is_ar else _UNSET, d_model),
        mse_scale=doc.scale(ex + "mse_scale", SQRT_D_MODEL, d_model),  # absent = √d, null = raw
        tokens=doc.tokens(need_suffix=is_ar),
        av_template=doc.string("prompt_templates.av", alt=("prompt_templates.actor",)),
        ar_template=doc.string("prompt_templates.ar", _UNSET if is_ar else None,
                               alt=("prompt_templates.critic",)),
        trained_on=doc.listing("trained_on"),
        parent_checkpoints=doc.listing("parent_checkpoints"),
        created_at=doc.string("created_at", None) or "",
        created_by=doc.string("created_by", None) or "",
        training=doc.mapping("training") or {},
        injection_family=doc.string(ex + "injection_family", "replace"),
        injection_add_layer=doc.integer(ex + "injection_layer", 1),
        injection_add_coeff=doc.number(ex + "injection_coeff", 1.0),
    )


def _layer_index(doc: _Doc, *, required: bool) -> int | None:
    """K from ``extraction_layer_index``, ``critic.extraction_layer_index`` or (schema 1)
    ``critic.num_hidden_layers - 1``; the spellings present must agree."""
    found = {name: doc.integer(name, None)
             for name in ("extraction_layer_index", "critic.extraction_layer_index")}
    n = doc.integer("critic.num_hidden_layers", None)
    found["critic.num_hidden_layers - 1"] = None if n is None else n - 1
    found = {k: v for k, v in found.items() if v is not None}
    if len(set(found.values())) > 1:
        raise doc.fail(f"the extraction layer index disagrees between fields: {found}")
    if not found and required:
        raise doc.fail("missing required field `critic.extraction_layer_index` (also read from "
                       "top-level `extraction_layer_index` or v1 `critic.num_hidden_layers`)")
    return next(iter(found.values()), None)


def model_sidecar_dict(sc: ModelSidecar) -> dict:
    """The released layout and key order of ``sc`` (what :func:`write_model_sidecar` writes)."""
    extraction: dict = {"injection_scale": sc.injection_scale, "mse_scale": sc.mse_scale}
    if sc.injection_family != "replace":
        extraction.update(injection_family=sc.injection_family,
                          injection_layer=sc.injection_add_layer, injection_coeff=sc.injection_add_coeff)
    out = {
        "kind": MODEL_KIND, "schema_version": MODEL_SCHEMA, "role": sc.role, "stage": sc.stage,
        "base_checkpoint": sc.base_checkpoint, "d_model": sc.d_model, "extraction": extraction,
        "tokens": _tokens_dict(sc.tokens),
        "prompt_templates": {"av": sc.av_template, "ar": sc.ar_template},
        "trained_on": list(sc.trained_on), "parent_checkpoints": list(sc.parent_checkpoints),
        "created_at": sc.created_at or _utc_now(), "created_by": sc.created_by,
    }
    if sc.role == "ar":
        out["critic"] = {"extraction_layer_index": sc.extraction_layer_index}
    if sc.training:
        out["training"] = dict(sc.training)
    if sc.extraction_layer_index is not None:
        out["extraction_layer_index"] = sc.extraction_layer_index
    return out


def write_model_sidecar(checkpoint_dir: str | Path, sc: ModelSidecar) -> Path:
    """Atomically write ``<checkpoint_dir>/nla_meta.yaml``; returns its path."""
    return _atomic_write_yaml(Path(checkpoint_dir) / MODEL_SIDECAR_NAME, model_sidecar_dict(sc))


# ---------------------------------------------------------------------------- dataset sidecar


def dataset_sidecar_path(data_file: str | Path) -> Path:
    """``<data_file>.nla_meta.yaml`` (e.g. ``rl.parquet`` → ``rl.parquet.nla_meta.yaml``)."""
    p = Path(data_file)
    return p if p.name.endswith(DATASET_SIDECAR_SUFFIX) else p.with_name(p.name + DATASET_SIDECAR_SUFFIX)


def read_dataset_sidecar(path: str | Path) -> DatasetSidecar:
    """Read the sidecar of a data file (pass the data file, or the sidecar: any ``.yaml``)."""
    path = Path(path)
    path = path if path.suffix in (".yaml", ".yml") else dataset_sidecar_path(path)
    if not path.is_file():
        raise _missing(path, "dataset", "nla_rl.sidecar.write_dataset_sidecar when the data file "
                       "is generated; regenerate the data, or copy the sidecar along with it")
    doc = _Doc(path, "dataset")
    doc.check_kind(DATASET_KIND, (DATASET_SCHEMA,))
    ex, pt = "extraction.", "prompt_templates."
    corpus_slice = None
    if doc.mapping(ex + "corpus_slice") is not None:
        corpus_slice = (doc.integer(ex + "corpus_slice.start"), doc.integer(ex + "corpus_slice.length"))
    return doc.build(
        DatasetSidecar,
        dataset_id=doc.string("dataset_id"),
        stage=doc.string("stage"),
        row_count=doc.integer("row_count"),
        base_model=doc.string(ex + "base_model"),
        d_model=doc.integer(ex + "d_model"),
        layer_index=doc.integer(ex + "layer_index"),
        corpus=doc.string(ex + "corpus"),
        positions_per_doc=doc.integer(ex + "positions_per_doc"),
        norm=doc.string(ex + "norm"),
        corpus_slice=corpus_slice,
        tokens=None if doc.get("tokens", None) is None else doc.tokens(need_suffix=False),
        av_template=doc.string(pt + "actor", None, alt=(pt + "av",)),
        ar_template=doc.string(pt + "critic", None, alt=(pt + "ar",)),
        api_summaries=doc.mapping("api_summaries"),
        parent_datasets=doc.listing("parent_datasets"),
        created_at=doc.string("created_at", None) or "",
        created_by=doc.string("created_by", None) or "",
        git_commit=doc.string("git_commit", None),
        keep_debug_metadata=doc.get("keep_debug_metadata", None),
        extras={k: v for k, v in doc.data.items() if k not in _DATASET_KEYS},
    )


def dataset_sidecar_dict(sc: DatasetSidecar) -> dict:
    """The reference layout of ``sc`` (top-level ``None`` values dropped, extras appended)."""
    extraction = {"base_model": sc.base_model, "d_model": sc.d_model, "layer_index": sc.layer_index,
                  "norm": sc.norm, "corpus": sc.corpus}
    if sc.corpus_slice is not None:
        extraction["corpus_slice"] = {"start": sc.corpus_slice[0], "length": sc.corpus_slice[1]}
    extraction["positions_per_doc"] = sc.positions_per_doc
    templates = None
    if sc.av_template is not None or sc.ar_template is not None:
        templates = {"actor": sc.av_template, "critic": sc.ar_template}
    out = {
        "dataset_id": sc.dataset_id, "stage": sc.stage, "row_count": sc.row_count,
        "extraction": extraction, "kind": DATASET_KIND, "schema_version": DATASET_SCHEMA,
        "keep_debug_metadata": sc.keep_debug_metadata,
        "tokens": None if sc.tokens is None else _tokens_dict(sc.tokens),
        "prompt_templates": templates, "api_summaries": sc.api_summaries,
        "parent_datasets": list(sc.parent_datasets), "created_at": sc.created_at or _utc_now(),
        "created_by": sc.created_by, "git_commit": sc.git_commit,
    }
    out = {k: v for k, v in out.items() if v is not None}
    out.update(sc.extras)
    return out


def write_dataset_sidecar(data_file: str | Path, sc: DatasetSidecar) -> Path:
    """Atomically write the sidecar of ``data_file`` (``<data_file>.nla_meta.yaml``)."""
    return _atomic_write_yaml(dataset_sidecar_path(data_file), dataset_sidecar_dict(sc))


# ---------------------------------------------------------------------------- building, validation


def make_token_meta(tokenizer, av_template: str, ar_template: str | None, char: str | None = None,
                    *, depth_pct: int | None = None) -> TokenMeta:
    """The ``tokens:`` block for ``tokenizer``: marker (selected when ``char`` is None),
    neighbours from the AV template, and the AR suffix ids when an AR template is given."""
    m = marker_tokens(tokenizer, av_template, char, depth_pct=depth_pct)
    suffix = None if ar_template is None else critic_suffix_ids(tokenizer, ar_template)
    return TokenMeta(m.char, m.token_id, m.left_id, m.right_id, suffix)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else getattr(config, "text_config", config)


def _check(field_name: str, expected, found, fix: str) -> None:
    if expected != found:
        raise SidecarError(mismatch(field_name, expected, found, fix))


_TOKEN_FIX = ("expected = the sidecar, found = the live tokenizer; the checkpoint/data was made "
              "with a different tokenizer or template — use the matching tokenizer")


def _validate_tokens(t: TokenMeta, tokenizer, av_template: str | None, ar_template: str | None,
                     depth_pct: int | None, *, check_neighbors: bool = True) -> None:
    try:
        live_id = marker_token_id(tokenizer, t.char)
    except SidecarError as e:
        raise SidecarError(f"{e} (the sidecar expects id {t.token_id})") from e
    _check("tokens.injection_token_id", t.token_id, live_id, _TOKEN_FIX)
    if av_template is not None and check_neighbors:
        left, right = canonical_neighbors(tokenizer, av_template, t.char, depth_pct=depth_pct)
        _check("tokens.injection_left_neighbor_id", t.left_id, left, _TOKEN_FIX)
        _check("tokens.injection_right_neighbor_id", t.right_id, right, _TOKEN_FIX)
    if t.critic_suffix_ids is not None and ar_template is not None:
        _check("tokens.critic_suffix_ids", list(t.critic_suffix_ids),
               critic_suffix_ids(tokenizer, ar_template), _TOKEN_FIX)


def validate_model_sidecar(sc: ModelSidecar, tokenizer, config, *, role: str | None = None) -> None:
    """Check ``sc`` against the live tokenizer and model config; raise :class:`SidecarError`
    naming the field, the sidecar's (expected) and the live (found) value on any disagreement."""
    if role is not None:
        _check("role", ROLE_ALIASES.get(role, role), sc.role, "load the other checkpoint")
    cfg = _text_config(config)
    _check("d_model", sc.d_model, cfg.hidden_size,
           f"expected = the sidecar's d_model, found = the model's config.hidden_size: the sidecar "
           f"belongs to another model, or was edited; use the {sc.role} checkpoint it was written "
           f"with, or set d_model: {cfg.hidden_size} in nla_meta.yaml if the weights are right")
    has_depth = "{depth_pct}" in sc.av_template
    depth = None
    if sc.role == "ar":
        _check("num_hidden_layers", sc.extraction_layer_index + 1, cfg.num_hidden_layers,
               f"an AR reading layer K={sc.extraction_layer_index} keeps K+1 blocks "
               "(expected = K+1 from the sidecar, found = config.num_hidden_layers)")
    elif has_depth:
        if sc.extraction_layer_index is None:
            raise SidecarError("extraction_layer_index is required for a depth-% AV template")
        depth = depth_percent(sc.extraction_layer_index, cfg.num_hidden_layers)
    # The AR's truncated config cannot give the depth %, so a depth template's neighbours are
    # only recomputed for the AV.
    _validate_tokens(sc.tokens, tokenizer, sc.av_template, sc.ar_template, depth,
                     check_neighbors=not (has_depth and sc.role == "ar"))


def validate_dataset_sidecar(sc: DatasetSidecar, tokenizer, config) -> None:
    """Check a dataset sidecar against the base model's tokenizer and config."""
    cfg = _text_config(config)
    _check("extraction.d_model", sc.d_model, cfg.hidden_size,
           "expected = the dataset sidecar's d_model, found = the base model's "
           "config.hidden_size: the activations were extracted from another base model; point "
           "model.base at that model, or extract the data again with this one")
    if not 0 <= sc.layer_index < cfg.num_hidden_layers:
        raise SidecarError(mismatch("extraction.layer_index", f"0..{cfg.num_hidden_layers - 1}",
                                    sc.layer_index, "the base model has fewer layers"))
    if sc.tokens is not None:
        depth = None
        if sc.av_template is not None and "{depth_pct}" in sc.av_template:
            depth = depth_percent(sc.layer_index, cfg.num_hidden_layers)
        _validate_tokens(sc.tokens, tokenizer, sc.av_template, sc.ar_template, depth)
