"""Which stored images a search may return: filters, and the SQL conditions they become.

``Filters`` is what callers build; ``Store.select_ids`` checks it against the
store (unknown labels, splits, groups and fields fail with the valid ones) and
runs the conditions below. Structured conditions (``FieldCondition``) never
carry SQL text: the field is checked against the store's columns and metadata
keys and every value travels as a parameter, so they are safe for a web
client. ``where`` is raw SQL for the command line's own user.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

OPERATORS = ("=", "!=", "<", "<=", ">", ">=", "in", "contains")
# Columns of ``images`` a FieldCondition may name directly; anything else is a key of ``meta``.
FIELD_COLUMNS = ("image_id", "dataset", "group_id", "given_split", "width", "height")


@dataclass(frozen=True)
class FieldCondition:
    """``field operator value`` over an images column or a metadata key, e.g. ``sex = male``.

    operator: one of OPERATORS; ``in`` takes a list, ``contains`` a substring (text match,
        case-insensitive). Numbers compare as numbers, anything else as text.
    """

    field: str
    operator: str
    value: Any

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "operator": self.operator, "value": self.value}

    @classmethod
    def parse(cls, text: str) -> "FieldCondition":
        """``field=value``, ``field>=3``, ``field!=x``, ``field~sub`` (contains),
        ``field=a|b`` (in); the form of the command line's ``--field``."""
        for symbol, operator in (("!=", "!="), ("<=", "<="), (">=", ">="), ("=", "="), ("<", "<"),
                                 (">", ">"), ("~", "contains")):
            name, sep, value = text.partition(symbol)
            if sep and name.strip():
                value = value.strip()
                if operator == "=" and "|" in value:
                    return cls(name.strip(), "in", [_typed(v) for v in value.split("|")])
                return cls(name.strip(), operator, value if operator == "contains" else _typed(value))
        raise ValueError(f"expected FIELD=VALUE (or !=, <, <=, >, >=, ~ for contains), got {text!r}")


def _typed(value: str) -> Any:
    try:
        return json.loads(value) if value.strip() not in ("", "nan", "NaN") else value
    except ValueError:
        return value


@dataclass(frozen=True)
class Filters:
    """Which stored images a search may return. Every condition must hold; ``labels`` and
    ``groups`` match any of theirs.

    where: an SQL condition over the ``images`` table's columns (see schema.IMAGE_COLUMNS);
        for the command line only, never for text from a web client.
    fields: structured conditions (safe for any client).
    split_scheme: the scheme ``split`` refers to; None picks ``Store.default_split_scheme``.
    """

    labels: tuple[str, ...] = ()
    split: str | None = None
    split_scheme: str | None = None
    where: str | None = None
    groups: tuple[str, ...] = ()
    fields: tuple[FieldCondition, ...] = ()

    def is_empty(self) -> bool:
        return not (self.labels or self.split or self.where or self.groups or self.fields)

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "split": self.split,
                "split_scheme": self.split_scheme if self.split else None,
                "where": self.where, "groups": list(self.groups),
                "fields": [c.to_dict() for c in self.fields]}


def field_sql(condition: FieldCondition) -> tuple[str, list[Any]]:
    """The SQL condition and parameters of a checked ``FieldCondition`` (see ``Store.select_ids``)."""
    if condition.field in FIELD_COLUMNS:
        text, number = condition.field, f"TRY_CAST({condition.field} AS DOUBLE)"
        params_prefix: list[Any] = []
    else:
        path = '$."' + condition.field.replace('"', '\\"') + '"'
        text, number = "json_extract_string(meta, ?)", "TRY_CAST(json_extract_string(meta, ?) AS DOUBLE)"
        params_prefix = [path]
    op, value = condition.operator, condition.value
    if op == "contains":
        return f"{text} ILIKE ?", [*params_prefix, f"%{value}%"]
    if op == "in":
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if values and all(_is_number(v) for v in values):
            return f"{number} IN (SELECT unnest(?::DOUBLE[]))", [*params_prefix, [float(v) for v in values]]
        return f"{text} IN (SELECT unnest(?::TEXT[]))", [*params_prefix, [_text(v) for v in values]]
    if _is_number(value):
        return f"{number} {op} ?", [*params_prefix, float(value)]
    return f"{text} {op} ?", [*params_prefix, _text(value)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value: Any) -> str:
    """A value as the text DuckDB's ``->>`` gives for it (JSON booleans are true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return str(value)
