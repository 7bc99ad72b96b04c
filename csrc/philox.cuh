// The projection spec (docs/design.md) for host and device: Philox4x32-10 and
// the mapping from a Philox word to a projection value.
//
// Plain C++ when not compiled by nvcc, so a host program (tests) can check it
// bit for bit against vera_kernels.projection without a GPU.
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#define VERA_HD __host__ __device__ __forceinline__
#else
#define VERA_HD inline
#endif

namespace vera {

struct PhiloxWords {
  uint32_t w[4];
};

// (hi, lo) halves of the 64-bit product a * b.
VERA_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#ifdef __CUDA_ARCH__
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
#endif
}

// Random123's Philox4x32-10: counter (c0..c3), key (k0, k1).
VERA_HD PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                  uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  PhiloxWords out = {{c0, c1, c2, c3}};
  return out;
}

// float32(w >> 8) * 2^-23 - 1, then one float32 multiply by the bound. The
// rounded multiply keeps nvcc from contracting it into a neighbouring FMA.
VERA_HD float projection_value(uint32_t word, float bound) {
  const float v = static_cast<float>(word >> 8) * 1.1920928955078125e-07f - 1.0f;  // exact
#ifdef __CUDA_ARCH__
  return __fmul_rn(v, bound);
#else
  return v * bound;
#endif
}

// The four consecutive columns 4*group .. 4*group+3 of row `row` of matrix
// `stream` (0: A, 1: B) for seed (key0 = low word, key1 = high word).
VERA_HD PhiloxWords projection_words(int stream, uint32_t row, uint32_t group, uint32_t key0,
                                     uint32_t key1) {
  return philox4x32_10(group, row, static_cast<uint32_t>(stream), 0u, key0, key1);
}

}  // namespace vera
