// Vector kernel bodies of the MIMB CPU ops (csrc/cpu/mimb_kernel.cpp).
//
// NOT a normal header: mimb_kernel.cpp includes it once per instruction set, each time
// inside its own namespace, with MIPNET_MIMB_AVX2 defined to 1 (8-lane AVX2 vectors, float16
// through F16C; the includer wraps it in a target("avx2,f16c") region unless the whole
// build already targets AVX2) or 0 (the baseline ISA: SSE2 / NEON, an 8-lane vector held
// as two 4-lane halves); with MIPNET_MIMB_AVX512BF16 also 1, bfloat16 stores use
// AVX512-BF16's vcvtneps2bf16 (target region "avx2,f16c,avx512f,avx512vl,avx512dq,avx512bf16").
// No include guard, on purpose.
//
// Both variants compute lane for lane the same operations in the same order (an 8-lane
// value V, horizontal sums as ((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7)), no FMA
// since -ffp-contract=off), and all float16 / bfloat16 conversions round exactly like
// c10, so every result is bit-identical whichever variant runs.
//
// Provides, for T in {float, Half, BFloat16}:  make_kern<T>() -> Kern<T> (the streaming
// kernels of one dtype), make_mat_kern<T>() -> MatKern<T> (the MLP's mat-vecs on weights of
// that dtype) and make_sigmoid() -> SigmoidFn; the types are declared by the includer.

#ifndef MIPNET_MIMB_AVX2
#error "define MIPNET_MIMB_AVX2 (0 or 1) before including mimb.h"
#endif
#ifndef MIPNET_MIMB_AVX512BF16
#define MIPNET_MIMB_AVX512BF16 0
#endif

#define MIPNET_AI inline __attribute__((always_inline))

typedef int32_t v4i __attribute__((vector_size(16)));
typedef float v4f __attribute__((vector_size(16)));
typedef float v4f_u __attribute__((vector_size(16), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4), may_alias));

// exp(x), x clamped to [-87.3, 88.376] (finite, normal results): Cephes' expf, ~1 ulp.
// W: a generic float vector type of any width, Wi: the int32 vector of the same width.
template <class W, class Wi>
MIPNET_AI W exp_lanes(W x) {
  const W zero = W{};
  x = x < zero + 88.3762626647949f ? x : zero + 88.3762626647949f;
  x = x > zero - 87.3f ? x : zero - 87.3f;
  const W fx = x * 1.44269504088896341f + 0.5f;
  W t = __builtin_convertvector(__builtin_convertvector(fx, Wi), W);  // trunc
  t = t > fx ? t - 1.f : t;                                          // floor
  x = x - t * 0.693359375f;
  x = x - t * -2.12194440e-4f;
  const W z = x * x;
  W y = zero + 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.f;
  const Wi e = (__builtin_convertvector(t, Wi) + 127) << 23;  // 2^t
  return y * (W)e;
}

#if MIPNET_MIMB_AVX2
// ------------------------------------------------------------------ 8 native lanes
typedef v8f V;
constexpr int kNB = 8;  // channel vectors per register block of the NHWC reduction

MIPNET_AI V vsplat(float x) { return V{x, x, x, x, x, x, x, x}; }
MIPNET_AI float vhsum(V v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
MIPNET_AI V vexp(V x) { return exp_lanes<v8f, v8i>(x); }
// out[i] = vhsum(v[i]) for i < n <= 8, bit for bit: the same additions in the same order
// (p = lo + hi, then adjacent pairs of p, then adjacent pairs of those, as hadd adds), 8
// vectors at a time (a lone vhsum is ~15 shuffles and adds, as much as a short mat-vec row).
template <int n>
MIPNET_AI void vhsum_many(const V* v, float* out) {
  static_assert(n >= 1 && n <= 8, "vhsum_many sums 1 to 8 vectors");
  __m256 q[4];  // q[i] = [p(v[2i]) | p(v[2i + 1])]
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m256 a = 2 * i < n ? (__m256)v[2 * i] : _mm256_setzero_ps();
    const __m256 b = 2 * i + 1 < n ? (__m256)v[2 * i + 1] : _mm256_setzero_ps();
    q[i] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
  // [s0 s2 s4 s6 | s1 s3 s5 s7]
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(q[0], q[1]), _mm256_hadd_ps(q[2], q[3]));
  alignas(32) float t[8];
  _mm256_store_ps(t, h);
#pragma GCC unroll 8
  for (int i = 0; i < n; ++i) out[i] = t[(i % 2) * 4 + i / 2];
}

MIPNET_AI V vload(const float* p) { return *reinterpret_cast<const v8f_u*>(p); }
MIPNET_AI void vstore(float* p, V v) { *reinterpret_cast<v8f_u*>(p) = v; }
// bfloat16: the upper half of the float's bits.
MIPNET_AI V vload(const BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (V)_mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
// c10::detail::round_to_nearest_even (NaN -> 0x7FC0), in integer arithmetic.
MIPNET_AI __m128i bf16_round_int(V f) {
  const __m256i u = _mm256_castps_si256((__m256)f);
  const __m256i bias = _mm256_add_epi32(
      _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps((__m256)f, (__m256)f, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // packus works per 128-bit lane: [r0..3 r0..3 | r4..7 r4..7] -> qwords 0 and 2.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}
#if MIPNET_MIMB_AVX512BF16
// vcvtneps2bf16 rounds like c10 except for NaN (keeps sign / payload) and denormals
// (flushed): vectors holding either take the integer path.
MIPNET_AI void vstore(BFloat16* p, V f) {
  __m128i r;
  if (__builtin_expect(_mm256_fpclass_ps_mask((__m256)f, 0xA1) != 0, 0))  // NaN | denormal
    r = bf16_round_int(f);
  else
    r = (__m128i)_mm256_cvtneps_pbh((__m256)f);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), r);
}
#else
MIPNET_AI void vstore(BFloat16* p, V f) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_round_int(f));
}
#endif
// float16 with F16C (IEEE round to nearest even, as c10::Half)
MIPNET_AI V vload(const Half* p) {
  return (V)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
MIPNET_AI void vstore(Half* p, V f) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph((__m256)f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

#else
// ------------------------------------------------------------------ 2 x 4 lanes
struct V {
  v4f lo, hi;
};
constexpr int kNB = 4;

MIPNET_AI V operator+(V a, V b) { return V{a.lo + b.lo, a.hi + b.hi}; }
MIPNET_AI V operator-(V a, V b) { return V{a.lo - b.lo, a.hi - b.hi}; }
MIPNET_AI V operator*(V a, V b) { return V{a.lo * b.lo, a.hi * b.hi}; }
MIPNET_AI V operator/(V a, V b) { return V{a.lo / b.lo, a.hi / b.hi}; }
MIPNET_AI V operator-(V a) { return V{-a.lo, -a.hi}; }
MIPNET_AI V& operator+=(V& a, V b) {
  a.lo += b.lo;
  a.hi += b.hi;
  return a;
}
MIPNET_AI V vsplat(float x) { return V{v4f{x, x, x, x}, v4f{x, x, x, x}}; }
MIPNET_AI float vhsum(V v) {
  return ((v.lo[0] + v.hi[0]) + (v.lo[1] + v.hi[1])) + ((v.lo[2] + v.hi[2]) + (v.lo[3] + v.hi[3]));
}
MIPNET_AI V vexp(V x) { return V{exp_lanes<v4f, v4i>(x.lo), exp_lanes<v4f, v4i>(x.hi)}; }
// out[i] = vhsum(v[i]) for i < n (the AVX2 variant does 8 at once; same results)
template <int n>
MIPNET_AI void vhsum_many(const V* v, float* out) {
#pragma GCC unroll 8
  for (int i = 0; i < n; ++i) out[i] = vhsum(v[i]);
}

MIPNET_AI v4f ld4(const float* p) { return *reinterpret_cast<const v4f_u*>(p); }
MIPNET_AI void st4(float* p, v4f v) { *reinterpret_cast<v4f_u*>(p) = v; }
MIPNET_AI V vload(const float* p) { return V{ld4(p), ld4(p + 4)}; }
MIPNET_AI void vstore(float* p, V v) {
  st4(p, v.lo);
  st4(p + 4, v.hi);
}
// float16 / bfloat16: vec.h's exact lane-parallel conversions (4 lanes in this build).
static_assert(vec::kW == 4, "the baseline variant expects 4-lane vec.h vectors");
MIPNET_AI V vload(const BFloat16* p) { return V{vec::load8(p), vec::load8(p + 4)}; }
MIPNET_AI V vload(const Half* p) { return V{vec::load8(p), vec::load8(p + 4)}; }
MIPNET_AI void vstore(BFloat16* p, V v) {
  vec::store8(p, v.lo);
  vec::store8(p + 4, v.hi);
}
MIPNET_AI void vstore(Half* p, V v) {
  vec::store8(p, v.lo);
  vec::store8(p + 4, v.hi);
}
#endif

template <class T>
MIPNET_AI float ld1(const T& v) {
  return static_cast<float>(v);
}

// ================================================================== contiguous spans
// sum of n values: four accumulators, then lanes, then the tail.  sum_lanes: the first
// two steps (the vector to reduce; the tail starts at n - n % 8).
template <class T>
MIPNET_AI V sum_lanes(const T* p, int64_t n) {
  V a0 = vsplat(0.f), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 += vload(p + i);
    a1 += vload(p + i + 8);
    a2 += vload(p + i + 16);
    a3 += vload(p + i + 24);
  }
  for (; i + 8 <= n; i += 8) a0 += vload(p + i);
  return (a0 + a1) + (a2 + a3);
}
template <class T>
MIPNET_AI float sum_body(const T* p, int64_t n) {
  float s = vhsum(sum_lanes(p, n));
  for (int64_t i = n - n % 8; i < n; ++i) s += ld1(p[i]);
  return s;
}

// sum of dy[i] * x[i]
template <class T>
MIPNET_AI float dot_body(const T* dy, const T* x, int64_t n) {
  V a0 = vsplat(0.f), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 += vload(dy + i) * vload(x + i);
    a1 += vload(dy + i + 8) * vload(x + i + 8);
    a2 += vload(dy + i + 16) * vload(x + i + 16);
    a3 += vload(dy + i + 24) * vload(x + i + 24);
  }
  for (; i + 8 <= n; i += 8) a0 += vload(dy + i) * vload(x + i);
  float s = vhsum((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += ld1(dy[i]) * ld1(x[i]);
  return s;
}

// y = x * a
template <class T>
MIPNET_AI void scale_body(const T* x, T* y, int64_t n, float a) {
  const V va = vsplat(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const V x0 = vload(x + i), x1 = vload(x + i + 8);
    vstore(y + i, x0 * va);
    vstore(y + i + 8, x1 * va);
  }
  for (; i + 8 <= n; i += 8) vstore(y + i, vload(x + i) * va);
  for (; i < n; ++i) y[i] = T(ld1(x[i]) * a);
}

// dx = dy * a + k
template <class T>
MIPNET_AI void axpb_body(const T* dy, T* dx, int64_t n, float a, float k) {
  const V va = vsplat(a), vk = vsplat(k);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const V d0 = vload(dy + i), d1 = vload(dy + i + 8);
    vstore(dx + i, d0 * va + vk);
    vstore(dx + i + 8, d1 * va + vk);
  }
  for (; i + 8 <= n; i += 8) vstore(dx + i, vload(dy + i) * va + vk);
  for (; i < n; ++i) dx[i] = T(ld1(dy[i]) * a + k);
}

// ================================================================== NCHW: np planes of hw
// Small planes (hw < kSmallPlane, e.g. 8 x 6 at C = 256) eight at a time: the per-plane
// horizontal sum, as long as the plane's loads, goes through vhsum_many (the same bits).
constexpr int64_t kSmallPlane = 256;
template <class T>
void planes_sum(const T* x, int64_t hw, int64_t np, float* out) {
  int64_t p = 0;
  if (hw < kSmallPlane) {
    for (; p + 8 <= np; p += 8) {
      V t[8];
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) t[j] = sum_lanes(x + (p + j) * hw, hw);
      vhsum_many<8>(t, out + p);
      if (hw % 8)
        for (int j = 0; j < 8; ++j) {
          const T* xp = x + (p + j) * hw;
          float s = out[p + j];
          for (int64_t i = hw - hw % 8; i < hw; ++i) s += ld1(xp[i]);
          out[p + j] = s;
        }
    }
  }
  for (; p < np; ++p) out[p] = sum_body(x + p * hw, hw);
}
template <class T>
void planes_dot(const T* dy, const T* x, int64_t hw, int64_t np, float* out) {
  for (int64_t p = 0; p < np; ++p) out[p] = dot_body(dy + p * hw, x + p * hw, hw);
}
// y[p] = x[p] * a[p]
template <class T>
void planes_scale(const T* x, T* y, int64_t hw, int64_t np, const float* a) {
  for (int64_t p = 0; p < np; ++p) scale_body(x + p * hw, y + p * hw, hw, a[p]);
}
// dx[p] = dy[p] * a[p] + k[p]
template <class T>
void planes_axpb(const T* dy, T* dx, int64_t hw, int64_t np, const float* a, const float* k) {
  for (int64_t p = 0; p < np; ++p) axpb_body(dy + p * hw, dx + p * hw, hw, a[p], k[p]);
}
// dx[p] = sum_j dy[j * dstride + p] * a[j * astride + p] + k[p] for j < N (N >= 1): the
// sum in j order, then + k; dx written once (N = 1: planes_axpb bit for bit).  NJ > 0: N
// known at compile time (the j loop unrolled); 0: any N.  Same operations either way.
template <int NJ, class T>
MIPNET_AI void planes_axpb_nj(const T* dy, int64_t dstride, int64_t N, T* dx, int64_t hw,
                              int64_t np, const float* a, int64_t astride, const float* k) {
  if (NJ > 0) N = NJ;
  for (int64_t p = 0; p < np; ++p) {
    const T* dp = dy + p * hw;
    T* xp = dx + p * hw;
    const float* ap = a + p;
    const V a0 = vsplat(ap[0]), vk = vsplat(k[p]);
    int64_t i = 0;
    for (; i + 16 <= hw; i += 16) {
      V s0 = vload(dp + i) * a0, s1 = vload(dp + i + 8) * a0;
#pragma GCC unroll 4
      for (int64_t j = 1; j < N; ++j) {
        const T* dj = dp + j * dstride + i;
        const V aj = vsplat(ap[j * astride]);
        s0 += vload(dj) * aj;
        s1 += vload(dj + 8) * aj;
      }
      vstore(xp + i, s0 + vk);
      vstore(xp + i + 8, s1 + vk);
    }
    for (; i + 8 <= hw; i += 8) {
      V s0 = vload(dp + i) * a0;
#pragma GCC unroll 4
      for (int64_t j = 1; j < N; ++j) s0 += vload(dp + j * dstride + i) * vsplat(ap[j * astride]);
      vstore(xp + i, s0 + vk);
    }
    for (; i < hw; ++i) {
      float s0 = ld1(dp[i]) * ap[0];
      for (int64_t j = 1; j < N; ++j) s0 += ld1(dp[j * dstride + i]) * ap[j * astride];
      xp[i] = T(s0 + k[p]);
    }
  }
}
template <class T>
void planes_axpb_n(const T* dy, int64_t dstride, int64_t N, T* dx, int64_t hw, int64_t np,
                   const float* a, int64_t astride, const float* k) {
  switch (N) {
    case 1: return planes_axpb(dy, dx, hw, np, a, k);
    case 2: return planes_axpb_nj<2>(dy, dstride, N, dx, hw, np, a, astride, k);
    case 3: return planes_axpb_nj<3>(dy, dstride, N, dx, hw, np, a, astride, k);
    case 4: return planes_axpb_nj<4>(dy, dstride, N, dx, hw, np, a, astride, k);
    default: return planes_axpb_nj<0>(dy, dstride, N, dx, hw, np, a, astride, k);
  }
}
// y[j * ostride + p] = x[p] * a[j * astride + p] for j < N: x read once, N outputs.
// NJ > 0: N known at compile time, the N factors splat once per plane (the stores may
// alias a, so the compiler reloads them per store otherwise) and 16 values per step.
template <int NJ, class T>
MIPNET_AI void planes_multi_nj(const T* x, T* y, int64_t hw, int64_t np, int64_t ostride,
                               const float* a, int64_t astride) {
  for (int64_t p = 0; p < np; ++p) {
    const T* xp = x + p * hw;
    T* yp = y + p * hw;
    V av[NJ];
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) av[j] = vsplat(a[j * astride + p]);
    int64_t i = 0;
    for (; i + 16 <= hw; i += 16) {
      const V x0 = vload(xp + i), x1 = vload(xp + i + 8);
#pragma GCC unroll 4
      for (int j = 0; j < NJ; ++j) {
        vstore(yp + j * ostride + i, x0 * av[j]);
        vstore(yp + j * ostride + i + 8, x1 * av[j]);
      }
    }
    for (; i + 8 <= hw; i += 8) {
      const V xv = vload(xp + i);
#pragma GCC unroll 4
      for (int j = 0; j < NJ; ++j) vstore(yp + j * ostride + i, xv * av[j]);
    }
    for (; i < hw; ++i) {
      const float xv = ld1(xp[i]);
#pragma GCC unroll 4
      for (int j = 0; j < NJ; ++j) yp[j * ostride + i] = T(xv * a[j * astride + p]);
    }
  }
}
template <class T>
void planes_multi(const T* x, T* y, int64_t hw, int64_t np, int64_t N, int64_t ostride,
                  const float* a, int64_t astride) {
  switch (N) {
    case 1: return planes_multi_nj<1>(x, y, hw, np, ostride, a, astride);
    case 2: return planes_multi_nj<2>(x, y, hw, np, ostride, a, astride);
    case 3: return planes_multi_nj<3>(x, y, hw, np, ostride, a, astride);
    case 4: return planes_multi_nj<4>(x, y, hw, np, ostride, a, astride);
    default: break;
  }
  for (int64_t p = 0; p < np; ++p) {
    const T* xp = x + p * hw;
    T* yp = y + p * hw;
    int64_t i = 0;
    for (; i + 8 <= hw; i += 8) {
      const V xv = vload(xp + i);
      for (int64_t j = 0; j < N; ++j) vstore(yp + j * ostride + i, xv * vsplat(a[j * astride + p]));
    }
    for (; i < hw; ++i) {
      const float xv = ld1(xp[i]);
      for (int64_t j = 0; j < N; ++j) yp[j * ostride + i] = T(xv * a[j * astride + p]);
    }
  }
}

// ================================================================== NHWC: np rows of C
// y[p, c] = x[p, c] * a[c]
template <class T>
void rows_scale(const T* x, T* y, const float* a, int64_t C, int64_t np) {
  for (int64_t p = 0; p < np; ++p) {
    const T* xr = x + p * C;
    T* yr = y + p * C;
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) vstore(yr + c, vload(xr + c) * vload(a + c));
    for (; c < C; ++c) yr[c] = T(ld1(xr[c]) * a[c]);
  }
}
// dx[p, c] = dy[p, c] * a[c] + k[c]
template <class T>
void rows_axpb(const T* dy, T* dx, const float* a, const float* k, int64_t C, int64_t np) {
  for (int64_t p = 0; p < np; ++p) {
    const T* dr = dy + p * C;
    T* xr = dx + p * C;
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) vstore(xr + c, vload(dr + c) * vload(a + c) + vload(k + c));
    for (; c < C; ++c) xr[c] = T(ld1(dr[c]) * a[c] + k[c]);
  }
}
// dx[p, c] = sum_j dy[j * dstride + (p, c)] * a[j * astride + c] + k[c] for j < N (N >= 1),
// in j order, then + k (N = 1: rows_axpb bit for bit; NJ as planes_axpb_nj).
template <int NJ, class T>
MIPNET_AI void rows_axpb_nj(const T* dy, int64_t dstride, int64_t N, T* dx, const float* a,
                            int64_t astride, const float* k, int64_t C, int64_t np) {
  if (NJ > 0) N = NJ;
  for (int64_t p = 0; p < np; ++p) {
    const T* dr = dy + p * C;
    T* xr = dx + p * C;
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) {
      V s0 = vload(dr + c) * vload(a + c);
#pragma GCC unroll 4
      for (int64_t j = 1; j < N; ++j)
        s0 += vload(dr + j * dstride + c) * vload(a + j * astride + c);
      vstore(xr + c, s0 + vload(k + c));
    }
    for (; c < C; ++c) {
      float s0 = ld1(dr[c]) * a[c];
      for (int64_t j = 1; j < N; ++j) s0 += ld1(dr[j * dstride + c]) * a[j * astride + c];
      xr[c] = T(s0 + k[c]);
    }
  }
}
template <class T>
void rows_axpb_n(const T* dy, int64_t dstride, int64_t N, T* dx, const float* a,
                 int64_t astride, const float* k, int64_t C, int64_t np) {
  switch (N) {
    case 1: return rows_axpb(dy, dx, a, k, C, np);
    case 2: return rows_axpb_nj<2>(dy, dstride, N, dx, a, astride, k, C, np);
    case 3: return rows_axpb_nj<3>(dy, dstride, N, dx, a, astride, k, C, np);
    case 4: return rows_axpb_nj<4>(dy, dstride, N, dx, a, astride, k, C, np);
    default: return rows_axpb_nj<0>(dy, dstride, N, dx, a, astride, k, C, np);
  }
}
// y[j * ostride + (p, c)] = x[p, c] * a[j * astride + c] for j < N
template <class T>
void rows_multi(const T* x, T* y, int64_t C, int64_t np, int64_t N, int64_t ostride,
                const float* a, int64_t astride) {
  for (int64_t p = 0; p < np; ++p) {
    const T* xr = x + p * C;
    T* yr = y + p * C;
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) {
      const V xv = vload(xr + c);
      for (int64_t j = 0; j < N; ++j)
        vstore(yr + j * ostride + c, xv * vload(a + j * astride + c));
    }
    for (; c < C; ++c) {
      const float xv = ld1(xr[c]);
      for (int64_t j = 0; j < N; ++j) yr[j * ostride + c] = T(xv * a[j * astride + c]);
    }
  }
}

// out[c] = sum over the np rows of x[., c] (DOT: dy[., c] * x[., c]) for NV vectors of
// channels, the accumulators in registers; each channel is summed in row order.
template <int NV, bool DOT, class T>
MIPNET_AI void cols_block(const T* x, const T* dy, int64_t C, int64_t np, float* out) {
  V acc[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = vsplat(0.f);
  for (int64_t p = 0; p < np; ++p) {
    const T* xr = x + p * C;
    const T* dr = dy + p * C;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (DOT)
        acc[v] += vload(dr + 8 * v) * vload(xr + 8 * v);
      else
        acc[v] += vload(xr + 8 * v);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) vstore(out + 8 * v, acc[v]);
}

// All C channels: blocks of kNB vectors, the remaining vectors, then scalar channels.
template <bool DOT, class T>
MIPNET_AI void cols_body(const T* x, const T* dy, int64_t C, int64_t np, float* out) {
  int64_t c = 0;
  for (; c + 8 * kNB <= C; c += 8 * kNB) cols_block<kNB, DOT>(x + c, dy + c, C, np, out + c);
  const int rem = static_cast<int>((C - c) / 8);  // < kNB
  switch (rem) {
    case 1: cols_block<1, DOT>(x + c, dy + c, C, np, out + c); break;
    case 2: cols_block<2, DOT>(x + c, dy + c, C, np, out + c); break;
    case 3: cols_block<3, DOT>(x + c, dy + c, C, np, out + c); break;
#if MIPNET_MIMB_AVX2
    case 4: cols_block<4, DOT>(x + c, dy + c, C, np, out + c); break;
    case 5: cols_block<5, DOT>(x + c, dy + c, C, np, out + c); break;
    case 6: cols_block<6, DOT>(x + c, dy + c, C, np, out + c); break;
    case 7: cols_block<7, DOT>(x + c, dy + c, C, np, out + c); break;
#endif
    default: break;
  }
  c += 8 * static_cast<int64_t>(rem);
  for (; c < C; ++c) {
    float s = 0.f;
    for (int64_t p = 0; p < np; ++p)
      s += DOT ? ld1(dy[p * C + c]) * ld1(x[p * C + c]) : ld1(x[p * C + c]);
    out[c] = s;
  }
}
template <class T>
void cols_sum(const T* x, int64_t C, int64_t np, float* out) {
  cols_body<false>(x, x, C, np, out);
}
template <class T>
void cols_dot(const T* dy, const T* x, int64_t C, int64_t np, float* out) {
  cols_body<true>(x, dy, C, np, out);
}

// The instances' backward's phase 1 in one pass over the rows: out_sum[c] = sum_p x[p, c]
// and out_dot[j * os + c] = sum_p dy[j * dstride + (p, c)] * x[p, c] for j < N, each
// channel summed in row order exactly as cols_sum / cols_dot (the same bits).
// One pass instead of N + 1: x is loaded once per row, and the (N + 1) * NV accumulator
// chains are independent, so the adds' latency is hidden (a block of NV vectors with one
// chain each waits on it when C is small).  Instances go in pairs, the first pair with the
// sum: 3 x NV accumulators at most.
#if MIPNET_MIMB_AVX2
constexpr int kNBm = 4;  // 12 accumulators + x + a product in 16 ymm registers
#else
constexpr int kNBm = 2;  // a V is two xmm registers
#endif
template <int NV, int NJ, bool SUM, class T>
MIPNET_AI void cols_multi_block(const T* x, const T* dy, int64_t dstride, int64_t C, int64_t np,
                                float* out_sum, float* out_dot, int64_t os) {
  constexpr int NA = (NJ + (SUM ? 1 : 0)) * NV;
  V acc[NA];
#pragma GCC unroll 12
  for (int v = 0; v < NA; ++v) acc[v] = vsplat(0.f);
  for (int64_t p = 0; p < np; ++p) {
    const T* xr = x + p * C;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const V xv = vload(xr + 8 * v);
      if (SUM) acc[v] += xv;
#pragma GCC unroll 2
      for (int j = 0; j < NJ; ++j)
        acc[(j + (SUM ? 1 : 0)) * NV + v] += vload(dy + j * dstride + p * C + 8 * v) * xv;
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    if (SUM) vstore(out_sum + 8 * v, acc[v]);
#pragma GCC unroll 2
    for (int j = 0; j < NJ; ++j)
      vstore(out_dot + j * os + 8 * v, acc[(j + (SUM ? 1 : 0)) * NV + v]);
  }
}

template <int NJ, bool SUM, class T>
MIPNET_AI void cols_multi_body(const T* x, const T* dy, int64_t dstride, int64_t C, int64_t np,
                               float* out_sum, float* out_dot, int64_t os) {
  int64_t c = 0;
  for (; c + 8 * kNBm <= C; c += 8 * kNBm)
    cols_multi_block<kNBm, NJ, SUM>(x + c, dy + c, dstride, C, np, out_sum + c, out_dot + c, os);
  const int rem = static_cast<int>((C - c) / 8);  // < kNBm
  const T *xc = x + c, *dc = dy + c;
  float *sc = out_sum + c, *oc = out_dot + c;
  switch (rem) {
    case 1: cols_multi_block<1, NJ, SUM>(xc, dc, dstride, C, np, sc, oc, os); break;
#if MIPNET_MIMB_AVX2
    case 2: cols_multi_block<2, NJ, SUM>(xc, dc, dstride, C, np, sc, oc, os); break;
    case 3: cols_multi_block<3, NJ, SUM>(xc, dc, dstride, C, np, sc, oc, os); break;
#endif
    default: break;
  }
  c += 8 * static_cast<int64_t>(rem);
  for (; c < C; ++c) {
    float s = 0.f, d[NJ > 0 ? NJ : 1] = {};
    for (int64_t p = 0; p < np; ++p) {
      const float xv = ld1(x[p * C + c]);
      if (SUM) s += xv;
      for (int j = 0; j < NJ; ++j) d[j] += ld1(dy[j * dstride + p * C + c]) * xv;
    }
    if (SUM) out_sum[c] = s;
    for (int j = 0; j < NJ; ++j) out_dot[j * os + c] = d[j];
  }
}

template <class T>
void cols_sum_dots(const T* x, const T* dy, int64_t dstride, int64_t N, int64_t C, int64_t np,
                   float* out_sum, float* out_dot, int64_t os) {
  int64_t j = 0;
  if (N >= 2) {
    cols_multi_body<2, true>(x, dy, dstride, C, np, out_sum, out_dot, os);
    j = 2;
  } else if (N == 1) {
    cols_multi_body<1, true>(x, dy, dstride, C, np, out_sum, out_dot, os);
    j = 1;
  } else {
    cols_multi_body<0, true>(x, dy, dstride, C, np, out_sum, out_dot, os);
  }
  for (; j + 2 <= N; j += 2)
    cols_multi_body<2, false>(x, dy + j * dstride, dstride, C, np, out_sum, out_dot + j * os, os);
  if (j < N)
    cols_multi_body<1, false>(x, dy + j * dstride, dstride, C, np, out_sum, out_dot + j * os, os);
}

// NCHW counterpart: out_sum[p] = sum(x[p]) (when SUM) and out_dot[j * os + p] =
// sum(dy[j * dstride + p] * x[p]), j < NJ, over np planes of hw values in one pass, each
// with sum_body's / dot_body's accumulators and order (the same bits).
template <int NJ, bool SUM, class T>
MIPNET_AI void planes_multi_body(const T* x, const T* dy, int64_t dstride, int64_t hw,
                                 int64_t np, float* out_sum, float* out_dot, int64_t os) {
  constexpr int NS = NJ + (SUM ? 1 : 0);  // streams: [sum], dots
  for (int64_t p = 0; p < np; ++p) {
    const T* xp = x + p * hw;
    const T* dp = dy + p * hw;
    V a[NS][4];
#pragma GCC unroll 3
    for (int q = 0; q < NS; ++q) a[q][0] = a[q][1] = a[q][2] = a[q][3] = vsplat(0.f);
    int64_t i = 0;
    for (; i + 32 <= hw; i += 32) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const V xv = vload(xp + i + 8 * u);
        if (SUM) a[0][u] += xv;
#pragma GCC unroll 2
        for (int j = 0; j < NJ; ++j)
          a[j + (SUM ? 1 : 0)][u] += vload(dp + j * dstride + i + 8 * u) * xv;
      }
    }
    for (; i + 8 <= hw; i += 8) {
      const V xv = vload(xp + i);
      if (SUM) a[0][0] += xv;
#pragma GCC unroll 2
      for (int j = 0; j < NJ; ++j) a[j + (SUM ? 1 : 0)][0] += vload(dp + j * dstride + i) * xv;
    }
    float r[NS];
#pragma GCC unroll 3
    for (int q = 0; q < NS; ++q) r[q] = vhsum((a[q][0] + a[q][1]) + (a[q][2] + a[q][3]));
    for (; i < hw; ++i) {
      const float xv = ld1(xp[i]);
      if (SUM) r[0] += xv;
      for (int j = 0; j < NJ; ++j) r[j + (SUM ? 1 : 0)] += ld1(dp[j * dstride + i]) * xv;
    }
    if (SUM) out_sum[p] = r[0];
    for (int j = 0; j < NJ; ++j) out_dot[j * os + p] = r[j + (SUM ? 1 : 0)];
  }
}

// Instances per pass: 3 x 4 accumulators in 16 ymm registers; a baseline V is two xmm.
#if MIPNET_MIMB_AVX2
constexpr int kPlaneDots = 2;
#else
constexpr int kPlaneDots = 1;
#endif
template <class T>
void planes_sum_dots(const T* x, const T* dy, int64_t dstride, int64_t N, int64_t hw,
                     int64_t np, float* out_sum, float* out_dot, int64_t os) {
  int64_t j = std::min<int64_t>(N, kPlaneDots);
  if (j == 2)
    planes_multi_body<2, true>(x, dy, dstride, hw, np, out_sum, out_dot, os);
  else if (j == 1)
    planes_multi_body<1, true>(x, dy, dstride, hw, np, out_sum, out_dot, os);
  else
    planes_multi_body<0, true>(x, dy, dstride, hw, np, out_sum, out_dot, os);
  for (; j + 2 <= N && kPlaneDots == 2; j += 2)
    planes_multi_body<2, false>(x, dy + j * dstride, dstride, hw, np, out_sum, out_dot + j * os,
                                os);
  for (; j < N; ++j)
    planes_multi_body<1, false>(x, dy + j * dstride, dstride, hw, np, out_sum, out_dot + j * os,
                                os);
}

// ================================================================== conversions
template <class T>
void to_float(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vstore(dst + i, vload(src + i));
  for (; i < n; ++i) dst[i] = ld1(src[i]);
}
template <class T>
void from_float(const float* src, T* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vstore(dst + i, vload(src + i));
  for (; i < n; ++i) dst[i] = T(src[i]);
}

template <class T>
Kern<T> make_kern() {
  return Kern<T>{&planes_sum<T>,    &planes_dot<T>, &planes_scale<T>, &planes_axpb<T>,
                 &planes_axpb_n<T>, &planes_multi<T>, &rows_scale<T>, &rows_axpb<T>,
                 &rows_axpb_n<T>,   &rows_multi<T>, &cols_sum<T>,     &cols_dot<T>,
                 &cols_sum_dots<T>, &planes_sum_dots<T>, &to_float<T>, &from_float<T>};
}

// ================================================================== the tiny MLP
// The weight matrices are read in their own dtype TW (converted in registers: no float32
// copy, which the other threads would have to fetch from the converting core), rows
// ld apart; the vectors are float32.
// out[r] = sum_k M[r, k] * v[k] for r < R (M [R, K]); four rows at a time.
template <class TW>
void matvec(const TW* M, int64_t ld, const float* v, float* out, int64_t R, int64_t K) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    const TW* m0 = M + r * ld;
    const TW* m1 = m0 + ld;
    const TW* m2 = m1 + ld;
    const TW* m3 = m2 + ld;
    V a0 = vsplat(0.f), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const V x = vload(v + k);
      a0 += vload(m0 + k) * x;
      a1 += vload(m1 + k) * x;
      a2 += vload(m2 + k) * x;
      a3 += vload(m3 + k) * x;
    }
    float s0 = vhsum(a0), s1 = vhsum(a1), s2 = vhsum(a2), s3 = vhsum(a3);
    for (; k < K; ++k) {
      s0 += ld1(m0[k]) * v[k];
      s1 += ld1(m1[k]) * v[k];
      s2 += ld1(m2[k]) * v[k];
      s3 += ld1(m3[k]) * v[k];
    }
    out[r] = s0;
    out[r + 1] = s1;
    out[r + 2] = s2;
    out[r + 3] = s3;
  }
  for (; r < R; ++r) {
    const TW* m0 = M + r * ld;
    V a0 = vsplat(0.f);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) a0 += vload(m0 + k) * vload(v + k);
    float s0 = vhsum(a0);
    for (; k < K; ++k) s0 += ld1(m0[k]) * v[k];
    out[r] = s0;
  }
}

// The same mat-vec for nb vectors at once: out[j * os + r] = sum_k M[r, k] * v[j * vs + k].
// Per sample, matvec streams the whole matrix (64 KB at C = 256: more than L1) from L2
// and does one multiply-add per weight loaded, so it is bound by L2 bandwidth.  Here a
// register tile of RB rows x NB samples (the register blocking of a GEMM micro-kernel,
// standard practice) keeps RB * NB accumulators live, so each weight vector loaded (and
// converted from float16 / bfloat16) serves NB samples.  Bit-identical to matvec: every
// output is still one 8-lane accumulator over k in order, then vhsum, then the scalar tail
// in k order, with the same operand order (weight * vector); the tiling only changes which
// outputs are computed side by side.
#if MIPNET_MIMB_AVX2
constexpr int kMatRows = 2;  // 2 x 4 accumulators + weights + vectors fit 16 ymm registers
#else
constexpr int kMatRows = 1;  // a V is two xmm registers here: 4 accumulators use 8 of 16
#endif
constexpr int kMatSamples = 4;  // samples per tile

template <int RB, int NB, class TW>
MIPNET_AI void matvec_tile(const TW* M, int64_t ld, const float* v, int64_t vs, float* out,
                           int64_t os, int64_t K) {
  V acc[RB * NB];  // acc[i * NB + j]: row i, sample j
#pragma GCC unroll 8
  for (int a = 0; a < RB * NB; ++a) acc[a] = vsplat(0.f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
#pragma GCC unroll 4
    for (int i = 0; i < RB; ++i) {
      const V w = vload(M + i * ld + k);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i * NB + j] += w * vload(v + j * vs + k);
    }
  }
  float s[RB * NB];
  vhsum_many<RB * NB>(acc, s);
#pragma GCC unroll 4
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      float sum = s[i * NB + j];
      for (int64_t t = k; t < K; ++t) sum += ld1(M[i * ld + t]) * v[j * vs + t];
      out[j * os + i] = sum;
    }
}

// All R rows for NB samples: tiles of kMatRows rows, then single rows.
template <int NB, class TW>
void matvec_nb(const TW* M, int64_t ld, const float* v, int64_t vs, float* out, int64_t os,
               int64_t R, int64_t K) {
  int64_t r = 0;
  for (; r + kMatRows <= R; r += kMatRows)
    matvec_tile<kMatRows, NB>(M + r * ld, ld, v, vs, out + r, os, K);
  for (; r < R; ++r) matvec_tile<1, NB>(M + r * ld, ld, v, vs, out + r, os, K);
}

// Any nb: groups of kMatSamples samples, then the rest (one sample: matvec itself).
template <class TW>
void matvec_multi(const TW* M, int64_t ld, const float* v, int64_t vs, float* out, int64_t os,
                  int64_t R, int64_t K, int64_t nb) {
  for (; nb >= kMatSamples; nb -= kMatSamples, v += kMatSamples * vs, out += kMatSamples * os)
    matvec_nb<kMatSamples>(M, ld, v, vs, out, os, R, K);
  static_assert(kMatSamples == 4, "the remainder cases below assume 4 samples per tile");
  switch (nb) {
    case 1: return matvec(M, ld, v, out, R, K);
    case 2: return matvec_nb<2>(M, ld, v, vs, out, os, R, K);
    case 3: return matvec_nb<3>(M, ld, v, vs, out, os, R, K);
    default: return;
  }
}

// out[k] = sum_r v[r * vs] * M[r, k] for k < K (M [R, K]), r in order.
template <class TW>
void mattvec(const TW* M, int64_t ld, const float* v, int64_t vs, float* out, int64_t R,
             int64_t K) {
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    V a0 = vsplat(0.f), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t r = 0; r < R; ++r) {
      const V w = vsplat(v[r * vs]);
      const TW* m = M + r * ld + k;
      a0 += w * vload(m);
      a1 += w * vload(m + 8);
      a2 += w * vload(m + 16);
      a3 += w * vload(m + 24);
    }
    vstore(out + k, a0);
    vstore(out + k + 8, a1);
    vstore(out + k + 16, a2);
    vstore(out + k + 24, a3);
  }
  for (; k + 8 <= K; k += 8) {
    V a0 = vsplat(0.f);
    for (int64_t r = 0; r < R; ++r) a0 += vsplat(v[r * vs]) * vload(M + r * ld + k);
    vstore(out + k, a0);
  }
  for (; k < K; ++k) {
    float a0 = 0.f;
    for (int64_t r = 0; r < R; ++r) a0 += v[r * vs] * ld1(M[r * ld + k]);
    out[k] = a0;
  }
}

// e[i] = 1 / (1 + exp(-z[i]))  (the tail through a zero-padded vector: same lane math).
// Non-finite z as torch.sigmoid: NaN -> NaN, -inf -> 0, +inf -> 1.  The Cephes range clamp
// in vexp (max/min) would turn a NaN into a finite value (a diverged sample, NaN or
// overflowing x, would look healthy) and -inf into 2.9e-39 (so inf * e is not NaN).
inline void sigmoid_fixup(const float* z, float* e, int64_t n);
// Whether any lane has d != 0 (NaN included: z not finite) or z < -80.
MIPNET_AI bool vany_special(V d, V z) {
#if MIPNET_MIMB_AVX2
  const __m256 bad = _mm256_or_ps(_mm256_cmp_ps((__m256)d, _mm256_setzero_ps(), _CMP_NEQ_UQ),
                                  _mm256_cmp_ps((__m256)z, _mm256_set1_ps(-80.f), _CMP_LT_OQ));
  return _mm256_movemask_ps(bad) != 0;
#else
  const v4i bad_lo = (d.lo != 0.f) | (d.lo != d.lo) | (z.lo < -80.f);
  const v4i bad_hi = (d.hi != 0.f) | (d.hi != d.hi) | (z.hi < -80.f);
  const v4i b = bad_lo | bad_hi;
  return (b[0] | b[1] | b[2] | b[3]) != 0;
#endif
}
inline void sigmoid(const float* z, float* e, int64_t n) {
  const V one = vsplat(1.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vstore(e + i, one / (one + vexp(-vload(z + i))));
  if (i < n) {
    float tz[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, te[8];
    for (int64_t j = i; j < n; ++j) tz[j - i] = z[j];
    vstore(te, one / (one + vexp(-vload(tz))));
    for (int64_t j = i; j < n; ++j) e[j] = te[j - i];
  }
  // The fix-ups below, only for blocks of 8 that hold a non-finite z or one below -80 (one
  // vector test per block: a scalar test per value cost as much as the vector math).
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    const int64_t m = std::min<int64_t>(8, n - i0);
    if (m == 8) {
      const V zv = vload(z + i0);
      const V d = zv - zv;  // 0 when finite, NaN otherwise
      if (!vany_special(d, zv)) continue;
    }
    sigmoid_fixup(z + i0, e + i0, m);
  }
}

// The non-finite / far-left-tail values of n <= 8 consecutive z (see sigmoid).
inline void sigmoid_fixup(const float* z, float* e, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float zj = z[j];
    if (!(zj - zj == 0.f)) {
      e[j] = zj != zj ? zj : (zj > 0.f ? 1.f : 0.f);
    } else if (zj < -80.f) {
      // Far left tail as torch.sigmoid (and the CUDA / Triton kernels) computes it,
      // 1 / (1 + exp(-z)) with exp(-z) overflowing to inf below -88.7 (so 0): vexp's range
      // clamp (exp(88.7) at most) would leave 2.9e-39, visible as y = x * e for a huge x.
      e[j] = 1.f / (1.f + std::exp(-zj));
    }
  }
}

template <class TW>
MatKern<TW> make_mat_kern() {
  return MatKern<TW>{&matvec<TW>, &matvec_multi<TW>, &mattvec<TW>};
}
inline SigmoidFn make_sigmoid() { return &sigmoid; }

#undef MIPNET_AI
#undef MIPNET_MIMB_AVX512BF16
