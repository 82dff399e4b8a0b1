"""INT4 weight methods (engine.quant.int4_methods): RTN is the registry's numerics as integers, GPTQ is the
sequential algorithm and beats RTN on the layer's output, HQQ beats RTN on the weights, and the torch module
built from the integers computes them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.core.errors import EngineError
from engine.core.numerics import int4_round_trip
from engine.core.ort_numerics import ort_int4_weight
from engine.core.qmodules import Int4Linear
from engine.core.vocabulary import Runtime, WeightMethod
from engine.quant.int4_methods import _dequantize, _grid, _integers, gptq, hessian_from, hqq, rtn

ROWS, COLS = 64, 128
REGISTRY = {Runtime.TORCH: int4_round_trip, Runtime.ONNXRUNTIME: ort_int4_weight}


@pytest.fixture(scope="module")
def layer():
    """A random layer and calibration inputs with a few outlier channels (what makes GPTQ worth it)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(ROWS, COLS, generator=generator)
    inputs = torch.randn(512, COLS, generator=generator)
    inputs[:, :4] *= 20
    return weight, inputs


def _output_error(inputs, weight, values) -> float:
    return float((inputs @ (weight - values).T).norm())


def _sequential_gptq(weight, hessian, group_size, runtime, act_order=False, damp=0.01):
    """The textbook algorithm, one column at a time with the explicit inverse Hessian, the eliminated column
    removed after each step (the paper's equations 2-3): no Cholesky, no lazy blocks."""
    w = weight.double().clone()
    h = hessian.double().clone()
    static = {g: _grid(w[:, g:g + group_size].float(), runtime) for g in range(0, COLS, group_size)}
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(COLS)
    h += damp * torch.diagonal(h).mean() * torch.eye(COLS, dtype=h.dtype)
    inverse = torch.linalg.inv(h)
    q = torch.zeros(ROWS, COLS)
    for step, j in enumerate(order.tolist()):
        if act_order:
            scale, offset = static[j - j % group_size]
        elif j % group_size == 0:
            scale, offset = _grid(w[:, j:j + group_size].float(), runtime)
        q[:, j] = _integers(w[:, j].float(), scale, offset, runtime)
        error = (w[:, j] - _dequantize(q[:, j], scale, offset, runtime).double()) / inverse[j, j]
        rest = order[step + 1:]
        w[:, rest] -= error[:, None] * inverse[j, rest][None, :]
        inverse -= inverse[:, j:j + 1] @ inverse[j:j + 1, :] / inverse[j, j]
    return q.to(torch.uint8)


@pytest.mark.parametrize("runtime", list(Runtime))
@pytest.mark.parametrize("cols", [COLS, 100])  # 100: a partial last group
def test_rtn_values_are_the_registrys_numerics_bitwise(layer, runtime, cols):
    weight = layer[0][:, :cols]
    chosen = rtn(weight, 32, runtime)
    assert chosen.q.dtype == torch.uint8 and int(chosen.q.max()) <= 15 and chosen.q.shape == weight.shape
    assert chosen.scale.shape == chosen.offset.shape == (ROWS, 4)
    assert torch.equal(chosen.values(), REGISTRY[runtime](weight, 32))
    if runtime == Runtime.ONNXRUNTIME:  # MatMulNBits' zero points are integers in 0..15
        assert torch.equal(chosen.offset, chosen.offset.round())
        assert 0 <= chosen.offset.min() <= chosen.offset.max() <= 15


@pytest.mark.parametrize("runtime", list(Runtime))
@pytest.mark.parametrize("group_size", [32, COLS])  # COLS: one group a row (per channel)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_layers_output(layer, runtime, group_size, act_order):
    weight, inputs = layer
    chosen = gptq(weight, hessian_from(inputs), group_size, runtime, act_order=act_order)
    baseline = rtn(weight, group_size, runtime)
    # measured: 10.6-11.6% less output error than RTN in these eight cases
    assert _output_error(inputs, weight, chosen.values()) < 0.95 * _output_error(inputs, weight, baseline.values())
    assert chosen.q.dtype == torch.uint8 and int(chosen.q.max()) <= 15
    if act_order:  # static groups: every grid is RTN's, from the original weights
        assert torch.equal(chosen.scale, baseline.scale) and torch.equal(chosen.offset, baseline.offset)


@pytest.mark.parametrize("runtime", list(Runtime))
@pytest.mark.parametrize("group_size,act_order", [(32, False), (48, False), (COLS, False), (32, True)])
def test_gptq_is_the_sequential_algorithm(layer, runtime, group_size, act_order):
    """Lazy blocks and the Cholesky factor change only the order of the float operations: the integers are
    the textbook algorithm's, including groups that start inside a lazy block (48 does, across blocks too)."""
    weight, inputs = layer
    hessian = hessian_from(inputs)
    chosen = gptq(weight, hessian, group_size, runtime, act_order=act_order)
    assert torch.equal(chosen.q, _sequential_gptq(weight, hessian, group_size, runtime, act_order))


def test_onnxruntimes_vendored_gptq_is_round_to_nearest(layer):
    """Why we do not reuse it: onnxruntime 1.32's neural_compressor `gptq` takes the upper Cholesky factor
    U = chol(H^-1)^T but propagates the error along its columns below the diagonal (U[i:, i]), which are 0,
    so no error is ever compensated: its output is round to nearest on its grid (which is MLAS's grid here,
    to float rounding). Ours compensates on the same grid."""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq as ort_gptq

    weight, inputs = layer
    hessian = hessian_from(inputs)
    # ORT's convention is MatMul's: W is [K, N] = weight^T, groups along K
    theirs = torch.from_numpy(ort_gptq(weight.T.double().numpy().copy(), hessian.numpy().copy(), group_size=32)).T
    baseline = rtn(weight, 32, Runtime.ONNXRUNTIME)
    assert torch.allclose(theirs.float(), baseline.values(), rtol=0, atol=1e-5)
    ours = gptq(weight, hessian, 32, Runtime.ONNXRUNTIME)
    assert _output_error(inputs, weight, ours.values()) < 0.95 * _output_error(inputs, weight, theirs.float())


def test_gptq_dead_inputs_quantize_to_zero_on_onnxruntimes_grid(layer):
    weight, inputs = layer
    inputs = inputs.clone()
    inputs[:, 5] = 0  # an input channel that is always 0: H[5, 5] = 0
    chosen = gptq(weight, hessian_from(inputs), 32, Runtime.ONNXRUNTIME)
    assert torch.isfinite(chosen.values()).all()
    assert torch.equal(chosen.values()[:, 5], torch.zeros(ROWS))  # the grid holds 0 exactly: q = zero point


def test_gptq_refuses_a_wrong_hessian_in_one_line(layer):
    weight, inputs = layer
    with pytest.raises(EngineError, match="must be \\[128, 128\\]"):
        gptq(weight, hessian_from(inputs[:, :64]), 32, Runtime.TORCH)
    singular = hessian_from(inputs[:8])  # rank 8 of 128
    with pytest.raises(EngineError, match="not positive definite with damp=0"):
        gptq(weight, singular, 32, Runtime.TORCH, damp=0.0)


@pytest.mark.parametrize("group_size", [32, 48])  # 48: a partial last group, padded with zeros as HQQ pads
def test_hqq_beats_rtn_on_the_weights(layer, group_size):
    """HQQ minimises an lp (p = 0.7) weight error, so we compare both the mean squared and the mean absolute
    weight error; torch's RTN (a float offset at each group's minimum) is the harder baseline."""
    weight = layer[0]
    values = {runtime: hqq(weight, group_size, runtime).values() for runtime in Runtime}
    for runtime in Runtime:
        baseline = rtn(weight, group_size, runtime).values()
        assert ((weight - values[runtime]) ** 2).mean() < ((weight - baseline) ** 2).mean()
        assert (weight - values[runtime]).abs().mean() < (weight - baseline).abs().mean()
    # the same integers on both grids; torch's offset -zero * scale rounds once: a few ulps apart
    assert torch.equal(hqq(weight, group_size, Runtime.TORCH).q, hqq(weight, group_size, Runtime.ONNXRUNTIME).q)
    assert torch.allclose(values[Runtime.TORCH], values[Runtime.ONNXRUNTIME], rtol=0, atol=1e-6)


def test_hqq_zero_points_are_fractional(layer):
    chosen = hqq(layer[0], 32, Runtime.ONNXRUNTIME)
    assert not torch.equal(chosen.offset, chosen.offset.round())


@pytest.mark.parametrize("method", [WeightMethod.RTN, WeightMethod.GPTQ, WeightMethod.HQQ])
def test_the_torch_module_computes_the_methods_integers(layer, method):
    weight, inputs = layer
    chosen = {WeightMethod.RTN: lambda: rtn(weight, 32, Runtime.TORCH),
              WeightMethod.GPTQ: lambda: gptq(weight, hessian_from(inputs), 32, Runtime.TORCH),
              WeightMethod.HQQ: lambda: hqq(weight, 32, Runtime.TORCH)}[method]()
    bias = torch.randn(ROWS)
    module = Int4Linear.from_integers(chosen, bias)
    x = inputs[:16]
    assert torch.equal(module(x), F.linear(x, chosen.values(), bias))
    assert torch.equal(module.dequantized(), chosen.values())
    if method == WeightMethod.RTN:  # the module built from RTN's integers is the one built from the float weight
        assert torch.equal(module(x), Int4Linear(weight, bias, 32)(x))


def test_the_torch_module_refuses_onnxruntimes_grid(layer):
    with pytest.raises(ValueError, match="torch's int4 grid"):
        Int4Linear.from_integers(rtn(layer[0], 32, Runtime.ONNXRUNTIME), None)
