"""Export: the trained AV and AR as Hugging Face directories laid out like the published
checkpoints (NLA_REFERENCE §5), from training checkpoints or from finished model directories.

    <out>/av   an ordinary causal-LM directory (LoRA merged) + tokenizer + nla_meta.yaml (role av)
    <out>/ar   config with num_hidden_layers = K+1, the truncated weights, value_head.safetensors
               (one tensor ``weight``, d×d), tokenizer (right padding), nla_meta.yaml (role ar)

Both sidecars say ``stage: export`` and record where the weights came from: ``parent_checkpoints``
and ``training.export.{source, step, source_stage, config_from}``. Both directories are written so
that transformers 4.x reads them as 5 does (:func:`nla_rl.compat.make_portable`: a tokenizer class
both load, the 4.x rope fields in ``config.json``), and a tokenizer must add the BOS token it
declares (:func:`nla_rl.compat.check_bos_contract`).

Every export is *verified* before it becomes visible. The written directory is reloaded the way a
user loads it (strictly: a missing or unexpected tensor is an error) and run on fixed inputs next
to the source model: the AV's logits over its prompt and a fixed completion, with a fixed random
vector injected at the marker as the written sidecar says (family, scale, layer); the AR's
predictions for fixed explanations. A difference above ``TOLERANCE[dtype] · max(1, max|ref|)``
(a LoRA merge, checked in fp32 before the cast: ``MERGE_TOLERANCE``) is an error. Output is staged in a hidden directory beside the target and renamed into place
only after every check passed (for a pair: after both passed), so a failed export leaves the
previous output, or nothing.

A checkpoint's ``model.safetensors`` is the learner's gathered *full* state dict (peft-wrapped
names for a LoRA AV, ``ActivationReconstructor`` names for the AR). The model is rebuilt from the
init directory's config, the tensors loaded after checking names and shapes; for LoRA the adapter
is applied with the recorded settings and the merged model is checked against the unmerged one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

# quiet_transformers silences load reports: the loading info is checked here instead.
from nla_rl.ar_model import ActivationReconstructor, quiet_transformers
from nla_rl.atomic import atomic_dir
from nla_rl.checkpoint import read_manifest
from nla_rl.compat import check_bos_contract, make_portable, same_base_problem
from nla_rl.errors import NLAError
from nla_rl.injection import (CENTRE_FILE, d_model_of, inject, load_injection_centre,
                              save_injection_centre)
from nla_rl.reward_basis import BASIS_FILE
from nla_rl.sidecar import ModelSidecar, read_model_sidecar, validate_model_sidecar, write_model_sidecar
from nla_rl.templates import av_prompt_ids, depth_pct_for
from nla_rl.tokens import find_marker_positions

STAGE = "export"
MODEL_FILE = "model.safetensors"  # the gathered full weights in a checkpoint step directory
PEFT_PREFIX = "base_model.model."
# Largest |Δ| between source and export, as a fraction of max(1, max|reference|). Reloading the
# same dtype is bit-exact in practice; the margin covers a LoRA merge (fp32) and kernels.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}
MERGE_TOLERANCE = 1e-4  # fp32 (W + sBA)x vs Wx + sBAx: rounding grows with depth on real models
PROBE_SEED = 0
PROBE_COMPLETION = "<explanation>\nthe red cat sits near the river\n</explanation>"
PROBE_EXPLANATIONS = ("the red cat sits near the river", "two small birds sing in an old tree",
                      "a calm blue ocean under the sky")
_PAIR_FIELDS = ("d_model", "extraction_layer_index", "mse_scale", "ar_template")


class ExportError(NLAError):
    """An export's inputs are missing or inconsistent, or the written model failed verification."""


@dataclass(frozen=True)
class LoraSettings:
    """The AV's LoRA adapter exactly as the learner built it (the recipe's ``learner.lora_*``)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    dropout: float = 0.0

    @classmethod
    def from_learner(cls, learner) -> LoraSettings | None:
        """From a recipe's ``learner`` section; ``None`` for a full fine-tune (rank 0)."""
        if not learner.lora_rank:
            return None
        return cls(int(learner.lora_rank), float(learner.lora_alpha),
                   tuple(learner.lora_target_modules), bool(learner.use_rslora),
                   float(learner.lora_dropout))

    def apply(self, model):
        """``model`` wrapped in a peft LoRA adapter (the same LoraConfig the learner uses)."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            use_rslora=self.use_rslora, target_modules=list(self.target_modules),
                            bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, config)


@dataclass(frozen=True)
class Exported:
    """One verified export: where it is, what it came from, and how closely it matches."""

    role: str
    path: Path
    source: Path
    step: int | None
    dtype: str
    max_abs_diff: float


# ----------------------------------------------------------------------------- public API

def av_from_checkpoint(step_dir, init_dir, out_dir, *, lora: LoraSettings | None = None,
                       injection_scale: float | None = None, injection_centre=None,
                       dtype: torch.dtype | None = None) -> Exported:
    """Export the AV of checkpoint ``step_dir`` (rebuilt on ``init_dir``'s config) to ``out_dir``.

    ``lora``: the adapter settings when the checkpoint holds a LoRA-wrapped AV (merged on export).
    ``injection_scale``: the replace scale to record when ``init_dir``'s sidecar leaves it null
    (training resolved it from the data). ``injection_centre``: the file of the centre training
    resolved from the data, when ``init_dir``'s sidecar names one. ``dtype``: default the init
    directory's.
    """
    with atomic_dir(out_dir) as tmp:
        result = _export_av_checkpoint(Path(step_dir), Path(init_dir), tmp, lora=lora,
                                       injection_scale=injection_scale,
                                       injection_centre=injection_centre, dtype=dtype)
    return dataclasses.replace(result, path=Path(out_dir))


def ar_from_checkpoint(step_dir, init_dir, out_dir, *, dtype: torch.dtype | None = None) -> Exported:
    """Export the AR of checkpoint ``step_dir`` (rebuilt on ``init_dir``'s config) to ``out_dir``."""
    with atomic_dir(out_dir) as tmp:
        result = _export_ar_checkpoint(Path(step_dir), Path(init_dir), tmp, dtype=dtype)
    return dataclasses.replace(result, path=Path(out_dir))


def pair_from_checkpoints(av_step, av_init, ar_step, ar_init, out_root, *,
                          lora: LoraSettings | None = None, injection_scale: float | None = None,
                          injection_centre=None) -> tuple[Exported, Exported]:
    """Both roles from checkpoints into ``out_root/{av,ar}``; nothing is committed unless both verify."""
    check_pair(read_model_sidecar(av_init), read_model_sidecar(ar_init))
    check_same_base(Path(av_init), Path(ar_init))
    out_root = Path(out_root)
    with atomic_dir(out_root / "av") as av_tmp, atomic_dir(out_root / "ar") as ar_tmp:
        av = _export_av_checkpoint(Path(av_step), Path(av_init), av_tmp, lora=lora,
                                   injection_scale=injection_scale,
                                   injection_centre=injection_centre)
        ar = _export_ar_checkpoint(Path(ar_step), Path(ar_init), ar_tmp)
    return (dataclasses.replace(av, path=out_root / "av"), dataclasses.replace(ar, path=out_root / "ar"))


def export_pair(av_src, ar_src, out_root, *, av_injection_scale: float | None = None,
                av_injection_centre=None) -> tuple[Exported, Exported]:
    """Export two HF model directories (``*_sft/final``, ``rl/final/*``, ``init/*``) to
    ``out_root/{av,ar}``; nothing is committed unless both verify. ``av_injection_centre``: the
    centre file for an AV whose sidecar names one not beside it (an initial AV: the run's data)."""
    av_src, ar_src, out_root = Path(av_src), Path(ar_src), Path(out_root)
    av_meta, ar_meta = read_model_sidecar(av_src), read_model_sidecar(ar_src)
    _check_role(av_meta, "av", av_src)
    _check_role(ar_meta, "ar", ar_src)
    check_pair(av_meta, ar_meta)
    check_same_base(av_src, ar_src)
    with atomic_dir(out_root / "av") as av_tmp, atomic_dir(out_root / "ar") as ar_tmp:
        av = _export_av_dir(av_src, av_meta, av_tmp, injection_scale=av_injection_scale,
                            injection_centre=av_injection_centre)
        ar = _export_ar_dir(ar_src, ar_meta, ar_tmp)
    return (dataclasses.replace(av, path=out_root / "av"), dataclasses.replace(ar, path=out_root / "ar"))


def check_pair(av: ModelSidecar, ar: ModelSidecar) -> None:
    """The AV and the AR must read the same activations: same width, layer, MSE scale, marker and
    AR template (a field the AV's sidecar leaves empty is not compared). The base model is
    compared on the models themselves (:func:`check_same_base`), not on the recorded path."""
    _check_role(av, "av", "the AV source")
    _check_role(ar, "ar", "the AR source")
    pairs = [(name, getattr(av, name), getattr(ar, name)) for name in _PAIR_FIELDS]
    pairs.append(("tokens.injection_char/id", (av.tokens.char, av.tokens.token_id),
                  (ar.tokens.char, ar.tokens.token_id)))
    for name, av_value, ar_value in pairs:
        if av_value is not None and av_value != ar_value:
            raise ExportError(f"the AV and the AR do not belong together: {name} is {av_value!r} in "
                              f"the AV's sidecar but {ar_value!r} in the AR's; export a pair from "
                              "the same run (same base model and extraction layer)")


def check_same_base(av_dir: Path, ar_dir: Path) -> None:
    """The AV and AR directories must hold the same base model (config) and tokenizer."""
    from transformers import AutoConfig

    configs = [AutoConfig.from_pretrained(d, local_files_only=True) for d in (av_dir, ar_dir)]
    problem = same_base_problem(configs[0], _tokenizer(av_dir), configs[1], _tokenizer(ar_dir))
    if problem:
        raise ExportError(f"the AV ({av_dir}) and the AR ({ar_dir}) do not belong together: "
                          f"{problem}; export a pair trained from the same base model")


def export_sidecar(meta: ModelSidecar, *, source: Path, step: int | None = None,
                   config_from: Path | None = None,
                   injection_scale: float | None = None) -> ModelSidecar:
    """``meta`` restamped ``stage: export`` with provenance; a null replace scale may be resolved."""
    scale = meta.injection_scale
    if injection_scale is not None:
        if scale is not None and not math.isclose(scale, injection_scale, rel_tol=1e-6):
            raise ExportError(f"injection_scale: the source sidecar records {scale} but "
                              f"{injection_scale} was given; a trained AV keeps its scale")
        scale = float(injection_scale)
    provenance = {"source": str(source), "step": step, "source_stage": meta.stage}
    if config_from is not None:
        provenance["config_from"] = str(config_from)
    return dataclasses.replace(meta, stage=STAGE, created_at="", injection_scale=scale,
                               parent_checkpoints=(str(source),),
                               training={**meta.training, "export": provenance})


def read_checkpoint_state(step_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state dict, manifest)`` of a complete checkpoint step directory with gathered weights."""
    from safetensors.torch import load_file

    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise ExportError(f"{step_dir}: no such checkpoint directory")
    manifest = read_manifest(step_dir)
    if manifest.get("complete") is not True:
        raise ExportError(f"{step_dir}: the manifest is not marked complete (an interrupted save); "
                          "export an earlier step")
    path, entry = step_dir / MODEL_FILE, (manifest.get("files") or {}).get(MODEL_FILE)
    if entry is None or not path.is_file():
        raise ExportError(f"{step_dir}: no {MODEL_FILE} (the learner's gathered full weights) in "
                          "this checkpoint; it was not written by LearnerGroup.save")
    if path.stat().st_size != entry.get("size"):
        raise ExportError(f"{path}: {path.stat().st_size} bytes but the manifest says "
                          f"{entry.get('size')}; the checkpoint is damaged, export another step")
    return load_file(str(path)), manifest


def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Load ``state`` into ``model`` after checking names, shapes and finiteness.

    A tied alias (``lm_head.weight`` sharing the embedding's storage) may be absent when the
    tensor it shares is present; any other missing, unexpected or mis-shaped key is named.
    """
    expected = model.state_dict()
    groups: dict[tuple, list[str]] = {}
    for key, tensor in expected.items():
        if tensor.numel():
            groups.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                               tuple(tensor.shape)), []).append(key)
    covered = {k for keys in groups.values() if any(x in state for x in keys) for k in keys}
    missing = sorted(k for k in expected if k not in state and k not in covered)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(f"{k} {list(state[k].shape)} (model {list(expected[k].shape)})"
                    for k in state if k in expected and state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise ExportError(
            f"{source}: the checkpoint's tensors do not match the model built from the init config: "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}, wrong shape {_few(shapes)}. "
            "Use the init directory (and LoRA settings) the checkpoint was trained from")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ExportError(f"{source}: non-finite values in {_few(bad)}; export an earlier step")
    model.load_state_dict(state, strict=False)  # strict checks done above (tied aliases allowed)


# ----------------------------------------------------------------------------- the AV

def _export_av_checkpoint(step_dir: Path, init_dir: Path, out: Path, *, lora, injection_scale,
                          injection_centre=None, dtype=None) -> Exported:
    from transformers import AutoModelForCausalLM

    state, manifest = read_checkpoint_state(step_dir)
    wrapped = any(k.startswith(PEFT_PREFIX) for k in state)
    if wrapped != (lora is not None):
        raise ExportError(
            f"{step_dir}: the checkpoint holds {'a LoRA-wrapped' if wrapped else 'a plain'} AV but "
            f"{'no' if lora is None else 'LoRA'} settings were given; pass the recipe's "
            "learner.lora_* (LoraSettings.from_learner) exactly when the AV was trained with LoRA")
    _check_lora_recorded(lora, manifest, step_dir)
    meta, tokenizer = _checked_source(init_dir, "av")
    sidecar = export_sidecar(meta, source=step_dir, step=int(manifest["step"]),
                             config_from=init_dir, injection_scale=injection_scale)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32,
                                                     local_files_only=True, use_safetensors=True)
    if lora is not None:
        model = lora.apply(model)
    load_state_checked(model, state, step_dir / MODEL_FILE)
    model.eval()
    if lora is not None:
        unmerged = _av_probe(model, tokenizer, sidecar)
        model = model.merge_and_unload()
        _compare("the merged and the unmerged LoRA AV's logits", unmerged,
                 _av_probe(model, tokenizer, sidecar), tolerance=MERGE_TOLERANCE)
    dtype = dtype or config_dtype(init_dir)
    return _write_verified_av(cast_parameters(model, dtype), tokenizer, sidecar, out, dtype,
                              centre=_centre_of(sidecar, injection_centre, step_dir),
                              source=step_dir)


def _export_av_dir(src: Path, meta: ModelSidecar, out: Path, *, injection_scale=None,
                   injection_centre=None) -> Exported:
    _, tokenizer = _checked_source(src, "av")
    dtype = config_dtype(src)
    model = _load_av_strict(src, dtype)
    sidecar = export_sidecar(meta, source=src, injection_scale=injection_scale)
    centre_file = None
    if meta.injection_centre is not None:
        centre_file = src / meta.injection_centre
        if not centre_file.is_file() and injection_centre is not None:
            centre_file = Path(injection_centre)
    return _write_verified_av(model, tokenizer, sidecar, out, dtype, source=src,
                              centre=_centre_of(sidecar, centre_file, src))


def _centre_of(sidecar: ModelSidecar, centre_file, source: Path) -> torch.Tensor | None:
    """The injection centre an exported AV carries: the one its sidecar names, read (checked)
    from ``centre_file``; refused when the sidecar names one and no file is given."""
    if sidecar.injection_centre is None:
        return None
    if centre_file is None:
        raise ExportError(f"{source}: the AV reads centred vectors (extraction.injection_centre) "
                          "but no centre file was given; pass the run's data/"
                          f"{CENTRE_FILE}")
    return load_injection_centre(centre_file, sidecar.d_model)


def _write_verified_av(model, tokenizer, sidecar: ModelSidecar, out: Path, dtype, *,
                       source: Path, centre: torch.Tensor | None = None) -> Exported:
    model.eval()
    reference = _av_probe(model, tokenizer, sidecar)
    _write_av(model, tokenizer, sidecar, out, centre=centre)
    reloaded, reloaded_tok = _load_av_strict(out, dtype), _tokenizer(out)
    written = read_model_sidecar(out)
    validate_model_sidecar(written, reloaded_tok, reloaded.config, role="av")
    diff = _compare(f"the exported AV's logits ({out.name})", reference,
                    _av_probe(reloaded, reloaded_tok, written), dtype)
    step = (sidecar.training.get("export") or {}).get("step")
    return Exported("av", out, source, step, str(dtype).removeprefix("torch."), diff)


def _write_av(model, tokenizer, sidecar: ModelSidecar, out: Path, *,
              centre: torch.Tensor | None = None) -> None:
    """The AV layout: ``save_pretrained`` (safetensors) + tokenizer + sidecar (+ the injection
    centre its sidecar names), into ``out``."""
    with quiet_transformers():
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    make_portable(out)
    write_model_sidecar(out, sidecar)
    if centre is not None:
        save_injection_centre(centre, out / sidecar.injection_centre)


def _load_av_strict(path: Path, dtype):
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, use_safetensors=True, output_loading_info=True)
    problems = {k: sorted(map(str, info.get(k) or ())) for k in
                ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ExportError(f"{path}: the model directory does not load cleanly: "
                          + ", ".join(f"{k} {_few(v)}" for k, v in problems.items() if v))
    return model.eval()


def _av_probe(model, tokenizer, meta: ModelSidecar) -> torch.Tensor:
    """Logits [2, T, V] (fp32) of the AV prompt + a fixed completion, with two fixed random
    vectors injected at the marker (the sidecar's family; a null replace scale uses √d)."""
    layers = int(_text_config(model.config).num_hidden_layers)
    depth = depth_pct_for(meta.av_template, meta.extraction_layer_index or 0, layers)
    prompt = av_prompt_ids(tokenizer, meta.av_template, meta.tokens.char, depth_pct=depth)
    completion = tokenizer(PROBE_COMPLETION, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + completion] * 2, device=device)
    positions = find_marker_positions(ids, meta.marker, expected=2)
    d = d_model_of(model)
    vectors = torch.randn(2, d, generator=torch.Generator().manual_seed(PROBE_SEED))
    scale = None if meta.injection_family == "add" else (meta.injection_scale or math.sqrt(d))
    with torch.no_grad(), inject(model, family=meta.injection_family, vectors=vectors,
                                 positions=positions, scale=scale, layer=meta.injection_add_layer,
                                 coeff=meta.injection_add_coeff) as handle:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    if handle.applied != 2:
        raise ExportError(f"verification: {handle.applied} vectors injected for 2 probe prompts; "
                          "the sidecar's marker tokens do not match the tokenizer")
    return logits.float().cpu()


# ----------------------------------------------------------------------------- the AR

def _export_ar_checkpoint(step_dir: Path, init_dir: Path, out: Path, *, dtype=None) -> Exported:
    state, manifest = read_checkpoint_state(step_dir)
    meta, tokenizer = _checked_source(init_dir, "ar")
    sidecar = export_sidecar(meta, source=step_dir, step=int(manifest["step"]), config_from=init_dir)
    if (step_dir / BASIS_FILE).is_file():  # an RL checkpoint of an AR trained in a reward basis
        sidecar = dataclasses.replace(sidecar, reward_basis=BASIS_FILE)
    with quiet_transformers():
        ar = ActivationReconstructor.from_pretrained(init_dir, dtype=torch.float32)
    load_state_checked(ar, state, step_dir / MODEL_FILE)
    dtype = dtype or config_dtype(init_dir)
    return _write_verified_ar(cast_parameters(ar, dtype), tokenizer, sidecar, out, dtype,
                              source=step_dir)


def _export_ar_dir(src: Path, meta: ModelSidecar, out: Path) -> Exported:
    _, tokenizer = _checked_source(src, "ar")
    dtype = config_dtype(src)
    with quiet_transformers():
        ar = ActivationReconstructor.from_pretrained(src, dtype=dtype)
    return _write_verified_ar(ar, tokenizer, export_sidecar(meta, source=src), out, dtype, source=src)


def _write_verified_ar(ar, tokenizer, sidecar: ModelSidecar, out: Path, dtype, *,
                       source: Path) -> Exported:
    ar.eval()
    reference = ar.reconstruct(tokenizer, list(PROBE_EXPLANATIONS), template=sidecar.ar_template)
    _write_ar(ar, tokenizer, sidecar, out, source=source)
    with quiet_transformers():
        reloaded = ActivationReconstructor.from_pretrained(out, dtype=dtype).eval()
    reloaded_tok = _tokenizer(out)
    if reloaded_tok.padding_side != "right":
        raise ExportError(f"{out}: the AR tokenizer pads on the {reloaded_tok.padding_side}; "
                          "the published layout pads on the right")
    written = read_model_sidecar(out)
    validate_model_sidecar(written, reloaded_tok, reloaded.config, role="ar")
    predictions = reloaded.reconstruct(reloaded_tok, list(PROBE_EXPLANATIONS),
                                       template=written.ar_template)
    diff = _compare(f"the exported AR's predictions ({out.name})", reference, predictions, dtype)
    step = (sidecar.training.get("export") or {}).get("step")
    return Exported("ar", out, source, step, str(dtype).removeprefix("torch."), diff)


def _write_ar(ar, tokenizer, sidecar: ModelSidecar, out: Path, *, source: Path) -> None:
    """The AR layout (:meth:`ActivationReconstructor.save_pretrained`) + sidecar, into ``out``;
    the reward basis the sidecar names is read back (checked) and copied from ``source``."""
    from nla_rl.reward_basis import load_reward_basis

    basis = None if sidecar.reward_basis is None else load_reward_basis(
        source / sidecar.reward_basis, d_model=sidecar.d_model)

    def extra_files(d: Path) -> None:
        make_portable(d)
        write_model_sidecar(d, sidecar)
        if basis is not None:
            basis.save(d / sidecar.reward_basis)

    ar.save_pretrained(out, tokenizer, extra_files=extra_files)


# ----------------------------------------------------------------------------- helpers

def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the parameters only, in place: buffers such as the rotary ``inv_freq`` stay fp32, as
    ``from_pretrained(dtype=...)`` builds them, so the in-memory reference matches a reload."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


def config_dtype(model_dir) -> torch.dtype:
    """The dtype a model directory's config records (float32 when absent or unusual)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in TOLERANCE else torch.float32


def _checked_source(model_dir: Path, role: str):
    """(sidecar, tokenizer) of a source directory, the sidecar validated against both."""
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: not a model directory (no config.json)")
    meta = read_model_sidecar(model_dir)
    _check_role(meta, role, model_dir)
    tokenizer = _tokenizer(model_dir)
    validate_model_sidecar(meta, tokenizer, AutoConfig.from_pretrained(model_dir, local_files_only=True),
                           role=role)
    return meta, tokenizer


def _check_role(meta: ModelSidecar, role: str, where) -> None:
    if meta.role != role:
        raise ExportError(f"{where}: expected an {role.upper()} (sidecar role {role}), found role "
                          f"{meta.role}; pass the AV first and the AR second")


def _check_lora_recorded(lora: LoraSettings | None, manifest: dict, step_dir: Path) -> None:
    """The LoRA settings must match those the checkpoint's manifest recorded (when it did)."""
    fields = manifest.get("fingerprint_fields") or {}
    given = {"learner.lora_rank": lora.rank if lora else 0}
    if lora is not None:
        given.update({"learner.lora_alpha": lora.alpha, "learner.use_rslora": lora.use_rslora})
    for key, value in given.items():
        if key in fields and fields[key] != value:
            raise ExportError(f"{step_dir}: the checkpoint was trained with {key}={fields[key]!r} but "
                              f"the export was given {value!r}; use the run's recipe")


def _compare(what: str, reference: torch.Tensor, found: torch.Tensor, dtype=torch.float32, *,
             tolerance: float | None = None) -> float:
    """Max |reference - found|, or an ExportError above ``tolerance · max(1, max|reference|)``
    (default: the dtype's)."""
    if reference.shape != found.shape:
        raise ExportError(f"verification failed: {what} have shape {list(found.shape)}, "
                          f"the source's {list(reference.shape)}")
    diff = float((reference.float() - found.float()).abs().max())
    tolerance = tolerance or TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    bound = tolerance * max(1.0, float(reference.abs().max()))
    if not diff <= bound:  # also catches NaN
        raise ExportError(f"verification failed: {what} differ from the source model's by "
                          f"{diff:.3g} (tolerance {bound:.3g}); the written weights are wrong, "
                          "nothing was exported")
    return diff


def _tokenizer(model_dir: Path):
    """The directory's tokenizer, which must add the BOS token it declares (and only that)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    check_bos_contract(tokenizer, model_dir)
    return tokenizer


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _few(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{f', … ({len(items)} in all)' if len(items) > n else ''}]"



