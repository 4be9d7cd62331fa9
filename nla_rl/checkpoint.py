"""Training checkpoints: atomic step directories, a ``latest`` pointer, validation, pruning, and
the state that makes a resume exact (RNG states, the data cursor).

Layout under a stage's root (``runs/<name>/<stage>/``)::

    step_000120/            payload files (whatever the learner writes) + manifest.json
    step_000140/
    latest                  "step_000140\\n", replaced atomically

A step directory is assembled in a staging directory (``.step_NNNNNN.partial``) and renamed into
place only after its ``manifest.json`` (file sizes + sha256, recipe fingerprint, ``complete``) is
written, so a crash leaves either the previous state or the complete new checkpoint, never half of
one. Readers verify the manifest and fall back to the newest valid checkpoint when the latest is
damaged; a checkpoint of another recipe is refused with the fields that differ.

Several ranks writing one checkpoint (sharded state): rank 0 calls ``begin(step)``, a barrier,
every rank writes its files into ``staging_path(step)``, a barrier, rank 0 calls ``commit(step)``.
One process: ``save(step, write_fn)`` does all three.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from nla_rl.atomic import atomic_write_bytes, atomic_write_json  # noqa: F401  (re-exported)
from nla_rl.config import recipe_to_dict
from nla_rl.errors import NLAError

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = "nla_rl.checkpoint"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d{6,})")


class CheckpointError(NLAError):
    """A checkpoint cannot be written, or belongs to a different recipe."""


class RecipeMismatchError(CheckpointError):
    """A valid checkpoint written by a different recipe: resuming it would be wrong, not just
    impossible, so readers raise instead of falling back to an older checkpoint."""


class CheckpointWarning(UserWarning):
    """A damaged or partial checkpoint was skipped in favour of an older valid one."""


# ----------------------------------------------------------------------------- fingerprint

def fingerprint_fields(cfg, role: str) -> dict:
    """The recipe fields that must match to resume a ``role`` checkpoint, flattened to dotted keys.

    What the weights and optimiser state mean: the base model and layer, the injection, the
    templates, the learner's sharding and LoRA shape, and the seed (data order). Not included:
    stages, step counts, learning rates and other settings a resumed run may legitimately change.
    """
    learner = cfg.learner
    fields = {
        "role": role,
        "run.seed": cfg.run.seed,
        "model.base": cfg.model.base,
        "model.layer_index": cfg.model.layer_index,
        "model.dtype": cfg.model.dtype,
        "learner.backend": learner.backend,
        "learner.lora_rank": learner.lora_rank,
    }
    # injection.centre / whiten only when on: checkpoints written before the keys existed still
    # resume
    fields.update({f"injection.{k}": v for k, v in recipe_to_dict(cfg.injection).items()
                   if (k != "centre" or v) and (k != "whiten" or v is not None)})
    fields.update({f"templates.{k}": v for k, v in recipe_to_dict(cfg.templates).items()})
    if learner.backend == "deepspeed":  # ZeRO shards are tied to the stage and the world size
        fields["learner.zero_stage"] = learner.zero_stage
        fields["learner.ranks"] = learner.ranks_ar if role.startswith("ar") else learner.ranks_av
    if learner.lora_rank:
        fields["learner.lora_alpha"] = learner.lora_alpha
        fields["learner.use_rslora"] = learner.use_rslora
    return fields


def fingerprint_of(fields: dict) -> str:
    """A short stable hash of ``fields`` (sha256 of their canonical JSON, 16 hex digits)."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def recipe_fingerprint(cfg, role: str) -> str:
    """Hash of :func:`fingerprint_fields` ``(cfg, role)``."""
    return fingerprint_of(fingerprint_fields(cfg, role))


def _differences(expected: dict, found: dict) -> list[str]:
    keys = sorted(set(expected) | set(found))
    return [f"{k}: this recipe {expected.get(k, '<absent>')!r}, checkpoint {found.get(k, '<absent>')!r}"
            for k in keys if expected.get(k, "<absent>") != found.get(k, "<absent>")]


# ----------------------------------------------------------------------------- file helpers

def step_dir_name(step: int) -> str:
    return f"step_{int(step):06d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _payload_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(step_dir: Path) -> dict:
    """The parsed ``manifest.json`` of ``step_dir``; a CheckpointError if missing or malformed."""
    path = Path(step_dir) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read the manifest ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an nla-rl checkpoint manifest")
    return data


# ----------------------------------------------------------------------------- the manager

class CheckpointManager:
    """Saves and finds the checkpoints of one training role under ``root``.

    ``fingerprint`` identifies the recipe (:func:`recipe_fingerprint`); pass ``fingerprint_fields``
    too (or build with :meth:`for_recipe`) so that a mismatch names the differing fields.
    ``keep_last``: how many step directories to keep (``None`` keeps all).
    """

    def __init__(self, root, *, keep_last: int | None = 2, fingerprint: str,
                 fingerprint_fields: dict | None = None, role: str = ""):
        if keep_last is not None and keep_last < 1:
            raise CheckpointError(f"keep_last: expected >= 1 or None (keep all), found {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.fingerprint = fingerprint
        # As JSON would return them (tuples as lists), to compare with a manifest's fields.
        self.fields = json.loads(json.dumps(fingerprint_fields or {}, default=str))
        self.role = role or str(self.fields.get("role", ""))

    @classmethod
    def for_recipe(cls, root, cfg, role: str, *, keep_last: int | None = 2) -> CheckpointManager:
        fields = fingerprint_fields(cfg, role)
        return cls(root, keep_last=keep_last, fingerprint=fingerprint_of(fields),
                   fingerprint_fields=fields, role=role)

    # -- paths
    def step_path(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    def staging_path(self, step: int) -> Path:
        """Where the payload of ``step`` is assembled; deterministic so every rank can find it."""
        return self.root / f".{step_dir_name(step)}.partial"

    def steps(self) -> list[int]:
        """Steps that have a directory (valid or not), ascending."""
        if not self.root.is_dir():
            return []
        found = (_STEP_DIR.fullmatch(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest_pointer(self) -> Path | None:
        """The step directory ``latest`` names (it may be missing or damaged), or None."""
        try:
            name = (self.root / LATEST).read_text(encoding="utf-8").strip()
        except OSError:
            return None
        return self.root / name if _STEP_DIR.fullmatch(name) else None

    # -- writing
    def begin(self, step: int) -> Path:
        """A fresh, empty staging directory for ``step``. Leftovers of crashed saves (staging or
        moved-aside directories of any step) are deleted first: one save runs at a time per root."""
        if self.root.is_dir():
            for stale in self.root.glob(".step_*"):
                if stale.is_dir() and stale.name.endswith((".partial", ".old")):
                    shutil.rmtree(stale, ignore_errors=True)
        staging = self.staging_path(step)
        staging.mkdir(parents=True)
        return staging

    def abort(self, step: int) -> None:
        shutil.rmtree(self.staging_path(step), ignore_errors=True)

    def commit(self, step: int, *, meta: dict | None = None, hash_files: bool = True) -> Path:
        """Write the manifest of the staged payload, rename it to ``step_NNNNNN``, point ``latest``
        at it, prune old steps. ``hash_files=False`` skips sha256 (sizes are always recorded)."""
        staging = self.staging_path(step)
        if not staging.is_dir():
            raise CheckpointError(f"{staging}: nothing staged for step {step}; call begin() first")
        files = {}
        for path in _payload_files(staging):
            entry = {"size": path.stat().st_size}
            if hash_files:
                entry["sha256"] = _sha256(path)
            files[path.relative_to(staging).as_posix()] = entry
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "step": int(step), "role": self.role,
            "fingerprint": self.fingerprint, "fingerprint_fields": self.fields, "files": files,
            "meta": meta or {}, "created_at": datetime.now(timezone.utc).isoformat(),
        }
        manifest["complete"] = True  # last key: written once everything above is known
        atomic_write_json(staging / MANIFEST, manifest)
        _fsync_dir(staging)
        final = self.step_path(step)
        self._replace_dir(staging, final)
        atomic_write_bytes(self.root / LATEST, f"{final.name}\n".encode("utf-8"))
        _fsync_dir(self.root)
        self.prune(protect=final)
        return final

    def save(self, step: int, write_fn: Callable[[Path], None], *, meta: dict | None = None,
             hash_files: bool = True) -> Path:
        """Checkpoint ``step``: ``write_fn(tmp_dir)`` writes the payload files, then
        :meth:`commit`. If ``write_fn`` raises, nothing appears and ``latest`` is unchanged."""
        if step < 0:
            raise CheckpointError(f"step: expected >= 0, found {step}")
        staging = self.begin(step)
        try:
            write_fn(staging)
            return self.commit(step, meta=meta, hash_files=hash_files)
        except BaseException:
            self.abort(step)
            raise

    @staticmethod
    def _replace_dir(src: Path, dst: Path) -> None:
        """Rename ``src`` to ``dst``; an existing ``dst`` (the same step saved again after a
        resume) is moved aside first and deleted only once the new one is in place."""
        old = None
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
        os.replace(src, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def prune(self, protect: Path | None = None) -> list[Path]:
        """Delete all but the newest ``keep_last`` step directories; never ``protect`` nor the
        directory ``latest`` points to. Returns what was deleted."""
        if self.keep_last is None:
            return []
        keep = {self.latest_pointer(), protect}
        removed = []
        for step in self.steps()[:-self.keep_last]:
            path = self.step_path(step)
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    # -- reading
    def check(self, step_dir: Path, *, verify_sha256: bool = False) -> dict:
        """The manifest of ``step_dir`` if it is a complete checkpoint of this recipe.

        Raises CheckpointError, or :class:`RecipeMismatchError` when the checkpoint is valid but
        was written by a different recipe.
        """
        step_dir = Path(step_dir)
        manifest = read_manifest(step_dir)
        if manifest.get("complete") is not True:
            raise CheckpointError(f"{step_dir}: the manifest is not marked complete")
        if step_dir_name(manifest.get("step", -1)) != step_dir.name:
            raise CheckpointError(f"{step_dir}: the manifest is for step {manifest.get('step')}")
        for name, entry in manifest.get("files", {}).items():
            path = step_dir / name
            if not path.is_file() or path.stat().st_size != entry.get("size"):
                raise CheckpointError(f"{path}: missing or of the wrong size (expected "
                                      f"{entry.get('size')} bytes)")
            if verify_sha256 and "sha256" in entry and _sha256(path) != entry["sha256"]:
                raise CheckpointError(f"{path}: sha256 does not match the manifest")
        if manifest.get("fingerprint") != self.fingerprint:
            theirs = manifest.get("fingerprint_fields") or {}
            diff = _differences(self.fields, theirs) if self.fields and theirs else []
            raise RecipeMismatchError(
                f"recipe mismatch: {step_dir} was written by recipe {manifest.get('fingerprint')}, "
                f"this run is {self.fingerprint}. Differing fields: "
                f"{'; '.join(diff) if diff else 'unknown (no fields recorded to compare)'}. Resume with the "
                "recipe that wrote it, or start a fresh run directory")
        return manifest

    def latest_valid(self, *, verify_sha256: bool = False) -> Path | None:
        """The checkpoint to resume from: the one ``latest`` names if it is valid, else the newest
        valid step directory (with a :class:`CheckpointWarning` per skipped one); ``None`` if there
        is none. A checkpoint of another recipe raises CheckpointError (see :meth:`check`)."""
        pointer = self.latest_pointer()
        candidates = [pointer] if pointer is not None else []
        candidates += [self.step_path(s) for s in reversed(self.steps())
                       if self.step_path(s) != pointer]
        if pointer is None and candidates:
            warnings.warn(f"{self.root / LATEST}: missing or unreadable; scanning step directories",
                          CheckpointWarning, stacklevel=2)
        for path in candidates:
            try:
                self.check(path, verify_sha256=verify_sha256)
                return path
            except RecipeMismatchError:
                raise
            except CheckpointError as err:
                warnings.warn(f"skipping checkpoint {path.name}: {err}", CheckpointWarning,
                              stacklevel=2)
        return None

    def valid_steps(self, *, verify_sha256: bool = False) -> dict[int, Path]:
        """Every valid checkpoint by step (damaged ones skipped with a :class:`CheckpointWarning`;
        a checkpoint of another recipe raises, as in :meth:`check`)."""
        out = {}
        for step in self.steps():
            path = self.step_path(step)
            try:
                self.check(path, verify_sha256=verify_sha256)
            except RecipeMismatchError:
                raise
            except CheckpointError as err:
                warnings.warn(f"skipping checkpoint {path.name}: {err}", CheckpointWarning,
                              stacklevel=2)
                continue
            out[step] = path
        return out


def newest_complete_set(managers: dict[str, CheckpointManager], *,
                        verify_sha256: bool = False) -> tuple[int, dict[str, Path]] | None:
    """The newest step every manager has a valid checkpoint of, and those checkpoints.

    Parts of one training state saved one after the other (the RL stage commits the AR, then the
    AV with the data cursor) are only consistent at a step all of them reached: a crash between
    two commits leaves the first part one step ahead, and resuming it with the others' older step
    would mix two states. Newer parts without partners are ignored (and overwritten when the run
    saves that step again). ``None`` when some part has no checkpoint at all (a crash inside the
    first save: nothing to resume); a CheckpointError naming the steps when every part has
    checkpoints but they share no step (resuming one of them alone would be wrong).
    """
    found = {name: m.valid_steps(verify_sha256=verify_sha256) for name, m in managers.items()}
    if not all(found.values()):
        return None
    common = set.intersection(*(set(steps) for steps in found.values()))
    if not common:
        listing = "; ".join(f"{name}: {[step_dir_name(s) for s in sorted(steps)] or 'none'}"
                            for name, steps in found.items())
        roots = ", ".join(str(m.root) for m in managers.values())
        raise CheckpointError(f"no step has a complete set of checkpoints ({listing}), so the "
                              f"state cannot be resumed consistently; delete {roots} to restart "
                              f"from the beginning")
    step = max(common)
    return step, {name: found[name][step] for name in managers}


# ----------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict:
    """The global RNG states (Python ``random``, NumPy's legacy global RNG, torch CPU and every
    CUDA device) as plain ints, lists and tensors, loadable with ``torch.load(weights_only=True)``."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA only if both sides have it)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_state(path, state: dict | None = None) -> None:
    """``torch.save`` the (captured now, if not given) RNG state to ``path``, atomically."""
    buffer = io.BytesIO()
    torch.save(capture_rng_state() if state is None else state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_rng_state(path, *, restore: bool = True) -> dict:
    """Load an RNG state saved by :func:`save_rng_state` (weights-only unpickling) and, by
    default, restore it."""
    state = torch.load(path, weights_only=True)
    if restore:
        restore_rng_state(state)
    return state


# ----------------------------------------------------------------------------- data cursor

@dataclass
class DataCursor:
    """Where training is in its data: epoch ``epoch``, ``index`` items into that epoch's order.

    Each epoch visits the ``num_items`` rows in a permutation that depends only on
    ``(seed, epoch)``, so a cursor restored from its JSON continues with exactly the rows the
    interrupted run would have drawn next.
    """

    num_items: int
    seed: int
    epoch: int = 0
    index: int = 0

    def __post_init__(self):
        if self.num_items < 1:
            raise CheckpointError(f"DataCursor: num_items must be >= 1, found {self.num_items}")
        if not 0 <= self.index <= self.num_items or self.epoch < 0:
            raise CheckpointError(f"DataCursor: epoch {self.epoch}, index {self.index} is outside "
                                  f"0..{self.num_items}")

    def permutation(self, epoch: int | None = None) -> np.ndarray:
        """The visiting order of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def next_indices(self, n: int) -> list[int]:
        """The next ``n`` row indices, continuing into the next epoch(s) when one ends."""
        out: list[int] = []
        while len(out) < n:
            if self.index == self.num_items:
                self.epoch, self.index = self.epoch + 1, 0
            take = min(n - len(out), self.num_items - self.index)
            out += self.permutation()[self.index:self.index + take].tolist()
            self.index += take
        return out

    def state_dict(self) -> dict:
        return {"num_items": self.num_items, "seed": self.seed, "epoch": self.epoch,
                "index": self.index}


def save_data_cursor(cursor: DataCursor, path) -> None:
    """Write ``cursor`` as JSON, atomically."""
    atomic_write_json(Path(path), cursor.state_dict())


def load_data_cursor(path, *, num_items: int | None = None, seed: int | None = None) -> DataCursor:
    """Read a cursor; if ``num_items`` / ``seed`` are given they must match the saved ones (a
    different dataset or seed would silently change the data order)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        cursor = DataCursor(**{k: int(data[k]) for k in ("num_items", "seed", "epoch", "index")})
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot read the data cursor ({err!r})") from None
    for name, expected in (("num_items", num_items), ("seed", seed)):
        if expected is not None and getattr(cursor, name) != expected:
            raise CheckpointError(f"{path}: data cursor {name} is {getattr(cursor, name)} but this "
                                  f"run has {expected}; the dataset or seed changed since the "
                                  "checkpoint, so its data order cannot be continued")
    return cursor
