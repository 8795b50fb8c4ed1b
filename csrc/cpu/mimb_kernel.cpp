// C++ CPU kernels of the Multi-Instance Modulation Block (torch.ops.mipnet_cpu.*).
//
//   mimb_scale_fwd(x, w1, w2, v) -> (y, s)
//   mimb_fwd(x, lam, w1, w2, e1, b1, e2, b2) -> (y, s)   (v = the embedding MLP, in here)
//   mimb_scale_bwd(dy, x, w1, w2, v, s) -> (dx, dw1, dw2, dv)
//   mimb_instances(x, w1, w2, table) -> y            (table [N, C] or per sample [N, B, C])
//   mimb_instances_bwd(dy, x, w1, w2, table) -> (dx, dw1, dw2, dtable)   (see "instances")
//   mimb_train_fwd / mimb_train_bwd: a training step of the whole block, the embedding's
//                  BatchNorm on batch statistics included (see "training embedding")
//
// Schemas and contracts: csrc/schemas.h.  Specification: the PyTorch references in
// mipnet_kernels/ops/mimb.py (ARCHITECTURE.md, "MIMB"):
//   s = mean_hw(x);  z1 = w1 @ s;  h = relu(z1);  e = sigmoid(w2 @ h);  a = e * v;
//   y = x * a[:, :, None, None].
//
// Every op has the same three phases per sample:
//   1. reduce  the per-(sample, channel) sums over H*W: sum(x) (forward, instances) or
//              sum(dy * x) (backward);
//   2. mlp     the tiny O(C*Cr) MLP (forward or backward) on those [C] vectors;
//   3. apply   the elementwise pass: y = x * a, dx = dy * a + g_s / HW, or the N instance
//              outputs from one read of x (backward: dx = sum_n dy_n * a_n + g_s / HW).
// The backward then sums the per-sample weight-gradient outer products over the batch.
//
// Layouts (x is never copied): contiguous NCHW, where a (sample, channel) plane of H*W
// values is contiguous -- the work items are groups of whole planes (~4096 values), each
// plane summed on its own; and channels_last (NHWC), where the C values of a pixel are
// contiguous -- the work items are chunks of pixels, reduced down the pixels with C-wide
// vector accumulators into a per-chunk partial row, and the partial rows of a sample are
// summed in chunk order in phase 2.  Item sizes depend on the shape only.  A tensor that
// is both (C == 1 or H*W == 1) takes the NCHW path, or the NHWC one when H*W == 1 (same
// memory positions).  Outputs: contiguous when x.is_contiguous(), else channels_last.
//
// Parallelism (OpenMP, torch's intra-op thread count): when the batch divides evenly over
// the threads (or is large), one thread runs all three phases of a sample back to back,
// so phase 3 re-reads the sample from its own L2 (in the forward ops, small samples go in
// groups of up to 4 whose phase 2 shares each load of the MLP's weights); otherwise the
// phases run over (sample, item) pairs with a barrier between them, phases 1 and 3 with
// the same static partition, phase 2 over samples (forward: groups of samples).  Each
// output value is computed by one thread in an order fixed by the shape alone (including
// the batch sums of dw1 / dw2, done row by row after a barrier; the MLP's mat-vecs give
// the same bits whichever samples share a group), so every result is bit-identical for
// any thread count.
//
// Vector code: the loops over data and the MLP are in mimb.h, compiled here for the
// baseline ISA and (x86-64) for AVX2 + F16C, plus AVX512-BF16 stores for bfloat16, picked
// at run time by the process-wide path (isa.h: scalar | avx2 | avx512,
// MIPNET_KERNELS_CPU_ISA); all variants give bit-identical results.  Arithmetic is float32 after loading (float16 / bfloat16
// converted exactly like c10), rounded once to the output dtype; no FMA
// (-ffp-contract=off).  The MLP's sigmoid uses a vectorised Cephes expf (~1 ulp).
//
// Uses only PyTorch's stable ABI (torch/csrc/stable, torch/headeronly).

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/MemoryFormat.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../host_utils.h"
#include "isa.h"
#include "vec.h"

namespace mipnet {
namespace cpu {
namespace {

using torch::headeronly::MemoryFormat;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using host::dtype_name;
using host::is_supported_float;
using host::num_threads_for;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

// Channels-last work items: about this many elements per (sample, pixel chunk).
constexpr int64_t kChunkElems = 8192;
constexpr int64_t kMaxChunkPixels = 512;  // bounds the serial float sum inside a chunk

// ==================================================================== helpers
// channels_last-contiguous strides (dims of size 1 may have any stride, as in torch).
bool is_channels_last(const Tensor& t) {
  int64_t expect = 1;
  for (int d : {1, 3, 2, 0}) {
    const int64_t n = t.size(d);
    if (n != 1 && t.stride(d) != expect) return false;
    expect *= n;
  }
  return true;
}

void check_cpu_float(const Tensor& t, const char* op, const char* name, int64_t dims,
                     const char* shape) {
  STD_TORCH_CHECK(t.is_cpu(), "mipnet_cpu::", op, ": ", name, " must be a CPU tensor");
  STD_TORCH_CHECK(t.dim() == dims, "mipnet_cpu::", op, ": ", name, " must be ", dims, "-D ",
                  shape, ", got ", t.dim(), " dims");
  STD_TORCH_CHECK(is_supported_float(t.scalar_type()), "mipnet_cpu::", op, ": ", name,
                  " must be float32, float16 or bfloat16, got ", dtype_name(t.scalar_type()));
}

void check_size(const Tensor& t, const char* op, const char* name, int64_t d, int64_t want,
                const char* what) {
  STD_TORCH_CHECK(t.size(d) == want, "mipnet_cpu::", op, ": ", name, ".size(", d, ") must be ",
                  what, " = ", want, ", got ", t.size(d));
}

// x's layout: whether the outputs are channels_last and which path the kernels take.
struct Layout {
  bool out_cl;  // outputs channels_last (x is not NCHW-contiguous)
  bool nhwc;    // kernels index x as NHWC (identical memory positions when both hold)
};

Layout x_layout(const Tensor& x, const char* op, const char* name) {
  const bool nchw = x.is_contiguous();
  const bool cl = is_channels_last(x);
  STD_TORCH_CHECK(x.size(0) * x.size(1) == 0 || x.size(2) * x.size(3) > 0, "mipnet_cpu::", op,
                  ": ", name, " has an empty spatial size ", x.size(2), "x", x.size(3),
                  "; the mean over H*W is undefined");
  STD_TORCH_CHECK(nchw || cl, "mipnet_cpu::", op, ": ", name,
                  " must be contiguous (NCHW) or channels_last (NHWC); got strides [",
                  x.stride(0), ", ", x.stride(1), ", ", x.stride(2), ", ", x.stride(3),
                  "] for sizes [", x.size(0), ", ", x.size(1), ", ", x.size(2), ", ",
                  x.size(3), "]");
  Layout l;
  l.out_cl = !nchw;
  l.nhwc = !nchw || (x.size(2) * x.size(3) == 1 && x.size(1) > 1);
  return l;
}

Tensor alloc_4d(const Tensor& like, int64_t B, int64_t C, int64_t H, int64_t W, bool cl) {
  if (!cl) return torch::stable::new_empty(like, {B, C, H, W});
  return torch::stable::empty({B, C, H, W}, like.scalar_type(), std::nullopt, like.device(),
                              std::nullopt, MemoryFormat::ChannelsLast);
}

// ==================================================================== vector kernels
// The loops over data live in mimb.h, written once on an 8-lane float vector and compiled
// here per instruction set: the baseline ISA (SSE2 / NEON, two 4-lane halves; float16 /
// bfloat16 through vec.h) and, on x86-64, AVX2 + F16C (and for bfloat16 stores
// AVX512-BF16), picked at run time.  Phase 3 re-reads from L2, where the width of the
// loads and stores, not memory, is the limit (AVX2 halves the time of the SSE2 loops), and
// the float16 / bfloat16 conversions are most of the work of those dtypes.  All variants
// give bit-identical results (mimb.h).

// Streaming kernels of one dtype T (x's).  NCHW: np consecutive planes of hw values;
// NHWC: np consecutive pixel rows of C values.
template <class T>
struct Kern {
  // out[p] = sum(x[p])
  void (*planes_sum)(const T* x, int64_t hw, int64_t np, float* out);
  // out[p] = sum(dy[p] * x[p])
  void (*planes_dot)(const T* dy, const T* x, int64_t hw, int64_t np, float* out);
  // y[p] = x[p] * a[p]
  void (*planes_scale)(const T* x, T* y, int64_t hw, int64_t np, const float* a);
  // dx[p] = dy[p] * a[p] + k[p]
  void (*planes_axpb)(const T* dy, T* dx, int64_t hw, int64_t np, const float* a,
                      const float* k);
  // dx[p] = sum_j dy[j * dstride + p] * a[j * astride + p] + k[p], j < N (N >= 1, j in order)
  void (*planes_axpb_n)(const T* dy, int64_t dstride, int64_t N, T* dx, int64_t hw, int64_t np,
                        const float* a, int64_t astride, const float* k);
  // y[j * ostride + p] = x[p] * a[j * astride + p], j < N
  void (*planes_multi)(const T* x, T* y, int64_t hw, int64_t np, int64_t N, int64_t ostride,
                       const float* a, int64_t astride);
  // y[p, c] = x[p, c] * a[c]
  void (*rows_scale)(const T* x, T* y, const float* a, int64_t C, int64_t np);
  // dx[p, c] = dy[p, c] * a[c] + k[c]
  void (*rows_axpb)(const T* dy, T* dx, const float* a, const float* k, int64_t C, int64_t np);
  // dx[p, c] = sum_j dy[j * dstride + (p, c)] * a[j * astride + c] + k[c], j < N (as above)
  void (*rows_axpb_n)(const T* dy, int64_t dstride, int64_t N, T* dx, const float* a,
                      int64_t astride, const float* k, int64_t C, int64_t np);
  // y[j * ostride + (p, c)] = x[p, c] * a[j * astride + c], j < N
  void (*rows_multi)(const T* x, T* y, int64_t C, int64_t np, int64_t N, int64_t ostride,
                     const float* a, int64_t astride);
  // out[c] = sum_p x[p, c]   (each channel in row order)
  void (*cols_sum)(const T* x, int64_t C, int64_t np, float* out);
  // out[c] = sum_p dy[p, c] * x[p, c]
  void (*cols_dot)(const T* dy, const T* x, int64_t C, int64_t np, float* out);
  // both in one pass, for N dy's dstride apart: out_sum = cols_sum(x) and
  // out_dot[j * os ...] = cols_dot(dy + j * dstride, x), j < N (the same bits)
  void (*cols_sum_dots)(const T* x, const T* dy, int64_t dstride, int64_t N, int64_t C,
                        int64_t np, float* out_sum, float* out_dot, int64_t os);
  // the same for np planes of hw values: out_sum[p] = sum(x[p]), out_dot[j * os + p] =
  // sum(dy[j * dstride + p] * x[p]) (planes_sum / planes_dot's bits)
  void (*planes_sum_dots)(const T* x, const T* dy, int64_t dstride, int64_t N, int64_t hw,
                          int64_t np, float* out_sum, float* out_dot, int64_t os);
  // dst = float(src) / dst = T(src) (round to nearest even), n contiguous values
  void (*to_float)(const T* src, float* dst, int64_t n);
  void (*from_float)(const float* src, T* dst, int64_t n);
};

// The MLP's mat-vecs on a weight matrix of dtype TW ([R, K], rows ld apart).
template <class TW>
struct MatKern {
  // out[r] = sum_k M[r, k] * v[k], r < R
  void (*matvec)(const TW* M, int64_t ld, const float* v, float* out, int64_t R, int64_t K);
  // the same for nb vectors: out[j * os + r] = sum_k M[r, k] * v[j * vs + k], j < nb
  // (bit-identical to matvec per vector; the weights are read once per 4 vectors)
  void (*matvec_multi)(const TW* M, int64_t ld, const float* v, int64_t vs, float* out,
                       int64_t os, int64_t R, int64_t K, int64_t nb);
  // out[k] = sum_r v[r * vs] * M[r, k], k < K, r in order
  void (*mattvec)(const TW* M, int64_t ld, const float* v, int64_t vs, float* out, int64_t R,
                  int64_t K);
};
// e = 1 / (1 + exp(-z)), n values
typedef void (*SigmoidFn)(const float* z, float* e, int64_t n);

// Variants (isa.h): isa_base (not in a build that targets AVX2), isa_avx2 and, for
// bfloat16 stores, isa_avx512bf16; each its own namespace inside the anonymous one.
#if MIPNET_ISA_NATIVE_AVX2
// The whole build targets AVX2 (every AVX2 CPU has F16C): one variant, no dispatch.
#if !defined(__F16C__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("f16c")
#endif
namespace isa_avx2 {
#define MIPNET_MIMB_AVX2 1
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define MIPNET_MIMB_AVX512BF16 1
#endif
#include "mimb.h"
#undef MIPNET_MIMB_AVX2
}  // namespace isa_avx2
template <class T>
const Kern<T>& kern() {
  static const Kern<T> k = isa_avx2::make_kern<T>();
  return k;
}
template <class TW>
const MatKern<TW>& mat_kern() {
  static const MatKern<TW> k = isa_avx2::make_mat_kern<TW>();
  return k;
}
SigmoidFn sigmoid_fn() { return isa_avx2::make_sigmoid(); }
#else
namespace isa_base {
#define MIPNET_MIMB_AVX2 0
#include "mimb.h"
#undef MIPNET_MIMB_AVX2
}  // namespace isa_base

#if MIPNET_ISA_DISPATCH_AVX2
MIPNET_ISA_AVX2_BEGIN
namespace isa_avx2 {
#define MIPNET_MIMB_AVX2 1
#include "mimb.h"
#undef MIPNET_MIMB_AVX2
}  // namespace isa_avx2
MIPNET_ISA_END
#endif

// bfloat16 stores through AVX512-BF16: the AVX2 kernels with one instruction in place of
// the integer rounding.  Only make_kern<BFloat16> is used.
#if MIPNET_ISA_DISPATCH_AVX512BF16
MIPNET_ISA_AVX512BF16_BEGIN
namespace isa_avx512bf16 {
#define MIPNET_MIMB_AVX2 1
#define MIPNET_MIMB_AVX512BF16 1
#include "mimb.h"
#undef MIPNET_MIMB_AVX2
}  // namespace isa_avx512bf16
MIPNET_ISA_END
#endif

// The variant of each path (isa.h's setting, read on every call): scalar -> isa_base,
// avx2 -> isa_avx2, avx512 -> isa_avx2 with, for bfloat16 data on CPUs with AVX512-BF16,
// isa_avx512bf16's stores (the MIMB loops are memory-bound at 8 lanes; 16-lane bodies
// did not pay).  Every variant gives bit-identical results: the same lane count (8 on the
// AVX2 paths, 2 x 4 on the baseline) and the same order of every sum.
template <class T>
Kern<T> kern_for(Isa isa) {
#if MIPNET_ISA_DISPATCH_AVX512BF16
  if constexpr (std::is_same<T, BFloat16>::value) {
    if (isa == Isa::kAvx512 && cpu_has_avx512bf16()) return isa_avx512bf16::make_kern<T>();
  }
#endif
#if MIPNET_ISA_DISPATCH_AVX2
  if (isa != Isa::kScalar && isa_supported(Isa::kAvx2)) return isa_avx2::make_kern<T>();
#endif
  return isa_base::make_kern<T>();
}
template <class T>
const Kern<T>& kern() {
  return isa_variant<Kern<T>, &kern_for<T>>();
}
template <class TW>
MatKern<TW> mat_kern_for(Isa isa) {
#if MIPNET_ISA_DISPATCH_AVX2
  if (isa != Isa::kScalar && isa_supported(Isa::kAvx2)) return isa_avx2::make_mat_kern<TW>();
#endif
  return isa_base::make_mat_kern<TW>();
}
template <class TW>
const MatKern<TW>& mat_kern() {
  return isa_variant<MatKern<TW>, &mat_kern_for<TW>>();
}
SigmoidFn sigmoid_fn() {
#if MIPNET_ISA_DISPATCH_AVX2
  if (current_isa() != Isa::kScalar && isa_supported(Isa::kAvx2)) return isa_avx2::make_sigmoid();
#endif
  return isa_base::make_sigmoid();
}
#endif

// A weight matrix [R, K] as the MLP reads it: its own data and dtype when its rows are
// contiguous, else a float32 copy.
struct Mat {
  const void* p;
  ScalarType dt;
  int64_t ld;  // elements between rows

  // out[r] = sum_k M[r, k] * v[k], r < R
  void matvec(const float* v, float* out, int64_t R, int64_t K) const {
    switch (dt) {
      case ScalarType::Half:
        return mat_kern<Half>().matvec(static_cast<const Half*>(p), ld, v, out, R, K);
      case ScalarType::BFloat16:
        return mat_kern<BFloat16>().matvec(static_cast<const BFloat16*>(p), ld, v, out, R, K);
      default: return mat_kern<float>().matvec(static_cast<const float*>(p), ld, v, out, R, K);
    }
  }
  // out[j * os + r] = sum_k M[r, k] * v[j * vs + k], r < R, j < nb (each as matvec)
  void matvec_multi(const float* v, int64_t vs, float* out, int64_t os, int64_t R, int64_t K,
                    int64_t nb) const {
    switch (dt) {
      case ScalarType::Half:
        return mat_kern<Half>().matvec_multi(static_cast<const Half*>(p), ld, v, vs, out, os, R,
                                             K, nb);
      case ScalarType::BFloat16:
        return mat_kern<BFloat16>().matvec_multi(static_cast<const BFloat16*>(p), ld, v, vs,
                                                 out, os, R, K, nb);
      default:
        return mat_kern<float>().matvec_multi(static_cast<const float*>(p), ld, v, vs, out, os,
                                              R, K, nb);
    }
  }
  // out[k] = sum_r v[r] * M[r, k], k < K
  void mattvec(const float* v, float* out, int64_t R, int64_t K) const {
    switch (dt) {
      case ScalarType::Half:
        return mat_kern<Half>().mattvec(static_cast<const Half*>(p), ld, v, 1, out, R, K);
      case ScalarType::BFloat16:
        return mat_kern<BFloat16>().mattvec(static_cast<const BFloat16*>(p), ld, v, 1, out, R,
                                            K);
      default:
        return mat_kern<float>().mattvec(static_cast<const float*>(p), ld, v, 1, out, R, K);
    }
  }
};

struct Mlp {
  Mat w1;  // [Cr, C]
  Mat w2;  // [C, Cr]
  int64_t C, Cr;
  SigmoidFn sigmoid = sigmoid_fn();

  // z1 = w1 @ s, h = relu(z1) (NaN propagates, as torch.relu), e = sigmoid(w2 @ h) for
  // nb consecutive samples (s, z2, e: rows of C; z1, h: rows of Cr); z2: scratch.  Several
  // samples share each weight load (matvec_multi), with results bit-identical to one
  // sample at a time.
  void forward(const float* s, float* z1, float* h, float* z2, float* e, int64_t nb = 1) const {
    w1.matvec_multi(s, C, z1, Cr, Cr, C, nb);
    for (int64_t r = 0; r < nb * Cr; ++r) h[r] = z1[r] < 0.f ? 0.f : z1[r];
    w2.matvec_multi(h, Cr, z2, C, C, Cr, nb);
    for (int64_t j = 0; j < nb; ++j) sigmoid(z2 + j * C, e + j * C, C);
  }

  // The backward from g_z2 (one sample) to the dx bias: g_h = w2^T g_z2, g_z1 = g_h *
  // (z1 > 0) (into gz1), g_s = w1^T g_z1, bias = g_s / n (into bias, C values).
  void backward_to_bias(const float* gz2, const float* z1, float* gz1, float* bias, float n) const {
    w2.mattvec(gz2, gz1, C, Cr);
    for (int64_t r = 0; r < Cr; ++r) gz1[r] = z1[r] > 0.f ? gz1[r] : 0.f;
    w1.mattvec(gz1, bias, Cr, C);
    for (int64_t c = 0; c < C; ++c) bias[c] = bias[c] / n;
  }
};

// A small 2-D operand as contiguous float32: the tensor's own data when it already is,
// else converted into buf.
template <class T>
void to_float_2d(const T* src, int64_t R, int64_t K, int64_t s0, int64_t s1, float* dst) {
  if (s1 == 1 && (s0 == K || R == 1)) return kern<T>().to_float(src, dst, R * K);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < K; ++k) dst[r * K + k] = static_cast<float>(src[r * s0 + k * s1]);
}

const float* as_float_2d(const Tensor& t, std::vector<float>& buf) {
  const int64_t R = t.size(0), K = t.size(1);
  if (t.scalar_type() == ScalarType::Float && t.is_contiguous())
    return static_cast<const float*>(t.data_ptr());
  buf.resize(static_cast<size_t>(R * K));
  const int64_t s0 = t.stride(0), s1 = t.stride(1);
  const void* p = t.data_ptr();
  switch (t.scalar_type()) {
    case ScalarType::Half: to_float_2d(static_cast<const Half*>(p), R, K, s0, s1, buf.data()); break;
    case ScalarType::BFloat16:
      to_float_2d(static_cast<const BFloat16*>(p), R, K, s0, s1, buf.data());
      break;
    default: to_float_2d(static_cast<const float*>(p), R, K, s0, s1, buf.data()); break;
  }
  return buf.data();
}

Mat as_mat(const Tensor& w, std::vector<float>& buf) {
  if (w.stride(1) == 1 || w.size(1) <= 1) return Mat{w.data_ptr(), w.scalar_type(), w.stride(0)};
  return Mat{as_float_2d(w, buf), ScalarType::Float, w.size(1)};
}

// n floats -> dst + offset (contiguous, dtype dt), rounded to nearest even.
void store_floats(const float* src, void* dst, ScalarType dt, int64_t offset, int64_t n) {
  switch (dt) {
    case ScalarType::Half: kern<Half>().from_float(src, static_cast<Half*>(dst) + offset, n); break;
    case ScalarType::BFloat16:
      kern<BFloat16>().from_float(src, static_cast<BFloat16*>(dst) + offset, n);
      break;
    default: {
      float* d = static_cast<float*>(dst) + offset;
      if (d != src) std::copy(src, src + n, d);
      break;
    }
  }
}

// An output of n values computed in float32: the output's own data when its dtype is
// float32, else a float32 scratch whose values store() / finish() round once into it.
// Not copyable (f may point into buf).
class F32Out {
 public:
  F32Out(void* dst, ScalarType dt, int64_t n) : dst_(dst), dt_(dt), n_(n) {
    if (dt == ScalarType::Float) {
      f = static_cast<float*>(dst);
    } else {
      buf_.resize(static_cast<size_t>(n));
      f = buf_.data();
    }
  }
  explicit F32Out(const Tensor& t) : F32Out(t.data_ptr(), t.scalar_type(), t.numel()) {}
  F32Out(const F32Out&) = delete;
  F32Out& operator=(const F32Out&) = delete;

  // values [off, off + n) into the output (a no-op for float32 outputs)
  void store(int64_t off, int64_t n) const {
    if (dt_ != ScalarType::Float) store_floats(f + off, dst_, dt_, off, n);
  }
  void finish() const { store(0, n_); }

  float* f;

 private:
  void* dst_;
  ScalarType dt_;
  int64_t n_;
  std::vector<float> buf_;
};

// ==================================================================== geometry + driver
// How a sample's work is split into parts, each a contiguous span of memory:
//  NCHW: groups of `group` consecutive planes of about kPlaneBlock values in all (a plane
//        of more than kPlaneBlock values is a part of its own, summed in kPlaneBlock
//        blocks whose sums are added in order);
//  NHWC: chunks of `chunk` pixels (chunk * C values); a chunk reduces to a partial row of
//        C sums, and the partial rows of a sample are added in chunk order in phase 2.
constexpr int64_t kPlaneBlock = 4096;

struct Geometry {
  int64_t B, C, HW;
  bool nhwc;
  int64_t chunk = 0;    // NHWC: pixels per part
  int64_t group = 0;    // NCHW: planes per part
  int64_t parts = 0;    // parts per sample
  int64_t red_len = 0;  // floats of phase-1 partial sums per sample

  Geometry(int64_t B_, int64_t C_, int64_t HW_, bool nhwc_) : B(B_), C(C_), HW(HW_), nhwc(nhwc_) {
    if (nhwc) {
      chunk = std::max<int64_t>(
          1, std::min<int64_t>(kMaxChunkPixels, (kChunkElems + C - 1) / std::max<int64_t>(C, 1)));
      parts = (HW + chunk - 1) / chunk;
      red_len = parts * C;
    } else {
      group = HW == 0 ? std::max<int64_t>(C, 1)
                      : std::max<int64_t>(1, std::min<int64_t>(C, kPlaneBlock / HW));
      parts = (C + group - 1) / group;
      red_len = C;
    }
  }

  // Phase-1 partial sums of sample b (red: B * red_len floats) -> sum[C], in a fixed order.
  void finish_sum(const float* red, int64_t b, float* sum) const {
    const float* r = red + b * red_len;
    if (!nhwc) {
      std::copy(r, r + C, sum);
      return;
    }
    if (parts == 0) {
      std::fill(sum, sum + C, 0.f);
      return;
    }
    std::copy(r, r + C, sum);
    for (int64_t k = 1; k < parts; ++k) {
      const float* q = r + k * C;
      for (int64_t c = 0; c < C; ++c) sum[c] += q[c];
    }
  }

  // Part k of sample b: its first element, and its planes (NCHW) or pixels (NHWC).
  int64_t part_offset(int64_t b, int64_t k) const {
    return nhwc ? (b * HW + k * chunk) * C : (b * C + k * group) * HW;
  }
  int64_t part_count(int64_t k) const {
    return nhwc ? std::min(chunk, HW - k * chunk) : std::min(group, C - k * group);
  }
};

// Samples per phase-2 call of the forward ops: up to 4 (matvec_multi's tile, which reads
// the MLP's weights once per 4 samples), and in per-sample mode only as many as keep the
// group's x in L2 (kGroupBytes, a quarter of a 1 MB L2: phase 3 re-reads it, and writes y).
constexpr int64_t kGroupBytes = 256 * 1024;
constexpr int64_t kMaxGroup = 4;
int64_t mid_group(const Geometry& g, int64_t elem_bytes) {
  const int64_t bytes = std::max<int64_t>(1, g.C * g.HW * elem_bytes);
  return std::clamp<int64_t>(kGroupBytes / bytes, 1, kMaxGroup);
}

// Runs reduce(b, part) for every part of every sample, then mid(b0, nb) on groups of at
// most `group` consecutive samples b0 .. b0 + nb - 1, then apply(b, part), then post(i)
// for i < npost after all samples are done.  Either per sample: each thread takes a
// contiguous block of samples and runs all three phases group by group (batch divisible
// by the team, or large: the group stays in that thread's cache); or phase by phase over
// (sample, part) items, phases 1 and 3 with the same static partition, phase 2 over
// groups (of at most ceil(B / nt) samples, so that every thread gets some).  Which samples
// share a group never changes a result (mid is bit-identical for any grouping).
template <class Reduce, class Mid, class Apply, class Post>
void run_phases(const Geometry& g, int64_t elems, int64_t group, const Reduce& reduce,
                const Mid& mid, const Apply& apply, int64_t npost, const Post& post) {
  const int64_t B = g.B, P = g.parts, items = B * P;
  const int nt = num_threads_for(std::max(items, npost), elems);
  const bool per_sample = nt == 1 || B % nt == 0 || B >= 4 * nt;
  group = std::max<int64_t>(1, group);
  if (per_sample) {
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      // Block t of the batch (a team smaller than nt runs several blocks).
#pragma omp for schedule(static, 1)
      for (int t = 0; t < nt; ++t) {
        const int64_t end = B * (t + 1) / nt;
        for (int64_t b0 = B * t / nt; b0 < end; b0 += group) {
          const int64_t nb = std::min(group, end - b0);
          for (int64_t b = b0; b < b0 + nb; ++b)
            for (int64_t k = 0; k < P; ++k) reduce(b, k);
          mid(b0, nb);
          for (int64_t b = b0; b < b0 + nb; ++b)
            for (int64_t k = 0; k < P; ++k) apply(b, k);
        }
      }
#pragma omp for schedule(static)
      for (int64_t i = 0; i < npost; ++i) post(i);
    }
  } else {
    group = std::min(group, (B + nt - 1) / nt);
    const int64_t ngroups = (B + group - 1) / group;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
      for (int64_t it = 0; it < items; ++it) reduce(it / P, it % P);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < ngroups; ++i) mid(i * group, std::min(group, B - i * group));
#pragma omp for schedule(static) nowait
      for (int64_t it = 0; it < items; ++it) apply(it / P, it % P);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < npost; ++i) post(i);
    }
  }
}

struct NoPost {
  void operator()(int64_t) const {}
};

// Phase 1 for one (sample, part): plane sums (NCHW) or a chunk's partial row (NHWC) of x
// (DOT: of dy * x), into red (B * g.red_len floats).
template <class T, bool DOT>
void reduce_part(const Geometry& g, const Kern<T>& K, const T* x, const T* dy, int64_t b,
                 int64_t k, float* red) {
  const int64_t off = g.part_offset(b, k), cnt = g.part_count(k);
  if (!g.nhwc) {
    float* out = red + b * g.C + k * g.group;
    if (g.HW <= kPlaneBlock) {
      if (DOT)
        K.planes_dot(dy + off, x + off, g.HW, cnt, out);
      else
        K.planes_sum(x + off, g.HW, cnt, out);
    } else {  // one plane, in blocks
      float sum = 0.f;
      for (int64_t i = 0; i < g.HW; i += kPlaneBlock) {
        const int64_t n = std::min(kPlaneBlock, g.HW - i);
        float part;
        if (DOT)
          K.planes_dot(dy + off + i, x + off + i, n, 1, &part);
        else
          K.planes_sum(x + off + i, n, 1, &part);
        sum += part;
      }
      *out = sum;
    }
  } else {
    float* out = red + b * g.red_len + k * g.C;
    if (DOT)
      K.cols_dot(dy + off, x + off, g.C, cnt, out);
    else
      K.cols_sum(x + off, g.C, cnt, out);
  }
}

// ==================================================================== forward
// Extras of the forward's phase 2: `vb(b0, nb)` gives the embedding rows v[b0 .. b0 + nb)
// (float32, C apart; computed there, in parallel, by mimb_fwd and the training op), and,
// for the fused training op, when non-null e_out / z1_out [B, C] / [B, Cr] receive the excite
// MLP's e and z1 (saved so that the backward does not recompute them).
template <class VRow>
struct FwdExtras {
  VRow vb;
  float* e_out = nullptr;
  float* z1_out = nullptr;
};

template <class T, class VRow>
void scale_fwd_impl(const Geometry& g, const T* x, T* y, const Mlp& mlp,
                    const FwdExtras<VRow>& ex, float* s) {
  const int64_t B = g.B, C = g.C, Cr = mlp.Cr, HW = g.HW;
  std::vector<float> red(static_cast<size_t>(B * g.red_len));
  std::vector<float> a(static_cast<size_t>(B * C)), z2(static_cast<size_t>(B * C));
  std::vector<float> z1(ex.z1_out ? 0 : static_cast<size_t>(B * Cr));
  std::vector<float> h(static_cast<size_t>(B * Cr));
  float* pz1 = ex.z1_out ? ex.z1_out : z1.data();
  const float n_f = static_cast<float>(HW);
  const Kern<T>& K = kern<T>();
  auto reduce = [&](int64_t b, int64_t k) { reduce_part<T, false>(g, K, x, x, b, k, red.data()); };
  // Phase 2 for samples b0 .. b0 + nb - 1 (one MLP pass over the group).
  auto mid = [&](int64_t b0, int64_t nb) {
    for (int64_t b = b0; b < b0 + nb; ++b) {
      float* sb = s + b * C;
      g.finish_sum(red.data(), b, sb);
      for (int64_t c = 0; c < C; ++c) sb[c] = sb[c] / n_f;
    }
    mlp.forward(s + b0 * C, pz1 + b0 * Cr, h.data() + b0 * Cr, z2.data() + b0 * C,
                a.data() + b0 * C, nb);
    const float* v = ex.vb(b0, nb) - b0 * C;
    for (int64_t b = b0; b < b0 + nb; ++b) {
      float* ab = a.data() + b * C;
      if (ex.e_out) std::copy(ab, ab + C, ex.e_out + b * C);
      const float* vb = v + b * C;
      for (int64_t c = 0; c < C; ++c) ab[c] = ab[c] * vb[c];  // a = e * v
    }
  };
  const float* pa = a.data();
  auto apply = [&](int64_t b, int64_t k) {
    const int64_t off = g.part_offset(b, k), cnt = g.part_count(k);
    if (g.nhwc) {
      K.rows_scale(x + off, y + off, pa + b * C, C, cnt);
    } else if (HW <= kPlaneBlock) {
      K.planes_scale(x + off, y + off, HW, cnt, pa + b * C + k * g.group);
    } else {
      for (int64_t i = 0; i < HW; i += kPlaneBlock)
        K.planes_scale(x + off + i, y + off + i, std::min(kPlaneBlock, HW - i), 1, pa + b * C + k);
    }
  };
  run_phases(g, B * C * HW * 2, mid_group(g, sizeof(T)), reduce, mid, apply, 0, NoPost{});
}

// v given as a float32 [B, C] array.
struct GivenV {
  const float* v;
  int64_t C;
  const float* operator()(int64_t b0, int64_t) const { return v + b0 * C; }
};

// Checks of x, w1, w2 shared by the forward ops.
void check_scale_xw(const Tensor& x, const Tensor& w1, const Tensor& w2, const char* op) {
  check_cpu_float(x, op, "x", 4, "[B, C, H, W]");
  check_cpu_float(w1, op, "w1", 2, "[Cr, C]");
  check_cpu_float(w2, op, "w2", 2, "[C, Cr]");
  check_size(w1, op, "w1", 1, x.size(1), "C (x.size(1))");
  check_size(w2, op, "w2", 0, x.size(1), "C (x.size(1))");
  check_size(w2, op, "w2", 1, w1.size(0), "Cr (w1.size(0))");
}

// The forward's outputs (y, s) and its scale phase with a given v [B, C] (float32 contiguous).
struct ScaleFwd {
  Tensor y, s;
  Layout lay;
  int64_t B, C, HW;
};

ScaleFwd scale_fwd_alloc(const Tensor& x, const char* op) {
  const Layout lay = x_layout(x, op, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  Tensor y = alloc_4d(x, B, C, H, W, lay.out_cl);
  Tensor s = torch::stable::new_empty(x, {B, C}, ScalarType::Float);
  return ScaleFwd{y, s, lay, B, C, H * W};
}

template <class VRow>
void scale_fwd_run(const ScaleFwd& o, const Tensor& x, const Tensor& w1, const Tensor& w2,
                   const FwdExtras<VRow>& ex, float* ps) {
  std::vector<float> b1, b2;
  const Mlp mlp{as_mat(w1, b1), as_mat(w2, b2), o.C, w1.size(0)};
  const Geometry g(o.B, o.C, o.HW, o.lay.nhwc);
  const Tensor& y = o.y;
  switch (x.scalar_type()) {
    case ScalarType::Half:
      scale_fwd_impl(g, static_cast<const Half*>(x.data_ptr()), static_cast<Half*>(y.data_ptr()),
                     mlp, ex, ps);
      break;
    case ScalarType::BFloat16:
      scale_fwd_impl(g, static_cast<const BFloat16*>(x.data_ptr()),
                     static_cast<BFloat16*>(y.data_ptr()), mlp, ex, ps);
      break;
    default:
      scale_fwd_impl(g, static_cast<const float*>(x.data_ptr()),
                     static_cast<float*>(y.data_ptr()), mlp, ex, ps);
      break;
  }
}

void scale_fwd_run(const ScaleFwd& o, const Tensor& x, const Tensor& w1, const Tensor& w2,
                   const float* pv) {
  scale_fwd_run(o, x, w1, w2, FwdExtras<GivenV>{GivenV{pv, o.C}},
                static_cast<float*>(o.s.data_ptr()));
}

std::tuple<Tensor, Tensor> mimb_scale_fwd_cpu(Tensor x, Tensor w1, Tensor w2, Tensor v) {
  const char* op = "mimb_scale_fwd";
  check_scale_xw(x, w1, w2, op);
  check_cpu_float(v, op, "v", 2, "[B, C]");
  check_size(v, op, "v", 0, x.size(0), "B (x.size(0))");
  check_size(v, op, "v", 1, x.size(1), "C (x.size(1))");
  const ScaleFwd o = scale_fwd_alloc(x, op);
  if (o.B * o.C == 0) return std::make_tuple(o.y, o.s);
  std::vector<float> bv;
  scale_fwd_run(o, x, w1, w2, as_float_2d(v, bv));
  return std::make_tuple(o.y, o.s);
}

// A 1-D operand [n] (any float dtype, any stride) as contiguous float32.
const float* as_float_1d(const Tensor& t, std::vector<float>& buf) {
  const int64_t n = t.size(0), st = t.stride(0);
  if (t.scalar_type() == ScalarType::Float && (st == 1 || n <= 1))
    return static_cast<const float*>(t.data_ptr());
  buf.resize(static_cast<size_t>(n));
  const void* p = t.data_ptr();
  switch (t.scalar_type()) {
    case ScalarType::Half: to_float_2d(static_cast<const Half*>(p), 1, n, 0, st, buf.data()); break;
    case ScalarType::BFloat16:
      to_float_2d(static_cast<const BFloat16*>(p), 1, n, 0, st, buf.data());
      break;
    default: to_float_2d(static_cast<const float*>(p), 1, n, 0, st, buf.data()); break;
  }
  return buf.data();
}

// v[b0 .. b0 + nb) = sigmoid(e2 @ relu(e1 @ lam[b] + b1) + b2) of mimb_fwd, computed in
// phase 2 for a group of samples (any thread): each mat-vec over the whole group, so that
// each weight load serves several samples (matvec_multi; bit-identical to one at a time).
struct EmbedV {
  const float *lam, *b1, *b2;  // [B, N], [K], [C]
  const Mat *e1, *e2;          // [K, N], [C, K]
  SigmoidFn sigmoid;
  float *h, *z, *v;  // [B, K], [B, C] scratch; v [B, C]
  int64_t C, K, N;
  const float* operator()(int64_t b0, int64_t nb) const {
    float* hg = h + b0 * K;
    float* zg = z + b0 * C;
    e1->matvec_multi(lam + b0 * N, N, hg, K, K, N, nb);
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t k = 0; k < K; ++k) {
        const float zh = hg[j * K + k] + b1[k];
        hg[j * K + k] = zh < 0.f ? 0.f : zh;  // NaN propagates, as torch.relu
      }
    e2->matvec_multi(hg, K, zg, C, C, K, nb);
    for (int64_t j = 0; j < nb; ++j) {
      float* zb = zg + j * C;
      for (int64_t c = 0; c < C; ++c) zb[c] = zb[c] + b2[c];
      sigmoid(zb, v + (b0 + j) * C, C);
    }
    return v + b0 * C;
  }
};

// v[b0 .. b0 + nb) copied from the rows computed per distinct lam row (mimb_fwd).
struct DistinctV {
  const float* vu;       // [U, C]
  const int64_t* first;  // [B]: sample b's row of vu
  float* v;              // [B, C]
  int64_t C;
  const float* operator()(int64_t b0, int64_t nb) const {
    for (int64_t b = b0; b < b0 + nb; ++b) {
      const float* src = vu + first[b] * C;
      std::copy(src, src + C, v + b * C);
    }
    return v + b0 * C;
  }
};

// mimb_scale_fwd with v = sigmoid(e2 @ relu(e1 @ lam[b] + b1) + b2) computed here (float32).
std::tuple<Tensor, Tensor> mimb_fwd_cpu(Tensor x, Tensor lam, Tensor w1, Tensor w2, Tensor e1,
                                        Tensor b1, Tensor e2, Tensor b2) {
  const char* op = "mimb_fwd";
  check_scale_xw(x, w1, w2, op);
  check_cpu_float(lam, op, "lam", 2, "[B, N]");
  check_cpu_float(e1, op, "e1", 2, "[K, N]");
  check_cpu_float(b1, op, "b1", 1, "[K]");
  check_cpu_float(e2, op, "e2", 2, "[C, K]");
  check_cpu_float(b2, op, "b2", 1, "[C]");
  const int64_t B = x.size(0), C = x.size(1), N = lam.size(1), K = e1.size(0);
  check_size(lam, op, "lam", 0, B, "B (x.size(0))");
  check_size(e1, op, "e1", 1, N, "N (lam.size(1))");
  check_size(b1, op, "b1", 0, K, "K (e1.size(0))");
  check_size(e2, op, "e2", 0, C, "C (x.size(1))");
  check_size(e2, op, "e2", 1, K, "K (e1.size(0))");
  check_size(b2, op, "b2", 0, C, "C (x.size(1))");
  const ScaleFwd o = scale_fwd_alloc(x, op);
  if (B * C == 0) return std::make_tuple(o.y, o.s);

  // The embedding, B * (K * N + C * K) multiply-adds, runs in phase 2 (EmbedV), or once per
  // distinct lam row before the phases (DistinctV).
  std::vector<float> bl, bb1, bb2, be1, be2;
  const Mat m1 = as_mat(e1, be1), m2 = as_mat(e2, be2);
  const float* pl = as_float_2d(lam, bl);
  const float *pb1 = as_float_1d(b1, bb1), *pb2 = as_float_1d(b2, bb2);
  // v depends on lam[b] alone, and lam usually has few distinct rows (one-hot instance
  // selectors: N of them).  With at most min(B / 2, kMaxDistinctLam) distinct rows
  // (bitwise; the search costs B * that * N compares at most), v is computed once per
  // distinct row before the phases (the same bits: EmbedV's mat-vecs do not depend on the
  // grouping) and phase 2 copies each sample's row.
  constexpr int64_t kMaxDistinctLam = 32;
  const int64_t max_u = std::min<int64_t>(B / 2, kMaxDistinctLam);
  std::vector<int64_t> first(static_cast<size_t>(B));  // the distinct row of sample b
  std::vector<int64_t> uniq;                           // the first sample of each
  bool few = true;
  for (int64_t b = 0; b < B && few; ++b) {
    int64_t u = 0;
    const int64_t nu = static_cast<int64_t>(uniq.size());
    while (u < nu && std::memcmp(pl + uniq[u] * N, pl + b * N, sizeof(float) * N) != 0) ++u;
    if (u == nu) {
      few = nu < max_u;
      uniq.push_back(b);
    }
    first[b] = u;
  }
  const int64_t U = static_cast<int64_t>(uniq.size());
  if (few) {
    std::vector<float> lu(static_cast<size_t>(U * N)), vu(static_cast<size_t>(U * C)),
        z(static_cast<size_t>(U * C)), h(static_cast<size_t>(U * K));
    for (int64_t u = 0; u < U; ++u)
      std::copy(pl + uniq[u] * N, pl + (uniq[u] + 1) * N, lu.data() + u * N);
    const EmbedV ev{lu.data(), pb1, pb2, &m1, &m2, sigmoid_fn(), h.data(), z.data(), vu.data(),
                    C, K, N};
    for (int64_t u0 = 0; u0 < U; u0 += 4) ev(u0, std::min<int64_t>(4, U - u0));
    std::vector<float> v(static_cast<size_t>(B * C));
    const DistinctV vrow{vu.data(), first.data(), v.data(), C};
    scale_fwd_run(o, x, w1, w2, FwdExtras<DistinctV>{vrow},
                  static_cast<float*>(o.s.data_ptr()));
    return std::make_tuple(o.y, o.s);
  }
  std::vector<float> v(static_cast<size_t>(B * C)), z(static_cast<size_t>(B * C)),
      h(static_cast<size_t>(B * K));
  const EmbedV vrow{pl, pb1, pb2, &m1, &m2, sigmoid_fn(), h.data(), z.data(), v.data(), C, K, N};
  scale_fwd_run(o, x, w1, w2, FwdExtras<EmbedV>{vrow},
                static_cast<float*>(o.s.data_ptr()));
  return std::make_tuple(o.y, o.s);
}

// ==================================================================== backward
struct BwdOut {
  void* dw1;  // [Cr, C] contiguous, dtype t1
  void* dw2;  // [C, Cr] contiguous, dtype t2
  void* dv;   // [B, C] contiguous, dtype tv
  ScalarType t1, t2, tv;
};

// Extras of the backward for the fused training op: e / z1 [B, C] / [B, Cr] saved by the
// forward (else recomputed from s); hook.sample(b, dv_b) runs in phase 2 once sample b's
// dv (float32 [C]) is known, and hook.post(i), i < hook.npost, after the weight-gradient
// rows (all of phase 2 done) -- both in parallel with the other samples / rows.
struct NoBwdHook {
  int64_t npost = 0;
  void sample(int64_t, const float*) const {}
  void post(int64_t) const {}
};

// Row i < C + Cr of the backward's weight gradients, summed over the batch (b in order):
// dw2[i, :] = sum_b g_z2[b, i] h[b, :] (i < C), else dw1[r, :] = sum_b g_z1[b, r] s[b, :]
// (r = i - C); rounded into the outputs.  Rows are independent (phase "post").
struct WeightGradRows {
  int64_t B, C, Cr;
  const float *h, *gz2, *s, *gz1;  // [B, Cr], [B, C], [B, C], [B, Cr]
  const F32Out *dw1, *dw2;
  void operator()(int64_t i) const {
    if (i < C) {
      mat_kern<float>().mattvec(h, Cr, gz2 + i, C, dw2->f + i * Cr, B, Cr);
      dw2->store(i * Cr, Cr);
    } else {
      const int64_t r = i - C;
      mat_kern<float>().mattvec(s, C, gz1 + r, Cr, dw1->f + r * C, B, C);
      dw1->store(r * C, C);
    }
  }
};

template <class T, class Hook = NoBwdHook>
void scale_bwd_impl(const Geometry& g, const T* dy, const T* x, T* dx, const Mlp& mlp,
                    const float* v, const float* s, const BwdOut& out,
                    const float* e_saved = nullptr, const float* z1_saved = nullptr,
                    const Hook& hook = Hook{}) {
  const int64_t B = g.B, C = g.C, Cr = mlp.Cr, HW = g.HW;
  std::vector<float> red(static_cast<size_t>(B * g.red_len));
  std::vector<float> a(static_cast<size_t>(B * C)), kk(static_cast<size_t>(B * C));
  std::vector<float> gz2(static_cast<size_t>(B * C)), tmp(static_cast<size_t>(2 * B * C));
  std::vector<float> z1(static_cast<size_t>(B * Cr)), h(static_cast<size_t>(B * Cr));
  std::vector<float> gz1(static_cast<size_t>(B * Cr));
  F32Out dw1(out.dw1, out.t1, Cr * C), dw2(out.dw2, out.t2, C * Cr);
  const float n_f = static_cast<float>(HW);

  const Kern<T>& K = kern<T>();
  auto reduce = [&](int64_t b, int64_t k) { reduce_part<T, true>(g, K, x, dy, b, k, red.data()); };
  auto mid = [&](int64_t b) {
    const float* sb = s + b * C;
    const float* vb = v + b * C;
    float* ga = tmp.data() + 2 * b * C;  // g_a = sum_hw(dy * x), then dv
    g.finish_sum(red.data(), b, ga);
    float* z1b = z1.data() + b * Cr;
    float* hb = h.data() + b * Cr;
    float* gz1b = gz1.data() + b * Cr;
    float* gz2b = gz2.data() + b * C;
    float* ab = a.data() + b * C;
    float* kb = kk.data() + b * C;
    const float* eb;
    if (e_saved) {
      eb = e_saved + b * C;
      const float* zs = z1_saved + b * Cr;
      for (int64_t r = 0; r < Cr; ++r) {
        z1b[r] = zs[r];
        hb[r] = zs[r] < 0.f ? 0.f : zs[r];  // as Mlp::forward
      }
    } else {
      float* ebuf = ga + C;  // z2, then e
      mlp.forward(sb, z1b, hb, kb, ebuf);
      eb = ebuf;
    }
    for (int64_t c = 0; c < C; ++c) {
      const float e = eb[c];
      const float gac = ga[c];
      ab[c] = e * vb[c];
      ga[c] = gac * e;  // dv
      const float ge = gac * vb[c];
      gz2b[c] = ge * (1.f - e) * e;  // sigmoid_backward: grad * (1 - y) * y
    }
    store_floats(ga, out.dv, out.tv, b * C, C);
    hook.sample(b, ga);
    mlp.backward_to_bias(gz2b, z1b, gz1b, kb, n_f);  // the dx bias g_s / HW
  };
  const float* pa = a.data();
  const float* pk = kk.data();
  auto apply = [&](int64_t b, int64_t k) {
    const int64_t off = g.part_offset(b, k), cnt = g.part_count(k);
    if (g.nhwc) {
      K.rows_axpb(dy + off, dx + off, pa + b * C, pk + b * C, C, cnt);
    } else {
      const int64_t i0 = b * C + k * g.group;
      if (HW <= kPlaneBlock) {
        K.planes_axpb(dy + off, dx + off, HW, cnt, pa + i0, pk + i0);
      } else {
        for (int64_t i = 0; i < HW; i += kPlaneBlock)
          K.planes_axpb(dy + off + i, dx + off + i, std::min(kPlaneBlock, HW - i), 1, pa + i0,
                        pk + i0);
      }
    }
  };
  const WeightGradRows rows{B, C, Cr, h.data(), gz2.data(), s, gz1.data(), &dw1, &dw2};
  auto post = [&](int64_t i) {
    if (i < C + Cr)
      rows(i);
    else
      hook.post(i - C - Cr);
  };
  // The backward's phase 2 stays one sample at a time (groups of 1).
  auto mid1 = [&](int64_t b0, int64_t nb) {
    for (int64_t b = b0; b < b0 + nb; ++b) mid(b);
  };
  run_phases(g, B * C * HW * 3, 1, reduce, mid1, apply, C + Cr + hook.npost, post);
}

// Checks of the backward's operands (op: the calling op's name, for messages).
// dy [B, C, H, W] with x's shape and dtype (instances >= 0: [instances * B, C, H, W], the
// instances' blocks stacked), returned in x's layout (autograd may hand over another one,
// e.g. an expanded gradient).
Tensor check_dy(Tensor dy, const Tensor& x, const Layout& lay, const char* op,
                int64_t instances = -1) {
  check_cpu_float(dy, op, "dy", 4, instances >= 0 ? "[N*B, C, H, W]" : "[B, C, H, W]");
  for (int64_t d = 0; d < 4; ++d) {
    const int64_t want = d == 0 && instances >= 0 ? instances * x.size(0) : x.size(d);
    if (instances >= 0) {
      STD_TORCH_CHECK(dy.size(d) == want, "mipnet_cpu::", op, ": dy must be [N*B, C, H, W] = [",
                      instances * x.size(0), ", ", x.size(1), ", ", x.size(2), ", ", x.size(3),
                      "] (N = table.size(0), x [B, C, H, W]); size ", dy.size(d), " != ", want,
                      " at dim ", d);
    } else {
      STD_TORCH_CHECK(dy.size(d) == want, "mipnet_cpu::", op,
                      ": dy must have the shape of x; size ", dy.size(d), " != ", want,
                      " at dim ", d);
    }
  }
  STD_TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "mipnet_cpu::", op, ": dy is ",
                  dtype_name(dy.scalar_type()), " but x is ", dtype_name(x.scalar_type()));
  const bool dy_ok = lay.nhwc ? is_channels_last(dy) : dy.is_contiguous();
  if (!dy_ok)
    dy = torch::stable::contiguous(dy, lay.nhwc ? MemoryFormat::ChannelsLast
                                                : MemoryFormat::Contiguous);
  return dy;
}

Tensor check_scale_bwd(Tensor dy, const Tensor& x, const Tensor& w1, const Tensor& w2,
                       const Tensor& v, const Tensor& s, const Layout& lay, const char* op) {
  check_cpu_float(x, op, "x", 4, "[B, C, H, W]");
  check_cpu_float(w1, op, "w1", 2, "[Cr, C]");
  check_cpu_float(w2, op, "w2", 2, "[C, Cr]");
  check_cpu_float(v, op, "v", 2, "[B, C]");
  check_cpu_float(s, op, "s", 2, "[B, C]");
  const int64_t B = x.size(0), C = x.size(1);
  check_size(w1, op, "w1", 1, C, "C (x.size(1))");
  check_size(w2, op, "w2", 0, C, "C (x.size(1))");
  check_size(w2, op, "w2", 1, w1.size(0), "Cr (w1.size(0))");
  check_size(v, op, "v", 0, B, "B (x.size(0))");
  check_size(v, op, "v", 1, C, "C (x.size(1))");
  check_size(s, op, "s", 0, B, "B (x.size(0))");
  check_size(s, op, "s", 1, C, "C (x.size(1))");
  return check_dy(dy, x, lay, op);
}

// The backward's data passes and MLP (B * C > 0): dx into dx, the rest into `out`.
template <class Hook = NoBwdHook>
void scale_bwd_run(const Tensor& dy, const Tensor& x, const Tensor& dx, const Tensor& w1,
                   const Tensor& w2, const float* pv, const float* ps, const Layout& lay,
                   const BwdOut& out, const float* e_saved = nullptr,
                   const float* z1_saved = nullptr, const Hook& hook = Hook{}) {
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  std::vector<float> b1, b2;
  const Mlp mlp{as_mat(w1, b1), as_mat(w2, b2), C, w1.size(0)};
  const Geometry g(B, C, HW, lay.nhwc);
  switch (x.scalar_type()) {
    case ScalarType::Half:
      scale_bwd_impl(g, static_cast<const Half*>(dy.data_ptr()),
                     static_cast<const Half*>(x.data_ptr()), static_cast<Half*>(dx.data_ptr()),
                     mlp, pv, ps, out, e_saved, z1_saved, hook);
      break;
    case ScalarType::BFloat16:
      scale_bwd_impl(g, static_cast<const BFloat16*>(dy.data_ptr()),
                     static_cast<const BFloat16*>(x.data_ptr()),
                     static_cast<BFloat16*>(dx.data_ptr()), mlp, pv, ps, out, e_saved, z1_saved,
                     hook);
      break;
    default:
      scale_bwd_impl(g, static_cast<const float*>(dy.data_ptr()),
                     static_cast<const float*>(x.data_ptr()), static_cast<float*>(dx.data_ptr()),
                     mlp, pv, ps, out, e_saved, z1_saved, hook);
      break;
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> mimb_scale_bwd_cpu(Tensor dy, Tensor x, Tensor w1,
                                                              Tensor w2, Tensor v, Tensor s) {
  const char* op = "mimb_scale_bwd";
  check_cpu_float(x, op, "x", 4, "[B, C, H, W]");
  const Layout lay = x_layout(x, op, "x");
  dy = check_scale_bwd(dy, x, w1, w2, v, s, lay, op);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cr = w1.size(0);
  Tensor dx = alloc_4d(x, B, C, H, W, lay.out_cl);
  Tensor dw1 = torch::stable::new_empty(w1, {Cr, C});
  Tensor dw2 = torch::stable::new_empty(w2, {C, Cr});
  Tensor dv = torch::stable::new_empty(v, {B, C});
  if (B * C == 0) {
    torch::stable::zero_(dw1);
    torch::stable::zero_(dw2);
    return std::make_tuple(dx, dw1, dw2, dv);
  }
  std::vector<float> bv, bs;
  const BwdOut out{dw1.data_ptr(), dw2.data_ptr(), dv.data_ptr(), w1.scalar_type(),
                   w2.scalar_type(), v.scalar_type()};
  scale_bwd_run(dy, x, dx, w1, w2, as_float_2d(v, bv), as_float_2d(s, bs), lay, out);
  return std::make_tuple(dx, dw1, dw2, dv);
}

// ==================================================================== training step
// The official block in training mode (SELambdaLayer: fc_lambda's BatchNorm1d on batch
// statistics), embedding included, so that a training step of a MIMB is one forward and
// one backward call:
//   z = lam @ e1.T + b1                          [B, K]
//   mean, var = batch mean / biased variance of z (float64 sums)
//   zn = (z - mean) * invstd,  invstd = 1 / sqrt(var + eps)
//   a = gamma * zn + beta;  h = relu(a);  v = sigmoid(h @ e2.T + b2)          [B, C]
// then the block as mimb_scale_fwd with that v, and the running statistics updated as
// torch's BatchNorm does: running = (1 - momentum) * running + momentum * batch (unbiased
// variance, B / (B - 1)).  Without the BatchNorm (batch_norm=false): a = zn = z, and
// gamma, beta, the running statistics are unused (may be empty).
//
// The statistics (O(B * K * N)) are serial; the per-sample O(C * K) parts run in the
// block's phase 2 (v[b] forward; dv -> du -> dh backward) and the O(B * C * K) gradient
// of e2 in its post phase, in parallel like the excite MLP.
//
// Precision of the BatchNorm path.  z -> zn and its backward (dz, de1, db1, dlam) run in
// float64: they are O(B * K * N), nothing next to the block, and they are the one
// ill-conditioned part of the step.  With batch statistics over a few samples whose
// selectors are close (soft lam, small B), std_b(z) can be ~1 % of |z|: float32 rounding of
// z is amplified by |z| / std into zn, and the backward's
// dz = invstd * (g - mean(g) - zn * mean(g * zn)) cancels terms ~|g| down to a result
// ~|g| / std.  Measured (tests/test_nn.py's case B=3, C=48, soft lam): the float32
// evaluation orders of the official modules leave 0.9e-3 .. 3.9e-3 of error in de1
// (|de1| <= 73.5) depending on the BLAS code path, this float64 path 1.2e-5.
//
// The forward saves one float32 state tensor for the backward:
//   [ s: B*C | v: B*C | e: B*C | z1: B*Cr | zn: B*K | zn_lo: B*K | invstd: 2K (BatchNorm) ]
// (e and z1 of the excite MLP, so the backward does not recompute them).  zn and invstd
// are float64 values kept as float pairs (hi = float(d), lo = float(d - hi): 48 bits);
// zn (the hi part) is also the float32 zn the rest of the step uses.

struct TrainState {
  float *s, *v, *e, *z1, *zn, *zn_lo, *invstd;  // invstd: [hi: K | lo: K]
  static int64_t numel(int64_t B, int64_t C, int64_t Cr, int64_t K, bool bn) {
    return B * (3 * C + Cr + 2 * K) + (bn ? 2 * K : 0);
  }
  TrainState(float* p, int64_t B, int64_t C, int64_t Cr, int64_t K)
      : s(p), v(s + B * C), e(v + B * C), z1(e + B * C), zn(z1 + B * Cr), zn_lo(zn + B * K),
        invstd(zn_lo + B * K) {}
};

// A float64 value as a pair of floats (and back): 48 significant bits in a float32 tensor.
inline void split_double(double d, float* hi, float* lo) {
  *hi = static_cast<float>(d);
  *lo = static_cast<float>(d - static_cast<double>(*hi));
}
inline double join_double(float hi, float lo) {
  return static_cast<double>(hi) + static_cast<double>(lo);
}

void check_vec(const Tensor& t, const char* op, const char* name, int64_t n, const char* what) {
  check_cpu_float(t, op, name, 1, "[K]");
  check_size(t, op, name, 0, n, what);
}

void check_running(const Tensor& t, const char* op, const char* name, int64_t K) {
  STD_TORCH_CHECK(t.is_cpu() && t.dim() == 1 && t.size(0) == K &&
                      t.scalar_type() == ScalarType::Float && t.is_contiguous(),
                  "mipnet_cpu::", op, ": ", name, " must be a contiguous float32 CPU tensor [K] = [",
                  K, "]");
}

// Checks shared by the training forward and backward: lam [B, N], e1 [K, N], e2 [C, K],
// gamma / beta [K] when batch_norm.
void check_embed_train(const Tensor& lam, const Tensor& e1, const Tensor& e2,
                       const Tensor& gamma, const Tensor& beta, int64_t B, int64_t C,
                       bool batch_norm, const char* op) {
  check_cpu_float(lam, op, "lam", 2, "[B, N]");
  check_cpu_float(e1, op, "e1", 2, "[K, N]");
  check_cpu_float(e2, op, "e2", 2, "[C, K]");
  const int64_t N = lam.size(1), K = e1.size(0);
  check_size(lam, op, "lam", 0, B, "B (x.size(0))");
  check_size(e1, op, "e1", 1, N, "N (lam.size(1))");
  check_size(e2, op, "e2", 0, C, "C (x.size(1))");
  check_size(e2, op, "e2", 1, K, "K (e1.size(0))");
  if (batch_norm) {
    check_vec(gamma, op, "gamma", K, "K (e1.size(0))");
    check_vec(beta, op, "beta", K, "K (e1.size(0))");
    STD_TORCH_CHECK(B > 1, "mipnet_cpu::", op,
                    ": the embedding's BatchNorm needs more than 1 sample per batch in training "
                    "(batch statistics), got B = ", B);
  }
}

// v[b0 .. b0 + nb) of the training forward, computed in phase 2 (a group of samples, any
// thread; e2's mat-vec over the whole group, bit-identical to one sample at a time).
struct TrainV {
  const float *zn, *gam, *bet, *b2;
  const Mat* e2;
  SigmoidFn sigmoid;
  float *h, *u, *v;  // [B, K], [B, C] scratch; v: the state's
  int64_t C, K;
  bool bn;
  const float* operator()(int64_t b0, int64_t nb) const {
    for (int64_t b = b0; b < b0 + nb; ++b) {
      float* hb = h + b * K;
      const float* zb = zn + b * K;
      for (int64_t k = 0; k < K; ++k) {
        const float a = bn ? gam[k] * zb[k] + bet[k] : zb[k];
        hb[k] = a < 0.f ? 0.f : a;  // NaN propagates, as torch.relu
      }
    }
    e2->matvec_multi(h + b0 * K, K, u + b0 * C, C, C, K, nb);
    for (int64_t b = b0; b < b0 + nb; ++b) {
      float* ub = u + b * C;
      for (int64_t c = 0; c < C; ++c) ub[c] = ub[c] + b2[c];
      sigmoid(ub, v + b * C, C);
    }
    return v + b0 * C;
  }
};

std::tuple<Tensor, Tensor> mimb_train_fwd_cpu(Tensor x, Tensor lam, Tensor w1, Tensor w2,
                                              Tensor e1, Tensor b1, Tensor gamma, Tensor beta,
                                              Tensor e2, Tensor b2, Tensor running_mean,
                                              Tensor running_var, double momentum, double eps,
                                              bool batch_norm) {
  const char* op = "mimb_train_fwd";
  check_scale_xw(x, w1, w2, op);
  const int64_t B = x.size(0), C = x.size(1), N = lam.size(1), K = e1.size(0);
  const int64_t Cr = w1.size(0);
  check_embed_train(lam, e1, e2, gamma, beta, B, C, batch_norm, op);
  check_vec(b1, op, "b1", K, "K (e1.size(0))");
  check_vec(b2, op, "b2", C, "C (x.size(1))");
  const bool track = batch_norm && running_mean.numel() > 0;
  if (track) {
    check_running(running_mean, op, "running_mean", K);
    check_running(running_var, op, "running_var", K);
  }
  const Layout lay = x_layout(x, op, "x");
  const int64_t H = x.size(2), W = x.size(3);
  Tensor y = alloc_4d(x, B, C, H, W, lay.out_cl);
  Tensor state = torch::stable::new_empty(
      x, {TrainState::numel(B, C, Cr, K, batch_norm)}, ScalarType::Float);
  if (B * C == 0) {
    torch::stable::zero_(state);
    return std::make_tuple(y, state);
  }
  const TrainState st(static_cast<float*>(state.data_ptr()), B, C, Cr, K);

  // z = lam @ e1.T + b1, then the batch statistics, in float64 (serial, O(B * K * N)).
  std::vector<float> bl, be1, bb1, bb2, be2, bg, bbt;
  const float* pl = as_float_2d(lam, bl);
  const float* pe1 = as_float_2d(e1, be1);
  const float* pb1 = as_float_1d(b1, bb1);
  const Mat m2 = as_mat(e2, be2);
  std::vector<double> z(static_cast<size_t>(B * K));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) {
      double acc = 0.0;
      for (int64_t n = 0; n < N; ++n)
        acc += static_cast<double>(pe1[k * N + n]) * static_cast<double>(pl[b * N + n]);
      z[b * K + k] = acc + static_cast<double>(pb1[k]);
    }
  const float* pg = nullptr;
  const float* pbt = nullptr;
  if (batch_norm) {
    pg = as_float_1d(gamma, bg);
    pbt = as_float_1d(beta, bbt);
    float* prm = track ? static_cast<float*>(running_mean.data_ptr()) : nullptr;
    float* prv = track ? static_cast<float*>(running_var.data_ptr()) : nullptr;
    for (int64_t k = 0; k < K; ++k) {
      double sum = 0.0;
      for (int64_t b = 0; b < B; ++b) sum += z[b * K + k];
      const double mean = sum / static_cast<double>(B);
      double ss = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        const double d = z[b * K + k] - mean;
        ss += d * d;
      }
      const double is = 1.0 / std::sqrt(ss / static_cast<double>(B) + eps);
      split_double(is, st.invstd + k, st.invstd + K + k);
      for (int64_t b = 0; b < B; ++b) z[b * K + k] = (z[b * K + k] - mean) * is;
      if (track) {
        prm[k] = static_cast<float>((1.0 - momentum) * prm[k] + momentum * mean);
        prv[k] = static_cast<float>((1.0 - momentum) * prv[k] +
                                    momentum * ss / static_cast<double>(B - 1));
      }
    }
  }
  for (int64_t i = 0; i < B * K; ++i) split_double(z[i], st.zn + i, st.zn_lo + i);
  std::vector<float> h(static_cast<size_t>(B * K)), u(static_cast<size_t>(B * C));
  const TrainV vrow{st.zn, pg, pbt, as_float_1d(b2, bb2), &m2, sigmoid_fn(),
                    h.data(), u.data(), st.v, C, K, batch_norm};
  const ScaleFwd o{y, Tensor(), lay, B, C, H * W};
  scale_fwd_run(o, x, w1, w2, FwdExtras<TrainV>{vrow, st.e, st.z1}, st.s);
  return std::make_tuple(y, state);
}

// The backward's per-sample dv -> (du, dh) and the e2 / b2 gradient rows (see above).
struct TrainBwdHook {
  int64_t npost;  // C: one post item per row of de2
  int64_t B, C, K;
  bool bn;
  const float *v, *zn, *gam, *bet;
  const Mat* e2;
  float *du, *h, *da;  // [B, C], [B, K], [B, K]
  float *de2, *db2;    // [C, K], [C] float32
  void sample(int64_t b, const float* dvb) const {
    float* dub = du + b * C;
    const float* vb = v + b * C;
    for (int64_t c = 0; c < C; ++c) dub[c] = dvb[c] * (1.f - vb[c]) * vb[c];  // sigmoid
    float* dab = da + b * K;
    e2->mattvec(dub, dab, C, K);  // dh = du @ e2
    const float* zb = zn + b * K;
    float* hb = h + b * K;
    for (int64_t k = 0; k < K; ++k) {
      const float a = bn ? gam[k] * zb[k] + bet[k] : zb[k];
      hb[k] = a < 0.f ? 0.f : a;
      dab[k] = a > 0.f ? dab[k] : 0.f;  // relu backward (threshold_backward)
    }
  }
  // de2[c, :] = sum_b du[b, c] h[b, :];  db2[c] = sum_b du[b, c]   (b in order)
  void post(int64_t c) const {
    mat_kern<float>().mattvec(h, K, du + c, C, de2 + c * K, B, K);
    float acc = 0.f;
    for (int64_t b = 0; b < B; ++b) acc += du[b * C + c];
    db2[c] = acc;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
mimb_train_bwd_cpu(Tensor dy, Tensor x, Tensor lam, Tensor w1, Tensor w2, Tensor e1,
                   Tensor gamma, Tensor beta, Tensor e2, Tensor state, bool batch_norm) {
  const char* op = "mimb_train_bwd";
  check_scale_xw(x, w1, w2, op);
  const Layout lay = x_layout(x, op, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cr = w1.size(0);
  dy = check_dy(dy, x, lay, op);
  check_embed_train(lam, e1, e2, gamma, beta, B, C, batch_norm, op);
  const int64_t N = lam.size(1), K = e1.size(0);
  STD_TORCH_CHECK(state.is_cpu() && state.scalar_type() == ScalarType::Float &&
                      state.is_contiguous() && state.dim() == 1 &&
                      state.numel() == TrainState::numel(B, C, Cr, K, batch_norm),
                  "mipnet_cpu::", op, ": state must be the forward's float32 state of ",
                  TrainState::numel(B, C, Cr, K, batch_norm), " values, got ", state.numel());

  Tensor dx = alloc_4d(x, B, C, H, W, lay.out_cl);
  Tensor dw1 = torch::stable::new_empty(w1, {Cr, C});
  Tensor dw2 = torch::stable::new_empty(w2, {C, Cr});
  Tensor dlam = torch::stable::new_empty(lam, {B, N});
  Tensor de1 = torch::stable::new_empty(e1, {K, N});
  Tensor db1 = torch::stable::new_empty(e1, {K});
  Tensor dgamma = torch::stable::new_empty(batch_norm ? gamma : e1, {batch_norm ? K : 0});
  Tensor dbeta = torch::stable::new_empty(batch_norm ? beta : e1, {batch_norm ? K : 0});
  Tensor de2 = torch::stable::new_empty(e2, {C, K});
  Tensor db2 = torch::stable::new_empty(e2, {C});
  auto result = [&] {
    return std::make_tuple(dx, dlam, dw1, dw2, de1, db1, dgamma, dbeta, de2, db2);
  };
  if (B * C == 0) {
    for (Tensor* t : {&dw1, &dw2, &dlam, &de1, &db1, &dgamma, &dbeta, &de2, &db2})
      torch::stable::zero_(*t);
    return result();
  }
  const TrainState st(static_cast<float*>(state.data_ptr()), B, C, Cr, K);

  std::vector<float> bl, be1, be2, bg, bbt;
  const Mat m2 = as_mat(e2, be2);
  const float* pg = batch_norm ? as_float_1d(gamma, bg) : nullptr;
  const float* pbt = batch_norm ? as_float_1d(beta, bbt) : nullptr;
  std::vector<float> du(static_cast<size_t>(B * C)), h(static_cast<size_t>(B * K)),
      da(static_cast<size_t>(B * K));
  const F32Out de2o(de2), db2o(db2);
  const TrainBwdHook hook{C, B, C, K, batch_norm, st.v, st.zn, pg, pbt, &m2,
                          du.data(), h.data(), da.data(), de2o.f, db2o.f};
  // dv is written into du (float32), then turned into du by the hook, sample by sample.
  const BwdOut out{dw1.data_ptr(), dw2.data_ptr(), du.data(), w1.scalar_type(),
                   w2.scalar_type(), ScalarType::Float};
  scale_bwd_run(dy, x, dx, w1, w2, st.v, st.s, lay, out, st.e, st.z1, hook);
  de2o.finish();
  db2o.finish();

  // dz from da in float64 (serial, O(B * K * N); see "Precision" above): through the
  // BatchNorm when present,
  //   dgamma = sum_b da * zn;  dbeta = sum_b da;  g = da * gamma
  //   dz = invstd * (g - mean_b(g) - zn * mean_b(g * zn))
  std::vector<double> dz(static_cast<size_t>(B * K));
  if (batch_norm) {
    const F32Out dgo(dgamma), dbto(dbeta);
    float* dg = dgo.f;
    float* dbt = dbto.f;
    const double inv_b = 1.0 / static_cast<double>(B);
    for (int64_t k = 0; k < K; ++k) {
      double sg = 0.0, sgz = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        const double d = da[b * K + k], zk = join_double(st.zn[b * K + k], st.zn_lo[b * K + k]);
        sg += d;
        sgz += d * zk;
      }
      dg[k] = static_cast<float>(sgz);
      dbt[k] = static_cast<float>(sg);
      // g = da * gamma: mean_b(g) = gamma * sg / B, mean_b(g * zn) = gamma * sgz / B
      const double gam = pg[k], mg = gam * sg * inv_b, mgz = gam * sgz * inv_b;
      const double is = join_double(st.invstd[k], st.invstd[K + k]);
      for (int64_t b = 0; b < B; ++b) {
        const double zk = join_double(st.zn[b * K + k], st.zn_lo[b * K + k]);
        dz[b * K + k] = is * (static_cast<double>(da[b * K + k]) * gam - mg - zk * mgz);
      }
    }
    dgo.finish();
    dbto.finish();
  } else {
    for (int64_t i = 0; i < B * K; ++i) dz[i] = da[i];
  }
  // de1[k, :] = sum_b dz[b, k] lam[b, :];  db1[k] = sum_b dz[b, k];  dlam[b] = dz[b] @ e1
  const float* pl = as_float_2d(lam, bl);
  const float* pe1 = as_float_2d(e1, be1);
  const F32Out de1o(de1), db1o(db1), dlamo(dlam);
  float* de1f = de1o.f;
  float* db1f = db1o.f;
  float* dlamf = dlamo.f;
  for (int64_t k = 0; k < K; ++k) {
    double acc = 0.0;
    for (int64_t b = 0; b < B; ++b) acc += dz[b * K + k];
    db1f[k] = static_cast<float>(acc);
    for (int64_t n = 0; n < N; ++n) {
      double g = 0.0;
      for (int64_t b = 0; b < B; ++b) g += dz[b * K + k] * static_cast<double>(pl[b * N + n]);
      de1f[k * N + n] = static_cast<float>(g);
    }
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n) {
      double g = 0.0;
      for (int64_t k = 0; k < K; ++k) g += dz[b * K + k] * static_cast<double>(pe1[k * N + n]);
      dlamf[b * N + n] = static_cast<float>(g);
    }
  de1o.finish();
  db1o.finish();
  dlamo.finish();
  return result();
}

// ==================================================================== instances
// The instances' rows t[n, b] of `table`: [N, C] (one row per instance) or [N, B, C] (one
// row per output sample), as float32 (the tensor's own data when it is float32 and
// contiguous, else converted into buf).
struct TableRows {
  const float* p;
  int64_t N, nstride, bstride;  // t[n, b] = p + n * nstride + b * bstride
  bool per_sample;              // [N, B, C]
  const float* row(int64_t n, int64_t b) const { return p + n * nstride + b * bstride; }
};

void check_table(const Tensor& table, int64_t B, int64_t C, const char* op) {
  STD_TORCH_CHECK(table.is_cpu(), "mipnet_cpu::", op, ": table must be a CPU tensor");
  STD_TORCH_CHECK(table.dim() == 2 || table.dim() == 3, "mipnet_cpu::", op,
                  ": table must be 2-D [N, C] or 3-D [N, B, C], got ", table.dim(), " dims");
  STD_TORCH_CHECK(is_supported_float(table.scalar_type()), "mipnet_cpu::", op,
                  ": table must be float32, float16 or bfloat16, got ",
                  dtype_name(table.scalar_type()));
  if (table.dim() == 3) check_size(table, op, "table", 1, B, "B (x.size(0))");
  check_size(table, op, "table", table.dim() - 1, C, "C (x.size(1))");
}

TableRows table_rows(const Tensor& table, std::vector<float>& buf) {
  const int64_t N = table.size(0);
  if (table.dim() == 2) {
    const int64_t C = table.size(1);
    return TableRows{as_float_2d(table, buf), N, C, 0, false};
  }
  const int64_t B = table.size(1), C = table.size(2);
  if (table.scalar_type() == ScalarType::Float && table.is_contiguous())
    return TableRows{static_cast<const float*>(table.data_ptr()), N, B * C, C, true};
  buf.resize(static_cast<size_t>(N * B * C));
  const int64_t s0 = table.stride(0), s1 = table.stride(1), s2 = table.stride(2);
  const void* p = table.data_ptr();
  for (int64_t n = 0; n < N; ++n) {
    float* dst = buf.data() + n * B * C;
    switch (table.scalar_type()) {
      case ScalarType::Half:
        to_float_2d(static_cast<const Half*>(p) + n * s0, B, C, s1, s2, dst);
        break;
      case ScalarType::BFloat16:
        to_float_2d(static_cast<const BFloat16*>(p) + n * s0, B, C, s1, s2, dst);
        break;
      default: to_float_2d(static_cast<const float*>(p) + n * s0, B, C, s1, s2, dst); break;
    }
  }
  return TableRows{buf.data(), N, B * C, C, true};
}

template <class T>
void instances_impl(const Geometry& g, const T* x, T* y, const Mlp& mlp, const TableRows& t) {
  const int64_t B = g.B, C = g.C, Cr = mlp.Cr, HW = g.HW, N = t.N;
  std::vector<float> red(static_cast<size_t>(B * g.red_len));
  std::vector<float> s(static_cast<size_t>(B * C)), e(static_cast<size_t>(B * C));
  std::vector<float> z2(static_cast<size_t>(B * C));
  std::vector<float> z1(static_cast<size_t>(B * Cr)), h(static_cast<size_t>(B * Cr));
  std::vector<float> a(static_cast<size_t>(N * B * C));  // a[(n * B + b) * C + c]
  const float n_f = static_cast<float>(HW);
  const int64_t ostride = B * C * HW;  // one instance's block of the output
  const Kern<T>& K = kern<T>();
  auto reduce = [&](int64_t b, int64_t k) { reduce_part<T, false>(g, K, x, x, b, k, red.data()); };
  // Phase 2 for samples b0 .. b0 + nb - 1 (one MLP pass over the group).
  auto mid = [&](int64_t b0, int64_t nb) {
    for (int64_t b = b0; b < b0 + nb; ++b) {
      float* sb = s.data() + b * C;
      g.finish_sum(red.data(), b, sb);
      for (int64_t c = 0; c < C; ++c) sb[c] = sb[c] / n_f;
    }
    mlp.forward(s.data() + b0 * C, z1.data() + b0 * Cr, h.data() + b0 * Cr,
                z2.data() + b0 * C, e.data() + b0 * C, nb);
    for (int64_t b = b0; b < b0 + nb; ++b) {
      const float* eb = e.data() + b * C;
      for (int64_t n = 0; n < N; ++n) {
        const float* tr = t.row(n, b);
        float* ar = a.data() + (n * B + b) * C;
        for (int64_t c = 0; c < C; ++c) ar[c] = eb[c] * tr[c];
      }
    }
  };
  // x is read once per part; the N outputs are written from registers.
  auto apply = [&](int64_t b, int64_t k) {
    const int64_t off = g.part_offset(b, k), cnt = g.part_count(k);
    if (g.nhwc) {
      K.rows_multi(x + off, y + off, C, cnt, N, ostride, a.data() + b * C, B * C);
    } else {
      const float* ab = a.data() + b * C + k * g.group;
      if (HW <= kPlaneBlock) {
        K.planes_multi(x + off, y + off, HW, cnt, N, ostride, ab, B * C);
      } else {
        for (int64_t i = 0; i < HW; i += kPlaneBlock)
          K.planes_multi(x + off + i, y + off + i, std::min(kPlaneBlock, HW - i), 1, N, ostride,
                         ab, B * C);
      }
    }
  };
  run_phases(g, B * C * HW * (1 + N), mid_group(g, sizeof(T)), reduce, mid, apply, 0,
             NoPost{});
}

Tensor mimb_instances_cpu(Tensor x, Tensor w1, Tensor w2, Tensor table) {
  const char* op = "mimb_instances";
  check_scale_xw(x, w1, w2, op);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  check_table(table, B, C, op);
  const int64_t N = table.size(0);
  const Layout lay = x_layout(x, op, "x");

  Tensor y = alloc_4d(x, N * B, C, H, W, lay.out_cl);
  if (N * B * C * HW == 0) return y;

  std::vector<float> b1, b2, bt;
  const Mlp mlp{as_mat(w1, b1), as_mat(w2, b2), C, w1.size(0)};
  const TableRows t = table_rows(table, bt);
  const Geometry g(B, C, HW, lay.nhwc);
  switch (x.scalar_type()) {
    case ScalarType::Half:
      instances_impl(g, static_cast<const Half*>(x.data_ptr()), static_cast<Half*>(y.data_ptr()),
                     mlp, t);
      break;
    case ScalarType::BFloat16:
      instances_impl(g, static_cast<const BFloat16*>(x.data_ptr()),
                     static_cast<BFloat16*>(y.data_ptr()), mlp, t);
      break;
    default:
      instances_impl(g, static_cast<const float*>(x.data_ptr()),
                     static_cast<float*>(y.data_ptr()), mlp, t);
      break;
  }
  return y;
}

// The instances' backward, fused: the sum over n of mimb_scale_bwd(dy_n, x, w1, w2, t[n, :])
// (dy_n = dy[n*B : (n+1)*B]).  Given x, the excite e[b] is shared by the instances and the
// block is linear in (dy_n, t[n]), so per sample
//   phase 1  reads x and each dy_n once (x from L1 again past the first pass's two
//            instances): s = sum_hw(x) / HW, g_a[n] = sum_hw(dy_n * x);
//   phase 2  one excite MLP forward and backward (not N): with a[n] = e * t[n, b],
//            dv[n] = g_a[n] * e;  g_e = sum_n g_a[n] * t[n, b] (n in order);
//            g_z2 = g_e * (1 - e) * e; then g_z1, g_s and the dw1 / dw2 rows' terms once;
//   phase 3  dx = sum_n dy_n * a[n] + g_s / HW in one pass (n in order; no dx temporaries).
// dw1 / dw2 (and dtable [N, C], the sum over b) are summed over the batch after a barrier,
// row by row in b order, as in mimb_scale_bwd.  N = 1 gives mimb_scale_bwd's results bit
// for bit (with the forward's s).
struct InstBwdOut {
  void* dw1;     // [Cr, C] contiguous, dtype t1
  void* dw2;     // [C, Cr] contiguous, dtype t2
  void* dtable;  // [N, B, C] or [N, C] contiguous, dtype tt
  ScalarType t1, t2, tt;
};

template <class T>
void instances_bwd_impl(const Geometry& g, const T* dy, const T* x, T* dx, const Mlp& mlp,
                        const TableRows& t, const InstBwdOut& out) {
  const int64_t B = g.B, C = g.C, Cr = mlp.Cr, HW = g.HW, N = t.N;
  const int64_t dstride = B * C * HW;  // one instance's block of dy
  std::vector<float> redx(static_cast<size_t>(B * g.red_len));
  std::vector<float> redd(static_cast<size_t>(N * B * g.red_len));  // [n][b][red_len]
  std::vector<float> s(static_cast<size_t>(B * C)), kk(static_cast<size_t>(B * C));
  std::vector<float> e(static_cast<size_t>(B * C)), gz2(static_cast<size_t>(B * C));
  std::vector<float> ga(static_cast<size_t>(N * B * C));  // g_a, then dv: [(n * B + b) * C + c]
  std::vector<float> a(static_cast<size_t>(N * B * C));   // a[(n * B + b) * C + c]
  std::vector<float> z1(static_cast<size_t>(B * Cr)), h(static_cast<size_t>(B * Cr));
  std::vector<float> gz1(static_cast<size_t>(B * Cr));
  F32Out dw1(out.dw1, out.t1, Cr * C), dw2(out.dw2, out.t2, C * Cr);
  F32Out dtab(out.dtable, t.per_sample ? ScalarType::Float : out.tt, t.per_sample ? 0 : N * C);
  const float n_f = static_cast<float>(HW);

  const Kern<T>& K = kern<T>();
  // Phase 1: the sum of x and its N dot products with the dy_n in one pass over the part
  // (cols_sum_dots / planes_sum_dots, x loaded once, the sums' accumulator chains
  // independent; the bits of cols_sum / cols_dot, planes_sum / planes_dot, which a plane of
  // more than kPlaneBlock values still takes, in blocks, as reduce_part).
  auto reduce = [&](int64_t b, int64_t k) {
    const int64_t off = g.part_offset(b, k), cnt = g.part_count(k);
    if (g.nhwc) {
      K.cols_sum_dots(x + off, dy + off, dstride, N, C, cnt, redx.data() + b * g.red_len + k * C,
                      redd.data() + b * g.red_len + k * C, B * g.red_len);
      return;
    }
    if (HW <= kPlaneBlock) {
      K.planes_sum_dots(x + off, dy + off, dstride, N, HW, cnt, redx.data() + b * C + k * g.group,
                        redd.data() + b * C + k * g.group, B * C);
      return;
    }
    reduce_part<T, false>(g, K, x, x, b, k, redx.data());
    for (int64_t n = 0; n < N; ++n)
      reduce_part<T, true>(g, K, x, dy + n * dstride, b, k, redd.data() + n * B * g.red_len);
  };
  auto mid = [&](int64_t b) {
    float* sb = s.data() + b * C;
    g.finish_sum(redx.data(), b, sb);
    for (int64_t c = 0; c < C; ++c) sb[c] = sb[c] / n_f;
    for (int64_t n = 0; n < N; ++n)
      g.finish_sum(redd.data() + n * B * g.red_len, b, ga.data() + (n * B + b) * C);
    float* z1b = z1.data() + b * Cr;
    float* hb = h.data() + b * Cr;
    float* gz1b = gz1.data() + b * Cr;
    float* gz2b = gz2.data() + b * C;
    float* eb = e.data() + b * C;
    float* kb = kk.data() + b * C;
    mlp.forward(sb, z1b, hb, kb, eb);  // kb: z2 scratch
    for (int64_t c = 0; c < C; ++c) {
      const float ec = eb[c];
      float ge = 0.f;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t i = (n * B + b) * C + c;
        const float gac = ga[i], tc = t.row(n, b)[c];
        a[i] = ec * tc;
        ga[i] = gac * ec;  // dv
        ge = n == 0 ? gac * tc : ge + gac * tc;
      }
      gz2b[c] = ge * (1.f - ec) * ec;  // sigmoid_backward: grad * (1 - y) * y
    }
    if (t.per_sample)
      for (int64_t n = 0; n < N; ++n)
        store_floats(ga.data() + (n * B + b) * C, out.dtable, out.tt, (n * B + b) * C, C);
    mlp.backward_to_bias(gz2b, z1b, gz1b, kb, n_f);  // the dx bias g_s / HW
  };
  const float* pa = a.data();
  const float* pk = kk.data();
  auto apply = [&](int64_t b, int64_t k) {
    const int64_t off = g.part_offset(b, k), cnt = g.part_count(k);
    if (g.nhwc) {
      K.rows_axpb_n(dy + off, dstride, N, dx + off, pa + b * C, B * C, pk + b * C, C, cnt);
    } else {
      const int64_t i0 = b * C + k * g.group;
      if (HW <= kPlaneBlock) {
        K.planes_axpb_n(dy + off, dstride, N, dx + off, HW, cnt, pa + i0, B * C, pk + i0);
      } else {
        for (int64_t i = 0; i < HW; i += kPlaneBlock)
          K.planes_axpb_n(dy + off + i, dstride, N, dx + off + i, std::min(kPlaneBlock, HW - i),
                          1, pa + i0, B * C, pk + i0);
      }
    }
  };
  // the weight-gradient rows, then dtable[n, :] = sum_b dv[n, b, :] ([N, C] table; b in order)
  const WeightGradRows rows{B, C, Cr, h.data(), gz2.data(), s.data(), gz1.data(), &dw1, &dw2};
  auto post = [&](int64_t i) {
    if (i < C + Cr) {
      rows(i);
      return;
    }
    const int64_t n = i - C - Cr;
    float* row = dtab.f + n * C;
    const float* dv = ga.data() + n * B * C;
    std::copy(dv, dv + C, row);
    for (int64_t b = 1; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) row[c] += dv[b * C + c];
    dtab.store(n * C, C);
  };
  auto mid1 = [&](int64_t b0, int64_t nb) {
    for (int64_t b = b0; b < b0 + nb; ++b) mid(b);
  };
  run_phases(g, B * C * HW * (2 * N + 2), 1, reduce, mid1, apply, C + Cr + (t.per_sample ? 0 : N),
             post);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> mimb_instances_bwd_cpu(Tensor dy, Tensor x, Tensor w1,
                                                                  Tensor w2, Tensor table) {
  const char* op = "mimb_instances_bwd";
  check_scale_xw(x, w1, w2, op);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t Cr = w1.size(0);
  check_table(table, B, C, op);
  const int64_t N = table.size(0);
  const Layout lay = x_layout(x, op, "x");
  dy = check_dy(dy, x, lay, op, N);

  Tensor dx = alloc_4d(x, B, C, H, W, lay.out_cl);
  Tensor dw1 = torch::stable::new_empty(w1, {Cr, C});
  Tensor dw2 = torch::stable::new_empty(w2, {C, Cr});
  Tensor dtable = table.dim() == 3 ? torch::stable::new_empty(table, {N, B, C})
                                   : torch::stable::new_empty(table, {N, C});
  if (N * B * C == 0) {  // no instance (dx = 0) or nothing to read
    for (Tensor* o : {&dx, &dw1, &dw2, &dtable}) torch::stable::zero_(*o);
    return std::make_tuple(dx, dw1, dw2, dtable);
  }
  std::vector<float> b1, b2, bt;
  const Mlp mlp{as_mat(w1, b1), as_mat(w2, b2), C, Cr};
  const TableRows t = table_rows(table, bt);
  const Geometry g(B, C, HW, lay.nhwc);
  const InstBwdOut out{dw1.data_ptr(), dw2.data_ptr(), dtable.data_ptr(), w1.scalar_type(),
                       w2.scalar_type(), table.scalar_type()};
  switch (x.scalar_type()) {
    case ScalarType::Half:
      instances_bwd_impl(g, static_cast<const Half*>(dy.data_ptr()),
                         static_cast<const Half*>(x.data_ptr()),
                         static_cast<Half*>(dx.data_ptr()), mlp, t, out);
      break;
    case ScalarType::BFloat16:
      instances_bwd_impl(g, static_cast<const BFloat16*>(dy.data_ptr()),
                         static_cast<const BFloat16*>(x.data_ptr()),
                         static_cast<BFloat16*>(dx.data_ptr()), mlp, t, out);
      break;
    default:
      instances_bwd_impl(g, static_cast<const float*>(dy.data_ptr()),
                         static_cast<const float*>(x.data_ptr()),
                         static_cast<float*>(dx.data_ptr()), mlp, t, out);
      break;
  }
  return std::make_tuple(dx, dw1, dw2, dtable);
}

}  // namespace
}  // namespace cpu
}  // namespace mipnet

STABLE_TORCH_LIBRARY_IMPL(mipnet_cpu, CPU, m) {
  m.impl("mimb_scale_fwd", TORCH_BOX(&mipnet::cpu::mimb_scale_fwd_cpu));
  m.impl("mimb_scale_bwd", TORCH_BOX(&mipnet::cpu::mimb_scale_bwd_cpu));
  m.impl("mimb_fwd", TORCH_BOX(&mipnet::cpu::mimb_fwd_cpu));
  m.impl("mimb_instances", TORCH_BOX(&mipnet::cpu::mimb_instances_cpu));
  m.impl("mimb_instances_bwd", TORCH_BOX(&mipnet::cpu::mimb_instances_bwd_cpu));
  m.impl("mimb_train_fwd", TORCH_BOX(&mipnet::cpu::mimb_train_fwd_cpu));
  m.impl("mimb_train_bwd", TORCH_BOX(&mipnet::cpu::mimb_train_bwd_cpu));
}
