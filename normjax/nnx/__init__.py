"""Flax nnx normalization layers, drop-in for ``flax.nnx``'s, computed by normjax's core.

Same constructors (``num_features``, ``rngs``, ``promote_dtype``), the same ``nnx.Param`` ``scale``/``bias``
and ``nnx.BatchStat`` ``mean``/``var`` attributes, and ``.train()`` / ``.eval()`` / ``nnx.view`` work as with
Flax's layers. Needs Flax: ``pip install 'normjax[flax]'``.
"""

from normjax._src.optional_dependencies import import_optional

import_optional("flax.nnx", needed_by="normjax.nnx")  # before the layers, for an error naming the extra

from normjax._src.nnx import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm  # noqa: E402

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]
