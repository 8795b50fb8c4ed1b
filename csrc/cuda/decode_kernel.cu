// CUDA kernels of the heatmap decoding ops (torch.ops.mipnet_cuda.*).
//
//   decode_heatmaps(heatmaps, mode, affine, blur_weights) -> (coords, scores)
//   flip_merge(heatmaps, flipped, flip_index, shift) -> merged
//
// Schemas and contracts: csrc/schemas.h (registered in csrc/register_cuda.cpp).
// Specification: the PyTorch references in mipnet_kernels/ops/decode.py.  The refinement
// formulas (quarter, DARK, UDP, affine) come from csrc/decode.h, shared with the CPU
// kernels; this file only scans, reduces, parallelises and dispatches.
//
// ------------------------------------------------------------------ decode_heatmaps
// Launch: ONE kernel, one thread block per (b, k) heatmap, grid = B*K blocks.  The block
// size follows the map size (about eight loads per thread, whole warps, see
// decode_threads): 64x48 fp32 -> 96 threads, 96x72 fp32 -> 128.  With many maps (>= 4
// per SM) blocks are capped at 128 threads, so with <= 64 registers (launch bounds) 8
// blocks fit per SM and every block of the benchmark grid (B=48, K=17: 816 maps) is
// resident at once: the whole tensor is requested in one wave.  Few large maps get up to
// 512 threads each.  The kernel is templated on the dtype and the mode, so argmax and
// quarter carry no DARK/UDP code (ptxas, sm_90: 40 registers fp32, 56 fp16/bf16; dark and
// udp: 64, no local memory).
//
//  1. Scan (every thread).  Contiguous maps (stride(3) == 1 and stride(2) == W) are read
//     as a flat array with 16-byte vector loads (__ldg, 4 x fp32 or 8 x fp16/bf16), four
//     independent vectors per thread per iteration; a scalar head peels up to the first
//     16-byte boundary (maps of odd size start unaligned) and a scalar tail finishes.
//     Any other strides (channels-last, slices, transposes): scalar strided loads with
//     incrementally updated (y, x).  Each thread keeps (max, first index, NaN seen).
//  2. Block argmax: warp shuffles, then warp 0 over the per-warp winners.  Order: larger
//     value wins, equal values -> lower flat index (the first maximum in row-major order,
//     as torch.argmax); NaN is never a maximum but sets the NaN flag (any NaN in the
//     map -> NaN coords and NaN score, no refinement).
//  3. Refinement (thread 0 owns (x, y) and writes the outputs):
//     * argmax: nothing;  quarter: thread 0, decode::refine_quarter (4 loads).
//     * dark (only when decode::dark_interior, else no step is possible): lanes 0..24 of
//       warp 0 each evaluate the zero-padded blur (decode::blur_zero; k = 11 compiled with
//       a constant kernel size, other k at run time) at one point of the 5x5 window
//       around the argmax, into shared memory.  Thread 0 then runs decode::dark_samples
//       over that window (served through a 1-tap identity kernel, see WindowField) ->
//       fast path: dark_log_fast + dark_step.  If the fast test fails and the original
//       max is > 0 the block takes the exact path: every thread blurs its share of the
//       WHOLE map (blur_zero), a block max-reduction gives the blurred maximum, and
//       thread 0 applies dark_rescale_valid / dark_log_rescaled / dark_step (same results
//       as the CPU's dark_blurred_max_serial: max is order independent).  Max <= 0: no
//       step.
//     * udp: the same window with decode::blur_reflect101 (OpenCV's reflect-101 border);
//       thread 0 runs decode::refine_udp over it (its 7 clamped points lie within +-1).
//     One blur per lane keeps the refinement latency (which every block pays after its
//     scan) at one 11x11 blur instead of 13 (7) serial blurs.  Blur weights are staged
//     in shared memory at kernel start (k <= 31).
//  4. decode::apply_affine (no FMA contraction) and the stores.
//
// ------------------------------------------------------------------ flip_merge
// Grid-stride elementwise kernel over the contiguous output (coalesced stores), 256
// threads, at most 8 blocks per SM; each thread handles 4 elements per iteration (all
// loads issued before the stores).  (b, k, y, x) are carried incrementally (no divisions
// in the loop).  Inputs may have any strides; flip_index is read on the device (an
// out-of-range entry yields NaN instead of an out-of-bounds read; the public op validates
// it on the host).
//
// Uses only PyTorch's stable ABI (torch/csrc/stable, torch/headeronly) and the CUDA
// runtime.  No fast-math: the NaN tracking relies on IEEE comparisons.

#ifndef USE_CUDA
#define USE_CUDA 1  // declares the CUDA parts of the stable C shim (the builds define it too)
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../decode.h"
#include "../host_utils.h"
#include "decode_layout.h"

namespace mipnet {
namespace cuda {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
namespace dec = mipnet::decode;
// Block mapping, thread splits and flip_merge's index digits: decode_layout.h (host and
// device; checked on the host by test_cuda_index_math).
namespace lay = decode_layout;
using host::dtype_name;
using host::is_supported_float;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxThreads = lay::kMaxThreads;  // decode block size cap (launch bounds)
constexpr int kMinBlocks = 2;        // -> at most 64 registers per thread
constexpr int kFlipThreads = 256;
constexpr int kFlipUnroll = 4;

// ------------------------------------------------------------------------ dtypes
// Raw storage + exact conversions (bit manipulation only, so the build's
// __CUDA_NO_HALF_CONVERSIONS__-style macros do not matter).
struct F32 {
  using raw_t = float;
  static constexpr int kVec = 4;  // elements per 16-byte load
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
  __device__ __forceinline__ static void unpack(const uint4& u, float* v) {
    v[0] = __uint_as_float(u.x);
    v[1] = __uint_as_float(u.y);
    v[2] = __uint_as_float(u.z);
    v[3] = __uint_as_float(u.w);
  }
};

template <class Self>
struct Half16Base {
  using raw_t = unsigned short;
  static constexpr int kVec = 8;
  // Element 2i is the low half of word i (little endian).
  __device__ __forceinline__ static void unpack(const uint4& u, float* v) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = Self::to_float(static_cast<unsigned short>(w[i] & 0xffffu));
      v[2 * i + 1] = Self::to_float(static_cast<unsigned short>(w[i] >> 16));
    }
  }
};

struct F16 : Half16Base<F16> {
  __device__ __forceinline__ static float to_float(unsigned short v) {
    return __half2float(__ushort_as_half(v));
  }
  __device__ __forceinline__ static unsigned short from_float(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};

struct BF16 : Half16Base<BF16> {
  __device__ __forceinline__ static float to_float(unsigned short v) {
    return __uint_as_float(static_cast<unsigned>(v) << 16);
  }
  __device__ __forceinline__ static unsigned short from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

// ------------------------------------------------------------------------ functors
// Fetch functor for decode.h: pixel (y, x) of one map, any strides (in-bounds only).
template <class D>
struct MapFetch {
  const typename D::raw_t* p;
  int64_t sy, sx;
  __device__ __forceinline__ float operator()(int y, int x) const {
    return D::to_float(__ldg(p + static_cast<int64_t>(y) * sy + static_cast<int64_t>(x) * sx));
  }
};

// The blurred map as a field (KC > 0: kernel size known at compile time, loops unroll).
template <class Fetch, int KC>
struct ZeroBlurField {  // DARK: zero padding
  Fetch f;
  const float* g;
  int k, H, W;
  __device__ __forceinline__ float operator()(int y, int x) const {
    return dec::blur_zero(f, g, KC > 0 ? KC : k, y, x, H, W);
  }
};
template <class Fetch, int KC>
struct ReflectBlurField {  // UDP: OpenCV's default border, reflect-101
  Fetch f;
  const float* g;
  int k, H, W;
  __device__ __forceinline__ float operator()(int y, int x) const {
    return dec::blur_reflect101(f, g, KC > 0 ? KC : k, y, x, H, W);
  }
};

// The same field, served from a 5x5 window of values around the argmax that warp 0
// precomputed in parallel (shared memory, one blurred sample per lane); a point outside
// the window is computed directly (never happens: DARK's 13 Newton points lie within
// +-2 of the argmax, UDP's 7 clamped points within +-1).  decode.h's per-map routines
// (dark_samples, refine_udp) are called on it with the 1-tap kernel {1.0f}: blur_zero /
// blur_reflect101 with k = 1 at an in-bounds point return exactly 0 + 1 * (0 + 1 * v) = v,
// so they see exactly the blurred values they would have computed themselves.  All the
// points asked for are in bounds: DARK runs only when dark_interior holds, refine_udp
// samples clamped points (and reflect101 is the identity inside the map).
constexpr int kWin = 5;       // window side
constexpr int kWinHalf = kWin / 2;
constexpr int kWinCells = kWin * kWin;
static_assert(kWinCells <= kWarp, "one window cell per lane of warp 0");

// Out-of-line so the never-taken fallback does not inline a whole blur (and its
// registers) into every lookup.
template <class Field>
__device__ __noinline__ float field_at_slow(const Field field, int y, int x) {
  return field(y, x);
}

template <class Field>
struct WindowField {
  Field field;
  const float* win;  // kWin x kWin, row-major, centred on (py, px)
  int px, py;
  __device__ __forceinline__ float operator()(int y, int x) const {
    const unsigned wy = static_cast<unsigned>(y - py + kWinHalf);
    const unsigned wx = static_cast<unsigned>(x - px + kWinHalf);
    if (wy < static_cast<unsigned>(kWin) && wx < static_cast<unsigned>(kWin))
      return win[wy * kWin + wx];
    return field_at_slow(field, y, x);
  }
};

// ------------------------------------------------------------------------ argmax scan
struct ArgMax {
  float v;    // best value so far (-inf: none)
  int i;      // its flat index (INT_MAX: none)
  bool nan;   // a NaN was seen
};

__device__ __forceinline__ void am_init(ArgMax& a) {
  a.v = -INFINITY;
  a.i = INT_MAX;
  a.nan = false;
}

// Larger value wins; equal values -> lower index.  NaN never wins (both comparisons
// false) but is recorded.  The index tie-break makes the result independent of the order
// in which a thread or the reduction visits elements.
__device__ __forceinline__ void am_consider(ArgMax& a, float v, int i) {
  a.nan |= (v != v);
  if (v > a.v || (v == a.v && i < a.i)) {
    a.v = v;
    a.i = i;
  }
}

__device__ __forceinline__ void am_warp_reduce(ArgMax& a) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, a.v, off);
    const int oi = __shfl_xor_sync(kFullMask, a.i, off);
    if (ov > a.v || (ov == a.v && oi < a.i)) {
      a.v = ov;
      a.i = oi;
    }
  }
  a.nan = __any_sync(kFullMask, a.nan) != 0;
}

template <class D>
__device__ __forceinline__ void consider_vec(ArgMax& a, const uint4& u, int i0) {
  float v[D::kVec];
  D::unpack(u, v);
#pragma unroll
  for (int e = 0; e < D::kVec; ++e) am_consider(a, v[e], i0 + e);
}

// Contiguous map of n elements at p: 16-byte vector loads with scalar head/tail.
template <class D>
__device__ __forceinline__ void scan_flat(const typename D::raw_t* __restrict__ p, int n,
                                          int tid, int nt, ArgMax& a) {
  using raw_t = typename D::raw_t;
  constexpr int V = D::kVec;
  const lay::FlatSplit split = lay::flat_split(reinterpret_cast<uintptr_t>(p), n,
                                               static_cast<int>(sizeof(raw_t)), V);
  const int head = split.head, nvec = split.nvec, tail = split.tail;
  // Head: fewer than V elements, or all of them in the unaligned case.
  for (int i = tid; i < head; i += nt) am_consider(a, D::to_float(__ldg(p + i)), i);
  const uint4* __restrict__ pv = reinterpret_cast<const uint4*>(p + head);
  int v = tid;
  // Four independent 16-byte loads in flight per thread.
  for (; v + 3 * nt < nvec; v += 4 * nt) {
    const uint4 u0 = __ldg(pv + v);
    const uint4 u1 = __ldg(pv + v + nt);
    const uint4 u2 = __ldg(pv + v + 2 * nt);
    const uint4 u3 = __ldg(pv + v + 3 * nt);
    consider_vec<D>(a, u0, head + v * V);
    consider_vec<D>(a, u1, head + (v + nt) * V);
    consider_vec<D>(a, u2, head + (v + 2 * nt) * V);
    consider_vec<D>(a, u3, head + (v + 3 * nt) * V);
  }
  for (; v < nvec; v += nt) consider_vec<D>(a, __ldg(pv + v), head + v * V);
  // Tail: fewer than V elements.
  for (int i = tail + tid; i < n; i += nt) am_consider(a, D::to_float(__ldg(p + i)), i);
}

// Any strides: scalar loads, (y, x) of flat index i = tid + j * nt carried incrementally.
template <class D>
__device__ __forceinline__ void scan_strided(const typename D::raw_t* __restrict__ p, int H,
                                             int W, int64_t sy, int64_t sx, int tid, int nt,
                                             ArgMax& a) {
  const int n = H * W;
  lay::StridedCursor c = lay::strided_cursor(tid, nt, W);
#pragma unroll 4
  for (int i = tid; i < n; i += nt) {
    am_consider(a, D::to_float(__ldg(p + static_cast<int64_t>(c.y) * sy +
                                     static_cast<int64_t>(c.x) * sx)), i);
    lay::advance(c, W);
  }
}

// ------------------------------------------------------------------------ shared state
struct DecodeShared {
  float g[dec::kMaxBlurKernel];  // blur taps
  float wv[kWarp];               // per-warp partials
  int wi[kWarp];
  int wn[kWarp];
  float best;                    // block results
  int idx;
  int nan;
  int slow;                      // DARK exact path requested
  float win[kWinCells];          // blurred samples around the argmax (WindowField)
};

// Block argmax; results in S.best / S.idx / S.nan, visible to all threads on return.
__device__ __forceinline__ void block_argmax(ArgMax a, DecodeShared& S, int tid, int nt) {
  const int lane = tid & (kWarp - 1), warp = tid / kWarp, nwarps = nt / kWarp;
  am_warp_reduce(a);
  if (lane == 0) {
    S.wv[warp] = a.v;
    S.wi[warp] = a.i;
    S.wn[warp] = a.nan ? 1 : 0;
  }
  __syncthreads();
  if (warp == 0) {
    ArgMax w;
    am_init(w);
    if (lane < nwarps) {
      w.v = S.wv[lane];
      w.i = S.wi[lane];
      w.nan = S.wn[lane] != 0;
    }
    am_warp_reduce(w);
    if (lane == 0) {
      S.best = w.v;
      S.idx = w.i;
      S.nan = w.nan ? 1 : 0;
      S.slow = 0;
    }
  }
  __syncthreads();
}

// Block max (thread 0 gets the result).  Call with every thread of the block.
__device__ __forceinline__ float block_max(float m, DecodeShared& S, int tid, int nt) {
  const int lane = tid & (kWarp - 1), warp = tid / kWarp, nwarps = nt / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1)
    m = fmaxf(m, __shfl_xor_sync(kFullMask, m, off));
  if (lane == 0) S.wv[warp] = m;
  __syncthreads();
  float r = -INFINITY;
  if (warp == 0) {
    r = lane < nwarps ? S.wv[lane] : -INFINITY;
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1)
      r = fmaxf(r, __shfl_xor_sync(kFullMask, r, off));
  }
  return r;
}

// Warp 0 (all 32 lanes must call): lane i < 25 evaluates the field at (py, px) + (i / 5 - 2,
// i % 5 - 2) into the window (any point is fine: the blur functions bounds-check their
// taps); returns the window view.  Ends with __syncwarp.
template <class Field>
__device__ __forceinline__ WindowField<Field> fill_window(const Field& field, int px, int py,
                                                          int lane, DecodeShared& S) {
  if (lane < kWinCells) {
    const int wy = lane / kWin, wx = lane - (lane / kWin) * kWin;
    S.win[lane] = field(py + wy - kWinHalf, px + wx - kWinHalf);
  }
  __syncwarp();
  return WindowField<Field>{field, S.win, px, py};
}

// DARK refinement of one map; every thread of the block calls it (it may synchronise the
// block).  Thread 0 updates (x, y).
template <class Field>
__device__ __forceinline__ void dark_refine(const Field& field, float score, int px, int py,
                                            int H, int W, int tid, int nt, DecodeShared& S,
                                            float& x, float& y) {
  if (!dec::dark_interior(px, py, H, W)) return;  // block-uniform: no step possible
  const float one = 1.0f;                          // identity 1-tap kernel
  if (tid < kWarp) {
    const WindowField<Field> win = fill_window(field, px, py, tid, S);
    if (tid == 0) {
      float s[dec::kDarkPoints];
      const bool fast = dec::dark_samples(win, &one, 1, px, py, H, W, s);
      if (fast && score > 0.0f) {
        float L[dec::kDarkPoints];
        dec::dark_log_fast(s, L);
        dec::dark_step(L, x, y);
      } else if (score > 0.0f) {
        S.slow = 1;  // the rescale may reach the log floor: need the blurred maximum
      }              // score <= 0: DarkPose divides by zero; no step
    }
  }
  __syncthreads();
  if (S.slow == 0) return;  // block-uniform
  // Exact path: blurred maximum of the whole map, cooperatively.
  const int n = H * W;
  float m = -INFINITY;
  for (int i = tid; i < n; i += nt) {
    const int yy = i / W;
    m = fmaxf(m, field(yy, i - yy * W));
  }
  const float bmax = block_max(m, S, tid, nt);
  if (tid == 0 && dec::dark_rescale_valid(score, bmax)) {
    // The window (shared memory) is unchanged since fill_window.
    const WindowField<Field> win{field, S.win, px, py};
    float s[dec::kDarkPoints], L[dec::kDarkPoints];
    dec::dark_samples(win, &one, 1, px, py, H, W, s);
    dec::dark_log_rescaled(s, score / bmax, L);
    dec::dark_step(L, x, y);
  }
}

// UDP refinement of one map; only warp 0 works (no block synchronisation).
template <class Field>
__device__ __forceinline__ void udp_refine(const Field& field, int px, int py, int H, int W,
                                           int tid, DecodeShared& S, float& x, float& y) {
  if (tid >= kWarp) return;
  const WindowField<Field> win = fill_window(field, px, py, tid, S);
  if (tid == 0) {
    const float one = 1.0f;
    dec::refine_udp(win, &one, 1, px, py, H, W, x, y);
  }
}

// ------------------------------------------------------------------------ decode kernel
template <class D, int MODE>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
decode_heatmaps_kernel(const typename D::raw_t* __restrict__ data, int K, int H, int W,
                       int64_t sb, int64_t sk, int64_t sy, int64_t sx, bool flat,
                       const float* __restrict__ affine, const float* __restrict__ blur,
                       int ksize, float* __restrict__ coords, float* __restrict__ scores) {
  __shared__ DecodeShared S;
  const int tid = static_cast<int>(threadIdx.x);
  const int nt = static_cast<int>(blockDim.x);  // a multiple of 32
  const int map = static_cast<int>(blockIdx.x);
  const lay::MapIndex mk = lay::map_of(map, K);
  const int b = mk.b, k = mk.k;
  const typename D::raw_t* __restrict__ p =
      data + static_cast<int64_t>(b) * sb + static_cast<int64_t>(k) * sk;

  if (MODE == dec::kDark || MODE == dec::kUdp) {
    // Published by the __syncthreads in block_argmax.
    for (int i = tid; i < ksize; i += nt) S.g[i] = blur[i];
  }

  // 1-2. argmax
  ArgMax a;
  am_init(a);
  if (flat)
    scan_flat<D>(p, H * W, tid, nt, a);
  else
    scan_strided<D>(p, H, W, sy, sx, tid, nt, a);
  block_argmax(a, S, tid, nt);

  const float score = S.best;
  if (S.nan != 0) {  // block-uniform
    if (tid == 0) {
      const float qnan = __int_as_float(0x7fc00000);
      coords[2 * static_cast<int64_t>(map)] = qnan;
      coords[2 * static_cast<int64_t>(map) + 1] = qnan;
      scores[map] = qnan;
    }
    return;
  }
  const int idx = S.idx;  // valid: the map is non-empty and has no NaN
  const int py = idx / W;
  const int px = idx - py * W;
  float x = static_cast<float>(px), y = static_cast<float>(py);

  // 3. refinement
  const MapFetch<D> f{p, sy, sx};
  if (MODE == dec::kQuarter) {
    if (tid == 0) dec::refine_quarter(f, px, py, H, W, x, y);
  } else if (MODE == dec::kDark) {
    if (ksize == 11)
      dark_refine(ZeroBlurField<MapFetch<D>, 11>{f, S.g, ksize, H, W}, score, px, py, H, W,
                  tid, nt, S, x, y);
    else
      dark_refine(ZeroBlurField<MapFetch<D>, 0>{f, S.g, ksize, H, W}, score, px, py, H, W,
                  tid, nt, S, x, y);
  } else if (MODE == dec::kUdp) {
    if (ksize == 11)
      udp_refine(ReflectBlurField<MapFetch<D>, 11>{f, S.g, ksize, H, W}, px, py, H, W, tid, S,
                 x, y);
    else
      udp_refine(ReflectBlurField<MapFetch<D>, 0>{f, S.g, ksize, H, W}, px, py, H, W, tid, S,
                 x, y);
  }

  // 4. affine + outputs
  if (tid == 0) {
    if (affine != nullptr) dec::apply_affine(affine + 6 * static_cast<int64_t>(b), x, y);
    coords[2 * static_cast<int64_t>(map)] = x;
    coords[2 * static_cast<int64_t>(map) + 1] = y;
    scores[map] = score;
  }
}

// ------------------------------------------------------------------------ flip kernel
template <class D>
__global__ void __launch_bounds__(kFlipThreads)
flip_merge_kernel(const typename D::raw_t* __restrict__ hm,
                  const typename D::raw_t* __restrict__ fl, typename D::raw_t* __restrict__ out,
                  const int64_t* __restrict__ fidx, int64_t fidx_stride, int K, int H, int W,
                  int64_t a0, int64_t a1, int64_t a2, int64_t a3, int64_t f0, int64_t f1,
                  int64_t f2, int64_t f3, bool shift, int64_t N) {
  // Grid size is capped on the host so that the grid stride and every thread's first
  // index fit in 31 bits; the running index is 64-bit.
  const unsigned S = gridDim.x * blockDim.x;
  const unsigned i0 = blockIdx.x * blockDim.x + threadIdx.x;
  // Mixed-radix digits of i0 and of the stride S: i = ((b * K + k) * H + y) * W + x.
  lay::Digits d = lay::flat_digits(i0, W, H, K);
  const lay::Digits step = lay::flat_digits(S, W, H, K);
  const float qnan = __int_as_float(0x7fc00000);

  for (int64_t i = i0; i < N;) {
    float r[kFlipUnroll];
    int64_t o[kFlipUnroll];
#pragma unroll
    for (int u = 0; u < kFlipUnroll; ++u) {
      o[u] = i;
      r[u] = 0.0f;
      if (i < N) {
        const int xs = (shift && d.x >= 1) ? d.x - 1 : d.x;
        const int64_t fk = __ldg(fidx + d.k * fidx_stride);
        const float av = D::to_float(__ldg(hm + d.b * a0 + d.k * a1 + d.y * a2 + d.x * a3));
        const float fv =
            (fk >= 0 && fk < K)
                ? D::to_float(__ldg(fl + d.b * f0 + fk * f1 + d.y * f2 + (W - 1 - xs) * f3))
                : qnan;
        r[u] = __fmul_rn(__fadd_rn(av, fv), 0.5f);
      }
      // Advance (b, k, y, x) by S; each digit stays below its radix after one carry.
      i += S;
      lay::advance(d, step, W, H, K);
    }
#pragma unroll
    for (int u = 0; u < kFlipUnroll; ++u)
      if (o[u] < N) out[o[u]] = D::from_float(r[u]);
  }
}

// ------------------------------------------------------------------------ host helpers
cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ",
                  cudaGetErrorString(err));
}

int sm_count(int32_t device_index) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  if (device_index >= 0 && device_index < kMaxDevices) {
    const int c = cache[device_index].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int n = 0;
  const cudaError_t err =
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device_index);
  STD_TORCH_CHECK(err == cudaSuccess, "mipnet_cuda: cudaDeviceGetAttribute failed: ",
                  cudaGetErrorString(err));
  if (n < 1) n = 1;
  if (device_index >= 0 && device_index < kMaxDevices)
    cache[device_index].store(n, std::memory_order_relaxed);
  return n;
}

using lay::decode_threads;  // threads per decode block

template <class D, int MODE>
void launch_decode(const Tensor& hm, int K, int H, int W, bool flat, const float* affine,
                   const float* blur, int ksize, float* coords, float* scores, int64_t BK,
                   int threads, cudaStream_t stream) {
  decode_heatmaps_kernel<D, MODE><<<static_cast<unsigned>(BK), threads, 0, stream>>>(
      static_cast<const typename D::raw_t*>(hm.data_ptr()), K, H, W, hm.stride(0), hm.stride(1),
      hm.stride(2), hm.stride(3), flat, affine, blur, ksize, coords, scores);
}

template <class D>
void launch_decode_mode(int64_t mode, const Tensor& hm, int K, int H, int W, bool flat,
                        const float* affine, const float* blur, int ksize, float* coords,
                        float* scores, int64_t BK, int threads, cudaStream_t stream) {
  switch (mode) {
    case dec::kQuarter:
      launch_decode<D, dec::kQuarter>(hm, K, H, W, flat, affine, blur, ksize, coords, scores,
                                      BK, threads, stream);
      break;
    case dec::kDark:
      launch_decode<D, dec::kDark>(hm, K, H, W, flat, affine, blur, ksize, coords, scores, BK,
                                   threads, stream);
      break;
    case dec::kUdp:
      launch_decode<D, dec::kUdp>(hm, K, H, W, flat, affine, blur, ksize, coords, scores, BK,
                                  threads, stream);
      break;
    default:
      launch_decode<D, dec::kArgmax>(hm, K, H, W, flat, affine, blur, ksize, coords, scores,
                                     BK, threads, stream);
      break;
  }
}

// ------------------------------------------------------------------------ ops
std::tuple<Tensor, Tensor> decode_heatmaps_cuda(Tensor heatmaps, int64_t mode,
                                                std::optional<Tensor> affine,
                                                Tensor blur_weights) {
  constexpr const char* kOp = "mipnet_cuda::decode_heatmaps";
  // ---- input checks
  STD_TORCH_CHECK(heatmaps.is_cuda(), kOp, ": heatmaps must be a CUDA tensor");
  STD_TORCH_CHECK(heatmaps.dim() == 4, kOp, ": heatmaps must be 4-D [B, K, H, W], got ",
                  heatmaps.dim(), " dims");
  const ScalarType dt = heatmaps.scalar_type();
  STD_TORCH_CHECK(is_supported_float(dt), kOp,
                  ": heatmaps must be float32, float16 or bfloat16, got ", dtype_name(dt));
  STD_TORCH_CHECK(mode >= dec::kArgmax && mode <= dec::kUdp, kOp,
                  ": mode must be 0 (argmax), 1 (quarter), 2 (dark) or 3 (udp), got ", mode);
  const int32_t dev = heatmaps.get_device_index();
  const int64_t B = heatmaps.size(0), K = heatmaps.size(1);
  const int64_t H = heatmaps.size(2), W = heatmaps.size(3);
  const int64_t BK = B * K;
  STD_TORCH_CHECK(BK == 0 || H * W > 0, kOp, ": heatmaps has an empty spatial size ", H, "x",
                  W, "; no maximum to decode");
  // 32-bit flat indices in the kernel, with headroom for index + block size.
  STD_TORCH_CHECK(H * W <= (int64_t{1} << 30), kOp, ": heatmaps maps of ", H, "x", W,
                  " are too large (H*W must be at most 2^30)");
  STD_TORCH_CHECK(BK <= std::numeric_limits<int32_t>::max(), kOp, ": heatmaps has B*K = ", BK,
                  " maps; at most 2^31-1 are supported");

  const float* A = nullptr;
  if (affine.has_value() && affine->defined()) {
    const Tensor& a = *affine;
    STD_TORCH_CHECK(a.is_cuda() && a.get_device_index() == dev, kOp,
                    ": affine must be a CUDA tensor on the device of heatmaps (cuda:", dev, ")");
    STD_TORCH_CHECK(a.scalar_type() == ScalarType::Float, kOp, ": affine must be float32, got ",
                    dtype_name(a.scalar_type()));
    STD_TORCH_CHECK(a.dim() == 3 && a.size(0) == B && a.size(1) == 2 && a.size(2) == 3, kOp,
                    ": affine must have shape [B, 2, 3] with B = ", B);
    STD_TORCH_CHECK(a.is_contiguous(), kOp, ": affine must be contiguous");
    A = static_cast<const float*>(a.data_ptr());
  }

  const float* G = nullptr;
  int ksize = 0;
  if (mode == dec::kDark || mode == dec::kUdp) {
    STD_TORCH_CHECK(blur_weights.is_cuda() && blur_weights.get_device_index() == dev, kOp,
                    ": blur_weights must be a CUDA tensor on the device of heatmaps (cuda:", dev,
                    ")");
    STD_TORCH_CHECK(blur_weights.scalar_type() == ScalarType::Float, kOp,
                    ": blur_weights must be float32, got ", dtype_name(blur_weights.scalar_type()));
    STD_TORCH_CHECK(blur_weights.dim() == 1, kOp, ": blur_weights must be 1-D, got ",
                    blur_weights.dim(), " dims");
    const int64_t n = blur_weights.numel();
    STD_TORCH_CHECK(n >= 1 && n % 2 == 1 && n <= dec::kMaxBlurKernel, kOp,
                    ": blur_weights must have an odd length in [1, ", dec::kMaxBlurKernel,
                    "] for dark/udp, got ", n);
    STD_TORCH_CHECK(blur_weights.is_contiguous(), kOp, ": blur_weights must be contiguous");
    G = static_cast<const float*>(blur_weights.data_ptr());
    ksize = static_cast<int>(n);
  }

  torch::stable::accelerator::DeviceGuard guard(dev);
  // ---- outputs
  Tensor coords = torch::stable::new_empty(heatmaps, {B, K, 2}, ScalarType::Float);
  Tensor scores = torch::stable::new_empty(heatmaps, {B, K}, ScalarType::Float);
  if (BK == 0) return std::make_tuple(coords, scores);

  const int Ki = static_cast<int>(K), Hi = static_cast<int>(H), Wi = static_cast<int>(W);
  // The map is one contiguous run of H*W elements: vector loads.
  const bool flat = heatmaps.stride(3) == 1 && (heatmaps.stride(2) == W || H == 1);
  const int threads = decode_threads(H * W, heatmaps.element_size(), flat, BK, sm_count(dev));
  float* pc = static_cast<float*>(coords.data_ptr());
  float* ps = static_cast<float*>(scores.data_ptr());
  const cudaStream_t stream = current_stream(dev);
  switch (dt) {
    case ScalarType::Half:
      launch_decode_mode<F16>(mode, heatmaps, Ki, Hi, Wi, flat, A, G, ksize, pc, ps, BK,
                              threads, stream);
      break;
    case ScalarType::BFloat16:
      launch_decode_mode<BF16>(mode, heatmaps, Ki, Hi, Wi, flat, A, G, ksize, pc, ps, BK,
                               threads, stream);
      break;
    default:
      launch_decode_mode<F32>(mode, heatmaps, Ki, Hi, Wi, flat, A, G, ksize, pc, ps, BK,
                              threads, stream);
      break;
  }
  check_launch(kOp);
  return std::make_tuple(coords, scores);
}

template <class D>
void launch_flip(const Tensor& hm, const Tensor& fl, Tensor& out, const Tensor& fidx, int K,
                 int H, int W, bool shift, int64_t N, int blocks, cudaStream_t stream) {
  using raw_t = typename D::raw_t;
  flip_merge_kernel<D><<<blocks, kFlipThreads, 0, stream>>>(
      static_cast<const raw_t*>(hm.data_ptr()), static_cast<const raw_t*>(fl.data_ptr()),
      static_cast<raw_t*>(out.data_ptr()), static_cast<const int64_t*>(fidx.data_ptr()),
      fidx.stride(0), K, H, W, hm.stride(0), hm.stride(1), hm.stride(2), hm.stride(3),
      fl.stride(0), fl.stride(1), fl.stride(2), fl.stride(3), shift, N);
}

Tensor flip_merge_cuda(Tensor heatmaps, Tensor flipped, Tensor flip_index, bool shift) {
  constexpr const char* kOp = "mipnet_cuda::flip_merge";
  // ---- input checks
  STD_TORCH_CHECK(heatmaps.is_cuda(), kOp, ": heatmaps must be a CUDA tensor");
  const int32_t dev = heatmaps.get_device_index();
  STD_TORCH_CHECK(flipped.is_cuda() && flipped.get_device_index() == dev, kOp,
                  ": flipped must be a CUDA tensor on the device of heatmaps (cuda:", dev, ")");
  STD_TORCH_CHECK(flip_index.is_cuda() && flip_index.get_device_index() == dev, kOp,
                  ": flip_index must be a CUDA tensor on the device of heatmaps (cuda:", dev, ")");
  STD_TORCH_CHECK(heatmaps.dim() == 4, kOp, ": heatmaps must be 4-D [B, K, H, W], got ",
                  heatmaps.dim(), " dims");
  STD_TORCH_CHECK(flipped.dim() == 4, kOp, ": flipped must be 4-D [B, K, H, W], got ",
                  flipped.dim(), " dims");
  for (int64_t i = 0; i < 4; ++i) {
    STD_TORCH_CHECK(flipped.size(i) == heatmaps.size(i), kOp,
                    ": flipped must have the shape of heatmaps; size ", flipped.size(i),
                    " != ", heatmaps.size(i), " at dim ", i);
  }
  const ScalarType dt = heatmaps.scalar_type();
  STD_TORCH_CHECK(is_supported_float(dt), kOp,
                  ": heatmaps must be float32, float16 or bfloat16, got ", dtype_name(dt));
  STD_TORCH_CHECK(flipped.scalar_type() == dt, kOp, ": flipped is ",
                  dtype_name(flipped.scalar_type()), " but heatmaps is ", dtype_name(dt));
  const int64_t B = heatmaps.size(0), K = heatmaps.size(1);
  const int64_t H = heatmaps.size(2), W = heatmaps.size(3);
  STD_TORCH_CHECK(flip_index.scalar_type() == ScalarType::Long, kOp,
                  ": flip_index must be int64, got ", dtype_name(flip_index.scalar_type()));
  STD_TORCH_CHECK(flip_index.dim() == 1 && flip_index.size(0) == K, kOp,
                  ": flip_index must be 1-D of length K = ", K);
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  STD_TORCH_CHECK(B <= kIntMax && K <= kIntMax && H <= kIntMax && W <= kIntMax, kOp,
                  ": heatmaps dimensions must each fit in int32");

  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor out = torch::stable::new_empty(heatmaps, {B, K, H, W});
  const int64_t N = B * K * H * W;
  if (N == 0) return out;

  // Enough blocks to fill the GPU (8 x 256 threads per SM), each thread >= kFlipUnroll
  // elements when there is enough work; grid stride < 2^31.
  const int64_t want = (N + int64_t{kFlipThreads} * kFlipUnroll - 1) /
                       (int64_t{kFlipThreads} * kFlipUnroll);
  const int64_t cap = int64_t{sm_count(dev)} * 8;
  const int blocks = static_cast<int>(want < cap ? want : cap);
  const cudaStream_t stream = current_stream(dev);
  const int Ki = static_cast<int>(K), Hi = static_cast<int>(H), Wi = static_cast<int>(W);
  switch (dt) {
    case ScalarType::Half:
      launch_flip<F16>(heatmaps, flipped, out, flip_index, Ki, Hi, Wi, shift, N, blocks, stream);
      break;
    case ScalarType::BFloat16:
      launch_flip<BF16>(heatmaps, flipped, out, flip_index, Ki, Hi, Wi, shift, N, blocks, stream);
      break;
    default:
      launch_flip<F32>(heatmaps, flipped, out, flip_index, Ki, Hi, Wi, shift, N, blocks, stream);
      break;
  }
  check_launch(kOp);
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace mipnet

STABLE_TORCH_LIBRARY_IMPL(mipnet_cuda, CUDA, m) {
  m.impl("decode_heatmaps", TORCH_BOX(&mipnet::cuda::decode_heatmaps_cuda));
  m.impl("flip_merge", TORCH_BOX(&mipnet::cuda::flip_merge_cuda));
}
