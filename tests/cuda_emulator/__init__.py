"""CPU emulator of the CUDA kernels in xla_ffi/sapa_cuda.cu (used by tests/test_cuda_emulated.py)."""
