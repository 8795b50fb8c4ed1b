// C++ CPU kernels of the Multi-Instance Modulation Block (torch.ops.mipnet_cpu.*).
//
//   mimb_scale_fwd(x, w1, w2, v) -> (y, s)
//   mimb_scale_bwd(dy, x, w1, w2, v, s) -> (dx, dw1, dw2, dv)
//   mimb_instances(x, w1, w2, table) -> y
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
//              outputs from one read of x.
// The backward then sums the per-sample weight-gradient outer products over the batch.
//
// Layouts (x is never copied): contiguous NCHW, where a (sample, channel) plane of H*W
// values is contiguous -- reduce and apply work plane by plane; and channels_last (NHWC),
// where the C values of a pixel are contiguous -- the work items are (sample, chunk of
// pixels), the reduction runs down the pixels of a chunk with C-wide vector accumulators
// into a per-chunk partial row, and the partial rows of a sample are summed in chunk order
// in phase 2.  The chunk length depends on the shape only.  A tensor that is both (C == 1
// or H*W == 1) takes the NCHW path, or the NHWC one when H*W == 1 (same memory positions).
// Outputs: contiguous when x.is_contiguous(), else channels_last.
//
// Parallelism (OpenMP, torch's intra-op thread count): when the batch divides evenly over
// the threads (or is large), one thread runs all three phases of a sample back to back,
// so phase 3 re-reads the sample from its own L2; otherwise the phases run over
// (sample, plane | chunk) items with a barrier between them, phases 1 and 3 with the same
// static partition.  Each output value is computed by one thread in an order fixed by the
// shape alone (including the batch sums of dw1 / dw2, done row by row after a barrier),
// so every result is bit-identical for any thread count.
//
// Arithmetic is float32 after loading (fp16 / bf16 converted bit-exactly like c10, vec.h),
// rounded once to the output dtype.  -ffp-contract=off: no FMA contraction.
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
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>
#include <cstdlib>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "vec.h"

namespace mipnet {
namespace cpu {
namespace {

using torch::headeronly::MemoryFormat;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

// Parallelise only when there is enough work to pay for waking the thread team.
constexpr int64_t kMinParallelElems = 1 << 15;
// Channels-last work items: about this many elements per (sample, pixel chunk).
constexpr int64_t kChunkElems = 8192;
constexpr int64_t kMaxChunkPixels = 512;  // bounds the serial float sum inside a chunk

// ==================================================================== helpers
const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Double: return "float64";
    case ScalarType::Long: return "int64";
    case ScalarType::Int: return "int32";
    case ScalarType::Bool: return "bool";
    default: return "an unsupported dtype";
  }
}

bool is_supported_float(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16;
}

template <class T>
inline float ld(const T& v) {
  return static_cast<float>(v);
}

// Threads for `items` work items over `elems` elements of memory traffic.
int num_threads_for(int64_t items, int64_t elems) {
#ifdef _OPENMP
  if (items < 2 || elems < kMinParallelElems) return 1;
  const int64_t n = static_cast<int64_t>(torch::stable::get_num_threads());
  return static_cast<int>(std::max<int64_t>(1, std::min(n, items)));
#else
  (void)items;
  (void)elems;
  return 1;
#endif
}

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

// A small 2-D operand as contiguous float32: the tensor's own data when it already is,
// else converted into buf.
const float* as_float_2d(const Tensor& t, std::vector<float>& buf) {
  const int64_t R = t.size(0), K = t.size(1);
  if (t.scalar_type() == ScalarType::Float && t.is_contiguous())
    return static_cast<const float*>(t.data_ptr());
  buf.resize(static_cast<size_t>(R * K));
  const int64_t s0 = t.stride(0), s1 = t.stride(1);
  const void* p = t.data_ptr();
  auto conv = [&](auto* src) {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; ++k) buf[r * K + k] = ld(src[r * s0 + k * s1]);
  };
  switch (t.scalar_type()) {
    case ScalarType::Half: conv(static_cast<const Half*>(p)); break;
    case ScalarType::BFloat16: conv(static_cast<const BFloat16*>(p)); break;
    default: conv(static_cast<const float*>(p)); break;
  }
  return buf.data();
}

// n floats -> dst (contiguous, dtype dt), rounded to nearest even.
void store_floats(const float* src, void* dst, ScalarType dt, int64_t offset, int64_t n) {
  switch (dt) {
    case ScalarType::Half: {
      Half* d = static_cast<Half*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) d[i] = Half(src[i]);
      break;
    }
    case ScalarType::BFloat16: {
      BFloat16* d = static_cast<BFloat16*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) d[i] = BFloat16(src[i]);
      break;
    }
    default: {
      float* d = static_cast<float*>(dst) + offset;
      if (d != src) std::copy(src, src + n, d);
      break;
    }
  }
}

// ==================================================================== vector kernels
// Every loop over data is written on 8-wide GCC generic vectors and compiled twice: for
// the baseline ISA (SSE2 / NEON: each vector op becomes two) and, on x86-64, for AVX2,
// picked at run time (kern()).  The data mostly comes from L2 (phase 3 re-reads what phase
// 1 read), where 16-byte loads and stores, not memory, would be the limit.  Both clones do
// the same operations in the same order (no FMA: -ffp-contract=off), so their results are
// bit-identical; only the float16 / bfloat16 conversions differ in method (F16C, AVX2 or
// vec.h), and all of them round exactly like c10.
namespace k8 {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef float v8_u __attribute__((vector_size(32), aligned(4), may_alias));
typedef uint16_t v8h_u __attribute__((vector_size(16), aligned(2), may_alias));

#define MIPNET_AI inline __attribute__((always_inline))

MIPNET_AI v8 ld(const float* p) { return *reinterpret_cast<const v8_u*>(p); }
MIPNET_AI void st(float* p, v8 v) { *reinterpret_cast<v8_u*>(p) = v; }
MIPNET_AI v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
MIPNET_AI v8i splat_i(int32_t x) { return v8i{x, x, x, x, x, x, x, x}; }
MIPNET_AI v8u splat_u(uint32_t x) { return v8u{x, x, x, x, x, x, x, x}; }
MIPNET_AI float hsum(v8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// ---- contiguous spans
// sum of n values: four accumulators, then lanes, then the tail.
MIPNET_AI float sum_body(const float* p, int64_t n) {
  v8 a0 = splat(0.f), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 += ld(p + i);
    a1 += ld(p + i + 8);
    a2 += ld(p + i + 16);
    a3 += ld(p + i + 24);
  }
  for (; i + 8 <= n; i += 8) a0 += ld(p + i);
  float s = hsum((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += p[i];
  return s;
}

// sum of dy[i] * x[i]
MIPNET_AI float dot_body(const float* dy, const float* x, int64_t n) {
  v8 a0 = splat(0.f), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 += ld(dy + i) * ld(x + i);
    a1 += ld(dy + i + 8) * ld(x + i + 8);
    a2 += ld(dy + i + 16) * ld(x + i + 16);
    a3 += ld(dy + i + 24) * ld(x + i + 24);
  }
  for (; i + 8 <= n; i += 8) a0 += ld(dy + i) * ld(x + i);
  float s = hsum((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += dy[i] * x[i];
  return s;
}

// y = x * a (y may be x)
MIPNET_AI void scale_body(const float* x, float* y, int64_t n, float a) {
  const v8 va = splat(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const v8 x0 = ld(x + i), x1 = ld(x + i + 8);
    st(y + i, x0 * va);
    st(y + i + 8, x1 * va);
  }
  for (; i + 8 <= n; i += 8) st(y + i, ld(x + i) * va);
  for (; i < n; ++i) y[i] = x[i] * a;
}

// dx = dy * a + k (dx may be dy)
MIPNET_AI void axpb_body(const float* dy, float* dx, int64_t n, float a, float k) {
  const v8 va = splat(a), vk = splat(k);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const v8 d0 = ld(dy + i), d1 = ld(dy + i + 8);
    st(dx + i, d0 * va + vk);
    st(dx + i + 8, d1 * va + vk);
  }
  for (; i + 8 <= n; i += 8) st(dx + i, ld(dy + i) * va + vk);
  for (; i < n; ++i) dx[i] = dy[i] * a + k;
}

// ---- NCHW: np consecutive planes of hw values
MIPNET_AI void planes_sum_body(const float* x, int64_t hw, int64_t np, float* out) {
  for (int64_t p = 0; p < np; ++p) out[p] = sum_body(x + p * hw, hw);
}
MIPNET_AI void planes_dot_body(const float* dy, const float* x, int64_t hw, int64_t np,
                               float* out) {
  for (int64_t p = 0; p < np; ++p) out[p] = dot_body(dy + p * hw, x + p * hw, hw);
}
// y[p] = x[p] * a[p]
MIPNET_AI void planes_scale_body(const float* x, float* y, int64_t hw, int64_t np,
                                 const float* a) {
  for (int64_t p = 0; p < np; ++p) scale_body(x + p * hw, y + p * hw, hw, a[p]);
}
// dx[p] = dy[p] * a[p] + k[p]
MIPNET_AI void planes_axpb_body(const float* dy, float* dx, int64_t hw, int64_t np,
                                const float* a, const float* k) {
  for (int64_t p = 0; p < np; ++p) axpb_body(dy + p * hw, dx + p * hw, hw, a[p], k[p]);
}

// ---- NHWC: np pixel rows of C channels
// y[p, c] = x[p, c] * a[c] (y may be x)
MIPNET_AI void rows_scale_body(const float* x, float* y, const float* a, int64_t C, int64_t np) {
  for (int64_t p = 0; p < np; ++p) {
    const float* xr = x + p * C;
    float* yr = y + p * C;
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) st(yr + c, ld(xr + c) * ld(a + c));
    for (; c < C; ++c) yr[c] = xr[c] * a[c];
  }
}

// dx[p, c] = dy[p, c] * a[c] + k[c] (dx may be dy)
MIPNET_AI void rows_axpb_body(const float* dy, float* dx, const float* a, const float* k,
                              int64_t C, int64_t np) {
  for (int64_t p = 0; p < np; ++p) {
    const float* dr = dy + p * C;
    float* xr = dx + p * C;
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) st(xr + c, ld(dr + c) * ld(a + c) + ld(k + c));
    for (; c < C; ++c) xr[c] = dr[c] * a[c] + k[c];
  }
}

// out[c] = sum over the np rows of x[., c] (DOT: dy[., c] * x[., c]) for NV vectors of
// channels, the accumulators in registers; each channel summed in row order.
template <int NV, bool DOT>
MIPNET_AI void cols_block(const float* x, const float* dy, int64_t C, int64_t np, float* out) {
  v8 acc[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = splat(0.f);
  for (int64_t p = 0; p < np; ++p) {
    const float* xr = x + p * C;
    const float* dr = dy + p * C;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (DOT)
        acc[v] += ld(dr + 8 * v) * ld(xr + 8 * v);
      else
        acc[v] += ld(xr + 8 * v);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) st(out + 8 * v, acc[v]);
}

// All C channels: blocks of NB vectors, the remaining vectors, then scalar channels.
template <int NB, bool DOT>
MIPNET_AI void cols_body(const float* x, const float* dy, int64_t C, int64_t np, float* out) {
  int64_t c = 0;
  for (; c + 8 * NB <= C; c += 8 * NB) cols_block<NB, DOT>(x + c, dy + c, C, np, out + c);
  const int rem = static_cast<int>((C - c) / 8);
  switch (rem) {
    case 1: cols_block<1, DOT>(x + c, dy + c, C, np, out + c); break;
    case 2: cols_block<2, DOT>(x + c, dy + c, C, np, out + c); break;
    case 3: cols_block<3, DOT>(x + c, dy + c, C, np, out + c); break;
    case 4: if (NB > 4) cols_block<4, DOT>(x + c, dy + c, C, np, out + c); break;
    case 5: if (NB > 5) cols_block<5, DOT>(x + c, dy + c, C, np, out + c); break;
    case 6: if (NB > 6) cols_block<6, DOT>(x + c, dy + c, C, np, out + c); break;
    case 7: if (NB > 7) cols_block<7, DOT>(x + c, dy + c, C, np, out + c); break;
    default: break;
  }
  c += 8 * static_cast<int64_t>(rem);
  for (; c < C; ++c) {
    float s = 0.f;
    for (int64_t p = 0; p < np; ++p) s += DOT ? dy[p * C + c] * x[p * C + c] : x[p * C + c];
    out[c] = s;
  }
}

// ---- the tiny MLP
// out[r] = sum_k M[r, k] * v[k] for r < R (M row-major [R, K]); four rows at a time.
MIPNET_AI void matvec_body(const float* M, const float* v, float* out, int64_t R, int64_t K) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    const float* m0 = M + r * K;
    const float* m1 = m0 + K;
    const float* m2 = m1 + K;
    const float* m3 = m2 + K;
    v8 a0 = splat(0.f), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const v8 x = ld(v + k);
      a0 += ld(m0 + k) * x;
      a1 += ld(m1 + k) * x;
      a2 += ld(m2 + k) * x;
      a3 += ld(m3 + k) * x;
    }
    float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (; k < K; ++k) {
      s0 += m0[k] * v[k];
      s1 += m1[k] * v[k];
      s2 += m2[k] * v[k];
      s3 += m3[k] * v[k];
    }
    out[r] = s0;
    out[r + 1] = s1;
    out[r + 2] = s2;
    out[r + 3] = s3;
  }
  for (; r < R; ++r) {
    const float* m0 = M + r * K;
    v8 a0 = splat(0.f);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) a0 += ld(m0 + k) * ld(v + k);
    float s0 = hsum(a0);
    for (; k < K; ++k) s0 += m0[k] * v[k];
    out[r] = s0;
  }
}

// out[k] = sum_r v[r * vs] * M[r, k] for k < K (M row-major [R, K]), r in order.
MIPNET_AI void mattvec_body(const float* M, const float* v, int64_t vs, float* out, int64_t R,
                            int64_t K) {
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    v8 a0 = splat(0.f), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t r = 0; r < R; ++r) {
      const v8 w = splat(v[r * vs]);
      const float* m = M + r * K + k;
      a0 += w * ld(m);
      a1 += w * ld(m + 8);
      a2 += w * ld(m + 16);
      a3 += w * ld(m + 24);
    }
    st(out + k, a0);
    st(out + k + 8, a1);
    st(out + k + 16, a2);
    st(out + k + 24, a3);
  }
  for (; k + 8 <= K; k += 8) {
    v8 a0 = splat(0.f);
    for (int64_t r = 0; r < R; ++r) a0 += splat(v[r * vs]) * ld(M + r * K + k);
    st(out + k, a0);
  }
  for (; k < K; ++k) {
    float a0 = 0.f;
    for (int64_t r = 0; r < R; ++r) a0 += v[r * vs] * M[r * K + k];
    out[k] = a0;
  }
}

// exp(x), x clamped to [-87.3, 88.376] (finite, normal results): Cephes' expf, ~1 ulp.
MIPNET_AI v8 exp_body(v8 x) {
  x = x < splat(88.3762626647949f) ? x : splat(88.3762626647949f);
  x = x > splat(-87.3f) ? x : splat(-87.3f);
  const v8 fx = x * splat(1.44269504088896341f) + splat(0.5f);
  v8 t = __builtin_convertvector(__builtin_convertvector(fx, v8i), v8);  // trunc
  t = t > fx ? t - splat(1.f) : t;                                      // floor
  x = x - t * splat(0.693359375f);
  x = x - t * splat(-2.12194440e-4f);
  const v8 z = x * x;
  v8 y = splat(1.9875691500e-4f);
  y = y * x + splat(1.3981999507e-3f);
  y = y * x + splat(8.3334519073e-3f);
  y = y * x + splat(4.1665795894e-2f);
  y = y * x + splat(1.6666665459e-1f);
  y = y * x + splat(5.0000001201e-1f);
  y = y * z + x + splat(1.f);
  const v8i e = (__builtin_convertvector(t, v8i) + splat_i(127)) << 23;  // 2^t
  return y * (v8)e;
}

// e[i] = 1 / (1 + exp(-z[i]))
MIPNET_AI void sigmoid_body(const float* z, float* e, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) st(e + i, splat(1.f) / (splat(1.f) + exp_body(-ld(z + i))));
  if (i < n) {
    float tz[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, te[8];
    for (int64_t j = i; j < n; ++j) tz[j - i] = z[j];
    st(te, splat(1.f) / (splat(1.f) + exp_body(-ld(tz))));
    for (int64_t j = i; j < n; ++j) e[j] = te[j - i];
  }
}

// ---- bfloat16 <-> float32 (the AVX2 clone only: the comparisons need native 8 lanes)
MIPNET_AI void bf16_load_body(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8h h = *reinterpret_cast<const v8h_u*>(src + i);
    st(dst + i, (v8)(__builtin_convertvector(h, v8u) << 16));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(BFloat16(src[i], BFloat16::from_bits()));
}
// c10::detail::round_to_nearest_even (NaN -> 0x7FC0)
MIPNET_AI void bf16_store_body(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8 f = ld(src + i);
    const v8u u = (v8u)f;
    v8u r = (u + (((u >> 16) & splat_u(1u)) + splat_u(0x7FFFu))) >> 16;
    r = f != f ? splat_u(0x7FC0u) : r;
    *reinterpret_cast<v8h_u*>(dst + i) = __builtin_convertvector(r, v8h);
  }
  for (; i < n; ++i) dst[i] = BFloat16(src[i]).x;
}

// ---- the clones
struct Kern {
  void (*planes_sum)(const float*, int64_t, int64_t, float*);
  void (*planes_dot)(const float*, const float*, int64_t, int64_t, float*);
  void (*planes_scale)(const float*, float*, int64_t, int64_t, const float*);
  void (*planes_axpb)(const float*, float*, int64_t, int64_t, const float*, const float*);
  void (*rows_scale)(const float*, float*, const float*, int64_t, int64_t);
  void (*rows_axpb)(const float*, float*, const float*, const float*, int64_t, int64_t);
  void (*cols_sum)(const float*, int64_t, int64_t, float*);
  void (*cols_dot)(const float*, const float*, int64_t, int64_t, float*);
  void (*matvec)(const float*, const float*, float*, int64_t, int64_t);
  void (*mattvec)(const float*, const float*, int64_t, float*, int64_t, int64_t);
  void (*sigmoid)(const float*, float*, int64_t);
  void (*bf16_load)(const uint16_t*, float*, int64_t);   // nullptr: use vec.h
  void (*bf16_store)(const float*, uint16_t*, int64_t);  // nullptr: use vec.h
};

// NB: channel vectors per register block of the NHWC reduction (16 registers with AVX2,
// 16 half-width ones in the baseline clone, where each vector takes two).
#define MIPNET_MIMB_CLONE(NS, ATTR, NB, BF16, NTSCALE)                                                \
  namespace NS {                                                                           \
  ATTR void planes_sum(const float* x, int64_t hw, int64_t np, float* out) {               \
    planes_sum_body(x, hw, np, out);                                                       \
  }                                                                                        \
  ATTR void planes_dot(const float* dy, const float* x, int64_t hw, int64_t np, float* out) { \
    planes_dot_body(dy, x, hw, np, out);                                                   \
  }                                                                                        \
  ATTR void planes_scale(const float* x, float* y, int64_t hw, int64_t np, const float* a) { \
    NTSCALE                                                    \
    planes_scale_body(x, y, hw, np, a);                                                    \
  }                                                                                        \
  ATTR void planes_axpb(const float* dy, float* dx, int64_t hw, int64_t np, const float* a, \
                        const float* k) {                                                  \
    planes_axpb_body(dy, dx, hw, np, a, k);                                                \
  }                                                                                        \
  ATTR void rows_scale(const float* x, float* y, const float* a, int64_t C, int64_t np) {  \
    rows_scale_body(x, y, a, C, np);                                                       \
  }                                                                                        \
  ATTR void rows_axpb(const float* dy, float* dx, const float* a, const float* k, int64_t C, \
                      int64_t np) {                                                        \
    rows_axpb_body(dy, dx, a, k, C, np);                                                   \
  }                                                                                        \
  ATTR void cols_sum(const float* x, int64_t C, int64_t np, float* out) {                  \
    cols_body<NB, false>(x, x, C, np, out);                                                \
  }                                                                                        \
  ATTR void cols_dot(const float* dy, const float* x, int64_t C, int64_t np, float* out) { \
    cols_body<NB, true>(x, dy, C, np, out);                                                \
  }                                                                                        \
  ATTR void matvec(const float* M, const float* v, float* out, int64_t R, int64_t K) {     \
    matvec_body(M, v, out, R, K);                                                          \
  }                                                                                        \
  ATTR void mattvec(const float* M, const float* v, int64_t vs, float* out, int64_t R,     \
                    int64_t K) {                                                           \
    mattvec_body(M, v, vs, out, R, K);                                                     \
  }                                                                                        \
  ATTR void sigmoid(const float* z, float* e, int64_t n) { sigmoid_body(z, e, n); }        \
  BF16                                                                                     \
  }

MIPNET_MIMB_CLONE(base, , 4, , )
const Kern kBase{base::planes_sum, base::planes_dot, base::planes_scale, base::planes_axpb,
                 base::rows_scale, base::rows_axpb, base::cols_sum, base::cols_dot,
                 base::matvec, base::mattvec, base::sigmoid, nullptr, nullptr};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MIPNET_MIMB_AVX2 1
#define MIPNET_MIMB_AVX2_BF16                                                               \
  __attribute__((target("avx2"))) void bf16_load(const uint16_t* s, float* d, int64_t n) { \
    bf16_load_body(s, d, n);                                                               \
  }                                                                                        \
  __attribute__((target("avx2"))) void bf16_store(const float* s, uint16_t* d, int64_t n) { \
    bf16_store_body(s, d, n);                                                              \
  }
#define NT_EXPERIMENT if (getenv("MIMB_NT") && ((uintptr_t)y & 31) == 0 && (hw % 8) == 0) { for (int64_t p = 0; p < np; ++p) { __m256 va = _mm256_set1_ps(a[p]); for (int64_t i = 0; i < hw; i += 8) _mm256_stream_ps(y + p * hw + i, _mm256_mul_ps(_mm256_loadu_ps(x + p * hw + i), va)); } return; }
MIPNET_MIMB_CLONE(avx2, __attribute__((target("avx2"))), 8, MIPNET_MIMB_AVX2_BF16, NT_EXPERIMENT)
const Kern kAvx2{avx2::planes_sum, avx2::planes_dot, avx2::planes_scale, avx2::planes_axpb,
                 avx2::rows_scale, avx2::rows_axpb, avx2::cols_sum, avx2::cols_dot,
                 avx2::matvec, avx2::mattvec, avx2::sigmoid, avx2::bf16_load,
                 avx2::bf16_store};
#undef MIPNET_MIMB_AVX2_BF16
#endif
#undef MIPNET_MIMB_CLONE
#undef MIPNET_AI

}  // namespace k8

const k8::Kern& kern() {
  static const k8::Kern* k = [] {
#ifdef MIPNET_MIMB_AVX2
    if (__builtin_cpu_supports("avx2")) return &k8::kAvx2;
#endif
    return &k8::kBase;
  }();
  return *k;
}

struct Mlp {
  const float* w1;  // [Cr, C] row-major
  const float* w2;  // [C, Cr] row-major
  int64_t C, Cr;
  const k8::Kern& k = kern();

  // z1 = w1 @ s, h = relu(z1) (NaN propagates, as torch.relu), e = sigmoid(w2 @ h);
  // z2: [C] scratch.
  void forward(const float* s, float* z1, float* h, float* z2, float* e) const {
    k.matvec(w1, s, z1, Cr, C);
    for (int64_t r = 0; r < Cr; ++r) h[r] = z1[r] < 0.f ? 0.f : z1[r];
    k.matvec(w2, h, z2, C, Cr);
    k.sigmoid(z2, e, C);
  }
};

// ==================================================================== fp16 / bf16 tiles
// Low-precision tiles are converted to float32 scratch, processed by the float kernels
// and converted back (x is still read from memory once per phase).  float16 uses F16C
// when the CPU has it (round-to-nearest-even, as c10::Half), bfloat16 the AVX2 clone;
// otherwise the exact lane-parallel conversions of vec.h.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(MIPNET_NO_F16C)
#define MIPNET_MIMB_F16C 1
bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}
__attribute__((target("avx,f16c"))) void f16_to_f32_f16c(const uint16_t* src, float* dst,
                                                          int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}
__attribute__((target("avx,f16c"))) void f32_to_f16_f16c(const float* src, uint16_t* dst,
                                                          int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#endif

template <class T>
void load_block(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same<T, Half>::value) {
#ifdef MIPNET_MIMB_F16C
    if (cpu_has_f16c()) return f16_to_f32_f16c(reinterpret_cast<const uint16_t*>(src), dst, n);
#endif
  } else if constexpr (std::is_same<T, BFloat16>::value) {
    if (kern().bf16_load != nullptr)
      return kern().bf16_load(reinterpret_cast<const uint16_t*>(src), dst, n);
  }
  using namespace vec;
  int64_t i = 0;
  for (; i + kW <= n; i += kW) store8(dst + i, load8(src + i));
  for (; i < n; ++i) dst[i] = ld(src[i]);
}

template <class T>
void store_block(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same<T, Half>::value) {
#ifdef MIPNET_MIMB_F16C
    if (cpu_has_f16c()) return f32_to_f16_f16c(src, reinterpret_cast<uint16_t*>(dst), n);
#endif
  } else if constexpr (std::is_same<T, BFloat16>::value) {
    if (kern().bf16_store != nullptr)
      return kern().bf16_store(src, reinterpret_cast<uint16_t*>(dst), n);
  }
  using namespace vec;
  int64_t i = 0;
  for (; i + kW <= n; i += kW) store8(dst + i, load8(src + i));
  for (; i < n; ++i) dst[i] = T(src[i]);
}

// The float view of n values at p: p itself for float32, else converted into scratch.
template <class T>
inline const float* as_f32(const T* p, int64_t n, float* scratch) {
  if constexpr (std::is_same<T, float>::value) {
    (void)n;
    (void)scratch;
    return p;
  } else {
    load_block(p, scratch, n);
    return scratch;
  }
}
// Where to compute output values for p: p itself for float32, else scratch ...
template <class T>
inline float* out_f32(T* p, float* scratch) {
  if constexpr (std::is_same<T, float>::value) {
    (void)scratch;
    return p;
  } else {
    (void)p;
    return scratch;
  }
}
// ... and from scratch to p.
template <class T>
inline void flush(const float* scratch, T* p, int64_t n) {
  if constexpr (!std::is_same<T, float>::value) store_block(scratch, p, n);
}

// Per-thread float32 scratch, reused across calls.
float* thread_scratch(int64_t floats) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < floats) buf.resize(static_cast<size_t>(floats));
  return buf.data();
}

// ==================================================================== geometry + driver
// How a sample's work is split into parts, each a contiguous span of memory:
//  NCHW: groups of `group` consecutive planes, about kPlaneBlock values (planes of more
//        than kPlaneBlock values are one part each, processed in kPlaneBlock blocks: the
//        plane's sum adds the block sums in order);
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
  int64_t tile = 0;     // floats of one scratch tile

  Geometry(int64_t B_, int64_t C_, int64_t HW_, bool nhwc_) : B(B_), C(C_), HW(HW_), nhwc(nhwc_) {
    if (nhwc) {
      chunk = std::max<int64_t>(
          1, std::min<int64_t>(kMaxChunkPixels, (kChunkElems + C - 1) / std::max<int64_t>(C, 1)));
      parts = (HW + chunk - 1) / chunk;
      red_len = parts * C;
      tile = chunk * C;
    } else {
      group = HW == 0 ? std::max<int64_t>(C, 1)
                      : std::max<int64_t>(1, std::min<int64_t>(C, kPlaneBlock / HW));
      parts = (C + group - 1) / group;
      red_len = C;
      tile = std::min(group * HW, kPlaneBlock);
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

// Runs reduce(b, part) for every part of every sample, then mid(b) per sample, then
// apply(b, part), then post(i) for i < npost after all samples are done.  Either one
// thread per sample for all three phases (batch divisible by the team, or large: the
// sample stays in that thread's cache), or phase by phase over (sample, part) items,
// phases 1 and 3 with the same static partition.  reduce / apply get the thread's
// scratch (2 * g.tile floats).
template <class Reduce, class Mid, class Apply, class Post>
void run_phases(const Geometry& g, int64_t elems, const Reduce& reduce, const Mid& mid,
                const Apply& apply, int64_t npost, const Post& post) {
  const int64_t B = g.B, P = g.parts, items = B * P;
  const int nt = num_threads_for(std::max(items, npost), elems);
  const bool per_sample = nt == 1 || B % nt == 0 || B >= 4 * nt;
  const int64_t scratch_len = 2 * std::max<int64_t>(g.tile, 1);
  if (per_sample) {
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      float* scr = thread_scratch(scratch_len);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t k = 0; k < P; ++k) reduce(b, k, scr);
        mid(b);
        for (int64_t k = 0; k < P; ++k) apply(b, k, scr);
      }
#pragma omp for schedule(static)
      for (int64_t i = 0; i < npost; ++i) post(i);
    }
  } else {
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      float* scr = thread_scratch(scratch_len);
#pragma omp for schedule(static)
      for (int64_t it = 0; it < items; ++it) reduce(it / P, it % P, scr);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) mid(b);
#pragma omp for schedule(static) nowait
      for (int64_t it = 0; it < items; ++it) apply(it / P, it % P, scr);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < npost; ++i) post(i);
    }
  }
}

struct NoPost {
  void operator()(int64_t) const {}
};

// Phase 1 for one (sample, part): plane sums (NCHW) or a chunk's partial row (NHWC) of x
// (DOT: of dy * x).
template <class T, bool DOT>
void reduce_part(const Geometry& g, const T* x, const T* dy, int64_t b, int64_t k, float* red,
                 float* scr) {
  const k8::Kern& K = kern();
  const int64_t off = g.part_offset(b, k), cnt = g.part_count(k);
  float* s1 = scr;
  float* s2 = scr + g.tile;
  if (!g.nhwc) {
    float* out = red + b * g.C + k * g.group;
    if (g.HW <= kPlaneBlock) {
      const int64_t n = cnt * g.HW;
      const float* xf = as_f32(x + off, n, s1);
      if (DOT)
        K.planes_dot(as_f32(dy + off, n, s2), xf, g.HW, cnt, out);
      else
        K.planes_sum(xf, g.HW, cnt, out);
    } else {  // one plane, in blocks
      float sum = 0.f;
      for (int64_t i = 0; i < g.HW; i += kPlaneBlock) {
        const int64_t n = std::min(kPlaneBlock, g.HW - i);
        const float* xf = as_f32(x + off + i, n, s1);
        float part;
        if (DOT)
          K.planes_dot(as_f32(dy + off + i, n, s2), xf, n, 1, &part);
        else
          K.planes_sum(xf, n, 1, &part);
        sum += part;
      }
      *out = sum;
    }
  } else {
    const int64_t n = cnt * g.C;
    const float* xf = as_f32(x + off, n, s1);
    float* out = red + b * g.red_len + k * g.C;
    if (DOT)
      K.cols_dot(as_f32(dy + off, n, s2), xf, g.C, cnt, out);
    else
      K.cols_sum(xf, g.C, cnt, out);
  }
}

// Phase 3 for one (sample, part): out = f(in) elementwise through the float kernels,
// where f is planes_fn(in, out, hw, planes, ...) for NCHW and rows_fn(in, out, C, pixels)
// for NHWC; `in` converted to float32 and `out` converted back as needed.
template <class T, class PlanesFn, class RowsFn>
void apply_part(const Geometry& g, const T* in, T* out, int64_t b, int64_t k, float* scr,
                const PlanesFn& planes_fn, const RowsFn& rows_fn) {
  const int64_t off = g.part_offset(b, k), cnt = g.part_count(k);
  if (!g.nhwc) {
    const int64_t c0 = k * g.group;
    if (g.HW <= kPlaneBlock) {
      const int64_t n = cnt * g.HW;
      float* of = out_f32(out + off, scr);
      planes_fn(as_f32(in + off, n, scr), of, g.HW, cnt, b * g.C + c0);
      flush(of, out + off, n);
    } else {
      for (int64_t i = 0; i < g.HW; i += kPlaneBlock) {
        const int64_t n = std::min(kPlaneBlock, g.HW - i);
        float* of = out_f32(out + off + i, scr);
        planes_fn(as_f32(in + off + i, n, scr), of, n, 1, b * g.C + c0);
        flush(of, out + off + i, n);
      }
    }
  } else {
    const int64_t n = cnt * g.C;
    float* of = out_f32(out + off, scr);
    rows_fn(as_f32(in + off, n, scr), of, g.C, cnt, b * g.C);
    flush(of, out + off, n);
  }
}

// ==================================================================== forward
template <class T>
void scale_fwd_impl(const Geometry& g, const T* x, T* y, const Mlp& mlp, const float* v,
                    float* s) {
  const int64_t B = g.B, C = g.C, Cr = mlp.Cr, HW = g.HW;
  std::vector<float> red(static_cast<size_t>(B * g.red_len));
  std::vector<float> a(static_cast<size_t>(B * C)), z2(static_cast<size_t>(B * C));
  std::vector<float> z1(static_cast<size_t>(B * Cr)), h(static_cast<size_t>(B * Cr));
  const float n_f = static_cast<float>(HW);
  auto reduce = [&](int64_t b, int64_t k, float* scr) {
    reduce_part<T, false>(g, x, x, b, k, red.data(), scr);
  };
  auto mid = [&](int64_t b) {
    float* sb = s + b * C;
    g.finish_sum(red.data(), b, sb);
    for (int64_t c = 0; c < C; ++c) sb[c] = sb[c] / n_f;
    float* ab = a.data() + b * C;
    mlp.forward(sb, z1.data() + b * Cr, h.data() + b * Cr, z2.data() + b * C, ab);
    for (int64_t c = 0; c < C; ++c) ab[c] = ab[c] * v[b * C + c];  // a = e * v
  };
  const k8::Kern& K = kern();
  const float* pa = a.data();
  auto apply = [&](int64_t b, int64_t k, float* scr) {
    apply_part(
        g, x, y, b, k, scr,
        [&](const float* in, float* out, int64_t hw, int64_t np, int64_t i0) {
          K.planes_scale(in, out, hw, np, pa + i0);
        },
        [&](const float* in, float* out, int64_t c, int64_t np, int64_t i0) {
          K.rows_scale(in, out, pa + i0, c, np);
        });
  };
  run_phases(g, B * C * HW * 2, reduce, mid, apply, 0, NoPost{});
}

std::tuple<Tensor, Tensor> mimb_scale_fwd_cpu(Tensor x, Tensor w1, Tensor w2, Tensor v) {
  const char* op = "mimb_scale_fwd";
  check_cpu_float(x, op, "x", 4, "[B, C, H, W]");
  check_cpu_float(w1, op, "w1", 2, "[Cr, C]");
  check_cpu_float(w2, op, "w2", 2, "[C, Cr]");
  check_cpu_float(v, op, "v", 2, "[B, C]");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t Cr = w1.size(0);
  check_size(w1, op, "w1", 1, C, "C (x.size(1))");
  check_size(w2, op, "w2", 0, C, "C (x.size(1))");
  check_size(w2, op, "w2", 1, Cr, "Cr (w1.size(0))");
  check_size(v, op, "v", 0, B, "B (x.size(0))");
  check_size(v, op, "v", 1, C, "C (x.size(1))");
  const Layout lay = x_layout(x, op, "x");

  Tensor y = alloc_4d(x, B, C, H, W, lay.out_cl);
  Tensor s = torch::stable::new_empty(x, {B, C}, ScalarType::Float);
  if (B * C == 0) return std::make_tuple(y, s);

  std::vector<float> b1, b2, bv;
  const Mlp mlp{as_float_2d(w1, b1), as_float_2d(w2, b2), C, Cr};
  const float* pv = as_float_2d(v, bv);
  const Geometry g(B, C, HW, lay.nhwc);
  float* ps = static_cast<float*>(s.data_ptr());
  switch (x.scalar_type()) {
    case ScalarType::Half:
      scale_fwd_impl(g, static_cast<const Half*>(x.data_ptr()), static_cast<Half*>(y.data_ptr()),
                     mlp, pv, ps);
      break;
    case ScalarType::BFloat16:
      scale_fwd_impl(g, static_cast<const BFloat16*>(x.data_ptr()),
                     static_cast<BFloat16*>(y.data_ptr()), mlp, pv, ps);
      break;
    default:
      scale_fwd_impl(g, static_cast<const float*>(x.data_ptr()),
                     static_cast<float*>(y.data_ptr()), mlp, pv, ps);
      break;
  }
  return std::make_tuple(y, s);
}

// ==================================================================== backward
struct BwdOut {
  void* dw1;  // [Cr, C] contiguous, dtype t1
  void* dw2;  // [C, Cr] contiguous, dtype t2
  void* dv;   // [B, C] contiguous, dtype tv
  ScalarType t1, t2, tv;
};

template <class T>
void scale_bwd_impl(const Geometry& g, const T* dy, const T* x, T* dx, const Mlp& mlp,
                    const float* v, const float* s, const BwdOut& out) {
  const int64_t B = g.B, C = g.C, Cr = mlp.Cr, HW = g.HW;
  std::vector<float> red(static_cast<size_t>(B * g.red_len));
  std::vector<float> a(static_cast<size_t>(B * C)), kk(static_cast<size_t>(B * C));
  std::vector<float> gz2(static_cast<size_t>(B * C)), tmp(static_cast<size_t>(2 * B * C));
  std::vector<float> z1(static_cast<size_t>(B * Cr)), h(static_cast<size_t>(B * Cr));
  std::vector<float> gz1(static_cast<size_t>(B * Cr));
  // Weight gradients in float32 (written straight into float32 outputs).
  std::vector<float> dw1_buf, dw2_buf;
  float* dw1f = static_cast<float*>(out.dw1);
  float* dw2f = static_cast<float*>(out.dw2);
  if (out.t1 != ScalarType::Float) {
    dw1_buf.resize(static_cast<size_t>(Cr * C));
    dw1f = dw1_buf.data();
  }
  if (out.t2 != ScalarType::Float) {
    dw2_buf.resize(static_cast<size_t>(C * Cr));
    dw2f = dw2_buf.data();
  }
  const float n_f = static_cast<float>(HW);

  auto reduce = [&](int64_t b, int64_t k, float* scr) {
    reduce_part<T, true>(g, x, dy, b, k, red.data(), scr);
  };
  auto mid = [&](int64_t b) {
    const float* sb = s + b * C;
    const float* vb = v + b * C;
    float* ga = tmp.data() + 2 * b * C;  // g_a = sum_hw(dy * x), then dv
    float* eb = ga + C;                   // z2, then e
    g.finish_sum(red.data(), b, ga);
    float* z1b = z1.data() + b * Cr;
    float* gz1b = gz1.data() + b * Cr;
    float* gz2b = gz2.data() + b * C;
    float* ab = a.data() + b * C;
    float* kb = kk.data() + b * C;
    mlp.forward(sb, z1b, h.data() + b * Cr, kb, eb);
    for (int64_t c = 0; c < C; ++c) {
      const float e = eb[c];
      const float gac = ga[c];
      ab[c] = e * vb[c];
      ga[c] = gac * e;  // dv
      const float ge = gac * vb[c];
      gz2b[c] = ge * (1.f - e) * e;  // sigmoid_backward: grad * (1 - y) * y
    }
    store_floats(ga, out.dv, out.tv, b * C, C);
    // g_h = w2^T g_z2, g_z1 = g_h * (z1 > 0)
    mlp.k.mattvec(mlp.w2, gz2b, 1, gz1b, C, Cr);
    for (int64_t r = 0; r < Cr; ++r) gz1b[r] = z1b[r] > 0.f ? gz1b[r] : 0.f;
    // g_s = w1^T g_z1;  the dx bias g_s / HW
    mlp.k.mattvec(mlp.w1, gz1b, 1, kb, Cr, C);
    for (int64_t c = 0; c < C; ++c) kb[c] = kb[c] / n_f;
  };
  const k8::Kern& K = kern();
  const float* pa = a.data();
  const float* pk = kk.data();
  auto apply = [&](int64_t b, int64_t k, float* scr) {
    apply_part(
        g, dy, dx, b, k, scr,
        [&](const float* in, float* out, int64_t hw, int64_t np, int64_t i0) {
          K.planes_axpb(in, out, hw, np, pa + i0, pk + i0);
        },
        [&](const float* in, float* out, int64_t c, int64_t np, int64_t i0) {
          K.rows_axpb(in, out, pa + i0, pk + i0, c, np);
        });
  };
  // dw2[c, :] = sum_b g_z2[b, c] h[b, :];  dw1[r, :] = sum_b g_z1[b, r] s[b, :]  (b in order)
  auto post = [&](int64_t i) {
    if (i < C) {
      float* row = dw2f + i * Cr;
      mlp.k.mattvec(h.data(), gz2.data() + i, C, row, B, Cr);
      if (out.t2 != ScalarType::Float) store_floats(row, out.dw2, out.t2, i * Cr, Cr);
    } else {
      const int64_t r = i - C;
      float* row = dw1f + r * C;
      mlp.k.mattvec(s, gz1.data() + r, Cr, row, B, C);
      if (out.t1 != ScalarType::Float) store_floats(row, out.dw1, out.t1, r * C, C);
    }
  };
  run_phases(g, B * C * HW * 3, reduce, mid, apply, C + Cr, post);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> mimb_scale_bwd_cpu(Tensor dy, Tensor x, Tensor w1,
                                                              Tensor w2, Tensor v, Tensor s) {
  const char* op = "mimb_scale_bwd";
  check_cpu_float(dy, op, "dy", 4, "[B, C, H, W]");
  check_cpu_float(x, op, "x", 4, "[B, C, H, W]");
  check_cpu_float(w1, op, "w1", 2, "[Cr, C]");
  check_cpu_float(w2, op, "w2", 2, "[C, Cr]");
  check_cpu_float(v, op, "v", 2, "[B, C]");
  check_cpu_float(s, op, "s", 2, "[B, C]");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t Cr = w1.size(0);
  for (int64_t d = 0; d < 4; ++d)
    STD_TORCH_CHECK(dy.size(d) == x.size(d), "mipnet_cpu::", op,
                    ": dy must have the shape of x; size ", dy.size(d), " != ", x.size(d),
                    " at dim ", d);
  STD_TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "mipnet_cpu::", op, ": dy is ",
                  dtype_name(dy.scalar_type()), " but x is ", dtype_name(x.scalar_type()));
  check_size(w1, op, "w1", 1, C, "C (x.size(1))");
  check_size(w2, op, "w2", 0, C, "C (x.size(1))");
  check_size(w2, op, "w2", 1, Cr, "Cr (w1.size(0))");
  check_size(v, op, "v", 0, B, "B (x.size(0))");
  check_size(v, op, "v", 1, C, "C (x.size(1))");
  check_size(s, op, "s", 0, B, "B (x.size(0))");
  check_size(s, op, "s", 1, C, "C (x.size(1))");
  const Layout lay = x_layout(x, op, "x");
  // dy in x's layout (autograd may hand over another one, e.g. an expanded gradient).
  const bool dy_ok = lay.nhwc ? is_channels_last(dy) : dy.is_contiguous();
  if (!dy_ok)
    dy = torch::stable::contiguous(dy, lay.nhwc ? MemoryFormat::ChannelsLast
                                                : MemoryFormat::Contiguous);

  Tensor dx = alloc_4d(x, B, C, H, W, lay.out_cl);
  Tensor dw1 = torch::stable::new_empty(w1, {Cr, C});
  Tensor dw2 = torch::stable::new_empty(w2, {C, Cr});
  Tensor dv = torch::stable::new_empty(v, {B, C});
  if (B * C == 0) {
    torch::stable::zero_(dw1);
    torch::stable::zero_(dw2);
    return std::make_tuple(dx, dw1, dw2, dv);
  }

  std::vector<float> b1, b2, bv, bs;
  const Mlp mlp{as_float_2d(w1, b1), as_float_2d(w2, b2), C, Cr};
  const float* pv = as_float_2d(v, bv);
  const float* ps = as_float_2d(s, bs);
  const Geometry g(B, C, HW, lay.nhwc);
  const BwdOut out{dw1.data_ptr(), dw2.data_ptr(), dv.data_ptr(), w1.scalar_type(),
                   w2.scalar_type(), v.scalar_type()};
  switch (x.scalar_type()) {
    case ScalarType::Half:
      scale_bwd_impl(g, static_cast<const Half*>(dy.data_ptr()),
                     static_cast<const Half*>(x.data_ptr()), static_cast<Half*>(dx.data_ptr()),
                     mlp, pv, ps, out);
      break;
    case ScalarType::BFloat16:
      scale_bwd_impl(g, static_cast<const BFloat16*>(dy.data_ptr()),
                     static_cast<const BFloat16*>(x.data_ptr()),
                     static_cast<BFloat16*>(dx.data_ptr()), mlp, pv, ps, out);
      break;
    default:
      scale_bwd_impl(g, static_cast<const float*>(dy.data_ptr()),
                     static_cast<const float*>(x.data_ptr()), static_cast<float*>(dx.data_ptr()),
                     mlp, pv, ps, out);
      break;
  }
  return std::make_tuple(dx, dw1, dw2, dv);
}

// ==================================================================== instances
template <class T>
void instances_impl(const Geometry& g, const T* x, T* y, const Mlp& mlp, const float* table,
                    int64_t N) {
  const int64_t B = g.B, C = g.C, Cr = mlp.Cr, HW = g.HW;
  std::vector<float> red(static_cast<size_t>(B * g.red_len));
  std::vector<float> s(static_cast<size_t>(B * C)), e(static_cast<size_t>(B * C));
  std::vector<float> z2(static_cast<size_t>(B * C));
  std::vector<float> z1(static_cast<size_t>(B * Cr)), h(static_cast<size_t>(B * Cr));
  std::vector<float> a(static_cast<size_t>(N * B * C));  // a[(n * B + b) * C + c]
  const float n_f = static_cast<float>(HW);
  const int64_t ostride = B * C * HW;  // one instance's block of the output
  auto reduce = [&](int64_t b, int64_t k, float* scr) {
    reduce_part<T, false>(g, x, x, b, k, red.data(), scr);
  };
  auto mid = [&](int64_t b) {
    float* sb = s.data() + b * C;
    g.finish_sum(red.data(), b, sb);
    for (int64_t c = 0; c < C; ++c) sb[c] = sb[c] / n_f;
    float* eb = e.data() + b * C;
    mlp.forward(sb, z1.data() + b * Cr, h.data() + b * Cr, z2.data() + b * C, eb);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) a[(n * B + b) * C + c] = eb[c] * table[n * C + c];
  };
  // x is read once (converted once into scratch tile 1), each instance is computed into
  // tile 2 (float32 outputs: straight into y) and written.
  const k8::Kern& K = kern();
  auto apply = [&](int64_t b, int64_t k, float* scr) {
    const int64_t off = g.part_offset(b, k), cnt = g.part_count(k);
    float* s2 = scr + g.tile;
    if (!g.nhwc) {
      const int64_t c0 = k * g.group;
      // The whole group at once, or a large plane in blocks.
      const bool whole = HW <= kPlaneBlock;
      const int64_t len = whole ? cnt * HW : HW;
      const int64_t np = whole ? cnt : 1;
      for (int64_t i = 0; i < len; i += kPlaneBlock) {
        const int64_t n = whole ? len : std::min(kPlaneBlock, HW - i);
        const float* xf = as_f32(x + off + i, n, scr);
        for (int64_t j = 0; j < N; ++j) {
          T* yj = y + j * ostride + off + i;
          float* yf = out_f32(yj, s2);
          K.planes_scale(xf, yf, whole ? HW : n, np, a.data() + (j * B + b) * C + c0);
          flush(yf, yj, n);
        }
      }
    } else {
      const int64_t n = cnt * C;
      const float* xf = as_f32(x + off, n, scr);
      for (int64_t j = 0; j < N; ++j) {
        T* yj = y + j * ostride + off;
        float* yf = out_f32(yj, s2);
        K.rows_scale(xf, yf, a.data() + (j * B + b) * C, C, cnt);
        flush(yf, yj, n);
      }
    }
  };
  run_phases(g, B * C * HW * (1 + N), reduce, mid, apply, 0, NoPost{});
}

Tensor mimb_instances_cpu(Tensor x, Tensor w1, Tensor w2, Tensor table) {
  const char* op = "mimb_instances";
  check_cpu_float(x, op, "x", 4, "[B, C, H, W]");
  check_cpu_float(w1, op, "w1", 2, "[Cr, C]");
  check_cpu_float(w2, op, "w2", 2, "[C, Cr]");
  check_cpu_float(table, op, "table", 2, "[N, C]");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t Cr = w1.size(0), N = table.size(0);
  check_size(w1, op, "w1", 1, C, "C (x.size(1))");
  check_size(w2, op, "w2", 0, C, "C (x.size(1))");
  check_size(w2, op, "w2", 1, Cr, "Cr (w1.size(0))");
  check_size(table, op, "table", 1, C, "C (x.size(1))");
  const Layout lay = x_layout(x, op, "x");

  Tensor y = alloc_4d(x, N * B, C, H, W, lay.out_cl);
  if (N * B * C * HW == 0) return y;

  std::vector<float> b1, b2, bt;
  const Mlp mlp{as_float_2d(w1, b1), as_float_2d(w2, b2), C, Cr};
  const float* pt = as_float_2d(table, bt);
  const Geometry g(B, C, HW, lay.nhwc);
  switch (x.scalar_type()) {
    case ScalarType::Half:
      instances_impl(g, static_cast<const Half*>(x.data_ptr()), static_cast<Half*>(y.data_ptr()),
                     mlp, pt, N);
      break;
    case ScalarType::BFloat16:
      instances_impl(g, static_cast<const BFloat16*>(x.data_ptr()),
                     static_cast<BFloat16*>(y.data_ptr()), mlp, pt, N);
      break;
    default:
      instances_impl(g, static_cast<const float*>(x.data_ptr()),
                     static_cast<float*>(y.data_ptr()), mlp, pt, N);
      break;
  }
  return y;
}

}  // namespace
}  // namespace cpu
}  // namespace mipnet

STABLE_TORCH_LIBRARY_IMPL(mipnet_cpu, CPU, m) {
  m.impl("mimb_scale_fwd", TORCH_BOX(&mipnet::cpu::mimb_scale_fwd_cpu));
  m.impl("mimb_scale_bwd", TORCH_BOX(&mipnet::cpu::mimb_scale_bwd_cpu));
  m.impl("mimb_instances", TORCH_BOX(&mipnet::cpu::mimb_instances_cpu));
}
