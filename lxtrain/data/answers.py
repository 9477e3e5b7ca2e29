"""The QA answer table (``all_ans.json``) and answer normalisation (SPEC section 1).

Answers in the sentence JSON are free-form strings ("Two", "a dog", "grey."); the table holds
canonical forms. Every label goes through :func:`normalize_answer` before lookup, and answers
that are not in the table are dropped, as in the reference release.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

_ARTICLES = ("a ", "an ", "the ")

# Whole-answer rewrites applied after lower-casing and article stripping.
ANSWER_MAP: dict[str, str] = {
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "grey": "gray",
}


def normalize_answer(answer: str) -> str:
    """Normalise one answer string (SPEC 1).

    Lower-case; strip surrounding whitespace; strip one trailing "."; strip one leading "a ",
    "an " or "the "; then map number words "one".."ten" to digits and "grey" to "gray".

    >>> normalize_answer("The Grey.")
    'gray'
    """
    text = answer.lower().strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    for article in _ARTICLES:
        if text.startswith(article):
            text = text[len(article) :].lstrip()
            break
    return ANSWER_MAP.get(text, text)


@dataclass
class AnswerTable:
    """Answer id <-> string, the id being the position in the (possibly filtered) list.

    Attributes:
        answers: the canonical answer strings; ``answers[i]`` has id ``i``.
        source_sha256: hash of the file the table was read from ("" when built in memory), so
            an index records exactly which table its answer ids refer to.
    """

    answers: list[str]
    source_sha256: str = ""
    _ids: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ids = {}
        for answer_id, answer in enumerate(self.answers):
            # First occurrence wins so ids stay stable if the file repeats an answer.
            self._ids.setdefault(answer, answer_id)

    def __len__(self) -> int:
        return len(self.answers)

    def lookup(self, answer: str) -> int | None:
        """Id of a raw answer after normalisation, or None when it is not in the table."""
        answer_id = self._ids.get(answer)
        if answer_id is None:
            answer_id = self._ids.get(normalize_answer(answer))
        return answer_id

    def convert_label(self, label: Mapping[str, float]) -> tuple[list[int], list[float]]:
        """Map ``{answer: soft score}`` to parallel (ids, scores) lists, dropping unknown answers.

        Two raw answers that normalise to the same entry keep the larger score.
        """
        scores: dict[int, float] = {}
        for answer, score in label.items():
            answer_id = self.lookup(str(answer))
            if answer_id is not None:
                scores[answer_id] = max(float(score), scores.get(answer_id, float("-inf")))
        ids = sorted(scores)
        return ids, [scores[i] for i in ids]


def load_answer_table(path: str | Path, qa_sets: Iterable[str] | None = None) -> AnswerTable:
    """Read ``all_ans.json`` (a list of ``{"ans": str, "dsets": [...]}``).

    Args:
        path: the answer file.
        qa_sets: when given, keep only answers used by at least one of these datasets (the
            reference's QA-set filter); ids are then positions in the filtered list.
    """
    raw = Path(path).read_bytes()
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of {{'ans', 'dsets'}} records")
    wanted = set(qa_sets) if qa_sets is not None else None
    answers = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("ans"), str):
            raise ValueError(f"{path}: record {position} has no string 'ans'")
        if wanted is None or wanted.intersection(entry.get("dsets", ())):
            answers.append(entry["ans"])
    return AnswerTable(answers, source_sha256=hashlib.sha256(raw).hexdigest())
