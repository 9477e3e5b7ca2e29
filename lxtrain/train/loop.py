"""The training loop of both entry points: pre-training and fine-tuning supply a :class:`TrainingJob`
(their data, objective forward, meter and validation); everything else lives here once.

What the loop owns:

- **stopping**: SIGTERM / SIGUSR1 (Slurm's pre-timeout signal) set a flag that every rank learns
  at the next step boundary; the run saves a checkpoint, writes ``REQUEUE`` and exits 0 for the
  requeue. A peer process that is gone turns into one clear error on every rank instead of a hang;
- **resume**: ``--resume auto`` (the newest complete tag), ``none``, or an explicit checkpoint
  directory, which must be complete; the data position continues from the checkpoint's step;
- **non-finite losses**: counted on the device where DeepSpeed skips such steps itself, checked per
  micro-batch on the host where it would apply them; ``--max-bad-steps`` in a row stop the run with
  the last good weights saved (exit code :data:`EXIT_NONFINITE`);
- **cadence**: logging, periodic / epoch-end / final checkpoints, validation, best-model and final
  exports, and the ``done`` line.

A training step reads nothing back from the device (``tests/test_syncs.py`` measures it): metrics are
summed on the device by the job's :class:`lxtrain.train.meter.StepMeter` and read at log steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from lxtrain import checkpoint, distributed
from lxtrain import engine as engine_setup
from lxtrain.data.prefetch import DevicePrefetcher
from lxtrain.monitor import Monitor, detect_peak_tflops
from lxtrain.train.meter import StepMeter

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

    def after_forward(self, batches_done: int, output: Any) -> None:
        pass

    def step_ends(self, step: int) -> None:
        pass

    def step_logged(self, step: int) -> None:
        pass

    def before_checkpoint_complete(self, step: int) -> None:
        pass


class TrainingJob(Protocol):
    """What an entry point supplies to the loop.

    Attributes:
        meter: sums the job's metrics on the device; the loop adds every micro-batch's output
            through ``meter.add(output)`` and reads it at log steps.
        flops_per_sample: training FLOPs of one example, for the MFU scalar (None: not logged).
        has_validation: whether :meth:`validate` has data.
        score_name: the name of the value :meth:`score` returns (for the best-model line).
        identity: :func:`lxtrain.checkpoint.run_identity` of the run (model shape, shard set):
            recorded in every checkpoint, and a resume from one that differs is refused.
    """

    meter: StepMeter
    flops_per_sample: float | None
    has_validation: bool
    score_name: str
    identity: dict[str, Any]

    def batches(self, epoch: int, position: int) -> Iterable[Mapping[str, Any]]:
        """This rank's host batches of ``epoch`` from micro-batch ``position`` on."""

    def data_state(self, epoch: int, position: int) -> dict:
        """What a checkpoint records of the data stream at micro-batch ``position`` of ``epoch``."""

    def check_data_state(self, state: dict) -> None:
        """Raise ValueError (naming the key, both values and the fix) if this run cannot continue
        the stream of a checkpoint's :meth:`data_state` exactly."""

    def phase(self, step: int) -> str:
        """A short name of what step ``step + 1`` trains (logged with the losses)."""

    def forward(self, engine: Any, batch: Mapping[str, Any], step: int) -> Any:
        """The engine's forward of one device batch during step ``step + 1``; returns an output
        with a 0-dim ``total`` loss."""

    def window_scalars(
        self, step: int, losses: dict[str, float], accuracies: dict[str, float], extra_count: int
    ) -> dict[str, float]:
        """Job-specific scalars of a log window, given its reduced losses and accuracies;
        ``extra_count`` is the meter's own event count (warnings about it are printed here)."""

    def validate(self, engine: Any, monitor: Monitor, step: int) -> dict | None:
        """Validation metrics (None on ranks that do not report); a collective."""

    def headline(self, result: dict) -> str:
        """One console line of a validation result."""

    def score(self, result: dict) -> float | None:
        """The higher-is-better value a best model is chosen by; None: no best-model tracking."""

    def export(self, checkpoint_dir: Path, tag: str, destination: Path) -> None:
        """Write the consolidated weights of checkpoint ``tag`` to ``destination`` (rank 0 only)."""


@dataclass(frozen=True)
class StepPlan:
    """How micro-batches, optimiser steps and epochs line up for this run."""

    accumulation: int
    steps_per_epoch: int
    total_steps: int
    last_step: int

    @property
    def batches_per_epoch(self) -> int:
        # An epoch ends on an optimiser-step boundary: the last (< accumulation) micro-batches of
        # the loader's epoch are left out, so epoch ends, schedules and checkpoints line up with steps.
        return self.steps_per_epoch * self.accumulation


def resume_point(resume: str, checkpoint_dir: Path) -> tuple[Path, str] | None:
    """Where ``--resume`` (``auto``, ``none`` or a checkpoint directory) continues from, checked."""
    if resume == "none":
        return None
    if resume == "auto":
        tag = checkpoint.find_resume_tag(checkpoint_dir)
        return None if tag is None else (checkpoint_dir, tag)
    path = Path(resume)
    if not (path / checkpoint.COMPLETE).exists():
        raise FileNotFoundError(
            f"--resume {resume}: not a complete lxtrain checkpoint directory (no {checkpoint.COMPLETE} "
            f"marker); pass a step directory under OUTPUT_DIR/checkpoints, or --resume auto for the "
            "newest complete one"
        )
    return path.parent, path.name


def micro_batch_seed(seed: int, step: int, place: int) -> int:
    """A 63-bit seed for micro-batch ``place`` of optimiser step ``step + 1`` of a run seeded ``seed``."""
    # splitmix64-style mixing: distinct inputs give unrelated seeds, cheaply and without a hash object.
    value = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + place * 0x94D049BB133111EB) % 2**64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) % 2**64
    return (value ^ (value >> 31)) % 2**63


def training_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Trainer:
    """One training run of an entry point: checks its inputs at construction (before anything slow
    is built), then :meth:`fit` runs the loop on the job and engine the entry point built.

    ``cfg`` is either entry point's config; the loop reads its shared fields (``output_dir``,
    ``deepspeed_config``, ``resume``, ``epochs``, ``max_steps``, ``log_every``, ``save_every``,
    ``valid_every``, ``keep_last``, ``max_bad_steps``, ``export``).
    """

    def __init__(
        self,
        cfg: Any,
        info: distributed.DistributedInfo,
        stop: StopRequested,
        hooks: StepHooks | None = None,
    ) -> None:
        self.cfg, self.info, self.stop = cfg, info, stop
        self.hooks = hooks or StepHooks()
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        ds_json = engine_setup.load_deepspeed_config(cfg.deepspeed_config)
        _, self.micro_batch, self.accumulation = engine_setup.resolve_batch_sizes(
            dict(ds_json), info.world_size, cfg.deepspeed_config
        )
        engine_setup.check_deepspeed_config(ds_json, cfg.deepspeed_config)
        self.resume_from = resume_point(cfg.resume, self.checkpoint_dir)

    def plan(self, loader_batches: int, what: str) -> StepPlan:
        """Steps from this rank's micro-batches per epoch (``loader_batches``); ``what`` names the data."""
        steps_per_epoch = loader_batches // self.accumulation
        if steps_per_epoch == 0:
            raise ValueError(
                f"{what}: {loader_batches} micro-batches of {self.micro_batch} per rank per epoch, fewer than "
                f"gradient_accumulation_steps={self.accumulation}: an epoch is cut into streams of whole "
                "micro-batches, (micro-batches per step) x (data interleave) of them whatever the world size "
                "(docs/data.md); use more data or a smaller train_micro_batch_size_per_gpu / train_batch_size"
            )
        total_steps = math.ceil(self.cfg.epochs * steps_per_epoch)
        last_step = min(total_steps, self.cfg.max_steps) if self.cfg.max_steps else total_steps
        return StepPlan(self.accumulation, steps_per_epoch, total_steps, last_step)

    def fit(self, job: TrainingJob, engine: Any, ds_config: dict, model_config: Any, plan: StepPlan) -> int:
        """Resume if asked, train to ``plan.last_step`` (or a stop), export; the exit code."""
        return _Loop(self, job, engine, ds_config, model_config, plan).run()


class _Loop:
    """The state of one :meth:`Trainer.fit` (positions, windows, best score) and its steps."""

    def __init__(
        self,
        trainer: Trainer,
        job: TrainingJob,
        engine: Any,
        ds_config: dict,
        model_config: Any,
        plan: StepPlan,
    ) -> None:
        self.t, self.job, self.engine, self.plan = trainer, job, engine, plan
        self.cfg, self.info, self.hooks = trainer.cfg, trainer.info, trainer.hooks
        self.ds_config = ds_config
        self.step, self.batches_done, self.best = 0, 0, None
        if trainer.resume_from is not None:
            self._resume(*trainer.resume_from)
        self.monitor = Monitor(trainer.output_dir / "tensorboard", plan.last_step, enabled=self.info.is_main)
        if self.info.is_main:
            trainer.output_dir.mkdir(parents=True, exist_ok=True)
            record = {
                "lxtrain": dataclasses.asdict(self.cfg),
                "deepspeed": ds_config,
                "model": model_config.to_dict(),
            }
            (trainer.output_dir / "run_config.json").write_text(json.dumps(record, indent=2))
        self.peak_tflops = getattr(self.cfg, "peak_tflops", None) or detect_peak_tflops()
        # Where the engine skips a step with non-finite gradients itself (lxtrain.engine), a NaN loss
        # needs no host read: the meter counts it on the device and the log step enforces
        # --max-bad-steps. Elsewhere every micro-batch's loss is checked on the host and a bad one
        # is dropped before backward.
        self.check_on_host = not engine_setup.skips_nonfinite_steps(ds_config)
        self.bad_total, self.bad_in_a_row_on_host = 0, 0
        self._start_window()

    # -- positions and checkpoints ----------------------------------------------------------

    def _resume(self, directory: Path, tag: str) -> None:
        if "data" in (saved := checkpoint.read_state(directory, tag)):
            try:  # before DeepSpeed reads anything
                self.job.check_data_state(saved["data"])
            except ValueError as error:
                raise ValueError(f"--resume {directory / tag}: {error}") from None
        state = checkpoint.load(self.engine, directory, tag, identity=self.job.identity)
        self.step, self.best = state["step"], state.get("best")
        same_layout = (
            state.get("accumulation", self.plan.accumulation) == self.plan.accumulation
            and state.get("world_size", self.info.world_size) == self.info.world_size
        )
        # The rank's own micro-batch count where the layout is unchanged (it also counts micro-batches
        # dropped as non-finite); otherwise the position follows from the step.
        self.batches_done = state["batches_done"] if same_layout else self.step * self.plan.accumulation
        distributed.print0(f"resumed from {directory / tag} at step {self.step}")

    def _save(self, reason: str) -> None:
        step = self.step
        state = {
            "step": step,
            "batches_done": self.batches_done,
            "epoch": self.batches_done / self.plan.batches_per_epoch,
            "accumulation": self.plan.accumulation,
            "world_size": self.info.world_size,
            "best": self.best,
            "identity": self.job.identity,
            "data": self.job.data_state(*divmod(self.batches_done, self.plan.batches_per_epoch)),
            "reason": reason,
            "config": dataclasses.asdict(self.cfg),
        }
        checkpoint.save(
            self.engine,
            self.t.checkpoint_dir,
            step,
            state,
            self.cfg.keep_last,
            before_complete=lambda: self.hooks.before_checkpoint_complete(step),
        )
        distributed.print0(f"checkpoint saved at step {step} ({reason})")

    def _export(self, name: str) -> None:
        """Consolidate the newest checkpoint into ``OUTPUT_DIR/name`` on rank 0; the others wait."""
        tag = checkpoint.find_resume_tag(self.t.checkpoint_dir)
        if self.info.is_main and tag is not None:
            self.job.export(self.t.checkpoint_dir, tag, self.t.output_dir / name)
            distributed.print0(f"exported {tag} to {self.t.output_dir / name}")
        if dist.is_initialized():
            dist.barrier()

    # -- collectives ---------------------------------------------------------------------------

    def _any_rank(self, flag: bool, what: str) -> bool:
        try:
            return distributed.any_rank(flag)
        except Exception as error:  # gloo raises when a peer process is gone
            if not distributed.is_lost_peer_error(error):
                raise  # e.g. this rank's data-loader worker died while we waited
            distributed.fail_all(distributed.lost_peer_message(error, f"at step {self.step} ({what})"))
            raise

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        plan, engine = self.plan, self.engine
        engine.train()
        while self.step < plan.last_step:
            epoch, position = divmod(self.batches_done, plan.batches_per_epoch)
            # Copied to the device one batch ahead (a side stream on GPUs), object masks applied there.
            batches = iter(DevicePrefetcher(self.job.batches(epoch, position), engine.device))
            while self.step < plan.last_step and self.batches_done < (epoch + 1) * plan.batches_per_epoch:
                code = self._micro_batch(batches)
                if code is not None:
                    return code
            if self.batches_done % plan.batches_per_epoch:
                break  # stopped mid-epoch at max_steps
        if self.cfg.export:
            self._export("export")
        self._finish()
        return 0

    def _micro_batch(self, batches) -> int | None:
        """One micro-batch, and the step it completes; an exit code when the run must stop."""
        plan, engine, hooks = self.plan, self.engine, self.hooks
        if self.batches_done % plan.accumulation == 0:
            hooks.step_begins(self.step)
        waited = time.monotonic()
        batch = next(batches)
        self.data_wait += time.monotonic() - waited
        torch.manual_seed(self._dropout_seed())
        output = self.job.forward(engine, batch, self.step)
        hooks.after_forward(self.batches_done, output)
        self.batches_done += 1
        self.job.meter.add(output)
        if self.check_on_host:
            bad = self._any_rank(not bool(torch.isfinite(output.total)), "non-finite check")
            self.bad_in_a_row_on_host = self.bad_in_a_row_on_host + 1 if bad else 0
            if self.bad_in_a_row_on_host >= self.cfg.max_bad_steps:
                # Now, not at the next log step: dropped micro-batches never reach a step.
                return self._stop_on_nonfinite(self.bad_in_a_row_on_host)
            if bad:
                return None  # every rank drops this micro-batch: no backward, no step
        engine.backward(output.total)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        if not boundary:
            return None
        self.step += 1
        self.window_steps += 1
        hooks.step_ends(self.step)
        return self._after_step()

    def _dropout_seed(self) -> int:
        """The torch seed of this micro-batch's forward: a function of (seed, step, the micro-batch's
        place j in the global step), so dropout draws the same masks for the same global batch
        whatever the world size (rank r of W runs j = r * accumulation + i, as the loader reads
        them: lxtrain.data.loader), and a resume on any world size continues them exactly."""
        within = self.batches_done % self.plan.accumulation
        place = self.info.rank * self.plan.accumulation + within
        return micro_batch_seed(self.cfg.seed, self.step, place)

    def _after_step(self) -> int | None:
        step, plan, cfg = self.step, self.plan, self.cfg
        stop_requested = self._any_rank(self.t.stop.signal_name is not None, "stop flag")
        if step % cfg.log_every == 0 or step == plan.last_step or stop_requested:
            longest_run = self._log_window()
            if longest_run >= cfg.max_bad_steps:
                return self._stop_on_nonfinite(longest_run)
        if stop_requested:
            self._save(f"signal {self.t.stop.signal_name or 'on another rank'}")
            if self.info.is_main:
                (self.t.output_dir / REQUEUE_MARKER).write_text(f"step {step}\n")
            self.monitor.close()
            distributed.print0("stopping on signal: checkpoint saved, exiting for requeue")
            return 0
        self.hooks.step_logged(step)
        epoch_end = self.batches_done % plan.batches_per_epoch == 0
        saved = step % cfg.save_every == 0 or epoch_end or step == plan.last_step
        if saved:
            self._save("epoch end" if epoch_end else "periodic" if step < plan.last_step else "final")
        if self.job.has_validation and (
            epoch_end or (cfg.valid_every and step % cfg.valid_every == 0) or step == plan.last_step
        ):
            self._validate(saved)
        self.monitor.flush()
        return None

    def _start_window(self) -> None:
        self.window_start, self.data_wait, self.window_steps = time.monotonic(), 0.0, 0

    def _log_window(self) -> int:
        """Log the window since the last log step; the longest run of non-finite losses in it."""
        step, engine, meter = self.step, self.engine, self.job.meter
        losses, accuracies = meter.reduce()
        nonfinite, longest_run, extra_count = meter.health()
        meter.reset()
        elapsed = time.monotonic() - self.window_start
        samples_per_s = self.window_steps * self.ds_config["train_batch_size"] / elapsed
        epoch = self.batches_done / self.plan.batches_per_epoch
        scalars = {
            "loss_total": sum(losses.values()),
            "lr": engine.get_lr()[0],
            "loss_scale": engine_setup.loss_scale(engine),
            "samples_per_s": samples_per_s,
            "data_wait_share": self.data_wait / elapsed,
            "epoch": epoch,
            **self.job.window_scalars(step, losses, accuracies, extra_count),
        }
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        if self.peak_tflops and self.job.flops_per_sample:
            per_device = samples_per_s * self.job.flops_per_sample / self.info.world_size
            scalars["mfu"] = per_device / (self.peak_tflops * 1e12)
        if nonfinite:
            self.bad_total += nonfinite
            scalars["skipped_nonfinite"] = self.bad_total
            distributed.print0(
                f"warning: {nonfinite} non-finite loss(es) by step {step} (their steps skipped; "
                f"longest run {longest_run})"
            )
        phase = self.job.phase(step - 1)
        self.monitor.scalars("train/loss", losses, step)
        self.monitor.scalars("train/acc", accuracies, step)
        self.monitor.scalars("train", scalars, step)
        self.monitor.text("train/phase", phase, step)
        self.monitor.progress(step, epoch, phase, losses, samples_per_s)
        record = {"step": step, "phase": phase, "loss": losses, "acc": accuracies, "lr": scalars["lr"]}
        self.monitor.log_line(self.t.output_dir / "train_log.jsonl", record)
        self._start_window()
        return longest_run

    def _validate(self, saved: bool) -> None:
        step = self.step
        result = self.job.validate(self.engine, self.monitor, step)
        improved = False
        if self.info.is_main and result is not None:
            distributed.print0(f"validation at step {step}: {self.job.headline(result)}")
            with open(self.t.output_dir / "validation.jsonl", "a") as handle:
                handle.write(json.dumps({"step": step, **result}) + "\n")
            value = self.job.score(result)
            improved = value is not None and (self.best is None or value > self.best["value"])
            if improved:
                self.best = {"step": step, "value": value}
        flag = torch.tensor([int(improved)])
        if dist.is_initialized():
            distributed.broadcast_(flag, src=0)
        if flag.item() and self.cfg.export:
            if not saved:
                self._save("best validation")
            self._export("best")

    def _stop_on_nonfinite(self, in_a_row: int) -> int:
        self._save("non-finite losses")
        self.monitor.close()
        distributed.print0(
            f"error: {in_a_row} non-finite losses in a row by step {self.step}; stopped with the last good "
            f"weights saved in {self.t.checkpoint_dir}"
        )
        return EXIT_NONFINITE

    def _finish(self) -> None:
        self.monitor.close()
        if self.info.is_main:
            (self.t.output_dir / REQUEUE_MARKER).unlink(missing_ok=True)
            if self.best is not None:
                distributed.print0(
                    f"best validation {self.job.score_name} {self.best['value']:.4f} at step {self.best['step']}"
                )
        distributed.print0(f"done: {self.step} steps, {self.bad_total} skipped non-finite micro-batches")
