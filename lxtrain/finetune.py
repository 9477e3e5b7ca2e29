"""LXMERT fine-tuning (VQA, GQA, NLVR2): config -> data -> model -> DeepSpeed engine -> the shared training loop.

    deepspeed --num_gpus 8 lxtrain/finetune.py --task vqa --deepspeed_config ds_configs/finetune_vqa.json \
        --init runs/base/export --train-shards shards/vqa_train --valid-shards shards/vqa_minival \
        --output-dir runs/vqa

The same file runs under ``torchrun``, ``mpirun`` and ``srun`` (``slurm/pretrain.sbatch`` with
``LXTRAIN_SCRIPT=lxtrain/finetune.py``), exactly like ``lxtrain/pretrain.py``, and runs the same loop
(``lxtrain.train.loop``) with :class:`FinetuneJob`. docs/finetune.md has the whole flow.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # launched as a file: lxtrain/'s own modules must not shadow others
    _here, _root = Path(__file__).resolve().parent, str(Path(__file__).resolve().parents[1])
    sys.path[:] = [_root] + [p for p in sys.path if Path(p or ".").resolve() != _here]

from lxtrain import distributed, engine  # noqa: E402
from lxtrain.downstream.config import FinetuneConfig, parse_args  # noqa: E402
from lxtrain.downstream.finetuning import FinetuneData, FinetuneJob, build_engine  # noqa: E402
from lxtrain.train import entry, loop  # noqa: E402


def run(
    cfg: FinetuneConfig,
    info: distributed.DistributedInfo,
    stop: loop.StopRequested,
    hooks: loop.StepHooks | None = None,
) -> int:
    # Inputs are checked before anything is built: batch sizes, resume point, splits, answer tables, weights.
    trainer = loop.Trainer(cfg, info, stop, hooks)
    data = FinetuneData(cfg, trainer.micro_batch, info.rank, info.world_size, trainer.accumulation)
    plan = trainer.plan(len(data.train), data.what)
    ds_engine, model_config, ds_config, init_note = build_engine(cfg, data, info.world_size, plan.total_steps)
    distributed.print0(
        f"lxtrain finetune {cfg.task}: {info.world_size} rank(s) via {info.launcher}, "
        f"{engine.precision(ds_config)}, {data.train_index.examples} training examples, "
        f"{plan.steps_per_epoch} steps/epoch, {plan.last_step} steps; {init_note}"
    )
    job = FinetuneJob(cfg, data, model_config, ds_engine.device)
    return trainer.fit(job, ds_engine, ds_config, model_config, plan)


def main(argv: list[str] | None = None, hooks: loop.StepHooks | None = None) -> int:
    return entry.main("lxtrain/finetune.py", parse_args, run, argv, hooks)


if __name__ == "__main__":
    sys.exit(main())
