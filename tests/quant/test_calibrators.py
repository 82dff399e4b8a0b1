"""Static int8 calibrators: minmax, percentile and entropy give ONNX Runtime's own calibrator's range on the same
per-sentence activations; mse clips outliers for a smaller quantization error; static_ranges collects the
activations the model's layers really see."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import create_calibrator

from engine.core.vocabulary import Calibrator
from engine.quant.calibration import CalibrationError, calibrate
from engine.quant.calibrators import range_of, static_ranges

TEXTS = ("a great movie", "terrible, just terrible, long and boring", "ok",
         "the best film of the year by far, I loved every minute of it", "meh.", "what a waste of two hours")
WIDTH = 8
ORT_METHOD = {Calibrator.MINMAX: CalibrationMethod.MinMax, Calibrator.PERCENTILE: CalibrationMethod.Percentile,
              Calibrator.ENTROPY: CalibrationMethod.Entropy}


def _sentences(seed: int = 0, outliers: bool = True) -> list[np.ndarray]:
    """Per sentence an activation [1, tokens, WIDTH] of its own length: heavy-tailed, with rare outliers, none in
    the first sentence (ORT's entropy histogram has 128 bins for 128 quantized bins: it can only clip where later
    sentences widened the first sentence's histogram)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for i, length in enumerate((5, 11, 3, 17, 8, 13, 2, 21)):
        x = rng.standard_t(4, size=(1, length, WIDTH)).astype(np.float32) + 0.3
        if outliers and i and length % 2:
            x[0, 0, length % WIDTH] = 40.0 * (-1) ** length
        arrays.append(x)
    return arrays


class _OneFeed(CalibrationDataReader):
    def __init__(self, feed: dict):
        self.items = iter([feed])

    def get_next(self):
        return next(self.items, None)


def _ort_range(tmp_path, arrays: list[np.ndarray], method: CalibrationMethod, percentile: float) -> tuple[float, float]:
    """ORT's calibrator on a graph whose MatMul reads the given activation, one sentence per collect_data call
    (one call with all of them fails: ORT stacks sentences of different lengths)."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [WIDTH, 4], np.ones(WIDTH * 4, np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "tokens", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "tokens", 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "g.onnx")
    options = {"percentile": percentile} if method == CalibrationMethod.Percentile else {}
    calibrator = create_calibrator(tmp_path / "g.onnx", ["MatMul"], str(tmp_path / "augmented.onnx"),
                                   calibrate_method=method, extra_options=options)
    for x in arrays:
        calibrator.collect_data(_OneFeed({"x": x}))
    low, high = calibrator.compute_data()["x"].range_value
    return np.asarray(low).item(), np.asarray(high).item()


@pytest.mark.parametrize("calibrator", [Calibrator.MINMAX, Calibrator.PERCENTILE, Calibrator.ENTROPY])
@pytest.mark.parametrize("outliers", [True, False])
def test_range_equals_ort_calibrator(tmp_path, calibrator, outliers):
    arrays = _sentences(outliers=outliers)
    for percentile in (99.999, 99.0) if calibrator == Calibrator.PERCENTILE else (99.999,):
        ours = range_of(calibrator, percentile, arrays)
        theirs = _ort_range(tmp_path, arrays, ORT_METHOD[calibrator], percentile)
        assert ours == theirs, (calibrator, percentile)  # exactly: the same collector on the same arrays
    if calibrator != Calibrator.MINMAX:  # the histogram calibrators do clip this data
        values = np.concatenate([a.ravel() for a in arrays])
        assert values.min() <= ours[0] and ours[1] <= values.max() and ours != (values.min(), values.max())


def _uint8_mse(values: np.ndarray, low: float, high: float) -> float:
    """ORT's uint8 asymmetric quantizer over [min(low, 0), max(high, 0)], its mean squared error on `values`."""
    rmin, rmax = min(low, 0.0), max(high, 0.0)
    scale = np.float32((rmax - rmin) / 255)
    zero = np.round(-rmin / scale)
    q = np.clip(np.round(values / scale) + zero, 0, 255)
    return float(np.mean(((q - zero) * scale - values) ** 2))


def test_mse_clips_outliers_for_less_error():
    """One outlier among 1.6M values: clipping it costs its distance squared once, while the 6x finer step saves
    rounding error on every value (with 1 outlier in fewer than ~780k values minmax is the least-MSE range)."""
    rng = np.random.default_rng(0)
    arrays = [rng.normal(0.3, 1.0, size=(1, 2000, WIDTH)).astype(np.float32) for _ in range(100)]
    arrays[7][0, 3, 2] = 30.0
    values = np.concatenate([a.ravel() for a in arrays])
    low, high = range_of(Calibrator.MSE, 99.999, arrays)
    assert values.min() <= low <= 0 <= high < 10 < values.max()
    assert _uint8_mse(values, low, high) < 0.5 * _uint8_mse(values, float(values.min()), float(values.max()))
    small = _sentences()  # its outliers are too many to be worth clipping
    small_values = np.concatenate([a.ravel() for a in small])
    assert _uint8_mse(small_values, *range_of(Calibrator.MSE, 99.999, small)) <= \
        _uint8_mse(small_values, float(small_values.min()), float(small_values.max()))


def test_mse_keeps_minmax_when_nothing_stands_out():
    """Uniform values: any clipping costs more than it saves, so the search keeps (nearly) the full range."""
    arrays = [np.random.default_rng(1).uniform(-1, 2, size=(1, 50, WIDTH)).astype(np.float32) for _ in range(3)]
    values = np.concatenate([a.ravel() for a in arrays])
    low, high = range_of(Calibrator.MSE, 99.999, arrays)
    assert _uint8_mse(values, low, high) <= _uint8_mse(values, float(values.min()), float(values.max())) * 1.01
    assert low == pytest.approx(values.min(), rel=0.05) and high == pytest.approx(values.max(), rel=0.05)


def _layer_inputs(model, tokenizer, name: str, divisor: torch.Tensor | None = None) -> list[np.ndarray]:
    """The layer's input per sentence, each run alone (no padding), as ORT's calibration feeds it."""
    seen = []
    hook = model.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0].float()))
    try:
        with torch.inference_mode():
            for text in TEXTS:
                model(**tokenizer(text, return_tensors="pt"))
    finally:
        hook.remove()
    return [(x if divisor is None else x / divisor).numpy() for x in seen]


@pytest.mark.parametrize("layer", ["bert.encoder.layer.1.intermediate.dense", "classifier"])
def test_static_ranges_see_the_layer_inputs(tiny_bert, tokenizer, layer):
    """Batched and padded, the collected values are the ones each sentence gives alone, in text order."""
    arrays = _layer_inputs(tiny_bert, tokenizer, layer)
    asked = {layer: (Calibrator.PERCENTILE, 99.9)}
    got = static_ranges(tiny_bert, tokenizer, TEXTS, asked, batch_size=4)[layer]
    assert got == pytest.approx(range_of(Calibrator.PERCENTILE, 99.9, arrays), rel=1e-5)
    for calibrator in Calibrator:
        got = static_ranges(tiny_bert, tokenizer, TEXTS, {layer: (calibrator, 99.999)})[layer]
        assert got == pytest.approx(range_of(calibrator, 99.999, arrays), rel=1e-5), calibrator
        assert all(isinstance(v, float) for v in got)


def test_minmax_is_calibrate_range(tiny_bert, tokenizer):
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.output.dense"]
    ranges = static_ranges(tiny_bert, tokenizer, TEXTS, {n: (Calibrator.MINMAX, 99.999) for n in names})
    calibration = calibrate(tiny_bert, tokenizer, TEXTS)
    for name in names:
        expected = (float(calibration.low[name].min()), float(calibration.high[name].max()))
        assert ranges[name] == pytest.approx(expected, rel=1e-5)


def test_divisors_divide_the_input_first(tiny_bert, tokenizer):
    layer = "bert.encoder.layer.0.intermediate.dense"
    divisor = torch.linspace(0.5, 4.0, tiny_bert.get_submodule(layer).in_features)
    asked = {layer: (Calibrator.ENTROPY, 99.999)}
    smoothed = static_ranges(tiny_bert, tokenizer, TEXTS, asked, divisors={layer: divisor})[layer]
    assert smoothed == pytest.approx(range_of(Calibrator.ENTROPY, 99.999,
                                              _layer_inputs(tiny_bert, tokenizer, layer, divisor)), rel=1e-5)
    assert smoothed != static_ranges(tiny_bert, tokenizer, TEXTS, asked)[layer]


def test_bad_requests_are_one_line(tiny_bert, tokenizer):
    with pytest.raises(CalibrationError, match="no linear layer named 'bert.embeddings.nope'"):
        static_ranges(tiny_bert, tokenizer, TEXTS, {"bert.embeddings.nope": (Calibrator.MINMAX, 99.999)})
    with pytest.raises(CalibrationError, match="need calibration sentences"):
        static_ranges(tiny_bert, tokenizer, (), {"classifier": (Calibrator.MINMAX, 99.999)})


def test_ranges_equal_ort_calibration_of_the_exported_graph(tmp_path, tiny_bert, tokenizer):
    """End to end: ORT calibrating the exported graph, one feed per sentence, sees the activations static_ranges
    collects from the torch model, so it finds the same ranges (up to torch-vs-ORT float rounding)."""
    from engine.runtime.onnx_graph import export_fp32, layer_nodes, own_inputs, prepared, quantizable_layers, \
        replace_gemm

    clone, traced_tokenizer = prepared(tiny_bert, tokenizer)
    export_fp32(clone, traced_tokenizer, tmp_path / "fp32.onnx")
    graph = replace_gemm(onnx.load(tmp_path / "fp32.onnx"))
    mapping = layer_nodes(graph.graph, quantizable_layers(clone), {name for name, _ in clone.named_modules()})
    layers = ["bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense", "classifier"]
    graph = own_inputs(graph, [mapping[layer][0] for layer in layers])
    onnx.save(graph, tmp_path / "stage.onnx")
    tensors = {node.name: node.input[0] for node in graph.graph.node if node.input}
    feeds = [{"input_ids": ids.numpy(), "attention_mask": np.ones(ids.shape, np.int64)}
             for ids in (tokenizer(text, return_tensors="pt")["input_ids"] for text in TEXTS)]
    for calibrator, method in ORT_METHOD.items():
        ours = static_ranges(tiny_bert, tokenizer, TEXTS, {layer: (calibrator, 99.999) for layer in layers})
        ort_calibrator = create_calibrator(tmp_path / "stage.onnx", ["MatMul"], str(tmp_path / "augmented.onnx"),
                                           calibrate_method=method)
        for feed in feeds:
            ort_calibrator.collect_data(_OneFeed(feed))
        theirs = ort_calibrator.compute_data()
        for layer in layers:
            low, high = theirs[tensors[mapping[layer][0]]].range_value
            assert ours[layer] == pytest.approx((np.asarray(low).item(), np.asarray(high).item()), rel=1e-5), \
                (calibrator, layer)
