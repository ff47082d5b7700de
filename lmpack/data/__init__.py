"""The evaluation texts lmpack ships, one per domain (eval/*.txt; sources in README.md): the quality gate, the
tokenizer check, the export parity check and layer pruning read them, so no build downloads data."""

from __future__ import annotations

import functools
from importlib import resources

# Plain English prose first: the absolute sanity check reads it, and the single-text uses take it first.
DOMAINS = ("prose", "verse", "technical", "legal", "code", "multilingual")
ENGLISH_PROSE = "prose"


@functools.cache
def eval_texts() -> dict[str, str]:
    """Each domain's text, in DOMAINS' order."""
    folder = resources.files(__name__).joinpath("eval")
    return {domain: folder.joinpath(f"{domain}.txt").read_text(encoding="utf-8") for domain in DOMAINS}


def all_eval_text() -> str:
    """Every domain's text, one after the other: for uses that take one text (pruning's calibration)."""
    return "\n\n".join(eval_texts().values())
