// Selective scan for ExecuTorch: the custom op `edgeopt::selective_scan.out`.
//
// Semantics are edgeopt.ops.selective_scan's (mamba-ssm's selective_scan_ref), float32:
//   u, delta, z, out (B, D, L); A (D, N); B, C (B, G, N, L), channel d uses group d / (D / G);
//   D, delta_bias (D,) optional; z optional.
//   delta = softplus(delta + delta_bias);  h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t
//   y_t = <h_t, C_t> + D u_t;  out = y * silu(z)
//   reverse_half: the channels of the second half of the G groups scan from t = L-1 down to 0
//   (VMamba's two reversed directions, without flipping their inputs and outputs in the graph).
//
// Why hand-written: ExecuTorch has no scan operator, and the portable chunked graph holds two
// (B, D, L, N) tensors and hundreds of nodes per scan. This kernel makes one pass over L per
// channel with the N states in registers, as the numba kernel (edgeopt/ops/scan_kernel.py) does.
// exp is a polynomial (2^k * e^r, degree 7) so the loop over N vectorizes on AVX and NEON
// without a vector libm; it is clamped to [-87, 88] like the numba kernel.
//
// Work is split over (batch, group, channel block) with ExecuTorch's own thread pool
// (parallel_for, sized by the runtime), and each task transposes its group's B and C to
// time-major (L, N) once, so the inner loop over N reads contiguous memory.
//
// Built by `python -m edgeopt.ops.build_kernels` against the executorch wheel's headers and
// linked to its pybindings library; `edgeopt_selective_scan_f32` is a plain C entry point for
// tests (ctypes) that runs the same code.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

namespace edgeopt {
namespace {

struct ScanArgs {
  const float* u;
  const float* delta;
  const float* A;
  const float* B;
  const float* C;
  const float* D;     // may be null
  const float* z;     // may be null
  const float* bias;  // may be null
  float* out;
  int64_t batch, dim, length, groups, nstate;
  bool softplus;
  bool reverse_half;
};

inline float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float k = std::floor(x * 1.4426950408889634f + 0.5f);
  const float r = x - k * 0.693359375f - k * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// torch's softplus (x above 20 passes through): max(x, 0) + log1p(e), e = exp(-|x|) <= 1, with
// log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3, as an odd series to s^15 (the numba kernel's form):
// no libm call, so the per-token loop vectorizes (with N = 1 it costs as much as the scan itself).
inline float softplus(float x) {
  const float e = exp_poly(-std::fabs(x));
  const float s = e / (2.0f + e), s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  const float r = std::max(x, 0.0f) + 2.0f * s * p;
  return x > 20.0f ? x : r;
}

// Per-channel preamble: dt[t] = softplus(delta + bias), du[t] = dt[t] * u[t].
inline void prepare(const ScanArgs& a, int64_t b, int64_t d, float* dt, float* du) {
  const int64_t L = a.length;
  const float* dl = a.delta + (b * a.dim + d) * L;
  const float* ul = a.u + (b * a.dim + d) * L;
  const float bias = a.bias ? a.bias[d] : 0.0f;
  for (int64_t t = 0; t < L; ++t) {
    const float x = dl[t] + bias;
    dt[t] = a.softplus ? softplus(x) : x;
    du[t] = dt[t] * ul[t];
  }
}

// out = y + D u, times silu(z), in place.
inline void finish(const ScanArgs& a, int64_t b, int64_t d, float* y) {
  const int64_t L = a.length, row = (b * a.dim + d) * L;
  const float* ul = a.u + row;
  if (a.D) {
    const float skip = a.D[d];
    for (int64_t t = 0; t < L; ++t) y[t] += skip * ul[t];
  }
  if (a.z) {
    const float* zl = a.z + row;
    for (int64_t t = 0; t < L; ++t) y[t] *= zl[t] / (1.0f + exp_poly(-zl[t]));
  }
}

// One channel, NS states known at compile time (NS = 0: runtime count a.nstate).
// Bt, Ct: this group's B and C, time-major (L, N).
template <int NS>
void scan_channel(const ScanArgs& a, int64_t b, int64_t d, const float* Bt, const float* Ct, float* dt, float* du,
                  bool reverse) {
  const int64_t L = a.length;
  const int64_t N = NS > 0 ? NS : a.nstate;
  const float* A = a.A + d * N;
  float* y = a.out + (b * a.dim + d) * L;
  prepare(a, b, d, dt, du);
  float h[NS > 0 ? NS : 64];
  std::vector<float> heap;
  float* hs = h;
  if (NS == 0 && N > 64) {
    heap.assign(N, 0.0f);
    hs = heap.data();
  }
  for (int64_t n = 0; n < N; ++n) hs[n] = 0.0f;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t t = reverse ? L - 1 - i : i;
    const float* bt = Bt + t * N;
    const float* ct = Ct + t * N;
    const float step = dt[t], in = du[t];
    float acc = 0.0f;
    for (int64_t n = 0; n < N; ++n) {
      hs[n] = exp_poly(step * A[n]) * hs[n] + in * bt[n];
      acc += hs[n] * ct[n];
    }
    y[t] = acc;
  }
  finish(a, b, d, y);
}

// One state: the recurrence is scalar, so decays are computed for all t first (vectorized).
void scan_channel_n1(const ScanArgs& a, int64_t b, int64_t d, const float* Bg, const float* Cg, float* dt, float* du,
                     bool reverse) {
  const int64_t L = a.length;
  float* y = a.out + (b * a.dim + d) * L;
  prepare(a, b, d, dt, du);
  const float A = a.A[d];
  for (int64_t t = 0; t < L; ++t) dt[t] = exp_poly(dt[t] * A);
  float h = 0.0f;
  if (reverse) {
    for (int64_t t = L - 1; t >= 0; --t) {
      h = dt[t] * h + du[t] * Bg[t];
      y[t] = h * Cg[t];
    }
  } else {
    for (int64_t t = 0; t < L; ++t) {
      h = dt[t] * h + du[t] * Bg[t];
      y[t] = h * Cg[t];
    }
  }
  finish(a, b, d, y);
}

constexpr int64_t kChannelBlock = 32;

// Task = (batch, group, block of channels): transpose the group's B, C once, scan the block.
void run_tasks(const ScanArgs& a, int64_t begin, int64_t end) {
  const int64_t L = a.length, N = a.nstate, dg = a.dim / a.groups;
  const int64_t blocks = (dg + kChannelBlock - 1) / kChannelBlock;
  std::vector<float> dt(L), du(L), Bt(N > 1 ? L * N : 0), Ct(N > 1 ? L * N : 0);
  int64_t transposed = -1;  // (batch * groups + group) whose B/C sit in Bt/Ct
  for (int64_t task = begin; task < end; ++task) {
    const int64_t block = task % blocks, bg = task / blocks, g = bg % a.groups, b = bg / a.groups;
    const float* Bg = a.B + bg * N * L;
    const float* Cg = a.C + bg * N * L;
    if (N > 1 && transposed != bg) {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t t = 0; t < L; ++t) {
          Bt[t * N + n] = Bg[n * L + t];
          Ct[t * N + n] = Cg[n * L + t];
        }
      transposed = bg;
    }
    const int64_t d0 = g * dg + block * kChannelBlock, d1 = std::min(d0 + kChannelBlock, (g + 1) * dg);
    const bool reverse = a.reverse_half && 2 * g >= a.groups;
    for (int64_t d = d0; d < d1; ++d) {
      if (N == 1)
        scan_channel_n1(a, b, d, Bg, Cg, dt.data(), du.data(), reverse);
      else if (N == 16)
        scan_channel<16>(a, b, d, Bt.data(), Ct.data(), dt.data(), du.data(), reverse);
      else
        scan_channel<0>(a, b, d, Bt.data(), Ct.data(), dt.data(), du.data(), reverse);
    }
  }
}

bool run(const ScanArgs& a) {
  const int64_t dg = a.dim / a.groups;
  const int64_t tasks = a.batch * a.groups * ((dg + kChannelBlock - 1) / kChannelBlock);
  return ::executorch::extension::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) { run_tasks(a, begin, end); });
}

}  // namespace

using ::executorch::aten::ScalarType;
using ::executorch::aten::Tensor;
using ::executorch::runtime::Error;
using ::executorch::runtime::KernelRuntimeContext;

namespace {

bool is_f32(const Tensor& t, ssize_t dims) {
  return t.scalar_type() == ScalarType::Float && t.dim() == dims;
}

bool optional_ok(const std::optional<Tensor>& t, ssize_t dims, int64_t size0, int64_t size_last) {
  return !t.has_value() || (is_f32(*t, dims) && t->size(0) == size0 && t->size(dims - 1) == size_last);
}

}  // namespace

Tensor& selective_scan_out(
    KernelRuntimeContext& ctx,
    const Tensor& u,
    const Tensor& delta,
    const Tensor& A,
    const Tensor& B,
    const Tensor& C,
    const std::optional<Tensor>& D,
    const std::optional<Tensor>& z,
    const std::optional<Tensor>& delta_bias,
    bool delta_softplus,
    bool reverse_half,
    Tensor& out) {
  const bool shapes_ok = is_f32(u, 3) && is_f32(delta, 3) && is_f32(A, 2) && is_f32(B, 4) && is_f32(C, 4) &&
      is_f32(out, 3) && delta.numel() == u.numel() && out.numel() == u.numel() && A.size(0) == u.size(1) &&
      B.size(0) == u.size(0) && B.size(1) > 0 && u.size(1) % B.size(1) == 0 && B.size(2) == A.size(1) &&
      B.size(3) == u.size(2) && C.numel() == B.numel() && optional_ok(D, 1, u.size(1), u.size(1)) &&
      optional_ok(delta_bias, 1, u.size(1), u.size(1)) && (!z.has_value() || (is_f32(*z, 3) && z->numel() == u.numel()));
  ET_KERNEL_CHECK_MSG(ctx, shapes_ok, InvalidArgument, out,
                      "edgeopt::selective_scan.out: float32 u/delta/z/out (B, D, L), A (D, N), B/C (B, G, N, L), "
                      "D/delta_bias (D,) expected");
  ScanArgs a{u.const_data_ptr<float>(), delta.const_data_ptr<float>(), A.const_data_ptr<float>(),
             B.const_data_ptr<float>(), C.const_data_ptr<float>(),
             D.has_value() ? D->const_data_ptr<float>() : nullptr,
             z.has_value() ? z->const_data_ptr<float>() : nullptr,
             delta_bias.has_value() ? delta_bias->const_data_ptr<float>() : nullptr,
             out.mutable_data_ptr<float>(), u.size(0), u.size(1), u.size(2), B.size(1), A.size(1), delta_softplus,
             reverse_half};
  ET_KERNEL_CHECK_MSG(ctx, run(a), Internal, out, "edgeopt::selective_scan.out: parallel_for failed");
  return out;
}

}  // namespace edgeopt

namespace edgeopt {
namespace {

// Boxed by hand (not EXECUTORCH_LIBRARY's generated wrapper) so that programs exported before the
// op had `reverse_half` still run, as forward scans (the generated wrapper would read their `out`
// tensor as the bool and abort the process). The stack holds the arguments, `out`, then the
// returned value (`out` again): 11 values for such programs, 12 for current ones.
void selective_scan_boxed(KernelRuntimeContext& ctx, ::executorch::runtime::Span<::executorch::runtime::EValue*> stack) {
  const size_t n = stack.size();
  ET_KERNEL_CHECK_MSG(ctx, n == 11 || n == 12, InvalidArgument, ,
                      "edgeopt::selective_scan.out: expected 11 or 12 stack values, got %zu", n);
  auto optional = [&](size_t i) { return stack[i]->toOptional<Tensor>(); };
  selective_scan_out(ctx, stack[0]->toTensor(), stack[1]->toTensor(), stack[2]->toTensor(), stack[3]->toTensor(),
                     stack[4]->toTensor(), optional(5), optional(6), optional(7), stack[8]->toBool(),
                     n == 12 && stack[9]->toBool(), stack[n - 2]->toTensor());
}

const auto registered = ::executorch::runtime::register_kernel(
    ::executorch::runtime::Kernel("edgeopt::selective_scan.out", selective_scan_boxed));

}  // namespace
}  // namespace edgeopt

// Plain C entry point over the same code (tests, ctypes): returns 0 on success.
extern "C" int edgeopt_selective_scan_f32(const float* u, const float* delta, const float* A, const float* B,
                                          const float* C, const float* D, const float* z, const float* delta_bias,
                                          int softplus, int reverse_half, float* out, int64_t batch, int64_t dim,
                                          int64_t length, int64_t groups, int64_t nstate) {
  if (batch < 1 || dim < 1 || length < 1 || groups < 1 || nstate < 1 || dim % groups) return 1;
  edgeopt::ScanArgs a{u, delta, A, B, C, D, z, delta_bias, out, batch, dim, length, groups, nstate, softplus != 0,
                      reverse_half != 0};
  return edgeopt::run(a) ? 0 : 2;
}
