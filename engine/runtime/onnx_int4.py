"""Write a weight method's int4 integers into MatMulNBits nodes, so the exported graph computes them verbatim.

MatMulNBitsQuantizer (engine.runtime.onnx_graph.int4_weight_only) writes round-to-nearest integers; GPTQ and
HQQ (engine.quant.int4_methods) choose others. MatMulNBits' layout, as MLAS's quantizer writes it: B is
uint8 [N, n_blocks, block_size / 2], blocks along K, two 4-bit values a byte, the low nibble first;
scales [N, n_blocks]; zero_points uint8 [N, ceil(n_blocks / 2)], two a byte the same way, or, when they are
fractional (HQQ), float [N, n_blocks] of the scales' type. MatMul's weight is [K, N] = W^T, so a node's
N rows are the Linear's output rows and its blocks run along the Linear's input dimension.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from engine.core.errors import EngineError
from engine.core.numerics import pack_nibbles
from engine.core.vocabulary import Runtime
from engine.quant.int4_methods import Int4Weights


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _node_integers(node: onnx.NodeProto, weights: Int4Weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, scales as float32 [N, n_blocks], zero points) for `node`, checked against its attributes."""
    k, n, block = _attribute(node, "K"), _attribute(node, "N"), _attribute(node, "block_size")
    if weights.runtime != Runtime.ONNXRUNTIME:
        raise EngineError(f"{node.name}: MatMulNBits takes int4 integers on ONNX Runtime's grid, "
                          f"not {Runtime(weights.runtime).label}'s")
    if tuple(weights.q.shape) != (n, k) or weights.group_size != block:
        raise EngineError(f"{node.name}: MatMulNBits is [N={n}, K={k}] in blocks of {block}, the integers are "
                          f"{list(weights.q.shape)} in groups of {weights.group_size}")
    blocks = -(-k // block)
    # a partial last block's missing elements are written as 0, as MLAS's quantizer writes them (no input meets them)
    q = F.pad(weights.q, (0, blocks * block - k)).reshape(n, blocks, block)
    zero = weights.offset
    if torch.equal(zero, torch.round(zero)) and 0 <= float(zero.min()) <= float(zero.max()) <= 15:
        # an odd last nibble of a row holds 8, MatMulNBits' default zero point, as MLAS's quantizer writes it
        zero = pack_nibbles(F.pad(zero, (0, blocks % 2), value=8.0).to(torch.uint8))
    return pack_nibbles(q).numpy(), weights.scale.numpy(), zero.numpy()


def write_int4(model: onnx.ModelProto, weights: dict[str, Int4Weights]) -> None:
    """Overwrite, in place, the B, scales and zero_points of each named MatMulNBits node (MatMulNBitsQuantizer
    names it `<MatMul name>_Q4`) with `weights[name]`, so the node computes x @ weights[name].values()^T."""
    nodes = {node.name: node for node in model.graph.node if node.op_type == "MatMulNBits"}
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    for name, chosen in weights.items():
        if name not in nodes:
            raise EngineError(f"no MatMulNBits node named {name!r} in the graph")
        node = nodes[name]
        if len(node.input) < 4 or not node.input[3]:
            raise EngineError(f"{name}: MatMulNBits without zero points (symmetric) cannot hold asymmetric int4")
        b, scales, zero = _node_integers(node, chosen)
        b_name, scales_name, zero_name = node.input[1:4]
        scale_type = onnx.helper.tensor_dtype_to_np_dtype(initializers[scales_name].data_type)
        shape = tuple(initializers[scales_name].dims)  # [N, n_blocks] from the default quantizer, flat from HQQ's
        new = {b_name: b, scales_name: scales.astype(scale_type).reshape(shape),
               # integer zero points: the packed uint8 tensor; fractional ones: floats of the scales' type
               zero_name: zero if zero.dtype == np.uint8 else zero.astype(scale_type).reshape(shape)}
        for tensor_name, array in new.items():
            initializers[tensor_name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), tensor_name))
