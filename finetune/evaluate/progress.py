"""Progress bars for the long parts of an evaluation: on standard error, and only on a terminal
(a log file or a pipe gets none)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_bar(items: Iterable[T], label: str) -> Iterator[T]:
    from tqdm import tqdm

    # disable=None: tqdm switches itself off when standard error is not a terminal.
    return iter(tqdm(items, desc=label, file=sys.stderr, disable=None, leave=False, unit="batch"))
