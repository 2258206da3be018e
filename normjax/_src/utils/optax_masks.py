"""Selecting normalization parameters in a params tree: optax weight-decay masks and module discovery."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Iterable
from typing import Any

import jax
import numpy as np

from normjax._src.optional_dependencies import import_optional
from normjax._src.utils import _paths

DEFAULT_NORM_MODULE_PATTERN = r"(?i)(?:(?:batch|layer|group|instance|rms)_?)?norm(?:_?\d+)?|(?:bn|ln|gn)(?:_?\d+)?"
"""Module names taken for norms when no explicit ``modules`` are given: Flax's automatic names (``BatchNorm_0``,
``LayerNorm_3``, ``RMSNorm_0``, ...) and the usual hand-picked ones (``norm``, ``norm1``, ``bn``, ``bn_2``, ``ln``,
``gn1``, ``batch_norm``, ``layernorm``). Matched against the whole name of the module holding the parameter."""

_NORM_PARAM_NAMES = ("scale", "bias")


def find_norm_modules(
    model: Any, *args: Any, kinds: Collection[str] = _paths.NORM_KINDS, **kwargs: Any
) -> list[tuple[str, ...]]:
    """Paths of the normalization layers of a Flax model, found by their type rather than their name.

    For a ``flax.linen`` module, ``model.init(key, *args, **kwargs)`` is traced abstractly (no computation, no
    memory) and every layer whose class is named in ``kinds`` is recorded; for a ``flax.nnx`` module the graph
    is walked (``args`` and ``kwargs`` are then not needed). Both Flax's layers and normjax's drop-in layers
    are found. The paths are those of the layers' entries in the variable trees.

    Args:
      model: a ``flax.linen.Module`` (unbound) or a ``flax.nnx.Module``.
      *args: example inputs for ``model.init`` (linen only).
      kinds: class names to select, e.g. ``("BatchNorm",)``; defaults to every norm.
      **kwargs: keyword arguments for ``model.init`` (linen only), e.g. ``train=False``.

    Returns:
      The sorted list of module paths, each a tuple of names (list indices of nnx models as strings).

    Example:
      >>> import flax.linen as nn, jax.numpy as jnp
      >>> import normjax
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=True), nn.Dense(2)])
      >>> normjax.find_norm_modules(model, jnp.ones((1, 3)))
      [('layers_1',)]
    """
    nnx = import_optional("flax.nnx", needed_by="normjax.find_norm_modules")

    _paths.check_kinds(kinds)
    select = functools.partial(_paths.is_kind, kinds=kinds)
    if isinstance(model, nnx.Module):
        return sorted(_paths.nnx_module_paths(model, select))
    return sorted(set(_linen_module_paths(model, select, args, kwargs)))


def _linen_module_paths(
    model: Any, select: Callable[[Any], bool], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[tuple[str, ...]]:
    import flax.linen as nn

    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}. "
            "For a params tree alone use `norm_params_mask(params, pattern=...)`."
        )
    found = []

    def record(next_fun, call_args, call_kwargs, context):
        if context.method_name == "__call__" and select(context.module):
            found.append(tuple(context.module.path))
        return next_fun(*call_args, **call_kwargs)

    def init(key):
        # A fresh function on each call, so a cached trace can never skip the recording.
        with nn.intercept_methods(record):
            return model.init(key, *args, **kwargs)

    jax.eval_shape(init, jax.random.key(0))
    return found


def norm_params_mask(
    params: Any,
    *,
    modules: Iterable[_paths.PathSpec] | None = None,
    pattern: str = DEFAULT_NORM_MODULE_PATTERN,
) -> Any:
    """A boolean tree of ``params``' structure, True at the ``scale`` and ``bias`` of normalization layers.

    Layers are recognized by their path: the given ``modules`` (e.g. from :func:`find_norm_modules`, exact
    and robust to any naming), or else by the name of the module holding the parameter matching ``pattern``
    (Flax's automatic names such as ``BatchNorm_0/scale`` or ``LayerNorm_1/bias``, see
    :data:`DEFAULT_NORM_MODULE_PATTERN`). Works on linen params dicts and on ``nnx.State`` trees.

    Args:
      params: a tree of parameters, e.g. ``variables["params"]``.
      modules: paths (tuples of names or ``"a/b"`` strings) of the norm layers; overrides ``pattern``.
      pattern: a regular expression matched against the whole name of the module holding each parameter.

    Returns:
      A tree of Python bools of the structure of ``params``.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> import normjax
      >>> params = {"Dense_0": {"kernel": jnp.ones((3, 4))}, "LayerNorm_0": {"scale": jnp.ones(4)}}
      >>> normjax.norm_params_mask(params)
      {'Dense_0': {'kernel': False}, 'LayerNorm_0': {'scale': True}}
      >>> model = nn.Sequential([nn.Dense(4), nn.LayerNorm()])  # names its layers layers_0, layers_1
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
      >>> normjax.norm_params_mask(params, modules=normjax.find_norm_modules(model, jnp.ones((1, 3))))
      {'layers_0': {'bias': False, 'kernel': False}, 'layers_1': {'bias': True, 'scale': True}}
    """
    is_norm_module = _module_selector(modules, pattern)

    def select(key_path, _):
        path = _paths.leaf_path(key_path)
        return len(path) >= 2 and path[-1] in _NORM_PARAM_NAMES and is_norm_module(path[:-1])

    return jax.tree_util.tree_map_with_path(select, params)


def weight_decay_mask(
    params: Any,
    *,
    modules: Iterable[_paths.PathSpec] | None = None,
    pattern: str = DEFAULT_NORM_MODULE_PATTERN,
    decay_biases: bool = True,
) -> Any:
    """The mask for ``optax.adamw(..., mask=...)`` that leaves normalization scales and biases undecayed.

    Weight decay pulls a norm's scale towards 0, which shrinks the layer's output rather than regularizing its
    input weights, so it is common to exclude norm parameters (and often all biases) from the decay.
    Pass the function itself as the mask (optax calls it on the params), or a ``functools.partial`` of it.

    Args:
      params: a tree of parameters.
      modules: paths of the norm layers, as for :func:`norm_params_mask`.
      pattern: the norm-module name pattern, as for :func:`norm_params_mask`.
      decay_biases: if False, also leave every leaf named ``bias`` undecayed.

    Returns:
      A tree of bools, True where weight decay applies.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import normjax
      >>> params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
      ...           "BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}}
      >>> optimizer = optax.adamw(1e-3, weight_decay=1e-2, mask=normjax.weight_decay_mask)
      >>> opt_state = optimizer.init(params)
      >>> normjax.weight_decay_mask(params)
      {'BatchNorm_0': {'bias': False, 'scale': False}, 'Dense_0': {'bias': True, 'kernel': True}}
      >>> normjax.weight_decay_mask(params, decay_biases=False)["Dense_0"]
      {'bias': False, 'kernel': True}
    """
    if not isinstance(decay_biases, bool | np.bool_):
        raise TypeError(
            f"`decay_biases` must be a bool, got {decay_biases!r} of type {type(decay_biases).__name__}. Pass "
            "`decay_biases=False` to leave every bias undecayed."
        )
    norm = norm_params_mask(params, modules=modules, pattern=pattern)

    def decay(key_path, is_norm):
        is_bias = _paths.leaf_path(key_path)[-1:] == ("bias",)
        return not is_norm and (decay_biases or not is_bias)

    return jax.tree_util.tree_map_with_path(decay, norm)


def _module_selector(modules: Any, pattern: Any) -> Callable[[_paths.Path], bool]:
    if modules is not None:
        if isinstance(modules, str):
            raise TypeError(
                f"`modules` must be a collection of module paths, got the single string {modules!r}. "
                f"Wrap it in a list: modules=[{modules!r}]."
            )
        if not isinstance(modules, Iterable) or not all(isinstance(m, str | tuple | list) for m in modules):
            raise TypeError(
                f"`modules` must be a collection of module paths ('a/b' strings or tuples of names), got "
                f"{modules!r}. Pass e.g. `modules=normjax.find_norm_modules(model, x)`."
            )
        wanted = {_paths.as_path(m) for m in modules}
        return lambda module_path: module_path in wanted
    if not isinstance(pattern, str):
        raise TypeError(
            f"`pattern` must be a regular expression string, got {pattern!r}. Pass e.g. `pattern=r'bn\\d*'`, or "
            "the layers' paths as `modules=...`."
        )
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"`pattern`={pattern!r} is not a valid regular expression ({error}). Fix it, or pass the norm layers' "
            "paths as `modules=...` instead."
        ) from None
    return lambda module_path: bool(module_path) and compiled.fullmatch(module_path[-1]) is not None
