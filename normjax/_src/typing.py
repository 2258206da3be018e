"""The types of normjax's arguments, named once: arrays and dtypes as JAX takes them, axes and device axes.

Private: the public signatures use these names, the documentation spells them out.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from jax.typing import ArrayLike, DTypeLike

__all__ = ["ArrayLike", "Axes", "AxisIndexGroups", "AxisName", "DTypeLike"]

Axes = int | Sequence[int]
"""One axis of an array or several, negative ones counted from the end: ``-1``, ``(1, 2)``."""

AxisName = Hashable | Sequence[Hashable] | None
"""The name of a mapped or mesh axis (``vmap``/``pmap`` ``axis_name``, a ``shard_map`` mesh axis; any hashable,
as JAX allows, usually a string), a tuple or list of names, or None for no synchronization."""

AxisIndexGroups = Sequence[Sequence[int]] | None
"""Groups of indices along ``axis_name`` (under ``pmap``) whose devices synchronize among themselves, e.g.
``[[0, 1], [2, 3]]``; every index in exactly one group, all groups of one size. None: one group of all."""
