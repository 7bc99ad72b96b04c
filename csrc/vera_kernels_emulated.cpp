// vera_kernels.cu for the host C++ compiler, built with VERA_CUDA_EMULATION
// defined: the same kernels, run by cuda_emulation.h (vera_kernels/backends/cuda.py).
#include "vera_kernels.cu"
