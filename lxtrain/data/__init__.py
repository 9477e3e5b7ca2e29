"""Data: shard writer, format readers and the streaming pre-training loader (docs/data.md); the
synthetic corpora live in ``lxtrain.synthetic``.

Submodules are imported explicitly (``from lxtrain.data.loader import build_pretrain_loader``)
so that the conversion CLIs do not pay for torch at start-up.
"""
