"""Flax linen normalization layers, drop-in for ``flax.linen``'s, computed by normjax's core.

Change ``from flax import linen as nn`` to use these for the norm layers and keep your variables, checkpoints
and training loop: same attributes, same ``params/{scale,bias}`` and ``batch_stats/{mean,var}``. Needs Flax:
``pip install 'normjax[flax]'``.
"""

from normjax._src.optional_dependencies import import_optional

import_optional("flax.linen", needed_by="normjax.linen")  # before the layers, for an error naming the extra

from normjax._src.linen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm  # noqa: E402

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]
