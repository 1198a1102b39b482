"""JSON out of a model's free-text answer, for any door that wants structured output.

Models wrap JSON in markdown fences, surround it with prose, or make small syntax slips. This
module finds the JSON, validates it (optionally against a JSON schema) and, when there is none
that is valid, gives the model exactly one chance to answer again before failing for good with
:class:`InvalidModelOutput` (permanent: the same prompt would fail the same way).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any

import json_repair
import jsonschema  # type: ignore[import-untyped]

from chatprocessor.core.errors import InvalidModelOutput

FOOD_ANALYSIS = "food_analysis"

#: (bad_answer, what_was_wrong) -> the model's new answer.
Repair = Callable[[str, str], Awaitable[str]]

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n?(.*?)```", re.DOTALL)
_JSON_TAGS = {"", "json", "json5", "jsonc"}
# Everything that may appear in (slightly sloppy) JSON; a bare word that is not a literal or a
# key means prose, which json_repair would happily turn into strings ("[see above]").
_TOKEN = re.compile(
    r"""\s+|[{}\[\]:,]|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|//[^\n]*|/\*.*?\*/"""
    r"""|-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|(?:true|false|null|True|False|None)\b"""
    r"""|[A-Za-z_]\w*(?=\s*:)""",
    re.DOTALL,
)
# How a cut-off answer may end: inside a string, a number or a literal.
_PARTIAL_TAIL = re.compile(r'"(?:[^"\\]|\\.)*\\?|[-+.\deE]+', re.DOTALL)
_LITERALS = ("true", "false", "null", "True", "False", "None")
_MAX_SCANS = 200  # bounds the work on answers full of stray brackets
_OPENER = re.compile(r"[{\[]")
_STRUCTURE = re.compile(r'"(?:[^"\\]|\\.)*"?|[{}\[\]]', re.DOTALL)  # strings skipped whole
_CLOSERS = {"{": "}", "[": "]"}
_UNCLOSED, _MISMATCHED = -1, -2


def extract_json(text: str) -> Any:
    """The JSON object or array in a model's answer.

    Tried in order: the whole text; the first ```json (or untagged ```) fenced block that
    parses; the first balanced {...} or [...] in the prose. Only when none parses is the
    json-repair library used, on those same candidates, to forgive common slips (trailing
    commas, single quotes, Python True/False/None, // comments, unquoted keys); candidates with
    bare prose words are never "repaired". Bare strings and numbers are not JSON output for a
    door that asked for JSON, so they are refused. A cut-off (truncated) answer is refused too
    rather than completed: closing it would silently drop the missing data, while the error lets
    :func:`sanitize` ask the model again. Raises InvalidModelOutput saying what was wrong.
    """
    if not text.strip():
        raise InvalidModelOutput("the answer is empty, expected a JSON object or array")
    fenced = [m.group(2).strip() for m in _FENCE.finditer(text) if m.group(1).lower() in _JSON_TAGS]
    spans, truncated = _spans(text)
    bare = None
    for candidate in [text.strip(), *fenced, *spans]:
        try:
            value = json.loads(candidate)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            continue
        if isinstance(value, dict | list):
            return value
        bare = bare or candidate[:40]
    for candidate in dict.fromkeys(s for s in [*fenced, *spans] if _looks_like_json(s)):
        try:
            value = json_repair.repair_json(candidate, return_objects=True)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict | list):
            return value
    if truncated:
        raise InvalidModelOutput("the JSON in the answer is cut off (unclosed { or [)")
    if bare:
        raise InvalidModelOutput(
            f"the answer is a bare JSON value ({bare}), expected an object or array"
        )
    raise InvalidModelOutput("the answer holds no valid JSON object or array")


def _spans(text: str) -> tuple[list[str], bool]:
    """Balanced {...}/[...] spans, outermost first, and whether JSON-looking text is cut off.

    A span that looks like JSON is not searched inside: pieces of a broken object are not the
    answer. Brackets in prose ("{curly}") are stepped over and the search goes on inside them.
    """
    spans: list[str] = []
    closes: dict[int, int] = {}
    pos = 0
    for _ in range(_MAX_SCANS):
        opener = _OPENER.search(text, pos)
        if opener is None:
            break
        start = opener.start()
        if start not in closes:
            closes.update(_match_brackets(text, start))
        end = closes[start]
        if end == _UNCLOSED and _looks_like_json(text[start:], partial_tail=True):
            return spans, True  # cut off: everything after is inside it
        if end < 0:  # a stray or mismatched bracket
            pos = start + 1
            continue
        spans.append(text[start : end + 1])
        pos = end + 1 if _looks_like_json(spans[-1]) else start + 1
    return spans, False


def _match_brackets(text: str, start: int) -> dict[int, int]:
    """Where each bracket met while matching the one at ``start`` closes (strings skipped), or
    _MISMATCHED / _UNCLOSED: one pass answers for the nested openers too, keeping it linear."""
    closes: dict[int, int] = {}
    stack: list[int] = []
    for match in _STRUCTURE.finditer(text, start):
        char = match.group()
        if char in _CLOSERS:
            stack.append(match.start())
        elif char in "}]":
            if char != _CLOSERS[text[stack[-1]]]:
                return closes | dict.fromkeys(stack, _MISMATCHED)
            closes[stack.pop()] = match.start()
            if not stack:
                return closes
    return closes | dict.fromkeys(stack, _UNCLOSED)


def _looks_like_json(text: str, *, partial_tail: bool = False) -> bool:
    """True when ``text`` is made only of JSON tokens (plus the slips json-repair forgives)."""
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            tail = text[pos:]
            cut = _PARTIAL_TAIL.fullmatch(tail) or any(lit.startswith(tail) for lit in _LITERALS)
            return partial_tail and bool(cut)
        pos = match.end()
    return True


def validate(value: Any, schema: Mapping[str, Any] | None) -> None:
    """Raise InvalidModelOutput naming the failing path and reason when ``value`` does not
    follow ``schema`` (Draft 2020-12 unless the schema's ``$schema`` says otherwise).

    ``None`` accepts any JSON. A schema that is itself invalid raises jsonschema.SchemaError:
    that is the caller's bug, not the model's.
    """
    if schema is None:
        return
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    error = jsonschema.exceptions.best_match(cls(schema).iter_errors(value))
    if error is not None:
        message = error.message if len(error.message) <= 300 else error.message[:300] + "..."
        raise InvalidModelOutput(
            f"the JSON does not follow the schema at {error.json_path}: {message}"
        )


def _parse(text: str, schema: Mapping[str, Any] | None) -> Any:
    value = extract_json(text)
    validate(value, schema)
    return value


async def sanitize(
    text: str, *, schema: Mapping[str, Any] | None = None, repair: Repair | None = None
) -> Any:
    """:func:`extract_json` then :func:`validate`; on failure, when ``repair`` is given, ONE
    repair attempt (``repair(text, reason)``) whose answer is checked the same way.

    One attempt only: a model that fails twice is unlikely to succeed a third time, and each try
    costs a full generation. Errors raised by ``repair`` itself (timeouts...) propagate as is,
    so a transient provider failure stays retryable.
    """
    try:
        return _parse(text, schema)
    except InvalidModelOutput as exc:
        if repair is None:
            raise
        reason = str(exc)
    try:
        return _parse(await repair(text, reason), schema)
    except InvalidModelOutput as exc:
        raise InvalidModelOutput(
            f"no valid JSON even after one repair attempt: first answer: {reason}; "
            f"repaired answer: {exc}"
        ) from exc


def repair_prompt(bad_answer: str, reason: str, schema: Mapping[str, Any] | None) -> str:
    """The follow-up message asking the model to answer again with only valid JSON."""
    lines = [
        f"Your previous answer could not be used: {reason}.",
        "Answer again with only one valid JSON object or array: no prose, no markdown, "
        "no code fences, no comments, double-quoted strings, no trailing commas.",
    ]
    if schema is not None:
        lines.append(f"It must follow this JSON schema:\n{json.dumps(schema, ensure_ascii=False)}")
    clipped = bad_answer if len(bad_answer) <= 4000 else bad_answer[:4000] + "\n[...]"
    lines.append(f"Your previous answer was:\n{clipped}")
    return "\n\n".join(lines)


def load_schema(name: str) -> dict[str, Any]:
    """A schema shipped in chatprocessor/contracts/schemas/<name>.json, e.g. FOOD_ANALYSIS."""
    folder = resources.files("chatprocessor.contracts").joinpath("schemas")
    known = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))
    if name not in known:  # also keeps "../x" and friends out of the package
        raise ValueError(f"unknown schema {name!r}; shipped schemas: {', '.join(known)}")
    schema: dict[str, Any] = json.loads(folder.joinpath(f"{name}.json").read_text("utf-8"))
    return schema
