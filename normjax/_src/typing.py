"""The types of normjax's arguments, named once: arrays and dtypes as JAX takes them, axes and device axes.

Private: the public signatures use these names, the documentation spells them out.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Sequence
from typing import Any

from jax.typing import ArrayLike, DTypeLike

__all__ = ["ArrayLike", "Axes", "AxisIndexGroups", "AxisName", "DTypeLike", "is_int", "type_name"]

Axes = int | Sequence[int]
"""One axis of an array or several, negative ones counted from the end: ``-1``, ``(1, 2)``."""

AxisName = Hashable | Sequence[Hashable] | None
"""The name of a mapped or mesh axis (``vmap``/``pmap`` ``axis_name``, a ``shard_map`` mesh axis; any hashable,
as JAX allows, usually a string), a tuple or list of names, or None for no synchronization."""

AxisIndexGroups = Sequence[Sequence[int]] | None
"""Groups of indices along ``axis_name`` (under ``pmap``) whose devices synchronize among themselves, e.g.
``[[0, 1], [2, 3]]``; every index in exactly one group, all groups of one size. None: one group of all."""


def is_int(value: Any) -> bool:
    """True for Python and NumPy integers, False for bools (``axis=True`` is a bug, not axis 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def type_name(value: Any) -> str:
    """The name of ``value``'s type as the messages show it: ``list``, or ``torch.Tensor`` with its module."""
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
