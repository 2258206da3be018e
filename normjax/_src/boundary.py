"""The public boundary of the functions: keywords renamed for one meaning per name (the old spelling keeps
working for one release, with a warning), and the named scope that shows each norm in profiler traces."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import jax

F = TypeVar("F", bound=Callable[..., Any])


def renamed_keywords(**old_to_new: str) -> Callable[[F], F]:
    """Accept each deprecated keyword ``old`` of the decorated function as ``new``, with a DeprecationWarning.

    ``@renamed_keywords(axis="reduction_axes")`` lets ``f(x, axis=1)`` mean ``f(x, reduction_axes=1)`` and warns
    that ``axis`` is deprecated; passing both spellings is a TypeError, as a repeated keyword is.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(
                        f"{fn.__name__}() got both `{old}` and `{new}`; `{old}` is the deprecated name of "
                        f"`{new}`: pass only `{new}=`."
                    )
                warnings.warn(
                    f"`{old}` is deprecated in `{fn.__name__}`; use `{new}=`.", DeprecationWarning, stacklevel=2
                )
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def named_scope(name: str) -> Callable[[F], F]:
    """Runs the decorated function under ``jax.named_scope(name)``, so its operations carry ``name`` in the
    jaxpr's name stack, the HLO metadata and profiler traces (as Flax and Equinox label their layers)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with jax.named_scope(name):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
