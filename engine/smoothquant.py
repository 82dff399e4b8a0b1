"""SmoothQuant for post-LayerNorm encoders: calibration, smoothing factors, W8A8 with static or per-token scales.

A few input channels of an encoder's Linears carry activations tens of times larger than the
rest; one int8 scale per tensor then spends its range on them. SmoothQuant divides each input
channel by s = max|X|^alpha / max|W|^(1-alpha) and multiplies the weight's column by the same s,
which leaves the float product unchanged and moves the difficulty into the (per-channel) weights.

Where the division goes in BERT/DistilBERT (post-LN): a LayerNorm's output is also the residual
stream, so 1/s cannot be folded into it; q/k/v (one shared divisor: max|W| is taken jointly over
the three) and ffn-in get an explicit per-channel scale of their input. attention-out's factor
is folded into the value projection's output rows (softmax(QK^T)V is linear in V, per head), at
no cost. ffn-out follows GELU and the head follows tanh/ReLU of a [CLS] vector: explicit scales.

Smoothing rides in the plan (`smooth_alpha`: one alpha, or per-layer), is applied to every layer
the alpha covers whatever its precision (so a plan of fp32 layers with an alpha is smoothing
alone, the invariant's check), and quantize.apply_plan builds the layers from `prepare_layers`.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.data import rt_split
from engine.layers import Layer, inventory
from engine.models import fingerprint
from engine.plan import DEFAULT_CALIB, Plan
from engine.quantize import LayerInput, fake_quant_activation, int8_reduce_range, shallow_copy

if TYPE_CHECKING:
    from engine.evaluation import EvalResult

CALIB_SEED = 0
EPS = 1e-5  # floor of max|X| and max|W|: a dead channel must not give s = 0 or inf
SAMPLE_ROWS = 256  # token rows kept per layer for the per-layer error (auto alpha, SQNR)
ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))
QKV = ("query", "key", "value")
EXPLICIT, FOLDED, NONE = "explicit input scale", "folded into value", "not smoothed"


# ---- calibration ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Per input channel of every Linear, the min and max of its FP32 input over N train sentences.

    `samples` keeps a deterministic subset of input rows per layer, for per-layer errors.
    """

    model: str  # the weights' fingerprint
    n: int
    seed: int
    tokens: int
    low: dict[str, torch.Tensor]
    high: dict[str, torch.Tensor]
    samples: dict[str, torch.Tensor]
    key: str = field(default="", init=False)

    def absmax(self, name: str) -> torch.Tensor:
        return torch.maximum(-self.low[name], self.high[name])

    def __post_init__(self) -> None:
        # a hash of the statistics names the smoothed weights in the weight cache
        digest = hashlib.blake2b(f"{self.model}:{self.n}:{self.seed}".encode(), digest_size=8)
        for name in sorted(self.low):
            digest.update(self.low[name].numpy().tobytes())
            digest.update(self.high[name].numpy().tobytes())
        object.__setattr__(self, "key", digest.hexdigest())

    def summary(self) -> dict:
        """JSON-ready statistics: sentences, tokens, and per layer the per-channel max|X|, min, max."""
        return {"n": self.n, "seed": self.seed, "tokens": self.tokens, "split": "embedded-train",
                "layers": {name: {"absmax": self.absmax(name).tolist(), "min": self.low[name].tolist(),
                                  "max": self.high[name].tolist()} for name in self.low}}


_CALIBRATIONS: dict[tuple[str, int, int], Calibration] = {}
_TOKENIZERS: dict[str, object] = {}
_LOCK = threading.Lock()


def calibration_texts(n: int, seed: int = CALIB_SEED) -> list[str]:
    """N sentences of the train split (never the test split), chosen by `seed`, in split order."""
    train = rt_split("train")
    n = min(n, len(train))
    rows = np.sort(np.random.default_rng(seed).choice(len(train), size=n, replace=False))
    return [train.texts[i] for i in rows]


def _tokenizer_for(model: nn.Module):
    """The tokenizer seen with these weights, or the one saved next to them (apply_plan without one)."""
    known = _TOKENIZERS.get(fingerprint(model))
    if known is not None:
        return known
    from transformers import AutoTokenizer

    from engine.models import EMBEDDED_DIR, HUB_IDS, ModelError

    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    source = str(EMBEDDED_DIR) if name == "embedded" else HUB_IDS.get(name, name)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelError(f"SmoothQuant calibration needs this model's tokenizer ({source or 'unknown'}): "
                         f"{str(error).splitlines()[0]}") from None


def calibrate(model: nn.Module, tokenizer=None, n: int = DEFAULT_CALIB, seed: int = CALIB_SEED,
              batch_size: int = 32) -> Calibration:
    """Input statistics of every Linear over `n` train sentences; memoized per (weights, n, seed).

    Hooks go on a shallow copy, so the shared model is never touched, and are removed afterwards.
    Padding positions are left out: they are not text.
    """
    key = (fingerprint(model), n, seed)
    with _LOCK:
        if tokenizer is not None:
            _TOKENIZERS.setdefault(key[0], tokenizer)
        if key not in _CALIBRATIONS:
            _CALIBRATIONS[key] = _calibrate(model, tokenizer or _tokenizer_for(model), n, seed, batch_size)
        return _CALIBRATIONS[key]


def _calibrate(model: nn.Module, tokenizer, n: int, seed: int, batch_size: int) -> Calibration:
    texts = calibration_texts(n, seed)
    max_length = min(getattr(tokenizer, "model_max_length", 512) or 512, 512)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    lengths = np.array([len(ids) for ids in encoded["input_ids"]])
    order = np.argsort(lengths, kind="stable")
    stride = max(1, math.ceil(int(lengths.sum()) / SAMPLE_ROWS))
    device = next(model.parameters()).device
    probe = shallow_copy(model)
    names = [layer.name for layer in inventory(model) if layer.kind == "linear"]
    low: dict[str, torch.Tensor] = {}
    high: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    current: dict[str, torch.Tensor] = {}

    def observer(name: str):
        def record(_module, args):
            x = args[0]
            mask = current["mask"]
            token_level = x.dim() == 3 and x.shape[:2] == mask.shape
            rows = (x[mask] if token_level else x.reshape(-1, x.shape[-1])).float()
            lo, hi = rows.amin(0).cpu(), rows.amax(0).cpu()
            low[name] = torch.minimum(low[name], lo) if name in low else lo
            high[name] = torch.maximum(high[name], hi) if name in high else hi
            samples[name].append((rows[::stride] if token_level else rows).cpu())
        return record

    handles = [probe.get_submodule(name).register_forward_pre_hook(observer(name)) for name in names]
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                width = int(lengths[rows].max())
                ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.bool)
                for i, row in enumerate(rows):
                    ids[i, :lengths[row]] = torch.tensor(encoded["input_ids"][row])
                    mask[i, :lengths[row]] = True
                current["mask"] = mask.to(device)
                probe(input_ids=ids.to(device), attention_mask=mask.long().to(device))
    finally:
        for handle in handles:
            handle.remove()
    return Calibration(fingerprint(model), len(texts), seed, int(lengths.sum()), low, high,
                       {name: torch.cat(parts)[:4 * SAMPLE_ROWS] for name, parts in samples.items()})


# ---- smoothing factors ----------------------------------------------------------------------
def smoothing_factor(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) per input channel (both floored at EPS)."""
    x, w = x_absmax.float().clamp(min=EPS), w_absmax.float().clamp(min=EPS)
    return x.pow(alpha) / w.pow(1.0 - alpha)


@dataclass(frozen=True)
class LayerSmoothing:
    """One layer's smoothing: alpha, factor s of its input channels, and where the 1/s went."""

    name: str
    block: int | None
    role: str
    alpha: float | None
    factor: torch.Tensor | None
    form: str
    fold_into: str | None = None  # the value layer whose output rows absorb attention-out's 1/s


def _weight_absmax(model: nn.Module, names: Sequence[str]) -> torch.Tensor:
    """max|W| per input channel over all output rows of all `names` (q/k/v share one divisor)."""
    return torch.stack([model.get_submodule(n).weight.detach().abs().amax(0) for n in names]).amax(0).float().cpu()


def _siblings(layers: Sequence[Layer]) -> dict[tuple[int | None, str], Layer]:
    return {(layer.block, layer.role): layer for layer in layers if layer.kind == "linear"}


def smoothing(model: nn.Module, plan: Plan, calibration: Calibration) -> dict[str, LayerSmoothing]:
    """Every layer's smoothing under `plan` (form "not smoothed" where its alpha is None)."""
    layers = inventory(model)
    siblings = _siblings(layers)
    factors: dict[tuple, torch.Tensor] = {}  # shared tensor per (input group, alpha)
    table: dict[str, LayerSmoothing] = {}
    for layer in layers:
        alpha = plan.alpha_for(layer.name) if layer.kind == "linear" else None
        if alpha is None:
            table[layer.name] = LayerSmoothing(layer.name, layer.block, layer.role, None, None, NONE)
            continue
        group = [siblings[(layer.block, r)].name for r in QKV if (layer.block, r) in siblings] \
            if layer.role in QKV and layer.block is not None else [layer.name]
        key = (tuple(group), alpha)
        if key not in factors:
            factors[key] = smoothing_factor(calibration.absmax(group[0]), _weight_absmax(model, group), alpha)
        value = siblings.get((layer.block, "value")) if layer.role == "attention-out" else None
        if value is not None and value.shape[0] != layer.shape[1]:
            value = None  # the context's channels are not the value's outputs: keep an explicit scale
        table[layer.name] = LayerSmoothing(layer.name, layer.block, layer.role, alpha, factors[key],
                                           FOLDED if value else EXPLICIT, value.name if value else None)
    return table


def _transformed_linear(module: nn.Linear, factor: torch.Tensor | None, out_divisor: torch.Tensor | None) -> nn.Linear:
    """A new Linear with W * s (columns) and, for a value layer absorbing a fold, W, b / s' (rows)."""
    weight = module.weight.detach().float()
    bias = None if module.bias is None else module.bias.detach().float()
    if factor is not None:
        weight = weight * factor.to(weight.device)
    if out_divisor is not None:
        divisor = out_divisor.to(weight.device)
        weight = weight / divisor[:, None]
        bias = None if bias is None else bias / divisor
    linear = nn.Linear(module.in_features, module.out_features, bias is not None, device=weight.device)
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return linear


def static_scale(calibration: Calibration, name: str, factor: torch.Tensor | None) -> tuple[float, int]:
    """The per-tensor (scale, zero point) of the input this layer sees, after dividing by s.

    s > 0, so the tensor's min and max after smoothing are min over channels of low/s and max of
    high/s: exact from the per-channel statistics, no second calibration pass needed.
    """
    low, high = calibration.low[name], calibration.high[name]
    if factor is not None:
        low, high = low / factor, high / factor
    scale, zero = torch._choose_qparams_per_tensor(torch.stack([low.min(), high.max()]).float(), int8_reduce_range())
    return float(scale), int(zero)


def prepare_layers(model: nn.Module, plan: Plan, resolved: dict[str, str],
                   calibration: Calibration | None = None) -> dict[str, LayerInput]:
    """What quantize.apply_plan needs for each smoothed or statically scaled layer of `plan`."""
    calibration = calibration or calibrate(model, None, plan.calib)
    table = smoothing(model, plan, calibration)
    absorbed = {entry.fold_into: entry for entry in table.values() if entry.fold_into}
    device = next(model.parameters()).device
    prepared: dict[str, LayerInput] = {}
    for name, entry in table.items():
        fold = absorbed.get(name)
        static = plan.act == "static" and resolved[name] == "int8" and name in calibration.low
        if entry.factor is None and fold is None and not static:
            continue
        transformed = entry.factor is not None or fold is not None
        module = model.get_submodule(name)
        linear = _transformed_linear(module, entry.factor, fold.factor if fold else None) if transformed else module
        in_scale = entry.factor.to(device) if entry.form == EXPLICIT else None
        key = f"sq:{calibration.key}:{entry.alpha}:{fold.alpha if fold else None}" if transformed else None
        prepared[name] = LayerInput(linear, in_scale, static_scale(calibration, name, entry.factor) if static else None,
                                    key)
    return prepared


def forms(model: nn.Module, plan: Plan, calibration: Calibration) -> list[dict]:
    """Per layer: block, role, alpha and the form its smoothing took (for the page's table)."""
    table = smoothing(model, plan, calibration)
    absorbed = {entry.fold_into: entry.name for entry in table.values() if entry.fold_into}
    rows = []
    for entry in table.values():
        note = f"output rows also absorb {absorbed[entry.name]}'s 1/s" if entry.name in absorbed else ""
        rows.append({"layer": entry.name, "block": entry.block, "role": entry.role, "alpha": entry.alpha,
                     "form": entry.form, "note": note})
    return rows


def smoothed_plan(alpha: float | dict[str, float] | None, act: str = "static", calib: int = DEFAULT_CALIB,
                  precision: str = "int8") -> Plan:
    """Uniform W8A8 (or smoothing alone with precision fp32) with a global or per-layer alpha."""
    smooth = tuple(alpha.items()) if isinstance(alpha, dict) else alpha
    rules = () if precision == "fp32" else (("*", precision),)
    return Plan(rules, act=act if precision == "int8" else "dynamic", smooth_alpha=smooth, calib=calib)


# ---- per-layer error: SQNR and automatic alpha -----------------------------------------------
def int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 quantize-dequantize, as torch's per-channel observer does."""
    scale = (weight.abs().amax(1) / 127.5).clamp(min=torch.finfo(torch.float32).eps).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight.float(), scale, zero, 0, -128, 127)


def _quantized_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, factor: torch.Tensor | None,
                      act: str, static: tuple[float, int] | None) -> torch.Tensor:
    if factor is not None:
        x, weight = x / factor, weight * factor
    x = fake_quant_activation(x, act, int8_reduce_range(), static)
    return F.linear(x, int8_weight(weight), bias)


def _error_energy(model: nn.Module, calibration: Calibration, name: str, factor: torch.Tensor | None,
                  act: str) -> tuple[float, float]:
    """(signal energy, error energy) of this layer's W8A8 output on the calibration samples."""
    module = model.get_submodule(name)
    x = calibration.samples[name]
    weight = module.weight.detach().float().cpu()
    bias = None if module.bias is None else module.bias.detach().float().cpu()
    reference = F.linear(x, weight, bias)
    static = static_scale(calibration, name, factor) if act == "static" else None
    error = reference - _quantized_output(x, weight, bias, factor, act, static)
    return float(reference.pow(2).sum()), float(error.pow(2).sum())


def sqnr_db(signal: float, error: float) -> float:
    return float("inf") if error == 0 else 10.0 * math.log10(max(signal, 1e-30) / error)


def layer_sqnr(model: nn.Module, calibration: Calibration, name: str, factor: torch.Tensor | None,
               act: str) -> float:
    """Signal-to-quantization-noise ratio (dB) of this layer's W8A8 output, on calibration inputs."""
    return sqnr_db(*_error_energy(model, calibration, name, factor, act))


_AUTO: dict[tuple, dict[str, float]] = {}


def auto_alphas(model: nn.Module, calibration: Calibration, act: str = "static",
                grid: Sequence[float] = ALPHA_GRID,
                progress: Callable[[float], None] | None = None) -> dict[str, float]:
    """Per layer, the alpha in `grid` whose smoothed W8A8 output has the least error on calibration data.

    q/k/v share one divisor, so they get one alpha: the one minimizing the sum of their relative
    errors. Ties go to the smaller alpha. Memoized per (calibration, act, grid) in this process.
    """
    key = (calibration.key, act, tuple(grid))
    if key not in _AUTO:
        _AUTO[key] = _auto_alphas(model, calibration, act, grid, progress)
    return dict(_AUTO[key])


def _auto_alphas(model: nn.Module, calibration: Calibration, act: str, grid: Sequence[float],
                 progress: Callable[[float], None] | None) -> dict[str, float]:
    layers = [layer for layer in inventory(model) if layer.kind == "linear"]
    siblings = _siblings(layers)
    groups: list[list[str]] = []
    for layer in layers:
        if layer.role in QKV and layer.block is not None:
            group = [siblings[(layer.block, r)].name for r in QKV if (layer.block, r) in siblings]
            if group not in groups:
                groups.append(group)
        else:
            groups.append([layer.name])
    chosen: dict[str, float] = {}
    for index, group in enumerate(groups):
        w_absmax = _weight_absmax(model, group)
        best, best_error = None, math.inf
        for alpha in grid:
            factor = smoothing_factor(calibration.absmax(group[0]), w_absmax, alpha)
            error = 0.0
            for name in group:
                signal, noise = _error_energy(model, calibration, name, factor, act)
                error += noise / max(signal, 1e-30)
            if error < best_error:
                best, best_error = float(alpha), error
        chosen.update({name: best for name in group})
        if progress is not None:
            progress((index + 1) / len(groups))
    return chosen


def sqnr_table(model: nn.Module, calibration: Calibration, plan: Plan) -> list[dict]:
    """Per Linear: its alpha, form, and W8A8 SQNR (dB) without and with the plan's smoothing."""
    table = smoothing(model, plan, calibration)
    rows = []
    for entry in table.values():
        if entry.name not in calibration.samples:
            continue
        before = layer_sqnr(model, calibration, entry.name, None, plan.act)
        after = before if entry.factor is None else layer_sqnr(model, calibration, entry.name, entry.factor, plan.act)
        rows.append({"layer": entry.name, "block": entry.block, "role": entry.role, "alpha": entry.alpha,
                     "form": entry.form, "sqnr_before_db": before, "sqnr_after_db": after})
    return rows


def outlier_view(model: nn.Module, calibration: Calibration, name: str, alpha: float, act: str) -> dict:
    """One layer's per-channel max|X| and max|W| before and after smoothing, and its SQNR before and after."""
    entry = smoothing(model, Plan(smooth_alpha=alpha), calibration)[name]
    if entry.factor is None:
        raise ValueError(f"layer {name!r} is not a Linear, so it has no smoothing")
    x = calibration.absmax(name)
    weight = model.get_submodule(name).weight.detach().float().cpu()
    return {"layer": name, "role": entry.role, "form": entry.form, "alpha": alpha,
            "x_before": x.numpy(), "x_after": (x / entry.factor).numpy(),
            "w_before": weight.abs().amax(0).numpy(), "w_after": (weight * entry.factor).abs().amax(0).numpy(),
            "factor": entry.factor.numpy(),
            "sqnr_before_db": layer_sqnr(model, calibration, name, None, act),
            "sqnr_after_db": layer_sqnr(model, calibration, name, entry.factor, act)}


def activation_ranges(model: nn.Module, calibration: Calibration) -> dict[int, tuple[list[str], np.ndarray]]:
    """max|X| per channel for each distinct Linear input (q/k/v share one), grouped by input width.

    Returns {width: (row labels, matrix [inputs, channels])}: the heatmap of activation ranges.
    """
    rows: dict[int, tuple[list[str], list[np.ndarray]]] = {}
    for layer in inventory(model):
        if layer.kind != "linear" or layer.role in ("key", "value"):
            continue
        label = f"{layer.block}·q/k/v in" if layer.role == "query" else \
            f"{layer.block}·{layer.role} in" if layer.block is not None else f"head·{layer.role} in"
        absmax = calibration.absmax(layer.name).numpy()
        labels, values = rows.setdefault(absmax.shape[0], ([], []))
        labels.append(label)
        values.append(absmax)
    return {width: (labels, np.stack(values)) for width, (labels, values) in rows.items()}


# ---- evaluation: the CLI's rows and the page's sweep ------------------------------------------
Runner = Callable[[Plan], "EvalResult"]


def gain(labels: np.ndarray, base_predictions: np.ndarray,
         predictions: np.ndarray) -> tuple[float, tuple[float, float]]:
    """Accuracy(predictions) - accuracy(base) on the same examples, with its paired bootstrap 95% interval."""
    from engine.measure import bootstrap_diff_interval

    base_correct, correct = base_predictions == labels, predictions == labels
    return float(correct.mean() - base_correct.mean()), bootstrap_diff_interval(base_correct, correct)


def max_logit_diff(evaluator, alpha: float | dict[str, float], calib: int = DEFAULT_CALIB,
                   run: Runner | None = None) -> float:
    """max |logits(smoothing alone) - logits(FP32)| over the evaluator's set: the invariant."""
    run = run or (lambda plan: evaluator.run(plan)[0])
    result = run(smoothed_plan(alpha, calib=calib, precision="fp32"))
    return float(np.abs(result.logits - evaluator.baseline_logits).max())


def alpha_rows(evaluator, alphas: Sequence[float | str], act: str = "static", calib: int = DEFAULT_CALIB,
               invariant: bool = True, progress: Callable[[float, str], None] | None = None,
               run: Runner | None = None) -> list[dict]:
    """One row per alpha ('auto' = per-layer automatic alpha): W8A8 with that smoothing against
    W8A8 without it, the paired gain with its bootstrap interval, and the FP32 invariant.

    `run` evaluates a plan (default: the evaluator's one path; the page passes a memoized one).
    """
    run = run or (lambda plan: evaluator.run(plan)[0])
    labels = np.asarray(evaluator.labels)
    base = run(smoothed_plan(None, act, calib))
    calibration = calibrate(evaluator.model, evaluator.tokenizer, calib)
    rows = []
    for index, alpha in enumerate(alphas):
        if progress is not None:
            progress(index / len(alphas), f"alpha {alpha}")
        value = auto_alphas(evaluator.model, calibration, act) if alpha == "auto" else float(alpha)
        plan = smoothed_plan(value, act, calib)
        result = run(plan)
        comparison = result.comparison
        difference, interval = gain(labels, base.predictions, result.predictions)
        rows.append({"alpha": alpha if alpha == "auto" else float(alpha), "accuracy": comparison.accuracy,
                     "ci95": list(comparison.ci95), "agreement": comparison.agreement, "kl": comparison.kl,
                     "w8a8_accuracy": base.comparison.accuracy,
                     "fp32_max_logit_diff": max_logit_diff(evaluator, value, calib, run) if invariant else None,
                     "w8a8_ci95": list(base.comparison.ci95), "gain": difference, "gain_ci95": list(interval),
                     "flips": comparison.flips, "n": comparison.n, "act": act, "calib": calibration.n,
                     "plan": plan.to_json()})
    if progress is not None:
        progress(1.0, "done")
    return rows


def best_row(rows: Sequence[dict]) -> dict:
    """The row with the highest accuracy (then agreement with FP32, then the smaller alpha)."""
    return max(rows, key=lambda row: (row["accuracy"], row["agreement"], -float(row["alpha"])
                                      if row["alpha"] != "auto" else 0.0))


def most_outlying(calibration: Calibration) -> str:
    """The Linear whose input has the largest ratio of its biggest channel range to the median one."""
    def ratio(name: str) -> float:
        absmax = calibration.absmax(name)
        return float(absmax.max() / absmax.median().clamp(min=EPS))
    return max(calibration.low, key=ratio)


# ---- export ---------------------------------------------------------------------------------
def export(model: nn.Module, plan: Plan, calibration: Calibration) -> bytes:
    """The smoothed, quantized (simulated) model as safetensors bytes.

    Tensors: the state dict (quantize-dequantized weights, each smoothed layer's `in_scale`).
    Metadata: the plan, each layer's form and static activation (scale, zero point), and the
    calibration statistics, so the file alone says how to run and how it was made.
    """
    from safetensors.torch import save

    from engine.quantize import SimLinear, apply_plan

    quantized = apply_plan(model, plan, "simulated", calibration=calibration)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in quantized.state_dict().items()}
    static = {name: list(module.static_scale) for name, module in quantized.named_modules()
              if isinstance(module, SimLinear) and module.static_scale is not None}
    metadata = {"format": "quantization-lens smoothquant v1", "plan": json.dumps(plan.to_json()),
                "model": fingerprint(model), "act": plan.act, "reduce_range": json.dumps(int8_reduce_range()),
                "forms": json.dumps(forms(model, plan, calibration)), "static_scales": json.dumps(static),
                "calibration": json.dumps(calibration.summary()),
                "usage": "y = linear(fake_quant(x / in_scale), weight, bias) per layer with an in_scale"}
    return save(tensors, metadata)


def export_metadata(data: bytes) -> dict[str, str]:
    """The metadata of an exported file (plan, forms, static scales, calibration), as stored."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]).get("__metadata__", {})


def load_export(data: bytes, model: nn.Module) -> nn.Module:
    """The exported model rebuilt on `model`'s architecture: every tensor comes from the file.

    Returns a new model; `model` (used for its module tree only) is untouched.
    """
    from safetensors.torch import load

    from engine.quantize import SimLinear, _set_module

    tensors = load(data)
    metadata = export_metadata(data)
    plan = Plan.from_json(json.loads(metadata["plan"]))
    static = json.loads(metadata["static_scales"])
    layers = inventory(model)
    resolved = plan.resolve([layer.name for layer in layers])
    clone = shallow_copy(model)
    for layer in layers:
        weight = tensors[f"{layer.name}.weight"]
        if layer.kind == "embedding":
            padding = model.get_submodule(layer.name).padding_idx
            module = nn.Embedding(*weight.shape, padding_idx=padding, _weight=weight)
        else:
            scale = static.get(layer.name)
            module = SimLinear(weight, tensors.get(f"{layer.name}.bias"), resolved[layer.name], plan.act,
                               tuple(scale) if scale else None, tensors.get(f"{layer.name}.in_scale"))
        _set_module(clone, layer.name, module.requires_grad_(False))
    for key, tensor in tensors.items():  # the rest (LayerNorms, position tables): new tensors, never in place
        owner, _, attribute = key.rpartition(".")
        module = clone.get_submodule(owner)
        if attribute in module._parameters:
            module._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
        elif attribute in module._buffers:
            module._buffers[attribute] = tensor
    return clone.eval()
