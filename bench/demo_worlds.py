"""Is the demo's grounding tuned to one world? The demo's recipe on other synthetic worlds.

    python bench/demo_worlds.py --out runs/worlds                 (all variants, one after another)
    python bench/demo_worlds.py --out runs/worlds_long --only b36_o2-4_d64 --epochs 15 --valid-every 328
    python bench/demo_worlds.py --out runs/worlds --report        (the table from finished runs)

Each variant is one ``python -m lxtrain.demo`` run (LXMERT and its no-vision control, through the
real ``deepspeed`` entry point) with the default ``fast`` setting's recipe as it is (release
recipe, LXMERT's own masking, init std 0.125, constant rate after warm-up, Adam with bias
correction) and only the world changed: boxes per image, salient objects per image (the other
boxes are background regions whose detector labels follow their features) and feature dimension.
The table reads each run's own ``validation.jsonl``: per variant, the first validation step at
which QA accuracy is at least ``--gap`` points above the control's at the same step ("steps to
leave the control"), and the final QA and masked object-word gaps.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lxtrain.figures import read_validation  # noqa: E402

# name -> (boxes, min objects, max objects, feature dim): between them both values of each of the
# three sizes (docs/grounding.md, "Not tuned to one world").
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "b10_o1_d64": (10, 1, 1, 64),
    "b10_o1_d2048": (10, 1, 1, 2048),
    "b36_o2-4_d64": (36, 2, 4, 64),
}


def run_variant(out: Path, name: str, args: argparse.Namespace) -> float:
    """Run the demo on one world; returns its wall time in seconds."""
    boxes, low, high, dim = VARIANTS[name]
    command = [
        sys.executable,
        "-m",
        "lxtrain.demo",
        "--out",
        str(out / name),
        "--boxes",
        str(boxes),
        "--min-objects",
        str(low),
        "--max-objects",
        str(high),
        "--feature-dim",
        str(dim),
        "--epochs",
        str(args.epochs),
        "--valid-every",
        str(args.valid_every),
        "--seed",
        str(args.seed),
        "--port",
        str(args.port),
    ]
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return time.perf_counter() - started


def gaps(run: Path, threshold: float) -> dict[str, object]:
    """Steps to leave the control and the final gaps, from one demo run's validation files."""
    model = {r["step"]: r["acc"] for r in read_validation(run / "pretrain" / "validation.jsonl")}
    control = {r["step"]: r["acc"] for r in read_validation(run / "control" / "validation.jsonl")}
    steps = sorted(set(model) & set(control))
    if not steps:
        raise SystemExit(f"{run}: no validation step common to pretrain/ and control/")
    left = next((s for s in steps if model[s]["qa"] - control[s]["qa"] >= threshold), None)
    last = steps[-1]
    return {
        "last step": last,
        "left at": left,
        "qa": (model[last]["qa"], control[last]["qa"]),
        "object words (matched)": (
            model[last].get("mlm_object_words_matched"),
            control[last].get("mlm_object_words_matched"),
        ),
        "match": (model[last].get("match"), control[last].get("match")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="one demo directory per variant under it")
    parser.add_argument("--only", nargs="*", choices=tuple(VARIANTS), help="variants to run (default: all)")
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--valid-every", type=int, default=164)
    parser.add_argument("--seed", type=int, default=9595)
    parser.add_argument("--port", type=int, default=29670)
    parser.add_argument("--gap", type=float, default=0.10, help="QA gap that counts as leaving the control")
    parser.add_argument("--report", action="store_true", help="only print the table of finished runs")
    args = parser.parse_args(argv)
    names = args.only or list(VARIANTS)
    walls = {}
    if not args.report:
        for name in names:
            walls[name] = run_variant(args.out, name, args)
    print(
        f"\n{'world':16s} {'steps':>5s} {'QA leaves control at':>20s} {'QA LXMERT / no vision':>22s} "
        f"{'object words (matched)':>23s} {'matching':>14s} {'wall':>7s}"
    )
    for name in names:
        if not (args.out / name / "control" / "validation.jsonl").exists():
            print(f"{name:16s} (not run)")
            continue
        row = gaps(args.out / name, args.gap)

        def pair(values: tuple) -> str:
            return " / ".join("-" if v is None else f"{100 * v:.1f}" for v in values)

        wall = f"{walls[name] / 60:.1f} min" if name in walls else "-"
        left = "not within budget" if row["left at"] is None else f"step {row['left at']}"
        print(
            f"{name:16s} {row['last step']:>5d} {left:>20s} {pair(row['qa']):>22s} "
            f"{pair(row['object words (matched)']):>23s} {pair(row['match']):>14s} {wall:>7s}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
