"""Figures people read: the language-to-vision attention map and the demo's validation curves.

Everything is drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas, never through
pyplot: no display is needed, and no global figure registry grows over a long training run
(pyplot keeps every figure alive until it is closed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from lxtrain import batch as B
from lxtrain.tasks.masking import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

    from lxtrain.data.index import ShardIndex

# Perceptually uniform and readable in greyscale and by most colour-blind readers: equal steps
# in attention look like equal steps in colour, which the old hand-made ramp did not.
ATTENTION_COLORMAP = "viridis"
DPI = 100
CELL_INCHES = 0.26  # one word row / one box column; fits an 8-point tick label
# The vocabulary file of the bottom-up-attention detector that made the obj36 features (one class
# a line, synonyms separated by commas, line i = class id i). The shards do not carry class names,
# so a user of the published data places this file next to the shard set's index.json.
OBJECTS_VOCAB = "objects_vocab.txt"
MASKED_BOX_MARK = "*"

# (key in a validation record's "acc", panel title), in the order the demo's summary prints them.
CURVE_METRICS: tuple[tuple[str, str], ...] = (
    ("qa", "validation QA accuracy"),
    ("mlm_object_words", "masked object-word accuracy"),
    ("match", "matching accuracy"),
)

# metric -> run label -> (steps, accuracies)
Curves = dict[str, dict[str, tuple[list[int], list[float]]]]


# ---------------------------------------------------------------------------------------------
# Rasterising


def figure_to_image(figure: Figure) -> np.ndarray:
    """Render a figure off-screen to a (3, H, W) uint8 RGB array (what ``Monitor.image`` takes)."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1))


def save_figure(figure: Figure, path: Path) -> Path:
    """Write a figure as PNG (Agg, off-screen); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Attention


def object_class_names(index: ShardIndex) -> list[str] | None:
    """Detector class names by class id for a shard set, or None where they are not known.

    Looked up in order: an ``objects_vocab.txt`` next to the set's ``index.json`` (the obj36
    detector's vocabulary; first synonym of each line), then the built-in synthetic corpus's own
    classes. The index does not name the classes, but a synthetic set is recognisable: written
    directly its inputs say ``synthetic``; converted from its TSV/JSON files it has the
    synthetic answer table, which no real corpus shares.
    """
    vocab = index.root / OBJECTS_VOCAB
    if vocab.is_file():
        return [line.split(",")[0].strip() for line in vocab.read_text().splitlines()]
    from lxtrain.synthetic.pretraining import BACKGROUND_CLASSES, OBJECT_CLASSES, all_answers

    inputs = index.raw.get("inputs", {})
    if "synthetic" in inputs or index.answers == [entry["ans"] for entry in all_answers()]:
        return [singular for singular, _ in OBJECT_CLASSES] + list(BACKGROUND_CLASSES)
    return None


def box_labels(
    class_ids: Sequence[int], class_names: Sequence[str] | None, masked: Sequence[bool] | None = None
) -> list[str]:
    """``"<box> <class name>"`` per box (``"<box> class <id>"`` without names), marked where the
    box was masked: its features were hidden from the model, so attention to it means little."""
    labels = []
    for box, class_id in enumerate(class_ids):
        known = class_names is not None and 0 <= class_id < len(class_names)
        name = class_names[class_id] if known else f"class {class_id}"
        mark = MASKED_BOX_MARK if masked is not None and masked[box] else ""
        labels.append(f"{box} {name}{mark}")
    return labels


def token_labels(seen: Sequence[str], targets: Sequence[str | None]) -> list[str]:
    """The word-pieces the model saw; at a masked-LM position whose input was changed, also the
    word it had to recover (``"[MASK] → dog"``), since ``[MASK]`` alone says nothing to a reader."""
    return [
        word if target is None or target == word else f"{word} → {target}"
        for word, target in zip(seen, targets, strict=True)
    ]


def attention_figure(
    probabilities: np.ndarray,
    words: Sequence[str],
    boxes: Sequence[str],
    title: str,
    box_axis: str = "boxes (index, detector class)",
) -> Figure:
    """A (words x boxes) attention map: word-pieces down the rows, boxes along the columns.

    The colour scale spans the map's own smallest to largest probability: early in training the
    map is close to uniform (1/boxes everywhere, 0.028 for 36 boxes), and a scale from 0 would
    paint it one flat colour. The colour bar gives the absolute values and marks the uniform level.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(words), len(boxes)):
        raise ValueError(
            f"attention of shape {probabilities.shape} needs {probabilities.shape[0]} words and "
            f"{probabilities.shape[1]} boxes, got {len(words)} and {len(boxes)}"
        )
    tokens, objects = probabilities.shape
    # The margins hold the word labels and colour bar (width), the title and the rotated box
    # labels (height); the cells get a fixed size so a longer sentence gives a taller image.
    figure = Figure(
        figsize=(3.2 + CELL_INCHES * objects, 3.0 + CELL_INCHES * tokens), dpi=DPI, layout="constrained"
    )
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    low, high = float(probabilities.min()), float(probabilities.max())
    image = axes.imshow(
        probabilities,
        cmap=ATTENTION_COLORMAP,
        vmin=low,
        vmax=max(high, low + 1e-9),  # a constant map still needs a non-empty range
        aspect="auto",
        interpolation="nearest",
    )
    axes.set_xticks(range(objects), labels=list(boxes), rotation=90, fontsize=8)
    axes.set_yticks(range(tokens), labels=list(words), fontsize=8)
    axes.set_xlabel(box_axis, fontsize=9)
    axes.set_ylabel("word-pieces (as seen → masked word)", fontsize=9)
    axes.set_title(title, fontsize=9)
    colorbar = figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
    uniform = 1.0 / objects
    colorbar.set_label(f"attention probability (uniform: 1/{objects} = {uniform:.3f})", fontsize=9)
    if low <= uniform <= high:
        colorbar.ax.axhline(uniform, color="white", linewidth=1.0)
    return figure


def language_to_vision_figure(
    batch: Mapping[str, torch.Tensor],
    attention: torch.Tensor,
    decode: Callable[[list[int]], list[str]],
    class_names: Sequence[str] | None,
    step: int,
) -> tuple[Figure, list[str]]:
    """The attention figure of one validation example, and the word-pieces it saw.

    ``attention`` is (B, H, T, O) from ``lxtrain.model.inspection``; heads are averaged. The
    example is the batch's first whose sentence describes its image (matching label 1), where
    attention from an object word to that object's box is meaningful; else the first.
    """
    matched = batch[B.MATCHED_LABELS].cpu() == 1
    row = int(matched.int().argmax()) if bool(matched.any()) else 0
    length = int(batch[B.ATTENTION_MASK][row].sum())
    heads = attention.shape[1]
    probabilities = attention[row].float().mean(0)[:length].cpu().numpy()
    seen = decode(batch[B.INPUT_IDS][row, :length].tolist())
    targets = [
        None if target == IGNORE_INDEX else decode([target])[0]
        for target in batch[B.MLM_LABELS][row, :length].tolist()
    ]
    masked = (batch[B.OBJECT_MASK][row] > 0).tolist() if B.OBJECT_MASK in batch else None
    boxes = box_labels(batch[B.OBJECT_LABELS][row].tolist(), class_names, masked)
    box_axis = "boxes (index, detector class)" if class_names is not None else "boxes (index, class id)"
    if class_names is None:
        box_axis += f": no class names (no {OBJECTS_VOCAB} next to the validation index.json)"
    if masked is not None and any(masked):
        box_axis += f"; {MASKED_BOX_MARK} = masked box"
    sentence = "sentence describes the image" if bool(matched[row]) else "mismatched sentence"
    title = (
        f"Language → vision attention, last cross-modality layer, mean of {heads} heads\n"
        f"step {step}, validation example {row} ({sentence})"
    )
    figure = attention_figure(probabilities, token_labels(seen, targets), boxes, title, box_axis)
    return figure, seen


# ---------------------------------------------------------------------------------------------
# Validation curves


def read_validation(path: Path) -> list[dict]:
    """The records of a run's ``validation.jsonl`` that its latest run stands by, in step order.

    pretrain.py appends to the file. A run resumed from a checkpoint older than its last
    validation repeats the steps after that checkpoint, and a run restarted from scratch in the
    same directory repeats them all: wherever the step drops, the records it repeats (at that
    step or later) are the earlier run's and are left out.
    """
    kept: list[dict] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        while kept and kept[-1]["step"] >= record["step"]:
            kept.pop()
        kept.append(record)
    return kept


def validation_curves(
    runs: Mapping[str, Sequence[Mapping]], metrics: Sequence[tuple[str, str]] = CURVE_METRICS
) -> Curves:
    """metric -> run label -> (steps, accuracies) from each run's validation records; a record
    without the metric (e.g. no object words given) adds no point."""
    curves: Curves = {}
    for key, _ in metrics:
        curves[key] = {}
        for label, records in runs.items():
            points = [(int(r["step"]), float(r["acc"][key])) for r in records if key in r.get("acc", {})]
            curves[key][label] = ([step for step, _ in points], [value for _, value in points])
    return curves


def curves_figure(
    curves: Curves,
    title: str,
    references: Mapping[str, tuple[float, str]] | None = None,
    metrics: Sequence[tuple[str, str]] = CURVE_METRICS,
) -> Figure:
    """One panel per metric, accuracy over validation step, one line per run.

    ``references`` maps a metric to (accuracy, label) of a baseline drawn as a dashed line
    (the majority answer for QA, chance for matching). Lines hold the accuracies as fractions;
    the axis shows them as percentages.
    """
    references = references or {}
    figure = Figure(figsize=(5.0 * len(metrics), 4.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(metrics), squeeze=False)[0]
    styles = ({"linestyle": "-", "marker": "o"}, {"linestyle": "--", "marker": "s"})
    for axes, (key, name) in zip(panels, metrics, strict=True):
        for number, (label, (steps, values)) in enumerate(curves.get(key, {}).items()):
            if steps:
                axes.plot(steps, values, label=label, markersize=3, **styles[number % len(styles)])
        if key in references:
            value, label = references[key]
            axes.axhline(value, color="grey", linestyle=":", label=label)
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("step")
        axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=8)
        else:
            axes.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axes.transAxes)
    panels[0].set_ylabel("accuracy")
    figure.suptitle(title, fontsize=11)
    return figure
