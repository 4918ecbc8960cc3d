"""The one label map (names <-> ids) that training, the export gate and evaluation share, and the one
rule for regression targets (`number`).

One rule for integer-looking values (a JSON integer, or a CSV cell such as `3`, are the same value):
- A name always matches as written (surrounding spaces aside).
- When any label name is an integer (`1..5` stars), every value is matched as a name, never as a
  position: `3` is the label "3", and a `0` that is no name is an unknown label, not the first class.
- When no name is an integer (World, Sports, ...), an integer indexes the names (hub AG News stores 0..3).
- Names taken from training data that mix integers and other names are ambiguous (is `0` a name or the
  first class?): the trainer stops and asks for `data.labels=[...]`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

_INT = re.compile(r"[+-]?\d+")


class LabelError(ValueError):
    """A label value that fits no label, or a label set that cannot be decided; the message says the fix."""


class UnknownLabel(LabelError):
    """A raw value that fits no label (`value`); LabelMap.unknown words the message with file and fix."""

    def __init__(self, value: Any) -> None:
        super().__init__(f"label {str(value)!r} fits no label")
        self.value = value


def is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and _INT.fullmatch(value.strip()) is not None


def number(raw: Any) -> float | None:
    """A regression target: a finite JSON number or a numeric text cell (CSV `4.5`); None otherwise."""
    if isinstance(raw, bool) or isinstance(raw, list):
        return None
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def fractional(distinct: Iterable[Any]) -> bool:
    """Every value is a number and one at least has a fraction (4.5): a regression target, not class ids."""
    values = list(distinct)
    numbers = [number(v) for v in values]
    return bool(values) and all(x is not None for x in numbers) and any(x != int(x) for x in numbers if x is not None)


class LabelMap:
    def __init__(self, names: Iterable[Any]) -> None:
        self.names = [str(n).strip() for n in names]
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise LabelError(f"label names repeat: {', '.join(dup)}; list each label once (data.labels=[...])")
        self.index = {n: i for i, n in enumerate(self.names)}
        self.integer_names = any(is_integer(n) for n in self.names)
        # "01" and "1" are one integer label: matched by value when the names are integers.
        self.by_value = {int(n): i for i, n in enumerate(self.names) if is_integer(n)}

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and other.names == self.names

    def id(self, raw: Any) -> int | None:
        """The label id of a raw value, or None when it fits no label (see the module's rule)."""
        key = str(raw).strip()
        if key in self.index:
            return self.index[key]
        if not is_integer(raw):
            return None
        value = int(key)
        if self.integer_names:
            return self.by_value.get(value)
        return value if 0 <= value < len(self.names) else None

    def target(self, raw: Any, multi: bool = False) -> int | list[int]:
        """What a model learns for a raw label: its id, or (`multi`) a 0/1 row over the labels from a list of
        values (one value counts as a list of one). UnknownLabel names the first value that fits no label."""
        if not multi:
            k = None if isinstance(raw, list) else self.id(raw)
            if k is None:
                raise UnknownLabel(raw)
            return k
        row = [0] * len(self.names)
        for value in raw if isinstance(raw, list) else [raw]:
            k = self.id(value)
            if k is None:
                raise UnknownLabel(value)
            row[k] = 1
        return row

    def rule(self) -> str:
        if self.integer_names:
            return "the labels are integers, so values match them as names, never as positions"
        return f"an integer indexes these names (0..{len(self.names) - 1})"

    def unknown(self, where: str, raw: Any, fix: str = "") -> LabelError:
        shown = ", ".join(self.names[:20]) + (f", ... ({len(self.names)} in all)" if len(self.names) > 20 else "")
        return LabelError(f"{where}: label {str(raw)!r} is not one the model knows ({shown}); {self.rule()}"
                          + (f". {fix}" if fix else ""))


def flatten(values: Iterable[Any]) -> list[Any]:
    """Label values, the elements of multi-label lists taken one by one."""
    return [x for v in values for x in (v if isinstance(v, list) else [v])]


def from_data(distinct: Iterable[Any], given: list[str], source: str) -> LabelMap:
    """The label set of a training run: `given` (data.labels) in that order, else the distinct training
    labels sorted (integers numerically), so the same data gives the same ids in every run. Multi-label
    lists count by their elements."""
    if given:
        return LabelMap(given)
    values = {str(v).strip(): v for v in flatten(distinct)}
    ints = [k for k, v in values.items() if is_integer(v)]
    others = [k for k, v in values.items() if not is_integer(v)]
    if ints and others:
        raise LabelError(
            f"{source}: the labels mix integers ({', '.join(sorted(ints, key=int)[:5])}) and names "
            f"({', '.join(sorted(others)[:5])}), so an integer could be a name or the position of one. "
            "List the label names in order with data.labels=[...]: integers then index them (when no name is an integer)"
        )
    if ints:
        by_value = sorted({int(k) for k in ints})
        if len(by_value) != len(ints):
            raise LabelError(f"{source}: integer labels written two ways ({', '.join(sorted(ints))}); "
                             "write each the same way or set data.labels=[...]")
        return LabelMap(str(v) for v in by_value)
    return LabelMap(sorted(others))
