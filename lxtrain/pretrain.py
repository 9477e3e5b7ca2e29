"""LXMERT pre-training: config -> distributed -> data -> model -> DeepSpeed engine -> resume -> loop.

    deepspeed --num_gpus 2 lxtrain/pretrain.py --deepspeed_config ds_configs/zero2_bf16.json \
        --train-shards shards/train --valid-shards shards/minival --output-dir runs/base

The same file runs under ``torchrun``, ``mpirun`` and ``srun`` (see ``lxtrain.distributed``).
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
import signal  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lxtrain import batch as B  # noqa: E402
from lxtrain import checkpoint, compiling, console, distributed  # noqa: E402
from lxtrain import engine as engine_setup
from lxtrain.config import PretrainConfig, parse_args  # noqa: E402
from lxtrain.data.loader import build_pretrain_loader, build_valid_loader  # noqa: E402
from lxtrain.data.prefetch import DevicePrefetcher  # noqa: E402
from lxtrain.data.tokenizer import WordPieceEncoder  # noqa: E402
from lxtrain.model import LxmertForPretraining  # noqa: E402
from lxtrain.model.inspection import capture_cross_attention, language_to_vision_attention  # noqa: E402
from lxtrain.monitor import Monitor, detect_peak_tflops, training_flops_per_sample  # noqa: E402
from lxtrain.tasks.objectives import (  # noqa: E402
    HF_VISUAL_LOSS_NORMALIZER,
    RELEASE_VISUAL_LOSS_NORMALIZER,
    TASKS,
    ObjectiveOutput,
    PretrainingObjective,
)
from lxtrain.tasks.schedule import TaskSchedule, load_phases  # noqa: E402

REQUEUE_MARKER = "REQUEUE"
EXIT_NONFINITE = 3


class StopRequested:
    """Set by SIGTERM / SIGUSR1 (Slurm's pre-timeout signal); acted on at the next step boundary."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name


class PretrainData:
    """The training and validation loaders of this rank, positioned by (epoch, batches done)."""

    def __init__(self, cfg: PretrainConfig, micro_batch: int, rank: int, world_size: int) -> None:
        common = dict(
            batch_size=micro_batch,
            rank=rank,
            world_size=world_size,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
            tokenizer=cfg.tokenizer,
            # Pinned batches on GPUs; the loader then also reuses shared-memory batch buffers.
            pin_memory=torch.cuda.is_available(),
        )
        # A damaged training sample always stops the run: skipping it would change the batches
        # from then on in a way resume cannot replay (see lxtrain.data.loader), so "nothing lost,
        # resume exact" would no longer hold. --strict-data applies to validation, which only
        # measures and may skip.
        self.encoder = WordPieceEncoder(cfg.tokenizer)
        words = [w.strip() for w in (cfg.object_words or "").split(",") if w.strip()]
        self.object_word_ids = self.encoder.word_piece_ids(words)
        # Validation keeps the uniform masks, so its accuracies compare across recipes.
        self.train = build_pretrain_loader(
            cfg.train_shards,
            shard_index=cfg.train_shard_index,
            strict=True,
            object_word_ids=tuple(self.object_word_ids),
            object_word_mask_probability=cfg.object_word_mask_probability,
            **common,
        )
        self.valid = (
            build_valid_loader(cfg.valid_shards, strict=cfg.strict_data, **common)
            if cfg.valid_shards
            else None
        )
        self.batches_per_epoch = len(self.train)

    @property
    def has_validation(self) -> bool:
        return self.valid is not None

    def train_batches(self, epoch: int, position: int):
        self.train.load_state_dict({"epoch": epoch, "batches_consumed": position})
        return self.train

    def valid_batches(self, max_batches: int | None):
        """Validation batches, the same count on every rank (shorter ranks repeat their last batch,
        flagged False, so collective forwards under ZeRO-3 stay matched). Yields (batch, counts)."""
        return distributed.equal_count_batches(self.valid, len(self.valid), max_batches)

    def decode_tokens(self, ids: list[int]) -> list[str]:
        return [self.encoder.id_to_token(i) for i in ids]


class TaskMeter:
    """Sums of per-task losses and accuracy counts between two log points, and non-finite losses.

    Everything lives on the training device: ``add`` only queues a few device ops (a training step
    never waits for the GPU to read a metric back); ``reduce`` and ``health`` read and all-reduce
    the sums, at log steps. A micro-batch with a non-finite total adds nothing to the sums.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._indices: dict[tuple[str, ...], torch.Tensor] = {}
        # Consecutive non-finite micro-batches, carried across log windows.
        self.nonfinite_run = torch.zeros((), dtype=torch.int64, device=self.device)
        self.reset()

    def reset(self) -> None:
        # Rows: loss sum, loss count, correct, labelled; one column per task.
        self.sums = torch.zeros(4, len(TASKS), dtype=torch.float64, device=self.device)
        # nonfinite micro-batches, longest run of them, masked-LM labels over capacity (this window)
        self.events = torch.zeros(3, dtype=torch.int64, device=self.device)

    def _index(self, names: tuple[str, ...]) -> torch.Tensor:
        # Made once per task set: a fresh index tensor each step would be a host-to-device copy.
        if names not in self._indices:
            positions = [TASKS.index(name) for name in names]
            self._indices[names] = torch.tensor(positions, dtype=torch.int64, device=self.device)
        return self._indices[names]

    def add(self, output) -> None:
        finite = torch.isfinite(output.total.detach())
        names = tuple(task for task in TASKS if task in output.losses)
        losses = torch.stack([output.losses[task].detach() for task in names]).double()
        self.sums[0].index_add_(0, self._index(names), torch.where(finite, losses, 0.0))
        self.sums[1].index_add_(0, self._index(names), finite.double().expand(len(names)))
        counted = tuple(task for task in TASKS if task in output.counts)
        if counted:
            hits = torch.stack([output.correct[task] for task in counted]).double()
            labelled = torch.stack([output.counts[task] for task in counted]).double()
            self.sums[2].index_add_(0, self._index(counted), torch.where(finite, hits, 0.0))
            self.sums[3].index_add_(0, self._index(counted), torch.where(finite, labelled, 0.0))
        bad = (~finite).long()
        self.nonfinite_run.add_(1).mul_(bad)
        self.events[0].add_(bad)
        torch.maximum(self.events[1], self.nonfinite_run, out=self.events[1])
        if output.mlm_over_capacity is not None:
            self.events[2].add_(output.mlm_over_capacity)

    def reduce(self) -> tuple[dict[str, float], dict[str, float]]:
        """(mean loss per task, accuracy per task) over all ranks; a collective."""
        # Always a copy (.cpu() of a CPU tensor is the tensor itself): the all-reduce is in place.
        stacked = self.sums.to("cpu", copy=True)
        if dist.is_initialized():
            distributed.all_reduce_(stacked)
        loss_sum, loss_count, correct, labelled = stacked
        losses = {t: float(loss_sum[i] / loss_count[i]) for i, t in enumerate(TASKS) if loss_count[i] > 0}
        accuracies = {t: float(correct[i] / labelled[i]) for i, t in enumerate(TASKS) if labelled[i] > 0}
        return losses, accuracies

    def health(self) -> tuple[int, int, int]:
        """(non-finite micro-batches, longest run of them, masked-LM labels over capacity) in this
        window: summed over ranks, the run the longest on any rank; a collective."""
        # Copies (one each, on any device): the two in-place reductions differ.
        summed, longest = self.events.to("cpu", copy=True), self.events[1:2].to("cpu", copy=True)
        if dist.is_initialized():
            distributed.all_reduce_(summed)
            distributed.all_reduce_(longest, op=dist.ReduceOp.MAX)
        return int(summed[0]), int(longest[0]), int(summed[2])


def build_engine(cfg: PretrainConfig, data: PretrainData, world_size: int, total_steps: int, device):
    index = data.train.index
    model_config = cfg.model_config(feature_dim=index.feature_dim, num_answers=len(index.answers))
    with torch.device("meta"):  # the parameter count sizes DeepSpeed's buckets; no memory, no init
        num_parameters = LxmertForPretraining(model_config).num_parameters()
    ds_config = engine_setup.prepare_deepspeed_config(
        cfg.deepspeed_config,
        world_size=world_size,
        total_steps=total_steps,
        warmup_fraction=cfg.warmup_fraction,
        num_parameters=num_parameters,
    )
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    compile_mode = compiling.resolve_compile_mode(cfg.compile, device, zero_stage)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = LxmertForPretraining(model_config)
    normalizer = (
        HF_VISUAL_LOSS_NORMALIZER if cfg.visual_loss_normalizer == "hf" else RELEASE_VISUAL_LOSS_NORMALIZER
    )
    objective = PretrainingObjective(
        model,
        normalizer,
        zero_visual_input=cfg.zero_visual_input,
        mlm_capacity_fraction=cfg.mlm_capacity,
        compile_mode=compile_mode,
        compile_fallback=cfg.compile == compiling.AUTO,
    )
    if zero_stage == 3:
        import deepspeed

        # The MLM decoder reads the word-embedding table outside the embedding module.
        deepspeed.zero.register_external_parameter(model.mlm_head, model.word_embeddings)
    return engine_setup.initialize(objective, ds_config), model_config, ds_config


def object_word_tally(
    mlm_labels: torch.Tensor, matched: torch.Tensor, mlm_correct: torch.Tensor, object_words: torch.Tensor
) -> torch.Tensor:
    """Masked object words predicted right, and their count: row 0 over every sentence, row 1 over
    the sentences that describe the image shown (``matched``), where only the image can decide the
    word; on mismatched pairs the best any model can do is the words' prior.

    ``mlm_correct`` is (B, T) like ``mlm_labels``: True where a masked word was predicted right
    (``ObjectiveOutput.row_correct["mlm"]``).
    """
    is_object_word = (mlm_labels != -100) & torch.isin(mlm_labels, object_words)
    on_matched = is_object_word & (matched[:, None] == 1)
    return torch.tensor(
        [
            [float((mlm_correct & is_object_word).sum()), float(is_object_word.sum())],
            [float((mlm_correct & on_matched).sum()), float(on_matched.sum())],
        ],
        dtype=torch.float64,
    )


@torch.no_grad()
def validate(
    engine, data: PretrainData, model_config, monitor: Monitor, step: int, max_batches: int | None
) -> dict:
    """Every task's loss and accuracy, QA accuracy per source, and an attention image; a collective."""
    engine.eval()
    meter = TaskMeter(engine.device)
    qa_by_source = torch.zeros(2, len(B.SENTENCE_SOURCE_NAMES), dtype=torch.float64)
    all_tasks = dict.fromkeys(TASKS, 1.0)
    device = engine.device
    object_words = torch.tensor(data.object_word_ids, dtype=torch.int64)
    object_word_hits = torch.zeros(2, 2, dtype=torch.float64)
    first_batch = attention = None
    for batch, counted in data.valid_batches(max_batches):
        batch = B.to_device(batch, device)
        if first_batch is None:
            with capture_cross_attention(engine.module.model) as captured:
                output = engine(batch, all_tasks)
            attention = language_to_vision_attention(captured, model_config.num_attention_heads)
            first_batch = batch
        else:
            output = engine(batch, all_tasks)
        if not counted:
            continue
        meter.add(output)
        labelled = batch[B.QA_LABELS].cpu() != -100
        sources = batch[B.SENTENCE_SOURCES].cpu()[labelled]
        qa_by_source[0].index_add_(0, sources, output.row_correct["qa"].cpu()[labelled].double())
        qa_by_source[1].index_add_(0, sources, torch.ones_like(sources, dtype=torch.float64))
        object_word_hits += object_word_tally(
            batch[B.MLM_LABELS].cpu(),
            batch[B.MATCHED_LABELS].cpu(),
            output.row_correct["mlm"].cpu(),
            object_words,
        )
    losses, accuracies = meter.reduce()
    if dist.is_initialized():
        distributed.all_reduce_(qa_by_source)
        distributed.all_reduce_(object_word_hits)
    names = ("mlm_object_words", "mlm_object_words_matched")
    for name, (hits, count) in zip(names, object_word_hits.tolist(), strict=True):
        if count > 0:
            accuracies[name] = hits / count
    qa_sources = {
        name: float(qa_by_source[0, i] / qa_by_source[1, i])
        for i, name in enumerate(B.SENTENCE_SOURCE_NAMES)
        if qa_by_source[1, i] > 0
    }
    monitor.scalars("valid/loss", losses, step)
    monitor.scalars("valid/acc", accuracies, step)
    monitor.scalars("valid/qa_acc", qa_sources, step)
    if monitor.enabled and first_batch is not None:
        _log_attention(monitor, data, attention, first_batch, step)
    engine.train()
    return {"loss": losses, "acc": accuracies, "qa_acc_by_source": qa_sources}


def _log_attention(
    monitor: Monitor, data: PretrainData, attention: torch.Tensor, batch: dict, step: int
) -> None:
    """A labelled figure of words over boxes (mean over heads) for one example of the batch."""
    # Imported here: matplotlib is only needed on the rank that draws (see Monitor.figure).
    from lxtrain.figures import language_to_vision_figure, object_class_names

    names = object_class_names(data.valid.index)
    figure, words = language_to_vision_figure(batch, attention, data.decode_tokens, names, step)
    monitor.figure("attention/language_to_vision", figure, step)
    monitor.text("attention/words", " | ".join(words), step)


class StepHooks:
    """Callbacks at the training loop's fixed points: tools and tests observe a run through them,
    and the fault suite breaks it there (``lxtrain.testing.fault_hooks``). Called on every rank; the
    defaults do nothing.

    - ``step_begins(step)``: before the first micro-batch of step ``step + 1`` is fetched.
    - ``after_forward(batches_done, output)``: right after the forward of micro-batch
      ``batches_done`` (counted from 0 since the start of training; a resume continues the count),
      before its loss is counted, checked for being finite and back-propagated; may replace
      ``output.total``.
    - ``step_ends(step)``: right after optimiser step ``step``, before any logging, saving or
      validation of that step.
    - ``step_logged(step)``: after step ``step`` is logged (on log steps), before its checkpoint and
      validation; not called for a step that stops the run (a signal, too many non-finite losses).
    - ``before_checkpoint_complete(step)``: inside the save of step ``step``'s checkpoint, once
      every rank's files are written and before the ``COMPLETE`` marker.

    The per-micro-batch hooks run inside the steps ``tests/test_syncs.py`` measures: one that reads
    a device tensor back makes the host wait for the device there.
    """

    def step_begins(self, step: int) -> None:
        pass

    def after_forward(self, batches_done: int, output: ObjectiveOutput) -> None:
        pass

    def step_ends(self, step: int) -> None:
        pass

    def step_logged(self, step: int) -> None:
        pass

    def before_checkpoint_complete(self, step: int) -> None:
        pass


def run(
    cfg: PretrainConfig,
    info: distributed.DistributedInfo,
    stop: StopRequested,
    hooks: StepHooks | None = None,
) -> int:
    hooks = hooks or StepHooks()
    output_dir = Path(cfg.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    # Everything that can be wrong with the inputs is checked before the model is built.
    ds_json = engine_setup.load_deepspeed_config(cfg.deepspeed_config)
    _, micro_batch, accumulation = engine_setup.resolve_batch_sizes(
        dict(ds_json), info.world_size, cfg.deepspeed_config
    )
    data = PretrainData(cfg, micro_batch, info.rank, info.world_size)
    steps_per_epoch = data.batches_per_epoch // accumulation
    if steps_per_epoch == 0:
        raise ValueError(
            f"{cfg.train_shards}: {data.batches_per_epoch} micro-batches per rank per epoch is fewer than "
            f"gradient_accumulation_steps={accumulation}; use more data, fewer ranks or a smaller batch"
        )
    # An epoch ends on an optimiser-step boundary: the last (< accumulation) micro-batches of the
    # loader's epoch are left out, so epoch ends, schedules and checkpoints line up with steps.
    batches_per_epoch = steps_per_epoch * accumulation
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    phases = load_phases(cfg.phases_file) if cfg.phases_file else ()
    schedule = TaskSchedule(cfg.recipe, steps_per_epoch, cfg.epochs, seed=cfg.seed, phases=phases)

    resume_dir, resume_tag = checkpoint_dir, None
    if cfg.resume == "auto":
        resume_tag = checkpoint.find_resume_tag(checkpoint_dir)
    elif cfg.resume != "none":
        resume_path = Path(cfg.resume)
        if not (resume_path / checkpoint.COMPLETE).exists():
            raise FileNotFoundError(f"--resume {cfg.resume}: not a complete lxtrain checkpoint directory")
        resume_dir, resume_tag = resume_path.parent, resume_path.name

    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    engine, model_config, ds_config = build_engine(cfg, data, info.world_size, total_steps, device)
    step, batches_done = 0, 0
    if resume_tag is not None:
        state = checkpoint.load(engine, resume_dir, resume_tag)
        step, batches_done = state["step"], state["batches_done"]
        distributed.print0(f"resumed from {resume_dir / resume_tag} at step {step}")

    monitor = Monitor(output_dir / "tensorboard", last_step, enabled=info.is_main)
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "run_config.json").write_text(
            json.dumps(
                {"lxtrain": dataclasses.asdict(cfg), "deepspeed": ds_config, "model": model_config.to_dict()},
                indent=2,
            )
        )
        distributed.print0(
            f"lxtrain: {info.world_size} rank(s) via {info.launcher}, {engine_setup.precision(ds_config)}, "
            f"ZeRO-{ds_config.get('zero_optimization', {}).get('stage', 0)}, "
            f"{sum(p.numel() for p in engine.module.parameters()) / 1e6:.1f}M params, "
            f"{steps_per_epoch} steps/epoch, {last_step} steps, recipe {cfg.recipe}, "
            f"compile {engine.module.compile_mode}"
        )
    flops_per_sample = training_flops_per_sample(model_config)
    peak_tflops = cfg.peak_tflops or detect_peak_tflops()
    samples_per_step = ds_config["train_batch_size"]
    meter = TaskMeter(engine.device)
    # Where the engine skips a step with non-finite gradients itself (lxtrain.engine), a NaN loss
    # needs no host read here: the meter counts it on the device and the log step enforces
    # --max-bad-steps. Elsewhere every micro-batch's loss is checked on the host and a bad one
    # is dropped before backward.
    check_on_host = not engine_setup.skips_nonfinite_steps(ds_config)
    bad_total, bad_in_a_row_on_host = 0, 0
    window_start, data_wait = time.monotonic(), 0.0
    window_steps = 0
    phase = ""

    def save(reason: str) -> None:
        state = {
            "step": step,
            "batches_done": batches_done,
            "epoch": batches_done / batches_per_epoch,
            "reason": reason,
            "config": dataclasses.asdict(cfg),
        }
        checkpoint.save(
            engine,
            checkpoint_dir,
            step,
            state,
            cfg.keep_last,
            before_complete=lambda: hooks.before_checkpoint_complete(step),
        )
        distributed.print0(f"checkpoint saved at step {step} ({reason})")

    def stop_on_nonfinite(in_a_row: int) -> int:
        save("non-finite losses")
        monitor.close()
        distributed.print0(
            f"error: {in_a_row} non-finite losses in a row by step {step}; stopped with the last good "
            f"weights saved in {checkpoint_dir}"
        )
        return EXIT_NONFINITE

    def exchanged(flag: bool, what: str) -> bool:
        try:
            return distributed.any_rank(flag)
        except Exception as error:  # gloo raises when a peer process is gone
            if not distributed.is_lost_peer_error(error):
                raise  # e.g. this rank's data-loader worker died while we waited
            distributed.fail_all(distributed.lost_peer_message(error, f"at step {step} ({what})"))
            raise

    engine.train()
    while step < last_step:
        epoch, position = divmod(batches_done, batches_per_epoch)
        # Copied to the device one batch ahead (a side stream on GPUs), object masks applied there.
        batches = iter(DevicePrefetcher(data.train_batches(epoch, position), engine.device))
        while step < last_step and batches_done < (epoch + 1) * batches_per_epoch:
            if batches_done % accumulation == 0:
                hooks.step_begins(step)
            phase, task_weights = schedule.at(step)
            waited = time.monotonic()
            batch = next(batches)
            data_wait += time.monotonic() - waited
            output = engine(batch, task_weights)
            hooks.after_forward(batches_done, output)
            batches_done += 1
            meter.add(output)
            if check_on_host:
                bad = exchanged(not bool(torch.isfinite(output.total)), "non-finite check")
                bad_in_a_row_on_host = bad_in_a_row_on_host + 1 if bad else 0
                if bad_in_a_row_on_host >= cfg.max_bad_steps:
                    # Now, not at the next log step: dropped micro-batches never reach a step.
                    return stop_on_nonfinite(bad_in_a_row_on_host)
                if bad:
                    continue  # every rank drops this micro-batch: no backward, no step
            engine.backward(output.total)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            if not boundary:
                continue
            step += 1
            window_steps += 1
            hooks.step_ends(step)
            stop_requested = exchanged(stop.signal_name is not None, "stop flag")

            if step % cfg.log_every == 0 or step == last_step or stop_requested:
                losses, accuracies = meter.reduce()
                nonfinite, longest_run, over_capacity = meter.health()
                meter.reset()
                elapsed = time.monotonic() - window_start
                samples_per_s = window_steps * samples_per_step / elapsed
                scalars = {
                    "loss_total": sum(losses.values()),
                    "lr": engine.get_lr()[0],
                    "loss_scale": engine_setup.loss_scale(engine),
                    "samples_per_s": samples_per_s,
                    "data_wait_share": data_wait / elapsed,
                    "epoch": batches_done / batches_per_epoch,
                    "mlm_over_capacity": over_capacity,
                }
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    scalars["grad_norm"] = float(grad_norm)
                if peak_tflops:
                    per_device = samples_per_s * flops_per_sample / info.world_size
                    scalars["mfu"] = per_device / (peak_tflops * 1e12)
                if nonfinite:
                    bad_total += nonfinite
                    scalars["skipped_nonfinite"] = bad_total
                    distributed.print0(
                        f"warning: {nonfinite} non-finite loss(es) by step {step} (their steps skipped; "
                        f"longest run {longest_run})"
                    )
                if over_capacity:
                    distributed.print0(
                        f"warning: {over_capacity} masked words by step {step} exceeded the masked-LM "
                        f"capacity and were left out; raise --mlm-capacity (now {cfg.mlm_capacity})"
                    )
                monitor.scalars("train/loss", losses, step)
                monitor.scalars("train/acc", accuracies, step)
                monitor.scalars("train", scalars, step)
                monitor.text("train/phase", phase, step)
                monitor.progress(step, batches_done / batches_per_epoch, phase, losses, samples_per_s)
                monitor.log_line(
                    output_dir / "train_log.jsonl", {"step": step, "phase": phase, "loss": losses}
                )
                window_start, data_wait, window_steps = time.monotonic(), 0.0, 0
                if longest_run >= cfg.max_bad_steps:
                    return stop_on_nonfinite(longest_run)

            if stop_requested:
                save(f"signal {stop.signal_name or 'on another rank'}")
                if info.is_main:
                    (output_dir / REQUEUE_MARKER).write_text(f"step {step}\n")
                monitor.close()
                distributed.print0("stopping on signal: checkpoint saved, exiting for requeue")
                return 0
            hooks.step_logged(step)
            epoch_end = batches_done % batches_per_epoch == 0
            if step % cfg.save_every == 0 or epoch_end or step == last_step:
                save("epoch end" if epoch_end else "periodic" if step < last_step else "final")
            if data.has_validation and (
                epoch_end or (cfg.valid_every and step % cfg.valid_every == 0) or step == last_step
            ):
                results = validate(engine, data, model_config, monitor, step, cfg.max_valid_batches)
                distributed.print0(f"validation at step {step}: {json.dumps(results)}")
                if info.is_main:
                    with open(output_dir / "validation.jsonl", "a") as handle:
                        handle.write(json.dumps({"step": step, **results}) + "\n")
            monitor.flush()
        if batches_done % batches_per_epoch:
            break  # stopped mid-epoch at max_steps
    if cfg.export:
        tag = checkpoint.find_resume_tag(checkpoint_dir)
        if info.is_main and tag is not None:
            destination = checkpoint.export_fp32(checkpoint_dir, tag, output_dir / "export", model_config)
            distributed.print0(f"exported fp32 weights of {tag} to {destination}")
        if dist.is_initialized():
            dist.barrier()
    monitor.close()
    if info.is_main:
        (output_dir / REQUEUE_MARKER).unlink(missing_ok=True)
    distributed.print0(f"done: {step} steps, {bad_total} skipped non-finite micro-batches")
    return 0


def main(argv: list[str] | None = None, hooks: StepHooks | None = None) -> int:
    """The command line entry; ``hooks`` observe the loop (see :class:`StepHooks`): the fault
    suite's entry, ``lxtrain/testing/pretrain_with_faults.py``, passes its fault hooks here."""
    try:
        cfg = parse_args(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"lxtrain/pretrain.py: error: {error}", file=sys.stderr)
        return 2
    # Handlers go in before the slow start-up (imports, engine, resume): a pre-emption signal that
    # arrives then still ends in a requeue rather than a lost job.
    stop = StopRequested()
    # Before distributed.init: DeepSpeed's process-group start-up already logs on every rank.
    info = distributed.discover()
    console.route_library_output(cfg.output_dir, info.rank, cfg.verbose)
    info = distributed.init(cfg.collective_timeout_s, info)
    try:
        return run(cfg, info, stop, hooks)
    except (ValueError, FileNotFoundError, RuntimeError, engine_setup.ConfigError) as error:
        if distributed.is_lost_peer_error(error):  # a collective inside DeepSpeed (backward, step, save)
            distributed.fail_all(distributed.lost_peer_message(error, "in a collective"))
        # The same message on every rank that hits it; os._exit so no rank waits in a collective.
        distributed.fail_all(str(error))
    return 1


if __name__ == "__main__":
    sys.exit(main())
