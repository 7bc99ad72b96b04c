// Checks of cuda_emulation.h's model on small kernels, independent of
// vera_kernels.cu: prints "<check> ok" or "<check> FAIL ..." per check
// (tests/test_cuda_emulation.py builds it with the host compiler and runs it).
//
//   c++ -std=c++17 -O1 -Wall -Werror -DVERA_CUDA_EMULATION -Icsrc
//       -I$CUDA_HOME/include csrc/cuda_emulation_check.cpp
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "cuda_emulation.h"

namespace {

constexpr int kThreads = 32;

int failures = 0;

void report(const char* check, bool ok, const char* detail = "") {
  std::printf("%s %s%s\n", check, ok ? "ok" : "FAIL ", ok ? "" : detail);
  failures += !ok;
}

// Each thread reads what its neighbour wrote before the barrier, in its own block.
__global__ void rotate(int* out) {
  __shared__ int values[kThreads];
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int block = blockIdx.y * gridDim.x + blockIdx.x;
  values[t] = block * 1000 + t;
  __syncthreads();
  out[block * kThreads + t] = values[(t + 1) % kThreads];
}

// Barriers in a loop while half the block has returned: they count as arrived.
__global__ void rounds_after_exits(int* out) {
  __shared__ int total;
  const int t = threadIdx.x;
  if (t >= kThreads / 2) return;
  if (t == 0) total = 0;
  for (int round = 0; round < 3; ++round) {
    __syncthreads();
    if (t == round) total += 1 << round;
    __syncthreads();
  }
  out[t] = total;
}

// One warp's 16 x 16 x 16 product on (emulated) tensor cores, from shared memory.
__global__ void wmma_product(const __half* a, const __half* b, float* c) {
  __shared__ __align__(32) __half a_tile[16 * 16];
  __shared__ __align__(32) __half b_tile[16 * 16];
  for (int i = threadIdx.x; i < 256; i += kThreads) {
    a_tile[i] = a[i];
    b_tile[i] = b[i];
  }
  __syncthreads();
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::col_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 1.0f);
  wmma::load_matrix_sync(fa, a_tile, 16);
  wmma::load_matrix_sync(fb, b_tile, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}

// The same at TF32 precision: 16 x 16 x 8, operands rounded as the kernels round them.
__global__ void wmma_tf32_product(const float* a, const float* b, float* c) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}

__global__ void nothing() {}

void check_rotate() {
  const dim3 grid(3, 2), block(8, 4);
  std::vector<int> out(6 * kThreads, -1);
  VERA_LAUNCH(grid, block, 0, nullptr, rotate)(out.data());
  bool ok = cudaGetLastError() == cudaSuccess;
  for (int b = 0; b < 6; ++b)
    for (int t = 0; t < kThreads; ++t) ok &= out[b * kThreads + t] == b * 1000 + (t + 1) % kThreads;
  report("rotate", ok);
}

void check_rounds_after_exits() {
  std::vector<int> out(kThreads, -1);
  VERA_LAUNCH(2, kThreads, 0, nullptr, rounds_after_exits)(out.data());
  bool ok = true;
  for (int t = 0; t < kThreads; ++t) ok &= out[t] == (t < kThreads / 2 ? 7 : -1);
  report("rounds_after_exits", ok);
}

void check_wmma() {
  // Small integers: every product and sum is exact, whatever the order.
  std::vector<__half> a(256), b(256);
  for (int i = 0; i < 256; ++i) {
    a[i] = __float2half_rn(static_cast<float>(i % 7 - 3));
    b[i] = __float2half_rn(static_cast<float>(i % 5 - 2));
  }
  std::vector<float> c(256);
  VERA_LAUNCH(1, kThreads, 0, nullptr, wmma_product)(a.data(), b.data(), c.data());
  bool ok = true;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float expected = 1.0f;
      for (int k = 0; k < 16; ++k)  // a column-major (m + 16 k), b row-major (16 k + n)
        expected += __half2float(a[m + 16 * k]) * __half2float(b[16 * k + n]);
      ok &= c[m * 16 + n] == expected;
    }
  report("wmma", ok);
}

float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

void check_tf32() {
  using nvcuda::wmma::__float_to_tf32;
  const float inf = std::numeric_limits<float>::infinity();
  const float tie = 1.0f + std::ldexp(1.0f, -11);  // half a TF32 ulp above 1
  bool ok = __float_to_tf32(tie) == 1.0f + std::ldexp(1.0f, -10)  // ties away from zero
            && __float_to_tf32(-tie) == -(1.0f + std::ldexp(1.0f, -10))
            && __float_to_tf32(std::nextafter(tie, 0.0f)) == 1.0f
            && __float_to_tf32(bits_to_float(0x7F7FFFFFu)) == inf  // FLT_MAX rounds up
            && __float_to_tf32(-inf) == -inf && std::isnan(__float_to_tf32(NAN));
  // 1 + 2^-12 rounds to 1: each product below is then the small integer i % 3 * (j % 5 - 2).
  std::vector<float> a(16 * 8), b(8 * 16), c(256);
  for (int i = 0; i < 128; ++i) {
    a[i] = __float_to_tf32(static_cast<float>(i % 3) * (1.0f + std::ldexp(1.0f, -12)));
    b[i] = static_cast<float>(i % 5 - 2);
  }
  VERA_LAUNCH(1, kThreads, 0, nullptr, wmma_tf32_product)(a.data(), b.data(), c.data());
  ok &= cudaGetLastError() == cudaSuccess;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float expected = 0.0f;
      for (int k = 0; k < 8; ++k)  // a column-major (m + 16 k), b row-major (16 k + n)
        expected += static_cast<float>((m + 16 * k) % 3) * b[16 * k + n];
      ok &= c[m * 16 + n] == expected;
    }
  report("tf32", ok);
}

void check_invalid_launches() {
  VERA_LAUNCH(1, 2048, 0, nullptr, nothing)();
  const bool too_many = cudaGetLastError() == cudaErrorInvalidConfiguration;
  const bool cleared = cudaGetLastError() == cudaSuccess;
  VERA_LAUNCH(1, kThreads, 1024, nullptr, nothing)();
  const bool dynamic_shared = cudaGetLastError() == cudaErrorInvalidConfiguration;
  report("invalid_launches", too_many && cleared && dynamic_shared);
}

}  // namespace

int main() {
  check_rotate();
  check_rounds_after_exits();
  check_wmma();
  check_tf32();
  check_invalid_launches();
  return failures == 0 ? 0 : 1;
}
