"""LXMERT pre-training: config -> data -> model -> DeepSpeed engine -> the shared training loop.

    deepspeed --num_gpus 2 lxtrain/pretrain.py --deepspeed_config ds_configs/zero2_bf16.json \
        --train-shards shards/train --valid-shards shards/minival --output-dir runs/base

The same file runs under ``torchrun``, ``mpirun`` and ``srun`` (see ``lxtrain.distributed``). What
pre-training supplies to the loop (``lxtrain.train.loop``) is :class:`PretrainJob`: the shards, the
task schedule, the five objectives and their validation.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # launched as a file: lxtrain/'s own modules must not shadow others
    _here, _root = Path(__file__).resolve().parent, str(Path(__file__).resolve().parents[1])
    sys.path[:] = [_root] + [p for p in sys.path if Path(p or ".").resolve() != _here]

from lxtrain import distributed  # noqa: E402
from lxtrain.config import PretrainConfig, parse_args  # noqa: E402
from lxtrain.tasks import pretraining  # noqa: E402
from lxtrain.train.entry import main as entry_main  # noqa: E402
from lxtrain.train.loop import StepHooks, StopRequested, Trainer  # noqa: E402


def run(
    cfg: PretrainConfig,
    info: distributed.DistributedInfo,
    stop: StopRequested,
    hooks: StepHooks | None = None,
) -> int:
    # Everything that can be wrong with the inputs is checked before the model is built.
    trainer = Trainer(cfg, info, stop, hooks)
    data = pretraining.PretrainData(
        cfg, trainer.micro_batch, info.rank, info.world_size, trainer.accumulation
    )
    plan = trainer.plan(data.batches_per_epoch, str(cfg.train_shards))
    schedule = pretraining.task_schedule(cfg, plan.steps_per_epoch)
    engine, model_config, ds_config = pretraining.build_engine(cfg, data, info.world_size, plan.total_steps)
    distributed.print0(pretraining.startup_line(cfg, info, engine, ds_config, plan))
    job = pretraining.PretrainJob(cfg, data, schedule, model_config, engine.device)
    return trainer.fit(job, engine, ds_config, model_config, plan)


def main(argv: list[str] | None = None, hooks: StepHooks | None = None) -> int:
    """The command line entry; ``hooks`` observe the loop (see :class:`StepHooks`): the fault
    suite's entry, ``lxtrain/testing/pretrain_with_faults.py``, passes its fault hooks here."""
    return entry_main("lxtrain/pretrain.py", parse_args, run, argv, hooks)


if __name__ == "__main__":
    sys.exit(main())
