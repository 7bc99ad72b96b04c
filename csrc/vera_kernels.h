// Launchers of the CUDA kernels: plain C++ with raw pointers and no torch
// headers, so the .cu files compile quickly; bindings.cpp wraps them as ops.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include <vector>

#include "philox.cuh"

#ifdef VERA_CUDA_EMULATION
#include "cuda_emulation.h"  // the kernels on the CPU (docs/design.md §7)
#endif

namespace vera {

enum class DType : int { kHalf, kBFloat16, kFloat, kDouble };

// Token rows per thread block: the reuse factor of a generated tile, and the
// row count behind each partial sum of the reducing epilogues.
constexpr int kBlockM = 64;

// Where a kernel takes the projection from: generated in the kernel from the
// key (workspace == nullptr), or loaded from a materialized workspace.
struct ProjectionSource {
  const void* workspace;
  int64_t stride_row, stride_col;
  uint32_t key0, key1;
  float bound;
  int stream;  // 0: A, 1: B
  // Generated: the block's origin in the full spec matrix (a tensor-parallel
  // shard's); col0 is a multiple of 4, so each Philox call still fills four columns.
  int64_t row0, col0;
};

enum class Epilogue : int {
  kStore,           // out = acc * out_scale[n] + base[m, n]   (scale / base optional;
                    //   base scaled by base_scale, shifted by base_bias: DVoRA)
  kStoreReduceAux,  // both: store as kStore, and reduce as kReduceAux
  kReduceAux,       // partial[m_tile, n] = Σ_rows acc * aux[m, n]; nothing stored
};

// How fp32 products run (GemmParams::precision), torch's float32 matmul
// precision: kIeee ("highest") with SIMT FMAs, kTf32 (below it) on tensor
// cores, operands rounded to TF32 (10-bit mantissa), fp32 accumulators; TF32
// needs sm_80, so kTf32 runs the SIMT path on sm_75. Other dtypes ignore it.
enum class Precision : int { kIeee, kTf32 };

// Adapter dropout (GemmParams::dropout), on the features of either operand;
// rows are token rows in both cases. Each mode is its own kernel
// instantiation, so kNone is exactly the kernel without dropout.
enum class Dropout : int {
  kNone,
  kX,    // x's columns: each loaded x element times its factor (h = dropout(x) Aᵀ)
  kOut,  // the output's columns: acc times its factor before it is stored (dx)
};

// One call's dropout as a launch takes it. The seed's key words stay in
// device memory, where they were drawn (inside a CUDA graph, each replay
// draws new ones); each thread reads them once into a DropoutMask (philox.cuh).
struct DropoutArgs {
  const int64_t* key;  // the call seed's two key words; the low 32 bits of each count
  uint32_t threshold;
  float scale;
};

// acc (M x N) = (x ⊙ x_scale) (M x K) @ T (K x N), with
// T(k, n) = P(n, k) if transposed else P(k, n), P the projection.
//
// Adapter banks: with row_ids set, x_scale and out_scale are banks
// (n_adapters x K, n_adapters x N, unit column stride) and row m is scaled by
// bank row row_ids[m], or by 0 where that id is -1 (no adapter). Ids must be
// in [-1, n_adapters): the kernel does not check them.
struct GemmParams {
  const void* x;
  int64_t stride_xm, stride_xk;
  const void* x_scale;  // (K,), a bank, or nullptr
  int64_t stride_sx;    // x_scale bank row stride (unused without row_ids)
  ProjectionSource proj;
  bool transposed;
  void* out;
  int64_t stride_om, stride_on;
  const void* out_scale;  // (N,), a bank, or nullptr
  int64_t stride_so;      // out_scale bank row stride (unused without row_ids)
  const int32_t* row_ids;  // (M,) bank row of each token row, or nullptr (one adapter)
  const void* base;        // (M, N) or nullptr
  int64_t stride_bm, stride_bn;
  // DVoRA (only with base): base enters as s ⊙ (base - bias) + bias. s is (N,) or, with
  // row_ids, a bank (row id -1: s = 1), in the accumulation type (float; double for
  // kDouble): a scale near 1 rounded to half precision would lose the magnitude's
  // small changes. bias (N,) in the compute type, or nullptr (zero).
  const void* base_scale;
  int64_t stride_bs;  // base_scale bank row stride (unused without row_ids)
  const void* base_bias;
  const void* aux;  // (M, N) for the reducing epilogues
  int64_t stride_am, stride_an;
  void* partial;  // (ceil(M / kBlockM), N), float (double for kDouble)
  int64_t M, N, K;
  Epilogue epilogue;
  Precision precision;  // fp32 only
  Dropout dropout;   // applied before x_scale (kX) or before out_scale and base (kOut);
  DropoutArgs drop;  // reductions use the undropped acc, as the Triton kernel does
};

cudaError_t gemm(DType dtype, const GemmParams& params, cudaStream_t stream);

// Writes the block [row0 : +rows, col0 : +cols] of projection `matrix`
// (contiguous) in `dtype`; col0 is a multiple of 4.
cudaError_t generate_projection(DType dtype, void* out, int64_t rows, int64_t cols, int64_t row0,
                                int64_t col0, uint32_t key0, uint32_t key1, float bound,
                                int matrix, cudaStream_t stream);

// Whether the current device can run these kernels: cudaSuccess when the
// library holds a cubin for its architecture or PTX the driver compiles for
// it, else the error a launch would fail with (cudaErrorNoKernelImageForDevice,
// cudaErrorUnsupportedPtxVersion, ...), cleared so later launches do not see it.
cudaError_t kernel_image_status();

// The architectures nvcc compiled the kernels for (its __CUDA_ARCH_LIST__:
// 750 is sm_75), whether each was kept as a cubin, PTX or both.
std::vector<int64_t> compiled_archs();

}  // namespace vera
