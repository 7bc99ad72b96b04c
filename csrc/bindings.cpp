// torch bindings of the CUDA kernels: the `vera_kernels_cuda` op library.
//
//   forward(x, lambda_d, lambda_b, key0, key1, base?, generate, proj_a?, proj_b?, into_base,
//           adapter_ids?, dropout_threshold, dropout_scale, dropout_seed?, tf32, shard_*,
//           base_scale?, base_bias?)
//           -> (y, h)   (y is base itself when into_base; with base_scale s the epilogue
//                        adds s ⊙ (base - base_bias) + base_bias, DVoRA's)
//   backward(grad, h, lambda_d, lambda_b, key0, key1, in_features, generate,
//            need_dx, need_dd, need_db, proj_a?, proj_b?, adapter_ids?,
//            dropout_threshold, dropout_scale, dropout_seed?, dx_into?, tf32) -> (dx, dd, db)
//            (a gradient not asked for comes back empty)
//   projection(matrix, rows, cols, key0, key1, like) -> Tensor
//   block_m() -> int   (kBlockM: token rows per thread block)
//   kernel_image_problem(int device) -> str   (empty when the device can run the
//            kernels, else the CUDA error a launch there would fail with)
//   compiled_archs() -> int[]   (the architectures nvcc compiled for: 750 is sm_75)
//
// proj_a (r x in) / proj_b (out x r), when given, replace the seed's matrices.
//
// tf32 (default false): float32 products at TF32 precision on tensor cores
// (sm_80+; SIMT on sm_75), as torch's float32 matmul precision below "highest"
// asks; the caller decides (vera_kernels/backends/cuda.py). Other dtypes ignore it.
//
// adapter_ids (tokens,) int32, when given, makes lambda_d (n_adapters x r) and
// lambda_b (n_adapters x out) banks: token row t uses bank row adapter_ids[t]
// (-1: no adapter, its adapter output and gradients are zero; ids must be in
// [-1, n_adapters), unchecked here, as a check would sync with the device).
// h stays shared by all adapters. Banked, backward's dd and db are not yet
// summed: they come back per token row, u ⊙ h (tokens x r) and g ⊙ z
// (tokens x out), for the caller to sum per adapter in a fixed order
// (vera_kernels/backends/banks.py, per_adapter_sum); dx is final either way.
// This keeps one op per direction and leaves the segmented sum to the one
// deterministic implementation every backend shares.
//
// Adapter dropout (vera_kernels/dropout.py): the dropout_* arguments are
// DropoutMask's threshold, scale and seed as they are, not p, so the
// spec's rounding of p and of the scale lives only on the Python side.
// Threshold 0 (the default) is no dropout: every draw is kept at scale 1.
// dropout_seed is a tensor on x's device, int64 (seed & 0xFFFFFFFF, seed >> 32),
// that the kernels read: it may be drawn on the device, inside a CUDA graph
// capture too, and is never copied to the host.
// forward masks x as the h launch loads it; backward masks dx with the same
// mask, regenerated, in the dx launch's epilogue. h (computed from the
// dropped x) serves dd and db unchanged.
//
// The composition mirrors vera_kernels/backends/triton/backend.py; the kernels are in
// vera_kernels.cu. Everything runs on the current CUDA stream.
//
// Compiled a second time with VERA_CUDA_EMULATION defined, this file is the
// `vera_kernels_cuda_emu` library: the same ops on CPU tensors, running the
// same kernels through csrc/cuda_emulation.h (docs/design.md §7). The two
// libraries can be loaded side by side.
#include <ATen/ATen.h>
#include <torch/library.h>
#ifndef VERA_CUDA_EMULATION
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "vera_kernels.h"

namespace {

using at::Tensor;

#ifdef VERA_CUDA_EMULATION
#define VERA_OPS vera_kernels_cuda_emu
#define VERA_DISPATCH_KEY CPU
constexpr const char* kDeviceKind = "CPU";
bool on_kernel_device(const Tensor& t) { return t.is_cpu(); }
// One host thread runs every launch to completion: no device to select, no stream.
struct DeviceGuard {
  template <typename Device>
  explicit DeviceGuard(Device) {}
};
cudaStream_t current_stream() { return nullptr; }
#else
#define VERA_OPS vera_kernels_cuda
#define VERA_DISPATCH_KEY CUDA
constexpr const char* kDeviceKind = "CUDA";
bool on_kernel_device(const Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#endif

constexpr int kMatrixA = 0;
constexpr int kMatrixB = 1;

vera::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return vera::DType::kHalf;
    case at::kBFloat16: return vera::DType::kBFloat16;
    case at::kFloat: return vera::DType::kFloat;
    case at::kDouble: return vera::DType::kDouble;
    default:
      TORCH_CHECK(false, "vera_kernels cuda backend: unsupported dtype ", t.scalar_type(),
                  "; expected float16, bfloat16, float32 or float64");
  }
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "vera_kernels cuda backend: ", what, " failed: ",
              cudaGetErrorString(err));
}

void check_input(const Tensor& t, const char* name, const Tensor& x, int64_t dims) {
  TORCH_CHECK(on_kernel_device(t), "vera_kernels cuda backend: ", name, " must be a ", kDeviceKind,
              " tensor");
  TORCH_CHECK(t.device() == x.device(), "vera_kernels cuda backend: ", name, " is on ",
              t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "vera_kernels cuda backend: ", name,
              " has dtype ", t.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(t.dim() == dims, "vera_kernels cuda backend: ", name, " must be ", dims, "-D");
}

uint32_t key_word(int64_t key, const char* name) {
  TORCH_CHECK(key >= 0 && key <= 0xFFFFFFFFLL, "vera_kernels cuda backend: ", name,
              " must be a 32-bit word");
  return static_cast<uint32_t>(key);
}

// Adapter banks: the ids against the rows (x or h) they select for, and the banks.
void check_adapter_ids(const Tensor& ids, const Tensor& rows, const char* rows_name,
                       const Tensor& lambda_d, const Tensor& lambda_b) {
  TORCH_CHECK(ids.device() == rows.device(), "vera_kernels cuda backend: adapter_ids is on ",
              ids.device(), " but ", rows_name, " is on ", rows.device());
  TORCH_CHECK(ids.scalar_type() == at::kInt,
              "vera_kernels cuda backend: adapter_ids must be int32, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == rows.size(0),
              "vera_kernels cuda backend: adapter_ids must have shape (", rows.size(0),
              ",), one id per row of ", rows_name, ", got ", ids.sizes());
  TORCH_CHECK(lambda_d.size(0) == lambda_b.size(0),
              "vera_kernels cuda backend: the banks lambda_d and lambda_b hold ", lambda_d.size(0),
              " and ", lambda_b.size(0), " adapters; they must hold the same adapters");
}

// The launches' dropout, or none for threshold 0. The seed tensor must
// outlive the launches: the caller holds it.
std::optional<vera::DropoutArgs> dropout_args(int64_t threshold, double scale,
                                              const std::optional<Tensor>& seed, const Tensor& x) {
  TORCH_CHECK(threshold >= 0 && threshold < 65536,
              "vera_kernels cuda backend: dropout_threshold must be in [0, 65536), got ",
              threshold);
  if (threshold == 0) return std::nullopt;
  // The kernels multiply by exactly DropoutMask.scale, a float32 value.
  TORCH_CHECK(std::isfinite(scale) && static_cast<double>(static_cast<float>(scale)) == scale,
              "vera_kernels cuda backend: dropout_scale must be a finite float32 value, got ",
              scale);
  TORCH_CHECK(seed.has_value(), "vera_kernels cuda backend: dropout needs a dropout_seed");
  TORCH_CHECK(seed->device() == x.device(), "vera_kernels cuda backend: dropout_seed is on ",
              seed->device(), " but x is on ", x.device());
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 2 && seed->is_contiguous(),
              "vera_kernels cuda backend: dropout_seed must be a contiguous int64 tensor of two "
              "key words, got ", seed->scalar_type(), " of shape ", seed->sizes());
  return vera::DropoutArgs{seed->data_ptr<int64_t>(), static_cast<uint32_t>(threshold),
                           static_cast<float>(scale)};
}

void set_dropout(vera::GemmParams& p, vera::Dropout mode,
                 const std::optional<vera::DropoutArgs>& drop) {
  if (!drop.has_value()) return;
  p.dropout = mode;
  p.drop = *drop;
}

// The row stride of a bank (n_adapters x C); a plain vector has none.
int64_t row_stride(const Tensor& v) { return v.dim() == 2 ? v.stride(0) : 0; }

float bound_for(int64_t fan) {
  return static_cast<float>(std::sqrt(6.0 / static_cast<double>(fan)));
}

// Where a call's block of a spec matrix lies in the full one (a tensor-parallel
// shard's; ProjectionShard.block on the Python side).
struct Block {
  int64_t row0 = 0, col0 = 0, fan = 0;  // fan 0: the block's own columns
};

// The block of a shard (the ops' shard_* arguments) for matrix A (r x in) or B (out x r).
Block shard_block(int64_t matrix, int64_t in_offset, int64_t out_offset, int64_t in_features) {
  TORCH_CHECK(in_offset >= 0 && out_offset >= 0 && in_features >= 0,
              "vera_kernels cuda backend: shard offsets must be non-negative");
  return matrix == kMatrixA ? Block{0, in_offset, in_features} : Block{out_offset, 0, 0};
}

// The block `where` (rows x cols) of spec matrix `matrix` in like's dtype, on like's
// device. The generator starts on a multiple of 4 columns: a block that does not is
// cut from a slightly wider one (a strided view).
Tensor materialize(int64_t matrix, int64_t rows, int64_t cols, uint32_t key0, uint32_t key1,
                   const Tensor& like, const Block& where) {
  const int64_t lead = where.col0 % 4;
  Tensor out = at::empty({rows, cols + lead}, like.options());
  check(vera::generate_projection(dtype_of(like), out.data_ptr(), rows, cols + lead, where.row0,
                                  where.col0 - lead, key0, key1,
                                  bound_for(where.fan > 0 ? where.fan : cols),
                                  static_cast<int>(matrix), current_stream()),
        "projection generation");
  return lead ? out.narrow(1, lead, cols) : out;
}

// A projection as a kernel source. The workspace (kept alive here) is the
// given matrix, or generated once per launch unless the kernels generate
// tiles themselves.
struct Projection {
  Tensor workspace;
  vera::ProjectionSource source;
};

Projection projection(int matrix, int64_t rows, int64_t cols, uint32_t key0, uint32_t key1,
                      bool generate, const Tensor& like, const std::optional<Tensor>& given,
                      const Block& where) {
  Projection p;
  p.source = {nullptr, 0, 0, key0, key1, bound_for(where.fan > 0 ? where.fan : cols), matrix,
              where.row0, where.col0};
  if (given.has_value()) {
    check_input(*given, matrix == kMatrixA ? "proj_a" : "proj_b", like, 2);
    TORCH_CHECK(given->size(0) == rows && given->size(1) == cols, "vera_kernels cuda backend: ",
                matrix == kMatrixA ? "proj_a" : "proj_b", " must have shape (", rows, ", ", cols,
                "), got ", given->sizes());
    p.workspace = *given;
  } else if (!generate || where.col0 % 4 != 0) {
    // The in-kernel generator fills four columns per Philox call from a multiple of 4.
    p.workspace = materialize(matrix, rows, cols, key0, key1, like, where);
  }
  if (p.workspace.defined()) {
    p.source.workspace = p.workspace.data_ptr();
    p.source.stride_row = p.workspace.stride(0);
    p.source.stride_col = p.workspace.stride(1);
  }
  return p;
}

vera::GemmParams gemm_params(const Tensor& x, const Tensor* x_scale, const Projection& proj,
                             bool transposed, int64_t n, bool tf32) {
  vera::GemmParams p = {};
  p.x = x.data_ptr();
  p.stride_xm = x.stride(0);
  p.stride_xk = x.stride(1);
  p.x_scale = x_scale != nullptr ? x_scale->data_ptr() : nullptr;
  p.stride_sx = x_scale != nullptr ? row_stride(*x_scale) : 0;
  p.proj = proj.source;
  p.transposed = transposed;
  p.M = x.size(0);
  p.K = x.size(1);
  p.N = n;
  p.epilogue = vera::Epilogue::kStore;
  p.precision = tf32 ? vera::Precision::kTf32 : vera::Precision::kIeee;
  return p;
}

// The epilogue adds `base` (read and written by the same thread when it is `out`).
void set_base(vera::GemmParams& p, const Tensor& base) {
  p.base = base.data_ptr();
  p.stride_bm = base.stride(0);
  p.stride_bn = base.stride(1);
}

void set_out(vera::GemmParams& p, const Tensor& out) {
  p.out = out.data_ptr();
  p.stride_om = out.stride(0);
  p.stride_on = out.stride(1);
}

void set_reduction(vera::GemmParams& p, const Tensor& aux, const Tensor& partial) {
  p.aux = aux.data_ptr();
  p.stride_am = aux.stride(0);
  p.stride_an = aux.stride(1);
  p.partial = partial.data_ptr();
}

Tensor partial_buffer(int64_t m, int64_t n, const Tensor& like) {
  const auto acc = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({(m + vera::kBlockM - 1) / vera::kBlockM, n}, like.options().dtype(acc));
}

void run(const Tensor& like, const vera::GemmParams& p, const char* what) {
  check(vera::gemm(dtype_of(like), p, current_stream()), what);
}

std::tuple<Tensor, Tensor> vera_forward(const Tensor& x_in, const Tensor& lambda_d_in,
                                        const Tensor& lambda_b_in, int64_t key0, int64_t key1,
                                        const std::optional<Tensor>& base, bool generate,
                                        const std::optional<Tensor>& proj_a,
                                        const std::optional<Tensor>& proj_b, bool into_base,
                                        const std::optional<Tensor>& adapter_ids,
                                        int64_t dropout_threshold, double dropout_scale,
                                        const std::optional<Tensor>& dropout_seed, bool tf32,
                                        int64_t shard_in_offset, int64_t shard_out_offset,
                                        int64_t shard_in_features,
                                        const std::optional<Tensor>& base_scale_in,
                                        const std::optional<Tensor>& base_bias_in) {
  TORCH_CHECK(on_kernel_device(x_in) && x_in.dim() == 2,
              "vera_kernels cuda backend: x must be a 2-D ", kDeviceKind, " tensor");
  const bool banked = adapter_ids.has_value();
  check_input(lambda_d_in, "lambda_d", x_in, banked ? 2 : 1);
  check_input(lambda_b_in, "lambda_b", x_in, banked ? 2 : 1);
  if (banked) check_adapter_ids(*adapter_ids, x_in, "x", lambda_d_in, lambda_b_in);
  const DeviceGuard guard(x_in.device());
  const Tensor lambda_d = lambda_d_in.contiguous(), lambda_b = lambda_b_in.contiguous();
  const Tensor ids = banked ? adapter_ids->contiguous() : Tensor();
  const uint32_t k0 = key_word(key0, "key0"), k1 = key_word(key1, "key1");
  const auto drop = dropout_args(dropout_threshold, dropout_scale, dropout_seed, x_in);
  const int64_t m = x_in.size(0), in = x_in.size(1), r = lambda_d.size(-1), out = lambda_b.size(-1);

  const Projection a = projection(kMatrixA, r, in, k0, k1, generate, x_in, proj_a,
                                  shard_block(kMatrixA, shard_in_offset, shard_out_offset,
                                              shard_in_features));
  const Projection b = projection(kMatrixB, out, r, k0, k1, generate, x_in, proj_b,
                                  shard_block(kMatrixB, shard_in_offset, shard_out_offset,
                                              shard_in_features));

  Tensor h = at::empty({m, r}, x_in.options());  // shared by every adapter of a bank
  vera::GemmParams p = gemm_params(x_in, nullptr, a, /*transposed=*/true, r, tf32);
  set_out(p, h);
  set_dropout(p, vera::Dropout::kX, drop);
  run(x_in, p, "forward h = dropout(x) A^T");

  TORCH_CHECK(!into_base || base.has_value(), "vera_kernels cuda backend: into_base needs a base");
  // In place, each element of base is read and then written by the same thread.
  Tensor y = into_base ? *base : at::empty({m, out}, x_in.options());
  p = gemm_params(h, &lambda_d, b, /*transposed=*/true, out, tf32);
  set_out(p, y);
  p.out_scale = lambda_b.data_ptr();
  p.stride_so = row_stride(lambda_b);
  p.row_ids = banked ? ids.data_ptr<int32_t>() : nullptr;
  if (base.has_value()) {
    check_input(*base, "base", x_in, 2);
    set_base(p, *base);
  }
  // DVoRA: the epilogue adds s ⊙ (base - bias) + bias (kept alive until the launch).
  Tensor base_scale, base_bias;
  if (base_scale_in.has_value()) {
    TORCH_CHECK(base.has_value(), "vera_kernels cuda backend: base_scale needs a base");
    const auto acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(on_kernel_device(*base_scale_in) && base_scale_in->device() == x_in.device(),
                "vera_kernels cuda backend: base_scale must be on x's device");
    TORCH_CHECK(base_scale_in->scalar_type() == acc, "vera_kernels cuda backend: base_scale "
                "must be in the accumulation dtype ", acc, ", got ", base_scale_in->scalar_type());
    TORCH_CHECK(base_scale_in->sizes() == lambda_b.sizes(),
                "vera_kernels cuda backend: base_scale must have lambda_b's shape");
    base_scale = base_scale_in->contiguous();
    p.base_scale = base_scale.data_ptr();
    p.stride_bs = row_stride(base_scale);
    if (base_bias_in.has_value()) {
      check_input(*base_bias_in, "base_bias", x_in, 1);
      TORCH_CHECK(base_bias_in->size(0) == out,
                  "vera_kernels cuda backend: base_bias must have out elements");
      base_bias = base_bias_in->contiguous();
      p.base_bias = base_bias.data_ptr();
    }
  } else {
    TORCH_CHECK(!base_bias_in.has_value(), "vera_kernels cuda backend: base_bias needs base_scale");
  }
  run(x_in, p, "forward y = (d h) B^T b + base");
  return {y, h};
}

std::tuple<Tensor, Tensor, Tensor> vera_backward(const Tensor& grad, const Tensor& h,
                                                 const Tensor& lambda_d_in,
                                                 const Tensor& lambda_b_in, int64_t key0,
                                                 int64_t key1, int64_t in_features, bool generate,
                                                 bool need_dx, bool need_dd, bool need_db,
                                                 const std::optional<Tensor>& proj_a,
                                                 const std::optional<Tensor>& proj_b,
                                                 const std::optional<Tensor>& adapter_ids,
                                                 int64_t dropout_threshold, double dropout_scale,
                                                 const std::optional<Tensor>& dropout_seed,
                                                 const std::optional<Tensor>& dx_into, bool tf32,
                                                 int64_t shard_in_offset, int64_t shard_out_offset,
                                                 int64_t shard_in_features) {
  TORCH_CHECK(on_kernel_device(h) && h.dim() == 2, "vera_kernels cuda backend: h must be a 2-D ",
              kDeviceKind, " tensor");
  check_input(grad, "grad", h, 2);
  const bool banked = adapter_ids.has_value();
  check_input(lambda_d_in, "lambda_d", h, banked ? 2 : 1);
  check_input(lambda_b_in, "lambda_b", h, banked ? 2 : 1);
  if (banked) check_adapter_ids(*adapter_ids, h, "h", lambda_d_in, lambda_b_in);
  const DeviceGuard guard(h.device());
  const Tensor lambda_d = lambda_d_in.contiguous(), lambda_b = lambda_b_in.contiguous();
  const Tensor ids = banked ? adapter_ids->contiguous() : Tensor();
  const int32_t* row_ids = banked ? ids.data_ptr<int32_t>() : nullptr;
  const uint32_t k0 = key_word(key0, "key0"), k1 = key_word(key1, "key1");
  const auto drop = dropout_args(dropout_threshold, dropout_scale, dropout_seed, h);
  const int64_t m = h.size(0), r = lambda_d.size(-1), out = lambda_b.size(-1);
  const Projection b = projection(kMatrixB, out, r, k0, k1, generate, h, proj_b,
                                  shard_block(kMatrixB, shard_in_offset, shard_out_offset,
                                              shard_in_features));

  Tensor dx = h.new_empty({0}), dd = h.new_empty({0}), db = h.new_empty({0});
  if (need_dx || need_dd) {
    // u = (g ⊙ b) B, and dd = Σ_tokens u ⊙ h in the same pass (one adapter).
    Tensor u = at::empty({m, r}, h.options());
    vera::GemmParams p = gemm_params(grad, &lambda_b, b, /*transposed=*/false, r, tf32);
    p.row_ids = row_ids;
    set_out(p, u);
    Tensor partial;
    if (need_dd && !banked) {
      partial = partial_buffer(m, r, h);
      set_reduction(p, h, partial);
      p.epilogue = vera::Epilogue::kStoreReduceAux;
    }
    run(h, p, "backward u = (g b) B");
    if (need_dd && banked) {
      dd = need_dx ? u * h : u.mul_(h);  // per-row terms; dx below still needs u itself
    } else if (need_dd) {
      dd = partial.sum(0).to(lambda_d.scalar_type());
    }
    if (need_dx) {
      const Projection a = projection(kMatrixA, r, in_features, k0, k1, generate, h, proj_a,
                                      shard_block(kMatrixA, shard_in_offset, shard_out_offset,
                                                  shard_in_features));
      if (dx_into.has_value()) {  // add into the caller's dx (the base layer's): no new tensor
        check_input(*dx_into, "dx_into", h, 2);
        TORCH_CHECK(dx_into->size(0) == m && dx_into->size(1) == in_features,
                    "vera_kernels cuda backend: dx_into must be (tokens, in_features)");
        dx = *dx_into;
      } else {
        dx = at::empty({m, in_features}, h.options());
      }
      p = gemm_params(u, &lambda_d, a, /*transposed=*/false, in_features, tf32);
      p.row_ids = row_ids;
      set_out(p, dx);
      if (dx_into.has_value()) set_base(p, dx);
      set_dropout(p, vera::Dropout::kOut, drop);  // dx of the dropped x: the same mask
      run(h, p, "backward dx = (d u) A");
    }
  }
  if (need_db && banked) {
    // Summing per adapter needs the rows of g ⊙ z, so z = (d ⊙ h) Bᵀ is stored
    // here (a tokens x out transient) and multiplied by g in place.
    Tensor z = at::empty({m, out}, h.options());
    vera::GemmParams p = gemm_params(h, &lambda_d, b, /*transposed=*/true, out, tf32);
    p.row_ids = row_ids;
    set_out(p, z);
    run(h, p, "backward z = (d h) B^T");
    db = z.mul_(grad);
  } else if (need_db) {
    // db = Σ_tokens g ⊙ z with z = (d ⊙ h) Bᵀ consumed in registers.
    Tensor partial = partial_buffer(m, out, h);
    vera::GemmParams p = gemm_params(h, &lambda_d, b, /*transposed=*/true, out, tf32);
    set_reduction(p, grad, partial);
    p.epilogue = vera::Epilogue::kReduceAux;
    run(h, p, "backward db");
    db = partial.sum(0).to(lambda_b.scalar_type());
  }
  return {dx, dd, db};
}

Tensor vera_projection(int64_t matrix, int64_t rows, int64_t cols, int64_t key0, int64_t key1,
                       const Tensor& like, int64_t row_offset, int64_t col_offset, int64_t fan) {
  TORCH_CHECK(matrix == kMatrixA || matrix == kMatrixB,
              "vera_kernels cuda backend: matrix must be 0 (A) or 1 (B)");
  TORCH_CHECK(rows > 0 && cols > 0, "vera_kernels cuda backend: rows and cols must be positive");
  TORCH_CHECK(row_offset >= 0 && col_offset >= 0 && fan >= 0,
              "vera_kernels cuda backend: offsets and fan must be non-negative");
  const DeviceGuard guard(like.device());
  return materialize(matrix, rows, cols, key_word(key0, "key0"), key_word(key1, "key1"), like,
                     Block{row_offset, col_offset, fan});
}

// The reuse factor of a generated tile, for what the Python side reports.
int64_t block_m() { return vera::kBlockM; }

// Asked before choosing the backend: a library built without this GPU's
// architecture (and without PTX it can compile) would fail at the first launch.
std::string kernel_image_problem(int64_t device) {
  const DeviceGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaError_t err = vera::kernel_image_status();
  if (err == cudaSuccess) return "";
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

std::vector<int64_t> compiled_archs() { return vera::compiled_archs(); }

}  // namespace

// One level of indirection, so that VERA_OPS is expanded before the macros paste it.
#define VERA_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define VERA_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

VERA_TORCH_LIBRARY(VERA_OPS, m) {
  m.def("block_m() -> int", &block_m);
  m.def("kernel_image_problem(int device) -> str", &kernel_image_problem);
  m.def("compiled_archs() -> int[]", &compiled_archs);
  m.def(
      "forward(Tensor x, Tensor lambda_d, Tensor lambda_b, int key0, int key1, Tensor? base, "
      "bool generate, Tensor? proj_a=None, Tensor? proj_b=None, bool into_base=False, "
      "Tensor? adapter_ids=None, int dropout_threshold=0, float dropout_scale=1.0, "
      "Tensor? dropout_seed=None, bool tf32=False, int shard_in_offset=0, "
      "int shard_out_offset=0, int shard_in_features=0, Tensor? base_scale=None, "
      "Tensor? base_bias=None) -> (Tensor, Tensor)");
  m.def(
      "backward(Tensor grad, Tensor h, Tensor lambda_d, Tensor lambda_b, int key0, int key1, "
      "int in_features, bool generate, bool need_dx, bool need_dd, bool need_db, "
      "Tensor? proj_a=None, Tensor? proj_b=None, Tensor? adapter_ids=None, "
      "int dropout_threshold=0, float dropout_scale=1.0, Tensor? dropout_seed=None, "
      "Tensor? dx_into=None, bool tf32=False, int shard_in_offset=0, int shard_out_offset=0, "
      "int shard_in_features=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "projection(int matrix, int rows, int cols, int key0, int key1, Tensor like, "
      "int row_offset=0, int col_offset=0, int fan=0) -> Tensor");
}

VERA_TORCH_LIBRARY_IMPL(VERA_OPS, VERA_DISPATCH_KEY, m) {
  m.impl("forward", &vera_forward);
  m.impl("backward", &vera_backward);
  m.impl("projection", &vera_projection);
}
