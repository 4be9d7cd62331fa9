"""Ordinary bad files and settings get one clear error (what is wrong, how to fix it) and write
nothing: no traceback, no silent exit 0 with NaN results."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from launch.cli import main as cli
from launch.train import main as train
from nla_rl.base_model import check_context, check_model_dir, resolve_base_model
from nla_rl.config import load_recipe, recipe_from_dict
from nla_rl.data.corpus import CorpusError, read_corpus
from nla_rl.errors import ConfigError, InjectionError, NLAError
from nla_rl.inference import NLA, InferenceError, as_vectors
from nla_rl.sidecar import SidecarError, read_model_sidecar, validate_model_sidecar
from nla_rl.vectors import check_vectors
from tests.unit.test_inference import make_pair

TINY = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml")
NOT_UTF8 = b"caf\xe9 au lait\n\xff\xfe more\n"


def listing(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*")}


def refused(capsys, run, *patterns, root: Path) -> str:
    """``run()`` exits 2 with one ``error:`` line matching ``patterns`` and leaves ``root`` as
    it was."""
    before = listing(root)
    assert run() == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for pattern in patterns:
        assert pattern in err, (pattern, err)
    assert listing(root) == before
    return err


def truncated_copy(src: Path, dst: Path, keep: int = 3000) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    return dst


# ------------------------------------------------------------------------------ model files

def test_missing_or_damaged_model_directories(tmp_path, qwen, capsys):
    work = tmp_path / "work"
    work.mkdir()
    out = str(work / "v.npy")
    refused(capsys, lambda: cli(["extract", "--base", str(tmp_path / "nope"), "--layer", "1",
                                 "--text", "hi", "--out", out]),
            "--base", "no such directory", "local Hugging Face model directory", root=tmp_path)
    bad = truncated_copy(qwen.path, tmp_path / "truncated")
    refused(capsys, lambda: cli(["extract", "--base", str(bad), "--layer", "1", "--text", "hi",
                                 "--out", out]),
            "model.safetensors is truncated or not a safetensors file", "re-download",
            root=tmp_path)
    garbage = tmp_path / "garbage"
    shutil.copytree(qwen.path, garbage)
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(NLAError, match="truncated or not a safetensors file"):
        check_model_dir(garbage)
    with pytest.raises(NLAError, match="is a file"):
        check_model_dir(garbage / "config.json")
    with pytest.raises(NLAError, match="model.base.*truncated"):
        resolve_base_model(str(bad), tmp_path / "run")  # the prepare stage's base model
    assert not (tmp_path / "run").exists()


def test_a_truncated_av_is_named(tmp_path, qwen, capsys):
    av_dir, ar_dir = make_pair(tmp_path / "pair", qwen)
    bad_av = truncated_copy(av_dir, tmp_path / "bad_av")
    vectors = tmp_path / "v.npy"
    np.save(vectors, np.random.default_rng(0).normal(size=(2, qwen.d_model)).astype(np.float32))
    refused(capsys, lambda: cli(["explain", "--av", str(bad_av), "--ar", str(ar_dir),
                                 "--vectors", str(vectors), "--out", str(tmp_path / "r.jsonl")]),
            "AV:", "truncated", root=tmp_path)
    bad_ar = truncated_copy(ar_dir, tmp_path / "bad_ar")
    with pytest.raises(NLAError, match="AR:.*truncated"):
        NLA.from_pretrained(av_dir, bad_ar)


# -------------------------------------------------------------------------------- text input

def test_non_utf8_text_is_refused(tmp_path, qwen, capsys):
    text_file = tmp_path / "texts.txt"
    text_file.write_bytes(NOT_UTF8)
    refused(capsys, lambda: cli(["extract", "--base", str(qwen.path), "--layer", "1",
                                 "--text-file", str(text_file), "--out", str(tmp_path / "v.npy")]),
            "not UTF-8", "0xe9", "iconv", root=tmp_path)
    for name, data in (("corpus.txt", NOT_UTF8),
                       ("corpus.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CorpusError, match="not UTF-8 text"):
            read_corpus(tmp_path / name)


def test_whitespace_text_and_a_negative_layer(tmp_path, qwen, capsys):
    out = str(tmp_path / "v.npy")
    refused(capsys, lambda: cli(["extract", "--base", str(qwen.path), "--layer", "1",
                                 "--text", "fine", "--text", "  \t ", "--out", out]),
            "--text number [2] is empty or whitespace only", root=tmp_path)
    refused(capsys, lambda: cli(["extract", "--base", str(qwen.path), "--layer", "-1",
                                 "--text", "hi", "--out", out]),
            "--layer", "0-based", "found -1", root=tmp_path)
    refused(capsys, lambda: cli(["extract", "--base", str(qwen.path), "--layer", "9",
                                 "--text", "hi", "--out", out]),
            "Choose K in 0..3", root=tmp_path)


# ------------------------------------------------------------------------------- vector files

@pytest.fixture
def pair(tmp_path, qwen):
    return make_pair(tmp_path / "pair", qwen)


def _explain(pair, vectors: Path, *extra: str):
    av, ar = pair
    return lambda: cli(["explain", "--av", str(av), "--ar", str(ar), "--vectors", str(vectors),
                        "--max-new-tokens", "2", "--out", str(vectors.parent / "r.jsonl"), *extra])


def test_a_file_that_is_not_a_vector_file(tmp_path, pair, capsys):
    fake = tmp_path / "v.npy"
    fake.write_text("not numpy at all\n")
    err = refused(capsys, _explain(pair, fake), "is not a NumPy .npy vector file",
                  "numpy.save", root=tmp_path)
    assert "allow_pickle" not in err  # numpy's suggestion would load untrusted pickles


def test_vectors_too_large_for_float32_are_refused(tmp_path, pair, qwen, capsys):
    big = tmp_path / "big.npy"
    np.save(big, np.full((2, qwen.d_model), 1e30, dtype=np.float32))
    refused(capsys, _explain(pair, big), "rows [0, 1] are too large for float32",
            "1e+30", root=tmp_path)
    # The API and the injection path refuse them too (the norm is inf: every score NaN).
    v = torch.full((1, qwen.d_model), 1e30)
    with pytest.raises(InferenceError, match="too large"):
        as_vectors(v, qwen.d_model)
    with pytest.raises(InjectionError, match="too large"):
        check_vectors(v, qwen.d_model)
    check_vectors(torch.full((1, qwen.d_model), 1e15), qwen.d_model)  # large but finite norm


def test_no_rows_to_explain(tmp_path, pair, qwen, capsys):
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, qwen.d_model), dtype=np.float32))
    refused(capsys, _explain(pair, empty), "0 rows", root=tmp_path)
    good = tmp_path / "good.npy"
    np.save(good, np.ones((2, qwen.d_model), dtype=np.float32))
    refused(capsys, _explain(pair, good, "--limit", "0"), "--limit: expected >= 1", root=tmp_path)
    with pytest.raises(InferenceError, match="0 rows"):
        as_vectors(np.zeros((0, qwen.d_model), dtype=np.float32), qwen.d_model)


# ---------------------------------------------------------------------------------- recipes

def test_empty_recipe_and_no_stages(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    run_dir = tmp_path / "run"
    refused(capsys, lambda: train([str(empty), f"run.dir={run_dir}"]), "the recipe is empty",
            "recipes/tiny.yaml", root=tmp_path)
    refused(capsys, lambda: train([TINY, f"run.dir={run_dir}", "run.stages=[]"]),
            "run.stages: is empty", root=tmp_path)
    with pytest.raises(ConfigError, match="stages"):
        recipe_from_dict({"run": {"stages": []}})
    garbled = tmp_path / "garbled.yaml"
    garbled.write_bytes(b"run:\n  name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_recipe(garbled)


def test_run_dir_that_is_a_file_or_read_only(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "run"
    a_file.write_text("I am a file")
    refused(capsys, lambda: train([TINY, f"run.dir={a_file}"]), "run.dir", "is a file",
            root=tmp_path)
    refused(capsys, lambda: train([TINY, f"run.dir={a_file / 'sub'}"]), "which is a file",
            root=tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # chmod does not stop root (CI may run as root): the OS's answer is simulated instead.
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked
                        else real_access(p, mode))
    refused(capsys, lambda: train([TINY, f"run.dir={locked / 'run'}"]), "is not writable",
            root=tmp_path)


def test_eval_checks_it_can_write_before_scoring(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == run_dir
                        else real_access(p, mode))
    refused(capsys, lambda: cli(["eval", str(run_dir)]), "is not writable", root=tmp_path)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refused(capsys, lambda: cli(["eval", str(a_file)]), "it is a file", root=tmp_path)


def test_export_of_a_missing_dir_or_a_file(tmp_path, capsys):
    refused(capsys, lambda: cli(["export", str(tmp_path / "nope")]), "does not exist",
            "give a run directory", root=tmp_path)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refused(capsys, lambda: cli(["export", str(a_file)]), "is a file", root=tmp_path)


# ------------------------------------------------------------------------- model settings

def test_a_generation_cap_beyond_the_context(tmp_path, pair, qwen):
    config = qwen.model.config  # max_position_embeddings 1024
    check_context(config, 20, 1004, "rl.max_new_tokens")
    with pytest.raises(ConfigError, match=r"rl.max_new_tokens: 1005 new tokens after the 20-token"
                       r".*context is 1024.*set rl.max_new_tokens <= 1004"):
        check_context(config, 20, 1005, "rl.max_new_tokens")
    nla = NLA.from_pretrained(*pair)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        nla.generate(torch.ones(1, qwen.d_model), max_new_tokens=5000)


def test_a_wrong_d_model_in_the_sidecar_says_what_to_fix(pair, qwen):
    av_dir, _ = pair
    path = av_dir / "nla_meta.yaml"
    data = yaml.safe_load(path.read_text())
    data["d_model"] = qwen.d_model + 1
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SidecarError) as err:
        validate_model_sidecar(read_model_sidecar(av_dir), qwen.tokenizer, qwen.model.config)
    message = str(err.value)
    assert f"expected {qwen.d_model + 1}, found {qwen.d_model}" in message
    assert f"set d_model: {qwen.d_model} in nla_meta.yaml" in message


def test_wandb_online_without_its_key_fails_before_any_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NLA_TEST_NO_SUCH_KEY", raising=False)
    run_dir = tmp_path / "run"
    refused(capsys, lambda: train([TINY, f"run.dir={run_dir}", "run.stages=[prepare]",
                                   "wandb.enabled=true", "wandb.mode=online",
                                   "wandb.api_key_env=NLA_TEST_NO_SUCH_KEY"]),
            "NLA_TEST_NO_SUCH_KEY", "wandb.mode=offline", root=tmp_path)
    assert not run_dir.exists()


def test_inputs_the_recipe_names_are_checked_before_the_first_write(tmp_path, qwen, capsys):
    run_dir = tmp_path / "run"
    run = lambda *o: lambda: train([TINY, f"run.dir={run_dir}", *o])  # noqa: E731
    refused(capsys, run("run.stages=[prepare,datagen]", f"model.base={tmp_path / 'nope'}"),
            "model.base", "no such directory", root=tmp_path)
    bad = truncated_copy(qwen.path, tmp_path / "truncated")
    refused(capsys, run("run.stages=[prepare]", f"model.base={bad}"), "model.base",
            "truncated", root=tmp_path)
    refused(capsys, run("run.stages=[prepare]", f"model.base={qwen.path}", "model.layer_index=7"),
            "model.layer_index: 7 is beyond the depth", "0..3", root=tmp_path)
    refused(capsys, run("run.stages=[prepare,datagen]", f"data.corpus={tmp_path / 'none.txt'}"),
            "data.corpus", "does not exist", root=tmp_path)
    (tmp_path / "corpus.csv").write_text("a,b\n")
    refused(capsys, run("run.stages=[prepare,datagen]", f"data.corpus={tmp_path / 'corpus.csv'}"),
            "unknown format '.csv'", root=tmp_path)
    refused(capsys, run("run.stages=[prepare,datagen]", "data.teacher.kind=local",
                        f"data.teacher.model={tmp_path / 'no_teacher'}"),
            "data.teacher.model", "no such directory", root=tmp_path)
    assert not run_dir.exists()


def test_templates_the_recipe_names_are_checked_before_the_first_write(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run = lambda *o: lambda: train([TINY, f"run.dir={run_dir}", "run.stages=[prepare]", *o])  # noqa: E731
    refused(capsys, run("templates.av=defualt"), "templates.av", "not a known template name",
            "did you mean 'default'?", root=tmp_path)
    refused(capsys, run("templates.av=Describe {vector} <concept>{injection_char}</concept>."),
            "templates.av", "{vector}", "allowed: {injection_char}, {depth_pct}", root=tmp_path)
    refused(capsys, run("templates.av=<concept>{injection_char}</concept> {injection_char}"),
            "{injection_char} exactly once, found it 2 times", root=tmp_path)
    refused(capsys, run("templates.av=The vector <concept>{injection_char}</concept> as a set }"),
            "templates.av: is not a valid template", "{{ or }}", root=tmp_path)
    refused(capsys, run("templates.ar=Summary of the text {explanation}"),
            "templates.ar: must have text after {explanation}", root=tmp_path)
    refused(capsys, run('templates.av_prefill="<explanation>\\nThe"'), "templates.av_prefill",
            "start of '<explanation>\\n'", root=tmp_path)
    assert not run_dir.exists()


def test_an_api_teacher_without_its_key_is_refused_naming_only_the_variable(tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("NLA_TEST_TEACHER_KEY", "")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a document\n")
    run_dir = tmp_path / "run"
    teacher = [TINY, f"run.dir={run_dir}", "run.stages=[prepare,datagen]", "model.base=tiny:qwen2",
               f"data.corpus={corpus}", "data.teacher.model=gpt-x"]
    refused(capsys, lambda: train([*teacher, "data.teacher.kind=openai"]),
            "the openai teacher", "OPENAI_API_KEY (the default)", "not set or empty",
            "data.teacher.api_key_env", root=tmp_path)
    refused(capsys, lambda: train([*teacher, "data.teacher.kind=anthropic",
                                   "data.teacher.api_key_env=NLA_TEST_TEACHER_KEY"]),
            "NLA_TEST_TEACHER_KEY (data.teacher.api_key_env)", root=tmp_path)
    assert not run_dir.exists()
    from launch.train import check_teacher_key
    from nla_rl.config import TeacherConfig

    monkeypatch.setenv("NLA_TEST_TEACHER_KEY", "sk-secret-value-123")
    check_teacher_key(TeacherConfig(kind="anthropic", model="m", api_key_env="NLA_TEST_TEACHER_KEY"))
    check_teacher_key(TeacherConfig(kind="toyworld"))  # no key needed
    # the AR's own teacher is checked the same way, named by its own section
    refused(capsys, lambda: train([*teacher, "data.teacher.kind=none", "data.ar_teacher.kind=openai",
                                   "data.ar_teacher.model=gpt-ar", "toyworld.ar_p_include=null"]),
            "data.ar_teacher: the openai teacher", "OPENAI_API_KEY (the default)",
            "data.ar_teacher.api_key_env", root=tmp_path)
    assert not run_dir.exists()


def test_a_recipe_bigger_than_the_cluster_says_need_and_have(tmp_path, capsys, monkeypatch):
    import actors.cluster

    run_dir = tmp_path / "run"
    run = lambda *o: lambda: train([TINY, f"run.dir={run_dir}", *o])  # noqa: E731
    # A machine without GPUs, no Ray cluster to join: only the GPUs limit (a local cluster gets
    # the logical CPUs the recipe asks for).
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # as if no earlier test connected
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(actors.cluster, "connect_ray", lambda *a, **k: pytest.fail("joined Ray"))
    refused(capsys, run("run.stages=[ar_sft]", "learner.num_gpus_per_rank=1"),
            "ar_sft: needs 2 GPU", "learner.ranks_ar = 2 × learner.num_gpus_per_rank 1",
            "this machine has 0", "lower learner.ranks_ar or learner.num_gpus_per_rank",
            root=tmp_path)
    # A running cluster (as under ray job submit): its CPUs and GPUs both limit.
    cluster = ({"CPU": 4.0, "GPU": 1.0}, "the Ray cluster")
    monkeypatch.setattr(actors.cluster, "available_resources", lambda: cluster)
    refused(capsys, run("run.stages=[prepare,datagen]", "data.workers=16"),
            "datagen: needs 8 CPU", "data.workers 16 × data.cpus_per_worker 0.5",
            "the Ray cluster has 4", root=tmp_path)
    refused(capsys, run("run.stages=[rl]", "learner.num_gpus_per_rank=0.5"),
            "rl: needs 3 GPU", "learner.ranks_av + learner.ranks_ar = 4 × "
            "learner.num_gpus_per_rank 0.5", "engine.num_engines 1 × engine.tensor_parallel_size 1",
            "the Ray cluster has 1", root=tmp_path)
    refused(capsys, run("run.stages=[av_sft]", "learner.num_cpus_per_rank=3"),
            "av_sft: needs 6 CPU", "the Ray cluster has 4", root=tmp_path)
    assert not run_dir.exists()


def test_a_bundle_no_node_holds_is_refused_before_any_stage(tmp_path, capsys, monkeypatch):
    """On an existing cluster whose total is big enough, a colocated bundle (engine + AV rank +
    AR rank: 3 × 1 CPU) that no 2-CPU node holds is refused at launch, before prepare runs,
    naming each node; the same recipe on 4-CPU nodes passes the check."""
    import actors.cluster
    import actors.placement

    run_dir = tmp_path / "run"
    colocated = ["learner.placement=colocated", "learner.num_cpus_per_rank=1"]
    run = lambda *o: lambda: train([TINY, f"run.dir={run_dir}", *colocated, *o])  # noqa: E731
    monkeypatch.setattr(actors.cluster, "available_resources",
                        lambda: ({"CPU": 8.0}, actors.cluster.EXISTING_CLUSTER))
    small = [(f"node{i} (10.0.0.{i})", {"CPU": 2.0}) for i in range(4)]
    monkeypatch.setattr(actors.placement, "alive_nodes", lambda: small)
    refused(capsys, run(), "rl stage: one bundle needs 3 CPU on a single node",
            "Per node: node node0 (10.0.0.0): 2 CPU;", "Lower learner.num_cpus_per_rank",
            root=tmp_path)
    assert not run_dir.exists()

    from actors.cluster import check_nodes_fit
    from nla_rl.config import load_recipe

    cfg = load_recipe(TINY, colocated)
    check_nodes_fit(cfg, [(f"n{i}", {"CPU": 4.0}) for i in range(2)], gpu_engines=False)
    with pytest.raises(actors.placement.PlacementError, match="rl stage: 2 bundles need 5 CPU"):
        check_nodes_fit(cfg, [("n0", {"CPU": 4.0})], gpu_engines=False)  # 3 + 2 on one 4-CPU node
