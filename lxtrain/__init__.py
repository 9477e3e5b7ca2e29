"""lxtrain: distributed LXMERT pre-training."""

__version__ = "0.1.0"
