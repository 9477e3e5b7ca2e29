"""Pre-training vs training from scratch, on the synthetic world (the paper's comparison, at toy scale).

    python bench/finetune_vs_scratch.py --out runs/bench_finetune

1. the synthetic pre-training corpus -> shards -> a short pre-training of the tiny model through
   ``deepspeed lxtrain/pretrain.py`` (with its fp32 export and the run's answer table);
2. the synthetic fine-tuning sets (VQA-style and NLVR2-style, new images of the same world);
3. for each task, two fine-tunings through ``lxtrain/finetune.py`` with the same data, steps,
   learning rate and seed: ``--init`` the pre-trained export, and ``--from-scratch`` (random
   weights, same architecture);
4. each run's best model scored by ``python -m lxtrain.evaluate`` on the held-out split.

``--pretrained-run DIR`` skips step 1 (corpus and pre-training) and starts from an existing
``pretrain.py`` run (its export, made with ``python -m lxtrain.export`` when missing), e.g. the
grounding demo's ``runs/demo_grounding/pretrain`` with ``--boxes 10 --max-objects 1`` for the task
sets of the same world.

Prints a table, writes ``OUT/summary_lr<LR>_ep<EPOCHS>.json``, and exits 1 unless pre-training beats
scratch on every task by more than two standard errors of the accuracy difference (the claim under
test). Steps already done (shards, runs) are reused when re-run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from lxtrain.synthetic.pretraining import World

REPO = Path(__file__).resolve().parent.parent
VALID_SPLIT = {"vqa": "minival", "gqa": "testdev", "nlvr2": "valid"}


def sh(command: list[str], log: Path) -> None:
    """Run a command, its output appended to ``log``; raise with the log's tail on failure."""
    print("$ " + " ".join(command), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "a") as handle:
        status = subprocess.run(
            command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env
        ).returncode
    if status:
        raise SystemExit(f"failed ({status}): see {log}\n" + "".join(log.read_text().splitlines(True)[-30:]))


def margin(pretrained: dict, scratch: dict) -> tuple[float, float]:
    """(accuracy lead of pre-trained over scratch, standard error of that difference).

    Binomial standard errors of two independent accuracies on ``count`` examples each: a lead
    of a few examples on a small validation split is noise, not a win.
    """
    a, b = pretrained["accuracy"], scratch["accuracy"]
    n = max(1, int(pretrained["count"]))
    return a - b, math.sqrt((a * (1 - a) + b * (1 - b)) / n)


def launcher(args: argparse.Namespace, script: str) -> list[str]:
    if args.ranks == 1:
        return [sys.executable, str(REPO / script)]
    return ["deepspeed", "--num_gpus", str(args.ranks), "--master_port", str(args.port), str(REPO / script)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_finetune")
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument("--boxes", type=int, default=36, help="regions per synthetic image")
    parser.add_argument("--max-objects", type=int, default=6, help="objects per synthetic image")
    parser.add_argument(
        "--pretrained-run", type=Path, help="an existing pretrain.py output directory to fine-tune from"
    )
    parser.add_argument("--pretrain-images", type=int, default=1500)
    parser.add_argument("--pretrain-epochs", type=float, default=6.0)
    parser.add_argument(
        "--recipe", default="release", help="pre-training recipe (release: QA loss always on)"
    )
    parser.add_argument("--task-images", type=int, default=400, help="QA fine-tuning training images")
    parser.add_argument("--task-sets", type=int, default=400, help="NLVR2 training statements")
    parser.add_argument("--tasks", default="vqa,nlvr2")
    parser.add_argument("--finetune-epochs", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=5e-4, help="fine-tuning peak lr (both runs)")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--port", type=int, default=29680)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    started = time.perf_counter()
    timings: dict[str, float] = {}

    world = World(
        feature_dim=args.feature_dim, boxes=args.boxes, max_objects=args.max_objects
    ).size_arguments()
    corpus = out / "corpus"
    pretrain_dir = args.pretrained_run.resolve() if args.pretrained_run else out / "pretrain"
    if args.pretrained_run and not (pretrain_dir / "export" / "model.safetensors").exists():
        sh([sys.executable, "-m", "lxtrain.export", str(pretrain_dir)], log)
    if not args.pretrained_run and not (corpus / "shards" / "train" / "index.json").exists():
        sh(
            [
                sys.executable,
                "-m",
                "lxtrain.synthetic.pretraining",
                "--out",
                str(corpus),
                "--images",
                str(args.pretrain_images),
                *world,
                "--shards",
            ],
            log,
        )
    if not (pretrain_dir / "export" / "model.safetensors").exists():
        t0 = time.perf_counter()
        sh(
            [
                *launcher(args, "lxtrain/pretrain.py"),
                "--deepspeed_config",
                str(REPO / "ds_configs" / "cpu_demo.json"),
                "--train-shards",
                str(corpus / "shards" / "train"),
                "--valid-shards",
                str(corpus / "shards" / "valid"),
                "--output-dir",
                str(pretrain_dir),
                "--model",
                "tiny",
                "--epochs",
                str(args.pretrain_epochs),
                "--recipe",
                args.recipe,
                "--log-every",
                "20",
                "--num-workers",
                "1",
                "--resume",
                "auto",
            ],
            log,
        )
        timings["pretrain_s"] = round(time.perf_counter() - t0, 1)
    pretrain_valid = json.loads((pretrain_dir / "validation.jsonl").read_text().splitlines()[-1])

    tasks_dir = out / "tasks"
    if not (tasks_dir / "shards" / "nlvr2_test" / "index.json").exists():
        sh(
            [
                sys.executable,
                "-m",
                "lxtrain.synthetic.finetuning",
                "--out",
                str(tasks_dir),
                "--images",
                str(args.task_images),
                "--sets",
                str(args.task_sets),
                *world,
                "--shards",
            ],
            log,
        )

    results: dict[str, dict] = {}
    for task in args.tasks.split(","):
        shards = tasks_dir / "shards"
        for variant in ("pretrained", "scratch"):
            run_dir = out / f"{task}_{variant}_lr{args.lr:g}_ep{args.finetune_epochs:g}"
            if not (run_dir / "best" / "model.safetensors").exists():
                t0 = time.perf_counter()
                sh(
                    [
                        *launcher(args, "lxtrain/finetune.py"),
                        "--task",
                        task,
                        "--deepspeed_config",
                        str(REPO / "ds_configs" / "cpu_finetune.json"),
                        "--init",
                        str(pretrain_dir / "export"),
                        "--train-shards",
                        str(shards / f"{task}_train"),
                        "--valid-shards",
                        str(shards / f"{task}_{VALID_SPLIT[task]}"),
                        "--output-dir",
                        str(run_dir),
                        "--epochs",
                        str(args.finetune_epochs),
                        "--lr",
                        str(args.lr),
                        "--log-every",
                        "10",
                        "--num-workers",
                        "1",
                        "--resume",
                        "auto",
                        *(["--from-scratch"] if variant == "scratch" else []),
                    ],
                    log,
                )
                timings[f"{task}_{variant}_s"] = round(time.perf_counter() - t0, 1)
            sh(
                [
                    sys.executable,
                    "-m",
                    "lxtrain.evaluate",
                    "--model",
                    str(run_dir / "best"),
                    "--shards",
                    str(shards / f"{task}_{VALID_SPLIT[task]}"),
                    "--out",
                    str(run_dir / "eval"),
                ],
                log,
            )
            results.setdefault(task, {})[variant] = json.loads(
                (run_dir / "eval" / "metrics.json").read_text()
            )["metrics"]

    source = (
        f"the run {pretrain_dir}"
        if args.pretrained_run
        else f"tiny model, {args.pretrain_images} images x {args.pretrain_epochs:g} epochs ({args.recipe} recipe)"
    )
    print(
        f"\nPre-training: {source}, step {pretrain_valid['step']}; "
        f"its validation QA accuracy {100 * pretrain_valid['acc'].get('qa', 0):.1f}%"
    )
    print(
        f"Fine-tuning: {args.finetune_epochs:g} epochs, lr {args.lr}, batch 32, same seed; best validation checkpoint"
    )
    print(f"{'task / metric':34s} {'pre-trained':>12s} {'scratch':>9s}")
    wins = True
    for task, pair in results.items():
        for metric in ("accuracy", "consistency"):
            if metric in pair["pretrained"]:
                a, b = pair["pretrained"][metric], pair["scratch"][metric]
                print(f"{task + ' ' + metric:34s} {100 * a:11.2f}% {100 * b:8.2f}%")
        for kind, value in pair["pretrained"].get("per_answer_type", {}).items():
            other = pair["scratch"]["per_answer_type"].get(kind, float("nan"))
            print(f"{'  ' + task + ' ' + kind:34s} {100 * value:11.2f}% {100 * other:8.2f}%")
        lead, noise = margin(pair["pretrained"], pair["scratch"])
        verdict = "win" if lead > 2 * noise else "tie" if lead > -2 * noise else "loss"
        print(f"{'  ' + task + ' lead':34s} {100 * lead:+11.2f} points (2 s.e. {200 * noise:.2f}): {verdict}")
        wins &= verdict == "win"
    timings["total_s"] = round(time.perf_counter() - started, 1)
    summary = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "pretrain_validation": pretrain_valid,
        "results": results,
        "timings": timings,
        "pretrained_beats_scratch": wins,
    }
    (out / f"summary_lr{args.lr:g}_ep{args.finetune_epochs:g}.json").write_text(json.dumps(summary, indent=2))
    print(f"timings: {timings}")
    print("pre-trained beats scratch on every task" if wins else "FAIL: pre-training did not beat scratch")
    return 0 if wins else 1


if __name__ == "__main__":
    sys.exit(main())
