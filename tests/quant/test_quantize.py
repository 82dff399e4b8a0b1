"""apply_plan and the quantizers: one layer changes only that layer, the input never changes,
round-trip errors stay within half a step, simulated and real kernels agree, real files are smaller."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine.core.torch_int8 import int8_dequantized, torch_int8_embedding, torch_int8_linear
from engine.core.numerics import int4_dequantize, int4_quantize, pack_nibbles, unpack_nibbles
from engine.core.plan import FP32, Plan
from engine.core.qmodules import Int4Embedding, Int4Linear, SimLinear
from engine.model.inventory import inventory, list_layers
from engine.model.loading import fingerprint
from engine.quant.apply import apply_plan, simulated_weight
from engine.runtime.size import model_size_bytes

from conftest import _tiny

FAMILIES = ("bert", "distilbert")
# Private models (not the shared session fixtures) with a snapshot taken before anything touches them.
MODELS = {family: _tiny(family) for family in FAMILIES}
SNAPSHOTS = {family: {k: v.clone() for k, v in model.state_dict().items()} for family, model in MODELS.items()}
BUFFERS = {family: {k: v.clone() for k, v in model.named_buffers()} for family, model in MODELS.items()}
LAYERS = {family: inventory(model) for family, model in MODELS.items()}


def _inputs(seed: int = 0, batch: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, length), generator=generator)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # some padding, as evaluation batches have
    ids[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


INPUTS = _inputs()


def _logits(model: nn.Module, inputs=INPUTS) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits


def _assert_input_unchanged(family: str) -> None:
    model = MODELS[family]
    state = model.state_dict()
    assert state.keys() == SNAPSHOTS[family].keys()
    for key, tensor in state.items():
        assert tensor.dtype == SNAPSHOTS[family][key].dtype and torch.equal(tensor, SNAPSHOTS[family][key]), key
    for key, tensor in model.named_buffers():
        assert torch.equal(tensor, BUFFERS[family][key]), key
    assert all(type(module) in (nn.Linear, nn.Embedding) or not isinstance(module, (SimLinear, Int4Linear))
               for module in model.modules())


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The float weight a (possibly quantized) layer computes with."""
    if isinstance(module, (Int4Linear, SimLinear)):
        return module.dequantized()
    if isinstance(module, Int4Embedding):
        q = unpack_nibbles(module.packed, module.embedding_dim)
        return int4_dequantize(q, module.scale, module.low, module.group_size)
    if callable(getattr(module, "weight", None)):
        return int8_dequantized(module)
    return module.weight.float()


def _layer_output(module: nn.Module, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        if kind == "embedding":
            return module(torch.randint(0, shape[0], (3, 7), generator=generator))
        return module(torch.randn(3, 7, shape[1], generator=generator))


CASES = [(family, layer.name, precision, kernels)
         for family in FAMILIES for layer in LAYERS[family]
         for precision in ("int8", "int4") for kernels in ("simulated", "real")]
CASES += [(family, LAYERS[family][i].name, precision, kernels)
          for family in FAMILIES for i in (0, 3, 6, -1)
          for precision in ("fp16", "bf16") for kernels in ("simulated", "real")]


@pytest.mark.parametrize("family, name, precision, kernels", CASES,
                         ids=[f"{f}-{p}-{k}-{n}" for f, n, p, k in CASES])
def test_one_layer_changes_only_that_layer(family, name, precision, kernels):
    model = MODELS[family]
    layer = next(layer for layer in LAYERS[family] if layer.name == name)
    plan = Plan.from_mapping({name: precision})
    assert sum(p != "fp32" for p in plan.resolve(list_layers(model)).values()) == 1
    quantized = apply_plan(model, plan, kernels)
    assert quantized is not model
    _assert_input_unchanged(family)

    # the quantized layer keeps its name, and is a different module from the original
    original_module = model.get_submodule(name)
    new_module = quantized.get_submodule(name)
    assert new_module is not original_module
    # every other module is of the same type, every other parameter and buffer bit-identical and shared
    prefix = name + "."
    original_modules = dict(model.named_modules())
    for module_name, module in quantized.named_modules():
        if module_name != name and not module_name.startswith(prefix):
            assert type(module) is type(original_modules[module_name]), module_name
    original_state = model.state_dict()
    quantized_state = quantized.state_dict()
    outside = {k for k in original_state if not k.startswith(prefix)}
    assert outside == {k for k in quantized_state if not k.startswith(prefix)}
    for key in outside:
        assert quantized_state[key].dtype == original_state[key].dtype, key
        assert torch.equal(quantized_state[key], original_state[key]), key
        assert quantized_state[key].data_ptr() == original_state[key].data_ptr(), key
    original_buffers = dict(model.named_buffers())
    for key, tensor in quantized.named_buffers():
        if not key.startswith(prefix):
            assert torch.equal(tensor, original_buffers[key]), key

    # that layer's weights and output changed, and stay close to the original
    weight = original_module.weight
    changed = effective_weight(new_module)
    assert changed.shape == weight.shape
    assert not torch.equal(changed, weight)
    relative = {"int8": 0.02, "int4": 0.2, "fp16": 1e-3, "bf16": 1e-2}[precision]
    assert (changed - weight).norm() <= relative * weight.norm()
    before = _layer_output(original_module, layer.kind, layer.shape)
    after = _layer_output(new_module, layer.kind, layer.shape)
    assert after.dtype == before.dtype and after.shape == before.shape
    assert not torch.equal(after, before)
    assert (after - before).norm() <= 3 * relative * before.norm()
    # and so did the model's output, while the input model's output did not
    reference = _logits(model)
    assert not torch.equal(_logits(quantized), reference)
    _assert_input_unchanged(family)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kernels", ["simulated", "real"])
@pytest.mark.parametrize("precision", ["int8", "int4", "fp16", "bf16"])
def test_uniform_plan_keeps_names_and_leaves_input_unchanged(family, kernels, precision):
    model = MODELS[family]
    reference = _logits(model)
    quantized = apply_plan(model, Plan.uniform(precision), kernels)
    _logits(quantized)
    _assert_input_unchanged(family)
    assert torch.equal(_logits(model), reference)
    for layer in LAYERS[family]:
        module = quantized.get_submodule(layer.name)
        assert module is not model.get_submodule(layer.name)
        if kernels == "simulated" and layer.kind == "linear":
            assert isinstance(module, SimLinear) and module.precision == precision
    # the original layer modules are still the FP32 ones
    assert [type(model.get_submodule(layer.name)) for layer in LAYERS[family]] == \
        [nn.Embedding] + [nn.Linear] * (len(LAYERS[family]) - 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_plan_is_a_copy_with_the_same_output(family):
    model = MODELS[family]
    for kernels in ("simulated", "real"):
        copy = apply_plan(model, FP32, kernels)
        assert copy is not model
        assert torch.equal(_logits(copy), _logits(model))


# ---- round-trip errors -----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_int8_linear_within_half_a_step_per_channel(family):
    model = MODELS[family]
    for layer in LAYERS[family]:
        if layer.kind != "linear":
            continue
        module = model.get_submodule(layer.name)
        weight = module.weight
        deq = int8_dequantized(torch_int8_linear(module.weight, module.bias))
        amax = weight.abs().amax(1, keepdim=True)
        step = amax / 127.5  # symmetric int8 per output channel: [-amax, amax] onto -128..127
        # the largest element sits exactly half a step from 127: allow float32 rounding on top
        assert torch.all((weight - deq).abs() <= step / 2 + 1e-6 * amax), layer.name
        # the simulated path computes with exactly the real kernel's weight
        assert torch.equal(simulated_weight(fingerprint(model), layer.name, "int8", weight, 64), deq)
        quantized = apply_plan(model, Plan.from_mapping({layer.name: "int8"})).get_submodule(layer.name)
        assert torch.equal(quantized.dequantized(), deq)


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_embedding_within_half_a_step_per_row(family):
    embedding = MODELS[family].get_input_embeddings()
    weight = embedding.weight
    deq = int8_dequantized(torch_int8_embedding(embedding.weight))
    step = (weight.amax(1, keepdim=True) - weight.amin(1, keepdim=True)) / 255
    assert torch.all((weight - deq).abs() <= step / 2 * (1 + 1e-3) + 1e-7)


def _group_steps(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per element, the int4 step of its group computed from the group's own elements: (max - min) / 15."""
    rows, cols = weight.shape
    steps = torch.empty_like(weight)
    for start in range(0, cols, group_size):
        group = weight[:, start:start + group_size]
        steps[:, start:start + group_size] = ((group.amax(1) - group.amin(1)) / 15)[:, None]
    return steps


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("group_size", [16, 32, 64])
def test_int4_within_half_a_step_per_group(family, group_size):
    model = MODELS[family]
    for layer in LAYERS[family]:
        weight = model.get_submodule(layer.name).weight
        q, scale, low = int4_quantize(weight, group_size)
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
        deq = int4_dequantize(q, scale, low, group_size)
        bound = _group_steps(weight, group_size) / 2
        assert torch.all((weight - deq).abs() <= bound * (1 + 1e-4) + 1e-7), layer.name


def test_int4_partial_group_uses_its_own_range():
    """A last group narrower than group_size is scaled by its own elements, not by padding."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.rand(5, 40, generator=generator) + 1.0  # all positive, 40 = 32 + a partial group of 8
    q, scale, low = int4_quantize(weight, 32)
    deq = int4_dequantize(q, scale, low, 32)
    assert torch.all((weight - deq).abs() <= _group_steps(weight, 32) / 2 * (1 + 1e-4) + 1e-7)
    assert torch.all(low >= 1.0)


def test_real_int4_modules_compute_with_the_simulated_weight():
    model = MODELS["bert"]
    for layer in LAYERS["bert"]:
        module = model.get_submodule(layer.name)
        if layer.kind == "embedding":
            real = Int4Embedding(module.weight, module.padding_idx, 64)
        else:
            real = Int4Linear(module.weight, module.bias, 64)
        expected = simulated_weight(fingerprint(model), layer.name, "int4", module.weight, 64,
                                    embedding=layer.kind == "embedding")
        assert torch.equal(effective_weight(real), expected), layer.name


@pytest.mark.parametrize("cols", [1, 7, 32, 33])
def test_nibble_packing_round_trips(cols):
    q = torch.randint(0, 16, (3, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(cols))
    packed = pack_nibbles(q)
    assert packed.shape == (3, (cols + 1) // 2)
    assert torch.equal(unpack_nibbles(packed, cols), q)


# ---- simulated and real agree --------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("precision, atol", [("int8", 2e-3), ("int4", 1e-5), ("fp16", 1e-3), ("bf16", 5e-3)])
def test_simulated_and_real_agree_on_tiny_models(family, precision, atol):
    model = MODELS[family]
    inputs = _inputs(seed=5, batch=16, length=20)
    simulated = _logits(apply_plan(model, Plan.uniform(precision), "simulated"), inputs)
    real = _logits(apply_plan(model, Plan.uniform(precision), "real"), inputs)
    fp32 = _logits(model, inputs)
    assert torch.allclose(simulated, real, atol=atol, rtol=0), (simulated - real).abs().max()
    # the two paths agree much better than either agrees with FP32 (for the integer formats)
    if precision.startswith("int"):
        assert (simulated - real).abs().max() < (simulated - fp32).abs().max()


def test_embedded_int8_simulated_and_real_agree(embedded):
    from engine.data.sets import load_dataset
    from engine.evaluation.evaluator import Evaluator

    model, tokenizer = embedded
    evaluator = Evaluator(model, tokenizer, load_dataset("embedded"))
    assert len(evaluator.dataset) >= 1000
    simulated, _ = evaluator.run(Plan.uniform("int8"), "simulated")
    real, _ = evaluator.run(Plan.uniform("int8"), "real")
    agreement = float(np.mean(simulated.predictions == real.predictions))
    assert agreement >= 0.995, agreement
    difference = np.abs(simulated.logits - real.logits)
    spread = np.abs(simulated.logits - evaluator.baseline_logits)
    assert float(np.median(difference)) < 0.05, float(np.median(difference))
    assert float(np.median(difference)) < float(np.median(spread))


# ---- sizes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_real_files_are_smaller(family):
    model = MODELS[family]
    sizes = {p: model_size_bytes(model, Plan.uniform(p) if p != "fp32" else FP32)
             for p in ("fp32", "fp16", "int8", "int4")}
    assert sizes["int4"] < sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    # the tiny model is almost all embedding table (32 values a row): int8 rows carry 8 bytes of scale and offset
    assert sizes["int8"] < 0.4 * sizes["fp32"]


def test_embedded_int8_file_is_much_smaller(embedded):
    model, _ = embedded
    fp32 = model_size_bytes(model, FP32)
    int8 = model_size_bytes(model, Plan.uniform("int8"))
    assert int8 <= 0.28 * fp32, (int8, fp32)
