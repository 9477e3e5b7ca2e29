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
