"""The training loop shared by ``lxtrain/pretrain.py`` and ``lxtrain/finetune.py``: ``loop`` (the
loop, its stop/resume/cadence rules and hooks), ``meter`` (metrics summed on the device) and
``entry`` (the command-line start common to both)."""
