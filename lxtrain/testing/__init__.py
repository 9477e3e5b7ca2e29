"""Testing tools for lxtrain: the fault-injection suite and the hooks it runs pre-training with.

Nothing in the production path (``lxtrain/pretrain.py``, ``lxtrain/finetune.py``,
``lxtrain/checkpoint.py`` ...) imports this package: a normal run never reads the
``LXTRAIN_FAULT_*`` variables. The suite launches ``lxtrain/testing/pretrain_with_faults.py``,
which is ``lxtrain/pretrain.py`` with :class:`lxtrain.testing.fault_hooks.FaultHooks` attached.

- ``python -m lxtrain.testing.faults --out DIR``: every fault scenario, then the README table.
- :mod:`lxtrain.testing.fault_hooks`: the hooks that kill a rank, or turn a loss into NaN, on cue.
"""
