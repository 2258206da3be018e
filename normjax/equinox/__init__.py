"""Equinox normalization layers, drop-in for ``equinox.nn``'s where Equinox is right, computed by normjax's core.

``eqx.Module``\\ s written for one example (map them over the batch with ``jax.vmap``), channels first for the
conv norms, ``BatchNorm`` running statistics in an ``eqx.nn.State``, ``eqx.nn.inference_mode`` honoured. Needs
Equinox: ``pip install 'normjax[equinox]'``.
"""

from normjax._src.equinox import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]
