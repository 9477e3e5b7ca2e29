"""Pre-training run configuration: one dataclass, one CLI, checked before any compute."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lxtrain.cli import parse_config
from lxtrain.compiling import COMPILE_MODES
from lxtrain.model.config import ATTENTION_BACKENDS, LxmertConfig
from lxtrain.tasks.objectives import DEFAULT_MLM_CAPACITY
from lxtrain.tasks.schedule import RECIPES

# LxmertConfig fields each preset sets (the rest keep LXMERT-base's values); the feature
# dimension and answer count come from the shards.
MODEL_PRESET_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        num_language_layers=2,
        num_object_layers=1,
        num_cross_layers=1,
        max_position_embeddings=64,
    ),
    "small": dict(
        hidden_size=256,
        num_attention_heads=4,
        intermediate_size=1024,
        num_language_layers=3,
        num_object_layers=2,
        num_cross_layers=2,
    ),
    "base": {},
}
MODEL_PRESETS = tuple(MODEL_PRESET_SIZES)


@dataclasses.dataclass
class PretrainConfig:
    """Everything a pre-training run needs besides the DeepSpeed JSON."""

    deepspeed_config: str
    """DeepSpeed JSON (ds_configs/*.json): batch sizes, precision, ZeRO stage, optimiser, LR schedule."""
    train_shards: str
    """Training shards: a directory with index.json, an index.json, or shard paths/URLs (pipe:, https, {a..b})."""
    output_dir: str
    """Run directory: checkpoints/, tensorboard/, export/, logs."""
    valid_shards: str | None = None
    """Validation shards (mscoco_minival-style), in any form --train-shards takes; no validation without."""
    train_shard_index: str | None = None
    """The training shards' index.json (path or URL) when it is not next to them (URL sources)."""
    model: str = "base"
    """Model size: tiny | small | base (LXMERT-base, 228M), or a JSON file of LxmertConfig fields."""
    epochs: float = 20.0
    """Epochs over the training shards (the paper: 20)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (the LR schedule still spans all epochs)."""
    recipe: str = "paper"
    """Task recipe: paper (P10+QA10) | release (QA always on) | phased | sampled | phases."""
    phases_file: str | None = None
    """JSON list of phases for recipe 'phases'."""
    seed: int = 9595
    """Seed of model init, data order and masking."""
    resume: str = "auto"
    """auto: newest complete checkpoint in output_dir if any; none: start fresh; or a checkpoint path."""
    save_every: int = 1000
    """Checkpoint every N optimiser steps (and at every epoch end)."""
    keep_last: int = 3
    """Complete checkpoints to keep."""
    log_every: int = 10
    """Log training scalars every N steps."""
    valid_every: int = 0
    """Validate every N steps (0: only at epoch ends)."""
    attention_image_every: int = 0
    """Log cross-modality attention images every N steps (0: at validation only)."""
    max_valid_batches: int | None = None
    """Cap on validation batches per rank (None: the whole validation set)."""
    num_workers: int = 2
    """Data-loader worker processes per rank (at most the rank's data streams, accumulation x
    --data-interleave; a larger count is lowered with a warning; any count gives the same batches)."""
    data_interleave: int = 2
    """Virtual data streams per micro-batch of a step: the epoch's order is cut into (micro-batches per
    step x this) streams, whatever the world size (docs/data.md). Raise it for more loader workers
    per rank; fixed for a run (a resume refuses another value)."""
    strict_data: bool = False
    """Validation: stop on a corrupt sample instead of skipping it with a warning (damaged
    training data always stops the run, naming the shard and the fix)."""
    visual_loss_normalizer: str = "release"
    """release (1/0.15, the reference and the paper) or hf (6.67, HF transformers)."""
    warmup_fraction: float = 0.05
    """Share of all steps spent in linear LR warm-up (reference: 5%)."""
    max_bad_steps: int = 5
    """Stop (with a checkpoint of the last good state) after this many non-finite losses in a row."""
    zero_visual_input: bool = False
    """Control run: feed all-zero object features and boxes (a language-only baseline)."""
    object_words: str | None = None
    """Comma-separated words whose masked-LM accuracy is reported on its own (valid/acc/mlm_object_words)."""
    object_word_mask_probability: float | None = None
    """Mask the --object-words at this rate in training (default: 0.15 like every word, as in LXMERT).
    An extension, not LXMERT's recipe: more labels on the words that only the image decides."""
    tokenizer: str | None = None
    """Path to a BERT vocab.txt (default: the offline BERT uncased vocabulary)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for the MFU estimate (default: known GPUs; none on CPU)."""
    collective_timeout_s: float = 300.0
    """Upper bound on any collective: a dead rank makes the others stop within it."""
    export: bool = True
    """Write a consolidated fp32 export (lxtrain format) at the end."""
    compile: str = "auto"
    """torch.compile of the training forward: auto (on CUDA GPUs, not under ZeRO-3) | off | default | cudagraphs."""
    attention: str = "auto"
    """Attention backend: auto (sdpa today) | eager | sdpa | fused (GPU kernels, not under ZeRO-3); LXTRAIN_ATTENTION, if set, wins."""
    mlm_capacity: float = DEFAULT_MLM_CAPACITY
    """Share of a micro-batch's B x T positions the masked-LM head evaluates (a fixed shape: no sync);
    masked words beyond it are left out and counted (train/mlm_over_capacity)."""
    verbose: bool = False
    """Also show DeepSpeed's, torch's and Python warnings' INFO/WARNING output on the console (always in OUTPUT_DIR/logs/rank<N>.log)."""

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe {self.recipe!r} is not one of {RECIPES}")
        if self.recipe == "phases" and not self.phases_file:
            raise ValueError("--recipe phases needs --phases-file FILE.json")
        if self.visual_loss_normalizer not in ("release", "hf"):
            raise ValueError(
                f"--visual-loss-normalizer must be 'release' or 'hf'; got {self.visual_loss_normalizer!r}"
            )
        if self.epochs <= 0:
            raise ValueError(f"--epochs must be > 0; got {self.epochs}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"--warmup-fraction must be in [0, 1); got {self.warmup_fraction}")
        if self.model not in MODEL_PRESETS and not Path(self.model).is_file():
            raise ValueError(f"--model {self.model!r} is neither a preset {MODEL_PRESETS} nor a JSON file")
        if self.object_word_mask_probability is not None:
            if not 0 <= self.object_word_mask_probability <= 1:
                raise ValueError(
                    f"--object-word-mask-probability must be in [0, 1]; got {self.object_word_mask_probability}"
                )
            if not (self.object_words or "").strip():
                raise ValueError("--object-word-mask-probability needs --object-words (the words to mask)")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"--compile {self.compile!r} is not one of {COMPILE_MODES}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention {self.attention!r} is not one of {ATTENTION_BACKENDS}")
        if not 0 < self.mlm_capacity <= 1:
            raise ValueError(f"--mlm-capacity must be in (0, 1]; got {self.mlm_capacity}")
        if not Path(self.deepspeed_config).is_file():
            raise FileNotFoundError(f"--deepspeed_config {self.deepspeed_config}: no such file")

    def model_config(self, feature_dim: int | None = None, num_answers: int | None = None) -> LxmertConfig:
        """The network for this run. Presets take the feature dimension and answer count from the
        shards; a JSON config must agree with them (checked, with both values in the message).

        The attention backend is ``--attention``: it is a setting of the run, not of the weights, so
        a JSON config may only leave it at ``auto`` or name the same one. ``LXTRAIN_ATTENTION``
        overrides it when the model is built (``lxtrain.model.attention.set_attention_backend``).
        """
        data_sizes = {"visual_feature_dim": feature_dim, "num_qa_labels": num_answers}
        data_sizes = {key: value for key, value in data_sizes.items() if value is not None}
        if self.model in MODEL_PRESETS:
            return LxmertConfig(
                **MODEL_PRESET_SIZES[self.model], **data_sizes, attention_backend=self.attention
            )
        config = LxmertConfig.load(self.model)
        for key, value in data_sizes.items():
            if getattr(config, key) != value:
                raise ValueError(
                    f"--model {self.model}: {key} is {getattr(config, key)} but the training shards "
                    f"({self.train_shards}) have {value}; make them agree"
                )
        if config.attention_backend not in ("auto", self.attention):
            raise ValueError(
                f"--model {self.model}: attention_backend is {config.attention_backend!r} but --attention is "
                f"{self.attention!r}; pass --attention {config.attention_backend} or drop attention_backend "
                "from the JSON"
            )
        config.attention_backend = self.attention
        return config


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    """CLI flags mirror the dataclass fields (``--train-shards`` for ``train_shards``); help texts are
    the fields' attribute docstrings (``lxtrain.cli``)."""
    return parse_config(
        PretrainConfig,
        argv,
        prog="lxtrain/pretrain.py",
        description="LXMERT pre-training with DeepSpeed",
        choices={"attention": ATTENTION_BACKENDS},
    )
