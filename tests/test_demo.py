"""The quick-start demo's settings reach the pre-training entry point as its parser reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from lxtrain.config import parse_args as parse_pretrain_args
from lxtrain.demo import OBJECT_WORDS, parse_args, pretrain_command


def _pretrain_config(argv: list[str], *extra: str):
    """The PretrainConfig that lxtrain/pretrain.py would build from the demo's command."""
    command = pretrain_command(Path("run"), Path("shards"), parse_args(argv), *extra)
    entry = next(i for i, part in enumerate(command) if part.endswith("pretrain.py"))
    assert command[:2] == ["deepspeed", "--num_gpus"]
    return parse_pretrain_args(command[entry + 1 :])


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
