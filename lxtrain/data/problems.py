"""Bookkeeping for input that conversion or loading has to drop or skip.

Bad input never stops a long conversion by default: each problem is counted under a reason,
the first few messages are kept verbatim for the summary and ``index.json``, and a strict mode
turns the first one into an exception.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field

MAX_KEPT_MESSAGES = 20


class DataError(RuntimeError):
    """Bad input in strict mode, or input that makes the requested work impossible."""


@dataclass
class ProblemLog:
    """Counts of dropped items per reason plus the first messages.

    Attributes:
        strict: raise :class:`DataError` on the first problem instead of counting it.
        echo: also print each kept message to stderr as it happens.
    """

    strict: bool = False
    echo: bool = False
    counts: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    def add(self, reason: str, message: str, count: int = 1) -> None:
        """Record ``count`` dropped items under ``reason``; ``message`` names file and line."""
        if self.strict:
            raise DataError(message)
        self.counts[reason] += count
        if len(self.messages) < MAX_KEPT_MESSAGES:
            self.messages.append(message)
            if self.echo:
                print(f"warning: {message}", file=sys.stderr)

    def merge(self, other: ProblemLog) -> None:
        self.counts.update(other.counts)
        room = MAX_KEPT_MESSAGES - len(self.messages)
        self.messages.extend(other.messages[: max(room, 0)])

    def to_json(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "first_messages": list(self.messages)}

    @property
    def total(self) -> int:
        return sum(self.counts.values())
