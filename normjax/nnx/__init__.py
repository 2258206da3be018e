"""Flax nnx normalization layers, drop-in for ``flax.nnx``'s, computed by normjax's core.

Same constructors (``num_features``, ``rngs``, ``promote_dtype``), the same ``nnx.Param`` ``scale``/``bias``
and ``nnx.BatchStat`` ``mean``/``var`` attributes, and ``.train()`` / ``.eval()`` / ``nnx.view`` work as with
Flax's layers.
"""

from normjax._src.nnx import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]
