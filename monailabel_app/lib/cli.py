"""What the admin commands (`versions.py`, `history.py`) share: their tables and their answer to
bad input (one `error:` sentence, exit code 2). Standard library only, so they start fast."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is free text, not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1]).rstrip()
                     for row in rows)


def run(action: Callable[[], str]) -> int:
    """Print what `action` returns (exit 0), or its ValueError as one sentence (exit 2)."""
    try:
        print(action())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
