"""Folding an inference-mode BatchNorm into the Conv or Dense layer before it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from normjax._src import arguments
from normjax._src.normalize import normalize
from normjax._src.typing import ArrayLike
from normjax._src.utils import _paths


def fold_batch_norm(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    scale: ArrayLike | None,
    bn_bias: ArrayLike | None,
    mean: ArrayLike,
    var: ArrayLike,
    *,
    epsilon: float = 1e-5,
    scale_offset: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    r"""The kernel and bias of a linear layer with the inference-mode BatchNorm that follows it folded in.

    For a layer :math:`z = x * W + b` (convolution or matrix product, output features on the kernel's last
    axis, as in Flax: Dense ``(in, out)``, Conv ``(..., in, out)`` i.e. HWIO) followed by BatchNorm with running
    statistics :math:`\hat\mu, \hat\sigma^2`:

    .. math::

        \mathrm{BN}(z) = (z - \hat\mu)\,s + \beta, \quad s = \frac{\gamma}{\sqrt{\hat\sigma^2 + \epsilon}}
        \quad\Longrightarrow\quad W' = W s, \quad b' = (b - \hat\mu)\,s + \beta

    so one layer with :math:`W', b'` computes both (PyTorch's ``fuse_conv_bn_eval``). Only valid when the
    BatchNorm uses running statistics (inference) and normalizes the layer's output features. The arithmetic
    runs in float32 or wider and the results take the kernel's dtype.

    Args:
      kernel: the layer's kernel, output features on the last axis.
      bias: the layer's bias ``(out,)``, or None for a layer without bias.
      scale: the BatchNorm's :math:`\gamma` ``(out,)``, or None (``use_scale=False``).
      bn_bias: the BatchNorm's :math:`\beta` ``(out,)``, or None (``use_bias=False``).
      mean: the BatchNorm's running mean ``(out,)``.
      var: the BatchNorm's running variance ``(out,)``.
      epsilon: the BatchNorm's epsilon (Flax's default is 1e-5).
      scale_offset: the BatchNorm's ``scale_offset``: :math:`\gamma + c` replaces :math:`\gamma` above.

    Returns:
      ``(kernel, bias)`` of the folded layer; the bias always exists.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> kernel, bias = normjax.fold_batch_norm(
      ...     jnp.array([[1.0, 2.0]]), None, jnp.array([2.0, 1.0]), jnp.array([0.5, 0.0]),
      ...     mean=jnp.array([1.0, 0.0]), var=jnp.array([4.0, 1.0]), epsilon=1e-12)
      >>> kernel.tolist(), bias.tolist()
      ([[1.0, 2.0]], [-0.5, 0.0])

    References:
      Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
      Inference", CVPR 2018 (section 3.2, batch normalization folding).
    """
    for name, value in (("kernel", kernel), ("mean", mean), ("var", var)):
        if value is None:
            raise TypeError(f"`{name}` is required, got None. Pass the layer's `{name}` array.")
        arguments.check_inexact(value, name)
    if jnp.ndim(kernel) < 1:
        raise ValueError(
            f"`kernel` must have at least one axis (output features last), got a scalar of shape {jnp.shape(kernel)}."
            " Pass the Dense kernel (in, out) or the Conv kernel (..., in, out)."
        )
    out = jnp.shape(kernel)[-1]
    features = (out,)
    for name, value in (("bias", bias), ("scale", scale), ("bn_bias", bn_bias), ("mean", mean), ("var", var)):
        if value is not None:
            arguments.check_inexact(value, name)
        if value is not None and jnp.shape(value) != features:
            raise ValueError(
                f"`{name}` must have shape {features} (one value per output feature, the last axis of `kernel` "
                f"{jnp.shape(kernel)}), got {jnp.shape(value)}. Flax kernels are HWIO/(in, out); transpose "
                "PyTorch OIHW/(out, in) weights to put the output features last."
            )
    kernel, mean, var = jnp.asarray(kernel), jnp.asarray(mean), jnp.asarray(var)
    rank = jnp.ndim(kernel)
    var_last = jnp.reshape(var, (1,) * (rank - 1) + features)
    # W·s is the standardization of W around mean 0; b' is the BatchNorm of the old bias, with the same s.
    zero = jnp.zeros((), var.dtype)
    folded_kernel = normalize(
        kernel, zero, var_last, scale, None, epsilon=epsilon, feature_axes=-1, scale_offset=scale_offset
    )
    old_bias = jnp.zeros(features, var.dtype) if bias is None else bias
    folded_bias = normalize(
        old_bias,
        mean,
        var,
        scale,
        bn_bias,
        epsilon=epsilon,
        feature_axes=0,
        dtype=jnp.result_type(kernel),
        scale_offset=scale_offset,
    )
    return folded_kernel, folded_bias


def fold_batch_norm_variables(
    variables: Mapping[str, Any],
    pairs: Mapping[_paths.PathSpec, _paths.PathSpec] | Iterable[tuple[_paths.PathSpec, _paths.PathSpec]],
    *,
    epsilon: float = 1e-5,
    scale_offset: float = 0.0,
) -> dict[str, Any]:
    """Folds BatchNorm layers into the Conv/Dense layers before them, on a linen variable tree.

    For each ``(layer, batch_norm)`` pair of module paths, the layer's ``params/kernel`` and ``params/bias``
    are replaced by :func:`fold_batch_norm`'s (a bias is added if the layer had none) and the BatchNorm's
    entries (``params`` and ``batch_stats``) are removed. The result is the variables of the inference model
    in which each such BatchNorm is gone and each folded layer has ``use_bias=True``.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of a trained linen model.
      pairs: a mapping (or pairs) from each layer's path to the path of the BatchNorm that follows it, as
        ``"block/Conv_0"`` strings or tuples of names.
      epsilon: the BatchNorm layers' epsilon.
      scale_offset: the BatchNorm layers' ``scale_offset`` (1.0 for zero-centered scales).

    Returns:
      The new variables (a new nested dict; the input is not modified).

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> variables = {
      ...     "params": {"Dense_0": {"kernel": jnp.ones((1, 1))},
      ...                "bn": {"scale": jnp.array([2.0]), "bias": jnp.array([1.0])}},
      ...     "batch_stats": {"bn": {"mean": jnp.array([3.0]), "var": jnp.array([4.0])}}}
      >>> folded = normjax.fold_batch_norm_variables(variables, {"Dense_0": "bn"}, epsilon=1e-12)
      >>> folded["params"]["Dense_0"]["kernel"].tolist(), folded["params"]["Dense_0"]["bias"].tolist()
      ([[1.0]], [-2.0])
      >>> sorted(folded["params"]), folded["batch_stats"]
      (['Dense_0'], {})
    """
    if not isinstance(variables, Mapping):
        raise TypeError(
            f"`variables` must be a mapping of collections ({{'params': ..., 'batch_stats': ...}}), got "
            f"{type(variables).__name__}. Pass the variables of a linen model, e.g. `model.init(key, x)`."
        )
    result = _copy_dicts(variables)
    for layer_spec, bn_spec in _pairs(pairs):
        layer, bn = _paths.as_path(layer_spec), _paths.as_path(bn_spec)
        layer_params = _lookup(result, ("params", *layer))
        bn_params = _lookup(result, ("params", *bn), default={})
        kernel, bias = fold_batch_norm(
            _lookup(result, ("params", *layer, "kernel")),
            layer_params.get("bias"),
            bn_params.get("scale"),
            bn_params.get("bias"),
            _lookup(result, ("batch_stats", *bn, "mean")),
            _lookup(result, ("batch_stats", *bn, "var")),
            epsilon=epsilon,
            scale_offset=scale_offset,
        )
        layer_params.update(kernel=kernel, bias=bias)
        for collection in ("params", "batch_stats"):
            _remove(result, (collection, *bn))
    return result


def _pairs(pairs: Any) -> list[tuple[_paths.PathSpec, _paths.PathSpec]]:
    """`pairs` as a list of (layer, batch_norm) path specs, or a TypeError naming `pairs`."""
    items = list(pairs.items()) if isinstance(pairs, Mapping) else pairs
    fix = "Pass e.g. `{'Conv_0': 'BatchNorm_0'}` or `[('block/Conv_0', 'block/BatchNorm_0')]`."
    if isinstance(items, str) or not isinstance(items, Iterable):
        raise TypeError(f"`pairs` must map each layer's path to its BatchNorm's path, got {pairs!r}. {fix}")
    items = list(items)
    for item in items:
        if isinstance(item, str) or not isinstance(item, Iterable) or len(tuple(item)) != 2:
            raise TypeError(f"`pairs` must hold (layer, batch_norm) path pairs, got the entry {item!r}. {fix}")
        for spec in item:
            if not isinstance(spec, str | tuple | list):
                raise TypeError(
                    f"`pairs` must hold module paths ('a/b' strings or tuples of names), got {spec!r}. {fix}"
                )
    return [tuple(item) for item in items]


def _copy_dicts(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {key: _copy_dicts(value) for key, value in tree.items()}
    return tree


_MISSING = object()


def _lookup(tree: Any, path: _paths.Path, default: Any = _MISSING) -> Any:
    node = tree
    for depth, name in enumerate(path):
        if not isinstance(node, Mapping) or name not in node:
            if default is not _MISSING:
                return default
            available = sorted(node) if isinstance(node, Mapping) else []
            if depth == 0:
                fix = f"Pass `variables` with the {name!r} collection of the trained model."
            elif name in ("kernel", "mean", "var"):
                fix = (
                    "Check `pairs`: each entry maps a Dense or Conv layer (with a 'kernel') to the BatchNorm after it "
                    "(with 'batch_stats' 'mean' and 'var')."
                )
            else:
                fix = "Check the module paths in `pairs`."
            raise KeyError(
                f"no variables at {'/'.join(path)!r}: {'/'.join(path[:depth]) or 'the root'} has no entry {name!r} "
                f"(it has {available}). {fix}"
            )
        node = node[name]
    return node


def _remove(tree: Any, path: _paths.Path) -> None:
    parent = _lookup(tree, path[:-1], default=None)
    if isinstance(parent, dict):
        parent.pop(path[-1], None)
