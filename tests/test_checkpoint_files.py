"""Checkpoint directory rules that need no engine: only complete tags are ever resumed."""

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
