"""Module paths and kinds shared by the utilities: which modules are norms and where their variables live."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

import jax

NORM_KINDS = ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm")
"""Class names of the normalization layers of ``flax.linen``, ``flax.nnx``, ``normjax.linen`` and ``normjax.nnx``."""

Path = tuple[str, ...]
PathSpec = str | Iterable[Any]


def check_kinds(kinds: Any) -> None:
    """Raises unless `kinds` is a collection of class names (a single string would match by substring)."""
    if isinstance(kinds, str) or not isinstance(kinds, Collection) or not all(isinstance(k, str) for k in kinds):
        raise TypeError(
            f"`kinds` must be a collection of class names, got {kinds!r}. Pass e.g. `kinds=('BatchNorm',)`; "
            "a single name must be wrapped in a tuple or list."
        )


def check_where(where: Any) -> None:
    """Raises unless `where` is None or a predicate on module paths."""
    if where is not None and not callable(where):
        raise TypeError(
            f"`where` must be a function of a module path (a tuple of names) returning a bool, or None; got "
            f"{where!r}. Pass e.g. `where=lambda path: path[0] == 'backbone'`."
        )


def is_kind(obj: Any, kinds: Collection[str]) -> bool:
    """Whether `obj`'s class, or one of its base classes, has one of the names in `kinds`.

    Matching by class name covers Flax's layers and normjax's drop-in layers of the same name (and subclasses of
    either) without importing either package.
    """
    return any(cls.__name__ in kinds for cls in type(obj).__mro__)


def as_path(spec: PathSpec) -> Path:
    """``"block1/bn"`` or ``("block1", "bn")`` (ints allowed, for nnx lists) -> ``("block1", "bn")``."""
    if isinstance(spec, str):
        return tuple(part for part in spec.split("/") if part)
    return tuple(str(part) for part in spec)


def key_name(key: Any) -> str:
    """The name of one step of a JAX key path (a dict key, an attribute or a sequence index) as a string."""
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def leaf_path(key_path: tuple[Any, ...]) -> Path:
    """A leaf's key path as names, without the trailing ``.value`` step of an ``nnx.Variable`` leaf."""
    if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and key_path[-1].name == "value":
        key_path = key_path[:-1]
    return tuple(key_name(k) for k in key_path)


def nnx_module_paths(model: Any, select: Callable[[Any], bool]) -> list[Path]:
    """Paths of the sub-modules of an nnx ``model`` (itself included, as ``()``) for which ``select`` holds."""
    from flax import nnx

    return [
        tuple(str(p) for p in path)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Module) and select(node)
    ]
