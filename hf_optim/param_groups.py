"""Which parameters get weight decay, decided by name (the Keras ``AdamWeightDecay`` rule)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence


def compile_patterns(patterns: Iterable[str] | None, argument: str) -> list[re.Pattern[str]]:
    """Compile regex patterns, raising ``ValueError`` that names ``argument`` and the bad pattern."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{argument} must be a list of regex strings, got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"{argument}: invalid regex {pattern!r}: {err}") from None
    return compiled


def decay_applies(
    name: str,
    *,
    weight_decay: float,
    include: Sequence[re.Pattern[str]] = (),
    exclude: Sequence[re.Pattern[str]] = (),
) -> bool:
    """Whether weight decay applies to the parameter called ``name``.

    No when ``weight_decay == 0``; yes when any ``include`` pattern ``re.search``-matches; else no when any
    ``exclude`` pattern matches; else yes. This is transformers 4.x ``AdamWeightDecay._do_use_weight_decay``.
    """
    if weight_decay == 0:
        return False
    if any(p.search(name) for p in include):
        return True
    return not any(p.search(name) for p in exclude)
