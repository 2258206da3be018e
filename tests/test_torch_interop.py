"""Loading PyTorch norm layers' state_dict into Flax/normjax variables, checked against torch's outputs."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import normjax
import normjax.linen

torch.manual_seed(0)


def _randomized(module):
    """A torch norm layer with random affine parameters and running statistics (as after training)."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name == "running_var":
                tensor.uniform_(0.5, 2.0)
            elif name != "num_batches_tracked":
                tensor.normal_()
    return module


def _nhwc(t):
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("layer", [nn.BatchNorm, normjax.linen.BatchNorm], ids=["flax", "normjax"])
def test_batch_norm_2d_eval_and_train_match_torch(layer):
    torch_bn = _randomized(torch.nn.BatchNorm2d(3))  # momentum 0.1, eps 1e-5
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    variables = normjax.norm_variables_from_torch(torch_bn.state_dict())
    flax_bn = layer(momentum=normjax.momentum_from_torch(torch_bn.momentum), epsilon=torch_bn.eps)

    torch_bn.eval()
    y_eval = flax_bn.apply(variables, _nhwc(x), use_running_average=True)
    np.testing.assert_allclose(_nchw(y_eval), torch_bn(x).detach().numpy(), rtol=1e-5, atol=1e-5)

    torch_bn.train()
    y_train, updates = flax_bn.apply(variables, _nhwc(x), use_running_average=False, mutable=["batch_stats"])
    expected = torch_bn(x).detach().numpy()
    np.testing.assert_allclose(_nchw(y_train), expected, rtol=1e-5, atol=1e-5)
    # The running mean follows the same EMA; the running variance differs by torch's n/(n-1) (see below).
    np.testing.assert_allclose(updates["batch_stats"]["mean"], torch_bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)


def test_batch_norm_1d_training_with_torch_update_rule():
    """With momentum 1 - m and unbiased_running_var, normjax's training step reproduces torch's exactly."""
    torch_bn = _randomized(torch.nn.BatchNorm1d(4, momentum=0.3))
    variables = normjax.norm_variables_from_torch(torch_bn.state_dict(), dtype=jnp.float32)
    state = normjax.BatchNormState(**variables["batch_stats"])
    scale, bias = variables["params"]["scale"], variables["params"]["bias"]
    for step in range(3):
        x = torch.randn(6, 4) + step
        expected = torch_bn(x).detach().numpy()
        y, state = normjax.batch_norm(
            jnp.asarray(x.numpy()),
            state,
            scale,
            bias,
            training=True,
            momentum=normjax.momentum_from_torch(0.3),
            epsilon=torch_bn.eps,
            unbiased_running_var=True,
        )
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.mean, torch_bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.var, torch_bn.running_var.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", [nn.LayerNorm, normjax.linen.LayerNorm], ids=["flax", "normjax"])
def test_layer_norm_matches_torch(layer):
    torch_ln = _randomized(torch.nn.LayerNorm(6))
    x = torch.randn(3, 4, 6) * 3 + 2
    variables = normjax.norm_variables_from_torch(
        {"encoder.ln." + k: v for k, v in torch_ln.state_dict().items()}, "encoder.ln"
    )
    y = layer(epsilon=torch_ln.eps).apply(variables, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(y, torch_ln(x).detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.GroupNorm, normjax.linen.GroupNorm], ids=["flax", "normjax"])
def test_group_norm_nchw_to_nhwc_matches_torch(layer):
    torch_gn = _randomized(torch.nn.GroupNorm(2, 6))
    x = torch.randn(2, 6, 4, 3) - 1
    variables = normjax.norm_variables_from_torch(torch_gn.state_dict())
    assert "batch_stats" not in variables
    y = layer(num_groups=2, epsilon=torch_gn.eps).apply(variables, _nhwc(x))
    np.testing.assert_allclose(_nchw(y), torch_gn(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_momentum_conversion_round_trips():
    assert normjax.momentum_from_torch(0.1) == 0.9
    assert normjax.momentum_to_torch(normjax.momentum_from_torch(0.3)) == 0.3
    with pytest.raises(ValueError, match="momentum=None"):
        normjax.momentum_from_torch(None)


def test_errors_are_clear():
    state = torch.nn.BatchNorm1d(2).state_dict()
    with pytest.raises(ValueError, match="Pass the layer's own name as `prefix`"):
        normjax.norm_variables_from_torch({"model." + k: v for k, v in state.items()}, "mod")
    with pytest.raises(ValueError, match="only one of running_mean and running_var"):
        normjax.norm_variables_from_torch({"running_mean": state["running_mean"]})
