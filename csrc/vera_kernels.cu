// CUDA kernels of the `cuda` backend: one tiled GEMM shape serves every VeRA
// product (as the Triton kernels do, see vera_kernels/backends/triton/kernels.py):
//
//   forward   h  = x Aᵀ                 T = Aᵀ   (transposed)
//             y  = (h ⊙ d) Bᵀ ⊙ b + base T = Bᵀ   (transposed)
//   backward  u  = (g ⊙ b) B, dd = Σ u⊙h T = B
//             dx = (u ⊙ d) A             T = A
//             db = Σ g ⊙ ((h ⊙ d) Bᵀ)    T = Bᵀ, nothing stored
//
// A 256-thread block owns a 64 x 64 output tile and walks K in steps of 16.
// Each step it fills a 16 x 64 tile of T in shared memory, generated from the
// seed (one Philox call per four elements, reused by all 64 token rows of the
// block) or loaded from a per-launch workspace (reuse across all tokens; the
// host picks, see docs/design.md, cost model), then the block multiplies the
// two tiles (BlockMma): fp16 and bf16 on tensor cores (WMMA m16n16k16, fp32
// accumulators; bf16 from sm_80, SIMT on sm_75), fp32 at TF32 precision too
// (WMMA m16n16k8, sm_80+), fp32 at IEEE precision and fp64 with SIMT FMAs,
// every thread accumulating 4 x 4 outputs in fp32 (fp64 for double).
// This is the fallback for machines without Triton. Token reductions are
// per-block partial rows summed in a fixed order: deterministic, no atomics.
// No torch headers here.
//
// Adapter banks (GemmParams::row_ids): each token row gathers its own x_scale
// and out_scale row. That mode is a separate instantiation (kBanked), so the
// single-adapter kernel is exactly the code it was, with no per-row branch.
//
// Adapter dropout (GemmParams::dropout) is a template parameter as well: the
// mask is regenerated from the dropout stream (philox.cuh) where it is used,
// on x's tiles as they load (forward h) or on the output tile (backward dx).
// Its seed is read from device memory where the mask is made.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "philox.cuh"
#include "vera_kernels.h"

// cuda_emulation.h, included by vera_kernels.h, has its own nvcuda::wmma and
// VERA_LAUNCH, which runs a launch on the CPU instead.
#ifndef VERA_CUDA_EMULATION
#include <mma.h>
#define VERA_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace vera {
namespace {

constexpr int kBlockN = 64;
constexpr int kBlockK = 16;
constexpr int kThreads = 256;  // 16 x 16, each owning 4 x 4 outputs

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// bf16 on sm_75, which has no cvt to bf16: cuda_bf16.h rounds in integer ops
// there instead, to nearest even as sm_80's cvt.rn does.
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }

// A projection value as the compute dtype sees it: rounded to T (RNE).
template <typename T>
__device__ __forceinline__ typename Acc<T>::type rounded(float value) {
  return to_acc(from_acc<T>(static_cast<typename Acc<T>::type>(value)));
}

// Fill tile[kk][nn] = T(k0 + kk, n0 + nn), as Mma::to_tile makes an entry.
// Out-of-range entries are finite garbage when generated (the x tile is zero
// there, or the output is not stored) and zero when loaded.
template <typename T, typename Mma>
__device__ void fill_projection_tile(typename Mma::TileT (*tile)[kBlockN], const GemmParams& p,
                                     int64_t k0, int64_t n0) {
  const int t = threadIdx.x;
  const ProjectionSource& src = p.proj;
  if (src.workspace == nullptr) {
    if (p.transposed) {
      // P row = n, P columns = k .. k+3: one Philox call fills four kk.
      const int nn = t % kBlockN, q = t / kBlockN;  // 64 x 4 groups
      const PhiloxWords w = projection_words(src.stream, static_cast<uint32_t>(src.row0 + n0 + nn),
                                             static_cast<uint32_t>((src.col0 + k0) / 4 + q),
                                             src.key0, src.key1);
#pragma unroll
      for (int i = 0; i < 4; ++i)
        tile[4 * q + i][nn] = Mma::to_tile(rounded<T>(projection_value(w.w[i], src.bound)));
    } else {
      // P row = k, P columns = n .. n+3: one Philox call fills four nn.
      const int kk = t / (kBlockN / 4), q = t % (kBlockN / 4);  // 16 x 16 groups
      const PhiloxWords w = projection_words(src.stream, static_cast<uint32_t>(src.row0 + k0 + kk),
                                             static_cast<uint32_t>((src.col0 + n0) / 4 + q),
                                             src.key0, src.key1);
#pragma unroll
      for (int i = 0; i < 4; ++i)
        tile[kk][4 * q + i] = Mma::to_tile(rounded<T>(projection_value(w.w[i], src.bound)));
    }
    return;
  }
  const T* ws = static_cast<const T*>(src.workspace);
#pragma unroll
  for (int i = 0; i < (kBlockK * kBlockN) / kThreads; ++i) {
    const int idx = t + i * kThreads;
    const int kk = idx / kBlockN, nn = idx % kBlockN;
    const int64_t k = k0 + kk, n = n0 + nn;
    typename Acc<T>::type v = 0;
    if (k < p.K && n < p.N) {
      const int64_t row = p.transposed ? n : k, col = p.transposed ? k : n;
      v = to_acc(ws[row * src.stride_row + col * src.stride_col]);
    }
    tile[kk][nn] = Mma::to_tile(v);
  }
}

// T's WMMA operands: the fragment element type, the MMA's depth, and the
// shared tiles' entries. fp16 and bf16: m16n16k16, the tiles hold T itself
// (exact: every entry is a T value).
template <typename T>
struct WmmaOperand {
  using Element = T;
  using TileT = T;
  static constexpr int kK = 16;
  __device__ __forceinline__ static T to_tile(float v) { return from_acc<T>(v); }
};

// Whether BlockMma runs T at kPrecision on tensor cores: fp16 from sm_70, bf16
// and fp32 at TF32 precision from sm_80 (their WMMA types need it), and all
// three in the emulation, which models WMMA.
template <typename T, Precision kPrecision>
struct UsesTensorCores : std::false_type {};
#if defined(VERA_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700)
template <Precision kPrecision>
struct UsesTensorCores<__half, kPrecision> : std::true_type {};
#endif
#if defined(VERA_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
template <Precision kPrecision>
struct UsesTensorCores<__nv_bfloat16, kPrecision> : std::true_type {};
template <>
struct UsesTensorCores<float, Precision::kTf32> : std::true_type {};

// fp32 at TF32 precision: m16n16k8. mma_sync's tf32 operands must be converted
// with __float_to_tf32 (CUDA programming guide): done once per entry as the
// tiles fill, not at every fragment load.
template <>
struct WmmaOperand<float> {
  using Element = nvcuda::wmma::precision::tf32;
  using TileT = float;
  static constexpr int kK = 8;
  __device__ __forceinline__ static float to_tile(float v) {
    return nvcuda::wmma::__float_to_tf32(v);
  }
};
#endif

// The block's 64 x 64 product, accumulated over the K steps from the shared
// tiles x_tile[kk][mm] and t_tile[kk][nn] (TileT, each entry written as
// to_tile makes it); result() gives each thread its 4 x 4 outputs, rows
// ty * 4 + i and columns tx * 4 + j, for the epilogue.
template <typename T, bool kTensorCores>
struct BlockMma;

// SIMT: each thread accumulates its own 4 x 4 outputs with FMAs.
template <typename T>
struct BlockMma<T, false> {
  using AccT = typename Acc<T>::type;
  using TileT = AccT;  // converted once, as the tiles fill, not per FMA
  AccT acc[4][4] = {};

  __device__ __forceinline__ static TileT to_tile(AccT v) { return v; }

  __device__ __forceinline__ void step(const TileT (*x_tile)[kBlockM],
                                       const TileT (*t_tile)[kBlockN], int ty, int tx) {
#pragma unroll
    for (int kk = 0; kk < kBlockK; ++kk) {
      AccT a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = x_tile[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = t_tile[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
  }

  __device__ __forceinline__ void result(AccT (&out)[4][4], int, int) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) out[i][j] = acc[i][j];
  }
};

// Tensor cores: warp w owns the 16 rows from 16 * (w % 4) and the 32 columns
// from 32 * (w / 4), two 16 x 16 fp32 fragments; each K step is kBlockK / kK
// MMAs per fragment (WmmaOperand<T>).
template <typename T>
struct BlockMma<T, true> {
  using Operand = WmmaOperand<T>;
  static constexpr int kK = Operand::kK;
  static_assert(kBlockK % kK == 0 && kBlockM == 64 && kBlockN == 64 && kThreads == 256,
                "8 warps of two 16 x 16 fragments cover the 64 x 64 step");
  using TileT = typename Operand::TileT;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kK, float> acc[2];

  __device__ __forceinline__ static TileT to_tile(float v) { return Operand::to_tile(v); }

  __device__ __forceinline__ BlockMma() {
    nvcuda::wmma::fill_fragment(acc[0], 0.0f);
    nvcuda::wmma::fill_fragment(acc[1], 0.0f);
  }

  __device__ __forceinline__ static int rows() { return 16 * (threadIdx.x / 32 % 4); }
  __device__ __forceinline__ static int cols() { return 32 * (threadIdx.x / 32 / 4); }

  __device__ __forceinline__ void step(const TileT (*x_tile)[kBlockM],
                                       const TileT (*t_tile)[kBlockN], int, int) {
    using namespace nvcuda;
    using Element = typename Operand::Element;
#pragma unroll
    for (int k = 0; k < kBlockK; k += kK) {
      // x_tile is transposed (k-major): x's 16 x kK block is column-major in it.
      wmma::fragment<wmma::matrix_a, 16, 16, kK, Element, wmma::col_major> a;
      wmma::load_matrix_sync(a, &x_tile[k][rows()], kBlockM);
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        wmma::fragment<wmma::matrix_b, 16, 16, kK, Element, wmma::row_major> b;
        wmma::load_matrix_sync(b, &t_tile[k][cols() + 16 * c], kBlockN);
        wmma::mma_sync(acc[c], a, b, acc[c]);
      }
    }
  }

  // The fragments' layout is opaque: they go through shared memory to the
  // threads whose outputs they hold.
  __device__ __forceinline__ void result(float (&out)[4][4], int ty, int tx) {
    __shared__ __align__(32) float stage[kBlockM][kBlockN];
#pragma unroll
    for (int c = 0; c < 2; ++c)
      nvcuda::wmma::store_matrix_sync(&stage[rows()][cols() + 16 * c], acc[c], kBlockN,
                                      nvcuda::wmma::mem_row_major);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) out[i][j] = stage[ty * 4 + i][tx * 4 + j];
  }
};

// Element i of a scale vector; banked, of bank row `id` (0 where id is -1: no adapter,
// multiplied in like any scale, as the Triton kernel and the torch backend do).
template <bool kBanked, typename T>
__device__ __forceinline__ typename Acc<T>::type scale_at(const T* scale, int64_t row_stride,
                                                          int32_t id, int64_t i) {
  if constexpr (kBanked) {
    return id >= 0 ? to_acc(scale[id * row_stride + i]) : typename Acc<T>::type(0);
  } else {
    return to_acc(scale[i]);
  }
}

// The call's mask, its key words read from device memory (cached after the
// first read): held in registers across the K loop they cost a spill.
__device__ __forceinline__ DropoutMask read_mask(const DropoutArgs& d) {
  return {static_cast<uint32_t>(__ldg(d.key)), static_cast<uint32_t>(__ldg(d.key + 1)),
          d.threshold, d.scale};
}

template <typename T, bool kBanked, Dropout kDrop, Precision kPrecision>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const GemmParams p) {
  using AccT = typename Acc<T>::type;
  // The x tile is loaded in runs of kRun consecutive k of one row. Without
  // dropout on x a run is one element, and a warp reads 2 rows x 16 k per pass.
  // With it a run is the 8 features of one dropout Philox call, made once for
  // all 8: the 128 runs of a tile are warps 0-3's, and warps 4-7 only fill the
  // projection tile meanwhile.
  constexpr int kRun = kDrop == Dropout::kX ? 8 : 1;
  constexpr int kRunsPerRow = kBlockK / kRun;
  constexpr int kRuns = kBlockM * kRunsPerRow;
  constexpr int kPasses = (kRuns + kThreads - 1) / kThreads;  // runs per thread per K step
  using Mma = BlockMma<T, UsesTensorCores<T, kPrecision>::value>;
  using TileT = typename Mma::TileT;
  // 32-byte aligned: WMMA loads 16-element rows of them.
  __shared__ __align__(32) TileT x_tile[kBlockK][kBlockM];  // transposed: x_tile[kk][mm]
  __shared__ __align__(32) TileT t_tile[kBlockK][kBlockN];
  __shared__ AccT reduce[kThreads / 16][kBlockN];

  const T* x = static_cast<const T*>(p.x);
  const T* x_scale = static_cast<const T*>(p.x_scale);
  const int t = threadIdx.x, ty = t / 16, tx = t % 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBlockM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBlockN;

  // A thread loads the same x rows at every K step: read their bank rows once.
  int32_t x_ids[kPasses] = {};
  if constexpr (kBanked) {
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int64_t m = m0 + (t + i * kThreads) / kRunsPerRow;
      x_ids[i] = m < p.M ? p.row_ids[m] : -1;
    }
  }

  Mma mma;
  for (int64_t k0 = 0; k0 < p.K; k0 += kBlockK) {
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int run = t + i * kThreads;
      if (kRuns % kThreads != 0 && run >= kRuns) break;  // idle warps (dropout on x only)
      const int mm = run / kRunsPerRow, kk0 = run % kRunsPerRow * kRun;
      const int64_t m = m0 + mm;
      PhiloxWords drop_w = {};
      if constexpr (kDrop == Dropout::kX)
        drop_w = dropout_words(read_mask(p.drop), static_cast<uint32_t>(m),
                               static_cast<uint32_t>((k0 + kk0) / 8));
#pragma unroll
      for (int e = 0; e < kRun; ++e) {
        const int kk = kk0 + e;
        const int64_t k = k0 + kk;
        AccT v = 0;
        if (m < p.M && k < p.K) {
          v = to_acc(x[m * p.stride_xm + k * p.stride_xk]);
          // Each factor rounds to T once, as the Triton kernel and the torch backend do.
          if constexpr (kDrop == Dropout::kX)
            v = to_acc(from_acc<T>(v * static_cast<AccT>(dropout_factor(read_mask(p.drop), drop_w, e))));
          if (x_scale != nullptr)
            v = to_acc(from_acc<T>(v * scale_at<kBanked>(x_scale, p.stride_sx, x_ids[i], k)));
        }
        x_tile[kk][mm] = Mma::to_tile(v);
      }
    }
    fill_projection_tile<T, Mma>(t_tile, p, k0, n0);
    __syncthreads();
    mma.step(x_tile, t_tile, ty, tx);
    __syncthreads();
  }
  AccT acc[4][4];
  mma.result(acc, ty, tx);

  // One pass over this thread's outputs: store them, and/or sum acc ⊙ aux
  // over its rows for the block's partial row.
  const bool store = p.epilogue != Epilogue::kReduceAux;
  const bool reduces = p.epilogue != Epilogue::kStore;
  T* out = static_cast<T*>(p.out);
  const T* out_scale = static_cast<const T*>(p.out_scale);
  const T* base = static_cast<const T*>(p.base);
  const AccT* base_scale = static_cast<const AccT*>(p.base_scale);  // float32 / float64
  const T* base_bias = static_cast<const T*>(p.base_bias);
  const T* aux = static_cast<const T*>(p.aux);
  AccT column[4] = {};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= p.M) continue;
    const int32_t id =
        kBanked && store && (out_scale != nullptr || base_scale != nullptr) ? p.row_ids[m] : 0;
    // The thread's 4 columns are half of one dropout call's 8 features (its
    // neighbour tx ^ 1 has the other half): one call per row, run by both.
    PhiloxWords drop_w = {};
    if constexpr (kDrop == Dropout::kOut)
      drop_w = dropout_words(read_mask(p.drop), static_cast<uint32_t>(m),
                             static_cast<uint32_t>((n0 + tx * 4) / 8));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (n >= p.N) continue;
      if (reduces) column[j] += acc[i][j] * to_acc(aux[m * p.stride_am + n * p.stride_an]);
      if (store) {
        AccT v = acc[i][j];
        if constexpr (kDrop == Dropout::kOut)
          v *= static_cast<AccT>(dropout_factor(read_mask(p.drop), drop_w, (tx & 1) * 4 + j));
        if (out_scale != nullptr) v *= scale_at<kBanked>(out_scale, p.stride_so, id, n);
        if (base != nullptr) {
          AccT b = to_acc(base[m * p.stride_bm + n * p.stride_bn]);
          if (base_scale != nullptr) {
            // A bank row of id -1 (no adapter) keeps its base: s = 1.
            const AccT s = !kBanked ? base_scale[n]
                           : id < 0 ? AccT(1)
                                    : base_scale[static_cast<int64_t>(id) * p.stride_bs + n];
            const AccT shift = base_bias != nullptr ? to_acc(base_bias[n]) : AccT(0);
            b = s * (b - shift) + shift;
          }
          v += b;
        }
        out[m * p.stride_om + n * p.stride_on] = from_acc<T>(v);
      }
    }
  }
  if (!reduces) return;

  // The block's partial row: Σ over its 16 row groups, in a fixed order.
#pragma unroll
  for (int j = 0; j < 4; ++j) reduce[ty][tx * 4 + j] = column[j];
  __syncthreads();
  if (t < kBlockN && n0 + t < p.N) {
    AccT sum = 0;
    for (int row = 0; row < kThreads / 16; ++row) sum += reduce[row][t];
    static_cast<AccT*>(p.partial)[static_cast<int64_t>(blockIdx.y) * p.N + n0 + t] = sum;
  }
}

template <typename T>
__global__ void generate_kernel(T* out, int64_t rows, int64_t cols, int64_t row0, int64_t col0,
                                uint32_t key0, uint32_t key1, float bound, int matrix) {
  const int64_t groups = (cols + 3) / 4;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= rows * groups) return;
  const int64_t row = g / groups, group = g % groups;
  const PhiloxWords w = projection_words(matrix, static_cast<uint32_t>(row0 + row),
                                         static_cast<uint32_t>(col0 / 4 + group), key0, key1);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t col = group * 4 + i;
    if (col < cols) out[row * cols + col] = from_acc<T>(static_cast<typename Acc<T>::type>(projection_value(w.w[i], bound)));
  }
}

template <typename T, Precision kPrecision, bool kBanked>
cudaError_t launch_gemm_banked(const GemmParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.N + kBlockN - 1) / kBlockN),
                  static_cast<unsigned>((p.M + kBlockM - 1) / kBlockM));
  switch (p.dropout) {
    case Dropout::kNone:
      VERA_LAUNCH(grid, kThreads, 0, stream, gemm_kernel<T, kBanked, Dropout::kNone, kPrecision>)(p);
      break;
    case Dropout::kX:
      VERA_LAUNCH(grid, kThreads, 0, stream, gemm_kernel<T, kBanked, Dropout::kX, kPrecision>)(p);
      break;
    case Dropout::kOut:
      VERA_LAUNCH(grid, kThreads, 0, stream, gemm_kernel<T, kBanked, Dropout::kOut, kPrecision>)(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T, Precision kPrecision>
cudaError_t launch_gemm_precision(const GemmParams& p, cudaStream_t stream) {
  return p.row_ids != nullptr ? launch_gemm_banked<T, kPrecision, true>(p, stream)
                              : launch_gemm_banked<T, kPrecision, false>(p, stream);
}

// Only fp32 has a TF32 instantiation: the precision means nothing to the others.
template <typename T>
cudaError_t launch_gemm(const GemmParams& p, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    if (p.precision == Precision::kTf32) return launch_gemm_precision<T, Precision::kTf32>(p, stream);
  }
  return launch_gemm_precision<T, Precision::kIeee>(p, stream);
}

template <typename T>
cudaError_t launch_generate(void* out, int64_t rows, int64_t cols, int64_t row0, int64_t col0,
                            uint32_t key0, uint32_t key1, float bound, int matrix,
                            cudaStream_t stream) {
  const int64_t groups = rows * ((cols + 3) / 4);
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((groups + threads - 1) / threads);
  VERA_LAUNCH(blocks, threads, 0, stream, generate_kernel<T>)(static_cast<T*>(out), rows, cols,
                                                              row0, col0, key0, key1, bound,
                                                              matrix);
  return cudaGetLastError();
}

}  // namespace

cudaError_t gemm(DType dtype, const GemmParams& params, cudaStream_t stream) {
  if (params.M == 0 || params.N == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kHalf: return launch_gemm<__half>(params, stream);
    case DType::kBFloat16: return launch_gemm<__nv_bfloat16>(params, stream);
    case DType::kFloat: return launch_gemm<float>(params, stream);
    case DType::kDouble: return launch_gemm<double>(params, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t kernel_image_status() {
  // Every kernel is in this file's one fatbinary, so one stands for all: the
  // driver picks (or JIT-compiles) one image of the whole file per device.
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, generate_kernel<float>);
  if (err != cudaSuccess) cudaGetLastError();  // not sticky: reset it for the launch checks
  return err;
}

std::vector<int64_t> compiled_archs() { return {__CUDA_ARCH_LIST__}; }

cudaError_t generate_projection(DType dtype, void* out, int64_t rows, int64_t cols, int64_t row0,
                                int64_t col0, uint32_t key0, uint32_t key1, float bound,
                                int matrix, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (col0 % 4 != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kHalf:
      return launch_generate<__half>(out, rows, cols, row0, col0, key0, key1, bound, matrix, stream);
    case DType::kBFloat16:
      return launch_generate<__nv_bfloat16>(out, rows, cols, row0, col0, key0, key1, bound, matrix,
                                            stream);
    case DType::kFloat:
      return launch_generate<float>(out, rows, cols, row0, col0, key0, key1, bound, matrix, stream);
    case DType::kDouble:
      return launch_generate<double>(out, rows, cols, row0, col0, key0, key1, bound, matrix, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vera
