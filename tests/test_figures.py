"""The attention figure: labels read back from the figure, colours from the rendered pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps

from lxtrain import batch as B
from lxtrain.data.index import ShardIndex
from lxtrain.figures import (
    DPI,
    OBJECTS_VOCAB,
    attention_figure,
    box_labels,
    figure_to_image,
    language_to_vision_figure,
    object_class_names,
    token_labels,
)
from lxtrain.monitor import Monitor
from lxtrain.synthetic.pretraining import BACKGROUND_CLASSES, OBJECT_CLASSES, all_answers

SYNTHETIC_NAMES = [singular for singular, _ in OBJECT_CLASSES] + list(BACKGROUND_CLASSES)


def _index(root: Path, answers: list[str], inputs: dict) -> ShardIndex:
    return ShardIndex(root, "valid", 4, 8, answers, [], {"inputs": inputs})


def _pixel(image: np.ndarray, figure, axes, column: int, row: int) -> np.ndarray:
    """The RGB of the rendered image at the centre of data cell (column, row)."""
    x, y = axes.transData.transform((column, row))
    height = image.shape[1]
    return image[:, int(round(height - y)), int(round(x))].astype(int)


def test_box_labels_name_the_class_and_mark_masked_boxes():
    assert box_labels([0, 17, 3], SYNTHETIC_NAMES, [False, True, False]) == ["0 dog", "1 grass*", "2 bus"]
    # Without names, or with an id past the vocabulary, the box says its class id.
    assert box_labels([5, 7], None) == ["0 class 5", "1 class 7"]
    assert box_labels([1, 99], ["a", "b"]) == ["0 b", "1 class 99"]


def test_token_labels_show_the_word_behind_a_changed_input():
    seen = ["[CLS]", "a", "[MASK]", "car", "cat", "[SEP]"]
    targets = [None, None, "dog", "car", "bus", None]  # masked, kept (10%), replaced (10%)
    assert token_labels(seen, targets) == ["[CLS]", "a", "[MASK] → dog", "car", "cat → bus", "[SEP]"]


def test_attention_figure_has_the_words_boxes_scale_and_colours():
    words = ["[CLS]", "the", "[MASK] → dog", "[SEP]"]
    boxes = box_labels([0, 17, 3, 16, 1], SYNTHETIC_NAMES, [False, True, False, False, False])
    probabilities = np.array(
        [
            [0.2, 0.2, 0.2, 0.2, 0.2],
            [0.1, 0.6, 0.1, 0.1, 0.1],
            [0.86, 0.02, 0.06, 0.03, 0.03],
            [0.3, 0.3, 0.2, 0.1, 0.1],
        ]
    )
    figure = attention_figure(probabilities, words, boxes, "step 7", "boxes (index, detector class)")
    axes, colorbar_axes = figure.axes
    assert [label.get_text() for label in axes.get_yticklabels()] == words
    assert [label.get_text() for label in axes.get_xticklabels()] == [
        "0 dog",
        "1 grass*",
        "2 bus",
        "3 sky",
        "4 cat",
    ]
    assert axes.get_title() == "step 7"
    assert axes.get_xlabel() == "boxes (index, detector class)"
    assert colorbar_axes.get_ylabel() == "attention probability (uniform: 1/5 = 0.200)"
    shown = axes.images[0]
    assert shown.get_cmap().name == "viridis"
    assert shown.get_clim() == (0.02, 0.86)  # the map's own range: near-uniform maps stay readable
    np.testing.assert_array_equal(shown.get_array(), probabilities)

    image = figure_to_image(figure)
    width, height = figure.get_size_inches() * DPI
    assert image.shape == (3, round(height), round(width)) and image.dtype == np.uint8
    viridis = colormaps["viridis"]
    strongest = np.round(np.array(viridis(1.0)[:3]) * 255)
    weakest = np.round(np.array(viridis(0.0)[:3]) * 255)
    # Cell (box 0, word 2) holds the largest probability, (box 1, word 2) the smallest.
    assert np.abs(_pixel(image, figure, axes, 0, 2) - strongest).max() <= 2
    assert np.abs(_pixel(image, figure, axes, 1, 2) - weakest).max() <= 2


def test_attention_figure_refuses_labels_that_do_not_fit():
    with pytest.raises(ValueError, match="needs 2 words and 3 boxes"):
        attention_figure(np.zeros((2, 3)), ["a"], ["0 x", "1 y", "2 z"], "t")


def test_class_names_from_the_vocabulary_file_the_synthetic_corpus_or_none(tmp_path):
    synthetic_answers = [entry["ans"] for entry in all_answers()]
    converted = _index(tmp_path, synthetic_answers, {"tsv": ["minival_obj36.tsv"], "json": ["x.json"]})
    assert object_class_names(converted) == SYNTHETIC_NAMES
    direct = _index(tmp_path, ["yes", "no"], {"synthetic": {"split": "minival"}})
    assert object_class_names(direct) == SYNTHETIC_NAMES
    real = _index(tmp_path, ["yes", "no", "2"], {"tsv": ["val2014_obj36.tsv"], "json": ["minival.json"]})
    assert object_class_names(real) is None
    # The detector's vocabulary beside index.json wins; line i names class i, first synonym only.
    (tmp_path / OBJECTS_VOCAB).write_text("yolk\nstop sign,stopsign\nman,men\n")
    assert object_class_names(real) == ["yolk", "stop sign", "man"]
    assert object_class_names(converted) == ["yolk", "stop sign", "man"]


def _batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Two examples: the first's sentence does not describe its image, the second's (4 tokens) does."""
    batch = {
        B.INPUT_IDS: torch.tensor([[101, 11, 12, 13, 102], [101, 21, 103, 102, 0]]),
        B.ATTENTION_MASK: torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
        B.MLM_LABELS: torch.tensor([[-100] * 5, [-100, -100, 7, -100, -100]]),
        B.MATCHED_LABELS: torch.tensor([0, 1]),
        B.OBJECT_LABELS: torch.tensor([[0, 1, 2], [3, 16, 0]]),
        B.OBJECT_MASK: torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
    }
    attention = torch.softmax(torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(0)), -1)
    return batch, attention


def test_the_logged_example_is_the_first_whose_sentence_describes_its_image():
    batch, attention = _batch()
    decode = lambda ids: [f"w{i}" for i in ids]  # noqa: E731
    figure, seen = language_to_vision_figure(batch, attention, decode, SYNTHETIC_NAMES, step=12)
    axes = figure.axes[0]
    assert seen == ["w101", "w21", "w103", "w102"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["w101", "w21", "w103 → w7", "w102"]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["0 bus", "1 sky*", "2 dog"]
    assert "example 1 (sentence describes the image)" in axes.get_title()
    assert "step 12" in axes.get_title() and "mean of 4 heads" in axes.get_title()
    assert "* = masked box" in axes.get_xlabel()
    expected = attention[1].mean(0)[:4].numpy()
    np.testing.assert_allclose(np.asarray(axes.images[0].get_array()), expected, rtol=1e-6)

    # No matching sentence in the batch: the first example, and no class names says so.
    batch[B.MATCHED_LABELS] = torch.tensor([0, 0])
    figure, seen = language_to_vision_figure(batch, attention, decode, None, step=12)
    axes = figure.axes[0]
    assert seen == ["w101", "w11", "w12", "w13", "w102"]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["0 class 0", "1 class 1", "2 class 2"]
    assert "no class names" in axes.get_xlabel()
    assert "example 0 (mismatched sentence)" in axes.get_title()


def test_monitor_writes_the_rendered_figure_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    batch, attention = _batch()
    figure, _ = language_to_vision_figure(batch, attention, lambda ids: [str(i) for i in ids], None, 3)
    monitor = Monitor(tmp_path, total_steps=10, enabled=True)
    monitor.figure("attention/language_to_vision", figure, step=3)
    monitor.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    (logged,) = events.Images("attention/language_to_vision")
    width, height = figure.get_size_inches() * DPI
    assert (logged.step, logged.width, logged.height) == (3, round(width), round(height))
    assert logged.encoded_image_string.startswith(b"\x89PNG")
    Monitor(tmp_path / "other", total_steps=10, enabled=False).figure("x", figure, 3)  # ranks > 0: nothing
    assert not (tmp_path / "other").exists()
