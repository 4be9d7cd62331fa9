"""The ``nla_meta.yaml`` sidecars: the contract between data, training, export and inference.

Two kinds, in the reference implementation's published layout:

* **model** sidecar ``<checkpoint>/nla_meta.yaml`` (``kind: nla_model``, schema 2; schema 1 and
  the old ``actor``/``critic`` spellings are read too);
* **dataset** sidecar ``<data file>.nla_meta.yaml`` (``kind: nla_dataset``, schema 1).

Readers ignore unknown keys (released checkpoints carry extras). A model sidecar may be as small
as the published clients accept (the reference's minimal files, nanoNLA's checkpoint copy of its
*dataset* sidecar): what the checkpoint's own tokenizer and config determine is filled in, with a
logged note kept in ``ModelSidecar.notes``; what they cannot determine (the AV template, a replace
scale, a nanoNLA AV's injection family) is refused, naming the dotted field and the file. Writers
are atomic (temp file + ``os.replace``). ``validate_*`` checks a sidecar against the live
tokenizer and model config.
"""

from __future__ import annotations

import datetime as _dt
import logging
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
                           marker_tokens, select_marker)

logger = logging.getLogger(__name__)

MODEL_SIDECAR_NAME = "nla_meta.yaml"
DATASET_SIDECAR_SUFFIX = ".nla_meta.yaml"
VALUE_HEAD_FILE = "value_head.safetensors"  # only an AR directory holds one (nla_rl.ar_model)
MODEL_KIND, MODEL_SCHEMA, MODEL_SCHEMAS_READ = "nla_model", 2, (1, 2)
DATASET_KIND, DATASET_SCHEMA = "nla_dataset", 1
ROLE_ALIASES = {"av": "av", "ar": "ar", "actor": "av", "critic": "ar"}
INJECTION_FAMILIES = ("replace", "add")
DATASET_STAGES = ("base", "av_sft", "ar_sft", "rl", "eval")
TRAINING_STAGES = ("av_sft", "ar_sft", "rl")
SQRT_D_MODEL = "sqrt_d_model"
UNKNOWN = "unknown"  # a stage or base checkpoint the sidecar does not record
_UNSET, _ABSENT = object(), object()


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _tuple(x):
    return None if x is None else tuple(x)


@dataclass(frozen=True)
class TokenMeta:
    """The marker and its anchors (``tokens:`` in both sidecars). The neighbour ids may be
    ``None`` only in an AR sidecar without an AV template (the AR never looks for the marker)."""

    char: str
    token_id: int
    left_id: int | None
    right_id: int | None
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
    floats or ``None`` (raw). ``extraction_layer_index`` (K) is required for the AR, the AV
    template for the AV. ``notes`` says what a reader filled in (not written back; not compared);
    ``derived`` names those fields."""

    role: str
    stage: str
    base_checkpoint: str
    d_model: int
    extraction_layer_index: int | None
    injection_scale: float | None
    mse_scale: float | None
    tokens: TokenMeta
    av_template: str | None
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
    # Our extension, AR only: the file (beside the checkpoint) of the basis its MSE is measured in
    # (nla_rl.reward_basis); None = the raw basis, as in every published checkpoint.
    reward_basis: str | None = None
    # Our extension, AV only: the file (beside the checkpoint) of the centre μ its input vectors
    # are centred on (injection.centre); None = the vector as extracted, as in every release.
    injection_centre: str | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)
    derived: frozenset = field(default=frozenset(), compare=False)

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
        for name in ("reward_basis", "injection_centre"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or Path(value).name != value):
                raise SidecarError(mismatch(f"extraction.{name}", "a file name beside the "
                                            "checkpoint (no directories)", value))
        object.__setattr__(self, "trained_on", tuple(self.trained_on))
        object.__setattr__(self, "parent_checkpoints", tuple(self.parent_checkpoints))
        object.__setattr__(self, "training", dict(self.training or {}))
        object.__setattr__(self, "notes", tuple(self.notes))
        object.__setattr__(self, "derived", frozenset(self.derived))
        if role == "av" and self.av_template is None:
            raise SidecarError("prompt_templates.av is required in an AV sidecar")
        if role == "av" and None in (self.tokens.left_id, self.tokens.right_id):
            raise SidecarError("tokens.injection_left/right_neighbor_id are required in an AV sidecar")
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
        """A list (absent or null: empty)."""
        value = self._typed(dotted, None, (), lambda v: isinstance(v, list), "a list", tuple)
        return value or ()

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


def read_model_sidecar(path_or_dir: str | Path, *, injection_family: str | None = None,
                       tokenizer=None, config=None) -> ModelSidecar:
    """Read a checkpoint's ``nla_meta.yaml`` (pass the directory or the file), any spelling.

    Besides our files and the releases' (schema 1 and 2, old spellings) it reads what the
    published clients read: the reference's minimal files and nanoNLA's checkpoint copy of its
    dataset sidecar (``kind: nla_dataset``). A field left out is filled where the checkpoint
    determines it, each with a logged note (``ModelSidecar.notes``):

    * ``schema_version`` → 2; ``stage``, ``base_checkpoint`` → ``unknown`` (a nanoNLA copy:
      its data's stage and ``extraction.base_model``);
    * ``role`` → ``ar`` when the directory holds ``value_head.safetensors``, else ``av``;
    * ``d_model`` → ``config.hidden_size``; the AR's K → ``config.num_hidden_layers - 1``;
    * ``tokens.*`` → from the tokenizer: the marker by the selection rule, its id, the neighbours
      in the AV template, the AR suffix ids; ``extraction.mse_scale`` → √d_model.

    What they cannot determine is refused: the AV template, a replace AV's scale, and the
    injection family of a nanoNLA AV. ``injection_family`` is that family when the sidecar does
    not record it (nanoNLA's Karvonen AVs: ``add``); a reference ``nla_model`` file without one is
    ``replace``, the only family of that layout. ``tokenizer``/``config``: the live ones when
    already loaded; otherwise they are loaded from the directory, and only if a field needs them.
    """
    path = model_sidecar_path(path_or_dir)
    if not path.is_file():
        raise _missing(path, "model", "nla_rl.sidecar.write_model_sidecar when a checkpoint is "
                       "saved or exported; is this an NLA checkpoint directory?")
    sc = _ModelReader(_Doc(path, "model"), _Live(path.parent, tokenizer, config),
                      injection_family).read()
    for note in sc.notes:
        logger.warning("%s: %s", path, note)
    return sc


class _Live:
    """The checkpoint directory's tokenizer and config, loaded only when a field has to be
    derived from them (a sidecar that records everything loads neither)."""

    def __init__(self, directory: Path, tokenizer=None, config=None):
        self.directory, self._tokenizer, self._config = directory, tokenizer, config

    def tokenizer(self, doc: _Doc, dotted: str):
        if self._tokenizer is None:
            self._need(doc, dotted, "tokenizer", ("tokenizer.json", "tokenizer_config.json"))
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(self.directory, local_files_only=True)
        return self._tokenizer

    def config(self, doc: _Doc, dotted: str):
        if self._config is None:
            self._need(doc, dotted, "config", ("config.json",))
            from transformers import AutoConfig
            self._config = AutoConfig.from_pretrained(self.directory, local_files_only=True)
        return _text_config(self._config)

    def _need(self, doc: _Doc, dotted: str, what: str, files: tuple[str, ...]) -> None:
        if not any((self.directory / f).is_file() for f in files):
            raise doc.fail(f"missing required field `{dotted}`, and it cannot be derived: "
                           f"{self.directory} has no {what} ({' or '.join(files)}); add the field, "
                           "or read the sidecar inside its checkpoint directory")


class _ModelReader:
    """One read of a model sidecar: the reference layouts (``kind: nla_model``) or nanoNLA's
    (a checkpoint's copy of its ``kind: nla_dataset`` sidecar), with the notes of what was filled."""

    def __init__(self, doc: _Doc, live: _Live, injection_family: str | None):
        self.doc, self.live, self.given_family = doc, live, injection_family
        self.notes: list[str] = []
        self.derived: set[str] = set()
        kind = doc.get("kind")
        if kind not in (MODEL_KIND, DATASET_KIND):
            raise doc.fail(mismatch("kind", MODEL_KIND, kind, "this is not a model sidecar (a "
                                    f"nanoNLA checkpoint may carry its {DATASET_KIND!r} sidecar)"))
        self.nano = kind == DATASET_KIND
        if injection_family is not None and injection_family not in INJECTION_FAMILIES:
            raise SidecarError(mismatch("injection_family", " | ".join(INJECTION_FAMILIES),
                                        injection_family))

    def fill(self, dotted: str, value, why: str):
        self.notes.append(f"filled {dotted} = {value!r} ({why})")
        self.derived.add(dotted)
        return value

    def read(self) -> ModelSidecar:
        doc, ex = self.doc, "extraction."
        self._schema()
        role = self._role()
        is_ar = role == "ar"
        d_model = self._d_model()
        layer = self._layer_index(is_ar)
        family = self._family(is_ar)
        av_t = doc.string("prompt_templates.av", None if is_ar else _UNSET,
                          alt=("prompt_templates.actor",))
        ar_t = doc.string("prompt_templates.ar", _UNSET if is_ar else None,
                          alt=("prompt_templates.critic",))
        if self.nano and doc.get("stage", None) is not None:
            stage = self.fill("stage", doc.string("stage"), "the stage of the data it was trained on")
        else:
            stage = doc.string("stage", None) or self.fill("stage", UNKNOWN, "not recorded")
        base = (doc.string(ex + "base_model", None) if self.nano else doc.string("base_checkpoint", None))
        if base is None:
            base = self.fill("base_checkpoint", UNKNOWN, "not recorded; a pair is matched on its "
                             "models' configs and tokenizers")
        if not is_ar and family == "replace":
            doc.mapping("extraction", _UNSET)  # a replace AV records its scale in it
        scale = doc.scale(ex + "injection_scale", _UNSET if family == "replace" and not is_ar else None,
                          d_model)
        if doc.get(ex + "mse_scale", _ABSENT) is _ABSENT:
            self.fill(ex + "mse_scale", round(math.sqrt(d_model), 4), "√d_model, the releases' value")
        return doc.build(
            ModelSidecar,
            role=role, stage=stage, base_checkpoint=base, d_model=d_model,
            extraction_layer_index=layer,
            injection_scale=scale,
            mse_scale=doc.scale(ex + "mse_scale", SQRT_D_MODEL, d_model),  # absent = √d, null = raw
            tokens=self._tokens(is_ar, av_t, ar_t, layer),
            av_template=av_t, ar_template=ar_t,
            trained_on=(tuple(filter(None, [doc.string("dataset_id", None)])) if self.nano
                        else doc.listing("trained_on")),
            parent_checkpoints=doc.listing("parent_checkpoints"),
            created_at=doc.string("created_at", None) or "",
            created_by=doc.string("created_by", None) or "",
            training=doc.mapping("training") or {},
            injection_family=family,
            injection_add_layer=doc.integer(ex + "injection_layer", 1),
            injection_add_coeff=doc.number(ex + "injection_coeff", 1.0),
            reward_basis=doc.string(ex + "reward_basis", None),
            injection_centre=doc.string(ex + "injection_centre", None),
            notes=tuple(self.notes), derived=frozenset(self.derived),
        )

    def _schema(self) -> None:
        schemas = (DATASET_SCHEMA,) if self.nano else MODEL_SCHEMAS_READ
        version = self.doc.get("schema_version", None)
        if version is None:
            self.fill("schema_version", schemas[-1], "not recorded")
        elif version not in schemas:
            raise self.doc.fail(mismatch("schema_version", " or ".join(map(str, schemas)), version,
                                         "this reader does not understand that schema"))

    def _role(self) -> str:
        role = self.doc.get("role", None)
        if role is not None:
            if role not in ROLE_ALIASES:
                raise self.doc.fail(mismatch("role", "av | ar (or actor | critic)", role))
            return ROLE_ALIASES[role]
        directory = self.live.directory
        if (directory / VALUE_HEAD_FILE).is_file():
            return self.fill("role", "ar", f"the directory holds {VALUE_HEAD_FILE}")
        if (directory / "config.json").is_file():
            return self.fill("role", "av", f"a model directory without {VALUE_HEAD_FILE}")
        raise self.doc.fail(f"missing required field `role`, and it cannot be inferred: {directory} "
                            "is not a model directory (no config.json); add role: av or role: ar")

    def _d_model(self) -> int:
        dotted = "extraction.d_model" if self.nano else "d_model"
        d_model = self.doc.integer(dotted, None)
        if d_model is None:
            d_model = self.fill("d_model", int(self.live.config(self.doc, dotted).hidden_size),
                                "config.hidden_size")
        return d_model

    def _layer_index(self, is_ar: bool) -> int | None:
        """K from ``extraction_layer_index``, ``critic.extraction_layer_index``, (schema 1)
        ``critic.num_hidden_layers - 1`` or (nanoNLA) ``extraction.layer_index``; the spellings
        present must agree. An AR recording none has K = its config's blocks - 1."""
        doc = self.doc
        found = {name: doc.integer(name, None) for name in
                 ("extraction_layer_index", "critic.extraction_layer_index", "extraction.layer_index")}
        n = doc.integer("critic.num_hidden_layers", None)
        found["critic.num_hidden_layers - 1"] = None if n is None else n - 1
        found = {k: v for k, v in found.items() if v is not None}
        if len(set(found.values())) > 1:
            raise doc.fail(f"the extraction layer index disagrees between fields: {found}")
        if found or not is_ar:
            return next(iter(found.values()), None)
        # Also read from top-level `extraction_layer_index` or v1 `critic.num_hidden_layers`.
        blocks = int(self.live.config(doc, "critic.extraction_layer_index").num_hidden_layers)
        return self.fill("critic.extraction_layer_index", blocks - 1,
                         "an AR keeps blocks 0..K: config.num_hidden_layers - 1")

    def _family(self, is_ar: bool) -> str:
        recorded = self.doc.string("extraction.injection_family", None)
        given = self.given_family
        if recorded is not None:
            if given is not None and given != recorded:
                raise self.doc.fail(f"extraction.injection_family: the sidecar records {recorded!r} "
                                    f"but {given!r} was given; drop the argument or fix the sidecar")
            return recorded
        if given is not None:
            return self.fill("extraction.injection_family", given, "given by the caller")
        if not self.nano:
            return "replace"  # the reference layout has one family: embedding replacement
        if is_ar:
            return self.fill("extraction.injection_family", "replace", "unused by an AR")
        raise self.doc.fail(
            "the injection family is not recorded: this is nanoNLA's layout (the checkpoint's copy "
            f"of its `kind: {DATASET_KIND}` sidecar), whose AVs use residual addition (its Karvonen "
            "checkpoints) or embedding replacement, and the wrong one gives wrong explanations "
            "without any error. Say which: injection_family='add' (CLI: --injection-family add) "
            "or 'replace'")

    def _tokens(self, is_ar: bool, av_t: str | None, ar_t: str | None, layer: int | None) -> TokenMeta:
        """``tokens:``; each id left out is computed with the checkpoint's tokenizer."""
        doc, t = self.doc, "tokens."
        char = doc.string(t + "injection_char", None)
        token_id = doc.integer(t + "injection_token_id", None)
        left = doc.integer(t + "injection_left_neighbor_id", None)
        right = doc.integer(t + "injection_right_neighbor_id", None)
        suffix = doc.ids(t + "critic_suffix_ids", None)
        if char is None:
            tok = self.live.tokenizer(doc, t + "injection_char")
            char = self.fill(t + "injection_char", select_marker(tok)[0],
                             "the first single-token character of U+3200–U+33FF")
        if token_id is None:
            tok = self.live.tokenizer(doc, t + "injection_token_id")
            token_id = self.fill(t + "injection_token_id", marker_token_id(tok, char),
                                 "the tokenizer's id of the marker")
        # The AR's truncated config cannot give a depth-% template's depth: it keeps no neighbours.
        if (left is None or right is None) and av_t is not None and not (is_ar and "{depth_pct}" in av_t):
            live_left, live_right = self._neighbors(left is None, av_t, char, layer)
            if left is None:
                left = self.fill(t + "injection_left_neighbor_id", live_left, "from the AV template")
            if right is None:
                right = self.fill(t + "injection_right_neighbor_id", live_right, "from the AV template")
        if suffix is None and is_ar:
            tok = self.live.tokenizer(doc, t + "critic_suffix_ids")
            suffix = tuple(self.fill(t + "critic_suffix_ids", critic_suffix_ids(tok, ar_t),
                                     "from the AR template"))
        return TokenMeta(char, token_id, left, right, suffix)

    def _neighbors(self, left_missing: bool, av_t: str, char: str, layer: int | None) -> tuple[int, int]:
        doc = self.doc
        missing = "tokens.injection_" + ("left" if left_missing else "right") + "_neighbor_id"
        tok = self.live.tokenizer(doc, missing)
        depth = None
        if "{depth_pct}" in av_t:
            if layer is None:
                raise doc.fail("missing required field `extraction_layer_index`: the depth-% AV "
                               "template needs it to place the marker's neighbours")
            blocks = int(self.live.config(doc, "extraction_layer_index").num_hidden_layers)
            depth = depth_percent(layer, blocks)
        return canonical_neighbors(tok, av_t, char, depth_pct=depth)


def model_sidecar_dict(sc: ModelSidecar) -> dict:
    """The released layout and key order of ``sc`` (what :func:`write_model_sidecar` writes)."""
    extraction: dict = {"injection_scale": sc.injection_scale, "mse_scale": sc.mse_scale}
    if sc.injection_family != "replace":
        extraction.update(injection_family=sc.injection_family,
                          injection_layer=sc.injection_add_layer, injection_coeff=sc.injection_add_coeff)
    if sc.reward_basis is not None:
        extraction["reward_basis"] = sc.reward_basis
    if sc.injection_centre is not None:
        extraction["injection_centre"] = sc.injection_centre
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
    has_depth = sc.av_template is not None and "{depth_pct}" in sc.av_template
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
                     check_neighbors=not (has_depth and sc.role == "ar") and sc.tokens.left_id is not None)


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
