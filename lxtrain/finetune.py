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

if __package__ in (None, ""):
    # Run as a script (deepspeed/torchrun launch a file): sys.path[0] is lxtrain/ itself, whose
    # module names (config, data, model...) must not shadow other packages; use the repo root.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(_here)]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lxtrain import checkpoint, distributed  # noqa: E402
from lxtrain import engine as engine_setup  # noqa: E402
from lxtrain.batch import to_device  # noqa: E402
from lxtrain.data.finetune_shards import FinetuneIndex, open_finetune_index  # noqa: E402
from lxtrain.downstream import predict, weights  # noqa: E402
from lxtrain.downstream.config import FinetuneConfig, parse_args  # noqa: E402
from lxtrain.downstream.data import FinetuneLoader, build_loader  # noqa: E402
from lxtrain.downstream.models import (  # noqa: E402
    FinetuneObjective,
    FinetuneOutput,
    build_model,
    transfer_answer_head,
)
from lxtrain.model import LxmertConfig  # noqa: E402
from lxtrain.monitor import Monitor  # noqa: E402
from lxtrain.train import entry  # noqa: E402
from lxtrain.train.loop import StepHooks, StopRequested, Trainer  # noqa: E402
from lxtrain.train.meter import StepMeter  # noqa: E402


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
    engine,
    cfg: FinetuneConfig,
    loader: FinetuneLoader,
    train_loader: FinetuneLoader,
    answers,
    monitor: Monitor,
    step: int,
) -> dict | None:
    """Predict the validation split on all ranks, score on rank 0 (None elsewhere); a collective."""
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


class FinetuneMeter(StepMeter):
    """The task's loss and accuracy (soft VQA score, or 0/1 correctness) summed on the device."""

    def __init__(self, task: str, device: torch.device | str) -> None:
        super().__init__((task,), device)
        self.task = task

    def add(self, output: FinetuneOutput) -> None:
        task = self.task
        self.add_values(output.total, {task: output.total}, {task: output.score_sum}, {task: output.labelled})


class FinetuneJob:
    """What fine-tuning supplies to the shared loop: the split's batches, the task head's forward,
    its meter, validation with the task's metrics, and the fine-tuned model export."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        train: FinetuneLoader,
        valid: FinetuneLoader | None,
        answers: list[str] | None,
        model_config: LxmertConfig,
        device: torch.device,
    ) -> None:
        self.cfg, self.train, self.valid, self.answers, self.model_config = (
            cfg,
            train,
            valid,
            answers,
            model_config,
        )
        self.meter = FinetuneMeter(cfg.task, device)
        self.flops_per_sample = None
        self.has_validation = valid is not None
        self.score_name = predict.PRIMARY_METRIC[cfg.task]

    def batches(self, epoch: int, position: int):
        return self.train.epoch(epoch, position)

    def phase(self, step: int) -> str:
        return self.cfg.task

    def forward(self, engine, batch: dict, step: int) -> FinetuneOutput:
        return engine(batch)

    def window_scalars(self, step: int, losses: dict, accuracies: dict, extra_count: int) -> dict[str, float]:
        task = self.cfg.task
        return {"loss": losses.get(task, float("nan")), "accuracy": accuracies.get(task, float("nan"))}

    def validate(self, engine, monitor: Monitor, step: int) -> dict | None:
        assert self.valid is not None
        return validate(engine, self.cfg, self.valid, self.train, self.answers, monitor, step)

    def headline(self, result: dict) -> str:
        return predict.headline(self.cfg.task, result)

    def score(self, result: dict) -> float:
        return result[self.score_name]

    def export(self, checkpoint_dir: Path, tag: str, destination: Path) -> None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with checkpoint.weights_only_loads():  # never unpickle code from the checkpoint
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        weights.save_finetuned(state, self.model_config, self.cfg.task, self.answers, destination)


def engine_config(cfg: FinetuneConfig, world_size: int, total_steps: int) -> dict:
    """The DeepSpeed config of the run: the file's, completed, with ``--lr`` applied."""
    ds_config = engine_setup.prepare_deepspeed_config(
        cfg.deepspeed_config,
        world_size=world_size,
        total_steps=total_steps,
        warmup_fraction=cfg.warmup_fraction,
    )
    if cfg.lr is not None:
        ds_config["optimizer"]["params"]["lr"] = cfg.lr
        scheduler = ds_config.get("scheduler", {}).get("params", {})
        as_written = engine_setup.load_deepspeed_config(cfg.deepspeed_config)
        if as_written.get("scheduler", {}).get("params", {}).get("warmup_max_lr") == engine_setup.AUTO:
            scheduler["warmup_max_lr"] = cfg.lr
    return ds_config


def run(
    cfg: FinetuneConfig,
    info: distributed.DistributedInfo,
    stop: StopRequested,
    hooks: StepHooks | None = None,
) -> int:
    # Inputs are checked before anything is built: batch sizes, resume point, splits, answer tables, weights.
    trainer = Trainer(cfg, info, stop, hooks)
    train_index, valid_index = open_splits(cfg)
    common = dict(
        batch_size=trainer.micro_batch,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        tokenizer=cfg.tokenizer,
    )
    train = build_loader(train_index, train=True, **common)
    valid = build_loader(valid_index, train=False, **common) if valid_index else None
    plan = trainer.plan(len(train), f"{cfg.train_shards} ({train_index.examples} examples)")
    dropped = train_index.raw["dropped"]["counts"]
    if dropped:
        distributed.print0(f"note: {cfg.train_shards} conversion dropped or repaired: {dropped}")
    model, model_config, init_note = build_network(cfg, train_index)
    ds_config = engine_config(cfg, info.world_size, plan.total_steps)
    engine = engine_setup.initialize(FinetuneObjective(model, cfg.task), ds_config)
    distributed.print0(
        f"lxtrain finetune {cfg.task}: {info.world_size} rank(s) via {info.launcher}, "
        f"{engine_setup.precision(ds_config)}, {train_index.examples} training examples, "
        f"{plan.steps_per_epoch} steps/epoch, {plan.last_step} steps; {init_note}"
    )
    job = FinetuneJob(cfg, train, valid, train_index.answers, model_config, engine.device)
    return trainer.fit(job, engine, ds_config, model_config, plan)


def main(argv: list[str] | None = None, hooks: StepHooks | None = None) -> int:
    return entry.main("lxtrain/finetune.py", parse_args, run, argv, hooks)


if __name__ == "__main__":
    sys.exit(main())
