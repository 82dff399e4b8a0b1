"""SmoothQuant's smoothing as its own step: per input channel s = max|X|^alpha / max|W|^(1-alpha),
X <- X / s, W <- W * s, which leaves the float product unchanged and moves the activation outliers
into the (per-channel) weights. `smooth` computes it from calibration; `apply_plan` applies it.

Where 1/s goes, per group of layers reading one input tensor (q/k/v share one s):
- folded into the norm that produced the input, when that norm feeds only this group (pre-LN
  decoders: the residual takes the norm's input), as the SmoothQuant paper does;
- folded into V's output rows for the attention output projection (softmax(QK^T)V is linear in V per
  head; with grouped KV heads one s per KV channel, shared by the query heads that read it);
- folded into the up projection's rows for a gated MLP's down projection (act(gate) * up is linear
  in up; a fused GLU's second half likewise);
- otherwise an explicit per-channel divide of the input (post-LN encoders, whose norm output is also
  the residual stream; the input after GELU).
Every fold is verified on the model before use: a fold that would change its FP32 logits is not
taken, and that layer gets the explicit divide instead. So smoothing alone never changes the model.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.core.plan import FP32, Plan, PlanError
from engine.core.qmodules import linear_parts
from engine.core.vocabulary import WeightMethod
from engine.model.facts import facts
from engine.model.families import attention_value_path, folds_into_norm, gated_path
from engine.model.graph import model_graph, probe_inputs
from engine.model.inventory import Layer, inventory
from engine.quant import awq
from engine.quant.apply import apply_plan
from engine.quant.prepared import Prepared

EPS = 1e-5  # floor of max|X| and max|W|: a dead channel must not give s = 0 or inf
VERIFY_TOLERANCE = 1e-4
EXPLICIT, NONE = "explicit input scale", "not smoothed"


def smoothing_factor(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) per input channel (both floored at EPS)."""
    x, w = x_absmax.float().clamp(min=EPS), w_absmax.float().clamp(min=EPS)
    return x.pow(alpha) / w.pow(1.0 - alpha)


@dataclass(frozen=True)
class LayerSmoothing:
    """One layer's smoothing: its alpha (AWQ's: the searched exponent), the factor s of its input channels and
    where 1/s went."""

    name: str
    alpha: float | None
    factor: torch.Tensor | None
    form: str
    target: str | None = None
    method: WeightMethod | None = None  # AWQ, or None for SmoothQuant


@dataclass
class Smoothing:
    """Everything apply_plan needs: each layer's factor (weights times s, by input channel), explicit input
    divisors, norms whose output channels are divided, and output rows of layers that absorb a fold."""

    layers: dict[str, LayerSmoothing] = field(default_factory=dict)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, list[tuple[slice, torch.Tensor]]] = field(default_factory=dict)
    key: str = ""

    def factor(self, name: str) -> torch.Tensor | None:
        entry = self.layers.get(name)
        return None if entry is None else entry.factor

    def transform_key(self, name: str) -> str | None:
        """Names this layer's changed weight for the weight cache; None when smoothing leaves it alone."""
        return f"sq:{self.key}" if self.factor(name) is not None or name in self.rows else None

    def transformed(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """(W * s by column, with absorbed rows divided; bias rows divided; the explicit input divisor)."""
        weight = weight.detach().float().clone()
        bias = None if bias is None else bias.detach().float().clone()
        entry = self.layers.get(name)
        if entry is not None and entry.factor is not None:
            weight *= entry.factor.to(weight.device)
        for rows, divisor in self.rows.get(name, ()):
            weight[rows] /= divisor.to(weight.device)[:, None]
            if bias is not None:
                bias[rows] /= divisor.to(weight.device)
        explicit = entry is not None and entry.form == EXPLICIT and entry.factor is not None
        return weight, bias, entry.factor.to(weight.device) if explicit else None

    def forms(self, model: nn.Module) -> list[dict]:
        """Per layer: block, role, alpha and the form its smoothing took (the page's table)."""
        return [{"layer": layer.name, "block": layer.block, "role": layer.role,
                 "alpha": self.layers[layer.name].alpha if layer.name in self.layers else None,
                 "method": self.layers[layer.name].method if layer.name in self.layers else None,
                 "form": self.layers[layer.name].form if layer.name in self.layers else NONE}
                for layer in inventory(model) if layer.kind == "linear"]


def weight_absmax(model: nn.Module, names) -> torch.Tensor:
    """max|W| per input channel over every output row of every layer in `names` (a shared input)."""
    return torch.stack([linear_parts(model.get_submodule(n))[0].abs().amax(0) for n in names]).amax(0).float().cpu()


def _kv_channels(path, inputs: int) -> torch.Tensor:
    """For each input channel of attention-out, the V channel it reads (grouped KV heads share one)."""
    channel = torch.arange(inputs)
    head, within = channel // path.head_dim, channel % path.head_dim
    return (head // path.repeat) * path.head_dim + within


def _per_value(path, values: torch.Tensor) -> torch.Tensor:
    """The largest of `values` (one per attention-out input channel) over the channels reading each V channel."""
    width = path.rows.stop - path.rows.start
    return torch.zeros(width).scatter_reduce(0, _kv_channels(path, values.shape[0]), values.float(), "amax",
                                            include_self=False)


def _fold_candidates(model: nn.Module):
    """(kind, layers, target, path) of every fold the family tables allow, before verification."""
    graph, layers = model_graph(model), inventory(model)
    by_name = {layer.name: layer for layer in layers}
    blocks: dict[int, list[Layer]] = {}
    for layer in layers:
        if layer.block is not None:
            blocks.setdefault(layer.block, []).append(layer)
    for group in graph.groups:
        if group.norm is not None and not group.residual and folds_into_norm(model.get_submodule(group.norm)):
            yield "norm", group.layers, group.norm, None
    for layer in layers:
        if layer.block is None or len(group_of(graph, layer.name)) != 1:
            continue
        siblings = blocks[layer.block]
        if layer.role == "attention-out":
            path = attention_value_path(layer, siblings, model.config)
        elif layer.role == "ffn-out":
            path = gated_path(layer, siblings)
        else:
            continue
        if path is not None and by_name[path.source].shared == layer.shared:
            yield ("value" if layer.role == "attention-out" else "gated"), (layer.name,), path.source, path


def group_of(graph, name: str) -> tuple[str, ...]:
    return next((group.layers for group in graph.groups if name in group.layers), (name,))


def _build(model: nn.Module, kind: str, names, target: str, path, factor: torch.Tensor, alpha, smoothing: Smoothing,
           method: WeightMethod | None = None):
    """Record one group's smoothing in `smoothing`, folded as `kind` says."""
    form = EXPLICIT if kind == "explicit" else f"folded into {target}"
    for name in names:
        smoothing.layers[name] = LayerSmoothing(name, alpha, factor, form, None if kind == "explicit" else target,
                                                method)
    if kind == "norm":
        smoothing.norms[target] = factor
    elif kind == "value":
        smoothing.rows.setdefault(target, []).append((path.rows, _per_value(path, factor)))
    elif kind == "gated":
        smoothing.rows.setdefault(target, []).append((path.rows, factor))


def verified_folds(model: nn.Module) -> dict[tuple[str, ...], tuple[str, str, object]]:
    """The folds that leave `model`'s logits unchanged under a random s, keyed by their layers (kept in its facts)."""
    known = facts(model)
    if known.folds is not None:
        return known.folds
    inputs = probe_inputs(model)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        reference = model(**inputs).logits
    folds = {}
    for kind, names, target, path in _fold_candidates(model):
        factor = torch.exp(torch.empty(weight_absmax(model, names).shape[0]).uniform_(-1.4, 1.4, generator=generator))
        if kind == "value":
            factor = _per_value(path, factor)[_kv_channels(path, factor.shape[0])]
        trial = Smoothing(key=f"verify:{kind}:{names[0]}")
        _build(model, kind, names, target, path, factor, None, trial)
        with torch.inference_mode():
            logits = apply_plan(model, FP32, prepared=Prepared(smoothing=trial))(**inputs).logits
        if torch.allclose(logits, reference, atol=VERIFY_TOLERANCE, rtol=VERIFY_TOLERANCE):
            folds[names] = (kind, target, path)
    known.folds = folds
    return folds


def _awq_factor(model: nn.Module, plan: Plan, specs, calibration, names, kind: str, path) -> tuple[float, torch.Tensor]:
    """AWQ's (exponent, s) for one group: mean|X| of its first layer's sample rows, taken per V channel over the
    query heads reading it where the value absorbs the fold, searched against every layer's own quantizer."""
    samples = calibration.samples[names[0]].float()
    x_mean = samples.abs().mean(0)
    if kind == "value":
        x_mean = _per_value(path, x_mean)[_kv_channels(path, x_mean.shape[0])]
    weights = [linear_parts(model.get_submodule(name))[0] for name in names]
    quantizers = [awq.weight_quantizer(specs[name], plan.runtime, plan.int8_weight_bits) for name in names]
    return awq.search(x_mean.clamp(min=EPS), samples, weights, quantizers)


def smooth(model: nn.Module, plan: Plan, calibration, specs=None) -> Smoothing:
    """Every layer's smoothing under `plan`, from `calibration`: SmoothQuant's where a layer has a smooth_alpha,
    AWQ's where its method is awq. `specs`: each layer's LayerSpec (by default the plan's).

    Layers reading one input share one s: a SmoothQuant group takes the alpha of its first smoothed layer, an AWQ
    group the exponent its layers' summed output error is least with; one group cannot take both.
    """
    graph = model_graph(model)
    folds = verified_folds(model)
    if specs is None:
        specs = plan.specs([layer.name for layer in inventory(model) if layer.kind == "linear"], strict=False)
    digest = hashlib.blake2b(f"{calibration.key}:{plan.smooth_alpha!r}".encode(), digest_size=8)
    smoothing = Smoothing()
    for group in graph.groups:
        names = group.layers
        smoothed = [name for name in names if name in specs and specs[name].smooth_alpha is not None]
        awq_layers = [name for name in names if name in specs and specs[name].method == WeightMethod.AWQ]
        if smoothed and awq_layers:
            raise PlanError(f"layers {', '.join(dict.fromkeys(awq_layers + smoothed))} read one input and share one "
                            f"scale: AWQ ({', '.join(awq_layers)}) and SmoothQuant ({', '.join(smoothed)}) cannot "
                            "both set it")
        kind, target, path = folds.get(names, ("explicit", None, None))
        if awq_layers:
            alpha, factor = _awq_factor(model, plan, specs, calibration, names, kind, path)
            choice = [(specs[name].precision, specs[name].group_size) for name in names]
            digest.update(f"awq:{names}:{choice}:{plan.runtime}:{plan.int8_weight_bits}:{alpha!r}".encode())
            _build(model, kind, names, target, path, factor, alpha, smoothing, WeightMethod.AWQ)
            continue
        if not smoothed:
            continue
        alpha = specs[smoothed[0]].smooth_alpha
        digest.update(f"sq:{names}:{alpha!r}".encode())
        x_absmax, w_absmax = calibration.absmax(names[0]), weight_absmax(model, names)
        if kind == "value":  # the query heads reading one V channel share its s: ranges taken over them all
            channels = _kv_channels(path, x_absmax.shape[0])
            factor = smoothing_factor(_per_value(path, x_absmax), _per_value(path, w_absmax), alpha)[channels]
        else:
            factor = smoothing_factor(x_absmax, w_absmax, alpha)
        _build(model, kind, names, target, path, factor, alpha, smoothing)
    smoothing.key = digest.hexdigest()
    return smoothing
