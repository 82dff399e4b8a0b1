"""Where the error comes from: every op output's SQNR under a plan, the error it puts in and the error it carries.

For a sample of sentences, the plan's model and its reference run side by side, one batch at a time, and
every op output is compared with the reference's: each quantizable layer (Linear, GPT-2's Conv1D, the
embedding table), each norm and activation module, and the functional ops between them that
`TorchFunctionMode` sees: the attention matmuls (scores, then context), softmax and the residual adds. An
op is named by the module it ran in, its kind and its place among that module's ops of that kind
(`bert.encoder.layer.0.attention.self:softmax#0`); the same op has the same name in both runs.

- accumulated SQNR: the op's output under the whole plan against the reference's (error carried in plus
  the op's own);
- local SQNR (quantized layers only): the plan's layer fed the reference's input, against the reference's
  output: the error this layer puts in by itself;
- for int8 layers (W8A8), the local error split: weight-only (float input, the layer's weights) and
  activation-only (the layer's quantized input, float weights).

The reference is FP32, with the plan's SmoothQuant folded in where it smooths (the same function, so its
layers' inputs are what the plan's layers expect). Both models run eager attention, so the scores and
softmax are ops of their own. SQNR is over the real tokens of every tensor shaped [batch, tokens, ...]
and over every element otherwise; None where an op carries no error (every op under FP32).
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from engine.core.numerics import sqnr_db
from engine.core.plan import Plan, PlanLike, as_plan
from engine.core.qmodules import SimLinear, linear_parts
from engine.core.tokens import encode, length_sorted, pad
from engine.model.inventory import inventory
from engine.model.loading import input_limit
from engine.quant.apply import apply_plan
from engine.quant.prepared import Prepared
from engine.quant.prepare import prepare
from engine.runtime.onnx_graph import module_of

DEFAULT_SAMPLE = 128
BATCH = 16
_NORM_NAMES = ("LayerNorm", "RMSNorm", "Norm")
_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Mish)
_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm}
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}


@dataclass(frozen=True, kw_only=True)
class OpRow:
    """One op output's error under the plan; `to_json()` is the CLI's `diagnose` row, keys in its order."""

    op: str
    layer: str | None  # the quantizable layer this op is, or the module it ran in
    kind: str  # embedding, linear, norm, activation, attention_scores, attention_context, softmax, residual_add, logits
    block: int | None
    precision: str  # the op's own precision under the plan (fp32 for every op that is not a quantized layer)
    local_sqnr_db: float | None
    accumulated_sqnr_db: float | None
    weight_sqnr_db: float | None
    activation_sqnr_db: float | None

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OpRow:
        """From `to_json()`'s dict; keys it does not know (the CLI's exported figure) are ignored."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass(frozen=True, kw_only=True)
class Diagnosis:
    """A plan's rows in forward order on a sample of `sentences`; `to_json()` is what the cache keeps."""

    plan: Plan
    sentences: int
    rows: tuple[OpRow, ...]

    def to_json(self) -> dict[str, Any]:
        return {"plan": self.plan.to_json(), "sentences": self.sentences, "rows": [r.to_json() for r in self.rows]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Diagnosis:
        return cls(plan=Plan.from_json(data["plan"]), sentences=data["sentences"],
                   rows=tuple(OpRow.from_json(row) for row in data["rows"]))


class _Power:
    """Signal and noise power summed over batches, in float64."""

    def __init__(self):
        self.signal = self.noise = 0.0

    def add(self, reference: torch.Tensor, value: torch.Tensor) -> None:
        reference, value = reference.double(), value.double()
        self.signal += float((reference * reference).sum())
        self.noise += float(((reference - value) ** 2).sum())

    def db(self) -> float | None:
        value = sqnr_db(self.signal, self.noise)
        return None if math.isinf(value) and value > 0 else value


class _Recorder(TorchFunctionMode):
    """Every op output of one forward, by op name, with the inputs of the quantized layers."""

    def __init__(self, model: nn.Module, layers: dict[str, str], mask: torch.Tensor):
        super().__init__()
        self.layers, self.mask = layers, mask
        self.stack: list[str] = []
        self.recorded: set[str] = set()  # modules whose own output stands for everything computed inside them
        self.pending: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.kinds: dict[str, tuple[str, str]] = {}  # op -> (kind, module)
        self.handles = []
        for name, module in model.named_modules():
            kind = self._module_kind(name, module)
            if kind is not None:
                self.recorded.add(name)
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave(name, kind)))

    def _module_kind(self, name: str, module: nn.Module) -> str | None:
        if name in self.layers:
            return self.layers[name]
        cls = type(module).__name__
        if cls.endswith(_NORM_NAMES):
            return "norm"
        if isinstance(module, _ACTIVATIONS) or cls.endswith("Activation"):
            return "activation"
        return None

    def _enter(self, name: str):
        def hook(module, args):
            if name in self.layers and args and isinstance(args[0], torch.Tensor):
                self.pending[name].append(args[0].detach())
            self.stack.append(name)
        return hook

    def _leave(self, name: str, kind: str | None):
        def hook(module, args, output):
            self.stack.pop()
            if kind is not None and isinstance(output, torch.Tensor):
                self._keep(name, kind, output)
        return hook

    def _inside_recorded(self) -> bool:
        return any(name in self.recorded for name in self.stack)

    def _keep(self, module: str, kind: str, output: torch.Tensor) -> None:
        key = (module, kind)
        count = self.counts[key]
        self.counts[key] += 1
        if kind in ("linear", "embedding"):  # a layer is its module's name (ALBERT's shared ones: `name#k` after)
            op = module if count == 0 else f"{module}#{count}"
            if self.pending[module]:
                self.inputs[op] = self.pending[module].pop()
        else:
            op = f"{module}:{kind}#{count}"
        self.outputs[op] = output.detach()
        self.kinds[op] = (kind, module)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or self._inside_recorded():
            return out
        module = self.stack[-1] if self.stack else ""
        if func in _SOFTMAX:
            self._keep(module, "softmax", out)
        elif func in _MATMUL and all(isinstance(a, torch.Tensor) and a.dim() >= 3 for a in args[:2]):
            kind = "attention_scores" if self.counts[(module, "attention_scores")] <= \
                self.counts[(module, "attention_context")] else "attention_context"
            self._keep(module, kind, out)
        elif func in _ADD and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]) \
                and args[0].shape == args[1].shape and out.dim() == 3:
            self._keep(module, "residual_add", out)
        return out

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def real_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor's real-token rows where it is [batch, tokens, features], else all of it."""
        if tensor.dim() == 3 and tensor.shape[:2] == self.mask.shape:
            return tensor[self.mask.bool()]
        return tensor


def _eager(model: nn.Module) -> nn.Module:
    """Eager attention (a private copy's config), so scores and softmax are ops the recorder sees."""
    with contextlib.suppress(Exception):
        model.set_attn_implementation("eager")
    if getattr(model.config, "reference_compile", None):
        model.config.reference_compile = False  # ModernBERT: no torch.compile, whose graphs hide the ops
    return model


def _split(module: nn.Module, reference: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight-only, activation-only) outputs of an int8 layer on input `x`: its quantized weights on the float
    input, and the reference's float weights on its quantized input."""
    if not isinstance(module, SimLinear) or module.precision != "int8" or module.weight_scale is None:
        return None
    if module.in_scale is not None:  # SmoothQuant's explicit divide comes before the input is quantized
        x = x / module.in_scale
    q, scale = module.quantize(x, module.act, module.reduce_range, module.static_scale)
    float_weight = reference.dequantized() if isinstance(reference, SimLinear) else linear_parts(reference)[0]
    return (F.linear(x, module.dequantized(), module.bias),
            F.linear((q * scale).to(x.dtype), float_weight.to(x.dtype), module.bias))


def _batches(tokenizer, model: nn.Module, texts: Sequence[str]) -> list[dict]:
    encoded = encode(tokenizer, texts, input_limit(model, tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for rows in length_sorted(encoded.lengths, BATCH):
        ids, mask = pad([encoded.ids[i] for i in rows], pad_id)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def diagnose(model: nn.Module, tokenizer, texts: Sequence[str], plan: PlanLike, calibration_pool: Sequence[str],
             calibration_source: str = "", progress: Callable[[float], None] | None = None) -> Diagnosis:
    """Every op's local and accumulated SQNR under `plan` on `texts` (see the module's docstring)."""
    plan = as_plan(plan)
    layers = {layer.name: layer for layer in inventory(model)}
    resolved = plan.resolve(list(layers))
    prepared = prepare(model, tokenizer, plan, calibration_pool, calibration_source)
    reference_plan = replace(plan, rules=())  # every layer FP32, the plan's smoothing folded in
    reference = _eager(apply_plan(model, reference_plan, prepared=Prepared(smoothing=prepared.smoothing))).eval()
    quantized = _eager(apply_plan(model, plan, prepared=prepared)).eval()
    kinds = {name: layer.kind for name, layer in layers.items()}
    accumulated: dict[str, _Power] = defaultdict(_Power)
    local: dict[str, _Power] = defaultdict(_Power)
    weight_only: dict[str, _Power] = defaultdict(_Power)
    activation_only: dict[str, _Power] = defaultdict(_Power)
    order: dict[str, tuple[str, str]] = {}
    batches = _batches(tokenizer, model, texts)
    for index, inputs in enumerate(batches):
        runs = {}
        for name, net in (("reference", reference), ("plan", quantized)):
            recorder = _Recorder(net, kinds, inputs["attention_mask"])
            try:
                with torch.no_grad(), recorder:
                    logits = net(**inputs).logits
            finally:
                recorder.close()
            recorder.outputs["logits"], recorder.kinds["logits"] = logits.detach(), ("logits", "")
            runs[name] = recorder
        ref, got = runs["reference"], runs["plan"]
        for op, (kind, module) in ref.kinds.items():
            order.setdefault(op, (kind, module))
            if op in got.outputs and got.outputs[op].shape == ref.outputs[op].shape:
                accumulated[op].add(ref.real_tokens(ref.outputs[op]), ref.real_tokens(got.outputs[op]))
        with torch.no_grad():
            for op, x in ref.inputs.items():
                name = ref.kinds[op][1]
                if resolved[name] == "fp32":
                    continue
                layer, expected = quantized.get_submodule(name), ref.real_tokens(ref.outputs[op])
                local[op].add(expected, ref.real_tokens(layer(x)))
                split = _split(layer, reference.get_submodule(name), x)
                if split is not None:
                    weight_only[op].add(expected, ref.real_tokens(split[0]))
                    activation_only[op].add(expected, ref.real_tokens(split[1]))
        if progress is not None:
            progress((index + 1) / len(batches))
    rows = []
    for op, (kind, module) in order.items():
        layer = layers.get(module)
        block = layer.block if layer is not None else _block_of(module, layers)
        precision = resolved[module] if kind in ("linear", "embedding") else "fp32"
        rows.append(OpRow(op=op, layer=module or None, kind=kind, block=block, precision=precision,
                          local_sqnr_db=local[op].db() if op in local else None,
                          accumulated_sqnr_db=accumulated[op].db(),
                          weight_sqnr_db=weight_only[op].db() if op in weight_only else None,
                          activation_sqnr_db=activation_only[op].db() if op in activation_only else None))
    return Diagnosis(plan=plan, sentences=len(texts), rows=tuple(rows))


def _block_of(module: str, layers: dict) -> int | None:
    """The block of the quantizable layer whose module path shares the longest prefix with `module` (a norm
    beside a block's projections is in their block); None for the model's root."""
    def shared(name: str) -> int:
        count = 0
        for a, b in zip(name.split("."), module.split(".")):
            if a != b:
                break
            count += 1
        return count

    nearest = max(layers.values(), key=lambda layer: shared(layer.name), default=None)
    return nearest.block if module and nearest is not None and shared(nearest.name) > 0 else None


def sample(texts: Sequence[str], size: int = DEFAULT_SAMPLE, seed: int = 0) -> list[str]:
    """A seeded sample of `size` texts (all of them when there are fewer), in their order."""
    if len(texts) <= size:
        return list(texts)
    chosen = np.sort(np.random.default_rng(seed).choice(len(texts), size, replace=False))
    return [texts[i] for i in chosen]


# named after the tensor they quantize for the next layer, so in the scope of the layer that produced it
_QUANTIZES_FOR_CONSUMERS = ("DynamicQuantizeLinear", "QuantizeLinear")


def _layer_tensors(graph: onnx.GraphProto, layers: set[str], module_names: set[str]) -> dict[str, str]:
    """Each layer's float output tensor in an exported graph: the output of the last node in the layer's scope
    (the TorchScript exporter names nodes by module path, and the quantizers name theirs after the node they
    replace: `.../query/MatMul_quant`, its Cast and scale Muls, then the bias Add). A layer run several times
    (ALBERT's shared one: `query_1`, ...) is read at its first call, as the engine reads it."""
    found, first_scope = {}, {}
    for node in graph.node:
        layer = module_of(node.name, module_names)
        if layer not in layers or not node.output or node.op_type in _QUANTIZES_FOR_CONSUMERS:
            continue
        scope = node.name.rsplit("/", 1)[0]
        if first_scope.setdefault(layer, scope) == scope:
            found[layer] = node.output[0]
    return found


def exported_layer_sqnr(model: nn.Module, tokenizer, folder: str | Path,
                        texts: Sequence[str]) -> dict[str, float | None]:
    """The accumulated SQNR at each layer's output of the exported graph run by ONNX Runtime, against torch FP32 on
    the same batches: the engine's figure measured on the deployed model itself. A layer whose output the graph
    does not keep (a float layer's MatMul and Add fused into one Gemm by ORT's offline optimizations) is left
    out."""
    import onnxruntime as ort

    folder = Path(folder)
    graph_model = onnx.load(str(folder / "model.onnx"))
    kinds = {layer.name: layer.kind for layer in inventory(model)}
    tensors = _layer_tensors(graph_model.graph, set(kinds), {name for name, _ in model.named_modules()})
    for tensor in tensors.values():
        graph_model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    reference = _eager(apply_plan(model, Plan())).eval()
    powers: dict[str, _Power] = defaultdict(_Power)
    for inputs in _batches(tokenizer, model, texts):
        recorder = _Recorder(reference, kinds, inputs["attention_mask"])
        try:
            with torch.no_grad(), recorder:
                reference(**inputs)
        finally:
            recorder.close()
        feeds = {name: inputs[name].numpy() for name in ("input_ids", "attention_mask")}
        outputs = dict(zip(names, session.run(names, feeds)))
        for layer, tensor in tensors.items():
            got = torch.from_numpy(np.asarray(outputs[tensor], dtype=np.float32))
            expected = recorder.outputs[layer]
            if got.shape == expected.shape:
                powers[layer].add(recorder.real_tokens(expected), recorder.real_tokens(got))
    return {layer: power.db() for layer, power in powers.items()}
