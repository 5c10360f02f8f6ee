"""Typed config fields: ``setting(default, types, ...)`` declares a dataclass field with its
default, its allowed types, its numeric range (``Bound``) or allowed values, in one place; the run
config's sections (``config.py``) and ``ModelConfig`` (``model.py``) are built from them, and the
checks below word the error for a value that breaks them."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

NONE = type(None)


@dataclass(frozen=True)
class Bound:
    """A numeric key's range: ``kind`` "int" or "number" (finite), ``low`` (``inclusive`` or not),
    an inclusive ``high``, ``floor`` (a lower bound above an open ``low``) and whether null is
    allowed (``nullable``; a section field takes it from its types)."""

    kind: str
    low: float
    inclusive: bool = True
    high: float | None = None
    floor: float | None = None
    nullable: bool = False

    def problem(self, key: str, v) -> str | None:
        """``None`` if ``v`` is within the range, else the error (without the file)."""
        if self.nullable and v is None:
            return None
        ok_type = (isinstance(v, int) if self.kind == "int" else isinstance(v, (int, float))) \
            and not isinstance(v, bool)
        if (ok_type and math.isfinite(v) and v >= self.low and (v != self.low or self.inclusive)
                and (self.high is None or v <= self.high) and (self.floor is None or v >= self.floor)):
            return None
        if self.floor is not None:
            what = f"a number in [{self.floor:g}, {self.high:g}]"
        elif self.kind == "int":
            what = f"an int >= {self.low}" + (f" and <= {self.high}" if self.high is not None else "")
        else:
            what = f"a finite number {'>=' if self.inclusive else '>'} {self.low}" + \
                (f" and <= {self.high:g}" if self.high is not None else "")
        return f"{key} must be {what}{' (or null)' if self.nullable else ''}, got {v!r}"


def setting(default, types, bound: Bound | None = None, *, choices: tuple | None = None,
            path: bool = False, bounds: dict[str, Bound] | None = None):
    """A dataclass field: ``default`` (copied per instance when a list or dict), ``types`` (a type
    or a tuple; ``None`` in it allows null), ``bound`` (a numeric range), ``choices`` (the allowed
    values), ``path`` (a file or folder, resolved against the config's folder) and ``bounds`` (the
    ranges of a mapping's keys: ``model.loss``, ``model.adapter``)."""
    types = tuple(NONE if t is None else t for t in (types if isinstance(types, tuple) else (types,)))
    if bound is not None and NONE in types:
        bound = dataclasses.replace(bound, nullable=True)
    meta = {"types": types, "bound": bound, "choices": choices, "path": path, "bounds": bounds or {}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def defaults(section) -> dict:
    """A section dataclass's keys and defaults, in declaration order."""
    return dataclasses.asdict(section())


def type_name(types: tuple) -> str:
    return " or ".join("null" if t is NONE else t.__name__ for t in types)


def type_problem(key: str, v, types: tuple) -> str | None:
    """``None`` if ``v`` is one of ``types`` (a bool is not an int), else the error."""
    if isinstance(v, types) and not (isinstance(v, bool) and bool not in types):
        return None
    return f"{key} must be {type_name(types)}, got {type(v).__name__} {v!r}"


def choice_problem(key: str, v, choices: tuple) -> str | None:
    if v in choices:
        return None
    listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
    return f"{key} must be {listed}, got {v!r}"


def bounds_of(section, prefix: str) -> dict[str, Bound]:
    """Every numeric range a section dataclass declares, by dotted key (``train.lr``,
    ``model.loss.temperature``)."""
    out = {}
    for f in dataclasses.fields(section):
        if f.metadata.get("bound") is not None:
            out[f"{prefix}.{f.name}"] = f.metadata["bound"]
        for k, b in f.metadata.get("bounds", {}).items():
            out[f"{prefix}.{f.name}.{k}"] = b
    return out
