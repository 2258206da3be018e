"""normjax: every normalization for JAX, from one stable, synchronized, axis-parametrized core."""

from normjax._src.batch_norm import batch_norm
from normjax._src.example_norms import gated_rms_norm, group_norm, instance_norm, layer_norm, rms_norm
from normjax._src.moments import Moments, moments
from normjax._src.normalize import normalize
from normjax._src.state import BatchNormState, init_batch_norm_state
from normjax._src.utils.fold import fold_batch_norm, fold_batch_norm_variables
from normjax._src.utils.freeze import freeze_batch_norm, freeze_batch_norm_nnx, stop_gradient_where
from normjax._src.utils.optax_masks import (
    DEFAULT_NORM_MODULE_PATTERN,
    find_norm_modules,
    norm_params_mask,
    weight_decay_mask,
)
from normjax._src.utils.precise_stats import precise_batch_stats
from normjax._src.utils.replicas import average_replicas, sync_batch_stats
from normjax._src.utils.torch_interop import momentum_from_torch, momentum_to_torch, norm_variables_from_torch
from normjax._src.weight_standardization import weight_standardize

__version__ = "0.1.0"

__all__ = [
    "BatchNormState",
    "DEFAULT_NORM_MODULE_PATTERN",
    "Moments",
    "average_replicas",
    "batch_norm",
    "find_norm_modules",
    "fold_batch_norm",
    "fold_batch_norm_variables",
    "freeze_batch_norm",
    "freeze_batch_norm_nnx",
    "gated_rms_norm",
    "group_norm",
    "init_batch_norm_state",
    "instance_norm",
    "layer_norm",
    "moments",
    "momentum_from_torch",
    "momentum_to_torch",
    "norm_params_mask",
    "norm_variables_from_torch",
    "normalize",
    "precise_batch_stats",
    "rms_norm",
    "stop_gradient_where",
    "sync_batch_stats",
    "weight_decay_mask",
    "weight_standardize",
]
