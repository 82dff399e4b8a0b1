"""An exported folder run on another CPU's instructions, under QEMU's user-mode emulation: what the same
model.onnx computes on an AVX2 machine without VNNI, checked from any x86 machine.

QEMU's TCG (7.2) emulates AVX2 but not AVX-512, so an AVX2 CPU (its `Haswell` model) is the one target it
can stand in for; ONNX Runtime reads the emulated CPUID and picks its AVX2 kernels, the saturating u8s8
GEMM among them (engine.core.cpu). The child process imports only numpy and onnxruntime (torch would take
a minute to import under emulation), runs the given batches one thread at a time, and first checks that the
CPU it sees really saturates: 255 x 127 twice is 64,770 exactly and 32,767 on a saturating path.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.core.cpu import TargetCpu
from engine.core.errors import EngineError

QEMU = "qemu-x86_64"
QEMU_MODELS = {TargetCpu.AVX2: "Haswell"}

_CHILD = r"""
import json, sys
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

folder, inputs, outputs = sys.argv[1:4]
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
options.log_severity_level = 3
probe = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
                          [numpy_helper.from_array(np.array([[127], [127]], np.int8), "b")])
model = helper.make_model(probe, opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 9
product = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
    None, {"a": np.array([[255, 255]], np.uint8)})[0]
session = ort.InferenceSession(folder + "/model.onnx", options, providers=["CPUExecutionProvider"])
feeds = np.load(inputs)
logits = {}
for key in sorted(k for k in feeds.files if k.startswith("ids")):
    index = key[3:]
    logits[f"logits{index}"] = session.run(None, {"input_ids": feeds[key], "attention_mask": feeds[f"mask{index}"]})[0]
np.savez(outputs, **logits)
print(json.dumps({"probe": int(product[0, 0]), "saturates": int(product[0, 0]) != 255 * 127 * 2}))
"""


class EmulationError(EngineError):
    """The emulated run cannot be made here (no QEMU, no model for that CPU, the child failed)."""


def available() -> bool:
    return shutil.which(QEMU) is not None


def emulated_logits(folder: str | Path, batches: Sequence[tuple[np.ndarray, np.ndarray]],
                    target: TargetCpu = TargetCpu.AVX2, timeout: float = 1800) -> tuple[list[np.ndarray], bool]:
    """(the folder's logits per (input_ids, attention_mask) batch on `target`, whether that CPU's int8 GEMM
    saturated the probe)."""
    if target not in QEMU_MODELS:
        names = ", ".join(t.value for t in QEMU_MODELS)
        raise EmulationError(f"QEMU cannot emulate a {target.value} CPU (only {names})")
    if not available():
        raise EmulationError(f"{QEMU} is not installed (Debian: apt-get install qemu-user)")
    with tempfile.TemporaryDirectory(prefix="emulated-cpu-") as scratch:
        inputs, outputs = Path(scratch) / "in.npz", Path(scratch) / "out.npz"
        np.savez(inputs, **{f"{kind}{i}": np.asarray(array, np.int64) for i, (ids, mask) in enumerate(batches)
                            for kind, array in (("ids", ids), ("mask", mask))})
        command = [QEMU, "-cpu", QEMU_MODELS[target], sys.executable, "-c", _CHILD, str(folder), str(inputs),
                   str(outputs)]
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise EmulationError(f"the emulated {target.value} run failed: {last[:200]}")
        report = json.loads(run.stdout.strip().splitlines()[-1])
        logits = np.load(outputs)
        return [logits[f"logits{i}"] for i in range(len(batches))], bool(report["saturates"])
