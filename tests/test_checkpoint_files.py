"""Checkpoint directory rules that need no engine: only complete tags are ever resumed."""

from pathlib import Path

import pytest

from lxtrain import checkpoint


def make_tag(directory, step, complete):
    path = directory / checkpoint.tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (path / checkpoint.COMPLETE).write_text("")
    return path


def test_auto_resume_picks_the_newest_complete_tag(tmp_path):
    make_tag(tmp_path, 100, complete=True)
    make_tag(tmp_path, 200, complete=True)
    make_tag(tmp_path, 300, complete=False)  # the job died while writing this one
    (tmp_path / checkpoint.LATEST).write_text("step00000300\n")  # even if a pointer says otherwise
    assert checkpoint.find_resume_tag(tmp_path) == "step00000200"


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert checkpoint.find_resume_tag(tmp_path) is None
    assert checkpoint.find_resume_tag(tmp_path / "missing") is None
    make_tag(tmp_path, 5, complete=False)
    assert checkpoint.find_resume_tag(tmp_path) is None


def test_prune_keeps_the_last_k_and_removes_half_written(tmp_path):
    for step in (1, 2, 3, 4):
        make_tag(tmp_path, step, complete=True)
    make_tag(tmp_path, 5, complete=False)
    checkpoint._prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000003", "step00000004"]


class _FullDiskEngine:
    """Stands in for a DeepSpeed engine whose checkpoint write hits a full disk half-way."""

    def save_checkpoint(self, directory, tag, save_latest):
        import errno
        import os

        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        (Path(directory) / tag / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_save_names_the_directory_and_cause_and_leaves_nothing_resumable(tmp_path):
    make_tag(tmp_path, 2, complete=True)
    (tmp_path / checkpoint.LATEST).write_text("step00000002\n")
    with pytest.raises(checkpoint.CheckpointSaveError) as failure:
        checkpoint.save(_FullDiskEngine(), tmp_path, 4, {"step": 4}, keep_last=3)
    message = str(failure.value)
    assert str(tmp_path / "step00000004") in message and "No space left on device" in message
    assert "MiB free" in message and str(tmp_path / "step00000002") in message  # where resume continues
    assert not (tmp_path / "step00000004" / checkpoint.COMPLETE).exists()
    assert (tmp_path / checkpoint.LATEST).read_text() == "step00000002\n"
    assert checkpoint.find_resume_tag(tmp_path) == "step00000002"


# ------------------------------------------------------------------------------------------
# Identity: a checkpoint of another model or shard set is refused before DeepSpeed reads it.


def fake_index(name="train", feature_dim=32, counts=((2, 3), (1,)), url_root="/data"):
    """Stands in for lxtrain.data.index.ShardIndex: the fields the fingerprint reads."""
    from types import SimpleNamespace

    shards = [
        SimpleNamespace(
            url=f"{url_root}/{name}-{i:06d}.tar",
            name=f"{name}-{i:06d}.tar",
            images=len(per_image),
            sentences=sum(per_image),
            sentences_per_image=list(per_image),
        )
        for i, per_image in enumerate(counts)
    ]
    return SimpleNamespace(
        name=name, feature_dim=feature_dim, boxes_per_image=36, answers=["yes", "no"], shards=shards
    )


def tiny_config(**changes):
    from lxtrain.model import LxmertConfig

    values = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, visual_feature_dim=32)
    return LxmertConfig(**{**values, **changes})


class _NoLoadEngine:
    """An engine whose load must not be reached (the refusal comes first)."""

    checkpoint_engine = None

    def load_checkpoint(self, *args, **kwargs):
        raise AssertionError("DeepSpeed was asked to load a checkpoint that should have been refused")


def write_tag(directory, step, state):
    import json

    path = make_tag(directory, step, complete=True)
    (path / checkpoint.STATE).write_text(json.dumps(state))
    return path


def test_a_checkpoint_of_another_model_size_is_refused_naming_both_values(tmp_path):
    saved = checkpoint.run_identity(tiny_config(hidden_size=768, num_attention_heads=12), fake_index())
    path = write_tag(tmp_path, 4, {"step": 4, "identity": saved})
    current = checkpoint.run_identity(tiny_config(hidden_size=256), fake_index())
    with pytest.raises(ValueError) as refusal:
        checkpoint.load(_NoLoadEngine(), tmp_path, "step00000004", identity=current)
    message = str(refusal.value)
    assert str(path) in message
    assert "hidden_size=768" in message and "hidden_size=256" in message
    assert "num_attention_heads=12" in message and "num_attention_heads=4" in message
    assert "--resume none" in message and "shards" not in message.split("Fix")[0]


@pytest.mark.parametrize(
    ("field", "old", "new"),
    [("vocab_size", 30522, 1000), ("visual_feature_dim", 2048, 32), ("num_cross_layers", 5, 1)],
)
def test_vocabulary_feature_dimension_and_depth_are_part_of_the_identity(tmp_path, field, old, new):
    write_tag(tmp_path, 2, {"step": 2, "identity": checkpoint.run_identity(tiny_config(**{field: old}))})
    with pytest.raises(ValueError, match=f"{field}={old}.*{field}={new}"):
        checkpoint.load(
            _NoLoadEngine(),
            tmp_path,
            "step00000002",
            identity=checkpoint.run_identity(tiny_config(**{field: new})),
        )


def test_a_checkpoint_of_other_shards_is_refused_naming_both_shard_sets(tmp_path):
    config = tiny_config()
    write_tag(tmp_path, 2, {"step": 2, "identity": checkpoint.run_identity(config, fake_index(name="train"))})
    other = checkpoint.run_identity(config, fake_index(name="train", counts=((2, 3), (1, 1))))
    with pytest.raises(ValueError) as refusal:
        checkpoint.load(_NoLoadEngine(), tmp_path, "step00000002", identity=other)
    message = str(refusal.value)
    assert "'train' (2 shards, 3 images, 6 sentences" in message  # the checkpoint's
    assert "'train' (2 shards, 4 images, 7 sentences" in message  # this run's
    assert "--train-shards" in message


def test_the_shard_fingerprint_ignores_where_the_shards_are_read_from():
    here = checkpoint.shard_identity(fake_index(url_root="/data"))
    moved = checkpoint.shard_identity(fake_index(url_root="pipe:aws s3 cp s3://bucket"))
    assert here == moved
    assert here["fingerprint"] != checkpoint.shard_identity(fake_index(feature_dim=64))["fingerprint"]
    assert here["fingerprint"] != checkpoint.shard_identity(fake_index(name="valid"))["fingerprint"]


def test_a_fine_tuning_index_is_fingerprinted_through_its_shards_and_task():
    from types import SimpleNamespace

    inner = fake_index()
    vqa = checkpoint.shard_identity(SimpleNamespace(task="vqa", answers=["a"], shards=inner))
    gqa = checkpoint.shard_identity(SimpleNamespace(task="gqa", answers=["a"], shards=inner))
    assert vqa["images"] == 3 and vqa["fingerprint"] != gqa["fingerprint"]


class _RecordingEngine:
    """Loads nothing but says it did, to reach the end of checkpoint.load."""

    checkpoint_engine = None

    def __init__(self, stage=0, world=1):
        self.stage, self.seq_dp_world_size, self.calls = stage, world, []

    def zero_optimization_stage(self):
        return self.stage

    def load_checkpoint(self, directory, tag, **kwargs):
        self.calls.append((directory, tag))
        return directory, {}


def test_same_identity_and_a_checkpoint_without_one_load_normally(tmp_path):
    identity = checkpoint.run_identity(tiny_config(), fake_index())
    write_tag(tmp_path, 2, {"step": 2, "identity": identity})
    write_tag(tmp_path, 4, {"step": 4})  # written before identities were recorded: not checked
    for tag in ("step00000002", "step00000004"):
        engine = _RecordingEngine()
        assert checkpoint.load(engine, tmp_path, tag, identity=identity)["step"] == int(tag[-1])
        assert engine.calls == [(str(tmp_path), tag)]


def test_moving_between_zero_and_no_zero_is_refused_naming_the_stages(tmp_path):
    write_tag(
        tmp_path, 2, {"step": 2, "deepspeed": {"dp_world_size": 2, "zero_stage": 2, "precision": "fp32"}}
    )
    with pytest.raises(ValueError, match="ZeRO stage 2, this run uses ZeRO stage 0"):
        checkpoint.load(_NoLoadEngine(), tmp_path, "step00000002")


def test_moving_between_zero3_and_zero12_is_refused_naming_the_stages(tmp_path):
    # DeepSpeed 0.19.8's universal load looks for model-state files of the other layout (seen).
    write_tag(
        tmp_path, 2, {"step": 2, "deepspeed": {"dp_world_size": 2, "zero_stage": 2, "precision": "bf16"}}
    )
    with pytest.raises(ValueError, match="ZeRO stage 2, this run uses ZeRO stage 3.*ZeRO stage 2"):
        checkpoint.load(_RecordingEngine(stage=3, world=2), tmp_path, "step00000002")


def test_a_failed_universal_conversion_names_the_tag_and_the_fix(tmp_path):
    # Written on 2 ranks with ZeRO-2, resumed on 1: the conversion runs, finds no ZeRO files, fails.
    path = write_tag(
        tmp_path, 2, {"step": 2, "deepspeed": {"dp_world_size": 2, "zero_stage": 2, "precision": "fp32"}}
    )
    with pytest.raises(checkpoint.UniversalConversionError) as failure:
        checkpoint.load(_RecordingEngine(stage=2, world=1), tmp_path, "step00000002")
    message = str(failure.value)
    assert str(path) in message and "written on 2 DP rank(s) and this run has 1" in message
    assert "resume on 2 rank(s)" in message and "ds_to_universal" in message
    assert not (path / checkpoint.UNIVERSAL).exists() and not (path / ".universal.tmp").exists()
    assert not (path / "latest_universal").exists()


def test_save_records_the_writers_world_size_zero_stage_and_precision(tmp_path):
    import json

    class _Engine(_RecordingEngine):
        def save_checkpoint(self, directory, tag, save_latest):
            (Path(directory) / tag).mkdir(parents=True, exist_ok=True)

        def bfloat16_enabled(self):
            return True

    checkpoint.save(_Engine(stage=3, world=1), tmp_path, 6, {"step": 6}, keep_last=2)
    state = json.loads((tmp_path / "step00000006" / checkpoint.STATE).read_text())
    assert state["deepspeed"] == {"dp_world_size": 1, "zero_stage": 3, "precision": "bf16"}
    assert checkpoint.saved_layout(tmp_path / "step00000006", state) == (1, 3)


def test_elastic_seeds_differ_per_rank_and_repeat():
    state = {"step": 8, "config": {"seed": 3}}
    seeds = [checkpoint.elastic_seed(state, rank) for rank in range(3)]
    assert len(set(seeds)) == 3 and seeds == [checkpoint.elastic_seed(state, rank) for rank in range(3)]
    assert seeds[0] != checkpoint.elastic_seed({**state, "step": 9}, 0)


def test_a_nested_safe_load_keeps_the_enclosing_blocks_allowed_classes(tmp_path):
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    torch.save({"x": torch.ones(1)}, tmp_path / "t.pt")
    with checkpoint.weights_only_loads():
        checkpoint.safe_torch_load(tmp_path / "t.pt")
        assert LossScaler in torch.serialization.get_safe_globals()
    assert LossScaler not in torch.serialization.get_safe_globals()
