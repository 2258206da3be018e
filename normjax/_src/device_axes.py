"""Device axes: ``axis_name`` and ``axis_index_groups``, checked where they are bound, and the devices they span."""

from __future__ import annotations

import numbers
from collections.abc import Hashable
from typing import Any

import jax

from normjax._src.typing import AxisIndexGroups, AxisName, is_int, type_name


def _axis_names(axis_name: AxisName) -> tuple[Hashable, ...]:
    """The names in `axis_name`: a tuple or list of names, or one name of any hashable type (as JAX allows)."""
    return tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)


def _axis_size(axis_name: AxisName) -> int:
    size = 1
    for n in _axis_names(axis_name):
        try:
            size *= jax.lax.axis_size(n)
        except NameError:
            raise NameError(
                f"`axis_name`={axis_name!r}: the axis {n!r} is not bound here. Synchronized statistics must "
                f"run inside a transformation that binds it: `jax.pmap(f, axis_name={n!r})`, "
                f"`jax.vmap(f, axis_name={n!r})`, or `jax.shard_map(f, mesh=Mesh(devices, ({n!r},)), ...)`. "
                f"Pass `axis_name=None` for per-device statistics."
            ) from None
    return size


def _index_groups(axis_index_groups: Any) -> list[list[int]] | None:
    """`axis_index_groups` as lists of ints, or None when it is not a sequence of int sequences."""
    try:
        groups = [list(g) for g in axis_index_groups]
    except TypeError:
        return None
    if not all(is_int(i) for g in groups for i in g):
        return None
    return [[int(i) for i in g] for g in groups]


def check_axis_name(axis_name: AxisName, axis_index_groups: AxisIndexGroups) -> None:
    """Raises a clear error for an unbound `axis_name` or malformed `axis_index_groups`."""
    if axis_name is None:
        if axis_index_groups is not None:
            raise ValueError(
                "`axis_index_groups` was given without `axis_name`; groups select devices along a named axis. "
                "Pass the `axis_name` the groups refer to."
            )
        return
    if not _axis_names(axis_name):
        raise ValueError(
            f"`axis_name`={axis_name!r} names no axis. Pass the name given to pmap/vmap/shard_map, e.g. "
            "`axis_name='batch'`, or `axis_name=None` for per-device statistics."
        )
    for n in _axis_names(axis_name):
        # JAX's collectives read an int as a positional axis of the array, not as a name.
        if n is None or isinstance(n, numbers.Number) or not isinstance(n, Hashable):
            raise TypeError(
                f"`axis_name` must be a name (a string) or a tuple of names, got {axis_name!r} (the entry {n!r} "
                f"of type {type_name(n)} is not a name). Pass the name given to pmap/vmap/shard_map, e.g. "
                "`axis_name='batch'`, or `axis_name=None` for per-device statistics."
            )
    size = _axis_size(axis_name)
    if axis_index_groups is None:
        return
    groups = _index_groups(axis_index_groups)
    half = max(size // 2, 1)
    if groups is None or sorted(i for g in groups for i in g) != list(range(size)) or len(set(map(len, groups))) != 1:
        raise ValueError(
            f"`axis_index_groups`={axis_index_groups!r} must split the {size} indices of axis "
            f"{axis_name!r} into groups of equal size, each index exactly once "
            f"(e.g. {[list(range(i, i + half)) for i in range(0, size, half)]})."
        )


def synchronized_size(axis_name: AxisName, axis_index_groups: AxisIndexGroups) -> int:
    """How many devices each statistic is reduced over: the size of `axis_name`, or of one of its index groups.

    Static (``jax.lax.axis_size``) under pmap, vmap and shard_map; for arguments :func:`check_axis_name` accepted.
    """
    if axis_name is None:
        return 1
    size = _axis_size(axis_name)
    groups = _index_groups(axis_index_groups) if axis_index_groups is not None else None
    return len(groups[0]) if groups else size
