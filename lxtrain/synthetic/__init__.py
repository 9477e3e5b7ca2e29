"""Synthetic worlds: a grounded, learnable stand-in for the real corpora, in the published formats.

- ``lxtrain.synthetic.pretraining``: the world (object classes, colours, region features) and
  the pre-training corpus built from it (obj36 TSV + LXMERT JSON, or shards directly);
  ``python -m lxtrain.synthetic.pretraining --out data/synth --images 2000 --shards``.
- ``lxtrain.synthetic.finetuning``: VQA-, GQA- and NLVR2-style fine-tuning sets from the same
  world; ``python -m lxtrain.synthetic.finetuning --out data/synth_tasks --shards``.

They feed the demo, the tests and the benchmarks; the real data pipeline lives in
``lxtrain.data``, which these generators only write through (shard writer, obj36 format).
Submodules are imported explicitly, as in ``lxtrain.data``, so that the CLIs start quickly.
"""
