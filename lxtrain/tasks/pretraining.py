"""What pre-training supplies to the shared loop (``lxtrain.train.loop``): this rank's loaders,
the model inside its objectives and DeepSpeed engine, and :class:`PretrainJob` (the task schedule's
forward, the task meter, validation and the fp32 export). ``lxtrain/pretrain.py`` puts them together."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lxtrain import checkpoint, compiling, distributed
from lxtrain import engine as engine_setup
from lxtrain.config import PretrainConfig
from lxtrain.data.loader import build_pretrain_loader, build_valid_loader
from lxtrain.data.tokenizer import WordPieceEncoder
from lxtrain.model import LxmertForPretraining
from lxtrain.monitor import Monitor, training_flops_per_sample
from lxtrain.tasks import validation
from lxtrain.tasks.meter import TaskMeter
from lxtrain.tasks.objectives import (
    HF_VISUAL_LOSS_NORMALIZER,
    RELEASE_VISUAL_LOSS_NORMALIZER,
    ObjectiveOutput,
    PretrainingObjective,
)
from lxtrain.tasks.schedule import TaskSchedule, load_phases
from lxtrain.train.loop import training_device


class PretrainData:
    """The training and validation loaders of this rank, positioned by (epoch, batches done)."""

    def __init__(
        self, cfg: PretrainConfig, micro_batch: int, rank: int, world_size: int, accumulation: int
    ) -> None:
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
            # The global batch (world size x accumulation micro-batches) fixes the epoch's order,
            # so a resume on another world size continues the same stream (docs/data.md).
            accumulation=accumulation,
            interleave=cfg.data_interleave,
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


def build_engine(cfg: PretrainConfig, data: PretrainData, world_size: int, total_steps: int):
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
    compile_mode = compiling.resolve_compile_mode(cfg.compile, training_device(), zero_stage)
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


class PretrainJob:
    """What pre-training supplies to the shared loop: batches, the task schedule, the objectives'
    forward, the task meter and validation (see :class:`lxtrain.train.loop.TrainingJob`)."""

    def __init__(
        self,
        cfg: PretrainConfig,
        data: PretrainData,
        schedule: TaskSchedule,
        model_config,
        device: torch.device,
    ) -> None:
        self.cfg, self.data, self.schedule, self.model_config = cfg, data, schedule, model_config
        self.meter = TaskMeter(device)
        self.flops_per_sample = training_flops_per_sample(model_config)
        self.has_validation = data.has_validation
        self.identity = checkpoint.run_identity(model_config, data.train.index)
        self.score_name = ""  # no best-model tracking (see score)

    def batches(self, epoch: int, position: int):
        return self.data.train_batches(epoch, position)

    def data_state(self, epoch: int, position: int) -> dict:
        """The training stream's layout and this position, for a checkpoint."""
        return {**self.data.train.state_dict(), "epoch": epoch, "batches_consumed": position}

    def check_data_state(self, state: dict) -> None:
        # The loader refuses what it cannot continue exactly (naming the key, both values and the
        # fix); another world size or worker count is fine.
        self.data.train.load_state_dict(state)

    def phase(self, step: int) -> str:
        return self.schedule.at(step)[0]

    def forward(self, engine, batch: dict, step: int) -> ObjectiveOutput:
        return engine(batch, self.schedule.at(step)[1])

    def window_scalars(
        self, step: int, losses: dict, accuracies: dict, over_capacity: int
    ) -> dict[str, float]:
        if over_capacity:
            distributed.print0(
                f"warning: {over_capacity} masked words by step {step} exceeded the masked-LM "
                f"capacity and were left out; raise --mlm-capacity (now {self.cfg.mlm_capacity})"
            )
        return {"mlm_over_capacity": over_capacity}

    def validate(self, engine, monitor: Monitor, step: int) -> dict:
        return validation.validate(
            engine, self.data, self.model_config, monitor, step, self.cfg.max_valid_batches
        )

    def headline(self, result: dict) -> str:
        return json.dumps(result)

    def score(self, result: dict) -> None:
        return None  # pre-training exports its last checkpoint, not a best one

    def export(self, checkpoint_dir: Path, tag: str, destination: Path) -> None:
        checkpoint.export_fp32(checkpoint_dir, tag, destination, self.model_config)


def task_schedule(cfg: PretrainConfig, steps_per_epoch: int) -> TaskSchedule:
    """The recipe's task schedule (with ``--phases-file`` phases, if given)."""
    phases = load_phases(cfg.phases_file) if cfg.phases_file else ()
    return TaskSchedule(cfg.recipe, steps_per_epoch, cfg.epochs, seed=cfg.seed, phases=phases)


def startup_line(
    cfg: PretrainConfig, info: distributed.DistributedInfo, engine, ds_config: dict, plan
) -> str:
    return (
        f"lxtrain: {info.world_size} rank(s) via {info.launcher}, {engine_setup.precision(ds_config)}, "
        f"ZeRO-{ds_config.get('zero_optimization', {}).get('stage', 0)}, "
        f"{sum(p.numel() for p in engine.module.parameters()) / 1e6:.1f}M params, "
        f"{plan.steps_per_epoch} steps/epoch, {plan.last_step} steps, recipe {cfg.recipe}, "
        f"compile {engine.module.compile_mode}"
    )
