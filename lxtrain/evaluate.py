"""Score a fine-tuned model on a split and write its predictions in the task's submission format.

    python -m lxtrain.evaluate --model runs/vqa/best --shards shards/vqa_minival
    python -m lxtrain.evaluate --model runs/vqa/best --shards shards/vqa_test --out runs/vqa/test

Metrics (SPEC 4): VQA soft accuracy overall and per answer type, GQA accuracy, NLVR2 accuracy
and consistency. Written to OUT (default: ``<model>/../eval_<split>``): ``metrics.json`` (for
labelled splits) and the submission file (``vqa_submission.json``, ``gqa_submission.json``,
``nlvr2_predictions.csv``), for every split, test splits included.

A split without labels (a test split) gets predictions only: ``--metrics auto`` (default) says
so and exits 0; ``--metrics require`` exits 2 with that message (after writing predictions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lxtrain.data.finetune_shards import open_finetune_index
from lxtrain.downstream import predict, submission
from lxtrain.downstream.data import build_loader
from lxtrain.downstream.models import AnswerTableMismatch
from lxtrain.downstream.weights import load_finetuned


class EvaluationError(ValueError):
    """Input that cannot be evaluated (wrong task, answer table, features, missing labels)."""


def _check_fit(finetuned, index, model_path: str, shards: str) -> None:
    if index.task != finetuned.task:
        raise EvaluationError(
            f"{shards} holds {index.task} data but {model_path} is a {finetuned.task} model"
        )
    if index.answers != finetuned.answers:
        size = len(index.answers or [])
        differ = next(
            (
                i
                for i, (a, b) in enumerate(zip(index.answers or [], finetuned.answers or [], strict=False))
                if a != b
            ),
            None,
        )
        raise AnswerTableMismatch(
            f"{shards} was converted with an answer table of {size} answers, but {model_path}'s head has "
            f"{len(finetuned.answers or [])}"
            + (f" (first difference at id {differ})" if differ is not None else "")
            + "; convert the split with the table the model was fine-tuned on"
        )
    if index.shards.feature_dim != finetuned.config.visual_feature_dim:
        raise EvaluationError(
            f"{shards} has {index.shards.feature_dim}-d features; {model_path} expects "
            f"{finetuned.config.visual_feature_dim}-d"
        )


@torch.no_grad()
def evaluate(
    model_path: str,
    shards: str,
    out: Path,
    batch_size: int = 64,
    num_workers: int = 1,
    require_metrics: bool = False,
) -> dict:
    """Predict every example of the split; returns {"metrics" | None, "submission", "examples", ...}."""
    finetuned = load_finetuned(model_path)
    index = open_finetune_index(shards)
    _check_fit(finetuned, index, model_path, shards)
    loader = build_loader(
        index, batch_size=batch_size, rank=0, world_size=1, num_workers=num_workers, seed=0, train=False
    )
    started = time.perf_counter()
    records: list = []
    for batch in loader.epoch(0):
        logits = finetuned.model(batch)
        records += predict.batch_predictions(finetuned.task, logits, batch, finetuned.answers)
    path = submission.write_submission(finetuned.task, out, records)
    result = {
        "task": finetuned.task,
        "model": str(model_path),
        "shards": str(shards),
        "examples": len(records),
        "submission": str(path),
        "seconds": round(time.perf_counter() - started, 2),
        "metrics": None,
    }
    labelled = sum(1 for r in records if r.label is not None)
    if labelled == 0:
        message = (
            f"{shards} has no labels (a test split): accuracy cannot be computed; "
            f"predictions for {len(records)} examples written to {path}"
        )
        if require_metrics:
            raise EvaluationError(message)
        result["note"] = message
        return result
    result["metrics"] = predict.score(finetuned.task, records)
    if labelled < len(records):
        result["note"] = f"{len(records) - labelled} unlabelled example(s) left out of the metrics"
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lxtrain.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="fine-tuned model directory (RUN/best or RUN/export)")
    parser.add_argument("--shards", required=True, help="fine-tuning shard directory of the split")
    parser.add_argument("--out", type=Path, help="output directory (default: <model>/../eval_<split>)")
    parser.add_argument(
        "--metrics",
        choices=("auto", "require"),
        default="auto",
        help="require: fail (exit 2) when the split has no labels",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=1)
    args = parser.parse_args(argv)
    out = args.out or Path(args.model).resolve().parent / f"eval_{Path(args.shards).resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = evaluate(
            args.model, args.shards, out, args.batch_size, args.num_workers, args.metrics == "require"
        )
    except (EvaluationError, FileNotFoundError, ValueError) as error:
        print(f"lxtrain.evaluate: error: {error}", file=sys.stderr)
        return 2
    if result["metrics"] is not None:
        print(predict.headline(result["task"], result["metrics"]))
        print(json.dumps(result["metrics"]))
    if "note" in result:
        print(f"note: {result['note']}")
    print(f"predictions: {result['submission']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
