"""Weight Standardization: a convolution kernel standardized over its input axes, by the same core as the norms."""

from __future__ import annotations

import jax

from normjax._src.boundary import named_scope
from normjax._src.spec import norm_spec
from normjax._src.standardize import standardize
from normjax._src.typing import ArrayLike, Axes


@named_scope("weight_standardize")
def weight_standardize(
    kernel: ArrayLike,
    scale: ArrayLike | None = None,
    *,
    reduction_axes: Axes | None = None,
    epsilon: float = 1e-10,
) -> jax.Array:
    r"""Weight Standardization (Qiao et al., 2019), BiT's and NFNet's ``StdConv``: standardize each output filter.

    .. math::

        \hat W_{\cdot o} = \frac{W_{\cdot o} - \mu_o}{\sqrt{\sigma_o^2 + \epsilon}}\,g_o

    with :math:`\mu_o, \sigma_o^2` over ``reduction_axes`` (the filter's fan-in) of each output feature
    :math:`o`. The default reduces every axis but the last, which is right for Flax's kernels: ``HWIO`` for
    ``nn.Conv``, ``(in, out)`` for ``nn.Dense``. For PyTorch's ``OIHW`` pass ``reduction_axes=(1, 2, 3)``.
    Statistics run in float32 or wider; the result has ``kernel``'s dtype. Gradients flow to ``kernel`` (and
    ``scale``) through the closed-form derivative of the norms.

    NFNet's scaled variant divides by :math:`\sqrt{N \sigma^2}` with :math:`N` the fan-in and multiplies by a
    learned gain: ``weight_standardize(w, gain / sqrt(N), epsilon=1e-4 / N)`` (NFNet clamps
    :math:`N \sigma^2` at ``1e-4`` where this adds it; the two differ only for nearly constant filters).

    Args:
      kernel: the weights, e.g. ``(H, W, I, O)``.
      scale: optional gain :math:`g`, one value per output feature (the shape of the axes not reduced).
      reduction_axes: the axes each filter is standardized over; default every axis but the last.
      epsilon: a small positive number added to the variance (BiT's: 1e-10).

    Returns:
      The standardized kernel, of ``kernel``'s shape and dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> import normjax
      >>> w = jnp.array([[1.0, 10.0], [3.0, 30.0]])  # (in=2, out=2)
      >>> normjax.weight_standardize(w).tolist()
      [[-1.0, -1.0], [1.0, 1.0]]

    References:
      Qiao, Wang, Liu, Shen & Yuille, "Micro-Batch Training with Batch-Channel Normalization and Weight
      Standardization", arXiv:1903.10520, 2019. Kolesnikov et al., "Big Transfer (BiT): General Visual
      Representation Learning", ECCV 2020. Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image
      Recognition Without Normalization", ICML 2021.
    """
    spec = norm_spec("weight_standardize", kernel, scale, epsilon=epsilon, reduction_axes=reduction_axes)
    return standardize(kernel, scale, None, spec, epsilon=epsilon)[0]
