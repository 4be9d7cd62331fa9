"""Checkpoint directories: atomic save, manifest validation and fallback, recipe fingerprint,
pruning, RNG state and the data cursor."""

import json
import random

import numpy as np
import pytest
import torch

from nla_rl.checkpoint import (LATEST, MANIFEST, CheckpointError, CheckpointManager,
                               CheckpointWarning, DataCursor, RecipeMismatchError, capture_rng_state,
                               fingerprint_fields, load_data_cursor, load_rng_state,
                               newest_complete_set, read_manifest,
                               recipe_fingerprint, restore_rng_state, save_data_cursor,
                               save_rng_state)
from nla_rl.config import recipe_from_dict


def recipe(**overrides):
    return recipe_from_dict({}, [f"{k}={v}" for k, v in overrides.items()])


def payload(text="weights"):
    def write(tmp):
        (tmp / "model.bin").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "optim.bin").write_bytes(b"\x00" * 10)
    return write


@pytest.fixture
def manager(tmp_path):
    return CheckpointManager.for_recipe(tmp_path / "ckpt", recipe(), "av", keep_last=2)


# ----------------------------------------------------------------------------- fingerprint

def test_fingerprint_ignores_stages_and_steps_but_not_the_model():
    base = recipe_fingerprint(recipe(), "av")
    assert base == recipe_fingerprint(recipe(**{"run.stages": "[ar_sft, av_sft]", "av_sft.steps": 99,
                                                "av_sft.lr": 0.1, "rl.steps": 3}), "av")
    for key, value in (("model.layer_index", 1), ("model.base", "tiny:llama"),
                       ("injection.family", "add"), ("templates.av_prefill", "<explanation>"),
                       ("learner.lora_rank", 8), ("learner.backend", "deepspeed"),
                       ("injection.centre", not recipe().injection.centre)):
        assert recipe_fingerprint(recipe(**{key: value}), "av") != base, key
    assert recipe_fingerprint(recipe(), "ar") != base
    fields = fingerprint_fields(recipe(), "av")
    assert fields["model.base"] == "tiny:qwen2" and "run.stages" not in fields
    # a recipe that does not centre has the fingerprint it had before injection.centre existed
    plain = fingerprint_fields(recipe(**{"injection.centre": False, "injection.whiten": "null"}),
                               "av")
    assert "injection.centre" not in plain and "injection.whiten" not in plain
    centred = fingerprint_fields(recipe(**{"injection.centre": True, "injection.whiten": "null"}),
                                 "av")
    assert "injection.whiten" not in centred  # a centred run from before whiten existed resumes
    whitened = recipe(**{"injection.centre": True, "injection.whiten": 0.25})
    assert fingerprint_fields(whitened, "av")["injection.whiten"] == 0.25
    assert recipe_fingerprint(whitened, "av") != recipe_fingerprint(
        recipe(**{"injection.centre": True, "injection.whiten": 0.5}), "av")


# ----------------------------------------------------------------------------- save

def test_save_writes_step_dir_manifest_and_latest(manager):
    path = manager.save(7, payload(), meta={"tokens_seen": 123})
    assert path.name == "step_000007" and path.is_dir()
    assert (manager.root / LATEST).read_text() == "step_000007\n"
    manifest = read_manifest(path)
    assert manifest["complete"] is True and list(manifest)[-1] == "complete"
    assert manifest["step"] == 7 and manifest["role"] == "av" and manifest["meta"]["tokens_seen"] == 123
    assert manifest["fingerprint"] == manager.fingerprint
    assert set(manifest["files"]) == {"model.bin", "sub/optim.bin"}
    assert manifest["files"]["sub/optim.bin"]["size"] == 10
    assert len(manifest["files"]["model.bin"]["sha256"]) == 64
    assert manager.latest_valid(verify_sha256=True) == path
    assert not list(manager.root.glob(".*"))  # no staging or temp leftovers


def test_crash_inside_write_fn_leaves_no_trace(manager):
    first = manager.save(1, payload())

    def crash(tmp):
        (tmp / "model.bin").write_text("half")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError, match="killed"):
        manager.save(2, crash)
    assert manager.steps() == [1]
    assert not manager.step_path(2).exists() and not manager.staging_path(2).exists()
    assert (manager.root / LATEST).read_text() == "step_000001\n"
    assert manager.latest_valid() == first


def test_stale_staging_dir_is_ignored_and_replaced(manager):
    staging = manager.staging_path(3)
    staging.mkdir(parents=True)
    (staging / "junk.bin").write_text("from a crashed run")
    assert manager.latest_valid() is None  # a partial dir is never a checkpoint
    other = manager.staging_path(8)
    other.mkdir()
    path = manager.save(3, payload())
    assert not (path / "junk.bin").exists()
    assert not staging.exists() and not other.exists()  # crash leftovers are cleaned up


def test_saving_the_same_step_again_replaces_it(manager):
    manager.save(4, payload("old"))
    path = manager.save(4, payload("new"))
    assert (path / "model.bin").read_text() == "new"
    assert manager.latest_valid(verify_sha256=True) == path


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("damage", ["truncate", "delete_file", "no_manifest", "incomplete", "flip"])
def test_damaged_latest_falls_back_to_the_previous_valid(manager, damage):
    good = manager.save(1, payload())
    bad = manager.save(2, payload())
    if damage == "truncate":
        (bad / "model.bin").write_text("w")
    elif damage == "delete_file":
        (bad / "sub" / "optim.bin").unlink()
    elif damage == "no_manifest":
        (bad / MANIFEST).unlink()
    elif damage == "incomplete":
        manifest = json.loads((bad / MANIFEST).read_text())
        manifest["complete"] = False
        (bad / MANIFEST).write_text(json.dumps(manifest))
    else:  # same size, different bytes: only the sha256 check sees it
        (bad / "model.bin").write_text("WEIGHTS")
        assert manager.latest_valid() == bad
    with pytest.warns(CheckpointWarning, match="step_000002"):
        assert manager.latest_valid(verify_sha256=True) == good


def test_missing_latest_pointer_scans_the_step_dirs(manager):
    manager.save(1, payload())
    newest = manager.save(2, payload())
    (manager.root / LATEST).unlink()
    with pytest.warns(CheckpointWarning, match="latest"):
        assert manager.latest_valid() == newest


def test_no_checkpoint_gives_none(manager):
    assert manager.latest_valid() is None
    with pytest.warns(CheckpointWarning):
        (manager.root / "step_000005").mkdir(parents=True)
        assert manager.latest_valid() is None


def test_checkpoint_of_another_recipe_names_the_differing_fields(manager, tmp_path):
    manager.save(1, payload())
    other = CheckpointManager.for_recipe(manager.root, recipe(**{"model.layer_index": 1}), "av")
    with pytest.raises(RecipeMismatchError, match="recipe mismatch") as err:
        other.latest_valid()
    message = str(err.value)
    assert "model.layer_index: this recipe 1, checkpoint 2" in message
    assert manager.fingerprint in message and other.fingerprint in message
    assert "model.base" not in message  # only what differs
    bare = CheckpointManager(manager.root, fingerprint="0" * 16)
    with pytest.raises(RecipeMismatchError, match="no fields recorded"):
        bare.latest_valid()


# ----------------------------------------------------------------------------- complete sets

def _pair(tmp_path, keep_last=2):
    cfg = recipe()
    return {role: CheckpointManager.for_recipe(tmp_path / role, cfg, f"rl_{role}",
                                               keep_last=keep_last + (role == "ar"))
            for role in ("av", "ar")}


def test_newest_complete_set_skips_a_part_saved_ahead_of_the_others(tmp_path):
    """A crash between the AR commit and the AV commit of step 3: the pair at step 2 resumes."""
    parts = _pair(tmp_path)
    for step in (1, 2):
        parts["ar"].save(step, payload(f"ar{step}"))
        parts["av"].save(step, payload(f"av{step}"))
    parts["ar"].save(3, payload("ar3"))  # ... killed here, before the AV's step 3
    assert parts["ar"].latest_valid().name == "step_000003"
    step, paths = newest_complete_set(parts)
    assert step == 2 and {k: p.name for k, p in paths.items()} == {"av": "step_000002",
                                                                    "ar": "step_000002"}
    assert (paths["ar"] / "model.bin").read_text() == "ar2"
    # The resumed run saves step 3 again: the orphan is replaced and the pair is whole.
    parts["ar"].save(3, payload("ar3'"))
    parts["av"].save(3, payload("av3'"))
    step, paths = newest_complete_set(parts)
    assert step == 3 and (paths["ar"] / "model.bin").read_text() == "ar3'"


def test_the_ar_keeps_one_more_so_a_pair_survives_pruning_with_keep_last_1(tmp_path):
    parts = _pair(tmp_path, keep_last=1)
    for step in (1, 2):
        parts["ar"].save(step, payload())
        parts["av"].save(step, payload())
    parts["ar"].save(3, payload())  # crash before the AV's step 3
    assert parts["av"].steps() == [2] and parts["ar"].steps() == [2, 3]
    assert newest_complete_set(parts)[0] == 2


def test_newest_complete_set_skips_a_damaged_part(tmp_path):
    parts = _pair(tmp_path)
    for step in (1, 2):
        parts["ar"].save(step, payload())
        parts["av"].save(step, payload())
    (parts["av"].step_path(2) / "model.bin").write_text("torn")
    with pytest.warns(CheckpointWarning, match="step_000002"):
        assert newest_complete_set(parts)[0] == 1


def test_newest_complete_set_none_or_a_clear_error(tmp_path):
    parts = _pair(tmp_path)
    assert newest_complete_set(parts) is None
    parts["ar"].save(1, payload())  # crash inside the very first save: nothing to resume
    assert newest_complete_set(parts) is None
    parts["av"].save(2, payload())  # parts that share no step cannot be resumed together
    with pytest.raises(CheckpointError, match=r"no step has a complete set.*av: \['step_000002'\]"
                       r".*ar: \['step_000001'\].*delete"):
        newest_complete_set(parts)


# ----------------------------------------------------------------------------- pruning

def test_keep_last_prunes_old_steps_but_never_the_latest(manager):
    for step in (1, 2, 3, 4):
        manager.save(step, payload())
    assert manager.steps() == [3, 4]
    # A stale newer dir from an earlier, longer run: the just-written step is still kept.
    manager.save(9, payload())
    manager.save(5, payload())
    assert 5 in manager.steps() and (manager.root / LATEST).read_text() == "step_000005\n"
    assert manager.steps() == [5, 9]
    keep_all = CheckpointManager(manager.root, keep_last=None, fingerprint=manager.fingerprint)
    for step in (10, 11, 12):
        keep_all.save(step, payload())
    assert manager.steps() == [5, 9, 10, 11, 12]
    with pytest.raises(CheckpointError, match="keep_last"):
        CheckpointManager(manager.root, keep_last=0, fingerprint="x")


# ----------------------------------------------------------------------------- RNG state

def draws():
    return (random.random(), float(np.random.rand()), float(np.random.randn()),
            torch.rand(3).tolist(), torch.randn(2).tolist())


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    save_rng_state(tmp_path / "rng.pt")
    expected = draws()
    assert draws() != expected  # the generators moved on
    state = load_rng_state(tmp_path / "rng.pt")  # torch.load(weights_only=True) inside
    assert draws() == expected
    restore_rng_state(state)
    assert draws() == expected
    state = capture_rng_state()
    assert set(state) >= {"python", "numpy", "torch"}


# ----------------------------------------------------------------------------- data cursor

def test_data_cursor_continues_the_exact_order_after_restore(tmp_path):
    cursor = DataCursor(num_items=10, seed=5)
    first = cursor.next_indices(7)
    save_data_cursor(cursor, tmp_path / "cursor.json")
    rest = cursor.next_indices(8)  # crosses into epoch 1
    assert cursor.epoch == 1 and cursor.index == 5
    restored = load_data_cursor(tmp_path / "cursor.json", num_items=10, seed=5)
    assert restored.next_indices(8) == rest
    epoch0 = first + rest[:3]
    assert sorted(epoch0) == list(range(10))  # every row once per epoch
    assert epoch0 == DataCursor(num_items=10, seed=5).permutation(0).tolist()
    assert rest[3:] == DataCursor(num_items=10, seed=5).permutation(1)[:5].tolist()
    assert DataCursor(10, seed=6).next_indices(10) != epoch0  # the seed matters
    assert sorted(DataCursor(3, seed=0).next_indices(9)) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_data_cursor_refuses_a_changed_dataset(tmp_path):
    save_data_cursor(DataCursor(num_items=10, seed=5), tmp_path / "cursor.json")
    with pytest.raises(CheckpointError, match="num_items"):
        load_data_cursor(tmp_path / "cursor.json", num_items=11)
    with pytest.raises(CheckpointError, match="seed"):
        load_data_cursor(tmp_path / "cursor.json", seed=6)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_data_cursor(tmp_path / "bad.json")
