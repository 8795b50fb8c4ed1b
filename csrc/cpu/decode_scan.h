// Argmax scans of the decode ops (csrc/cpu/decode_kernel.cpp): NOT a normal header.
// decode_kernel.cpp includes it once per instruction set (isa.h), each time inside its
// own namespace (isa_base, isa_avx2) in its anonymous namespace, with MIPNET_VEC_AVX2
// defined to 0 (4-lane vectors: SSE2 / NEON) or 1 (8-lane AVX2; the includer wraps it in
// an AVX2 target region unless the build targets AVX2).  Every variant returns the same
// results (first maximum in order, NaN flag) whatever its lane count.  Needs SpanArg,
// kNegInf and ld() from the includer.  No include guard, on purpose.

#ifndef MIPNET_VEC_AVX2
#error "define MIPNET_VEC_AVX2 (0 or 1) before including decode_scan.h"
#endif

namespace vec {
#include "vec_body.h"  // undefines MIPNET_VEC_AVX2
}  // namespace vec

// Argmax of n contiguous values: first maximum and the NaN flag, in one pass.  2 * kW
// lanes each keep their strict running maximum (`v > m`: a lane keeps the first of equal
// values) and its position; the lanes are merged at the end by taking, among the lanes
// holding the maximum, the smallest position.  Equal values compare equal whatever their
// sign of zero, as in torch.argmax.  Positions are int32 (H*W is checked to fit).
template <class T>
SpanArg span_argmax(const T* p, int64_t n) {
  using namespace vec;
  const vf neg_inf = splat(kNegInf);
  vf m0 = neg_inf, m1 = neg_inf;
  vi i0 = splat_i(0), i1 = splat_i(0), bad = splat_i(0);
  vi pos0 = iota();
  vi pos1 = pos0 + splat_i(kW);
  const vi step = splat_i(2 * kW);
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    const vf v0 = load8(p + i), v1 = load8(p + i + kW);
    const vi u0 = v0 > m0, u1 = v1 > m1;
    m0 = select(u0, v0, m0);
    m1 = select(u1, v1, m1);
    i0 = select(u0, pos0, i0);
    i1 = select(u1, pos1, i1);
    bad |= (v0 != v0) | (v1 != v1);
    pos0 += step;
    pos1 += step;
  }
  // Lanes out by value stores (taking the vectors' address, or subscripting them, makes
  // GCC keep them on the stack inside the loop).
  float mv[2 * kW];
  int32_t iv[2 * kW], bv[kW];
  store8(mv, m0);
  store8(mv + kW, m1);
  store8(iv, i0);
  store8(iv + kW, i1);
  store8(bv, bad);
  bool nan = false;
  for (int l = 0; l < kW; ++l) nan = nan || bv[l] != 0;
  // Tail, scalar; its positions come after every lane's.
  float tm = kNegInf;
  int64_t ti = -1;
  for (; i < n; ++i) {
    const float v = ld(p[i]);
    nan = nan || (v != v);
    if (v > tm) {
      tm = v;
      ti = i;
    }
  }
  float best = tm;
  for (int l = 0; l < 2 * kW; ++l) best = mv[l] > best ? mv[l] : best;
  int64_t idx = -1;
  for (int l = 0; l < 2 * kW; ++l)
    if (mv[l] == best && (idx < 0 || iv[l] < idx)) idx = iv[l];
  if (idx < 0) idx = ti >= 0 ? ti : 0;  // all -inf (or NaN): position 0 is a maximum
  return SpanArg{best, idx, nan};
}

// Channels-last scan: argmax of joints [0, nk) of one image at once (their values are
// contiguous at each pixel), reading memory in order.  best/idx/bad: per-joint state.
template <class T>
void joints_argmax(const T* img, int64_t nk, int64_t H, int64_t W, int64_t sy, int64_t sx,
                   float* best, int32_t* idx, int32_t* bad) {
  using namespace vec;
  for (int64_t j = 0; j < nk; ++j) {
    best[j] = kNegInf;
    idx[j] = 0;
    bad[j] = 0;
  }
  const int64_t nvec = nk - nk % kW;
  for (int64_t yy = 0; yy < H; ++yy) {
    for (int64_t xx = 0; xx < W; ++xx) {
      const T* q = img + yy * sy + xx * sx;
      const int32_t pos = static_cast<int32_t>(yy * W + xx);
      const vi vpos = splat_i(pos);
      for (int64_t j = 0; j < nvec; j += kW) {
        const vf v = load8(q + j);
        const vf b = load8(best + j);
        const vi up = v > b;
        store8(best + j, select(up, v, b));
        store8(idx + j, select(up, vpos, load8(idx + j)));
        store8(bad + j, load8(bad + j) | (v != v));
      }
      for (int64_t j = nvec; j < nk; ++j) {
        const float v = ld(q[j]);
        if (v > best[j]) {
          best[j] = v;
          idx[j] = pos;
        }
        bad[j] |= (v != v);
      }
    }
  }
}

template <class T>
ScanKern<T> make_scan_kern() {
  return ScanKern<T>{&span_argmax<T>, &joints_argmax<T>};
}
