// Vector loops of the decode ops (csrc/cpu/decode_kernel.cpp): the argmax scans and
// flip_merge's rows.  NOT a normal header.
// decode_kernel.cpp includes it once per instruction set (isa.h), each time inside its
// own namespace (isa_base, isa_avx2, isa_avx512) in its anonymous namespace, with
// MIPNET_VEC_WIDTH defined to 4 (SSE2 / NEON), 8 (AVX2) or 16 (AVX-512; the includer wraps
// the wider ones in a target region unless the build targets them).  Every variant returns
// the same results (first maximum in order, NaN flag) whatever its lane count.  Needs
// SpanArg, kNegInf and ld() from the includer.  No include guard, on purpose.

#ifndef MIPNET_VEC_WIDTH
#error "define MIPNET_VEC_WIDTH (4, 8 or 16) before including decode_scan.h"
#endif

#if MIPNET_VEC_WIDTH == 16  // kept for first_set (vec_body.h undefines MIPNET_VEC_WIDTH)
#define MIPNET_SCAN_WIDTH 16
#elif MIPNET_VEC_WIDTH == 8
#define MIPNET_SCAN_WIDTH 8
#else
#define MIPNET_SCAN_WIDTH 4
#endif
namespace vec {
#include "vec_body.h"  // undefines MIPNET_VEC_WIDTH
}  // namespace vec

// Lanes of a vector out by a value store (taking the vector's address, or subscripting it,
// makes GCC keep it on the stack inside the loops).
inline float lanes_max(vec::vf m) {
  float mv[vec::kW];
  vec::store8(mv, m);
  float best = mv[0];
  for (int l = 1; l < vec::kW; ++l) best = mv[l] > best ? mv[l] : best;
  return best;
}

inline vec::vf vmax(vec::vf a, vec::vf b) { return vec::select(b > a, b, a); }  // maxps(b, a)

// The first lane of a comparison mask that is set, or -1 (a movemask on x86-64).
inline int first_set(vec::vi mask) {
#if defined(__x86_64__) && MIPNET_SCAN_WIDTH == 16
  const unsigned bits = _mm512_movepi32_mask(vec::bits<__m512i>(mask));
#elif defined(__x86_64__) && MIPNET_SCAN_WIDTH == 8
  const unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(vec::bits<__m256>(mask)));
#elif defined(__x86_64__)
  const unsigned bits = static_cast<unsigned>(_mm_movemask_ps(vec::bits<__m128>(mask)));
#else
  int32_t mv[vec::kW];
  vec::store8(mv, mask);
  for (int l = 0; l < vec::kW; ++l)
    if (mv[l] != 0) return l;
  return -1;
#endif
#if defined(__x86_64__)
  return bits == 0 ? -1 : __builtin_ctz(bits);
#endif
}

// Argmax of n contiguous values: first maximum and the NaN flag.
//
// A read-once reduction at the speed of a max (torch.amax's loop: one load and one max
// per vector, no index tracking).  The span is cut into blocks of kBlock values; each
// block leaves the lane-wise maximum of its 4 accumulators in bm[].  Every kChunk blocks
// the largest lane decides: the first block whose bm row holds a strictly larger maximum
// than all earlier blocks holds the first maximum (blocks are visited in order), and a
// second look at that block alone (still in L1) finds its first position.  NaN: a running
// sum per lane (one add per vector) is NaN iff a value is NaN, or +inf and -inf both occur
// (or partial sums overflow both ways) -- then one exact pass decides.  Equal values
// compare equal whatever their sign of zero, as in torch.argmax; the value returned is the
// element at the index.
template <class T>
SpanArg span_argmax(const T* p, int64_t n) {
  using namespace vec;
  constexpr int64_t kStep = 4 * kW;
  constexpr int64_t kBlock = 8 * kStep;  // 256 floats with AVX2
  constexpr int kChunk = 16;             // blocks per decision
  const vf neg_inf = splat(kNegInf);
  vf sum0 = splat(0.f), sum1 = sum0;
  float best = kNegInf;
  int64_t best_start = -1, best_end = -1;  // the block holding the first maximum
  vf bm[kChunk];
  int64_t i = 0;
  const int64_t nvec = n - n % kW;  // [0, nvec): vectors; then a scalar tail
  while (i < nvec) {
    const int64_t chunk_start = i;
    int nb = 0;
    for (; nb < kChunk && i < nvec; ++nb) {
      vf m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
      if (i + kBlock <= nvec) {
        for (const int64_t e = i + kBlock; i < e; i += kStep) {
          const vf v0 = load8(p + i), v1 = load8(p + i + kW);
          const vf v2 = load8(p + i + 2 * kW), v3 = load8(p + i + 3 * kW);
          m0 = vmax(m0, v0);  // NaN keeps m (the sum reports it)
          m1 = vmax(m1, v1);
          m2 = vmax(m2, v2);
          m3 = vmax(m3, v3);
          sum0 += v0 + v1;
          sum1 += v2 + v3;
        }
      } else {  // the last, partial block: whole vectors
        for (; i < nvec; i += kW) {
          const vf v0 = load8(p + i);
          m0 = vmax(m0, v0);
          sum0 += v0;
        }
      }
      bm[nb] = vmax(vmax(m0, m1), vmax(m2, m3));
    }
    vf mc = bm[0];
    for (int b = 1; b < nb; ++b) mc = vmax(mc, bm[b]);
    const float h = lanes_max(mc);
    if (h > best) {  // a new maximum in this chunk: the first block that holds it
      best = h;
      const vf hv = splat(h);
      for (int b = 0; b < nb; ++b)
        if (first_set(bm[b] == hv) >= 0) {
          best_start = chunk_start + b * kBlock;
          best_end = std::min(best_start + kBlock, nvec);
          break;
        }
    }
  }
  // The scalar tail (< kW values): its positions come after every vector's.
  float tail_best = kNegInf;
  int64_t tail_idx = -1;
  float tail_sum = 0.f;
  for (int64_t t = nvec; t < n; ++t) {
    const float v = ld(p[t]);
    tail_sum += v;
    if (v > tail_best) {
      tail_best = v;
      tail_idx = t;
    }
  }
  bool nan = tail_sum != tail_sum;
  {
    float sv[2 * kW];
    store8(sv, sum0);
    store8(sv + kW, sum1);
    for (int l = 0; l < 2 * kW; ++l) nan = nan || sv[l] != sv[l];
  }
  if (nan) {  // NaN, or +inf and -inf: decide exactly
    nan = false;
    for (int64_t t = 0; t < n && !nan; ++t) {
      const float v = ld(p[t]);
      nan = v != v;
    }
  }
  int64_t idx = 0;  // all -inf (or NaN): position 0 is a maximum
  if (best_start >= 0 && !(tail_best > best)) {
    const vf bv = splat(best);
    for (int64_t b = best_start; b < best_end; b += kW) {
      const int l = first_set(load8(p + b) == bv);
      if (l >= 0) {
        idx = b + l;
        break;
      }
    }
  } else if (tail_idx >= 0) {
    idx = tail_idx;
  }
  return SpanArg{n > 0 ? ld(p[idx]) : kNegInf, idx, nan};
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

// flip_merge over `rows` contiguous rows of W values (row y at a + y * say, f + y * sfy,
// o + y * W): o[x] = (a[x] + f[W-1-xs]) / 2, xs = x-1 for x >= 1 when shifted, else x;
// each value rounded once to T.  The mirrored read is a lane reversal.  Whole maps per call
// (a call per row cost as much as the row's 6 vectors at W = 48).
//
// A row of kW values or more past x0 is whole vectors only: one at x0 (unaligned in the
// shifted case, whose run starts at x = 1), the next from the first multiple of kW when W
// keeps rows kW-aligned (unaligned stores across cache lines cost ~1.6x), and the last one
// ending at W, overlapping its predecessor when W - x0 is not a multiple of kW (the overlap
// is written twice with the same values).  No scalar tail and no software prefetch: GCC
// unrolled and vectorised a scalar tail loop into ~150 instructions of set-up kept live
// across the rows (spilled), and this loop is memory-bound -- the fewer instructions it
// executes per cache line, the more misses the core keeps in flight.  That is most of what
// a software prefetch of the next flipped map (read in the flip index's order, COCO: 0, 2,
// 1, 4, 3, ...) had been hiding; once the loop is tight the prefetch only costs.  48x17x64x48
// fp32, 1 thread, one process, t / torch.add: old loop 1.47x with the prefetch, 1.64x
// without; this loop 1.35x without, 1.42x with.
template <class T>
void flip_rows(const T* a, int64_t say, const T* f, int64_t sfy, T* o, int64_t rows, int64_t W,
               bool shifted) {
  using namespace vec;
  const int64_t x0 = shifted ? 1 : 0;       // first x of the mirrored run
  const int64_t off = shifted ? W : W - 1;  // out[x] reads f[off - x] for x >= x0
  if (W - x0 < kW) {  // narrow maps
    for (int64_t y = 0; y < rows; ++y) {
      const T* ar = a + y * say;
      const T* fr = f + y * sfy;
      T* orow = o + y * W;
      if (shifted) orow[0] = T((ld(ar[0]) + ld(fr[W - 1])) * 0.5f);
      for (int64_t x = x0; x < W; ++x) orow[x] = T((ld(ar[x]) + ld(fr[off - x])) * 0.5f);
    }
    return;
  }
  const vf half = splat(0.5f);
  const int64_t xa = (x0 > 0 && W % kW == 0) ? kW : x0 + kW;  // the second vector
  const int64_t xl = W - kW;                                  // the last one
  const T* ar = a;
  const T* fr = f;
  T* orow = o;
  for (int64_t y = 0; y < rows; ++y, ar += say, fr += sfy, orow += W) {
    // out[x .. x+kW) reads f[off-x-kW+1 .. off-x] = fe[-x .. -x+kW), reversed.
    const T* fe = fr + (off - (kW - 1));
    if (shifted) orow[0] = T((ld(ar[0]) + ld(fr[W - 1])) * 0.5f);
    store8(orow + x0, (load8(ar + x0) + reverse(load8(fe - x0))) * half);
    for (int64_t x = xa; x < xl; x += kW)
      store8(orow + x, (load8(ar + x) + reverse(load8(fe - x))) * half);
    store8(orow + xl, (load8(ar + xl) + reverse(load8(fe - xl))) * half);
  }
}

template <class T>
ScanKern<T> make_scan_kern() {
  return ScanKern<T>{&span_argmax<T>, &joints_argmax<T>, &flip_rows<T>};
}

#undef MIPNET_SCAN_WIDTH
