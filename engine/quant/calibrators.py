"""Static int8 activation ranges: per requested layer, the per-tensor (low, high) its calibrator chooses from
the layer's FP32 input over the calibration sentences.

- minmax: the least and the greatest value (what `calibrate` gives as low.min(), high.max()).
- percentile, entropy: ONNX Runtime's own `HistogramCollector`, set up exactly as `quantize_static` sets it up
  (create_calibrator's defaults): percentile on the histogram of |x| (symmetric, 2048 bins), entropy on the
  histogram of x (128 bins, 128 quantized bins, TensorRT's KL search). It is fed what ORT's calibration of the
  exported graph sees: one array per sentence, in text order, without padding, one `collect` per sentence
  (ORT's own `collect_data` cannot take sentences of different lengths in one call: it stacks them), so the
  range is the one ORT's calibrator returns for the same arrays.
- mse: the engine's own: the clipping range whose uint8 asymmetric quantizer (ORT's: over [min(low, 0),
  max(high, 0)], scale = range / 255) has the least mean squared error over a histogram of the values. See
  `_least_mse_range` for the search.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
from typing import Iterable, Sequence

import numpy as np
import torch
from cachetools import LRUCache
from torch import nn

from engine.core.memo import memoized
from engine.core.tokens import encode, pad
from engine.core.vocabulary import Calibrator
from engine.model.inventory import inventory
from engine.model.loading import fingerprint, input_limit
from engine.quant.apply import shallow_copy
from engine.quant.calibration import CalibrationError

# create_calibrator's defaults, which quantize_static uses (it passes only options the caller set)
PERCENTILE_BINS = 2048
PERCENTILE_SYMMETRIC = True
ENTROPY_BINS = 128
ENTROPY_QUANTIZED_BINS = 128
# the MSE search: its histogram's bins, and the shrink factors tried for each end of the range
MSE_BINS = 4096
MSE_SHRINKS = np.geomspace(1.0, 1e-3, 64)
UINT8_LEVELS = 255


class _MinMax:
    def __init__(self) -> None:
        self.low, self.high = np.inf, -np.inf

    def add(self, values: np.ndarray) -> None:
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))

    def range(self) -> tuple[float, float]:
        return self.low, self.high


class _OrtHistogram:
    """ORT's HistogramCollector for one tensor (its method names are the vocabulary's); its progress lines go
    nowhere (stdout is the CLI's JSON)."""

    def __init__(self, calibrator: Calibrator, percentile: float) -> None:
        from onnxruntime.quantization.calibrate import HistogramCollector  # 1.4 s to import: only when used

        if calibrator == Calibrator.PERCENTILE:
            self.collector = HistogramCollector(method=Calibrator.PERCENTILE.value, symmetric=PERCENTILE_SYMMETRIC,
                                                num_bins=PERCENTILE_BINS, num_quantized_bins=PERCENTILE_BINS,
                                                percentile=percentile, scenario="same")
        else:
            self.collector = HistogramCollector(method=Calibrator.ENTROPY.value, symmetric=False, num_bins=ENTROPY_BINS,
                                                num_quantized_bins=ENTROPY_QUANTIZED_BINS, percentile=percentile,
                                                scenario="same")

    def add(self, values: np.ndarray) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.collector.collect({"x": [values]})  # what collect_data passes for a one-feed reader

    def range(self) -> tuple[float, float]:
        with contextlib.redirect_stdout(io.StringIO()):
            low, high = self.collector.compute_collection_result()["x"][:2]
        return float(low), float(high)


class _Mse:
    """A histogram over [-t, t] in MSE_BINS equal bins, t doubling (pairs of bins merging) whenever a value falls
    outside, so one pass needs neither the range beforehand nor the values kept; then the least-MSE range."""

    def __init__(self) -> None:
        self.counts = np.zeros(MSE_BINS)
        self.t = 0.0
        self.minmax = _MinMax()

    def add(self, values: np.ndarray) -> None:
        self.minmax.add(values)
        low, high = self.minmax.range()
        reach = max(-low, high)
        if self.t == 0.0:
            self.t = reach if reach > 0 else 1.0
        while reach > self.t:
            merged = self.counts.reshape(-1, 2).sum(1)  # old [-t, t] is the middle half of the new [-2t, 2t]
            self.counts = np.zeros(MSE_BINS)
            self.counts[MSE_BINS // 4: 3 * MSE_BINS // 4] = merged
            self.t *= 2
        self.counts += np.histogram(values, MSE_BINS, range=(-self.t, self.t))[0]

    def range(self) -> tuple[float, float]:
        width = 2 * self.t / MSE_BINS
        centers = np.arange(MSE_BINS) * width + (width / 2 - self.t)
        used = self.counts > 0
        return _least_mse_range(centers[used], self.counts[used], *self.minmax.range())


def _errors(values: np.ndarray, weights: np.ndarray, rmin: float, rmaxes: np.ndarray) -> np.ndarray:
    """The weighted MSE of ORT's uint8 quantizer for each candidate range (rmin, rmaxes[j]), rmin <= 0 <= rmaxes[j]."""
    scale = (rmaxes - rmin) / UINT8_LEVELS
    zero = np.round(-rmin / scale)
    q = np.clip(np.round(values[None, :] / scale[:, None]) + zero[:, None], 0, UINT8_LEVELS)
    error = (q - zero[:, None]) * scale[:, None] - values[None, :]
    return (error ** 2) @ weights / weights.sum()


def _least_mse_range(centers: np.ndarray, counts: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """The search: the quantizer's range [min(low, 0), max(high, 0)] has each end shrunk toward 0 by its own
    factor from MSE_SHRINKS (1, the minmax range, down to 1/1000, geometrically: outliers may be orders of
    magnitude past the bulk), all 64 x 64 pairs tried; each pair's error is the quantizer's squared error at
    the bin centers, weighted by the bin counts. The least wins; ties go to the wider range (minmax first).
    The range returned stays inside [low, high], and quantizes exactly as the pair that won.
    What to expect: clipping an outlier that sets the range R costs about R^2, a finer step saves at most
    N (R / 255)^2 / 12 over N values, so an outlier is clipped only when rarer than ~1 in 12 * 255^2 = 780k values:
    on a few sentences mse mostly equals minmax; it clips on large calibration sets with isolated outliers."""
    rmin, rmax = min(low, 0.0), max(high, 0.0)
    if rmax == rmin:
        return low, high
    best = (np.inf, low, high)
    for a in MSE_SHRINKS:
        highs = rmax * MSE_SHRINKS  # rmax - rmin > 0, so every candidate has a positive scale
        errors = _errors(centers, counts, rmin * a, highs)
        j = int(np.argmin(errors))
        if errors[j] < best[0]:
            best = (errors[j], max(float(rmin * a), low), min(float(highs[j]), high))
    return best[1], best[2]


def _collector(calibrator: Calibrator, percentile: float):
    if calibrator == Calibrator.MINMAX:
        return _MinMax()
    if calibrator == Calibrator.MSE:
        return _Mse()
    return _OrtHistogram(calibrator, percentile)


def range_of(calibrator: Calibrator, percentile: float, arrays: Iterable[np.ndarray]) -> tuple[float, float]:
    """The (low, high) `calibrator` chooses for one tensor given its values per sentence, in order."""
    collector = _collector(Calibrator(calibrator), percentile)
    for values in arrays:
        collector.add(np.asarray(values, dtype=np.float32))
    return collector.range()


def _digest(texts: Sequence[str], divisors: dict[str, torch.Tensor] | None) -> tuple[str, str]:
    text = hashlib.blake2b("\n".join(texts).encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()
    scales = hashlib.blake2b(digest_size=12)
    for name in sorted(divisors or {}):
        scales.update(name.encode())
        scales.update(divisors[name].detach().float().cpu().numpy().tobytes())
    return text, scales.hexdigest()


def _key(model: nn.Module, _tokenizer, texts: Sequence[str], layers: dict[str, tuple[Calibrator, float]],
         divisors: dict[str, torch.Tensor] | None = None, batch_size: int = 32) -> tuple:
    return (fingerprint(model), *_digest(texts, divisors),
            tuple(sorted((name, Calibrator(c), float(p)) for name, (c, p) in layers.items())), batch_size)


@memoized("quant.calibrator_ranges", LRUCache(maxsize=8), key=_key)
def _ranges(model: nn.Module, tokenizer, texts: Sequence[str], layers: dict[str, tuple[Calibrator, float]],
            divisors: dict[str, torch.Tensor] | None = None, batch_size: int = 32) -> tuple:
    linears = {layer.name for layer in inventory(model) if layer.kind == "linear"}
    unknown = sorted(set(layers) - linears)
    if unknown:
        raise CalibrationError(f"no linear layer named {unknown[0]!r} to calibrate")
    if not texts:
        raise CalibrationError("static int8 ranges need calibration sentences; none were given")
    encoded = encode(tokenizer, texts, input_limit(model, tokenizer))
    device = next(model.parameters()).device
    probe = shallow_copy(model)
    collectors = {name: _collector(Calibrator(c), float(p)) for name, (c, p) in layers.items()}
    factors = {name: divisors[name].float().to(device) for name in layers if divisors and name in divisors}
    current: dict[str, torch.Tensor] = {}

    def observer(name: str):
        def record(_module, args):
            x, mask = args[0].float(), current["mask"]
            if name in factors:
                x = x / factors[name]
            if x.shape[0] != mask.shape[0]:  # not per sentence (DeBERTa's relative positions): one array
                collectors[name].add(x.reshape(-1, x.shape[-1]).cpu().numpy())
                return
            token_level = x.dim() == 3 and x.shape[:2] == mask.shape
            for row in range(mask.shape[0]):  # in text order: ORT's histograms depend on the order
                values = x[row][mask[row]] if token_level else x[row]
                collectors[name].add(values.cpu().numpy())
        return record

    handles = [probe.get_submodule(name).register_forward_pre_hook(observer(name)) for name in layers]
    try:
        with torch.inference_mode():
            # batches of consecutive texts (calibrate sorts by length): sentences must reach the collectors
            # in text order, as ORT's feeds do, and this way only one batch is held at a time
            for start in range(0, len(texts), batch_size):
                ids, mask = pad(encoded.ids[start:start + batch_size], tokenizer.pad_token_id or 0)
                current["mask"] = mask.bool().to(device)
                probe(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return tuple((name, collectors[name].range()) for name in layers)


def static_ranges(model: nn.Module, tokenizer, texts: Sequence[str], layers: dict[str, tuple[Calibrator, float]],
                  divisors: dict[str, torch.Tensor] | None = None,
                  batch_size: int = 32) -> dict[str, tuple[float, float]]:
    """Per layer of `layers` ({name: (calibrator, percentile)}), the per-tensor (low, high) of its FP32 input over
    `texts` that its calibrator chooses; `divisors[name]` (SmoothQuant's per-input-channel factors) divides that
    input first. One forward pass for all layers, padding left out; memoized per (weights, texts, layers,
    divisors). The percentile only matters to the percentile calibrator."""
    return dict(_ranges(model, tokenizer, tuple(texts), dict(layers), divisors, batch_size))
