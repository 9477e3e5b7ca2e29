"""Fine-tuning task adapters (VQA, GQA, NLVR2): models and heads, data, metrics, submission files.

``lxtrain/finetune.py`` trains with them and ``python -m lxtrain.evaluate`` scores with them;
docs/finetune.md describes the whole flow.
"""
