"""Rank-0 monitoring: TensorBoard scalars, images and figures, a console progress line, and an MFU estimate.

Every method is a no-op on ranks other than 0, so the training loop calls them unconditionally.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lxtrain.model.config import LxmertConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Dense bf16 peak of known accelerators, TFLOP/s (vendor figures, without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def training_flops_per_sample(
    config: LxmertConfig, tokens: int = 20, objects: int = 36, mask_rate: float = 0.15
) -> float:
    """Matmul FLOPs of one forward+backward (x3 of forward) of one example, heads as lxtrain runs them.

    Counts every Linear and the attention products; elementwise work is ignored, as MFU usually does.
    """
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size

    def layer(length: int, context: int) -> float:
        projections = (
            2 * length * d * d * 2 + 2 * context * d * d * 2
        )  # q, out on the queries; k, v on the context
        scores = 2 * 2 * length * context * d  # q k^T and probs v
        return projections + scores

    def ffn(length: int) -> float:
        return 2 * 2 * length * d * f

    forward = 2 * objects * (config.visual_feature_dim + config.visual_position_dim) * d
    forward += config.num_language_layers * (layer(tokens, tokens) + ffn(tokens))
    forward += config.num_object_layers * (layer(objects, objects) + ffn(objects))
    forward += config.num_cross_layers * (
        layer(tokens, objects)
        + layer(objects, tokens)
        + layer(tokens, tokens)
        + layer(objects, objects)
        + ffn(tokens)
        + ffn(objects)
    )
    forward += 2 * d * d  # pooler
    forward += mask_rate * tokens * 2 * (d * d + d * v)  # sparse MLM head
    forward += objects * 2 * d * (d + config.num_object_labels + config.num_attribute_labels)
    forward += mask_rate * objects * 2 * d * config.visual_feature_dim
    forward += 2 * (2 * d * d + 2 * d * config.num_qa_labels) + 2 * 2 * d
    return 3.0 * forward


def detect_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


class Monitor:
    def __init__(self, log_dir: Path | None, total_steps: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.writer = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
        self.started = time.monotonic()
        self.start_step: int | None = None

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def text(self, tag: str, value: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, value, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="CHW")

    def figure(self, tag: str, figure: Figure, step: int) -> None:
        """A matplotlib figure as an image, rendered off-screen (only where there is a writer)."""
        if self.writer is not None:
            # Imported here: matplotlib costs every rank start-up time, and only rank 0 draws.
            from lxtrain.figures import figure_to_image

            self.image(tag, figure_to_image(figure), step)

    def progress(
        self, step: int, epoch: float, phase: str, losses: Mapping[str, float], samples_per_s: float
    ) -> None:
        if not self.enabled:
            return
        if self.start_step is None:
            self.start_step = step
            self.started = time.monotonic()
        done = step - self.start_step
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        loss_text = " ".join(f"{name}={value:.3f}" for name, value in losses.items())
        print(
            f"step {step}/{self.total_steps} epoch {epoch:.2f} [{phase}] {loss_text} "
            f"| {samples_per_s:.1f} samples/s | ETA {_format_seconds(eta)}",
            flush=True,
        )

    def log_line(self, path: Path, record: Mapping) -> None:
        """Append one JSON record (per-step losses: what resume tests and scripts read back)."""
        if self.enabled:
            with open(path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
