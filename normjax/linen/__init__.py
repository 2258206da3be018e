"""Flax linen normalization layers, drop-in for ``flax.linen``'s, computed by normjax's core.

Change ``from flax import linen as nn`` to use these for the norm layers and keep your variables, checkpoints
and training loop: same attributes, same ``params/{scale,bias}`` and ``batch_stats/{mean,var}``.
"""

from normjax._src.linen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]
