"""Export a pre-training run's checkpoint as fp32 weights in lxtrain format, after the fact.

    python -m lxtrain.export RUN_DIR                      (newest complete checkpoint -> RUN_DIR/export)
    python -m lxtrain.export RUN_DIR --tag step00001000 --out DIR

``pretrain.py`` writes this export itself when a run ends, unless it ran with ``--no-export``. Use
this for such runs, or to export an earlier checkpoint. The model's sizes come from the run's
``run_config.json``; the weights are consolidated from the (ZeRO-partitioned) DeepSpeed checkpoint
with the same weights-only loads as resuming. The result is what ``lxtrain.convert --from lxtrain``,
``finetune.py --init`` and ``lxtrain.evaluate`` read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lxtrain import checkpoint
from lxtrain.model.config import LxmertConfig


class ExportError(Exception):
    """The run directory cannot be exported; the message names the file and the fix."""


def model_config_of(run_dir: Path) -> LxmertConfig:
    """The ``LxmertConfig`` a run trained, read from its ``run_config.json``."""
    path = run_dir / "run_config.json"
    if not path.is_file():
        raise ExportError(f"{path} not found: RUN_DIR must be a pretrain.py --output-dir")
    try:
        record = json.loads(path.read_text())
        config = LxmertConfig(**record["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ExportError(
            f"{path}: no readable 'model' section ({error}); was it written by pretrain.py?"
        ) from None
    if "task" in record.get("lxtrain", {}):
        # Fine-tuning checkpoints hold a task head and no pre-training heads: not this format.
        raise ExportError(
            f"{path} is a finetune.py run; finetune.py writes its exports itself ({run_dir / 'best'}, {run_dir / 'export'})"
        )
    return config


def export_run(run_dir: Path, tag: str | None = None, destination: Path | None = None) -> Path:
    """Write ``tag`` (default: the newest complete checkpoint) of ``run_dir`` as an lxtrain export."""
    config = model_config_of(run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    tags = checkpoint.complete_tags(checkpoint_dir)
    if not tags:
        raise ExportError(f"{checkpoint_dir} holds no complete checkpoint (a {checkpoint.COMPLETE} marker)")
    if tag is None:
        tag = tags[-1]
    elif tag not in tags:
        raise ExportError(
            f"--tag {tag!r} is not a complete checkpoint in {checkpoint_dir}; have: {', '.join(tags)}"
        )
    return checkpoint.export_fp32(checkpoint_dir, tag, destination or run_dir / "export", config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lxtrain.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a pretrain.py --output-dir")
    parser.add_argument("--tag", help="checkpoint tag, e.g. step00001000 (default: the newest complete one)")
    parser.add_argument("--out", type=Path, help="destination directory (default: RUN_DIR/export)")
    args = parser.parse_args(argv)
    try:
        destination = export_run(args.run_dir, args.tag, args.out)
    except ExportError as error:
        print(f"lxtrain.export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.tag or 'the newest checkpoint'} of {args.run_dir} to {destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
