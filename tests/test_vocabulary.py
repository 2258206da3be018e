"""One meaning per name: the renamed keywords (old spelling warns, gives the same result) and named scopes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj

X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4)), jnp.float32)
GATE = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4)), jnp.float32)

# (function, old keyword, new keyword, the axes passed, extra arguments)
RENAMED = {
    "layer_norm": (nj.layer_norm, "axis", "reduction_axes", (1, 2), {}),
    "rms_norm": (nj.rms_norm, "axis", "reduction_axes", (1, 2), {}),
    "gated_rms_norm": (lambda x, **kw: nj.gated_rms_norm(x, GATE, **kw), "axis", "reduction_axes", 1, {}),
    "group_norm": (nj.group_norm, "axis", "feature_axes", 1, {"num_groups": 3}),
    "instance_norm": (nj.instance_norm, "axis", "feature_axes", 1, {}),
    "moments": (lambda x, **kw: nj.moments(x, **kw).var, "axes", "reduction_axes", (0, 1), {}),
}


@pytest.mark.parametrize("name", RENAMED)
def test_the_old_keyword_warns_and_gives_the_same_result(name):
    fn, old, new, axes, extra = RENAMED[name]
    want = fn(X, **{new: axes}, **extra)
    message = f"`{old}` is deprecated in `{name}`; use `{new}=`"
    with pytest.warns(DeprecationWarning, match=message):
        got = fn(X, **{old: axes}, **extra)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", RENAMED)
def test_the_old_and_new_keyword_together_is_a_type_error(name):
    fn, old, new, axes, extra = RENAMED[name]
    with pytest.raises(TypeError, match=f"got both `{old}` and `{new}`"):
        fn(X, **{old: axes, new: axes}, **extra)


def test_group_norm_reduction_axes_are_flax_groupnorms():
    """``reduction_axes`` without the spatial axis 1: each (example, position, group) is standardized alone."""
    y = nj.group_norm(X, num_groups=2, reduction_axes=(2,), epsilon=1e-12)
    groups = np.asarray(X, np.float64).reshape(2, 3, 2, 2)
    want = (groups - groups.mean(-1, keepdims=True)) / groups.std(-1, keepdims=True)
    np.testing.assert_allclose(y, want.reshape(X.shape), rtol=1e-5, atol=1e-5)


def test_group_norm_feature_axes_takes_a_tuple_of_one():
    np.testing.assert_array_equal(
        nj.group_norm(X, num_groups=3, feature_axes=(1,)), nj.group_norm(X, num_groups=3, feature_axes=1)
    )


SCOPED = {
    "layer_norm": lambda x: nj.layer_norm(x),
    "rms_norm": lambda x: nj.rms_norm(x),
    "gated_rms_norm": lambda x: nj.gated_rms_norm(x, GATE),
    "group_norm": lambda x: nj.group_norm(x, num_groups=2),
    "instance_norm": lambda x: nj.instance_norm(x),
    "moments": lambda x: nj.moments(x, 0).var,
    "batch_norm": lambda x: nj.batch_norm(x, nj.init_batch_norm_state(4), training=True)[0],
    "normalize": lambda x: nj.normalize(x, 0.0, 1.0),
    "weight_standardize": lambda x: nj.weight_standardize(x),
}


@pytest.mark.parametrize("name", SCOPED)
def test_each_function_is_named_in_the_compiled_program(name):
    """Profiler traces show each norm: its operations carry its name in the HLO metadata."""
    hlo = jax.jit(SCOPED[name]).lower(X).as_text(debug_info=True)
    assert f"/{name}/" in hlo or f'"{name}/' in hlo
