"""Progress of long work as one line per phase: what is being done, with its size where known.

Library functions take an `on_phase` callable and call it as each phase starts; the CLI prints those lines
on stderr (not with --quiet or --json), the first-install script too. A phase is said before it runs, so a
line that stays last tells what is taking the time. Work counted in units (a progress bar) gets a counter
instead; `no_count` is the counter of a bar that is off.
"""

from __future__ import annotations

from collections.abc import Callable

PhaseReporter = Callable[[str], None]


def no_progress(message: str) -> None:
    """Report nothing (the default of every library function)."""


def megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def no_count(n: int = 1) -> None:
    """Count nothing (the update of a progress bar that is off)."""
