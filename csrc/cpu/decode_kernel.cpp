// C++ CPU kernels of the heatmap decoding ops (torch.ops.mipnet_cpu.*).
//
//   decode_heatmaps(heatmaps, mode, affine, blur_weights) -> (coords, scores)
//   flip_merge(heatmaps, flipped, flip_index, shift) -> merged
//
// Schemas and contracts: csrc/schemas.h.  Specification: the PyTorch references in
// mipnet_kernels/ops/decode.py.  The refinement formulas (quarter, DARK, UDP, affine) are
// shared with the CUDA kernels through csrc/decode.h; this file only scans, dispatches on
// dtype/layout and parallelises.
//
// decode_heatmaps makes one fused pass per heatmap: the argmax scan (first maximum in
// row-major order, tracking NaN) is the only full read of the map; the refinement then
// re-reads a small window around the argmax.  The DARK fast path evaluates the blur at
// the 13 Newton points only; when the rescale could hit the log floor (decode.h) it falls
// back to the exact blurred maximum of the whole map, computed separably here
// (bit-identical to decode::dark_blurred_max_serial, ~10x cheaper).
//
// Layouts: any strides.  Contiguous maps / rows (stride(3) == 1) are scanned with an
// explicitly vectorised lane-parallel argmax (vec.h); channels-last maps (stride(1) == 1)
// are scanned for all joints of an image at once, reading memory in order; anything else
// uses a plain strided scan.  The two vector scans (decode_scan.h) are compiled for the
// baseline ISA and, on x86-64, for AVX2, picked at run time like the MIMB
// kernels (isa.h: the process-wide path, MIPNET_KERNELS_CPU_ISA); all give identical
// results.  The avx512 path runs the AVX2 code: flip_merge's rows are memory-bound, and a
// 16-lane build of them measured no faster (48x17x64x48 / 96x72 fp32, 1 thread: 1.12x /
// 1.15x torch.add against 1.07x / 1.09x with 8 lanes, same process, Zen 5), and a 16-lane
// build of the argmax scan measured slower (48x17x64x48 fp32, 1 thread, Zen 5: 2.2x
// torch.amax against 1.3-1.9x with 8 lanes, interleaved in one process).  Arithmetic
// is float32 after loading (fp16/bf16 converted on load, bit-exactly like c10).  No
// -ffast-math: the NaN tracking relies on IEEE comparisons; -ffp-contract=off: no FMA, so
// rounding matches the reference's.
//
// Parallelism: OpenMP over maps (or images, channels-last) once there is enough work,
// with torch's intra-op thread count (torch.set_num_threads).  Each map is computed by
// one thread in a fixed order, so results do not depend on the thread count.
//
// Uses only PyTorch's stable ABI (torch/csrc/stable, torch/headeronly).

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>
#ifdef MIPNET_CHECK_SEPARABLE_BLUR
#include <cstdio>
#include <cstdlib>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../decode.h"
#include "../host_utils.h"
#include "isa.h"
#include "vec.h"

namespace mipnet {
namespace cpu {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using host::dtype_name;
using host::is_supported_float;
using host::num_threads_for;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <class T>
inline float ld(const T& v) {
  return static_cast<float>(v);
}

// Fetch functor for decode.h: pixel (y, x) of one map, any strides.
template <class T>
struct MapFetch {
  const T* p;
  int64_t sy, sx;
  inline float operator()(int y, int x) const {
    return ld(p[static_cast<int64_t>(y) * sy + static_cast<int64_t>(x) * sx]);
  }
};

// ------------------------------------------------------------------------ argmax scans
struct Peak {
  int64_t y = 0, x = 0;
  bool nan = false;
};

struct SpanArg {
  float value;    // the maximum (-inf if every value is -inf)
  int64_t index;  // its first position
  bool nan;       // whether any value is NaN (value / index are then meaningless)
};

// Argmax scans, compiled per instruction set (decode_scan.h, isa.h) and picked at run time:
// the scan is the only full read of each map, and the AVX2 one is about 3x faster than
// the SSE2 one (8 lanes, and blends in place of and/andnot/or selects).
template <class T>
struct ScanKern {
  // argmax of n contiguous values
  SpanArg (*span)(const T* p, int64_t n);
  // channels-last: argmax of joints [0, nk) of one image (see joints_argmax)
  void (*joints)(const T* img, int64_t nk, int64_t H, int64_t W, int64_t sy, int64_t sx,
                 float* best, int32_t* idx, int32_t* bad);
  // flip_merge over rows of contiguous values (see flip_rows)
  void (*flip_rows)(const T* a, int64_t say, const T* f, int64_t sfy, T* o, int64_t rows,
                    int64_t W, bool shifted);
};

#if !MIPNET_ISA_NATIVE_AVX2
namespace isa_base {
#define MIPNET_VEC_WIDTH 4
#include "decode_scan.h"
}  // namespace isa_base
#endif
#if MIPNET_ISA_NATIVE_AVX2 || MIPNET_ISA_DISPATCH_AVX2
#if MIPNET_ISA_DISPATCH_AVX2
MIPNET_ISA_AVX2_BEGIN
#endif
namespace isa_avx2 {
#define MIPNET_VEC_WIDTH 8
#include "decode_scan.h"
}  // namespace isa_avx2
#if MIPNET_ISA_DISPATCH_AVX2
MIPNET_ISA_END
#endif
#endif
template <class T>
ScanKern<T> scan_kern_for(Isa isa) {
#if MIPNET_ISA_NATIVE_AVX2
  (void)isa;
  return isa_avx2::make_scan_kern<T>();
#else
#if MIPNET_ISA_DISPATCH_AVX2
  if (isa != Isa::kScalar && isa_supported(Isa::kAvx2)) return isa_avx2::make_scan_kern<T>();
#endif
  (void)isa;
  return isa_base::make_scan_kern<T>();
#endif
}
template <class T>
const ScanKern<T>& scan_kern() {
  return isa_variant<ScanKern<T>, &scan_kern_for<T>>();
}

// Argmax of one map: first maximum in row-major order, plus the NaN flag.
template <class T>
Peak map_argmax(const ScanKern<T>& sk, const T* p, int64_t H, int64_t W, int64_t sy,
                int64_t sx) {
  Peak pk;
  if (sx == 1 && (sy == W || H == 1)) {
    // The whole map is one contiguous span.
    const SpanArg a = sk.span(p, H * W);
    pk.nan = a.nan;
    pk.y = a.index / W;
    pk.x = a.index % W;
    return pk;
  }
  if (sx == 1) {
    // Contiguous rows: the first row whose maximum beats every earlier row's holds the
    // first maximum of the map.
    SpanArg best = sk.span(p, W);
    int64_t best_row = 0;
    bool nan = best.nan;
    for (int64_t y = 1; y < H; ++y) {
      const SpanArg a = sk.span(p + y * sy, W);
      nan = nan || a.nan;
      if (a.value > best.value) {
        best = a;
        best_row = y;
      }
    }
    pk.nan = nan;
    pk.y = best_row;
    pk.x = best.index;
    return pk;
  }
  // Any strides.
  float best = kNegInf;
  int64_t by = 0, bx = 0;
  bool nan = false;
  for (int64_t y = 0; y < H; ++y) {
    const T* row = p + y * sy;
    for (int64_t x = 0; x < W; ++x) {
      const float v = ld(row[x * sx]);
      nan = nan || (v != v);
      if (v > best) {
        best = v;
        by = y;
        bx = x;
      }
    }
  }
  pk.nan = nan;
  pk.y = by;
  pk.x = bx;
  return pk;
}

// ------------------------------------------------------------------------ DARK fallback
// Maximum of the zero-padded blur over the whole map, bit-identical to
// decode::dark_blurred_max_serial but separable (2k instead of k*k multiply-adds a pixel,
// and vectorisable over x).  Identity: blur_zero sums, in this order, row terms
// g[j] * f(yy, xx) into `row` starting from +0 and then g[i] * row into `acc` starting
// from +0, skipping out-of-range terms; here the same sums run over zero-padded buffers.
// A padded term adds g * (+0) = +0, which leaves the running sum unchanged (a sum that
// starts at +0 is never -0 under round-to-nearest), so every blurred value, and hence the
// maximum, is the same float.  Needs -ffp-contract=off like the rest of this file.
// `buf` is per-thread scratch.
template <class F>
float dark_blurred_max_separable(const F& f, const float* g, int k, int H, int W,
                                 std::vector<float>& buf) {
  const int r = k / 2;
  const int64_t pw = W + 2 * r;  // padded row width
  const int64_t n_pad = static_cast<int64_t>(H) * pw;
  const int64_t n_row = static_cast<int64_t>(H + 2 * r) * W;
  if (static_cast<int64_t>(buf.size()) < n_pad + n_row + W) buf.resize(n_pad + n_row + W);
  float* P = buf.data();      // [H][W + 2r]: the map, zero columns either side
  float* R = P + n_pad;       // [H + 2r][W]: row-blurred, zero rows above and below
  float* acc = R + n_row;     // [W]
  for (int y = 0; y < H; ++y) {
    float* pr = P + y * pw;
    for (int x = 0; x < r; ++x) pr[x] = 0.0f;
    for (int x = 0; x < W; ++x) pr[r + x] = f(y, x);
    for (int x = r + W; x < pw; ++x) pr[x] = 0.0f;
  }
  for (int64_t i = 0; i < static_cast<int64_t>(r) * W; ++i) R[i] = 0.0f;
  for (int64_t i = static_cast<int64_t>(r + H) * W; i < n_row; ++i) R[i] = 0.0f;
  for (int y = 0; y < H; ++y) {
    const float* pr = P + y * pw;
    float* rr = R + static_cast<int64_t>(y + r) * W;
    for (int x = 0; x < W; ++x) rr[x] = 0.0f;
    for (int j = 0; j < k; ++j) {
      const float gj = g[j];
      for (int x = 0; x < W; ++x) rr[x] += gj * pr[x + j];
    }
  }
  float m = -INFINITY;
  for (int y = 0; y < H; ++y) {
    for (int x = 0; x < W; ++x) acc[x] = 0.0f;
    for (int i = 0; i < k; ++i) {
      const float gi = g[i];
      const float* rr = R + static_cast<int64_t>(y + i) * W;
      for (int x = 0; x < W; ++x) acc[x] += gi * rr[x];
    }
    for (int x = 0; x < W; ++x) m = fmaxf(m, acc[x]);
  }
  return m;
}

// ------------------------------------------------------------------------ refinement
struct DecodeParams {
  int64_t mode;
  const float* g;  // blur taps (dark/udp)
  int k;           // number of taps
  const float* affine;  // [B, 2, 3] or nullptr
};

// Refinement + affine + outputs of map (b, j), given its argmax.
template <class T>
inline void finish_map(const T* p, int64_t H, int64_t W, int64_t sy, int64_t sx,
                       const Peak& pk, const DecodeParams& P, int64_t b, float* coord,
                       float* score) {
  namespace d = mipnet::decode;
  if (pk.nan) {
    coord[0] = kNaN;
    coord[1] = kNaN;
    *score = kNaN;
    return;
  }
  const MapFetch<T> f{p, sy, sx};
  const int Hi = static_cast<int>(H), Wi = static_cast<int>(W);
  const int px = static_cast<int>(pk.x), py = static_cast<int>(pk.y);
  const float s = f(py, px);
  float x = static_cast<float>(px), y = static_cast<float>(py);
  switch (P.mode) {
    case d::kQuarter:
      d::refine_quarter(f, px, py, Hi, Wi, x, y);
      break;
    case d::kDark:
      if (d::dark_interior(px, py, Hi, Wi)) {
        float smp[d::kDarkPoints], L[d::kDarkPoints];
        const bool fast = d::dark_samples(f, P.g, P.k, px, py, Hi, Wi, smp);
        if (fast && s > 0.0f) {
          d::dark_log_fast(smp, L);
          d::dark_step(L, x, y);
        } else if (s > 0.0f) {
          // Exact path: the rescale factor c may push samples onto the 1e-10 floor.
          // (With s <= 0 the rescale is undefined whatever the blurred maximum: no step.)
          thread_local std::vector<float> scratch;
          const float bmax = dark_blurred_max_separable(f, P.g, P.k, Hi, Wi, scratch);
#ifdef MIPNET_CHECK_SEPARABLE_BLUR
          {
            const float ref = d::dark_blurred_max_serial(f, P.g, P.k, Hi, Wi);
            if (!(std::memcmp(&ref, &bmax, sizeof(float)) == 0 || (ref != ref && bmax != bmax)))
              std::fprintf(stderr, "separable blur max %a != serial %a\n", bmax, ref), std::abort();
          }
#endif
          if (d::dark_rescale_valid(s, bmax)) {
            d::dark_log_rescaled(smp, s / bmax, L);
            d::dark_step(L, x, y);
          }
        }
      }
      break;
    case d::kUdp:
      d::refine_udp(f, P.g, P.k, px, py, Hi, Wi, x, y);
      break;
    default:  // argmax
      break;
  }
  if (P.affine != nullptr) d::apply_affine(P.affine + 6 * b, x, y);
  coord[0] = x;
  coord[1] = y;
  *score = s;
}

// ------------------------------------------------------------------------ decode driver
template <class T>
void decode_impl(const T* base, int64_t B, int64_t K, int64_t H, int64_t W, int64_t sb,
                 int64_t sk, int64_t sy, int64_t sx, const DecodeParams& P, float* coords,
                 float* scores) {
  const int64_t BK = B * K;
  const int64_t HW = H * W;
  const ScanKern<T>& scan = scan_kern<T>();

  if (sk == 1 && K > 1 && sx != 1 && HW > 1) {
    // Channels-last: the K maps of one image are interleaved.  Scan all joints of a
    // block together so memory is read in order and the joint loop vectorises.
    constexpr int64_t kBlock = 64;
    const int64_t nblk = (K + kBlock - 1) / kBlock;
    const int64_t items = B * nblk;
    const int nt = num_threads_for(items, BK * HW);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / nblk;
      const int64_t k0 = (it % nblk) * kBlock;
      const int64_t nk = std::min(kBlock, K - k0);
      const T* img = base + b * sb + k0;
      float best[kBlock];
      int32_t idx[kBlock];
      int32_t bad[kBlock];
      scan.joints(img, nk, H, W, sy, sx, best, idx, bad);
      for (int64_t j = 0; j < nk; ++j) {
        Peak pk;
        pk.nan = bad[j] != 0;
        pk.y = idx[j] / W;
        pk.x = idx[j] % W;
        const int64_t m = b * K + k0 + j;
        finish_map(img + j, H, W, sy, sx, pk, P, b, coords + 2 * m, scores + m);
      }
    }
    return;
  }

  const int nt = num_threads_for(BK, BK * HW);
  // guided: DARK maps that take the exact fallback cost far more than the others.
#pragma omp parallel for schedule(guided) num_threads(nt) if (nt > 1)
  for (int64_t m = 0; m < BK; ++m) {
    const int64_t b = m / K;
    const int64_t j = m % K;
    const T* p = base + b * sb + j * sk;
    const Peak pk = map_argmax(scan, p, H, W, sy, sx);
    finish_map(p, H, W, sy, sx, pk, P, b, coords + 2 * m, scores + m);
  }
}

std::tuple<Tensor, Tensor> decode_heatmaps_cpu(Tensor heatmaps, int64_t mode,
                                               std::optional<Tensor> affine,
                                               Tensor blur_weights) {
  namespace d = mipnet::decode;
  // ---- input checks
  STD_TORCH_CHECK(heatmaps.is_cpu(), "mipnet_cpu::decode_heatmaps: heatmaps must be a CPU tensor");
  STD_TORCH_CHECK(heatmaps.dim() == 4,
                  "mipnet_cpu::decode_heatmaps: heatmaps must be 4-D [B, K, H, W], got ",
                  heatmaps.dim(), " dims");
  const ScalarType dt = heatmaps.scalar_type();
  STD_TORCH_CHECK(is_supported_float(dt),
                  "mipnet_cpu::decode_heatmaps: heatmaps must be float32, float16 or bfloat16, got ",
                  dtype_name(dt));
  STD_TORCH_CHECK(mode >= d::kArgmax && mode <= d::kUdp,
                  "mipnet_cpu::decode_heatmaps: mode must be 0 (argmax), 1 (quarter), 2 (dark) "
                  "or 3 (udp), got ", mode);
  const int64_t B = heatmaps.size(0), K = heatmaps.size(1);
  const int64_t H = heatmaps.size(2), W = heatmaps.size(3);
  const int64_t BK = B * K;
  STD_TORCH_CHECK(BK == 0 || H * W > 0, "mipnet_cpu::decode_heatmaps: heatmaps has an empty "
                  "spatial size ", H, "x", W, "; no maximum to decode");
  STD_TORCH_CHECK(H * W <= std::numeric_limits<int32_t>::max(),
                  "mipnet_cpu::decode_heatmaps: heatmaps maps of ", H, "x", W,
                  " are too large (H*W must fit in int32)");

  const float* A = nullptr;
  if (affine.has_value() && affine->defined()) {
    const Tensor& a = *affine;
    STD_TORCH_CHECK(a.is_cpu(), "mipnet_cpu::decode_heatmaps: affine must be a CPU tensor");
    STD_TORCH_CHECK(a.scalar_type() == ScalarType::Float,
                    "mipnet_cpu::decode_heatmaps: affine must be float32, got ",
                    dtype_name(a.scalar_type()));
    STD_TORCH_CHECK(a.dim() == 3 && a.size(0) == B && a.size(1) == 2 && a.size(2) == 3,
                    "mipnet_cpu::decode_heatmaps: affine must have shape [B, 2, 3] with B = ", B);
    STD_TORCH_CHECK(a.is_contiguous(), "mipnet_cpu::decode_heatmaps: affine must be contiguous");
    A = static_cast<const float*>(a.data_ptr());
  }

  float g[d::kMaxBlurKernel] = {};
  int k = 0;
  if (mode == d::kDark || mode == d::kUdp) {
    STD_TORCH_CHECK(blur_weights.is_cpu(),
                    "mipnet_cpu::decode_heatmaps: blur_weights must be a CPU tensor");
    STD_TORCH_CHECK(blur_weights.scalar_type() == ScalarType::Float,
                    "mipnet_cpu::decode_heatmaps: blur_weights must be float32, got ",
                    dtype_name(blur_weights.scalar_type()));
    STD_TORCH_CHECK(blur_weights.dim() == 1,
                    "mipnet_cpu::decode_heatmaps: blur_weights must be 1-D, got ",
                    blur_weights.dim(), " dims");
    const int64_t n = blur_weights.numel();
    STD_TORCH_CHECK(n >= 1 && n % 2 == 1 && n <= d::kMaxBlurKernel,
                    "mipnet_cpu::decode_heatmaps: blur_weights must have an odd length in [1, ",
                    d::kMaxBlurKernel, "] for dark/udp, got ", n);
    STD_TORCH_CHECK(blur_weights.is_contiguous(),
                    "mipnet_cpu::decode_heatmaps: blur_weights must be contiguous");
    const float* w = static_cast<const float*>(blur_weights.data_ptr());
    std::copy(w, w + n, g);
    k = static_cast<int>(n);
  }

  // ---- outputs
  Tensor coords = torch::stable::new_empty(heatmaps, {B, K, 2}, ScalarType::Float);
  Tensor scores = torch::stable::new_empty(heatmaps, {B, K}, ScalarType::Float);
  if (BK == 0) return std::make_tuple(coords, scores);

  const DecodeParams P{mode, g, k, A};
  float* pc = static_cast<float*>(coords.data_ptr());
  float* ps = static_cast<float*>(scores.data_ptr());
  const int64_t sb = heatmaps.stride(0), sk = heatmaps.stride(1);
  const int64_t sy = heatmaps.stride(2), sx = heatmaps.stride(3);
  const void* data = heatmaps.data_ptr();
  switch (dt) {
    case ScalarType::Half:
      decode_impl(static_cast<const torch::headeronly::Half*>(data), B, K, H, W, sb, sk, sy,
                  sx, P, pc, ps);
      break;
    case ScalarType::BFloat16:
      decode_impl(static_cast<const torch::headeronly::BFloat16*>(data), B, K, H, W, sb, sk,
                  sy, sx, P, pc, ps);
      break;
    default:
      decode_impl(static_cast<const float*>(data), B, K, H, W, sb, sk, sy, sx, P, pc, ps);
      break;
  }
  return std::make_tuple(coords, scores);
}

// ------------------------------------------------------------------------ flip_merge
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(MIPNET_NO_F16C)
#define MIPNET_HAVE_F16C_PATH 1
// float16 rows with the F16C conversion instructions (runtime-detected; the baseline
// build has no F16C and its exact software conversion costs ~15 instructions a value).
// Same IEEE round-to-nearest-even results as c10::Half for every non-NaN value.
bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}

__attribute__((target("avx,f16c"))) void flip_row_f16c(const uint16_t* ar, const uint16_t* fr,
                                                       uint16_t* o, int64_t x0, int64_t W,
                                                       int64_t off) {
  const __m128i rev = _mm_setr_epi8(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1);
  const __m256 half = _mm256_set1_ps(0.5f);
  int64_t x = x0;
  for (; x + 8 <= W; x += 8) {
    const __m256 va = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ar + x)));
    const __m128i f = _mm_loadu_si128(reinterpret_cast<const __m128i*>(fr + (off - x - 7)));
    const __m256 vb = _mm256_cvtph_ps(_mm_shuffle_epi8(f, rev));
    const __m256 r = _mm256_mul_ps(_mm256_add_ps(va, vb), half);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + x),
                     _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; x < W; ++x) {
    const float r = (_cvtsh_ss(ar[x]) + _cvtsh_ss(fr[off - x])) * 0.5f;
    o[x] = _cvtss_sh(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}
#endif

template <class T>
inline bool flip_row_fast(const T*, const T*, T*, int64_t, int64_t, int64_t) {
  return false;
}
#ifdef MIPNET_HAVE_F16C_PATH
template <>
inline bool flip_row_fast(const c10::Half* ar, const c10::Half* fr, c10::Half* o, int64_t x0,
                          int64_t W, int64_t off) {
  if (!cpu_has_f16c()) return false;
  flip_row_f16c(reinterpret_cast<const uint16_t*>(ar), reinterpret_cast<const uint16_t*>(fr),
                reinterpret_cast<uint16_t*>(o), x0, W, off);
  return true;
}
#endif

// Parallel over maps (each thread's rows are whole maps, read in order; no per-row index
// division), or over the rows of each map when there are fewer maps than threads.
template <class T>
void flip_impl(const T* a, const T* fl, T* out, const int64_t* fidx, int64_t fidx_stride,
               int64_t B, int64_t K, int64_t H, int64_t W, const int64_t* sa,
               const int64_t* sf, bool shift) {
  const int64_t maps = B * K;
  const int nt = num_threads_for(maps * H, maps * H * W);
  const bool shifted = shift && W > 1;
  const bool rows_contig = sa[3] == 1 && sf[3] == 1;
  const ScanKern<T>& vk = scan_kern<T>();
  // out[x] = (a[x] + fr[W-1-xs]) / 2, xs = x-1 for x >= 1 when shifted, else x.
  // With the shift: out[0] reads fr[W-1], out[x >= 1] reads fr[W-x].
  const int64_t x0 = shifted ? 1 : 0;       // first x of the mirrored run
  const int64_t off = shifted ? W : W - 1;  // out[x] reads fr[off - x] for x >= x0
  auto map_rows = [&](int64_t m, int64_t y0, int64_t y1) {
    const int64_t b = m / K, j = m % K;
    const T* am = a + b * sa[0] + j * sa[1] + y0 * sa[2];
    const T* fm = fl + b * sf[0] + fidx[j * fidx_stride] * sf[1] + y0 * sf[2];
    T* om = out + (m * H + y0) * W;
    if (rows_contig && !std::is_same<T, c10::Half>::value) {
      vk.flip_rows(am, sa[2], fm, sf[2], om, y1 - y0, W, shifted);
      return;
    }
    for (int64_t y = 0; y < y1 - y0; ++y) {
      const T* ar = am + y * sa[2];
      const T* fr = fm + y * sf[2];
      T* o = om + y * W;
      if (rows_contig && flip_row_fast(ar, fr, o, x0, W, off)) {  // float16 through F16C
        if (shifted) o[0] = T((ld(ar[0]) + ld(fr[W - 1])) * 0.5f);
        continue;
      }
      if (rows_contig) {
        vk.flip_rows(ar, 0, fr, 0, o, 1, W, shifted);
        continue;
      }
      if (shifted) o[0] = T((ld(ar[0]) + ld(fr[(W - 1) * sf[3]])) * 0.5f);
      const int64_t ax = sa[3], fx = sf[3];
      for (int64_t x = x0; x < W; ++x) o[x] = T((ld(ar[x * ax]) + ld(fr[(off - x) * fx])) * 0.5f);
    }
  };
  if (maps >= nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t m = 0; m < maps; ++m) map_rows(m, 0, H);
  } else {
    for (int64_t m = 0; m < maps; ++m) {
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
      for (int64_t y = 0; y < H; ++y) map_rows(m, y, y + 1);
    }
  }
}

Tensor flip_merge_cpu(Tensor heatmaps, Tensor flipped, Tensor flip_index, bool shift) {
  // ---- input checks
  STD_TORCH_CHECK(heatmaps.is_cpu(), "mipnet_cpu::flip_merge: heatmaps must be a CPU tensor");
  STD_TORCH_CHECK(flipped.is_cpu(), "mipnet_cpu::flip_merge: flipped must be a CPU tensor");
  STD_TORCH_CHECK(flip_index.is_cpu(), "mipnet_cpu::flip_merge: flip_index must be a CPU tensor");
  STD_TORCH_CHECK(heatmaps.dim() == 4,
                  "mipnet_cpu::flip_merge: heatmaps must be 4-D [B, K, H, W], got ",
                  heatmaps.dim(), " dims");
  STD_TORCH_CHECK(flipped.dim() == 4,
                  "mipnet_cpu::flip_merge: flipped must be 4-D [B, K, H, W], got ",
                  flipped.dim(), " dims");
  for (int64_t i = 0; i < 4; ++i)
    STD_TORCH_CHECK(flipped.size(i) == heatmaps.size(i),
                    "mipnet_cpu::flip_merge: flipped must have the shape of heatmaps; size ",
                    flipped.size(i), " != ", heatmaps.size(i), " at dim ", i);
  const ScalarType dt = heatmaps.scalar_type();
  STD_TORCH_CHECK(is_supported_float(dt),
                  "mipnet_cpu::flip_merge: heatmaps must be float32, float16 or bfloat16, got ",
                  dtype_name(dt));
  STD_TORCH_CHECK(flipped.scalar_type() == dt, "mipnet_cpu::flip_merge: flipped is ",
                  dtype_name(flipped.scalar_type()), " but heatmaps is ", dtype_name(dt));
  const int64_t B = heatmaps.size(0), K = heatmaps.size(1);
  const int64_t H = heatmaps.size(2), W = heatmaps.size(3);
  STD_TORCH_CHECK(flip_index.scalar_type() == ScalarType::Long,
                  "mipnet_cpu::flip_merge: flip_index must be int64, got ",
                  dtype_name(flip_index.scalar_type()));
  STD_TORCH_CHECK(flip_index.dim() == 1 && flip_index.size(0) == K,
                  "mipnet_cpu::flip_merge: flip_index must be 1-D of length K = ", K);
  const int64_t* fidx = static_cast<const int64_t*>(flip_index.data_ptr());
  const int64_t fstride = K > 0 ? flip_index.stride(0) : 1;
  for (int64_t j = 0; j < K; ++j) {
    const int64_t v = fidx[j * fstride];
    STD_TORCH_CHECK(v >= 0 && v < K, "mipnet_cpu::flip_merge: flip_index[", j, "] = ", v,
                    " is out of range for K = ", K);
  }

  Tensor out = torch::stable::new_empty(heatmaps, {B, K, H, W});
  if (B * K * H * W == 0) return out;
  const int64_t sa[4] = {heatmaps.stride(0), heatmaps.stride(1), heatmaps.stride(2),
                         heatmaps.stride(3)};
  const int64_t sf[4] = {flipped.stride(0), flipped.stride(1), flipped.stride(2),
                         flipped.stride(3)};
  switch (dt) {
    case ScalarType::Half: {
      using T = torch::headeronly::Half;
      flip_impl(static_cast<const T*>(heatmaps.data_ptr()),
                static_cast<const T*>(flipped.data_ptr()), static_cast<T*>(out.data_ptr()), fidx,
                fstride, B, K, H, W, sa, sf, shift);
      break;
    }
    case ScalarType::BFloat16: {
      using T = torch::headeronly::BFloat16;
      flip_impl(static_cast<const T*>(heatmaps.data_ptr()),
                static_cast<const T*>(flipped.data_ptr()), static_cast<T*>(out.data_ptr()), fidx,
                fstride, B, K, H, W, sa, sf, shift);
      break;
    }
    default:
      flip_impl(static_cast<const float*>(heatmaps.data_ptr()),
                static_cast<const float*>(flipped.data_ptr()),
                static_cast<float*>(out.data_ptr()), fidx, fstride, B, K, H, W, sa, sf, shift);
      break;
  }
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace mipnet

STABLE_TORCH_LIBRARY_IMPL(mipnet_cpu, CPU, m) {
  m.impl("decode_heatmaps", TORCH_BOX(&mipnet::cpu::decode_heatmaps_cpu));
  m.impl("flip_merge", TORCH_BOX(&mipnet::cpu::flip_merge_cpu));
}
