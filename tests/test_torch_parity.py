"""Parity with torch.nn.functional: outputs, gradients and BatchNorm running statistics.

PyTorch is channels-first, so normjax runs with ``axis=1`` for batch/group/instance norm. Both libraries compute in
float32 here; PyTorch's momentum m is normjax's ``momentum=1 - m`` (torch 0.1 <-> normjax 0.9).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normjax

EPSILON = 1e-5
# Both sides run in float32 with different summation orders; outputs, gradients and running statistics of order 1
# agree to float32 accuracy after reductions over ~1e2 elements (eps 1.2e-7, about two digits lost): 1e-5.
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _random(shape, seed, mean=0.0, std=1.0):
    return np.random.default_rng(seed).normal(mean, std, shape).astype(np.float32)


def _torch_output_and_grads(fn, x, *params, upstream):
    """torch: fn's output and the gradients of sum(output * upstream) w.r.t. x and the parameters."""
    leaves = [torch.tensor(a, requires_grad=True) for a in (x, *params)]
    y = fn(*leaves)
    (y * torch.tensor(upstream)).sum().backward()
    return y.detach().numpy(), [leaf.grad.numpy() for leaf in leaves]


def _jax_output_and_grads(fn, x, *params, upstream):
    """normjax: fn's output and the gradients of sum(output * upstream) w.r.t. x and the parameters."""

    def loss(*args):
        y = fn(*args)
        return jnp.sum(y * upstream), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, range(1 + len(params)), has_aux=True))(x, *params)
    return np.asarray(y), [np.asarray(g) for g in grads]


def _assert_parity(torch_fn, jax_fn, x, *params):
    upstream = _random(x.shape, seed=99)
    want_y, want_grads = _torch_output_and_grads(torch_fn, x, *params, upstream=upstream)
    got_y, got_grads = _jax_output_and_grads(jax_fn, x, *params, upstream=upstream)
    np.testing.assert_allclose(got_y, want_y, **TOL)
    for name, got, want in zip(["x", "weight", "bias"], got_grads, want_grads, strict=False):
        np.testing.assert_allclose(got, want, **TOL, err_msg=f"gradient w.r.t. {name}")


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 6), (3, 3, 4, 4)])
def test_batch_norm_training(shape):
    channels = shape[1]
    x = _random(shape, 0, mean=2.0, std=3.0)
    weight, bias = _random((channels,), 1, mean=1.0), _random((channels,), 2)
    running_mean, running_var = _random((channels,), 3), np.abs(_random((channels,), 4, mean=1.0)) + 0.1
    torch_mean, torch_var = torch.tensor(running_mean), torch.tensor(running_var)
    state = normjax.BatchNormState(jnp.asarray(running_mean), jnp.asarray(running_var))

    def torch_fn(x, weight, bias):  # updates torch_mean / torch_var in place
        return F.batch_norm(x, torch_mean, torch_var, weight, bias, training=True, momentum=0.1, eps=EPSILON)

    def jax_fn(x, scale, bias):
        y, _ = normjax.batch_norm(x, state, scale, bias, training=True, momentum=0.9, epsilon=EPSILON, axis=1)
        return y

    _assert_parity(torch_fn, jax_fn, x, weight, bias)
    # Running statistics: torch stores the unbiased batch variance; so does unbiased_running_var=True.
    _, new_state = normjax.batch_norm(
        jnp.asarray(x), state, training=True, momentum=0.9, epsilon=EPSILON, axis=1, unbiased_running_var=True
    )
    np.testing.assert_allclose(new_state.mean, torch_mean.numpy(), **TOL)
    np.testing.assert_allclose(new_state.var, torch_var.numpy(), **TOL)
    # A second step from the updated statistics still agrees (the EMA compounds the same way).
    x2 = _random(shape, 5, mean=-1.0, std=0.5)
    F.batch_norm(torch.tensor(x2), torch_mean, torch_var, training=True, momentum=0.1, eps=EPSILON)
    _, new_state = normjax.batch_norm(
        jnp.asarray(x2), new_state, training=True, momentum=0.9, epsilon=EPSILON, axis=1, unbiased_running_var=True
    )
    np.testing.assert_allclose(new_state.mean, torch_mean.numpy(), **TOL)
    np.testing.assert_allclose(new_state.var, torch_var.numpy(), **TOL)


def test_batch_norm_eval():
    x = _random((4, 3, 5), 6, mean=1.0)
    weight, bias = _random((3,), 7, mean=1.0), _random((3,), 8)
    running_mean, running_var = _random((3,), 9), np.array([0.5, 1.0, 2.5], np.float32)
    state = normjax.BatchNormState(jnp.asarray(running_mean), jnp.asarray(running_var))

    def torch_fn(x, weight, bias):
        return F.batch_norm(x, torch.tensor(running_mean), torch.tensor(running_var), weight, bias, eps=EPSILON)

    def jax_fn(x, scale, bias):
        return normjax.batch_norm(x, state, scale, bias, training=False, epsilon=EPSILON, axis=1)[0]

    _assert_parity(torch_fn, jax_fn, x, weight, bias)


@pytest.mark.parametrize(("shape", "normalized_axes"), [((4, 5, 6), (2,)), ((2, 3, 4, 4), (1, 2, 3))])
def test_layer_norm(shape, normalized_axes):
    normalized_shape = tuple(shape[a] for a in normalized_axes)
    x = _random(shape, 10, mean=1.0, std=2.0)
    weight, bias = _random(normalized_shape, 11, mean=1.0), _random(normalized_shape, 12)
    _assert_parity(
        lambda x, w, b: F.layer_norm(x, normalized_shape, w, b, eps=EPSILON),
        lambda x, w, b: normjax.layer_norm(x, w, b, reduction_axes=normalized_axes, epsilon=EPSILON),
        x, weight, bias,
    )  # fmt: skip


@pytest.mark.parametrize(("shape", "normalized_axes"), [((4, 5, 6), (2,)), ((2, 3, 4, 4), (2, 3))])
def test_rms_norm(shape, normalized_axes):
    normalized_shape = tuple(shape[a] for a in normalized_axes)
    x = _random(shape, 13, mean=0.5, std=2.0)
    weight = _random(normalized_shape, 14, mean=1.0)
    _assert_parity(
        lambda x, w: F.rms_norm(x, normalized_shape, w, eps=EPSILON),
        lambda x, w: normjax.rms_norm(x, w, reduction_axes=normalized_axes, epsilon=EPSILON),
        x, weight,
    )  # fmt: skip


@pytest.mark.parametrize(("shape", "num_groups"), [((3, 6, 5), 2), ((2, 6, 4, 4), 3), ((2, 4, 2, 3, 3), 1)])
def test_group_norm(shape, num_groups):
    channels = shape[1]
    x = _random(shape, 15, mean=1.0, std=2.0)
    weight, bias = _random((channels,), 16, mean=1.0), _random((channels,), 17)
    _assert_parity(
        lambda x, w, b: F.group_norm(x, num_groups, w, b, eps=EPSILON),
        lambda x, w, b: normjax.group_norm(x, w, b, num_groups=num_groups, feature_axes=1, epsilon=EPSILON),
        x, weight, bias,
    )  # fmt: skip


@pytest.mark.parametrize("shape", [(3, 4, 6), (2, 3, 4, 4)])
def test_instance_norm(shape):
    channels = shape[1]
    x = _random(shape, 18, mean=1.0, std=2.0)
    weight, bias = _random((channels,), 19, mean=1.0), _random((channels,), 20)
    _assert_parity(
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=EPSILON),
        lambda x, w, b: normjax.instance_norm(x, w, b, feature_axes=1, epsilon=EPSILON),
        x, weight, bias,
    )  # fmt: skip
