"""torchao's CUDA kernels (checked on the CPU where they can be), and the CUDA model against the simulated one (on
a GPU only)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.core.qmodules import Int4Linear, SimLinear
from engine.core.torch_int8 import int8_linear_weight, torch_int8_embedding
from engine.kernels import cuda
from engine.kernels.registry import kernel_notes
from engine.quant.apply import apply_plan
from engine.runtime.device import model_on

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_torchao_int8_has_torchs_weights_and_one_more_activation_bit():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).requires_grad_(False)
    before = linear.weight.clone()
    converted = cuda.int8_linear(linear.weight, linear.bias, torch.device("cuda"))
    assert torch.equal(converted.weight.dequantize().cpu(), int8_linear_weight(linear.weight))
    assert torch.equal(linear.weight, before)  # the source layer is untouched
    x = torch.randn(3, 7, 64)
    exact = linear(x)
    simulated = SimLinear(int8_linear_weight(linear.weight), linear.bias, "int8")(x)
    assert (converted(x.cuda()).cpu() - exact).abs().max() <= (simulated - exact).abs().max() * 1.5


def test_int8_embedding_equals_torchs_quantized_table():
    torch.manual_seed(0)
    embedding = nn.Embedding(100, 24)
    ids = torch.randint(0, 100, (4, 9))
    kept = cuda.int8_embedding(embedding.weight, None, torch.device("cpu"))  # the GPU's table, built on the CPU
    assert torch.allclose(kept(ids), torch_int8_embedding(embedding.weight)(ids), atol=1e-6)


def test_int4_falls_back_with_a_reason():
    cpu = torch.device("cpu")
    assert "group sizes" in cuda.int4_unsupported_reason(96, 48, cpu)
    assert "not a multiple of the group size 64" in cuda.int4_unsupported_reason(96, 64, cpu)
    linear = nn.Linear(128, 16)
    fallback = cuda.int4_linear(linear.weight, linear.bias, 64, cpu)
    assert isinstance(fallback, Int4Linear) and "needs a CUDA device" in kernel_notes(fallback)[0]


@needs_cuda
def test_cuda_real_kernels_track_the_simulated_model(tiny_bert, tokenizer):
    model = model_on(tiny_bert, torch.device("cuda"))
    inputs = tokenizer(["a fine film", "dull and long"], return_tensors="pt", padding=True).to("cuda")
    for precision in ("int8", "int4", "fp16", "bf16"):
        real = apply_plan(model, precision, "real")(**inputs).logits
        simulated = apply_plan(model, precision, "simulated")(**inputs).logits
        assert torch.allclose(real.float(), simulated.float(), atol=5e-2), precision
    notes = kernel_notes(apply_plan(model, "int8", "real"))
    assert any("classifier" in note or "2x" in note for note in notes)
