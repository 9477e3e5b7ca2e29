"""Model configuration: LXMERT-base by default, any size for tests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

ATTENTION_BACKENDS = ("auto", "eager", "sdpa", "fused")


@dataclasses.dataclass
class LxmertConfig:
    """Hyper-parameters of the LXMERT network (SPEC 2). Defaults are LXMERT-base (~228M params)."""

    vocab_size: int = 30522
    """Word-piece vocabulary size (BERT uncased)."""
    hidden_size: int = 768
    """Width D of every layer."""
    num_attention_heads: int = 12
    """Heads per attention module; must divide hidden_size."""
    intermediate_size: int = 3072
    """Width of the feed-forward inner layer."""
    num_language_layers: int = 9
    """Single-modality language encoder depth (N_L)."""
    num_object_layers: int = 5
    """Object-relationship encoder depth (N_R)."""
    num_cross_layers: int = 5
    """Cross-modality encoder depth (N_X)."""
    max_position_embeddings: int = 512
    """Rows of the absolute position table (sentences use 20)."""
    type_vocab_size: int = 2
    """Rows of the token-type table (all inputs use type 0)."""
    visual_feature_dim: int = 2048
    """Dimension of one RoI feature from the detector."""
    visual_position_dim: int = 4
    """Box coordinates per object: (x1/w, y1/h, x2/w, y2/h)."""
    hidden_dropout_prob: float = 0.1
    """Dropout after embeddings and every sub-layer output."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on attention probabilities."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon everywhere."""
    initializer_range: float = 0.02
    """Std of the normal init of Linear and Embedding weights."""
    num_object_labels: int = 1600
    """Detector object classes (detected-label classification)."""
    num_attribute_labels: int = 400
    """Detector attribute classes."""
    num_qa_labels: int = 9500
    """Answers in the pre-training answer table (image QA head)."""
    attention_backend: str = "auto"
    """Attention implementation: auto | eager | sdpa | fused (see lxtrain.model.attention)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}; got {self.attention_backend!r}"
            )
        for name in ("num_language_layers", "num_object_layers", "num_cross_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LxmertConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LxmertConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LxmertConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def tiny(cls, **overrides: Any) -> LxmertConfig:
        """A test-sized network with every code path of the full one."""
        values: dict[str, Any] = dict(
            vocab_size=30522,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            num_language_layers=1,
            num_object_layers=1,
            num_cross_layers=1,
            max_position_embeddings=64,
            visual_feature_dim=64,
            num_object_labels=20,
            num_attribute_labels=10,
            num_qa_labels=16,
        )
        values.update(overrides)
        return cls(**values)
