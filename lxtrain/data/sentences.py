"""The pre-training sentence JSON (``mscoco_train.json`` ...; SPEC section 1).

Records are ``{"img_id", "sentf": {source: [text, ...]}, "labelf": {source: [{answer: score}]}}``.
Reading validates each record, normalises answer labels against the answer table and merges
records of the same image across files, so the shard writer only sees clean per-image lists.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from lxtrain.batch import QA_SOURCE_NAMES, SENTENCE_SOURCE_NAMES
from lxtrain.data.answers import AnswerTable
from lxtrain.data.problems import ProblemLog

Sentence = dict
"""One sentence as stored in a shard: ``{"source", "text", "answer_ids", "answer_scores"}``."""


def convert_record(
    record: object,
    where: str,
    table: AnswerTable,
    qa_sets: frozenset[str],
    problems: ProblemLog,
) -> tuple[str, list[Sentence]] | None:
    """Validate one JSON record and convert it to ``(img_id, sentences)``; None if unusable.

    ``where`` (file and record number) starts every problem message.
    """
    if not isinstance(record, dict) or not isinstance(record.get("img_id"), str):
        problems.add("bad_record", f"{where}: no string 'img_id'")
        return None
    sentf = record.get("sentf")
    if not isinstance(sentf, dict):
        problems.add("bad_record", f"{where} (img_id {record['img_id']}): no 'sentf' object")
        return None
    labelf = record.get("labelf") or {}
    if not isinstance(labelf, dict):
        labelf = {}
    sentences: list[Sentence] = []
    for source, texts in sentf.items():
        if source not in SENTENCE_SOURCE_NAMES:
            dropped = len(texts) if isinstance(texts, list) else 1
            problems.add("unknown_source", f"{where}: unknown sentence source {source!r}", dropped)
            continue
        if not isinstance(texts, list):
            problems.add("bad_record", f"{where}: sentf[{source!r}] is not a list")
            continue
        labels = labelf.get(source) if source in QA_SOURCE_NAMES and source in qa_sets else None
        if labels is not None and (not isinstance(labels, list) or len(labels) != len(texts)):
            problems.add("bad_labels", f"{where}: labelf[{source!r}] does not match sentf[{source!r}]")
            labels = None
        for position, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                problems.add("bad_sentence", f"{where}: sentf[{source!r}][{position}] is not a sentence")
                continue
            answer_ids: list[int] = []
            answer_scores: list[float] = []
            if labels is not None and isinstance(labels[position], dict):
                answer_ids, answer_scores = table.convert_label(labels[position])
            sentences.append(
                {"source": source, "text": text, "answer_ids": answer_ids, "answer_scores": answer_scores}
            )
    return record["img_id"], sentences


def load_sentences(
    paths: Iterable[str | Path],
    table: AnswerTable,
    problems: ProblemLog,
    qa_sets: Iterable[str] = QA_SOURCE_NAMES,
) -> dict[str, list[Sentence]]:
    """Read sentence JSON files into ``{img_id: [sentence, ...]}`` (files merged in order).

    Args:
        paths: sentence JSON files.
        table: answer table that labels are mapped to (unknown answers are dropped).
        problems: where bad records are counted (it raises in strict mode).
        qa_sets: QA sources whose labels are kept; other sources' sentences stay, unlabelled.
    """
    wanted = frozenset(qa_sets)
    by_image: dict[str, list[Sentence]] = {}
    for path in paths:
        try:
            records = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            # A whole unreadable file is never a per-record problem: stop, naming it.
            raise ValueError(f"{path}: cannot read sentence JSON ({error})") from error
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a list of per-image records")
        for index, record in enumerate(records):
            converted = convert_record(record, f"{path}: record {index}", table, wanted, problems)
            if converted is not None and converted[1]:
                by_image.setdefault(converted[0], []).extend(converted[1])
    return by_image
