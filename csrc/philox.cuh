// The projection spec (docs/design.md) for host and device: Philox4x32-10, the
// mapping from a Philox word to a projection value, and the adapter dropout
// mask (vera_kernels/dropout.py).
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

// One call's adapter dropout (vera_kernels/dropout.py, DropoutMask): feature j
// of token row t is kept, and scaled by `scale`, when its 16-bit draw is
// >= threshold. threshold and scale come from the Python side as they are
// (round(p * 65536) and float32(65536 / (65536 - threshold))), so the spec's
// arithmetic lives in one place.
struct DropoutMask {
  uint32_t key0, key1;  // the call seed's low and high words
  uint32_t threshold;
  float scale;
};

// The Philox words holding the draws of features 8*group .. 8*group+7 of token
// row `row`: counter (group, row, 2, 0), the stream after A (0) and B (1).
VERA_HD PhiloxWords dropout_words(const DropoutMask& mask, uint32_t row, uint32_t group) {
  return philox4x32_10(group, row, 2u, 0u, mask.key0, mask.key1);
}

// keep * scale of feature 8*group + i (i in [0, 8)) from that group's words:
// its draw is the 16-bit half (i & 1) of word (i >> 1). The word is picked
// with selects, not w.w[i >> 1], so a run-time i keeps w in registers.
VERA_HD float dropout_factor(const DropoutMask& mask, const PhiloxWords& w, int i) {
  const uint32_t word = (i & 4) ? ((i & 2) ? w.w[3] : w.w[2]) : ((i & 2) ? w.w[1] : w.w[0]);
  const uint32_t draw = (i & 1) ? word >> 16 : word & 0xFFFFu;
  return draw >= mask.threshold ? mask.scale : 0.0f;
}

}  // namespace vera
