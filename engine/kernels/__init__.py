"""The real kernels each precision runs on each device (torch's on the CPU, torchao's on NVIDIA GPUs), registered
per (precision, device type) apart from the precision registry, which keeps the simulation and the byte counts."""
