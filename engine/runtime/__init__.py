"""Runtimes other than torch: export a plan to ONNX Runtime, run it, and simulate its numerics."""
