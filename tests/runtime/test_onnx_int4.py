"""Writing a weight method's int4 integers into MatMulNBits (engine.runtime.onnx_int4): the node then computes
exactly the method's weights, and RTN's integers are byte for byte what ONNX Runtime's quantizer writes."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engine.core.errors import EngineError
from engine.core.vocabulary import Runtime, WeightMethod
from engine.quant.int4_methods import gptq, hessian_from, hqq, rtn
from engine.runtime.onnx_graph import int4_weight_only
from engine.runtime.onnx_int4 import write_int4

N, K, BLOCK = 24, 80, 32  # K = 80: three blocks, the last one partial and an odd count of zero points a row


@pytest.fixture(scope="module")
def layer():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(N, K, generator=generator)
    inputs = torch.randn(256, K, generator=generator)
    inputs[:, :3] *= 20
    return weight, inputs


def _one_matmul(weight: torch.Tensor) -> onnx.ModelProto:
    """y = x @ weight^T as one MatMul named "mm", its weight [K, N] an initializer."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "one_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])],
        [numpy_helper.from_array(weight.T.numpy().copy(), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _run(model: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


@pytest.fixture(scope="module")
def quantized(layer):
    return int4_weight_only(_one_matmul(layer[0]), ["mm"], BLOCK)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def test_rtn_integers_are_what_the_quantizer_wrote(layer, quantized):
    model = copy.deepcopy(quantized)
    before = _initializers(model)
    for tensor in model.graph.initializer:  # scramble every integer, so that the comparison proves the writing
        array = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(array), tensor.name))
    write_int4(model, {"mm_Q4": rtn(layer[0], BLOCK, Runtime.ONNXRUNTIME)})
    after = _initializers(model)
    assert before.keys() == after.keys()
    for name, array in before.items():
        assert after[name].dtype == array.dtype and after[name].shape == array.shape, name
        assert np.array_equal(after[name], array), name


@pytest.mark.parametrize("method,act_order", [(WeightMethod.RTN, False), (WeightMethod.GPTQ, False),
                                              (WeightMethod.GPTQ, True), (WeightMethod.HQQ, False)])
def test_the_node_computes_the_methods_weights(layer, quantized, method, act_order):
    weight, inputs = layer
    chosen = {WeightMethod.RTN: lambda: rtn(weight, BLOCK, Runtime.ONNXRUNTIME),
              WeightMethod.GPTQ: lambda: gptq(weight, hessian_from(inputs), BLOCK, Runtime.ONNXRUNTIME,
                                              act_order=act_order),
              WeightMethod.HQQ: lambda: hqq(weight, BLOCK, Runtime.ONNXRUNTIME)}[method]()
    model = copy.deepcopy(quantized)
    write_int4(model, {"mm_Q4": chosen})
    x = inputs[:16]
    got = _run(model, x)
    # measured: RTN's and GPTQ's outputs bit-exact, HQQ's (float zero points) within 1.2e-5 of outputs near 118
    assert torch.allclose(got, x @ chosen.values().T, rtol=1e-5, atol=1e-4)
    if method != WeightMethod.RTN:  # the written integers are not RTN's: the node's output moved with them
        assert not torch.allclose(got, _run(quantized, x), rtol=1e-5, atol=1e-4)


def test_fractional_zero_points_match_onnxruntimes_own_hqq_graph(layer):
    """MatMulNBits takes float zero points of the scales' type on onnxruntime 1.32 (w = (q - zero) * scale):
    our HQQ integers written into the default quantizer's graph compute what ORT's own HQQ export computes."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    weight, inputs = layer
    quantizer = MatMulNBitsQuantizer(_one_matmul(weight), algo_config=HQQWeightOnlyQuantConfig(block_size=BLOCK))
    quantizer.process()
    theirs = quantizer.model.model
    zero = [t for t in theirs.graph.initializer if t.name.endswith("_zero_points")][0]
    assert zero.data_type == TensorProto.FLOAT

    model = int4_weight_only(_one_matmul(weight), ["mm"], BLOCK)
    write_int4(model, {"mm_Q4": hqq(weight, BLOCK, Runtime.ONNXRUNTIME)})
    x = inputs[:16]
    assert torch.allclose(_run(model, x), _run(theirs, x), rtol=1e-5, atol=1e-4)


def test_wrong_names_grids_and_shapes_are_one_line_errors(layer, quantized):
    weight = layer[0]
    model = copy.deepcopy(quantized)
    with pytest.raises(EngineError, match="no MatMulNBits node named 'mm'"):
        write_int4(model, {"mm": rtn(weight, BLOCK, Runtime.ONNXRUNTIME)})
    with pytest.raises(EngineError, match="not torch's"):
        write_int4(model, {"mm_Q4": rtn(weight, BLOCK, Runtime.TORCH)})
    with pytest.raises(EngineError, match="in blocks of 32"):
        write_int4(model, {"mm_Q4": rtn(weight, 16, Runtime.ONNXRUNTIME)})
