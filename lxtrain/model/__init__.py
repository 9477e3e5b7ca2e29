"""LXMERT network (single-device code)."""

from lxtrain.model.config import LxmertConfig
from lxtrain.model.lxmert import BackboneOutput, LxmertBackbone, LxmertForPretraining, PretrainingLogits

__all__ = ["BackboneOutput", "LxmertBackbone", "LxmertConfig", "LxmertForPretraining", "PretrainingLogits"]
