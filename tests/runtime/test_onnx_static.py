"""Static int8 export with the engine's activation scales: the QDQ pair on each quantized MatMul's input carries
exactly the given (scale, zero point), and ORT runs the graph with them."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.runtime.onnx_graph import GraphError, int8_static, own_inputs, quiet_ort, static_activation_params
from engine.runtime.onnx_static import int8_static_exact

WIDTH = 8
GIVEN = {"mm1": (0.0123, 17), "mm2": (0.0371, 0)}  # far from what min/max of these feeds gives


def _graph() -> onnx.ModelProto:
    """x -> MatMul mm1 -> Relu -> MatMul mm2 -> y, float weights."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(WIDTH, WIDTH)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(WIDTH, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", 4])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds() -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(1, n, WIDTH)).astype(np.float32)} for n in (3, 7, 5)]


@pytest.fixture()
def staged(tmp_path):
    model = own_inputs(_graph(), list(GIVEN))
    onnx.save(model, tmp_path / "stage.onnx")
    return tmp_path, model


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _fake_quant(x: np.ndarray, scale: float, zero: int) -> np.ndarray:
    scale = np.float32(scale)
    return ((np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)


def _weight(model: onnx.ModelProto, values: dict, matmul: str) -> np.ndarray:
    """The int8 per-channel weight of `matmul`, dequantized as its DequantizeLinear does."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = next(n for n in model.graph.node if n.name == matmul)
    dq = producers[node.input[1]]
    q, scale, zero = (values[name] for name in dq.input)
    return ((q.astype(np.float32) - zero.astype(np.float32)) * scale).astype(np.float32)


def test_the_written_activation_qparams_are_the_given_ones(staged):
    folder, model = staged
    with quiet_ort():
        int8_static_exact(folder / "stage.onnx", folder / "exact.onnx", list(GIVEN), model, _feeds(), 8, GIVEN)
        int8_static(folder / "stage.onnx", folder / "minmax.onnx", list(GIVEN), model, _feeds())
    exact, minmax = onnx.load(folder / "exact.onnx"), onnx.load(folder / "minmax.onnx")
    mapping = {name: [name] for name in GIVEN}
    written = static_activation_params(exact, mapping)
    calibrated = static_activation_params(minmax, mapping)
    values = _initializers(exact)
    for name, (scale, zero) in GIVEN.items():
        assert written[name] == (float(np.float32(scale)), zero)
        assert calibrated[name] != written[name]  # minmax would have chosen otherwise
        own_input = next(node.input[0] for node in model.graph.node if node.name == name)
        quantize = next(n for n in exact.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == own_input)
        assert values[quantize.input[1]].dtype == np.float32 and values[quantize.input[2]].dtype == np.uint8
        assert (float(values[quantize.input[1]]), int(values[quantize.input[2]])) == written[name]

    # ORT runs it with those scales: the output is the fake-quantized computation, clipping included
    session = ort.InferenceSession(str(folder / "exact.onnx"), providers=["CPUExecutionProvider"])
    x = 2.5 * _feeds()[1]["x"]  # beyond 0.0123 * (255 - 17) ~ 2.9 in places: clipped
    hidden = np.maximum(_fake_quant(x, *GIVEN["mm1"]) @ _weight(exact, values, "mm1"), 0)
    expected = _fake_quant(hidden, *GIVEN["mm2"]) @ _weight(exact, values, "mm2")
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qparams, message", [({"mm1": GIVEN["mm1"]}, "no activation scale given for 'mm2'"),
                                              ({**GIVEN, "mm2": (0.0, 3)}, "is not a uint8 activation's"),
                                              ({**GIVEN, "mm1": (0.1, 300)}, "is not a uint8 activation's")])
def test_bad_qparams_are_one_line(staged, qparams, message):
    folder, model = staged
    with pytest.raises(GraphError, match=message):
        int8_static_exact(folder / "stage.onnx", folder / "x.onnx", list(GIVEN), model, _feeds(), 8, qparams)
