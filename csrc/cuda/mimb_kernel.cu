// CUDA kernels of the Multi-Instance Modulation Block (torch.ops.mipnet_cuda.*).
//
//   mimb_scale_fwd(x, w1, w2, v) -> (y, s)
//   mimb_fwd(x, lam, w1, w2, e1, b1, e2, b2) -> (y, s)       (v = the embedding MLP, in here)
//   mimb_scale_bwd(dy, x, w1, w2, v, s) -> (dx, dw1, dw2, dv)
//   mimb_instances(x, w1, w2, table) -> y
//   mimb_instances_bwd(dy, x, w1, w2, table) -> (dx, dw1, dw2, dtable)
//   mimb_scale_grouped_fwd / mimb_scale_grouped_bwd / mimb_instances_grouped /
//   mimb_instances_grouped_bwd: the same on lists of branch tensors, up to kMaxBranches
//   branches per launch.
//
// Schemas and contracts: csrc/schemas.h (registered in csrc/register_cuda.cpp).
// Specification: the PyTorch references in mipnet_kernels/ops/mimb.py:
//   s = mean_hw(x);  z1 = w1 @ s;  h = relu(z1);  e = sigmoid(w2 @ h);  a = e * v;
//   y = x * a[:, :, None, None];  backward (per sample, g_a = sum_hw(dy * x)):
//   dv = g_a * e;  g_z2 = g_a * v * e * (1 - e);  g_z1 = (w2^T g_z2) * (z1 > 0);
//   dx = dy * a + (w1^T g_z1) / HW;  dw2 = sum_b g_z2 h^T;  dw1 = sum_b g_z1 s^T.
// Instances (t[n, b] the table's row of output sample n*B + b, a[n, b] = e[b] * t[n, b]):
//   y[n*B + b] = x[b] * a[n, b];  backward, g_a[n, b] = sum_hw(dy[n*B + b] * x[b]):
//   dtable[n, b] = g_a[n, b] * e[b] (summed over b for an [N, C] table);
//   g_z2 = (sum_n g_a[n, b] * t[n, b]) * e * (1 - e);  g_z1, dw1, dw2 as above;
//   dx[b] = sum_n dy[n*B + b] * a[n, b] + (w1^T g_z1) / HW.
//
// ------------------------------------------------------------------ tiles
// A sample's map is cut into tiles (channel tile ct, pixel split sp); one block of 256
// threads per tile; every thread owns at most kRegVecs vectors of the tile (16 bytes each,
// or single elements where vector access is impossible) and always the same channel(s):
//   NCHW (x contiguous): `lanes` (a power of two <= 32) consecutive threads share a plane
//     (channel) and stride over its pixels; 256 / lanes planes per block.  Vector loads
//     when HW is a multiple of the vector width and x is 16-byte aligned.
//   NHWC (channels_last; also when H*W == 1): `lanes` threads cover the channel tile with
//     one vector (channels c .. c+V-1) each, 256 / lanes rows of pixels.  Vector loads when
//     C is a multiple of the vector width.  A tile has up to 256 * V channels, so each
//     thread writes the partials of several channels (every 256th of the tile).
// The tiling of a branch depends only on its shape, dtype and alignment (plan_tiling in
// mimb_tiling.h, with the rest of the index math), never on the device, the path or on the
// other branches of a group: a grouped launch, a single launch, the two-phase and the
// single-pass kernel all add the same numbers in the same order and give bit-identical
// results.  Each tile writes per-channel partial sums
// ([B, nsp, C] float32 workspace); the per-sample sums add the nsp partials in order.
//
// ------------------------------------------------------------------ the two paths
// Single pass (cooperative launch; used when the device supports cooperative launch and
// every tile of the launch is resident at once -- "the maps fit on chip":
//     number of tiles <= (blocks per SM from cudaOccupancyMaxActiveBlocksPerMultiprocessor)
//                         x (SM count);
// each tile lives in its threads' registers, at most kRegVecs x 16 bytes per thread; with
// 2 blocks of 256 threads per SM (the launch bounds) that is up to ~8.6 MB of x (forward;
// of dy, backward) on an H100's 132 SMs, less when tiles are partly filled):  one kernel; each block loads its tile into
// registers (forward: x; backward: dy, with x read once for sum(dy * x)), writes its
// partial sums and takes a ticket of its sample.  The last block of a sample runs the tiny
// MLP and publishes the per-channel scales; the other blocks of the sample wait for that
// (a per-sample flag: safe because the cooperative launch guarantees that all blocks are
// co-resident, so the block being waited for always runs), then scale the tile they hold.
// x is read once and y written once.  The backward then needs every sample's MLP for the
// weight gradients: one cooperative_groups grid sync, then every block sums a slice of
// dw1 / dw2 over the batch.
//
// Two phase (otherwise, or MIPNET_MIMB_CUDA_PATH=two_phase):  kernel 1 reduces the tiles
// and, in the last block of each sample (the ticket), runs the MLP; kernel 2 re-reads x
// (backward: dy) and scales, and its blocks also sum the slices of dw1 / dw2.  x is read
// twice (the second read mostly from L2 when the tensor fits there).
//
// The instances backward (mimb_instances_bwd) always takes the two phases: its second pass
// needs all N instances' dy, which no tile's registers hold.  Kernel 1 loads the x tile
// into registers once and streams each instance's dy tile past it, writing N + 1 partial
// sums per channel (s and every g_a[n]: N + 1 planes of the workspace, partial_plane in
// mimb_tiling.h); kernel 2 reads each dy_n tile again and writes dx once, summing the
// instances in order.  MIPNET_MIMB_CUDA_PATH does not apply to it.
//
// MIPNET_MIMB_CUDA_PATH = auto (default) | two_phase | single_pass forces a path (tests,
// benchmarks); single_pass raises when the launch does not fit.  The driver may still refuse
// a cooperative launch that the occupancy calculator says fits (MPS thread limits, green
// contexts: fewer SMs than the device has): auto then takes the two-phase path (and skips
// the single pass for grids that large from then on), single_pass raises.  Test hook:
// MIPNET_MIMB_CUDA_COOP_CAPACITY overrides the co-resident block count (capacity_override).
//
// The ticket counter is CUDA's "threadFenceReduction" sample: every block writes its
// partials, __threadfence(), then atomically increments its sample's counter; the block
// that draws the last ticket sees all partials.  That block resets the counter, and the
// last waiter resets the flag, so the counters (kept per device and stream, zeroed once
// when allocated) are reusable by the next launch without a memset.
//
// Weight gradients are deterministic: the MLP block stores the per-sample vectors (h,
// g_z1, g_z2, s) and each dw element is summed over b = 0 .. B-1 in order by one thread --
// no float atomics anywhere; every result is bit-identical from run to run.
//
// The MLP (one block per sample): mat-vecs with a warp per group of four rows, lanes over
// the reduced dimension, in the weights' own dtype and strides (any float dtype, any
// strides: transposes are stride swaps); float32 throughout, sigmoid with expf.  Data
// passes are float32 after the load, each output rounded once; dx = dy * a + k is a
// separate multiply and add (__fmul_rn / __fadd_rn), as in the reference.
//
// Index arithmetic: int64 offsets; tile geometry (channels, pixels) in int32
// (C * H * W <= 2^30 per sample, checked).
//
// Uses only PyTorch's stable ABI (torch/csrc/stable, torch/headeronly) and the CUDA runtime.

#include <cooperative_groups.h>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/MemoryFormat.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../host_utils.h"
#include "common.cuh"
#include "mimb_tiling.h"

namespace mipnet {
namespace cuda {
namespace {

using torch::headeronly::MemoryFormat;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using namespace common;
using host::dtype_name;
using host::is_supported_float;

using mimb::kRegVecs;  // vectors per thread per tile (registers)
using mimb::kThreads;  // every MIMB block
using mimb::kWarp;
using mimb::ThreadMap;
using mimb::Tile;
using mimb::thread_map;
using mimb::tile_of;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarps = kThreads / kWarp;
constexpr int kMaxBranches = 4;           // branches per grouped launch
constexpr int64_t kMaxSampleElems = int64_t{1} << 30;  // C * H * W (int32 offsets)

// kFwd: mimb_scale_fwd / mimb_fwd; kInst: mimb_instances; kBwd: mimb_scale_bwd;
// kInstBwd: mimb_instances_bwd (two-phase only).
enum Mode : int { kFwd = 0, kInst = 1, kBwd = 2, kInstBwd = 3 };
constexpr bool is_backward(int mode) { return mode == kBwd || mode == kInstBwd; }
enum DtCode : int { kDtF32 = 0, kDtF16 = 1, kDtBF16 = 2 };

// ==================================================================== device structs
// A small operand M[i, j] (1-D tensors: s0 = 0), any float dtype, any strides.
struct Mat {
  const void* p;
  int64_t s0, s1;
  int dt;  // DtCode
};

// One branch of a launch, passed by value inside Group.  Its tiling (C, HW, layout and the
// tile geometry, mimb_tiling.h) is the base class, so the index math reads it directly.
struct Branch : mimb::Tiling {
  const void* x;   // [B, C, H, W], NCHW or NHWC dense
  const void* dy;  // backward: [B, C, H, W] ([N*B, C, H, W] instances), x's layout
  void* out;       // y [N*B, C, H, W] (instances) / y / dx, x's layout
  int B, Cr, N;    // N: outputs per sample (instances; 1 otherwise)
  int vec;         // vector access (else single elements)
  int block0, nblocks;  // this branch's blocks: [block0, block0 + nblocks)
  Mat w1, w2;  // [Cr, C], [C, Cr]
  Mat v;       // v [B, C] (fwd, bwd) or table (instances): t[n, b, c] at n*s0 + b*v_sb + c*s1
  int64_t v_sb;  // instances: the table's stride over b ([N, B, C]); 0 for a [N, C] table
  Mat s_in;    // backward: the forward's s [B, C]
  int embed, Ke, Nl;           // mimb_fwd: v from the embedding MLP (K hidden, N inputs)
  Mat lam, e1, b1, e2, b2;     // [B, Nl], [Ke, Nl], [Ke], [C, Ke], [C]
  float* s;      // [B, C]: the forward's output s, or workspace (instances, backward)
  float* part;   // [B, nsp, C] partial sums ([N + 1, B, nsp, C]: instances backward)
  float* a;      // [N, B, C] scales
  float* k;      // backward: [B, C] dx bias g_s / HW
  float* h;      // [B, Cr] relu(z1)
  float* gz1;    // backward: [B, Cr]
  float* gz2;    // backward: [B, C]
  float* gt;     // instances backward: [N, B, C] g_a, then g_a * e (dtable before the sum over b)
  float* hv;     // mimb_fwd: [B, Ke] embedding hidden
  float* vb;     // mimb_fwd: [B, C] embedding output
  void* dv;      // backward outputs, contiguous, dtypes dv_dt / dw1_dt / dw2_dt
  void* dw1;
  void* dw2;
  int dv_dt, dw1_dt, dw2_dt;
  void* dtable;  // instances backward: contiguous [N, B, C] (dtable_ps) or [N, C]
  int dtable_dt, dtable_ps;
  unsigned* ticket;  // [B] arrival counters (zero between launches)
  unsigned* flag;    // [B] single pass: "scales published" flags (zero between launches)
};

struct Group {
  Branch br[kMaxBranches];
  int nbr;
};
static_assert(sizeof(Group) <= 4096, "kernel parameters are limited to 4 KiB");

// ==================================================================== device helpers
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

template <class T>
__device__ __forceinline__ float ld_raw(const void* p, int64_t o) {
  return T::to_float(__ldg(static_cast<const typename T::raw_t*>(p) + o));
}

__device__ __forceinline__ float mat_at(const Mat& m, int64_t i, int64_t j, int64_t o0 = 0) {
  const int64_t o = o0 + i * m.s0 + j * m.s1;
  switch (m.dt) {
    case kDtF16: return ld_raw<F16>(m.p, o);
    case kDtBF16: return ld_raw<BF16>(m.p, o);
    default: return ld_raw<F32>(m.p, o);
  }
}

__device__ __forceinline__ void store_as(void* p, int64_t o, int dt, float v) {
  switch (dt) {
    case kDtF16: static_cast<unsigned short*>(p)[o] = F16::from_float(v); break;
    case kDtBF16: static_cast<unsigned short*>(p)[o] = BF16::from_float(v); break;
    default: static_cast<float*>(p)[o] = v; break;
  }
}

// out(r, sum_k M[r, k] * vec(k)) for r < R.  A warp per group of four rows, lanes over k;
// lane 0 calls out.  Every thread of the block calls it (warp-uniform loops).
template <class TW, class Vec, class Out>
__device__ __forceinline__ void matvec_t(const Mat& M, int R, int K, const Vec& vec,
                                         const Out& out) {
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
  const typename TW::raw_t* p = static_cast<const typename TW::raw_t*>(M.p);
  for (int r0 = 4 * warp; r0 < R; r0 += 4 * kWarps) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k = lane; k < K; k += kWarp) {
      const float vk = vec(k);
      const int64_t ok = static_cast<int64_t>(k) * M.s1;
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (r0 + i < R)
          acc[i] += TW::to_float(__ldg(p + static_cast<int64_t>(r0 + i) * M.s0 + ok)) * vk;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = warp_sum(acc[i]);
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (r0 + i < R) out(r0 + i, acc[i]);
    }
  }
}

template <class Vec, class Out>
__device__ __forceinline__ void matvec(const Mat& M, int R, int K, const Vec& vec,
                                       const Out& out) {
  switch (M.dt) {
    case kDtF16: matvec_t<F16>(M, R, K, vec, out); break;
    case kDtBF16: matvec_t<BF16>(M, R, K, vec, out); break;
    default: matvec_t<F32>(M, R, K, vec, out); break;
  }
}

__device__ __forceinline__ Mat transposed(const Mat& m) { return Mat{m.p, m.s1, m.s0, m.dt}; }

// The per-sample channel sum: the nsp partials of (b, c) in order (workspace plane j: the
// instances backward's g_a[j - 1]).  __ldcg: written by other blocks of this launch (or
// this block) -- read from L2, never a stale L1 line.
__device__ __forceinline__ float sample_sum(const Branch& br, int b, int c, int j = 0) {
  const float* p = br.part + mimb::partial_plane(br, br.B, j) +
                   static_cast<int64_t>(b) * br.nsp * br.C + c;
  float s = 0.f;
  for (int sp = 0; sp < br.nsp; ++sp) s += __ldcg(p + static_cast<int64_t>(sp) * br.C);
  return s;
}

// ------------------------------------------------------------------------ the MLP
// One block per sample b, all threads; ends with __syncthreads.  Vectors live in the
// workspace (global; block-visible after __syncthreads, read back through L2).
template <int MODE>
__device__ void mlp_sample(const Branch& br, int b) {
  const int t = threadIdx.x;
  const int C = br.C, Cr = br.Cr, B = br.B;
  const int64_t bC = static_cast<int64_t>(b) * C;
  float* s = br.s + bC;
  float* h = br.h + static_cast<int64_t>(b) * Cr;
  const float hw = static_cast<float>(br.HW);

  // 1. s: the forward's mean (fwd, instances) or the saved s (backward); the instances
  //    backward also gathers every g_a[n, b] into gt here, all threads at once (in step 3
  //    one lane per channel would chain N * nsp dependent L2 reads).
  for (int c = t; c < C; c += kThreads)
    s[c] = MODE == kBwd ? mat_at(br.s_in, b, c) : sample_sum(br, b, c) / hw;
  if (MODE == kInstBwd) {
    for (int64_t i = t; i < static_cast<int64_t>(br.N) * C; i += kThreads) {
      const int n = static_cast<int>(i / C), c = static_cast<int>(i - static_cast<int64_t>(n) * C);
      br.gt[(static_cast<int64_t>(n) * B + b) * C + c] = sample_sum(br, b, c, 1 + n);
    }
  }
  __syncthreads();
  // 2. h = relu(w1 @ s) (NaN propagates, as torch.relu); the embedding's hidden layer.
  matvec(br.w1, Cr, C, [&](int c) { return __ldcg(s + c); },
         [&](int r, float z) { h[r] = z < 0.f ? 0.f : z; });
  if (MODE == kFwd && br.embed) {
    float* hv = br.hv + static_cast<int64_t>(b) * br.Ke;
    matvec(br.e1, br.Ke, br.Nl, [&](int n) { return mat_at(br.lam, b, n); },
           [&](int r, float z) {
             const float zh = z + mat_at(br.b1, 0, r);
             hv[r] = zh < 0.f ? 0.f : zh;
           });
    __syncthreads();
    matvec(br.e2, C, br.Ke, [&](int r) { return __ldcg(hv + r); },
           [&](int c, float z) { br.vb[bC + c] = sigmoid(z + mat_at(br.b2, 0, c)); });
  }
  __syncthreads();
  // 3. e = sigmoid(w2 @ h) and the per-channel results.
  matvec(br.w2, C, Cr, [&](int r) { return __ldcg(h + r); }, [&](int c, float z) {
    const float e = sigmoid(z);
    if (MODE == kFwd) {
      const float v = br.embed ? __ldcg(br.vb + bC + c) : mat_at(br.v, b, c);
      br.a[bC + c] = e * v;
    } else if (MODE == kInst) {
      for (int n = 0; n < br.N; ++n)
        br.a[(static_cast<int64_t>(n) * B + b) * C + c] = e * mat_at(br.v, n, c, b * br.v_sb);
    } else if (MODE == kInstBwd) {
      float ge = 0.f;  // g_e = sum_n g_a[n] * t[n], n in order
      for (int n = 0; n < br.N; ++n) {
        const int64_t i = (static_cast<int64_t>(n) * B + b) * C + c;
        const float t = mat_at(br.v, n, c, b * br.v_sb);
        const float ga = __ldcg(br.gt + i);  // g_a, gathered in step 1
        br.a[i] = e * t;
        br.gt[i] = ga * e;
        ge += ga * t;
      }
      br.gz2[bC + c] = ge * e * (1.f - e);
    } else {
      const float v = mat_at(br.v, b, c);
      const float ga = sample_sum(br, b, c);
      br.a[bC + c] = e * v;
      store_as(br.dv, bC + c, br.dv_dt, ga * e);
      br.gz2[bC + c] = ga * v * e * (1.f - e);
    }
  });
  __syncthreads();
  if (!is_backward(MODE)) return;
  // 4. g_z1 = (w2^T g_z2) * (z1 > 0)   (z1 > 0 <=> h > 0, NaN included)
  float* gz1 = br.gz1 + static_cast<int64_t>(b) * Cr;
  const float* gz2 = br.gz2 + bC;
  matvec(transposed(br.w2), Cr, C, [&](int c) { return __ldcg(gz2 + c); },
         [&](int r, float g) { gz1[r] = __ldcg(h + r) > 0.f ? g : 0.f; });
  __syncthreads();
  // 5. the dx bias k = (w1^T g_z1) / HW
  matvec(transposed(br.w1), C, Cr, [&](int r) { return __ldcg(gz1 + r); },
         [&](int c, float g) { br.k[bC + c] = g / hw; });
  __syncthreads();
}

// dw2[c, r] = sum_b g_z2[b, c] h[b, r];  dw1[r, c] = sum_b g_z1[b, r] s[b, c]; b in order.
// Instances backward, also dtable: [N, B, C] = gt, or [N, C] = sum_b gt[n, b], b in order.
// Block blk of nblk of the branch takes a grid-stride share of the 2 * C * Cr (+ dtable)
// elements.
template <int MODE>
__device__ void weight_grads(const Branch& br, int blk, int nblk) {
  const int C = br.C, Cr = br.Cr, B = br.B;
  const int64_t n2 = static_cast<int64_t>(C) * Cr;
  const int64_t nt =
      MODE == kInstBwd ? static_cast<int64_t>(br.N) * (br.dtable_ps ? B : 1) * C : 0;
  for (int64_t e = static_cast<int64_t>(blk) * kThreads + threadIdx.x; e < 2 * n2 + nt;
       e += static_cast<int64_t>(nblk) * kThreads) {
    float acc = 0.f;
    if (MODE == kInstBwd && e >= 2 * n2) {
      const int64_t f = e - 2 * n2;
      if (br.dtable_ps) {
        acc = __ldcg(br.gt + f);
      } else {
        const int64_t n = f / C, c = f - n * C;
        for (int b = 0; b < B; ++b) acc += __ldcg(br.gt + (n * B + b) * C + c);
      }
      store_as(br.dtable, f, br.dtable_dt, acc);
    } else if (e < n2) {
      const int c = static_cast<int>(e / Cr), r = static_cast<int>(e - static_cast<int64_t>(c) * Cr);
      for (int b = 0; b < B; ++b)
        acc += __ldcg(br.gz2 + static_cast<int64_t>(b) * C + c) *
               __ldcg(br.h + static_cast<int64_t>(b) * Cr + r);
      store_as(br.dw2, e, br.dw2_dt, acc);
    } else {
      const int64_t f = e - n2;
      const int r = static_cast<int>(f / C), c = static_cast<int>(f - static_cast<int64_t>(r) * C);
      for (int b = 0; b < B; ++b)
        acc += __ldcg(br.gz1 + static_cast<int64_t>(b) * Cr + r) *
               __ldcg(br.s + static_cast<int64_t>(b) * C + c);
      store_as(br.dw1, f, br.dw1_dt, acc);
    }
  }
}

// ------------------------------------------------------------------------ tiles
template <class D, int V>
struct alignas(sizeof(typename D::raw_t) * V) Pack {
  typename D::raw_t v[V];
};

template <class D, int V>
__device__ __forceinline__ Pack<D, V> load_pack(const typename D::raw_t* p) {
  Pack<D, V> r;
  if constexpr (sizeof(Pack<D, V>) == 16) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(&r, &u, 16);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) r.v[j] = __ldg(p + j);
  }
  return r;
}

// Streaming store (evict-first: keeps x, which the two-phase path reads again, in L2).
template <class D, int V>
__device__ __forceinline__ void store_pack(typename D::raw_t* p, const Pack<D, V>& r) {
  if constexpr (sizeof(Pack<D, V>) == 16) {
    uint4 u;
    memcpy(&u, &r, 16);
    __stcs(reinterpret_cast<uint4*>(p), u);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) p[j] = r.v[j];
  }
}

__device__ __forceinline__ int branch_index(const Group& g) {
  int bi = 0;
  for (int i = 1; i < g.nbr; ++i)
    if (static_cast<int>(blockIdx.x) >= g.br[i].block0) bi = i;
  return bi;
}

// Writes the tile's partial sums of the thread's per-vector-lane sums acc into workspace
// plane j (NCHW: a shuffle tree over the lanes of a plane; NHWC: the rows in order through
// shared memory; ends with the readers of red done only at the next barrier).  All threads
// call it.
template <int V>
__device__ __forceinline__ void write_partials(const Branch& br, const Tile& tl,
                                               const ThreadMap& m, const float (&acc)[V],
                                               float* red, int plane) {
  // Who writes which partial: mimb_tiling.h (checked on the host by test_cuda_index_math).
  float* part = br.part + mimb::partial_plane(br, br.B, plane) + mimb::partial_index(br, tl, 0);
  if (!br.nhwc) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < V; ++j) s += acc[j];
    for (int off = br.lanes / 2; off > 0; off >>= 1) s += __shfl_xor_sync(kFullMask, s, off);
    const int c = mimb::nchw_partial_channel(m);
    if (c >= 0) part[c] = s;
  } else {
    if (m.row < br.rows) {
#pragma unroll
      for (int j = 0; j < V; ++j) red[mimb::red_index(br, m.row, m.lane * V + j)] = acc[j];
    }
    __syncthreads();
    // The tile has up to kThreads * V channels, more than there are threads: each thread
    // sums the rows of every kThreads-th column (one column per thread would leave the
    // channels past the first kThreads without a partial -- and the workspace is not
    // zeroed, so garbage would reach s, y and every gradient).
    const mimb::ChannelRange cr = mimb::nhwc_partial_channels(br, tl, threadIdx.x);
    const int c0 = tl.ct * br.ctile;
    for (int i = cr.first; i < cr.end; i += cr.step) {
      float s = 0.f;
      for (int r = 0; r < br.rows; ++r) s += red[mimb::red_index(br, r, i)];
      part[c0 + i] = s;
    }
  }
}

// Loads this thread's vectors (backward: dy, after adding dy * x), accumulates the
// per-channel sums and writes the tile's partial sums.  All threads call it.
template <class D, int V, int MODE>
__device__ __forceinline__ void reduce_tile(const Branch& br, const Tile& tl,
                                            const ThreadMap& m, Pack<D, V> (&keep)[kRegVecs],
                                            float* red) {
  using raw_t = typename D::raw_t;
  const int64_t sbase = static_cast<int64_t>(tl.b) * br.C * br.HW;
  const raw_t* x = static_cast<const raw_t*>(br.x) + sbase;
  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.f;
#pragma unroll
  for (int k = 0; k < kRegVecs; ++k) {
    if (k < m.n) {
      const int64_t off = m.base + k * m.step;
      const Pack<D, V> px = load_pack<D, V>(x + off);
      if (MODE == kBwd) {
        const Pack<D, V> pd = load_pack<D, V>(static_cast<const raw_t*>(br.dy) + sbase + off);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += D::to_float(pd.v[j]) * D::to_float(px.v[j]);
        keep[k] = pd;
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += D::to_float(px.v[j]);
        keep[k] = px;
      }
    }
  }
  write_partials<V>(br, tl, m, acc, red, 0);
}

// Loads the thread's vectors of src (the two-phase apply kernel).
template <class D, int V>
__device__ __forceinline__ void load_tile(const typename D::raw_t* src, const ThreadMap& m,
                                          Pack<D, V> (&keep)[kRegVecs]) {
#pragma unroll
  for (int k = 0; k < kRegVecs; ++k)
    if (k < m.n) keep[k] = load_pack<D, V>(src + m.base + k * m.step);
}

// load_tile, and zeros in the entries past the thread's n (never used): every entry of
// keep defined, so that its earlier contents are dead.
template <class D, int V>
__device__ __forceinline__ void load_tile_all(const typename D::raw_t* src, const ThreadMap& m,
                                              Pack<D, V> (&keep)[kRegVecs]) {
#pragma unroll
  for (int k = 0; k < kRegVecs; ++k) {
    if (k < m.n) {
      keep[k] = load_pack<D, V>(src + m.base + k * m.step);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) keep[k].v[j] = 0;
    }
  }
}

// The instances backward's reduction: the x tile into registers once, its sums into plane
// 0; then each instance's dy tile streamed past it, sum(dy_n * x) into plane 1 + n.
template <class D, int V>
__device__ __forceinline__ void reduce_tile_instances(const Branch& br, const Tile& tl,
                                                      const ThreadMap& m, float* red) {
  using raw_t = typename D::raw_t;
  const int64_t sample = static_cast<int64_t>(br.C) * br.HW;
  Pack<D, V> px[kRegVecs];
  load_tile_all<D, V>(static_cast<const raw_t*>(br.x) + tl.b * sample, m, px);
  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.f;
#pragma unroll
  for (int k = 0; k < kRegVecs; ++k)
    if (k < m.n) {
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += D::to_float(px[k].v[j]);
    }
  write_partials<V>(br, tl, m, acc, red, 0);
  for (int n = 0; n < br.N; ++n) {
    const raw_t* dy = static_cast<const raw_t*>(br.dy) +
                      (static_cast<int64_t>(n) * br.B + tl.b) * sample;
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
#pragma unroll
    for (int k = 0; k < kRegVecs; ++k) {
      if (k < m.n) {
        const Pack<D, V> pd = load_pack<D, V>(dy + m.base + k * m.step);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += D::to_float(pd.v[j]) * D::to_float(px[k].v[j]);
      }
    }
    if (br.nhwc) __syncthreads();  // the previous plane's readers of red are done
    write_partials<V>(br, tl, m, acc, red, 1 + n);
  }
}

// out = keep * a (+ k) for the thread's vectors (instances: N outputs).  Scales via __ldcg
// (written in this launch by the single-pass kernel).
template <class D, int V, int MODE>
__device__ __forceinline__ void apply_tile(const Branch& br, const Tile& tl, const ThreadMap& m,
                                           const Pack<D, V> (&keep)[kRegVecs]) {
  if (m.n == 0) return;
  using raw_t = typename D::raw_t;
  const int64_t sample = static_cast<int64_t>(br.C) * br.HW;
  const int64_t bC = static_cast<int64_t>(tl.b) * br.C;
  // Only the instances have N > 1 outputs.  A run-time loop count elsewhere would let the
  // compiler hoist the float conversion of keep out of the loop -- twice the registers for
  // 16-bit data, which spilled the single-pass backward (bf16: 316 bytes).
  const int N = MODE == kInst ? br.N : 1;
  for (int n = 0; n < N; ++n) {
    const int64_t arow = (static_cast<int64_t>(n) * br.B) * br.C + bC;
    float sc[V], kb[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int c = br.nhwc ? m.c + j : m.c;
      sc[j] = __ldcg(br.a + arow + c);
      kb[j] = MODE == kBwd ? __ldcg(br.k + bC + c) : 0.f;
    }
    raw_t* out = static_cast<raw_t*>(br.out) + (static_cast<int64_t>(n) * br.B + tl.b) * sample;
#pragma unroll
    for (int k = 0; k < kRegVecs; ++k) {
      if (k < m.n) {
        Pack<D, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float in = D::to_float(keep[k].v[j]);
          o.v[j] = D::from_float(MODE == kBwd ? __fadd_rn(__fmul_rn(in, sc[j]), kb[j])
                                              : __fmul_rn(in, sc[j]));
        }
        store_pack<D, V>(out + m.base + k * m.step, o);
      }
    }
  }
}

// The instances backward's dx for the thread's vectors: sum_n dy_n * a[n] in order, then
// + k, each product and sum rounded once (as apply_tile).  Reads each dy_n tile once more
// (kernel 1 read it for g_a); a and k through the read-only path (__ldg: written by kernel
// 1, a previous launch -- unlike apply_tile's scales, which the single pass writes in the
// same launch).
template <class D, int V>
__device__ __forceinline__ void apply_tile_instances_bwd(const Branch& br, const Tile& tl,
                                                         const ThreadMap& m) {
  if (m.n == 0) return;
  using raw_t = typename D::raw_t;
  const int64_t sample = static_cast<int64_t>(br.C) * br.HW;
  const int64_t bC = static_cast<int64_t>(tl.b) * br.C;
  float kb[V];
#pragma unroll
  for (int j = 0; j < V; ++j) kb[j] = __ldg(br.k + bC + (br.nhwc ? m.c + j : m.c));
  raw_t* dx = static_cast<raw_t*>(br.out) + tl.b * sample;
#pragma unroll
  for (int k = 0; k < kRegVecs; ++k) {
    if (k < m.n) {
      const int64_t off = m.base + k * m.step;
      float acc[V];
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = 0.f;
      // Unrolled so that several instances' dy loads are in flight at once (the sum's order
      // over n is unchanged).
#pragma unroll 4
      for (int n = 0; n < br.N; ++n) {
        const int64_t row = static_cast<int64_t>(n) * br.B + tl.b;
        const Pack<D, V> pd =
            load_pack<D, V>(static_cast<const raw_t*>(br.dy) + row * sample + off);
        const float* a = br.a + row * br.C;
#pragma unroll
        for (int j = 0; j < V; ++j)
          acc[j] = __fadd_rn(acc[j],
                             __fmul_rn(D::to_float(pd.v[j]), __ldg(a + (br.nhwc ? m.c + j : m.c))));
      }
      Pack<D, V> o;
#pragma unroll
      for (int j = 0; j < V; ++j) o.v[j] = D::from_float(__fadd_rn(acc[j], kb[j]));
      store_pack<D, V>(dx + off, o);
    }
  }
}

// threadFenceReduction: publish this block's partials, take a ticket of sample b; true
// (block-uniform) in the block that drew the last one, which also resets the counter.
__device__ __forceinline__ bool arrive_last(unsigned* ticket, int nblk, int* flag_sh) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const bool last = atomicAdd(ticket, 1u) == static_cast<unsigned>(nblk - 1);
    if (last) atomicExch(ticket, 0u);  // every block of the sample has arrived
    *flag_sh = last ? 1 : 0;
  }
  __syncthreads();
  const bool last = *flag_sh != 0;
  if (last) __threadfence();
  return last;
}

// Single pass, the MLP block: publish the scales to the sample's waiting blocks.
__device__ __forceinline__ void release_sample(unsigned* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicExch(flag, 1u);
}

// Single pass, the other nblk - 1 blocks: wait for the scales, then count out; the last to
// leave resets the flag.  Terminates because the cooperative launch makes every block of
// the grid co-resident (the MLP block is running).
__device__ __forceinline__ void wait_sample(unsigned* flag, int nblk) {
  if (threadIdx.x == 0) {
    while (*static_cast<volatile unsigned*>(flag) == 0u) __nanosleep(100);
    __threadfence();
    if (atomicAdd(flag, 1u) == static_cast<unsigned>(nblk - 1)) atomicExch(flag, 0u);
  }
  __syncthreads();
}

// ==================================================================== kernels
template <class D, int V, int MODE>
__device__ __forceinline__ void reduce_body(const Branch& br, const Tile& tl, float* red,
                                            int* flag_sh) {
  const ThreadMap m = thread_map<V>(br, tl, threadIdx.x);
  if constexpr (MODE == kInstBwd) {
    reduce_tile_instances<D, V>(br, tl, m, red);
  } else {
    Pack<D, V> keep[kRegVecs];  // unused here: dead after inlining
    reduce_tile<D, V, MODE>(br, tl, m, keep, red);
  }
  if (arrive_last(br.ticket + tl.b, br.nct * br.nsp, flag_sh)) mlp_sample<MODE>(br, tl.b);
}

// Two-phase, kernel 1: the tile's partial sums; the last block of a sample runs its MLP.
template <class D, int MODE>
__global__ void __launch_bounds__(kThreads, 2) mimb_reduce_kernel(const Group g) {
  __shared__ float red[mimb::reduce_smem_floats(D::kVec)];
  __shared__ int flag_sh;
  const Branch& br = g.br[branch_index(g)];
  const Tile tl = tile_of(br, static_cast<int>(blockIdx.x) - br.block0);
  if (br.vec)
    reduce_body<D, D::kVec, MODE>(br, tl, red, &flag_sh);
  else
    reduce_body<D, 1, MODE>(br, tl, red, &flag_sh);
}

template <class D, int V, int MODE>
__device__ __forceinline__ void apply_body(const Branch& br, const Tile& tl) {
  const ThreadMap m = thread_map<V>(br, tl, threadIdx.x);
  if constexpr (MODE == kInstBwd) {
    apply_tile_instances_bwd<D, V>(br, tl, m);
  } else {
    Pack<D, V> keep[kRegVecs];
    const int64_t sbase = static_cast<int64_t>(tl.b) * br.C * br.HW;
    load_tile<D, V>(static_cast<const typename D::raw_t*>(MODE == kBwd ? br.dy : br.x) + sbase,
                    m, keep);
    apply_tile<D, V, MODE>(br, tl, m, keep);
  }
}

// Two-phase, kernel 2: scale the tile; backward: also a share of dw1 / dw2 (and dtable).
template <class D, int MODE>
__global__ void __launch_bounds__(kThreads, 2) mimb_apply_kernel(const Group g) {
  const Branch& br = g.br[branch_index(g)];
  const int local = static_cast<int>(blockIdx.x) - br.block0;
  const Tile tl = tile_of(br, local);
  if (br.vec)
    apply_body<D, D::kVec, MODE>(br, tl);
  else
    apply_body<D, 1, MODE>(br, tl);
  if (is_backward(MODE)) weight_grads<MODE>(br, local, br.nblocks);
}

template <class D, int V, int MODE>
__device__ __forceinline__ void single_pass_body(const Branch& br, const Tile& tl, float* red,
                                                 int* flag_sh) {
  const ThreadMap m = thread_map<V>(br, tl, threadIdx.x);
  Pack<D, V> keep[kRegVecs];
  reduce_tile<D, V, MODE>(br, tl, m, keep, red);
  const int nblk = br.nct * br.nsp;
  if (arrive_last(br.ticket + tl.b, nblk, flag_sh)) {
    // The one block per sample that runs the MLP reads its tile again (from L2) rather
    // than holding it across the MLP: `keep` (32 registers) live through the mat-vecs,
    // which are inlined into every block's code, made the 16-bit backward spill (ptxas,
    // sm_90).  Every entry is redefined, so none of the old values is live across the MLP.
    mlp_sample<MODE>(br, tl.b);
    if (nblk > 1) release_sample(br.flag + tl.b);
    const int64_t sbase = static_cast<int64_t>(tl.b) * br.C * br.HW;
    load_tile_all<D, V>(static_cast<const typename D::raw_t*>(MODE == kBwd ? br.dy : br.x) + sbase,
                        m, keep);
  } else {
    wait_sample(br.flag + tl.b, nblk);
  }
  apply_tile<D, V, MODE>(br, tl, m, keep);
}

// Single pass (cooperative launch only): reduce, per-sample MLP, scale from registers.
template <class D, int MODE>
__global__ void __launch_bounds__(kThreads, 2) mimb_single_pass_kernel(const Group g) {
  __shared__ float red[mimb::reduce_smem_floats(D::kVec)];
  __shared__ int flag_sh;
  const Branch& br = g.br[branch_index(g)];
  const int local = static_cast<int>(blockIdx.x) - br.block0;
  const Tile tl = tile_of(br, local);
  if (br.vec)
    single_pass_body<D, D::kVec, MODE>(br, tl, red, &flag_sh);
  else
    single_pass_body<D, 1, MODE>(br, tl, red, &flag_sh);
  if (MODE == kBwd) {
    cooperative_groups::this_grid().sync();  // every sample's MLP is done
    weight_grads<MODE>(br, local, br.nblocks);
  }
}

// ==================================================================== host: checks
int dt_code(ScalarType t) {
  return t == ScalarType::Half ? kDtF16 : t == ScalarType::BFloat16 ? kDtBF16 : kDtF32;
}

bool is_channels_last(const Tensor& t) {  // dims of size 1 may have any stride, as in torch
  int64_t expect = 1;
  for (int d : {1, 3, 2, 0}) {
    const int64_t n = t.size(d);
    if (n != 1 && t.stride(d) != expect) return false;
    expect *= n;
  }
  return true;
}

void check_float(const Tensor& t, const char* op, const std::string& name, int64_t dims,
                 const char* shape, int32_t dev) {
  STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == dev, "mipnet_cuda::", op, ": ", name,
                  " must be a CUDA tensor on cuda:", dev);
  STD_TORCH_CHECK(t.dim() == dims, "mipnet_cuda::", op, ": ", name, " must be ", dims, "-D ",
                  shape, ", got ", t.dim(), " dims");
  STD_TORCH_CHECK(is_supported_float(t.scalar_type()), "mipnet_cuda::", op, ": ", name,
                  " must be float32, float16 or bfloat16, got ", dtype_name(t.scalar_type()));
}

void check_size(const Tensor& t, const char* op, const std::string& name, int64_t d,
                int64_t want, const char* what) {
  STD_TORCH_CHECK(t.size(d) == want, "mipnet_cuda::", op, ": ", name, ".size(", d,
                  ") must be ", what, " = ", want, ", got ", t.size(d));
}

Mat as_mat(const Tensor& t) {
  if (t.dim() == 1) return Mat{t.data_ptr(), 0, t.stride(0), dt_code(t.scalar_type())};
  return Mat{t.data_ptr(), t.stride(0), t.stride(1), dt_code(t.scalar_type())};
}

// x's checks and layout; fills the data fields of br.  Returns whether outputs are
// channels_last.
bool setup_x(Branch& br, const Tensor& x, const char* op, const std::string& name, int32_t dev) {
  check_float(x, op, name, 4, "[B, C, H, W]", dev);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  STD_TORCH_CHECK(B * C == 0 || HW > 0, "mipnet_cuda::", op, ": ", name,
                  " has an empty spatial size ", x.size(2), "x", x.size(3),
                  "; the mean over H*W is undefined");
  const bool nchw = x.is_contiguous();
  const bool cl = is_channels_last(x);
  STD_TORCH_CHECK(nchw || cl, "mipnet_cuda::", op, ": ", name,
                  " must be contiguous (NCHW) or channels_last (NHWC)");
  STD_TORCH_CHECK(C * HW <= kMaxSampleElems, "mipnet_cuda::", op, ": ", name, " has C*H*W = ",
                  C * HW, " elements per sample; at most 2^30 are supported");
  STD_TORCH_CHECK(B <= INT_MAX, "mipnet_cuda::", op, ": ", name, " has too many samples");
  br.x = x.data_ptr();
  br.B = static_cast<int>(B);
  br.C = static_cast<int>(C);
  br.HW = static_cast<int>(HW);
  br.N = 1;
  br.nhwc = (!nchw || (HW == 1 && C > 1)) ? 1 : 0;
  return !nchw;
}

void setup_excite(Branch& br, const Tensor& x, const Tensor& w1, const Tensor& w2,
                  const char* op, const std::string& p, int32_t dev) {
  check_float(w1, op, "w1" + p, 2, "[Cr, C]", dev);
  check_float(w2, op, "w2" + p, 2, "[C, Cr]", dev);
  check_size(w1, op, "w1" + p, 1, x.size(1), "C (x.size(1))");
  check_size(w2, op, "w2" + p, 0, x.size(1), "C (x.size(1))");
  check_size(w2, op, "w2" + p, 1, w1.size(0), "Cr (w1.size(0))");
  STD_TORCH_CHECK(w1.size(0) >= 1 && w1.size(0) <= INT_MAX, "mipnet_cuda::", op, ": w1", p,
                  " must have 1 <= C/r rows");
  br.Cr = static_cast<int>(w1.size(0));
  br.w1 = as_mat(w1);
  br.w2 = as_mat(w2);
}

void check_bc(const Tensor& t, const Tensor& x, const char* op, const std::string& name,
              int32_t dev) {
  check_float(t, op, name, 2, "[B, C]", dev);
  check_size(t, op, name, 0, x.size(0), "B (x.size(0))");
  check_size(t, op, name, 1, x.size(1), "C (x.size(1))");
}

Tensor alloc_4d(const Tensor& like, int64_t B, bool cl) {
  const int64_t C = like.size(1), H = like.size(2), W = like.size(3);
  if (!cl) return torch::stable::new_empty(like, {B, C, H, W});
  return torch::stable::empty({B, C, H, W}, like.scalar_type(), std::nullopt, like.device(),
                              std::nullopt, MemoryFormat::ChannelsLast);
}

// ==================================================================== host: planning
// The tiling itself: mimb::plan_tiling (mimb_tiling.h).
using mimb::cdiv;

// Vector access for the branch: 16-byte aligned bases, and planes (NCHW) / pixel rows
// (NHWC) a whole number of vectors long.
bool vectorizable(const Branch& br, int V) {
  auto aligned = [](const void* p) {
    return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
  };
  return mimb::use_vectors(br.nhwc ? br.C : br.HW, V,
                           aligned(br.x) && aligned(br.dy) && aligned(br.out));
}

// ==================================================================== host: state
// Per (device, stream): the ticket / flag counters, zeroed once when (re)allocated and
// returned to zero by every launch.  Kept alive for the process (intentionally leaked: no
// destruction order issues at exit).  Not used while the stream is capturing a CUDA graph
// (launch_group then keeps them in the call's workspace).
unsigned* counters(int32_t dev, cudaStream_t stream, int64_t n, const Tensor& like) {
  struct Entry {
    Tensor t;
    int64_t size;
  };
  static std::mutex mu;
  static auto* table = new std::map<std::pair<int32_t, cudaStream_t>, Entry>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = table->find({dev, stream});
  if (it == table->end() || it->second.size < n) {
    const int64_t size = std::max<int64_t>(n, 1024);
    Tensor t = torch::stable::new_zeros(like, {size}, ScalarType::Int);
    it = table->insert_or_assign({dev, stream}, Entry{t, size}).first;
  }
  return static_cast<unsigned*>(it->second.t.data_ptr());
}

enum class Path { kAuto, kTwoPhase, kSinglePass };

Path requested_path() {
  const char* e = std::getenv("MIPNET_MIMB_CUDA_PATH");
  if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) return Path::kAuto;
  if (std::strcmp(e, "two_phase") == 0) return Path::kTwoPhase;
  if (std::strcmp(e, "single_pass") == 0) return Path::kSinglePass;
  STD_TORCH_CHECK(false, "mipnet_cuda: MIPNET_MIMB_CUDA_PATH must be auto, two_phase or "
                         "single_pass, got '", e, "'");
  return Path::kAuto;
}

// Blocks of the single-pass kernel that fit on the device at once (0: no cooperative launch).
template <class D, int MODE>
int single_pass_capacity(int32_t dev) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};  // value + 1
  const bool cacheable = dev >= 0 && dev < kMaxDevices;
  if (cacheable) {
    const int c = cache[dev].load(std::memory_order_relaxed);
    if (c > 0) return c - 1;
  }
  int cap = 0;
  if (device_attribute<cudaDevAttrCooperativeLaunch>(dev) != 0) {
    int per_sm = 0;
    const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, mimb_single_pass_kernel<D, MODE>, kThreads, 0);
    STD_TORCH_CHECK(err == cudaSuccess, "mipnet_cuda: occupancy query failed: ",
                    cudaGetErrorString(err));
    cap = per_sm * sm_count(dev);
  }
  if (cacheable) cache[dev].store(cap + 1, std::memory_order_relaxed);
  return cap;
}

// Test hook: MIPNET_MIMB_CUDA_COOP_CAPACITY=n makes the launcher believe that n blocks of
// the single-pass kernel are co-resident, so that a test can have the driver refuse a real
// cooperative launch (as it does under MPS thread limits or in a green context, where fewer
// blocks fit than occupancy x SM count says).  Read per call; unset: the measured capacity.
int capacity_override(int measured) {
  const char* e = std::getenv("MIPNET_MIMB_CUDA_COOP_CAPACITY");
  if (e == nullptr || *e == '\0') return measured;
  char* end = nullptr;
  const long v = std::strtol(e, &end, 10);
  STD_TORCH_CHECK(*end == '\0' && v >= 0 && v <= INT_MAX,
                  "mipnet_cuda: MIPNET_MIMB_CUDA_COOP_CAPACITY must be a block count, got '", e,
                  "'");
  return static_cast<int>(v);
}

// The driver refuses a cooperative launch whose blocks cannot all be co-resident in the
// context it runs in, which can be fewer than the occupancy calculator's device-wide count.
// Nothing has run then, so the two-phase kernels can take the same launch.
bool is_cooperative_refusal(cudaError_t err) {
  return err == cudaErrorCooperativeLaunchTooLarge || err == cudaErrorLaunchOutOfResources ||
         err == cudaErrorNotSupported || err == cudaErrorNotPermitted;
}

// Per device and kernel: the smallest grid the driver has refused as a cooperative launch
// (0: none), so that the automatic choice does not pay a refused launch on every call
// once the context has shown that it is smaller than the device.  (Per device, not per
// stream: a green context on another stream may fit more; it then runs two-phase.)
template <class D, int MODE>
std::atomic<int>& refused_grid(int32_t dev) {
  constexpr int kMaxDevices = 64;  // devices past the table share its last entry
  static std::atomic<int> smallest[kMaxDevices + 1] = {};  // 0: none refused
  return smallest[dev >= 0 && dev < kMaxDevices ? dev : kMaxDevices];
}

// The single-pass launch of launch_group when the path allows it and the grid fits: true
// when it ran; false when the two phases must run (not chosen, or the driver refused the
// cooperative launch under MIPNET_MIMB_CUDA_PATH=auto).
template <class D, int MODE>
bool try_single_pass(Group& g, unsigned grid, cudaStream_t stream, int32_t dev, const char* op) {
  const int64_t blocks = grid;
  const Path path = requested_path();
  const int cap =
      path == Path::kTwoPhase ? 0 : capacity_override(single_pass_capacity<D, MODE>(dev));
  std::atomic<int>& refused = refused_grid<D, MODE>(dev);
  // Forced single pass always asks the driver (whose answer the user then gets); the
  // automatic choice skips grids the driver has refused before.
  const int refused_at = refused.load(std::memory_order_relaxed);
  const bool single = path != Path::kTwoPhase && blocks <= cap &&
                      (path == Path::kSinglePass || refused_at == 0 || blocks < refused_at);
  STD_TORCH_CHECK(single || path != Path::kSinglePass, "mipnet_cuda::", op,
                  ": MIPNET_MIMB_CUDA_PATH=single_pass but the launch does not fit on the device (",
                  blocks, " tiles, ", cap, " co-resident blocks",
                  cap == 0 ? ", no cooperative launch" : "", ")");
  if (!single) return false;
  void* args[] = {&g};
  const cudaError_t err = cudaLaunchCooperativeKernel(
      reinterpret_cast<const void*>(&mimb_single_pass_kernel<D, MODE>), dim3(grid),
      dim3(kThreads), args, 0, stream);
  if (err == cudaSuccess) {
    check_launch(op);
    return true;
  }
  // The runtime also records the error as the thread's last error: clear it, or the next
  // launch check anywhere in the process (ours, torch's) would report it as its own.
  (void)cudaGetLastError();
  STD_TORCH_CHECK(is_cooperative_refusal(err), "mipnet_cuda::", op,
                  ": cooperative kernel launch failed: ", cudaGetErrorString(err));
  STD_TORCH_CHECK(path == Path::kAuto, "mipnet_cuda::", op,
                  ": MIPNET_MIMB_CUDA_PATH=single_pass but the driver refused the cooperative "
                  "launch of ", blocks, " blocks (", cudaGetErrorString(err),
                  "): fewer blocks are co-resident in this context than the device's "
                  "occupancy says (", cap, "), e.g. under MPS limits or in a green context; "
                  "use MIPNET_MIMB_CUDA_PATH=auto or two_phase");
  // Remember the refusal (the smallest refused grid) and take the two-phase path.
  int seen = refused.load(std::memory_order_relaxed);
  while ((seen == 0 || blocks < seen) &&
         !refused.compare_exchange_weak(seen, static_cast<int>(blocks),
                                        std::memory_order_relaxed)) {
  }
  return false;
}

// ==================================================================== host: launch
// Plans, allocates the workspace and launches one group (<= kMaxBranches branches, one x
// dtype, all non-empty).  `like`: a tensor on the device (allocation options).
template <class D, int MODE>
void launch_group(Group& g, const Tensor& like, int32_t dev, const char* op) {
  int64_t blocks = 0, ws = 0, ncount = 0;
  auto take = [&](int64_t n) {  // workspace floats, 16-byte aligned
    const int64_t o = ws;
    ws += cdiv(n, 4) * 4;
    return o;
  };
  constexpr int kSlots = 10;  // workspace arrays per branch
  std::vector<int64_t> off(static_cast<size_t>(g.nbr) * kSlots, -1);
  for (int i = 0; i < g.nbr; ++i) {
    Branch& br = g.br[i];
    br.vec = vectorizable(br, D::kVec) ? 1 : 0;
    mimb::plan_tiling(br, br.vec ? D::kVec : 1);
    const int64_t nblk = static_cast<int64_t>(br.B) * br.nct * br.nsp;
    STD_TORCH_CHECK(blocks + nblk <= INT_MAX, "mipnet_cuda::", op,
                    ": the inputs are too large (", blocks + nblk, " tiles)");
    br.block0 = static_cast<int>(blocks);
    br.nblocks = static_cast<int>(nblk);
    blocks += nblk;
    const int64_t BC = static_cast<int64_t>(br.B) * br.C, BCr = static_cast<int64_t>(br.B) * br.Cr;
    int64_t* o = &off[static_cast<size_t>(i) * kSlots];
    const int planes = MODE == kInstBwd ? br.N + 1 : 1;  // partial_plane (mimb_tiling.h)
    o[0] = take(BC * br.nsp * planes);  // part
    o[1] = take(BC * br.N);             // a
    o[2] = take(BCr);                   // h
    if (MODE != kFwd) o[3] = take(BC);  // s (workspace copy)
    if (is_backward(MODE)) {
      o[4] = take(BC);   // k
      o[5] = take(BCr);  // gz1
      o[6] = take(BC);   // gz2
    }
    if (MODE == kInstBwd) o[9] = take(BC * br.N);  // gt
    if (MODE == kFwd && br.embed) {
      o[7] = take(static_cast<int64_t>(br.B) * br.Ke);  // hv
      o[8] = take(BC);                                  // vb
    }
    ncount += 2 * static_cast<int64_t>(br.B);
  }
  const cudaStream_t stream = current_stream(dev);
  // While the stream is being captured into a CUDA graph the counters live in this call's
  // workspace (the graph's memory pool) and are zeroed by a captured memset on every replay:
  // allocating the persistent per-stream counters inside a capture would put them in that
  // pool, and later calls would use memory the graph owns.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const cudaError_t qerr = cudaStreamIsCapturing(stream, &capture);
  STD_TORCH_CHECK(qerr == cudaSuccess, "mipnet_cuda::", op, ": cudaStreamIsCapturing failed: ",
                  cudaGetErrorString(qerr));
  const bool capturing = capture != cudaStreamCaptureStatusNone;
  const int64_t cnt_off = capturing ? take(ncount) : -1;  // unsigned and float: 4 bytes each
  const Tensor work = torch::stable::new_empty(like, {std::max<int64_t>(ws, 4)}, ScalarType::Float);
  float* wp = static_cast<float*>(work.data_ptr());
  unsigned* cnt;
  if (capturing) {
    cnt = reinterpret_cast<unsigned*>(wp + cnt_off);
    const cudaError_t merr = cudaMemsetAsync(cnt, 0, sizeof(unsigned) * ncount, stream);
    STD_TORCH_CHECK(merr == cudaSuccess, "mipnet_cuda::", op, ": cudaMemsetAsync failed: ",
                    cudaGetErrorString(merr));
  } else {
    cnt = counters(dev, stream, ncount, work);
  }
  int64_t coff = 0;
  for (int i = 0; i < g.nbr; ++i) {
    Branch& br = g.br[i];
    const int64_t* o = &off[static_cast<size_t>(i) * kSlots];
    auto at = [&](int j) { return o[j] < 0 ? nullptr : wp + o[j]; };
    br.part = at(0);
    br.a = at(1);
    br.h = at(2);
    if (MODE != kFwd) br.s = at(3);
    br.k = at(4);
    br.gz1 = at(5);
    br.gz2 = at(6);
    br.hv = at(7);
    br.vb = at(8);
    br.gt = at(9);
    br.ticket = cnt + coff;
    br.flag = cnt + coff + br.B;
    coff += 2 * static_cast<int64_t>(br.B);
  }

  const unsigned grid = static_cast<unsigned>(blocks);
  if constexpr (MODE != kInstBwd) {  // the instances backward: two phases only (see the top)
    if (try_single_pass<D, MODE>(g, grid, stream, dev, op)) return;
  }
  mimb_reduce_kernel<D, MODE><<<grid, kThreads, 0, stream>>>(g);
  check_launch(op);
  mimb_apply_kernel<D, MODE><<<grid, kThreads, 0, stream>>>(g);
  check_launch(op);
}

// The branches of one op call that have work, and their x dtypes (launch_all groups runs
// of one dtype).  add() enlists a branch that has work; a branch without any gets the
// outputs its sums would fill zeroed instead (and nothing to launch).
struct Launch {
  std::vector<Branch> run;
  std::vector<ScalarType> dts;
  void add(const Branch& br, ScalarType dt, bool work,
           std::initializer_list<Tensor> zero_if_empty = {}) {
    if (work) {
      run.push_back(br);
      dts.push_back(dt);
      return;
    }
    for (Tensor t : zero_if_empty) torch::stable::zero_(t);
  }
};

// Launches every enlisted branch of `l`, in groups of up to kMaxBranches consecutive
// branches with the same x dtype.
template <int MODE>
void launch_all(const Launch& l, const Tensor& like, int32_t dev, const char* op) {
  const std::vector<Branch>& all = l.run;
  const std::vector<ScalarType>& dts = l.dts;
  torch::stable::accelerator::DeviceGuard guard(dev);
  size_t i = 0;
  while (i < all.size()) {
    Group g{};
    g.nbr = 0;
    const ScalarType dt = dts[i];
    while (i < all.size() && g.nbr < kMaxBranches && dts[i] == dt) g.br[g.nbr++] = all[i++];
    switch (dt) {
      case ScalarType::Half: launch_group<F16, MODE>(g, like, dev, op); break;
      case ScalarType::BFloat16: launch_group<BF16, MODE>(g, like, dev, op); break;
      default: launch_group<F32, MODE>(g, like, dev, op); break;
    }
  }
}

// ==================================================================== ops
// The device of an op's branch lists: xs non-empty and on CUDA, every other list (its
// length in `others`) as long as xs.  The caller holds a DeviceGuard for it.
int32_t lists_device(const char* op, const std::vector<Tensor>& xs,
                     std::initializer_list<size_t> others) {
  STD_TORCH_CHECK(!xs.empty(), "mipnet_cuda::", op, ": xs must be a non-empty list");
  for (size_t len : others)
    STD_TORCH_CHECK(len == xs.size(), "mipnet_cuda::", op, ": the lists must have the same length");
  STD_TORCH_CHECK(xs[0].is_cuda(), "mipnet_cuda::", op, ": x must be a CUDA tensor");
  return xs[0].get_device_index();
}

struct FwdOut {
  std::vector<Tensor> y, s;
};

// mimb_scale_fwd / mimb_fwd on lists of branches (embed: lam ... b2 given, one branch).
FwdOut scale_fwd(const std::vector<Tensor>& xs, const std::vector<Tensor>& w1s,
                 const std::vector<Tensor>& w2s, const std::vector<Tensor>& vs,
                 const std::vector<Tensor>* embed, const char* op, bool grouped) {
  const int32_t dev = lists_device(op, xs, {w1s.size(), w2s.size(), vs.size()});
  torch::stable::accelerator::DeviceGuard guard(dev);
  FwdOut out;
  Launch launch;
  for (size_t i = 0; i < xs.size(); ++i) {
    const std::string p = grouped ? "s[" + std::to_string(i) + "]" : "";
    const Tensor& x = xs[i];
    Branch br{};
    const bool cl = setup_x(br, x, op, "x" + p, dev);
    setup_excite(br, x, w1s[i], w2s[i], op, p, dev);
    Tensor y = alloc_4d(x, x.size(0), cl);
    Tensor s = torch::stable::new_empty(x, {x.size(0), x.size(1)}, ScalarType::Float);
    if (embed == nullptr) {
      check_bc(vs[i], x, op, "v" + p, dev);
      br.v = as_mat(vs[i]);
    } else {
      const Tensor &lam = (*embed)[0], &e1 = (*embed)[1], &b1 = (*embed)[2], &e2 = (*embed)[3],
                   &b2 = (*embed)[4];
      check_float(lam, op, "lam", 2, "[B, N]", dev);
      check_float(e1, op, "e1", 2, "[K, N]", dev);
      check_float(b1, op, "b1", 1, "[K]", dev);
      check_float(e2, op, "e2", 2, "[C, K]", dev);
      check_float(b2, op, "b2", 1, "[C]", dev);
      const int64_t N = lam.size(1), K = e1.size(0);
      check_size(lam, op, "lam", 0, x.size(0), "B (x.size(0))");
      check_size(e1, op, "e1", 1, N, "N (lam.size(1))");
      check_size(b1, op, "b1", 0, K, "K (e1.size(0))");
      check_size(e2, op, "e2", 0, x.size(1), "C (x.size(1))");
      check_size(e2, op, "e2", 1, K, "K (e1.size(0))");
      check_size(b2, op, "b2", 0, x.size(1), "C (x.size(1))");
      STD_TORCH_CHECK(N <= INT_MAX && K <= INT_MAX, "mipnet_cuda::", op, ": e1 is too large");
      br.embed = 1;
      br.Ke = static_cast<int>(K);
      br.Nl = static_cast<int>(N);
      br.lam = as_mat(lam);
      br.e1 = as_mat(e1);
      br.b1 = as_mat(b1);
      br.e2 = as_mat(e2);
      br.b2 = as_mat(b2);
    }
    br.out = y.data_ptr();
    br.s = static_cast<float*>(s.data_ptr());
    launch.add(br, x.scalar_type(), static_cast<int64_t>(br.B) * br.C > 0);
    out.y.push_back(y);
    out.s.push_back(s);
  }
  launch_all<kFwd>(launch, xs[0], dev, op);
  return out;
}

std::tuple<Tensor, Tensor> mimb_scale_fwd_cuda(Tensor x, Tensor w1, Tensor w2, Tensor v) {
  FwdOut o = scale_fwd({x}, {w1}, {w2}, {v}, nullptr, "mimb_scale_fwd", false);
  return std::make_tuple(o.y[0], o.s[0]);
}

std::tuple<Tensor, Tensor> mimb_fwd_cuda(Tensor x, Tensor lam, Tensor w1, Tensor w2, Tensor e1,
                                         Tensor b1, Tensor e2, Tensor b2) {
  const std::vector<Tensor> embed{lam, e1, b1, e2, b2};
  FwdOut o = scale_fwd({x}, {w1}, {w2}, {x}, &embed, "mimb_fwd", false);
  return std::make_tuple(o.y[0], o.s[0]);
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>> mimb_scale_grouped_fwd_cuda(
    std::vector<Tensor> xs, std::vector<Tensor> w1s, std::vector<Tensor> w2s,
    std::vector<Tensor> vs) {
  FwdOut o = scale_fwd(xs, w1s, w2s, vs, nullptr, "mimb_scale_grouped_fwd", true);
  return std::make_tuple(o.y, o.s);
}

// The table's checks; fills br.N, br.v, br.v_sb and returns N.
int64_t setup_table(Branch& br, const Tensor& table, const Tensor& x, const char* op,
                    const std::string& p, int32_t dev) {
  const bool per_sample = table.dim() == 3;  // [N, B, C]: one row per output sample
  check_float(table, op, "table" + p, per_sample ? 3 : 2, "[N, C] or [N, B, C]", dev);
  if (per_sample) check_size(table, op, "table" + p, 1, x.size(0), "B (x.size(0))");
  check_size(table, op, "table" + p, table.dim() - 1, x.size(1), "C (x.size(1))");
  const int64_t N = table.size(0);
  STD_TORCH_CHECK(N * x.size(0) <= INT_MAX, "mipnet_cuda::", op, ": table", p,
                  " has too many instances");
  br.N = static_cast<int>(N);
  br.v = Mat{table.data_ptr(), table.stride(0), table.stride(table.dim() - 1),
             dt_code(table.scalar_type())};
  br.v_sb = per_sample ? table.stride(1) : 0;
  return N;
}

// dy's checks (x's shape and dtype; instances >= 0: [instances * B, C, H, W], the
// instances' blocks stacked); returns dy in the kernels' layout of x (autograd may hand
// over another one).
Tensor kernel_dy(const Tensor& dy_in, const Tensor& x, const Branch& br, int64_t instances,
                 const char* op, const std::string& p, int32_t dev) {
  check_float(dy_in, op, "dy" + p, 4, instances >= 0 ? "[N*B, C, H, W]" : "[B, C, H, W]", dev);
  for (int64_t d = 0; d < 4; ++d) {
    const int64_t want = d == 0 && instances >= 0 ? instances * x.size(0) : x.size(d);
    STD_TORCH_CHECK(dy_in.size(d) == want, "mipnet_cuda::", op, ": dy", p, " must have ",
                    instances >= 0 ? "N * B rows and the C, H, W of x" + p : "the shape of x" + p,
                    "; size ", dy_in.size(d), " != ", want, " at dim ", d);
  }
  STD_TORCH_CHECK(dy_in.scalar_type() == x.scalar_type(), "mipnet_cuda::", op, ": dy", p, " is ",
                  dtype_name(dy_in.scalar_type()), " but x", p, " is ",
                  dtype_name(x.scalar_type()));
  const bool ok = br.nhwc ? is_channels_last(dy_in) : dy_in.is_contiguous();
  if (ok) return dy_in;
  return torch::stable::contiguous(dy_in, br.nhwc ? MemoryFormat::ChannelsLast
                                                  : MemoryFormat::Contiguous);
}

std::vector<Tensor> instances(const std::vector<Tensor>& xs, const std::vector<Tensor>& w1s,
                              const std::vector<Tensor>& w2s, const std::vector<Tensor>& tables,
                              const char* op, bool grouped) {
  const int32_t dev = lists_device(op, xs, {w1s.size(), w2s.size(), tables.size()});
  torch::stable::accelerator::DeviceGuard guard(dev);
  std::vector<Tensor> ys;
  Launch launch;
  for (size_t i = 0; i < xs.size(); ++i) {
    const std::string p = grouped ? "s[" + std::to_string(i) + "]" : "";
    const Tensor& x = xs[i];
    Branch br{};
    const bool cl = setup_x(br, x, op, "x" + p, dev);
    setup_excite(br, x, w1s[i], w2s[i], op, p, dev);
    const int64_t N = setup_table(br, tables[i], x, op, p, dev);
    Tensor y = alloc_4d(x, N * x.size(0), cl);
    br.out = y.data_ptr();
    launch.add(br, x.scalar_type(), N * br.B * br.C > 0);
    ys.push_back(y);
  }
  launch_all<kInst>(launch, xs[0], dev, op);
  return ys;
}

Tensor mimb_instances_cuda(Tensor x, Tensor w1, Tensor w2, Tensor table) {
  return instances({x}, {w1}, {w2}, {table}, "mimb_instances", false)[0];
}

std::vector<Tensor> mimb_instances_grouped_cuda(std::vector<Tensor> xs, std::vector<Tensor> w1s,
                                                std::vector<Tensor> w2s,
                                                std::vector<Tensor> tables) {
  return instances(xs, w1s, w2s, tables, "mimb_instances_grouped", true);
}

struct BwdOut {
  std::vector<Tensor> dx, dw1, dw2, dv;  // dv: dtable for the instances backward
  void push(const Tensor& dx_, const Tensor& dw1_, const Tensor& dw2_, const Tensor& dv_) {
    dx.push_back(dx_);
    dw1.push_back(dw1_);
    dw2.push_back(dw2_);
    dv.push_back(dv_);
  }
};

// A backward branch's weight-gradient outputs (contiguous, in the dtypes of w1 / w2), wired
// into br.
std::pair<Tensor, Tensor> weight_grad_outputs(Branch& br, const Tensor& w1, const Tensor& w2) {
  Tensor dw1 = torch::stable::new_empty(w1, {w1.size(0), w1.size(1)});
  Tensor dw2 = torch::stable::new_empty(w2, {w2.size(0), w2.size(1)});
  br.dw1 = dw1.data_ptr();
  br.dw2 = dw2.data_ptr();
  br.dw1_dt = dt_code(w1.scalar_type());
  br.dw2_dt = dt_code(w2.scalar_type());
  return {dw1, dw2};
}

BwdOut scale_bwd(const std::vector<Tensor>& dys, const std::vector<Tensor>& xs,
                 const std::vector<Tensor>& w1s, const std::vector<Tensor>& w2s,
                 const std::vector<Tensor>& vs, const std::vector<Tensor>& ss, const char* op,
                 bool grouped) {
  const size_t n = xs.size();
  const int32_t dev =
      lists_device(op, xs, {dys.size(), w1s.size(), w2s.size(), vs.size(), ss.size()});
  torch::stable::accelerator::DeviceGuard guard(dev);
  BwdOut out;
  std::vector<Tensor> keep_dy;  // dy copies in x's layout, alive until the launch
  Launch launch;
  for (size_t i = 0; i < n; ++i) {
    const std::string p = grouped ? "s[" + std::to_string(i) + "]" : "";
    const Tensor& x = xs[i];
    Branch br{};
    const bool cl = setup_x(br, x, op, "x" + p, dev);
    setup_excite(br, x, w1s[i], w2s[i], op, p, dev);
    check_bc(vs[i], x, op, "v" + p, dev);
    check_bc(ss[i], x, op, "s" + p, dev);
    const Tensor dy = kernel_dy(dys[i], x, br, -1, op, p, dev);
    keep_dy.push_back(dy);
    Tensor dx = alloc_4d(x, x.size(0), cl);
    auto [dw1, dw2] = weight_grad_outputs(br, w1s[i], w2s[i]);
    Tensor dv = torch::stable::new_empty(vs[i], {x.size(0), x.size(1)});
    br.dy = dy.data_ptr();
    br.out = dx.data_ptr();
    br.v = as_mat(vs[i]);
    br.s_in = as_mat(ss[i]);
    br.dv = dv.data_ptr();
    br.dv_dt = dt_code(vs[i].scalar_type());
    launch.add(br, x.scalar_type(), static_cast<int64_t>(br.B) * br.C > 0, {dw1, dw2});
    out.push(dx, dw1, dw2, dv);
  }
  launch_all<kBwd>(launch, xs[0], dev, op);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> mimb_scale_bwd_cuda(Tensor dy, Tensor x, Tensor w1,
                                                               Tensor w2, Tensor v, Tensor s) {
  BwdOut o = scale_bwd({dy}, {x}, {w1}, {w2}, {v}, {s}, "mimb_scale_bwd", false);
  return std::make_tuple(o.dx[0], o.dw1[0], o.dw2[0], o.dv[0]);
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
mimb_scale_grouped_bwd_cuda(std::vector<Tensor> dys, std::vector<Tensor> xs,
                            std::vector<Tensor> w1s, std::vector<Tensor> w2s,
                            std::vector<Tensor> vs, std::vector<Tensor> ss) {
  BwdOut o = scale_bwd(dys, xs, w1s, w2s, vs, ss, "mimb_scale_grouped_bwd", true);
  return std::make_tuple(o.dx, o.dw1, o.dw2, o.dv);
}

// mimb_instances_bwd on lists of branches.
BwdOut instances_bwd(const std::vector<Tensor>& dys, const std::vector<Tensor>& xs,
                     const std::vector<Tensor>& w1s, const std::vector<Tensor>& w2s,
                     const std::vector<Tensor>& tables, const char* op, bool grouped) {
  const size_t n = xs.size();
  const int32_t dev = lists_device(op, xs, {dys.size(), w1s.size(), w2s.size(), tables.size()});
  torch::stable::accelerator::DeviceGuard guard(dev);
  BwdOut out;
  std::vector<Tensor> keep_dy;  // dy copies in x's layout, alive until the launch
  Launch launch;
  for (size_t i = 0; i < n; ++i) {
    const std::string p = grouped ? "s[" + std::to_string(i) + "]" : "";
    const Tensor& x = xs[i];
    const Tensor& table = tables[i];
    Branch br{};
    const bool cl = setup_x(br, x, op, "x" + p, dev);
    setup_excite(br, x, w1s[i], w2s[i], op, p, dev);
    const int64_t N = setup_table(br, table, x, op, p, dev);
    const Tensor dy = kernel_dy(dys[i], x, br, N, op, p, dev);
    keep_dy.push_back(dy);
    Tensor dx = alloc_4d(x, x.size(0), cl);
    auto [dw1, dw2] = weight_grad_outputs(br, w1s[i], w2s[i]);
    const bool per_sample = table.dim() == 3;
    Tensor dtable = per_sample ? torch::stable::new_empty(table, {N, x.size(0), x.size(1)})
                               : torch::stable::new_empty(table, {N, x.size(1)});
    br.dy = dy.data_ptr();
    br.out = dx.data_ptr();
    br.dtable = dtable.data_ptr();
    br.dtable_dt = dt_code(table.scalar_type());
    br.dtable_ps = per_sample ? 1 : 0;
    // No instance or no sample: the sums are empty (dx = 0 also for non-finite w1 / w2,
    // where the contract's 0 * w would be NaN; the op layer answers these cases before
    // calling the kernel).
    launch.add(br, x.scalar_type(), N * br.B * br.C > 0, {dx, dw1, dw2, dtable});
    out.push(dx, dw1, dw2, dtable);
  }
  launch_all<kInstBwd>(launch, xs[0], dev, op);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> mimb_instances_bwd_cuda(Tensor dy, Tensor x, Tensor w1,
                                                                   Tensor w2, Tensor table) {
  BwdOut o = instances_bwd({dy}, {x}, {w1}, {w2}, {table}, "mimb_instances_bwd", false);
  return std::make_tuple(o.dx[0], o.dw1[0], o.dw2[0], o.dv[0]);
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
mimb_instances_grouped_bwd_cuda(std::vector<Tensor> dys, std::vector<Tensor> xs,
                                std::vector<Tensor> w1s, std::vector<Tensor> w2s,
                                std::vector<Tensor> tables) {
  BwdOut o = instances_bwd(dys, xs, w1s, w2s, tables, "mimb_instances_grouped_bwd", true);
  return std::make_tuple(o.dx, o.dw1, o.dw2, o.dv);
}

}  // namespace
}  // namespace cuda
}  // namespace mipnet

STABLE_TORCH_LIBRARY_IMPL(mipnet_cuda, CUDA, m) {
  m.impl("mimb_scale_fwd", TORCH_BOX(&mipnet::cuda::mimb_scale_fwd_cuda));
  m.impl("mimb_fwd", TORCH_BOX(&mipnet::cuda::mimb_fwd_cuda));
  m.impl("mimb_scale_bwd", TORCH_BOX(&mipnet::cuda::mimb_scale_bwd_cuda));
  m.impl("mimb_instances", TORCH_BOX(&mipnet::cuda::mimb_instances_cuda));
  m.impl("mimb_scale_grouped_fwd", TORCH_BOX(&mipnet::cuda::mimb_scale_grouped_fwd_cuda));
  m.impl("mimb_scale_grouped_bwd", TORCH_BOX(&mipnet::cuda::mimb_scale_grouped_bwd_cuda));
  m.impl("mimb_instances_grouped", TORCH_BOX(&mipnet::cuda::mimb_instances_grouped_cuda));
  m.impl("mimb_instances_bwd", TORCH_BOX(&mipnet::cuda::mimb_instances_bwd_cuda));
  m.impl("mimb_instances_grouped_bwd",
         TORCH_BOX(&mipnet::cuda::mimb_instances_grouped_bwd_cuda));
}
