"""Float64 NumPy references for every norm: the ground truth the tests compare against."""

from __future__ import annotations

import numpy as np


def _axes(axes, ndim):
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(sorted(a % ndim for a in axes))


def _other(axes, ndim):
    return tuple(a for a in range(ndim) if a not in axes)


def _param(p, x_ndim, feature_axes, x_shape):
    shape = [1] * x_ndim
    for a in feature_axes:
        shape[a] = x_shape[a]
    return np.reshape(np.asarray(p, np.float64), shape)


def moments(x, axes, mask=None, centered=True):
    """(mean, var, count) in float64 with keepdims; masked-out elements are ignored whatever they hold."""
    x = np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64)
    axes = _axes(axes, x.ndim)
    m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
    xz = np.where(m, x, 0)
    count = m.sum(axes, keepdims=True).astype(np.float64)
    safe = np.maximum(count, 1)
    mean = xz.sum(axes, keepdims=True) / safe if centered else np.zeros_like(count)
    var = (np.where(m, np.abs(x - mean) ** 2, 0)).sum(axes, keepdims=True) / safe
    return mean, var, count


def normalize(x, mean, var, scale, bias, epsilon, feature_axes):
    x = np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64)
    feature_axes = _axes(feature_axes, x.ndim)
    y = (x - mean) / np.sqrt(var + epsilon)
    if scale is not None:
        y = y * _param(scale, x.ndim, feature_axes, x.shape)
    if bias is not None:
        y = y + _param(bias, x.ndim, feature_axes, x.shape)
    return y


def batch_norm_train(x, scale=None, bias=None, *, axis=-1, epsilon=1e-5, mask=None):
    """Returns (y, batch_mean, batch_var, count), statistics squeezed to the feature shape."""
    features = _axes(axis, np.ndim(x))
    reduce = _other(features, np.ndim(x))
    mean, var, count = moments(x, reduce, mask)
    y = normalize(x, mean, var, scale, bias, epsilon, features)
    squeeze = lambda a: np.squeeze(np.broadcast_to(a, mean.shape), reduce)  # noqa: E731
    return y, squeeze(mean), squeeze(var), squeeze(count)


def batch_norm_eval(x, running_mean, running_var, scale=None, bias=None, *, axis=-1, epsilon=1e-5):
    features = _axes(axis, np.ndim(x))
    mean = _param(running_mean, np.ndim(x), features, np.shape(x))
    var = _param(running_var, np.ndim(x), features, np.shape(x))
    return normalize(x, mean, var, scale, bias, epsilon, features)


def layer_norm(x, scale=None, bias=None, *, reduction_axes=-1, epsilon=1e-6, mask=None):
    axes = _axes(reduction_axes, np.ndim(x))
    mean, var, _ = moments(x, axes, mask)
    return normalize(x, mean, var, scale, bias, epsilon, axes)


def rms_norm(x, scale=None, *, reduction_axes=-1, epsilon=1e-6, mask=None):
    axes = _axes(reduction_axes, np.ndim(x))
    mean, var, _ = moments(x, axes, mask, centered=False)
    return normalize(x, mean, var, scale, None, epsilon, axes)


def group_norm(x, scale=None, bias=None, *, num_groups, feature_axes=-1, epsilon=1e-6, mask=None):
    x = np.asarray(x, np.float64)
    c = _axes(feature_axes, x.ndim)[0]
    channels = x.shape[c]
    grouped = x.shape[:c] + (num_groups, channels // num_groups) + x.shape[c + 1 :]
    xg = x.reshape(grouped)
    mg = None if mask is None else np.broadcast_to(mask, x.shape).reshape(grouped)
    reduce = _other((0, c), xg.ndim)
    mean, var, _ = moments(xg, reduce, mg)
    y = ((xg - mean) / np.sqrt(var + epsilon)).reshape(x.shape)
    return normalize(y, 0.0, 1.0 - epsilon, scale, bias, epsilon, c)


def instance_norm(x, scale=None, bias=None, *, feature_axes=-1, epsilon=1e-6, mask=None):
    c = _axes(feature_axes, np.ndim(x))[0]
    mean, var, _ = moments(x, _other((0, c), np.ndim(x)), mask)
    return normalize(x, mean, var, scale, bias, epsilon, c)


def batch_renorm_train(x, running_mean, running_var, scale=None, bias=None, *, r_max, d_max, axis=-1, epsilon=1e-5):
    """Batch Renormalization (Ioffe, 2017) in training, written from the paper: returns (y, r, d).

    sigma_B = sqrt(var_B + eps), sigma = sqrt(running_var + eps), r = clip(sigma_B / sigma, 1/r_max, r_max),
    d = clip((mu_B - running_mean) / sigma, -d_max, d_max), y = ((x - mu_B) / sigma_B * r + d) * gamma + beta.
    """
    x = np.asarray(x, np.float64)
    features = _axes(axis, x.ndim)
    mean, var, _ = moments(x, _other(features, x.ndim))
    batch_std = np.sqrt(var + epsilon)
    running_mean = _param(running_mean, x.ndim, features, x.shape)
    running_std = np.sqrt(_param(running_var, x.ndim, features, x.shape) + epsilon)
    r = np.clip(batch_std / running_std, 1.0 / r_max, r_max)
    d = np.clip((mean - running_mean) / running_std, -d_max, d_max)
    y = (x - mean) / batch_std * r + d
    if scale is not None:
        y = y * _param(scale, x.ndim, features, x.shape)
    if bias is not None:
        y = y + _param(bias, x.ndim, features, x.shape)
    squeeze = lambda a: np.reshape(a, [x.shape[f] for f in features])  # noqa: E731
    return y, squeeze(r), squeeze(d)


def tolerance(dtype) -> dict:
    """``rtol``/``atol`` for comparing an order-1 result computed from a ``dtype`` input with the float64 reference.

    The statistics are always reduced in float32 or wider, so the error is the float32 (or float64) arithmetic
    plus the final rounding of the output to ``dtype``:

    - float64: ~1e-16 per operation, a few dozen operations -> 1e-10.
    - float32: eps 1.2e-7; sums over ~1e2 elements and an rsqrt lose about two digits -> 1e-5.
    - float16: 11-bit significand, rounding the output costs up to 2^-11 = 4.9e-4 relative -> 2e-3.
    - bfloat16: 8-bit significand, rounding the output costs up to 2^-8 = 3.9e-3 relative -> 1e-2.
    """
    name = np.dtype(dtype).name
    tol = {"float64": 1e-10, "complex128": 1e-10, "float32": 1e-5, "complex64": 1e-5, "float16": 2e-3}
    value = tol.get(name, 1e-2 if name == "bfloat16" else None)
    if value is None:
        raise ValueError(f"no tolerance defined for dtype {name}")
    return {"rtol": value, "atol": value}
