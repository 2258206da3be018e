"""Loading PyTorch normalization layers' ``state_dict`` entries into Flax/normjax variables."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from normjax._src import arguments, dtypes
from normjax._src.typing import DTypeLike

_TORCH_TO_FLAX = {"weight": ("params", "scale"), "bias": ("params", "bias")}
_TORCH_STATS = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_IGNORED = ("num_batches_tracked",)


def norm_variables_from_torch(
    state_dict: Mapping[str, Any], prefix: str = "", *, dtype: DTypeLike = jnp.float32, count: bool = False
) -> dict[str, dict[str, Any]]:
    """The Flax variables of a PyTorch BatchNorm, LayerNorm or GroupNorm, from its ``state_dict`` entries.

    ``weight`` -> ``params/scale``, ``bias`` -> ``params/bias``, ``running_mean`` -> ``batch_stats/mean`` and
    ``running_var`` -> ``batch_stats/var``, and with ``count=True`` ``num_batches_tracked`` -> ``batch_stats/count``
    (int32; dropped by default, since Flax's BatchNorm has no such variable). The values are per-feature
    vectors, so no transposition is needed when the activations go from NCHW to NHWC: only the feature axis of
    the layer changes (``axis=-1`` in Flax for ``dim=1`` in PyTorch). The result matches
    ``normjax.linen``/``flax.linen`` ``BatchNorm``, ``LayerNorm`` (one normalized dimension) and ``GroupNorm``.

    Conventions to carry over, beyond the values:

    - momentum: PyTorch's ``momentum`` is the weight of the *new* batch statistic, Flax's the weight of the old
      running value; PyTorch's default ``0.1`` is ``momentum=0.9`` here (:func:`momentum_from_torch`).
      PyTorch's ``momentum=None`` (a cumulative average) has no EMA equivalent.
    - running variance: PyTorch stores the *unbiased* batch variance ``n/(n-1) * var`` in ``running_var``;
      Flax stores the biased one. Evaluation uses the loaded value as is, so eval outputs agree either way; to
      keep training with PyTorch's update rule use normjax's ``unbiased_running_var=True``.
    - epsilon: PyTorch's default is ``1e-5`` for all three layers; Flax's LayerNorm and GroupNorm default to
      ``1e-6``, so pass ``epsilon=1e-5`` to them.

    Args:
      state_dict: a mapping of names to ``torch.Tensor`` or array values, e.g. ``module.state_dict()`` of the
        whole network; only the keys under ``prefix`` are read.
      prefix: the layer's name in ``state_dict``, e.g. ``"layer1.0.bn1"`` (a trailing dot is optional).
      dtype: the dtype of the returned arrays (the step count stays int32).
      count: also return PyTorch's ``num_batches_tracked`` as ``batch_stats/count``, the step counter of a
        normjax BatchNorm with ``renorm_warmup_steps`` (PyTorch counts every training call; normjax counts the
        calls that updated the statistics, the same unless a batch was skipped).

    Returns:
      ``{"params": {...}}`` plus ``"batch_stats"`` for a BatchNorm, holding ``jax.Array`` values.

    Example:
      >>> import numpy as np
      >>> import normjax
      >>> torch_state = {"bn.weight": np.ones(2), "bn.bias": np.zeros(2), "bn.running_mean": np.zeros(2),
      ...                "bn.running_var": np.ones(2), "bn.num_batches_tracked": np.array(3)}
      >>> variables = normjax.norm_variables_from_torch(torch_state, "bn")
      >>> {k: sorted(v) for k, v in variables.items()}
      {'params': ['bias', 'scale'], 'batch_stats': ['mean', 'var']}
    """
    if hasattr(state_dict, "state_dict") and callable(state_dict.state_dict):
        raise TypeError(
            f"`state_dict` must be a mapping of names to tensors, got the module {type(state_dict).__name__}. "
            "Pass its state: `norm_variables_from_torch(module.state_dict(), prefix)`."
        )
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"`state_dict` must be a mapping of names to tensors or arrays, got {type(state_dict).__name__}. "
            "Pass `module.state_dict()`."
        )
    if not isinstance(prefix, str):
        raise TypeError(
            f"`prefix` must be a string, the layer's name in `state_dict`, got {prefix!r}. Pass e.g. "
            "`prefix='layer1.0.bn1'`, or `prefix=''` for the layer's own state_dict."
        )
    dtypes.check_float_dtype(dtype, "dtype", "the dtype of the returned variables")
    arguments.check_static_bool(count, "count")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"`dtype` must be a real floating-point dtype, got {jnp.dtype(dtype)}: PyTorch's norm parameters and "
            "statistics are real. Pass e.g. `dtype=jnp.float32`."
        )
    prefix = prefix + "." if prefix and not prefix.endswith(".") else prefix
    entries = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    names = {**_TORCH_TO_FLAX, **_TORCH_STATS}
    unknown = sorted(set(entries) - set(names) - set(_IGNORED))
    if unknown or not set(entries) & set(names):
        raise ValueError(
            f"expected the entries of one PyTorch norm layer under prefix {prefix!r} ({sorted(names)}), got "
            f"{sorted(entries)}. Pass the layer's own name as `prefix`, e.g. 'layer1.0.bn1'."
        )
    if ("running_mean" in entries) != ("running_var" in entries):
        raise ValueError(f"got only one of running_mean and running_var under prefix {prefix!r}; need both.")
    arrays = {name: _to_numpy(value) for name, value in entries.items() if name in names}
    shapes = {name: a.shape for name, a in arrays.items()}
    for name, a in arrays.items():
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)) or a.dtype == np.bool_:
            raise TypeError(f"`state_dict` entry {prefix + name!r} must hold numbers, got dtype {a.dtype}.")
    if len(set(shapes.values())) != 1 or any(len(shape) != 1 for shape in shapes.values()):
        raise ValueError(
            f"`state_dict` entries under prefix {prefix!r} must be vectors of one length (one value per feature), "
            f"got shapes {shapes}. Check that they come from one norm layer (with one normalized dimension)."
        )
    variables: dict[str, dict[str, Any]] = {}
    for torch_name, (collection, flax_name) in names.items():
        if torch_name in arrays:
            variables.setdefault(collection, {})[flax_name] = jnp.asarray(arrays[torch_name], dtype)
    if count:
        if "num_batches_tracked" not in entries or "batch_stats" not in variables:
            raise ValueError(
                f"`count=True` reads a BatchNorm's `num_batches_tracked` under prefix {prefix!r}, got "
                f"{sorted(entries)}. Pass `count=False` for a layer without running statistics."
            )
        tracked = _to_numpy(entries["num_batches_tracked"])
        variables["batch_stats"]["count"] = jnp.asarray(tracked.astype(np.int64).reshape(()), jnp.int32)
    return variables


def _to_numpy(value: Any) -> np.ndarray:
    """A copy of a torch tensor (any device, with or without grad) or array-like as NumPy, without importing torch.

    A copy, because ``Tensor.numpy()`` shares memory with the tensor and JAX may share it with the NumPy array on
    CPU: torch's in-place updates of its running statistics would otherwise change the loaded values.
    """
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if not value.dtype.is_complex and value.dtype.is_floating_point and value.element_size() < 4:
            value = value.float()  # NumPy has no bfloat16: widen (exactly) before converting
        value = value.numpy()
    return np.array(value, copy=True)


def momentum_from_torch(torch_momentum: float) -> float:
    """PyTorch's BatchNorm ``momentum`` (weight of the new value) as Flax's (weight of the old): ``1 - m``.

    Args:
      torch_momentum: PyTorch's momentum in [0, 1], e.g. its default 0.1.

    Returns:
      The Flax/normjax momentum.

    Example:
      >>> import normjax
      >>> normjax.momentum_from_torch(0.1)
      0.9
    """
    return _flip_momentum(torch_momentum, "torch_momentum")


def momentum_to_torch(flax_momentum: float) -> float:
    """Flax's BatchNorm ``momentum`` (weight of the old value) as PyTorch's (weight of the new): ``1 - m``.

    Args:
      flax_momentum: the Flax/normjax momentum in [0, 1], e.g. Flax's default 0.99.

    Returns:
      PyTorch's momentum.

    Example:
      >>> import normjax
      >>> round(normjax.momentum_to_torch(0.99), 6)
      0.01
    """
    return _flip_momentum(flax_momentum, "flax_momentum")


def _flip_momentum(momentum: Any, name: str) -> float:
    if momentum is not None and (isinstance(momentum, bool | np.bool_) or not isinstance(momentum, numbers.Real)):
        raise TypeError(
            f"`{name}` must be a number in [0, 1], got {momentum!r} of type {type(momentum).__name__}. Pass e.g. "
            f"`{name}=0.1`."
        )
    if momentum is None or not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"`{name}` must be a number in [0, 1], got {momentum!r}. Pass e.g. 0.1 (PyTorch's default); "
            "PyTorch's momentum=None (a cumulative moving average) has no exponential-moving-average equivalent."
        )
    return round(1.0 - momentum, 12)
