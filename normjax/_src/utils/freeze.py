"""Freezing BatchNorm for fine-tuning without editing the model: running statistics, no updates, no gradients."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Collection, Iterator
from typing import Any

import jax
import numpy as np

from normjax._src import flax_conventions
from normjax._src.optional_dependencies import import_optional
from normjax._src.utils import _paths

_BATCH_NORM = ("BatchNorm",)


@contextlib.contextmanager
def freeze_batch_norm(
    where: Callable[[tuple[str, ...]], bool] | None = None, *, kinds: Collection[str] = _BATCH_NORM
) -> Iterator[None]:
    """A context in which the BatchNorm layers of ``flax.linen`` models use, and do not update, running statistics.

    Inside the context every BatchNorm call (Flax's ``flax.linen.BatchNorm``, normjax's drop-in layer, or a
    subclass of either) runs as if ``use_running_average=True``: it normalizes with ``batch_stats`` and leaves
    them unchanged, whatever the model code or the call says. This is the usual way to fine-tune a pretrained
    network on small batches, with no edit to the model. It applies while ``model.apply`` is traced, so put
    the ``apply`` (or the whole jitted step) inside the context; a step jitted outside the context and already
    compiled is not affected. Pair it with :func:`stop_gradient_where` (or an optax mask) to also freeze the
    layers' scale and bias.

    Args:
      where: optional predicate on a layer's module path (a tuple of names, e.g. ``("backbone", "bn1")``):
        only the layers for which it returns True are frozen. Default: every BatchNorm.
      kinds: class names of the layers to freeze.

    Yields:
      Nothing; the freezing lasts until the context exits.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> import normjax
      >>> model = nn.BatchNorm(use_running_average=False)
      >>> x = jnp.array([[1.0], [3.0]])
      >>> variables = model.init(jax.random.key(0), x)
      >>> with normjax.freeze_batch_norm():
      ...     y, updates = model.apply(variables, x, mutable=["batch_stats"])
      >>> [round(float(v), 3) for v in y.ravel()], updates["batch_stats"]["mean"].tolist()
      ([1.0, 3.0], [0.0])

    ``flax.nnx`` layers are not intercepted (nnx has no method interception): use
    :func:`freeze_batch_norm_nnx` for them. normjax's nnx BatchNorm called inside this context raises a
    ``RuntimeError`` saying so, rather than silently updating its statistics; Flax's own ``nnx.BatchNorm``
    cannot be detected and is not frozen.
    """
    nn = import_optional("flax.linen", needed_by="normjax.freeze_batch_norm")

    _paths.check_where(where)
    _paths.check_kinds(kinds)

    def use_running_average(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not _paths.is_kind(module, kinds):
            return next_fun(*args, **kwargs)
        if where is not None and not where(tuple(module.path)):
            return next_fun(*args, **kwargs)
        args, kwargs = _without_call_argument(type(module).__call__, args, kwargs, "use_running_average")
        # Flax merges the attribute with the call argument and refuses both being set, so the call argument is
        # cleared and the attribute of this (bound, per-apply) module instance is set for the call's duration.
        previous = module.use_running_average
        object.__setattr__(module, "use_running_average", True)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, "use_running_average", previous)

    with nn.intercept_methods(use_running_average), flax_conventions.linen_freeze_active():
        yield


def _without_call_argument(
    method: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], name: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`args` and `kwargs` of a call to `method` (without `self`) with argument `name` left at its default."""
    bound = inspect.signature(method).bind(None, *args, **kwargs)
    bound.arguments.pop(name, None)
    return bound.args[1:], bound.kwargs


def freeze_batch_norm_nnx(
    model: Any,
    where: Callable[[tuple[str, ...]], bool] | None = None,
    *,
    kinds: Collection[str] = _BATCH_NORM,
) -> list[tuple[str, ...]]:
    """Sets the BatchNorm layers of a ``flax.nnx`` model to use, and not update, their running statistics.

    Unlike ``model.eval()``, which also switches dropout and every other mode-dependent layer, only the
    BatchNorm layers (Flax's ``nnx.BatchNorm``, normjax's drop-in layer, or subclasses) get
    ``use_running_average=True``; the rest of the model keeps training. ``model.train()`` undoes it.
    To also freeze their scale and bias, leave them out of the optimizer, e.g.
    ``nnx.Optimizer(model, tx, wrt=nnx.All(nnx.Param, nnx.Not(frozen)))`` with a filter built from the
    returned paths, or mask them with :func:`stop_gradient_where`.

    Args:
      model: a ``flax.nnx.Module``; modified in place.
      where: optional predicate on a layer's path (a tuple of names); only the layers where it holds are frozen.
      kinds: class names of the layers to freeze.

    Returns:
      The paths of the layers that were frozen.

    Example:
      >>> from flax import nnx
      >>> import normjax
      >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
      >>> normjax.freeze_batch_norm_nnx(model)
      [('layers', '1')]
      >>> model.layers[1].use_running_average
      True
    """
    nnx = import_optional("flax.nnx", needed_by="normjax.freeze_batch_norm_nnx")

    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"`model` must be a flax.nnx.Module, got {type(model).__name__}. For a flax.linen model use the "
            "context manager `with normjax.freeze_batch_norm(): model.apply(...)`."
        )
    _paths.check_where(where)
    _paths.check_kinds(kinds)
    frozen = []
    for path in _paths.nnx_module_paths(model, lambda node: _paths.is_kind(node, kinds)):
        if where is None or where(path):
            _nnx_submodule(model, path).use_running_average = True
            frozen.append(path)
    return frozen


def _nnx_submodule(model: Any, path: _paths.Path) -> Any:
    for name in path:
        model = model[int(name)] if name.isdigit() and not hasattr(model, name) else getattr(model, name)
    return model


def stop_gradient_where(tree: Any, mask: Any) -> Any:
    """``jax.lax.stop_gradient`` on the leaves of ``tree`` where ``mask`` is True; the others unchanged.

    Applied to the params inside a loss function, it makes the gradients of the selected parameters exactly
    zero, e.g. the scale and bias of frozen BatchNorm layers (mask from :func:`norm_params_mask`).

    Args:
      tree: a tree of arrays, e.g. ``variables["params"]``.
      mask: a tree of bools of the structure of ``tree`` (or a prefix of it).

    Returns:
      ``tree`` with the selected leaves wrapped in ``stop_gradient``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normjax
      >>> params = {"kernel": jnp.array(2.0), "scale": jnp.array(3.0)}
      >>> mask = {"kernel": False, "scale": True}
      >>> loss = lambda p: (lambda q: q["kernel"] * q["scale"])(normjax.stop_gradient_where(p, mask))
      >>> {k: float(v) for k, v in jax.grad(loss)(params).items()}
      {'kernel': 3.0, 'scale': 0.0}
    """
    for path, selected in jax.tree_util.tree_leaves_with_path(mask):
        if not isinstance(selected, bool | np.bool_):
            raise TypeError(
                f"`mask` must hold Python bools, got {selected!r} of type {type(selected).__name__} at "
                f"{jax.tree_util.keystr(path) or 'the root'}. Build it with `normjax.norm_params_mask(params)` or "
                "`jax.tree.map(lambda _: False, params)`."
            )
    try:
        return jax.tree.map(
            lambda selected, subtree: jax.tree.map(jax.lax.stop_gradient, subtree) if selected else subtree,
            mask,
            tree,
        )
    except ValueError as error:
        raise ValueError(
            f"`mask` must have the structure of `tree` (or of a prefix of it): {jax.tree.structure(mask)} does not "
            f"match {jax.tree.structure(tree)}. Build the mask from the same tree, e.g. "
            f"`normjax.norm_params_mask(params)`. ({error})"
        ) from None
