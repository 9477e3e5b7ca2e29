"""The quick start: synthetic corpus -> shards -> DeepSpeed pre-training on CPU -> a summary of learning.

    python -m lxtrain.demo                         (or: make demo; ~10 minutes on 2 cores)
    python -m lxtrain.demo --setting quick         (the former default: no grounding yet)
    python -m lxtrain.demo --setting grounding     (or: make demo-grounding; ~50 minutes on 2 cores)

Two pre-training runs on the built-in synthetic corpus, through the real entry point and the
``deepspeed`` launcher: the model as it is, and a control whose object features and boxes are
all zeros (the paper's language-only comparison). The summary compares their validation QA
accuracy and masked object-word accuracy with the majority-answer baseline, and
``validation_curves.png`` beside ``summary.json`` plots them (and matching accuracy) at every
validation step. What the model learns is only learnable by looking at the image, so the gap is
the evidence of grounding.

Settings (``--setting``; single flags override them):

- ``fast`` (the default): 3,000 images in a clear world (one object, one box, 64-d features:
  nothing to search for, the image's one region is the object), 2.5 epochs (820 steps) of the
  release recipe with LXMERT's own masking, the tiny preset initialised at std 0.125 instead of
  BERT's 0.02 (``--init-range``; 1/sqrt(hidden) for hidden 64, where 0.02 shrinks every signal
  that crosses a weight matrix to ~0.16x and the cross-modal paths start on a long plateau), and
  a constant learning rate after the 5% warm-up (``--schedule constant``) with Adam's bias
  correction (``--bias-correction``; LXMERT's BertAdam has none). QA and masked object
  words pull away from the control within ~10 minutes on 2 cores (docs/grounding.md).
- ``quick``: 800 images in the hard world (36 boxes, up to 6 objects, 256-d features), 4 epochs
  of the paper recipe at BERT's init and the decaying schedule (the default before the ``fast``
  setting). Shows the pipeline training and the visual stream in use (detected labels), not yet
  grounding: 340 steps are far too few for the tiny model at that init (docs/grounding.md).
- ``grounding``: 3,000 images with one object among 10 boxes and 64-d features, 16 epochs
  (~5,200 steps) of the release recipe (QA on throughout), with object words masked at rate 1.0
  (``--object-word-mask-probability``, an extension of LXMERT's uniform 15% masking; other words
  keep 15%). Enough for the tiny model to leave its plateaus: masked object words and QA pull far
  away from the control (README, Quick start). ``--object-word-mask-probability 0.15`` gives
  LXMERT's masking exactly; then only QA grounds within this budget (docs/grounding.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from matplotlib.figure import Figure

from lxtrain.config import MODEL_PRESET_SIZES
from lxtrain.data.index import open_index
from lxtrain.data.shard_format import decode_sample, iter_shard
from lxtrain.figures import curves_figure, read_validation, save_figure, validation_curves
from lxtrain.model.config import LxmertConfig
from lxtrain.synthetic.pretraining import World

REPO = Path(__file__).resolve().parent.parent
# Named demo settings: the world (synthetic corpus) and the pre-training budget.
# object_word_mask_probability: None is LXMERT's masking (every word at 15%). init_range: None
# keeps the preset's (BERT's 0.02). schedule: "decay" is ds_configs/cpu_demo.json as it is (linear
# warm-up, linear decay to 0), "constant" the same warm-up and then the peak rate to the end.
# bias_correction: Adam's bias correction; False is ds_configs/cpu_demo.json's (LXMERT's BertAdam has
# none, which makes the first few hundred steps up to ~5x larger than the rate says: at the wider
# init the fast setting uses, masked LM then stalls near 20% in 650 steps instead of reaching ~80%).
# valid_every: 0 validates at epoch ends only.
DEMO_SETTINGS: dict[str, dict[str, object]] = {
    "fast": dict(
        images=3000,
        feature_dim=64,
        boxes=1,
        min_objects=1,
        max_objects=1,
        epochs=2.5,
        recipe="release",
        object_word_mask_probability=None,
        init_range=0.125,
        schedule="constant",
        bias_correction=True,
        valid_every=164,
    ),
    "quick": dict(
        images=800,
        feature_dim=256,
        boxes=36,
        min_objects=1,
        max_objects=6,
        epochs=4.0,
        recipe="paper",
        object_word_mask_probability=None,
        init_range=None,
        schedule="decay",
        bias_correction=False,
        valid_every=0,
    ),
    "grounding": dict(
        images=3000,
        feature_dim=64,
        boxes=10,
        min_objects=1,
        max_objects=1,
        epochs=16.0,
        recipe="release",
        object_word_mask_probability=1.0,
        init_range=None,
        schedule="decay",
        bias_correction=False,
        valid_every=0,
    ),
}
DEFAULT_SETTING = "fast"
DEEPSPEED_CONFIG = REPO / "ds_configs" / "cpu_demo.json"
# The PNG of the validation curves, written next to summary.json.
CURVES_NAME = "validation_curves.png"
# The settings a demo directory was started with: a rerun with the same ones resumes, others are refused.
SETTINGS_NAME = "demo.json"
# The DeepSpeed JSON a setting writes next to the summary (write_run_files) when it changes the shipped one.
RUN_DEEPSPEED_NAME = "deepspeed.json"
# What a demo run writes into its directory (all of it goes with --overwrite).
RUN_ARTEFACTS = (
    "corpus",
    "pretrain",
    "control",
    "summary.json",
    CURVES_NAME,
    SETTINGS_NAME,
    RUN_DEEPSPEED_NAME,
)
# Flags that do not change what the two runs compute: a rerun may change them and still resume.
# (--ranks is a setting: training would resume exactly on another count, docs/elastic.md, but
# validation splits its masks per rank, so one curve would mix two validation sets.)
NOT_SETTINGS = frozenset({"out", "port", "verbose", "no_control", "overwrite"})
# Launcher output kept off the console (still in RUN/logs/launcher.log): DeepSpeed's log lines
# below ERROR, from the launcher processes and the ranks' import-time lines, and the line its op
# builder prints. ERROR lines, tracebacks and lxtrain's own lines do not match.
LIBRARY_LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(DEBUG|INFO|WARNING)\]|^DeepSpeed \S+ built successfully$"
)
OBJECT_WORDS = "dog,cat,car,bus,horse,bird,chair,cup,ball,boat,truck,cow,bike,tree,table,bottle"


def majority_baseline(valid_shards: Path) -> tuple[str, float]:
    """The single most common answer and its expected accuracy on the validation QA targets."""
    index = open_index(valid_shards)
    weights: Counter[str] = Counter()
    shares: list[dict[str, float]] = []
    for shard in index.shards:
        for key, members in iter_shard(shard.path):
            sample = decode_sample(members, f"{shard.path}:{key}")
            for sentence in sample.sentences:
                if not sentence["answer_ids"]:
                    continue
                total = sum(sentence["answer_scores"])
                share = {
                    index.answers[a]: s / total
                    for a, s in zip(sentence["answer_ids"], sentence["answer_scores"], strict=True)
                }
                shares.append(share)
                weights.update(share)
    answer, _ = weights.most_common(1)[0]
    return answer, sum(share.get(answer, 0.0) for share in shares) / len(shares)


def write_run_files(out: Path, args: argparse.Namespace, num_answers: int) -> argparse.Namespace:
    """Write the model and DeepSpeed JSON the setting asks for into ``out`` and name them in ``args``.

    Both runs (LXMERT and the control) read the same two files, so they differ only in
    ``--zero-visual-input``. With the preset's init and the decaying schedule nothing is written
    and the runs take ``--model PRESET`` and ``ds_configs/cpu_demo.json`` as they are.
    Returns ``args`` (changed in place: ``model_file``, ``deepspeed_config``).
    """
    args.model_file, args.deepspeed_config = args.model, DEEPSPEED_CONFIG
    if args.init_range is not None or args.schedule == "constant" or args.bias_correction:
        out.mkdir(parents=True, exist_ok=True)
    if args.init_range is not None:
        if args.model not in MODEL_PRESET_SIZES:
            raise SystemExit(
                f"--init-range needs a model preset {tuple(MODEL_PRESET_SIZES)}; got {args.model!r}"
            )
        # A JSON config must name the shards' feature dimension and answer count (pretrain checks).
        config = LxmertConfig(
            **MODEL_PRESET_SIZES[args.model],
            visual_feature_dim=args.feature_dim,
            num_qa_labels=num_answers,
            initializer_range=args.init_range,
        )
        args.model_file = out / f"model_{args.model}_init{args.init_range:g}.json"
        config.save(args.model_file)
    if args.schedule == "constant" or args.bias_correction:
        deepspeed = json.loads(DEEPSPEED_CONFIG.read_text())
        if args.schedule == "constant":
            scheduler = copy.deepcopy(deepspeed["scheduler"])
            # DeepSpeed's WarmupLR: the same linear warm-up, then the peak rate to the end.
            scheduler["type"] = "WarmupLR"
            scheduler["params"] = {
                key: scheduler["params"][key]
                for key in ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type")
            }
            deepspeed["scheduler"] = scheduler
        deepspeed["optimizer"]["params"]["bias_correction"] = bool(args.bias_correction)
        args.deepspeed_config = out / RUN_DEEPSPEED_NAME
        args.deepspeed_config.write_text(json.dumps(deepspeed, indent=2) + "\n")
    return args


def demo_settings(args: argparse.Namespace) -> dict[str, object]:
    """The flags that decide what the demo's runs compute (world, budget, recipe, model, seed)."""
    return {name: value for name, value in sorted(vars(args).items()) if name not in NOT_SETTINGS}


def claim_directory(out: Path, args: argparse.Namespace) -> None:
    """Make ``out`` this demo's directory, or refuse one that holds another demo's run.

    A directory started with the same settings (``demo.json``) is resumed: the corpus is kept and
    both runs continue from their newest checkpoints (``--resume auto``; a finished run only
    reports). One started with other settings, or holding demo files without ``demo.json``, is
    refused, so a summary never mixes two runs' results; ``--overwrite`` deletes that run first.
    """
    settings = demo_settings(args)
    record = out / SETTINGS_NAME
    if args.overwrite:
        for name in (*RUN_ARTEFACTS, *(p.name for p in out.glob("model_*.json"))):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    elif record.exists():
        earlier = json.loads(record.read_text())
        changed = {
            name: (earlier.get(name), value) for name, value in settings.items() if earlier.get(name) != value
        }
        if not changed:
            print(f"{out} holds a demo run with these settings: resuming it", flush=True)
            return
        listed = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items())
        raise SystemExit(
            f"{out} holds a demo run with other settings ({record}: {listed}). Use --out DIR for a "
            f"new run, the same flags as before to resume it, or --overwrite to delete it and start over."
        )
    else:
        found = [name for name in RUN_ARTEFACTS if (out / name).exists()]
        if found:
            raise SystemExit(
                f"{out} holds files of an earlier demo run ({', '.join(found)}) without {SETTINGS_NAME}, "
                f"so whether its settings match is unknown. Use --out DIR for a new run, or --overwrite "
                f"to delete it and start over."
            )
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=2) + "\n")


def pretrain_command(run_dir: Path, shards: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    """The ``deepspeed`` command line of one demo pre-training run (after :func:`write_run_files`)."""
    return [
        "deepspeed",
        "--num_gpus",
        str(args.ranks),
        "--master_port",
        str(args.port),
        str(REPO / "lxtrain" / "pretrain.py"),
        "--deepspeed_config",
        str(args.deepspeed_config),
        "--train-shards",
        str(shards / "train"),
        "--valid-shards",
        str(shards / "valid"),
        "--output-dir",
        str(run_dir),
        "--model",
        str(args.model_file),
        "--epochs",
        str(args.epochs),
        "--seed",
        str(args.seed),
        "--valid-every",
        str(args.valid_every),
        "--recipe",
        args.recipe,
        "--log-every",
        "20",
        "--num-workers",
        "1",
        "--resume",
        "auto",  # a fresh directory has nothing to resume; claim_directory refuses a foreign one
        "--object-words",
        OBJECT_WORDS,
        "--no-export",
        *(["--verbose"] if args.verbose else []),
        *(
            ["--object-word-mask-probability", str(args.object_word_mask_probability)]
            if args.object_word_mask_probability is not None
            else []
        ),
        *extra,
    ]


def pretrain(run_dir: Path, shards: Path, args: argparse.Namespace, *extra: str) -> list[dict]:
    """Run one demo pre-training; returns its validation records, in step order."""
    command = pretrain_command(run_dir, shards, args, *extra)
    print("$ " + " ".join(command), flush=True)
    launcher_log = run_dir / "logs" / "launcher.log"
    launcher_log.parent.mkdir(parents=True, exist_ok=True)
    print(f"launcher output: {launcher_log}; library logs: {run_dir / 'logs'}/rank<N>.log", flush=True)
    # One pipe for both streams: the log keeps them in the order they came.
    with (
        open(launcher_log, "a", encoding="utf-8") as log,
        subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as process,
    ):
        for line in process.stdout:
            log.write(line)
            if args.verbose or not LIBRARY_LINE.match(line):
                print(line, end="", flush=True)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command)
    return read_validation(run_dir / "validation.jsonl")


def resolve_setting(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left unset from the chosen setting (in place; returned for chaining)."""
    for name, value in DEMO_SETTINGS[args.setting].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's flags, with the setting's values wherever a flag was not given."""
    parser = argparse.ArgumentParser(prog="python -m lxtrain.demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--setting",
        choices=tuple(DEMO_SETTINGS),
        default=DEFAULT_SETTING,
        help="fast: ~10 minutes on 2 cores, grounding shows; quick: the former default, no grounding "
        "yet; grounding: ~5,200 steps in a harder world, ~50 minutes",
    )
    parser.add_argument("--out", help="run directory (default runs/demo, runs/demo_grounding)")
    parser.add_argument("--images", type=int, help="synthetic training images")
    parser.add_argument("--feature-dim", type=int, help="synthetic RoI feature dimension")
    parser.add_argument("--boxes", type=int, help="regions per synthetic image")
    parser.add_argument("--max-objects", type=int, help="at most this many objects per synthetic image")
    parser.add_argument("--min-objects", type=int, help="at least this many objects per synthetic image")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--recipe")
    parser.add_argument(
        "--object-word-mask-probability",
        type=float,
        help="masking rate of the object words (grounding setting: 1.0; 0.15 is LXMERT's masking exactly)",
    )
    parser.add_argument(
        "--model", default="tiny", help="a preset (tiny, small, base) or an LxmertConfig JSON"
    )
    parser.add_argument(
        "--init-range",
        type=float,
        help="std of the weight init (a preset's JSON is written with it; fast setting: 0.125, BERT's: 0.02)",
    )
    parser.add_argument(
        "--schedule",
        choices=("decay", "constant"),
        help="after the 5%% warm-up: linear decay to 0 (ds_configs/cpu_demo.json) or the peak rate throughout",
    )
    parser.add_argument(
        "--bias-correction",
        action=argparse.BooleanOptionalAction,
        help="Adam's bias correction (fast setting: on; ds_configs/cpu_demo.json and LXMERT's BertAdam: off)",
    )
    parser.add_argument("--valid-every", type=int, help="validate every N steps (0: at epoch ends)")
    parser.add_argument(
        "--seed", type=int, default=9595, help="pre-training seed (model init, data order, masks)"
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--port", type=int, default=29650)
    parser.add_argument("--no-control", action="store_true", help="skip the zero-visual-input control run")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the demo run already in --out and start over (without it, a rerun with the same "
        "settings resumes and one with other settings is refused)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the launcher's and libraries' INFO/WARNING lines too (always in RUN/logs/)",
    )
    return resolve_setting(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    default_out = "demo" if args.setting == DEFAULT_SETTING else f"demo_{args.setting}"
    out = Path(args.out or REPO / "runs" / default_out)
    claim_directory(out, args)
    corpus = out / "corpus"
    if not (corpus / "shards" / "train" / "index.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lxtrain.synthetic.pretraining",
                "--out",
                str(corpus),
                "--images",
                str(args.images),
                *World(
                    feature_dim=args.feature_dim,
                    boxes=args.boxes,
                    min_objects=args.min_objects,
                    max_objects=args.max_objects,
                ).size_arguments(),
                "--shards",
            ],
            check=True,
        )
    shards = corpus / "shards"
    write_run_files(out, args, len(open_index(shards / "train").answers))
    model = pretrain(out / "pretrain", shards, args)
    control = None if args.no_control else pretrain(out / "control", shards, args, "--zero-visual-input")
    answer, baseline = majority_baseline(shards / "valid")
    report(out, args, model, control, answer, baseline)
    return 0


def report(
    out: Path,
    args: argparse.Namespace,
    model_records: list[dict],
    control_records: list[dict] | None,
    answer: str,
    baseline: float,
) -> tuple[Path, Figure]:
    """Print the summary table, write ``summary.json`` and the validation curves' PNG next to it.

    Both come from the same validation records (the runs' ``validation.jsonl``): the table from
    the last record of each run, the figure from all of them. Returns the PNG's path and the
    figure drawn into it (whose lines hold the plotted values).
    """
    model = model_records[-1]
    control = control_records[-1] if control_records else None
    rows = [
        ("validation QA accuracy", model["acc"].get("qa"), control and control["acc"].get("qa"), baseline),
        (
            "masked object-word accuracy",
            model["acc"].get("mlm_object_words"),
            control and control["acc"].get("mlm_object_words"),
            None,
        ),
        (
            "  on matching sentences",
            model["acc"].get("mlm_object_words_matched"),
            control and control["acc"].get("mlm_object_words_matched"),
            None,
        ),
        (
            "masked LM accuracy (all words)",
            model["acc"].get("mlm"),
            control and control["acc"].get("mlm"),
            None,
        ),
        (
            "detected-label accuracy (obj)",
            model["acc"].get("obj"),
            control and control["acc"].get("obj"),
            None,
        ),
        (
            "detected-label accuracy (attr)",
            model["acc"].get("attr"),
            control and control["acc"].get("attr"),
            None,
        ),
        ("matching accuracy", model["acc"].get("match"), control and control["acc"].get("match"), 0.5),
    ]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    print(
        f"\nSummary ({args.setting} setting) after {args.epochs:g} epochs ({args.recipe} recipe), "
        f"step {model['step']}:"
    )
    if args.object_word_mask_probability is None:
        print("masking: LXMERT's (every word at 15%)")
    else:
        print(
            f"masking: object words at rate {args.object_word_mask_probability:g}, other words at 15% (not LXMERT's)"
        )
    # The world and the optimisation choices that differ between settings, so a reader can tell
    # which of them a table comes from.
    print(
        f"world: {args.images} images, {args.boxes} box(es) of {args.feature_dim}-d features, "
        f"{args.min_objects}-{args.max_objects} object(s) each; model: {args.model}, init std "
        f"{'0.02 (BERT)' if args.init_range is None else f'{args.init_range:g} (BERT: 0.02)'}; "
        f"lr: {'constant after' if args.schedule == 'constant' else 'linear decay after'} 5% warm-up, "
        f"Adam {'with' if args.bias_correction else 'without'} bias correction; "
        f"seed {args.seed}"
    )
    print(f"{'metric':32s} {'LXMERT':>8s} {'no vision':>10s} {'baseline':>9s}")
    for name, ours, theirs, reference in rows:
        print(f"{name:32s} {cell(ours):>8s} {cell(theirs):>10s} {cell(reference):>9s}")
    print(f"(baseline: QA = always answer {answer!r}; matching = chance)")
    runs = {"LXMERT": model_records, **({"no vision": control_records} if control_records else {})}
    figure = curves_figure(
        validation_curves(runs),
        f"Validation during pre-training ({args.setting} setting, {args.recipe} recipe)",
        references={"qa": (baseline, f"always {answer!r}"), "match": (0.5, "chance")},
    )
    curves_path = save_figure(figure, out / CURVES_NAME)
    print(f"Validation curves: {curves_path}")
    print(f"TensorBoard: tensorboard --logdir {out}")
    summary = {"model": model, "control": control, "majority_answer": answer, "majority_accuracy": baseline}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return curves_path, figure


if __name__ == "__main__":
    sys.exit(main())
