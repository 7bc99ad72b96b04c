// Adapter dropout on the CPU, compiled: the `vera_kernels_host` op library.
//
//   apply_dropout_(Tensor(a!) t, Tensor key, int row_start, int threshold, float scale) -> ()
//
// multiplies token row r (= row_start + row of t) and feature j of t (tokens x
// features, contiguous rows) in place by keep * scale, the spec's mask
// (vera_kernels/dropout.py) for the call seed whose Philox key words `key`
// (int64[2] on the CPU: low, high) holds: the same philox.cuh the CUDA kernels
// use, one Philox call per 8 features. The product is taken in float32 (float64
// for double) and rounded once to t's dtype, as the torch implementation does,
// so the two agree bit for bit. The torch implementation spends ~20 passes of
// int64 tensor ops over the counters; this is one pass, over all cores.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "philox.cuh"

namespace {

template <typename scalar_t, typename acc_t>
void apply_rows(scalar_t* data, int64_t rows, int64_t cols, int64_t row_start,
                const vera::DropoutMask& mask) {
  const int64_t groups = (cols + 7) / 8;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = data + r * cols;
      const uint32_t token = static_cast<uint32_t>(row_start + r);
      for (int64_t g = 0; g < groups; ++g) {
        const vera::PhiloxWords w = vera::dropout_words(mask, token, static_cast<uint32_t>(g));
        const int64_t first = 8 * g;
        const int n = static_cast<int>(std::min<int64_t>(8, cols - first));
        for (int i = 0; i < n; ++i) {
          const acc_t factor = static_cast<acc_t>(vera::dropout_factor(mask, w, i));
          row[first + i] = static_cast<scalar_t>(static_cast<acc_t>(row[first + i]) * factor);
        }
      }
    }
  });
}

void apply_dropout_(at::Tensor t, const at::Tensor& key, int64_t row_start, int64_t threshold,
                    double scale) {
  TORCH_CHECK(t.device().is_cpu() && key.device().is_cpu(), "apply_dropout_ runs on CPU tensors");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(),
              "apply_dropout_ takes a contiguous (tokens, features) tensor, got strides ",
              t.strides());
  TORCH_CHECK(key.scalar_type() == at::kLong && key.numel() == 2,
              "apply_dropout_'s key is int64[2] (low, high words), got ", key.scalar_type(), " ",
              key.sizes());
  const at::Tensor key_words = key.contiguous();  // alive while its words are read
  const int64_t* words = key_words.data_ptr<int64_t>();
  const vera::DropoutMask mask{static_cast<uint32_t>(words[0]), static_cast<uint32_t>(words[1]),
                               static_cast<uint32_t>(threshold), static_cast<float>(scale)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "apply_dropout_", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    apply_rows<scalar_t, acc_t>(t.data_ptr<scalar_t>(), t.size(0), t.size(1), row_start, mask);
  });
}

}  // namespace

TORCH_LIBRARY(vera_kernels_host, m) {
  m.def("apply_dropout_(Tensor(a!) t, Tensor key, int row_start, int threshold, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(vera_kernels_host, CPU, m) { m.impl("apply_dropout_", &apply_dropout_); }
