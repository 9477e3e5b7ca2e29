"""The quick-start demo: its settings reach the pre-training entry point as its parser reads them,
and its report (summary and validation curves) shows the runs' own validation records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.image import imread

from lxtrain.config import parse_args as parse_pretrain_args
from lxtrain.demo import (
    CURVES_NAME,
    DEEPSPEED_CONFIG,
    OBJECT_WORDS,
    SETTINGS_NAME,
    claim_directory,
    main,
    parse_args,
    pretrain_command,
    report,
    write_run_files,
)
from lxtrain.engine import prepare_deepspeed_config
from lxtrain.figures import DPI, read_validation
from lxtrain.synthetic.pretraining import all_answers


def _pretrain_config(argv: list[str], *extra: str, out: Path = Path("out")):
    """The PretrainConfig that lxtrain/pretrain.py would build from the demo's command."""
    args = write_run_files(out, parse_args(argv), len(all_answers()))
    command = pretrain_command(Path("run"), Path("shards"), args, *extra)
    entry = next(i for i, part in enumerate(command) if part.endswith("pretrain.py"))
    assert command[:2] == ["deepspeed", "--num_gpus"]
    return parse_pretrain_args(command[entry + 1 :])


def test_default_setting_is_fast_with_lxmerts_masking_a_wider_init_and_a_constant_rate(tmp_path):
    config = _pretrain_config([], out=tmp_path)
    assert config.object_word_mask_probability is None  # LXMERT's masking
    assert (config.recipe, config.epochs, config.valid_every) == ("release", 2.5, 164)
    network = config.model_config(feature_dim=64, num_answers=len(all_answers()))
    assert network.initializer_range == 0.125 and network.hidden_size == 64
    deepspeed = prepare_deepspeed_config(
        config.deepspeed_config, world_size=2, total_steps=820, warmup_fraction=0.05
    )
    assert (
        deepspeed["scheduler"]["type"] == "WarmupLR" and deepspeed["optimizer"]["params"]["bias_correction"]
    )
    assert deepspeed["scheduler"]["params"]["warmup_num_steps"] == 41
    control = _pretrain_config([], "--zero-visual-input", out=tmp_path)
    assert control.zero_visual_input and control.model == config.model


def test_settings_at_berts_init_and_decay_use_the_preset_and_the_shipped_deepspeed_config(tmp_path):
    config = _pretrain_config(["--setting", "quick"], out=tmp_path)
    assert (config.model, config.deepspeed_config) == ("tiny", str(DEEPSPEED_CONFIG))
    assert not list(tmp_path.iterdir())  # nothing written


def test_grounding_setting_masks_object_words_and_its_control_sees_no_image():
    config = _pretrain_config(["--setting", "grounding"])
    assert config.object_word_mask_probability == 1.0
    assert config.object_words == OBJECT_WORDS
    assert (config.recipe, config.epochs, config.model) == ("release", 16.0, "tiny")
    assert not config.zero_visual_input
    control = _pretrain_config(["--setting", "grounding"], "--zero-visual-input")
    assert control.zero_visual_input and control.object_word_mask_probability == 1.0


@pytest.mark.parametrize(
    "argv, rate",
    [
        (["--setting", "quick"], None),  # LXMERT's masking
        (["--setting", "grounding", "--object-word-mask-probability", "0.15"], 0.15),
        (["--setting", "quick", "--object-word-mask-probability", "0.5"], 0.5),
    ],
)
def test_single_flags_override_the_setting(argv, rate):
    config = _pretrain_config(argv)
    assert config.object_word_mask_probability == rate
    assert config.object_words == OBJECT_WORDS  # reported in validation either way


def _record(step: int, qa: float, match: float, object_words: float | None) -> dict:
    """One line of validation.jsonl as pretrain.py writes it (other tasks left out)."""
    acc = {"qa": qa, "match": match, "mlm": 0.5, "obj": 0.4, "attr": 0.3}
    if object_words is not None:
        acc["mlm_object_words"] = object_words
    return {"step": step, "loss": {"qa": 1.0}, "acc": acc, "qa_acc_by_source": {}}


@pytest.fixture
def validation_files(tmp_path) -> dict[str, Path]:
    """A fabricated pair of runs' validation.jsonl; the model's file starts with the records of an
    earlier run in the same directory (pretrain.py appends), which the report must leave out."""
    model = [_record(20, 0.9, 0.9, 0.9), _record(40, 0.9, 0.9, 0.9)]  # an earlier, interrupted run
    model += [_record(20, 0.15, 0.50, 0.05), _record(40, 0.25, 0.52, None), _record(60, 0.40, 0.55, 0.20)]
    control = [_record(20, 0.14, 0.50, 0.04), _record(40, 0.18, 0.49, 0.06), _record(60, 0.21, 0.50, 0.07)]
    files = {}
    for name, records in (("pretrain", model), ("control", control)):
        (tmp_path / name).mkdir()
        files[name] = tmp_path / name / "validation.jsonl"
        files[name].write_text("".join(json.dumps(record) + "\n" for record in records))
    return files


def test_read_validation_keeps_the_latest_run_only(validation_files):
    assert [r["step"] for r in read_validation(validation_files["pretrain"])] == [20, 40, 60]
    assert [r["qa"] for r in (r["acc"] for r in read_validation(validation_files["pretrain"]))] == [
        0.15,
        0.25,
        0.40,
    ]
    assert [r["step"] for r in read_validation(validation_files["control"])] == [20, 40, 60]


def test_read_validation_of_a_resumed_run_keeps_the_steps_before_its_checkpoint(tmp_path):
    # Validated at 20, 40 and 60, checkpointed at 40, killed; resumed from 40: 60 and 80 again.
    path = tmp_path / "validation.jsonl"
    records = [_record(20, 0.1, 0.5, 0.1), _record(40, 0.2, 0.5, 0.1), _record(60, 0.3, 0.5, 0.1)]
    records += [_record(60, 0.35, 0.5, 0.1), _record(80, 0.4, 0.5, 0.1)]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    kept = read_validation(path)
    assert [(r["step"], r["acc"]["qa"]) for r in kept] == [(20, 0.1), (40, 0.2), (60, 0.35), (80, 0.4)]


def test_the_demo_resumes_with_the_same_settings_and_never_mixes_two_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    claim_directory(out, parse_args(["--out", str(out)]))  # a fresh directory: taken
    recorded = json.loads((out / SETTINGS_NAME).read_text())
    assert (recorded["setting"], recorded["seed"], recorded["boxes"]) == ("fast", 9595, 1)
    (out / "pretrain").mkdir()
    (out / "pretrain" / "validation.jsonl").write_text("{}\n")

    # The same settings (the port and the console may change): resumed, nothing deleted.
    claim_directory(out, parse_args(["--out", str(out), "--port", "1", "--verbose"]))
    assert "resuming it" in capsys.readouterr().out
    assert (out / "pretrain" / "validation.jsonl").exists()
    assert _pretrain_config([], out=out).resume == "auto"

    # Other settings: refused, naming what changed and the flags to use; nothing touched.
    with pytest.raises(SystemExit) as refused:
        main(["--out", str(out), "--seed", "1", "--boxes", "10", "--ranks", "1"])
    message = str(refused.value)
    assert "boxes 1 -> 10" in message and "seed 9595 -> 1" in message and "ranks 2 -> 1" in message
    assert "--out DIR" in message and "--overwrite" in message
    assert json.loads((out / SETTINGS_NAME).read_text()) == recorded
    assert (out / "pretrain" / "validation.jsonl").exists()

    # --overwrite deletes the earlier run's files (and only those) and takes the directory.
    (out / "notes.txt").write_text("mine")
    claim_directory(out, parse_args(["--out", str(out), "--seed", "1", "--overwrite"]))
    assert not (out / "pretrain").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / SETTINGS_NAME).read_text())["seed"] == 1


def test_a_directory_with_an_earlier_demo_but_no_settings_record_is_refused(tmp_path):
    out = tmp_path / "demo"
    (out / "control").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"control, summary.json\) without demo.json.*--overwrite"):
        claim_directory(out, parse_args(["--out", str(out)]))
    assert not (out / SETTINGS_NAME).exists()


def test_report_plots_the_validation_files_next_to_the_summary(validation_files, tmp_path, capsys):
    args = parse_args(["--setting", "quick"])
    model = read_validation(validation_files["pretrain"])
    control = read_validation(validation_files["control"])
    path, figure = report(tmp_path, args, model, control, "yes", 0.127)

    assert path == tmp_path / CURVES_NAME and path.is_file()
    printed = capsys.readouterr().out
    assert f"Validation curves: {path}" in printed
    assert "validation QA accuracy              40.0%      21.0%     12.7%" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"]["step"] == 60 and summary["control"]["acc"]["qa"] == 0.21
    pixels = imread(path)
    width, height = figure.get_size_inches() * DPI
    assert pixels.shape == (round(height), round(width), 4)

    panels = {axes.get_title(): axes for axes in figure.axes}
    assert set(panels) == {"validation QA accuracy", "masked object-word accuracy", "matching accuracy"}

    def plotted(title: str) -> dict[str, tuple[list, list]]:
        return {
            line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in panels[title].lines
        }

    # Every point from the files, the earlier run's none; a record without the metric adds none.
    qa = plotted("validation QA accuracy")
    assert qa["LXMERT"] == ([20, 40, 60], [0.15, 0.25, 0.40])
    assert qa["no vision"] == ([20, 40, 60], [0.14, 0.18, 0.21])
    assert qa["always 'yes'"][1] == [0.127, 0.127]
    words = plotted("masked object-word accuracy")
    assert words == {"LXMERT": ([20, 60], [0.05, 0.20]), "no vision": ([20, 40, 60], [0.04, 0.06, 0.07])}
    match = plotted("matching accuracy")
    assert match["LXMERT"] == ([20, 40, 60], [0.50, 0.52, 0.55])
    assert match["no vision"] == ([20, 40, 60], [0.50, 0.49, 0.50])
    assert match["chance"][1] == [0.5, 0.5]


def test_report_without_the_control_plots_one_run(validation_files, tmp_path):
    args = parse_args(["--setting", "grounding", "--no-control"])
    path, figure = report(tmp_path, args, read_validation(validation_files["pretrain"]), None, "1", 0.2)
    assert path.is_file()
    labels = {line.get_label() for axes in figure.axes for line in axes.lines}
    assert labels == {"LXMERT", "always '1'", "chance"}
    assert json.loads((tmp_path / "summary.json").read_text())["control"] is None
