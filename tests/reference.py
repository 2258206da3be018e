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


def layer_norm(x, scale=None, bias=None, *, axis=-1, epsilon=1e-6, mask=None):
    axes = _axes(axis, np.ndim(x))
    mean, var, _ = moments(x, axes, mask)
    return normalize(x, mean, var, scale, bias, epsilon, axes)


def rms_norm(x, scale=None, *, axis=-1, epsilon=1e-6, mask=None):
    axes = _axes(axis, np.ndim(x))
    mean, var, _ = moments(x, axes, mask, centered=False)
    return normalize(x, mean, var, scale, None, epsilon, axes)


def group_norm(x, scale=None, bias=None, *, num_groups, axis=-1, epsilon=1e-6, mask=None):
    x = np.asarray(x, np.float64)
    c = _axes(axis, x.ndim)[0]
    channels = x.shape[c]
    grouped = x.shape[:c] + (num_groups, channels // num_groups) + x.shape[c + 1 :]
    xg = x.reshape(grouped)
    mg = None if mask is None else np.broadcast_to(mask, x.shape).reshape(grouped)
    reduce = _other((0, c), xg.ndim)
    mean, var, _ = moments(xg, reduce, mg)
    y = ((xg - mean) / np.sqrt(var + epsilon)).reshape(x.shape)
    return normalize(y, 0.0, 1.0 - epsilon, scale, bias, epsilon, c)


def instance_norm(x, scale=None, bias=None, *, axis=-1, epsilon=1e-6, mask=None):
    c = _axes(axis, np.ndim(x))[0]
    mean, var, _ = moments(x, _other((0, c), np.ndim(x)), mask)
    return normalize(x, mean, var, scale, bias, epsilon, c)
