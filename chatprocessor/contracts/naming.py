"""Field-name spellings: snake_case for Python peers, camelCase/PascalCase for .NET ones."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices

Naming = Literal["snake", "camel", "pascal"]


def to_pascal(snake: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in snake.split("_"))


def to_camel(snake: str) -> str:
    pascal = to_pascal(snake)
    return pascal[:1].lower() + pascal[1:]


def any_case(snake: str) -> AliasChoices:
    """Accept a field under its snake, camel and Pascal spellings."""
    return AliasChoices(snake, to_camel(snake), to_pascal(snake))


def rename(data: dict[str, Any], naming: Naming) -> dict[str, Any]:
    """Rename a flat snake_case dict's keys to the requested spelling."""
    if naming == "snake":
        return data
    convert = to_camel if naming == "camel" else to_pascal
    return {convert(key): value for key, value in data.items()}
