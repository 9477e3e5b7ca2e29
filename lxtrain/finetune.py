"""LXMERT fine-tuning (VQA, GQA, NLVR2): config -> distributed -> data -> model -> engine -> resume -> loop.

    deepspeed --num_gpus 8 lxtrain/finetune.py --task vqa --deepspeed_config ds_configs/finetune_vqa.json \
        --init runs/base/export --train-shards shards/vqa_train --valid-shards shards/vqa_minival \
        --output-dir runs/vqa

The same file runs under ``torchrun``, ``mpirun`` and ``srun`` (``slurm/pretrain.sbatch`` with
``LXTRAIN_SCRIPT=lxtrain/finetune.py``), exactly like ``lxtrain/pretrain.py``. docs/finetune.md
has the whole flow.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (deepspeed/torchrun launch a file): sys.path[0] is lxtrain/ itself, whose
    # module names (config, data, model...) must not shadow other packages; use the repo root.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(_here)]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lxtrain import checkpoint, console, distributed  # noqa: E402
from lxtrain import engine as engine_setup  # noqa: E402
from lxtrain.batch import to_device  # noqa: E402
from lxtrain.data.finetune_shards import FinetuneIndex, open_finetune_index  # noqa: E402
from lxtrain.downstream import predict, weights  # noqa: E402
from lxtrain.downstream.config import FinetuneConfig, parse_args  # noqa: E402
from lxtrain.downstream.data import build_loader  # noqa: E402
from lxtrain.downstream.models import FinetuneObjective, build_model, transfer_answer_head  # noqa: E402
from lxtrain.model import LxmertConfig  # noqa: E402
from lxtrain.monitor import Monitor  # noqa: E402
from lxtrain.pretrain import EXIT_NONFINITE, REQUEUE_MARKER, StopRequested  # noqa: E402


def open_splits(cfg: FinetuneConfig) -> tuple[FinetuneIndex, FinetuneIndex | None]:
    """The training and validation indexes, checked against the task and each other."""
    train = open_finetune_index(cfg.train_shards)
    if train.task != cfg.task:
        raise ValueError(f"--train-shards {cfg.train_shards} holds {train.task} data, not {cfg.task}")
    if train.labelled < train.examples:
        raise ValueError(
            f"--train-shards {cfg.train_shards}: {train.examples - train.labelled} of {train.examples} examples "
            "have no label (a test split?); training needs a labelled split"
        )
    valid = None
    if cfg.valid_shards:
        valid = open_finetune_index(cfg.valid_shards)
        if valid.task != cfg.task:
            raise ValueError(f"--valid-shards {cfg.valid_shards} holds {valid.task} data, not {cfg.task}")
        if valid.labelled == 0:
            raise ValueError(
                f"--valid-shards {cfg.valid_shards} has no labels (a test split): validation needs labels; "
                "write test predictions with python -m lxtrain.evaluate instead"
            )
        if valid.answers != train.answers:
            raise ValueError(
                f"--valid-shards {cfg.valid_shards} uses a different answer table ({len(valid.answers or [])} "
                f"answers) from --train-shards ({len(train.answers or [])}); convert both with the same --answers"
            )
        if valid.shards.feature_dim != train.shards.feature_dim:
            raise ValueError("training and validation features have different dimensions")
    return train, valid


def build_network(cfg: FinetuneConfig, train: FinetuneIndex) -> tuple[torch.nn.Module, LxmertConfig, str]:
    """The task model initialised from --init (or randomly with its architecture) and a start-up note."""
    pretrained = weights.load_pretrained(
        cfg.init, cfg.init_format, cfg.pretrain_answers, cfg.num_attention_heads
    )
    config = pretrained.config
    if config.visual_feature_dim != train.shards.feature_dim:
        raise ValueError(
            f"--init {cfg.init} expects {config.visual_feature_dim}-d region features but "
            f"{cfg.train_shards} has {train.shards.feature_dim}-d ones"
        )
    torch.manual_seed(cfg.seed)  # identical head init on every rank
    model = build_model(cfg.task, config, len(train.answers or []))
    if cfg.from_scratch:
        return model, config, f"random initialisation (--from-scratch) with the architecture of {cfg.init}"
    model.backbone.load_state_dict(weights.backbone_state(pretrained), strict=True)
    note = f"backbone from {cfg.init} ({pretrained.fmt})"
    if cfg.task != "nlvr2":
        if pretrained.answers is None:
            note += (
                "; warning: no pre-training answer table (pass --pretrain-answers): no answer row can be "
                "matched, so every output row starts at zero"
            )
        report = transfer_answer_head(
            weights.pretrained_answer_head(pretrained), pretrained.answers, model.head, train.answers
        )
        note += f"; {report}"
    return model, config, note


@torch.no_grad()
def validate(
    engine, cfg: FinetuneConfig, loader, train_loader, answers, monitor: Monitor, step: int
) -> dict | None:
    """Predict the validation split on all ranks, score on rank 0; a collective."""
    engine.eval()
    records: list = []

    def fallback() -> dict:
        return next(iter(train_loader.epoch(0)))

    for batch, counted in distributed.equal_count_batches(
        loader.epoch(0), len(loader), cfg.max_valid_batches, fallback
    ):
        output = engine(to_device(batch, engine.device))
        if counted:
            records += predict.batch_predictions(cfg.task, output.logits.cpu(), batch, answers)
    engine.train()
    gathered = [None] * dist.get_world_size() if dist.is_initialized() else [records]
    if dist.is_initialized():
        dist.all_gather_object(gathered, records)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    result = predict.score(cfg.task, [r for part in gathered for r in part])
    flat = {k: v for k, v in result.items() if isinstance(v, int | float)}
    monitor.scalars("valid", flat, step)
    monitor.scalars("valid/per_answer_type", result.get("per_answer_type", {}), step)
    return result


def run(cfg: FinetuneConfig, info: distributed.DistributedInfo, stop: StopRequested) -> int:
    output_dir = Path(cfg.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    # Inputs are checked before anything is built: batch sizes, splits, answer tables, weights.
    ds_json = engine_setup.load_deepspeed_config(cfg.deepspeed_config)
    _, micro_batch, accumulation = engine_setup.resolve_batch_sizes(
        dict(ds_json), info.world_size, cfg.deepspeed_config
    )
    train_index, valid_index = open_splits(cfg)
    common = dict(
        rank=info.rank, world_size=info.world_size, num_workers=cfg.num_workers, tokenizer=cfg.tokenizer
    )
    train = build_loader(train_index, batch_size=micro_batch, seed=cfg.seed, train=True, **common)
    valid = (
        build_loader(valid_index, batch_size=micro_batch, seed=cfg.seed, train=False, **common)
        if valid_index
        else None
    )
    batches_per_epoch = len(train)
    steps_per_epoch = batches_per_epoch // accumulation
    if steps_per_epoch == 0:
        raise ValueError(
            f"{cfg.train_shards}: {train_index.examples} examples give {batches_per_epoch} micro-batches of "
            f"{micro_batch} per rank, fewer than gradient_accumulation_steps={accumulation}"
        )
    batches_per_epoch = steps_per_epoch * accumulation  # epochs end on an optimiser-step boundary
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    dropped = train_index.raw["dropped"]["counts"]
    if dropped:
        distributed.print0(f"note: {cfg.train_shards} conversion dropped or repaired: {dropped}")

    model, model_config, init_note = build_network(cfg, train_index)
    objective = FinetuneObjective(model, cfg.task)
    ds_config = engine_setup.prepare_deepspeed_config(
        cfg.deepspeed_config,
        world_size=info.world_size,
        total_steps=total_steps,
        warmup_fraction=cfg.warmup_fraction,
    )
    if cfg.lr is not None:
        ds_config["optimizer"]["params"]["lr"] = cfg.lr
        scheduler = ds_config.get("scheduler", {}).get("params", {})
        if ds_json.get("scheduler", {}).get("params", {}).get("warmup_max_lr") == engine_setup.AUTO:
            scheduler["warmup_max_lr"] = cfg.lr
    engine = engine_setup.initialize(objective, ds_config)

    resume_dir, resume_tag = checkpoint_dir, None
    if cfg.resume == "auto":
        resume_tag = checkpoint.find_resume_tag(checkpoint_dir)
    elif cfg.resume != "none":
        resume_dir, resume_tag = Path(cfg.resume).parent, Path(cfg.resume).name
    step, batches_done, best = 0, 0, None
    if resume_tag is not None:
        state = checkpoint.load(engine, resume_dir, resume_tag)
        step, batches_done, best = state["step"], state["batches_done"], state.get("best")
        distributed.print0(f"resumed from {resume_dir / resume_tag} at step {step}")

    monitor = Monitor(output_dir / "tensorboard", last_step, enabled=info.is_main)
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        record = {"lxtrain": dataclasses.asdict(cfg), "deepspeed": ds_config, "model": model_config.to_dict()}
        (output_dir / "run_config.json").write_text(json.dumps(record, indent=2))
        distributed.print0(
            f"lxtrain finetune {cfg.task}: {info.world_size} rank(s) via {info.launcher}, "
            f"{engine_setup.precision(ds_config)}, {train_index.examples} training examples, "
            f"{steps_per_epoch} steps/epoch, {last_step} steps; {init_note}"
        )

    def save(reason: str) -> None:
        state = {
            "step": step,
            "batches_done": batches_done,
            "best": best,
            "reason": reason,
            "task": cfg.task,
            "config": dataclasses.asdict(cfg),
        }
        checkpoint.save(engine, checkpoint_dir, step, state, cfg.keep_last)

    def export(name: str) -> None:
        """Consolidate the newest checkpoint into an fp32 fine-tuned model (rank 0), then wait."""
        tag = checkpoint.find_resume_tag(checkpoint_dir)
        if info.is_main and tag is not None:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with checkpoint.weights_only_loads():  # never unpickle code from the checkpoint
                state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
            state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
            weights.save_finetuned(state, model_config, cfg.task, train_index.answers, output_dir / name)
            distributed.print0(f"exported {tag} to {output_dir / name}")
        if dist.is_initialized():
            dist.barrier()

    score_sum = labelled = loss_sum = 0.0
    loss_count, bad_in_a_row, bad_total = 0, 0, 0
    window_start, window_steps = time.monotonic(), 0
    engine.train()
    while step < last_step:
        epoch, position = divmod(batches_done, batches_per_epoch)
        batches = train.epoch(epoch, position)
        while step < last_step and batches_done < (epoch + 1) * batches_per_epoch:
            batch = to_device(next(batches), engine.device)
            output = engine(batch)
            batches_done += 1
            flags = torch.tensor(
                [0 if bool(torch.isfinite(output.total)) else 1, 1 if stop.signal_name else 0]
            )
            if dist.is_initialized():
                distributed.all_reduce_(flags, op=dist.ReduceOp.MAX)
            if flags[0]:
                bad_in_a_row, bad_total = bad_in_a_row + 1, bad_total + 1
                distributed.print0(
                    f"warning: non-finite loss at step {step} (skipped, {bad_in_a_row} in a row)"
                )
                if bad_in_a_row >= cfg.max_bad_steps:
                    save("non-finite losses")
                    distributed.print0(
                        f"error: {bad_in_a_row} non-finite losses in a row; stopped at step {step}"
                    )
                    return EXIT_NONFINITE
                continue
            bad_in_a_row = 0
            engine.backward(output.total)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            loss_sum, loss_count = loss_sum + float(output.total.detach()), loss_count + 1
            score_sum, labelled = score_sum + float(output.score_sum), labelled + float(output.labelled)
            if not boundary:
                continue
            step += 1
            window_steps += 1
            if step % cfg.log_every == 0 or step == last_step:
                sums = torch.tensor([loss_sum, loss_count, score_sum, labelled], dtype=torch.float64)
                if dist.is_initialized():
                    distributed.all_reduce_(sums)
                elapsed = time.monotonic() - window_start
                losses = {cfg.task: float(sums[0] / max(sums[1], 1))}
                scalars = {
                    "loss": losses[cfg.task],
                    "accuracy": float(sums[2] / max(sums[3], 1)),
                    "lr": engine.get_lr()[0],
                    "samples_per_s": window_steps * ds_config["train_batch_size"] / elapsed,
                    "epoch": batches_done / batches_per_epoch,
                }
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    scalars["grad_norm"] = float(grad_norm)
                monitor.scalars("train", scalars, step)
                monitor.progress(step, scalars["epoch"], cfg.task, losses, scalars["samples_per_s"])
                monitor.log_line(output_dir / "train_log.jsonl", {"step": step, **scalars})
                score_sum = labelled = loss_sum = 0.0
                loss_count, window_start, window_steps = 0, time.monotonic(), 0
            if flags[1]:
                save(f"signal {stop.signal_name or 'on another rank'}")
                if info.is_main:
                    (output_dir / REQUEUE_MARKER).write_text(f"step {step}\n")
                monitor.close()
                distributed.print0("stopping on signal: checkpoint saved, exiting for requeue")
                return 0
            epoch_end = batches_done % batches_per_epoch == 0
            saved = step % cfg.save_every == 0 or epoch_end or step == last_step
            if saved:
                save("epoch end" if epoch_end else "periodic" if step < last_step else "final")
            if valid is not None and (
                epoch_end or step == last_step or (cfg.valid_every and step % cfg.valid_every == 0)
            ):
                result = validate(engine, cfg, valid, train, train_index.answers, monitor, step)
                improved = False
                if info.is_main:
                    distributed.print0(f"validation at step {step}: {predict.headline(cfg.task, result)}")
                    with open(output_dir / "validation.jsonl", "a") as handle:
                        handle.write(json.dumps({"step": step, **result}) + "\n")
                    value = result[predict.PRIMARY_METRIC[cfg.task]]
                    improved = best is None or value > best["value"]
                    if improved:
                        best = {"step": step, "value": value}
                flag = torch.tensor([int(improved)])
                if dist.is_initialized():
                    distributed.broadcast_(flag, src=0)
                if cfg.export and flag.item():
                    if not saved:
                        save("best validation")
                    export("best")
            monitor.flush()
        if batches_done % batches_per_epoch:
            break  # stopped mid-epoch at max_steps
    if cfg.export:
        export("export")
    monitor.close()
    if info.is_main:
        (output_dir / REQUEUE_MARKER).unlink(missing_ok=True)
        if best is not None:
            distributed.print0(
                f"best validation {predict.PRIMARY_METRIC[cfg.task]} {best['value']:.4f} at step {best['step']}"
            )
    distributed.print0(f"done: {step} steps, {bad_total} skipped non-finite micro-batches")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"lxtrain/finetune.py: error: {error}", file=sys.stderr)
        return 2
    stop = StopRequested()
    # Before distributed.init: DeepSpeed's process-group start-up already logs on every rank.
    info = distributed.discover()
    console.route_library_output(cfg.output_dir, info.rank, cfg.verbose)
    info = distributed.init(cfg.collective_timeout_s, info)
    try:
        return run(cfg, info, stop)
    except (ValueError, FileNotFoundError, RuntimeError, engine_setup.ConfigError) as error:
        distributed.fail_all(str(error))
    return 1


if __name__ == "__main__":
    sys.exit(main())
