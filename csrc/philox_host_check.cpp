// Host-side check of philox.cuh, built by tests/test_cuda_backend.py with the
// C++ compiler (no GPU needed):
//
//   philox_host_check kat C0 C1 C2 C3 K0 K1     -> the four Philox words (hex)
//   philox_host_check matrix M ROWS COLS SEED   -> the projection's float32 bit patterns (hex),
//                                                  one row per line
//   philox_host_check dropout ROWS COLS SEED THRESHOLD SCALE_BITS
//                                               -> the dropout factors keep * scale (float32
//                                                  bits, hex) of token rows x features, one
//                                                  Philox call per 8 features as the kernels
//                                                  make them; SCALE_BITS: the scale's bits
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "philox.cuh"

namespace {

uint64_t arg(const char* text) { return std::strtoull(text, nullptr, 0); }

uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 8 && std::strcmp(argv[1], "kat") == 0) {
    const vera::PhiloxWords w = vera::philox4x32_10(
        static_cast<uint32_t>(arg(argv[2])), static_cast<uint32_t>(arg(argv[3])),
        static_cast<uint32_t>(arg(argv[4])), static_cast<uint32_t>(arg(argv[5])),
        static_cast<uint32_t>(arg(argv[6])), static_cast<uint32_t>(arg(argv[7])));
    std::printf("%08x %08x %08x %08x\n", w.w[0], w.w[1], w.w[2], w.w[3]);
    return 0;
  }
  if (argc == 6 && std::strcmp(argv[1], "matrix") == 0) {
    const int matrix = static_cast<int>(arg(argv[2]));
    const uint64_t rows = arg(argv[3]), cols = arg(argv[4]), seed = arg(argv[5]);
    const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
    const float bound = static_cast<float>(std::sqrt(6.0 / static_cast<double>(cols)));
    for (uint64_t row = 0; row < rows; ++row) {
      for (uint64_t col = 0; col < cols; ++col) {
        const vera::PhiloxWords w = vera::projection_words(
            matrix, static_cast<uint32_t>(row), static_cast<uint32_t>(col / 4), key0, key1);
        std::printf("%s%08x", col ? " " : "", float_bits(vera::projection_value(w.w[col % 4], bound)));
      }
      std::printf("\n");
    }
    return 0;
  }
  if (argc == 7 && std::strcmp(argv[1], "dropout") == 0) {
    const uint64_t rows = arg(argv[2]), cols = arg(argv[3]), seed = arg(argv[4]);
    const uint32_t scale_bits = static_cast<uint32_t>(arg(argv[6]));
    vera::DropoutMask mask = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                              static_cast<uint32_t>(arg(argv[5])), 0.0f};
    std::memcpy(&mask.scale, &scale_bits, sizeof mask.scale);
    for (uint64_t row = 0; row < rows; ++row) {
      for (uint64_t group = 0; group * 8 < cols; ++group) {
        const vera::PhiloxWords w = vera::dropout_words(mask, static_cast<uint32_t>(row),
                                                        static_cast<uint32_t>(group));
        for (uint64_t col = group * 8; col < cols && col < group * 8 + 8; ++col)
          std::printf("%s%08x", col ? " " : "",
                      float_bits(vera::dropout_factor(mask, w, static_cast<int>(col % 8))));
      }
      std::printf("\n");
    }
    return 0;
  }
  std::fprintf(stderr, "usage: %s kat C0 C1 C2 C3 K0 K1 | matrix M ROWS COLS SEED | "
               "dropout ROWS COLS SEED THRESHOLD SCALE_BITS\n", argv[0]);
  return 2;
}
