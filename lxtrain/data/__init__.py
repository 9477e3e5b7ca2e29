"""Data: shard writer, synthetic corpus and the streaming pre-training loader (docs/data.md).

Submodules are imported explicitly (``from lxtrain.data.loader import build_pretrain_loader``)
so that the conversion CLIs do not pay for torch at start-up.
"""
