"""The smoothed, quantized (simulated) model as one safetensors file that says how to run it and how
it was made, and its reload onto the model's architecture."""
from __future__ import annotations

import json

from safetensors.torch import load, save
from torch import nn

from engine.core.numerics import int8_reduce_range
from engine.core.plan import Plan
from engine.core.qmodules import SimLinear
from engine.core.vocabulary import Kernels
from engine.model.inventory import inventory
from engine.model.loading import fingerprint
from engine.quant.apply import apply_plan, set_module, shallow_copy, with_tensors
from engine.quant.calibration import Calibration
from engine.quant.prepare import prepare_with

FORMAT = "quantization-lens smoothquant v2"


def export(model: nn.Module, plan: Plan, calibration: Calibration) -> bytes:
    """The smoothed, quantized (simulated) model as safetensors bytes.

    Tensors: the state dict (quantize-dequantized weights, each explicit layer's `in_scale`, norms with
    their folded 1/s). Metadata: the plan, each layer's form and static activation (scale, zero point),
    and the calibration statistics, so the file alone says how to run and how it was made.
    """
    prepared = prepare_with(model, plan, calibration)
    smoothing = prepared.smoothing
    quantized = apply_plan(model, plan, Kernels.SIMULATED, prepared=prepared)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in quantized.state_dict().items()}
    static = {name: list(module.static_scale) for name, module in quantized.named_modules()
              if isinstance(module, SimLinear) and module.static_scale is not None}
    forms = smoothing.forms(model) if smoothing is not None else []
    metadata = {"format": FORMAT, "plan": json.dumps(plan.to_json()), "model": fingerprint(model), "act": plan.act,
                "reduce_range": json.dumps(int8_reduce_range()), "forms": json.dumps(forms),
                "static_scales": json.dumps(static), "calibration": json.dumps(calibration.summary()),
                "usage": "per Linear: x / in_scale (where stored), then for int8 y = (q(x) - zero) @ weight^T * "
                         "(x_scale * weight_scale) + bias with weight holding the int8 values, else y = x @ weight^T "
                         "+ bias"}
    return save(tensors, metadata)


def export_metadata(data: bytes) -> dict[str, str]:
    """The metadata of an exported file (plan, forms, static scales, calibration), as stored."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]).get("__metadata__", {})


def load_export(data: bytes, model: nn.Module) -> nn.Module:
    """The exported model rebuilt on `model`'s architecture: every tensor comes from the file.

    Returns a new model; `model` (used for its module tree only) is untouched.
    """
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
            module = with_tensors(model.get_submodule(layer.name), weight=weight)
        else:
            scale = static.get(layer.name)
            module = SimLinear(weight, tensors.get(f"{layer.name}.bias"), resolved[layer.name], plan.act,
                               tuple(scale) if scale else None, tensors.get(f"{layer.name}.in_scale"),
                               json.loads(metadata["reduce_range"]), tensors.get(f"{layer.name}.weight_scale"))
        set_module(clone, layer.name, module.requires_grad_(False))
    quantized = {layer.name for layer in layers}
    for key, tensor in tensors.items():  # the rest (norms, position tables): the copy's own entries, replaced
        owner, _, attribute = key.rpartition(".")
        if owner in quantized:
            continue
        module = clone.get_submodule(owner)
        if attribute in module._parameters:
            module._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
        elif attribute in module._buffers:
            module._buffers[attribute] = tensor
    return clone.eval()
