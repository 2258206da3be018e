"""normjax: every normalization for JAX, from one stable, synchronized, axis-parametrized core."""

from normjax._src.batch_norm import batch_norm
from normjax._src.moments import Moments, moments
from normjax._src.normalize import normalize
from normjax._src.siblings import group_norm, instance_norm, layer_norm, rms_norm
from normjax._src.state import BatchNormState, init_batch_norm_state

__version__ = "0.1.0"

__all__ = [
    "BatchNormState",
    "Moments",
    "batch_norm",
    "group_norm",
    "init_batch_norm_state",
    "instance_norm",
    "layer_norm",
    "moments",
    "normalize",
    "rms_norm",
]
