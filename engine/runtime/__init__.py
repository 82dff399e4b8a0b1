"""Runtimes: where a plan runs for real (torch on CPU or CUDA; ONNX Runtime), its size and its latency."""
