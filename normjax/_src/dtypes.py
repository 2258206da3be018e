"""Dtypes: the statistics dtype, the output dtype, promotion with 8-bit floats, and the dtype arguments' checks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normjax._src.typing import ArrayLike, DTypeLike


def is_narrow_float(dtype: DTypeLike) -> bool:
    """Whether ``dtype`` is a real float narrower than 16 bits (``float8_e4m3fn``, ``float8_e5m2``, ...).

    JAX gives such types no implicit promotion path (``jnp.promote_types(float8_e4m3fn, float32)`` raises), so
    the norms widen them explicitly: their statistics and arithmetic run in float32.
    """
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 16


def promote_types(*dtypes: DTypeLike) -> np.dtype:
    """``jnp.promote_types`` of ``dtypes``, with a float narrower than 16 bits promoted as float32 when it meets
    another dtype (JAX refuses to promote those implicitly); alone, or only with itself, it stays as it is."""
    dtypes = tuple(jnp.dtype(d) for d in dtypes)
    if len(set(dtypes)) == 1:
        return dtypes[0]
    result = jnp.dtype(jnp.float32) if any(is_narrow_float(d) for d in dtypes) else dtypes[0]
    for d in dtypes:
        result = jnp.promote_types(result, jnp.float32 if is_narrow_float(d) else d)
    return result


def stats_dtype(dtype: DTypeLike) -> np.dtype:
    """The dtype statistics are computed in: float32 or wider (complex64 or wider for complex inputs).

    Canonicalized, so a NumPy float64 input with x64 disabled computes in float32 without a truncation warning;
    8-bit (and narrower) floats compute in float32.
    """
    return jax.dtypes.canonicalize_dtype(promote_types(dtype, jnp.float32))


def output_dtype(x: jax.Array, dtype: DTypeLike | None = None) -> np.dtype:
    """The dtype of a norm's output: ``dtype`` if given, else ``x``'s, as JAX represents it (x64 or not).

    An input narrower than 16 bits (``float8_e4m3fn``, ``float8_e5m2``) outputs float32 unless ``dtype`` says
    otherwise: an 8-bit output keeps 2 to 4 significant bits of the normalized values, so it is a choice to make
    explicitly (e.g. to feed a float8 matmul), not a default.
    """
    if dtype is None and is_narrow_float(x.dtype):
        return jnp.dtype(jnp.float32)
    return jax.dtypes.canonicalize_dtype(x.dtype if dtype is None else dtype)


def check_float_dtype(dtype: Any, name: str = "dtype", what: str = "the output dtype") -> None:
    """Raises unless `dtype` (if not None) is a floating-point or complex dtype."""
    if dtype is None:
        return
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(
            f"`{name}` must be a dtype ({what}), got {dtype!r}. Pass e.g. `{name}=jnp.float32`, or None."
        ) from None
    if not jnp.issubdtype(resolved, jnp.inexact):
        raise TypeError(
            f"`{name}` must be a floating-point or complex dtype ({what}), got {resolved}. Pass e.g. "
            f"`{name}=jnp.float32` (or `jnp.bfloat16`), or None to keep the input's dtype."
        )


def check_real_output(out_dtype: DTypeLike, **params: ArrayLike | None) -> None:
    """Raises when a complex parameter would be cast into a real output, dropping its imaginary part.

    Complex parameters are supported with a complex output (a complex `x`, or a complex ``dtype``), as complex
    inputs are; with a real output the result is complex only on paper, so it is refused rather than truncated.
    """
    if jnp.issubdtype(out_dtype, jnp.complexfloating):
        return
    for name, value in params.items():
        if value is not None and jnp.iscomplexobj(value):
            raise TypeError(
                f"`{name}` is complex (dtype {jnp.result_type(value)}) but the output is real "
                f"({jnp.dtype(out_dtype)}): its imaginary part would be dropped. For a complex result make `x` "
                f"complex, e.g. `x.astype(jnp.complex64)`; otherwise pass a real `{name}` (e.g. `jnp.real({name})`)."
            )


def check_normalized_dtype(normalized_dtype, x_dtype) -> None:
    """Raises unless ``normalized_dtype`` is None or a float dtype (complex for a complex ``x``)."""
    if normalized_dtype is None:
        return
    fix = (
        "Pass the dtype to round the normalized values to before the affine, e.g. `normalized_dtype=x.dtype` "
        "(HF Llama's order), or None to compute the affine in float32 and round once."
    )
    try:
        dtype = jnp.dtype(normalized_dtype)
    except TypeError:
        raise TypeError(f"`normalized_dtype` must be a dtype, got {normalized_dtype!r}. {fix}") from None
    wanted = jnp.complexfloating if jnp.issubdtype(x_dtype, jnp.complexfloating) else jnp.floating
    if not jnp.issubdtype(dtype, wanted):
        kind = "complex" if wanted is jnp.complexfloating else "real floating-point"
        raise TypeError(
            f"`normalized_dtype` must be a {kind} dtype for an input of dtype {x_dtype}, got {dtype}. {fix}"
        )


def promoted_dtype(*arrays: ArrayLike | None, dtype: DTypeLike | None = None) -> np.dtype:
    """Flax's output dtype for a normalization layer: ``dtype`` if given, else the promoted dtype of ``arrays``.

    This is ``flax.linen.dtypes.canonicalize_dtype``: ``None`` entries are ignored and a non-inexact result is
    promoted to floating point, so a bfloat16 input with float32 parameters gives a float32 output. An input
    narrower than 16 bits (``float8_e4m3fn``, ``float8_e5m2``), which Flax cannot promote, counts as float32:
    its output is float32 unless ``dtype`` says otherwise. :func:`layer_output_dtype` checks ``dtype``.
    """
    if dtype is not None:
        return jnp.dtype(dtype)
    given = [jnp.result_type(a) for a in arrays if a is not None]
    promoted = jnp.result_type(*(jnp.float32 if is_narrow_float(d) else d for d in given))
    return promoted if jnp.issubdtype(promoted, jnp.inexact) else jnp.promote_types(jnp.float32, promoted)


def layer_output_dtype(*arrays: ArrayLike | None, dtype: DTypeLike | None = None) -> np.dtype:
    """:func:`promoted_dtype`, with ``dtype`` (the layer's) checked: a floating-point or complex dtype, or None."""
    check_float_dtype(dtype, "dtype", "the layer's output dtype")
    return promoted_dtype(*arrays, dtype=dtype)
