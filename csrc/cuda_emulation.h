// The CUDA programming model on the CPU, enough of it to run vera_kernels.cu
// unchanged under the host C++ compiler (VERA_KERNELS_CUDA_EMULATE=1; see
// docs/design.md §7). Included by vera_kernels.h when VERA_CUDA_EMULATION is
// defined; nvcc builds never see it.
//
//   grid      a loop over blocks, one block at a time (x fastest, as blockIdx
//             is laid out), on the calling OS thread; launches are synchronous
//   block     its threads are fibers (ucontext) of that OS thread, resumed in
//             threadIdx order; a round resumes every live fiber once and each
//             runs to its next __syncthreads or its end, so a round is exactly
//             one barrier interval (a thread that has returned counts as
//             arrived, as on the GPU)
//   __shared__ static thread_local: the fibers of the running block share it,
//             and the next block reuses it (its contents undefined, as on the GPU)
//   threadIdx, blockIdx, blockDim, gridDim: the running fiber's, set by the
//             scheduler before each resume
//   nvcuda::wmma  every thread holds a whole fragment: the warp-wide loads,
//             products and stores then give each thread the warp's result
//             (fp32 accumulation in k order; the hardware's order and
//             rounding inside an MMA are its own); tf32 fragments hold
//             floats, rounded by __float_to_tf32 as cvt.rna.tf32.f32 does
//
// Not modelled: warps otherwise (no shuffles, votes or lock-step execution;
// the kernels use none), atomics, dynamic shared memory, streams (the stream
// argument is ignored) and the device's rounding (no FMA contraction: build
// with -ffp-contract=off).
#pragma once

#include <cuda_bf16.h>  // the toolkit's host implementations of __half / __nv_bfloat16
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // dim3, uint3, cudaError_t: types only, no runtime calls
#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#undef __shared__
#define __shared__ static thread_local
#define __launch_bounds__(...)
// No device architecture is compiled: compiled_archs() reports none.
#define __CUDA_ARCH_LIST__

// The runtime calls the sources make, answered here (no libcudart, no driver).
#define cudaGetLastError ::vera_emu::get_last_error
#define cudaGetErrorString ::vera_emu::error_string
#define cudaGetErrorName ::vera_emu::error_name
#define cudaFuncGetAttributes ::vera_emu::func_get_attributes
#define __syncthreads() ::vera_emu::syncthreads()
#define __ldg ::vera_emu::ldg
#define threadIdx (::vera_emu::current.thread_idx)
#define blockIdx (::vera_emu::current.block_idx)
#define blockDim (::vera_emu::current.block_dim)
#define gridDim (::vera_emu::current.grid_dim)

// kernel<<<grid, block, smem, stream>>>(args), written
// VERA_LAUNCH(grid, block, smem, stream, kernel)(args).
#define VERA_LAUNCH(grid, block, smem, stream, ...) \
  ::vera_emu::launch(grid, block, smem, stream, __VA_ARGS__)

namespace vera_emu {

struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
inline thread_local ThreadState current;
inline thread_local cudaError_t last_error = cudaSuccess;

// The running block's fibers; one block at a time per OS thread.
struct Block {
  static constexpr size_t kStackBytes = 128 * 1024;  // untouched pages are never committed
  ucontext_t scheduler;
  std::vector<ucontext_t> fibers;
  std::vector<char> done;
  std::unique_ptr<char[]> stacks;
  size_t stack_count = 0;
  unsigned running = 0;
  const std::function<void()>* body = nullptr;
};
inline thread_local Block block;

inline cudaError_t get_last_error() {
  const cudaError_t err = last_error;
  last_error = cudaSuccess;
  return err;
}

inline const char* error_name(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    default: return "cudaErrorUnknown";
  }
}

inline const char* error_string(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unknown error";
  }
}

// Every kernel runs on the emulated device.
template <typename Kernel>
cudaError_t func_get_attributes(cudaFuncAttributes* attributes, Kernel) {
  *attributes = {};
  return cudaSuccess;
}

template <typename T>
T ldg(const T* address) {
  return *address;
}

// Back to the scheduler, which resumes this fiber after every other live one
// has reached a barrier or returned.
inline void syncthreads() { swapcontext(&block.fibers[block.running], &block.scheduler); }

inline void fiber_main() {
  (*block.body)();
  block.done[block.running] = 1;
}  // returns to uc_link: the scheduler

// Runs body as every thread of every block of the grid.
inline void run_grid(dim3 grid, dim3 threads, const std::function<void()>& body) {
  const size_t count = static_cast<size_t>(threads.x) * threads.y * threads.z;
  if (count == 0 || count > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (block.stack_count < count) {
    block.stacks.reset(new char[count * Block::kStackBytes]);
    block.stack_count = count;
  }
  block.fibers.resize(count);
  block.body = &body;
  current.block_dim = threads;
  current.grid_dim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        current.block_idx = {bx, by, bz};
        block.done.assign(count, 0);
        for (size_t i = 0; i < count; ++i) {
          ucontext_t& fiber = block.fibers[i];
          getcontext(&fiber);
          fiber.uc_stack.ss_sp = block.stacks.get() + i * Block::kStackBytes;
          fiber.uc_stack.ss_size = Block::kStackBytes;
          fiber.uc_link = &block.scheduler;
          makecontext(&fiber, fiber_main, 0);
        }
        for (size_t live = count; live > 0;) {
          for (unsigned i = 0; i < count; ++i) {
            if (block.done[i]) continue;
            block.running = i;
            current.thread_idx = {i % threads.x, i / threads.x % threads.y,
                                  i / (threads.x * threads.y)};
            swapcontext(&block.scheduler, &block.fibers[i]);
            if (block.done[i]) --live;
          }
        }
      }
}

template <typename... Params>
struct Launch {
  dim3 grid, threads;
  void (*kernel)(Params...);

  // Each thread gets its own copy of the arguments, as a kernel's parameters are.
  template <typename... Args>
  void operator()(const Args&... args) const {
    const auto kernel_ = kernel;
    run_grid(grid, threads, [&] { kernel_(args...); });
  }
};

template <typename... Params>
Launch<Params...> launch(dim3 grid, dim3 threads, size_t shared_bytes, cudaStream_t,
                         void (*kernel)(Params...)) {
  // Dynamic shared memory is not modelled (the kernels use static arrays): such a
  // launch gets a block of no threads, which fails as an invalid configuration.
  return {grid, shared_bytes == 0 ? threads : dim3(0), kernel};
}

}  // namespace vera_emu

// The WMMA subset the kernels use (mma.h's names and signatures).
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// What a fragment of element type T holds: tf32 ones hold floats (as mma.h's do).
template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

// cvt.rna.tf32.f32: the mantissa rounded to 10 bits, to nearest with ties away
// from zero (half an ulp added to the magnitude, then truncated; a finite value
// may round to inf); inf and NaN kept. The 13 bits below come back zero.
inline float __float_to_tf32(float in) {
  uint32_t bits;
  std::memcpy(&bits, &in, sizeof bits);
  if ((bits & 0x7F800000u) != 0x7F800000u) bits = (bits + 0x1000u) & ~0x1FFFu;
  std::memcpy(&in, &bits, sizeof bits);
  return in;
}

template <typename Use, int M, int N, int K>
struct fragment_shape;
template <int M, int N, int K>
struct fragment_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct fragment_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct fragment_shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = fragment_shape<Use, M, N, K>::rows;
  static constexpr int cols = fragment_shape<Use, M, N, K>::cols;
  typename storage<T>::type x[rows][cols];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const typename storage<T>::type& value) {
  for (auto& row : f.x)
    for (auto& element : row) element = value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const typename storage<T>::type* p,
                      unsigned ldm) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>);
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c)
      f.x[r][c] = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r][c];
}

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// d = a b + c; d may be c.
template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d,
              const fragment<matrix_a, M, N, K, T, LayoutA>& a,
              const fragment<matrix_b, M, N, K, T, LayoutB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  fragment<accumulator, M, N, K, float> sum;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i][j];
      for (int k = 0; k < K; ++k) s += to_float(a.x[i][k]) * to_float(b.x[k][j]);
      sum.x[i][j] = s;
    }
  d = sum;
}

}  // namespace wmma
}  // namespace nvcuda
