"""What fine-tuning supplies to the shared loop (``lxtrain.train.loop``): the checked splits, the
task model initialised from pre-trained weights, the DeepSpeed config with ``--lr`` applied, and
:class:`FinetuneJob` (forward, meter, validation with the task's metrics, the fine-tuned export).
``lxtrain/finetune.py`` puts them together."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from lxtrain import checkpoint, distributed
from lxtrain import engine as engine_setup
from lxtrain.batch import to_device
from lxtrain.data.finetune_shards import FinetuneIndex, open_finetune_index
from lxtrain.data.plan import refuse_layout_change
from lxtrain.downstream import predict, weights
from lxtrain.downstream.config import FinetuneConfig
from lxtrain.downstream.data import FinetuneLoader, build_loader
from lxtrain.downstream.models import FinetuneObjective, FinetuneOutput, build_model, transfer_answer_head
from lxtrain.model import LxmertConfig
from lxtrain.model.attention import set_attention_backend
from lxtrain.monitor import Monitor
from lxtrain.train.meter import StepMeter


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


class FinetuneData:
    """The checked splits and this rank's training and validation loaders."""

    def __init__(
        self, cfg: FinetuneConfig, micro_batch: int, rank: int, world_size: int, accumulation: int
    ) -> None:
        self.train_index, self.valid_index = open_splits(cfg)
        layout = {"batch_size": micro_batch, "rank": rank, "world_size": world_size, "seed": cfg.seed}
        options = {"num_workers": cfg.num_workers, "tokenizer": cfg.tokenizer, **layout}
        # The global batch fixes the training order, whatever the world size (docs/data.md).
        self.train = build_loader(self.train_index, train=True, accumulation=accumulation, **options)
        self.valid = build_loader(self.valid_index, train=False, **options) if self.valid_index else None
        self.answers = self.train_index.answers
        self.what = f"{cfg.train_shards} ({self.train_index.examples} examples)"
        # What fixes the training order besides the position: a resume must keep it (FinetuneJob).
        self.layout = {
            "seed": cfg.seed,
            "batch_size": micro_batch,
            "micro_batches_per_step": world_size * accumulation,
            "examples": self.train_index.examples,
        }
        dropped = self.train_index.raw["dropped"]["counts"]
        if dropped:
            distributed.print0(f"note: {cfg.train_shards} conversion dropped or repaired: {dropped}")


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
    set_attention_backend(model, cfg.attention)  # the run's --attention; LXTRAIN_ATTENTION still wins
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
        self, cfg: FinetuneConfig, data: FinetuneData, model_config: LxmertConfig, device: torch.device
    ) -> None:
        self.cfg, self.model_config = cfg, model_config
        self.train, self.valid, self.answers = data.train, data.valid, data.answers
        self.layout = data.layout
        self.meter = FinetuneMeter(cfg.task, device)
        self.flops_per_sample = None
        self.has_validation = data.valid is not None
        self.identity = checkpoint.run_identity(model_config, data.train_index)
        self.score_name = predict.PRIMARY_METRIC[cfg.task]

    def batches(self, epoch: int, position: int):
        return self.train.epoch(epoch, position)

    def data_state(self, epoch: int, position: int) -> dict:
        return {"epoch": epoch, "batches_consumed": position, **self.layout}

    def check_data_state(self, state: dict) -> None:
        refuse_layout_change(state, self.layout)

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
        state = checkpoint.fp32_state_dict(checkpoint_dir, tag, prefix="model.")
        weights.save_finetuned(state, self.model_config, self.cfg.task, self.answers, destination)


def build_engine(cfg: FinetuneConfig, data: FinetuneData, world_size: int, total_steps: int):
    """(engine, model config, DeepSpeed config, a note on where the weights came from)."""
    model, model_config, init_note = build_network(cfg, data.train_index)
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
    engine = engine_setup.initialize(FinetuneObjective(model, cfg.task), ds_config)
    return engine, model_config, ds_config, init_note
