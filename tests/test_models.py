"""Unit tests of the models: the named-coefficient polynomial and the MLP."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dtrain import config as C
from dtrain.data import DataSet, Split
from dtrain.errors import ConfigError
from dtrain.models import MLP, Polynomial, build_model

# ---------------------------------------------------------------------------------------------
# Polynomial


def test_polynomial_parameter_names() -> None:
    model = Polynomial(2, 2)
    assert [name for name, _ in model.named_parameters()] == ["c0", "c1", "c2", "c3", "c4"]
    assert all(p.shape == () for p in model.parameters())
    assert Polynomial(3, 4).coefficients().shape == (3 * 4 + 1,)


def test_polynomial_terms() -> None:
    assert Polynomial(2, 2).terms() == ["x1^2", "x1", "x2^2", "x2", "1"]
    assert Polynomial(1, 3).terms() == ["x1^3", "x1^2", "x1", "1"]
    assert Polynomial(3, 1).terms() == ["x1", "x2", "x3", "1"]


def test_polynomial_forward_two_inputs_degree_two() -> None:
    c = [1.5, -0.5, 0.25, -1.0, 2.0]
    model = Polynomial(2, 2, init=c).double()
    gen = torch.Generator().manual_seed(0)
    x = 4 * torch.rand(17, 2, generator=gen, dtype=torch.float64) - 2
    x1, x2 = x[:, 0], x[:, 1]
    expected = (c[0] * x1 * x1 + c[1] * x1 + c[2] * x2 * x2 + c[3] * x2 + c[4]).unsqueeze(1)
    out = model(x)
    assert out.shape == (17, 1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_polynomial_forward_general_term_order() -> None:
    """Three inputs of degree 3: coefficient k multiplies the k-th term of terms()."""
    num_inputs, degree = 3, 3
    c = [0.5 * (i + 1) * (-1) ** i for i in range(num_inputs * degree + 1)]
    model = Polynomial(num_inputs, degree, init=c).double()
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, -3.0, 2.0]], dtype=torch.float64)
    expected = []
    for row in x.tolist():
        total, k = 0.0, 0
        for i in range(num_inputs):
            for p in range(degree, 0, -1):
                total += c[k] * row[i] ** p
                k += 1
        expected.append([total + c[-1]])
    torch.testing.assert_close(model(x), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_polynomial_gradient_of_each_coefficient_is_its_term() -> None:
    model = Polynomial(2, 2, init=[0.0] * 5).double()
    x = torch.tensor([[3.0, -2.0]], dtype=torch.float64)
    model(x).sum().backward()
    grads = [float(getattr(model, f"c{i}").grad) for i in range(5)]
    assert grads == [9.0, 3.0, 4.0, -2.0, 1.0]


def test_polynomial_explicit_init_used_verbatim() -> None:
    init = [0.5, -1.25, 3.0, 0.0, -7.5]  # exactly representable in float32
    model = Polynomial(2, 2, init=init)
    assert [float(getattr(model, f"c{i}").detach()) for i in range(5)] == init
    assert all(p.dtype == torch.get_default_dtype() for p in model.parameters())
    assert model.coefficients().tolist() == init


@pytest.mark.parametrize("length", [4, 6, 0])
def test_polynomial_wrong_init_length(length: int) -> None:
    with pytest.raises(ConfigError, match=rf"model\.init has {length} values") as info:
        Polynomial(2, 2, init=[1.0] * length)
    assert "need 5" in str(info.value)


def test_polynomial_random_init_within_scale() -> None:
    torch.manual_seed(0)
    model = Polynomial(4, 3, init_scale=0.3)
    values = model.coefficients().detach()
    assert values.abs().max() <= 0.3
    assert len(set(values.tolist())) == values.numel()  # drawn, not constant
    assert Polynomial(2, 2, init_scale=0.0).coefficients().abs().max() == 0


def test_polynomial_rejects_classification() -> None:
    with pytest.raises(ConfigError, match="mlp"):
        Polynomial(2, 2, num_outputs=3)


# ---------------------------------------------------------------------------------------------
# MLP


def test_mlp_regression_shape() -> None:
    model = MLP(3, [8, 5], 1)
    assert model(torch.randn(7, 3)).shape == (7, 1)
    assert [b.linear.out_features for b in model.blocks] == [8, 5]
    assert (model.head.in_features, model.head.out_features) == (5, 1)


def test_mlp_classification_shape() -> None:
    model = MLP(2, [16], 4, activation="tanh", layer_norm=True)
    assert model(torch.randn(9, 2)).shape == (9, 4)


def test_mlp_without_hidden_layers_is_linear() -> None:
    model = MLP(3, [], 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ model.head.weight.T + model.head.bias)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "silu"])
def test_mlp_activation(activation: str) -> None:
    model = MLP(2, [4], 1, activation=activation).double()
    expected = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}[activation]
    assert isinstance(model.blocks[0].act, expected)
    x = torch.randn(3, 2, dtype=torch.float64)
    block = model.blocks[0]
    hidden = expected()(x @ block.linear.weight.T + block.linear.bias)
    torch.testing.assert_close(model(x), hidden @ model.head.weight.T + model.head.bias)


def count_block_calls(model: MLP) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    for block in model.blocks:
        block.register_forward_pre_hook(hook)  # a pre-hook: recomputation may stop early
    return calls


@pytest.mark.parametrize(
    "layer_norm, dropout",
    [(False, 0.0), (True, 0.0), (True, 0.3)],
    ids=["plain", "layer_norm", "layer_norm+dropout"],
)
def test_activation_checkpointing_same_output_and_grads(layer_norm: bool, dropout: float) -> None:
    torch.manual_seed(0)
    plain = MLP(3, [16, 16, 8], 2, activation="tanh", layer_norm=layer_norm, dropout=dropout).double()
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing = True
    calls = count_block_calls(ckpt)
    x = torch.randn(11, 3, dtype=torch.float64)
    target = torch.randn(11, 2, dtype=torch.float64)

    outputs, grads = [], []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(123)  # the same dropout masks for both
        out = model(x)
        ((out - target) ** 2).mean().backward()
        outputs.append(out.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-12, atol=1e-12, msg=name)
    # Checkpointing really happened: each block ran again in backward to recompute its activations.
    assert calls[0] == 2 * len(ckpt.blocks)


def test_activation_checkpointing_off_in_eval_and_no_grad() -> None:
    model = MLP(2, [4, 4], 1, activation_checkpointing=True)
    calls = count_block_calls(model)
    x = torch.randn(3, 2)
    model.eval()
    model(x).sum().backward()
    assert calls[0] == len(model.blocks)
    model.train()
    with torch.no_grad():
        model(x)
    assert calls[0] == 2 * len(model.blocks)


def test_dropout_off_in_eval() -> None:
    torch.manual_seed(0)
    with_dropout = MLP(4, [32, 32], 1, dropout=0.5).double()
    without = MLP(4, [32, 32], 1, dropout=0.0).double()
    without.load_state_dict(with_dropout.state_dict())
    x = torch.randn(20, 4, dtype=torch.float64)

    with_dropout.eval()
    without.eval()
    torch.testing.assert_close(with_dropout(x), without(x), rtol=0, atol=0)
    torch.testing.assert_close(with_dropout(x), with_dropout(x), rtol=0, atol=0)

    with_dropout.train()
    torch.manual_seed(1)
    first = with_dropout(x)
    second = with_dropout(x)
    assert not torch.equal(first, second), "dropout is not active in train mode"
    assert not torch.equal(first, without(x))


def test_no_dropout_module_when_rate_is_zero() -> None:
    model = MLP(2, [4], 1, dropout=0.0)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    model = MLP(2, [4], 1, dropout=0.2)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.2 for m in model.modules())


# ---------------------------------------------------------------------------------------------
# build_model


def dataset(num_inputs: int, task: str, num_classes: int = 0) -> DataSet:
    x = torch.zeros(4, num_inputs, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long) if task == "classification" else torch.zeros(4, 1, dtype=torch.float64)
    return DataSet(Split(x, y), {"": Split(x, y)}, task=task, num_classes=num_classes)


def test_build_model_polynomial_sized_for_data() -> None:
    cfg = C.PolynomialConfig(degree=3, init=[float(i) for i in range(7)])
    model = build_model(cfg, dataset(2, "regression"))
    assert isinstance(model, Polynomial)
    assert model.terms() == ["x1^3", "x1^2", "x1", "x2^3", "x2^2", "x2", "1"]
    assert model.coefficients().tolist() == [float(i) for i in range(7)]


def test_build_model_polynomial_rejects_classification_data() -> None:
    with pytest.raises(ConfigError):
        build_model(C.PolynomialConfig(), dataset(2, "classification", num_classes=3))


def test_build_model_mlp_sized_for_data() -> None:
    cfg = C.MLPConfig(hidden=[6, 7], activation="gelu", layer_norm=True, dropout=0.1, activation_checkpointing=True)
    model = build_model(cfg, dataset(5, "classification", num_classes=3))
    assert isinstance(model, MLP)
    assert model.blocks[0].linear.in_features == 5
    assert model.head.out_features == 3
    assert model.activation_checkpointing
    assert isinstance(model.blocks[1].norm, nn.LayerNorm)
    assert isinstance(model.blocks[0].act, nn.GELU)
    assert model(torch.zeros(2, 5)).shape == (2, 3)
