"""Per-tenant content filters (seed 004's ``applyContentFilters``).

A tenant lists regular expressions (Python ``re`` syntax); what they match in an answer is
replaced, e.g. by ``[filtered]``. No flag is implied: a pattern wanting case-insensitivity says
so itself with ``(?i)``. Every pattern is searched in the original answer and overlapping
matches become one replacement, so a pattern never matches another's replacement and the order
of the list does not matter.

Patterns come from the operator's settings, never from visitors or tenants' end users, so they
are trusted: Python's ``re`` has no time limit, and a catastrophic pattern (``(a+)+$``) could
take very long on an unlucky answer. Keep patterns simple (literal words, ``\\b`` boundaries,
bounded repeats). A pattern that is not valid, or that matches the empty string (it would
"filter" between every character), is refused at startup with a ValueError naming it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from chatprocessor.ops import metrics

DEFAULT_REPLACEMENT = "[filtered]"


class ContentFilter:
    """One list of patterns, compiled once, applied to answers."""

    def __init__(self, patterns: Sequence[str], *, replacement: str = DEFAULT_REPLACEMENT) -> None:
        if isinstance(patterns, str):  # a bare string would be read as one pattern per letter
            raise TypeError("patterns must be a sequence of regular expressions, not a string")
        self.replacement = replacement
        self.patterns: tuple[re.Pattern[str], ...] = tuple(_compile(p) for p in patterns)

    @property
    def empty(self) -> bool:
        """True when there is no pattern (apply changes nothing)."""
        return not self.patterns

    def apply(self, text: str) -> tuple[str, int]:
        """(``text`` with every match replaced, the number of replacements made)."""
        spans = sorted(
            (m.start(), m.end())
            for pattern in self.patterns
            for m in pattern.finditer(text)
            if m.end() > m.start()  # e.g. a lookahead: nothing to replace
        )
        if not spans:
            return text, 0
        merged: list[tuple[int, int]] = [spans[0]]
        for start, end in spans[1:]:
            last_start, last_end = merged[-1]
            if start < last_end:  # overlapping: one replacement
                merged[-1] = (last_start, max(last_end, end))
            else:
                merged.append((start, end))
        pieces: list[str] = []
        pos = 0
        for start, end in merged:
            pieces.append(text[pos:start])
            pieces.append(self.replacement)
            pos = end
        pieces.append(text[pos:])
        return "".join(pieces), len(merged)


def _compile(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled; ValueError naming it when it is invalid or matches nothing at all."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(
            f"content filter pattern {pattern!r} is not a valid regular expression: {exc}"
        ) from exc
    if compiled.fullmatch("") is not None:
        raise ValueError(
            f"content filter pattern {pattern!r} matches the empty string; "
            "it must match at least one character"
        )
    return compiled


class TenantFilters:
    """Each tenant's filter: its own patterns plus the ``default`` ones every tenant gets.

    Filters are built once, here: a tenant's patterns never touch another tenant's answers.
    """

    def __init__(
        self,
        patterns_by_tenant: Mapping[str, Sequence[str]],
        *,
        default: Sequence[str] = (),
        replacement: str = DEFAULT_REPLACEMENT,
    ) -> None:
        self._default = ContentFilter(default, replacement=replacement)
        self._filters: dict[str, ContentFilter] = {}
        for tenant, patterns in patterns_by_tenant.items():
            if isinstance(patterns, str):
                raise TypeError(f"tenant {tenant!r}: patterns must be a list, not a string")
            try:  # the default patterns are valid: the errors are the tenant's own
                self._filters[tenant] = ContentFilter(
                    [*patterns, *default], replacement=replacement
                )
            except ValueError as exc:
                raise ValueError(f"tenant {tenant!r}: {exc}") from exc

    def for_tenant(self, tenant: str) -> ContentFilter:
        """The filter for ``tenant``: its own patterns and the default ones."""
        return self._filters.get(tenant, self._default)

    def apply(self, tenant: str, text: str) -> str:
        """``text`` filtered for ``tenant``; counted in ai_content_filtered when it changed."""
        content = self.for_tenant(tenant)
        if content.empty:
            return text
        filtered, _ = content.apply(text)
        if filtered != text:
            metrics.labelled(metrics.AI_CONTENT_FILTERED, tenant).inc()
        return filtered
