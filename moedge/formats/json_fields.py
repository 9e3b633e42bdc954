"""Typed reads of parsed JSON (manifest.json and the other formats) with one error per bad field.

Every failure names the file, the field's path (``layers[1].moe.gating.top_k``), what the field must be
and a short quote of what it is, as one ``MoedgeError``.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

from moedge._errors import MoedgeError


def show(value: Any) -> str:
    """``value`` as an error message quotes it: JSON or repr, at most 40 characters."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class FieldReader:
    """Typed access to parsed JSON; every failure names the field and what it must be."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.graph_files: set[str] = set()  # a file serves one graph: checked as graphs are read

    def fail(self, field_path: str, description: str, value: Any) -> NoReturn:
        raise MoedgeError(f"{self.where}: {field_path} must be {description}, got {show(value)}")

    def get(self, obj: dict[str, Any], key: str, field_path: str) -> Any:
        if key not in obj:
            raise MoedgeError(f"{self.where}: {field_path} is missing")
        return obj[key]

    def obj(self, value: Any, field_path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field_path, "an object", value)
        return value

    def array(self, value: Any, field_path: str, *, nonempty: bool = False) -> list[Any]:
        if not isinstance(value, list) or (nonempty and not value):
            self.fail(field_path, "a non-empty array" if nonempty else "an array", value)
        return value

    def string(self, value: Any, field_path: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(field_path, "a non-empty string", value)
        return value

    def boolean(self, value: Any, field_path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(field_path, "a boolean", value)
        return value

    def integer(self, value: Any, field_path: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(field_path, f"an integer in [{lo}, {hi}]", value)
        return value

    def optional_int(self, obj: dict[str, Any], key: str, field_path: str, lo: int, hi: int) -> None:
        if obj.get(key) is not None:
            self.integer(obj[key], field_path, lo, hi)

    def optional_float(self, obj: dict[str, Any], key: str, field_path: str, lo: float, hi: float) -> None:
        """A number (int or float, not a boolean) in (lo, hi], when present and not null."""
        value = obj.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not lo < value <= hi
        ):
            self.fail(field_path, f"a number in ({lo:g}, {hi:g}]", value)
