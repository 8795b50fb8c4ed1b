// CUDA kernels of greedy OKS-NMS and soft OKS-NMS over many images (torch.ops.mipnet_cuda.*).
//
//   oks_nms_sorted(keypoints, areas, offsets, sigmas, threshold, vis_threshold) -> keep
//   soft_oks_nms_sorted(keypoints, areas, scores, offsets, sigmas, method, threshold,
//                       vis_threshold, score_threshold, max_dets) -> (rank, new_scores)
//
// Contracts: csrc/schemas.h (OKS-NMS section; registered in csrc/register_cuda.cpp).  Rows
// are sorted by (image, score descending); image i owns rows offsets[i] .. offsets[i+1]-1.
// OKS (ARCHITECTURE.md, HRNet / MMPose oks_iou), in the inputs' dtype T (float or double):
//   e_k = d_k^2 / (2 sigma_k)^2 / ((area_a + area_b)/2 + eps) / 2,  oks = mean_k exp(-e_k)
// over the joints that count (all, or both scores > vis_threshold; none: oks = 0).
//
// Nothing here copies to the host: every size the launches need comes from the shapes
// (M rows, I images, K joints), so a pipeline stays sync-free and graph-capturable.
//
// ------------------------------------------------------------------ oks_nms_sorted
// Greedy NMS is sequential inside an image; the parallelism is across images and across
// the rows one kept row is compared with.  Up to three launches:
//
// 1. greedy_block_kernel: one block (128 threads) per image.  Images of n <= crossover rows
//    (the real distribution: 1-300 candidates) run the greedy scan here, row-vs-all: for
//    each row i still alive (a shared-memory flag, uniform across the block), every thread
//    computes the OKS of i with its later alive rows j (j = i+1+tid, stride 128) and clears
//    the ones above the threshold; one __syncthreads per KEPT row (suppressed rows cost a
//    shared load).  Rows still alive at the end are exactly the kept rows.  Dynamic shared
//    memory, sized from K and the row tile: 1/(2 sigma)^2 per joint, the image's areas and
//    alive flags (images of up to smem_rows rows), and its keypoints, transposed to
//    [K][3][rows] so that consecutive threads read consecutive words (images of up to
//    stage_rows rows, within kStageBytes); larger images read keypoints (and, above
//    smem_rows, areas and flags: the flags then live in `keep`) from global memory.
//    Images above the crossover reserve a slice of the bitmask workspace (n x ceil(n/64)
//    words, a compare-and-swap on a device counter) and register in a compact list for
//    launches 2 and 3; if the workspace is full (see kMaskWordsPerRow) the block runs the
//    greedy scan itself, with its flags in `keep` -- slower, same answer.
// 2. mask_kernel: the upper triangle of OKS > threshold as 64-bit words (bit c of word
//    (r, w) = OKS(r, 64w + c) > thr, c > r), one 64x64 tile at a time, blocks of 256
//    threads striding over the tiles of a large image (grid: large-image slot x Y).  A
//    thread owns 8 rows x 2 columns; the tile's rows and columns are staged per joint chunk
//    in shared memory ([chunk][3][64], broadcast / consecutive reads); each row's word is
//    two warp ballots.  This is the bitmask technique of the "Faster R-CNN" GPU NMS (as in
//    torchvision's nms_kernel.cu), written here for OKS, with the scan below on the GPU.
// 3. scan_kernel: one warp per large image walks the words in blocks of 64 rows: the
//    diagonal words of the block go to shared memory, lane 0 resolves the 64 rows serially
//    from them (keep a row unless its bit is set; OR in its diagonal word), then every lane
//    ORs the kept rows' words into the removed bits of the words it owns (w % 32 == lane,
//    independent loads).
//
// kCrossover trades the small path's serial kept-long chain per image against the bitmask
// path's n^2/2 OKS evaluations: the GPU benchmark decides it.  Test / benchmark hooks (read
// per call): MIPNET_OKS_NMS_CROSSOVER (rows), MIPNET_OKS_NMS_MASK_WORDS (workspace words per
// row of the batch; 0 sends every large image to the in-block fallback).
//
// ------------------------------------------------------------------ soft_oks_nms_sorted
// soft_nms_kernel: one block (128 threads) per image.  Row j is always handled by thread
// j % 128, so the current scores and ranks live in the outputs without cross-thread
// hazards.  Per pick one pass: mark the pick, rescore the remaining rows against it
// (pivot keypoints: broadcast loads), and reduce the next argmax (larger score, ties: lower
// row; warp shuffles, then the warp winners through shared memory).  Work picks x n x K:
// fine for images of up to a few thousand rows.
//
// Uses only PyTorch's stable ABI and the CUDA runtime (helpers: common.cuh).  No device-side
// asserts: every bound is checked on the host.

#include <cuda_runtime.h>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>

#include "../host_utils.h"
#include "common.cuh"
#include "nms_layout.h"

namespace mipnet {
namespace cuda {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using host::dtype_name;
using common::check_launch;
using common::current_stream;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr double kEps = 2.220446049250313e-16;  // numpy.spacing(1), as HRNet's oks_iou

// Rows above which an image takes the bitmask path; the GPU benchmark decides it.
constexpr int64_t kCrossover = 512;
// Bitmask workspace: this many 64-bit words per row of the batch (M x 16 x 8 bytes).  Every
// image of up to 64 * 16 = 1024 rows always fits (sum n_i ceil(n_i/64) <= 16 M); larger
// ones fit while space lasts, else fall back to the in-block greedy scan.
constexpr int64_t kMaskWordsPerRow = 16;
constexpr int kSoftThreads = 128;
// The bitmask layout, the tiling of the mask kernel and the greedy kernel's shared-memory
// plan: nms_layout.h (host and device; checked on the host by test_cuda_index_math).
using nms::kGreedyThreads;
using nms::kMaskThreads;
using nms::kMaxJoints;
using nms::kMaxScanWords;
using nms::kTile;
using nms::kTileRowsPerThread;
using nms::GreedySmem;

template <class T>
__device__ __forceinline__ T dev_exp(T x);
template <>
__device__ __forceinline__ float dev_exp<float>(float x) {
  return expf(x);
}
template <>
__device__ __forceinline__ double dev_exp<double>(double x) {
  return exp(x);
}

// Keypoint (row, joint, component) of one image through strides: global [rows][K][3] or
// staged [K][3][rows] in shared memory.
template <class T>
struct Rows {
  const T* p;
  int64_t row, joint, comp;
  __device__ __forceinline__ T operator()(int64_t r, int k, int c) const {
    return p[r * row + k * joint + c * comp];
  }
};

template <class T>
struct OksParams {
  const T* inv_var;  // [K] 1 / (2 sigma)^2
  int K;
  T vis;
  bool has_vis;
};

// 1 / ((a + b)/2 + eps) / 2
template <class T>
__device__ __forceinline__ T half_inv_area(T a, T b) {
  return T(0.5) / ((a + b) * T(0.5) + T(kEps));
}

template <class T>
__device__ __forceinline__ T oks_finish(T acc, int cnt, const OksParams<T>& P) {
  if (P.has_vis) return cnt > 0 ? acc / T(cnt) : T(0);
  return acc / T(P.K);
}

// OKS of rows i and j of R.
template <class T>
__device__ T oks_rows(const Rows<T>& R, int64_t i, int64_t j, T hi, const OksParams<T>& P) {
  T acc = T(0);
  int cnt = 0;
  for (int k = 0; k < P.K; ++k) {
    const T dx = R(i, k, 0) - R(j, k, 0);
    const T dy = R(i, k, 1) - R(j, k, 1);
    const T t = dev_exp<T>(-((dx * dx + dy * dy) * P.inv_var[k] * hi));
    if (P.has_vis) {
      if (R(i, k, 2) > P.vis && R(j, k, 2) > P.vis) {
        acc += t;
        ++cnt;
      }
    } else {
      acc += t;
    }
  }
  return oks_finish(acc, cnt, P);
}

// ------------------------------------------------------------------------ kernel 1
// Shared layout: nms::greedy_smem (nms_layout.h).

struct LargeList {
  int* count;                   // [1] images registered
  int* image;                   // [max_large] their ids
  int64_t* base;                // [max_large] their workspace offsets (words)
  unsigned long long* used;     // [1] workspace words reserved
  unsigned long long capacity;  // workspace words
};

// Reserves `need` words of the workspace; returns the offset or -1 when it does not fit.
__device__ int64_t reserve_words(unsigned long long* used, unsigned long long need,
                                 unsigned long long capacity) {
  unsigned long long old = *reinterpret_cast<volatile unsigned long long*>(used);
  while (true) {
    if (need > capacity || old > capacity - need) return -1;
    const unsigned long long seen = atomicCAS(used, old, old + need);
    if (seen == old) return static_cast<int64_t>(old);
    old = seen;
  }
}

template <class T>
__global__ void __launch_bounds__(kGreedyThreads)
    greedy_block_kernel(const T* __restrict__ kp, const T* __restrict__ areas,
                        const int64_t* __restrict__ offsets, const T* __restrict__ sigmas,
                        bool* keep, int K, T threshold, T vis, bool has_vis, int64_t crossover,
                        int64_t smem_rows, int64_t stage_rows, GreedySmem layout,
                        LargeList large) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int s_large;
  const int img = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t start = offsets[img];
  const int64_t n = offsets[img + 1] - start;
  if (n <= 0) return;

  if (n > crossover) {  // bitmask path if the workspace has room
    if (tid == 0) {
      const int64_t words = nms::mask_words_per_row(n);
      int64_t base = -1;
      if (words <= kMaxScanWords)
        base = reserve_words(large.used, static_cast<unsigned long long>(n * words),
                             large.capacity);
      if (base >= 0) {
        const int slot = atomicAdd(large.count, 1);
        large.image[slot] = img;
        large.base[slot] = base;
      }
      s_large = base >= 0;
    }
    __syncthreads();
    if (s_large) return;  // uniform
  }

  T* s_inv_var = reinterpret_cast<T*>(smem + layout.inv_var);
  T* s_areas = reinterpret_cast<T*>(smem + layout.areas);
  T* s_kp = reinterpret_cast<T*>(smem + layout.staged);
  bool* s_alive = reinterpret_cast<bool*>(smem + layout.alive);

  const bool in_smem = n <= smem_rows;
  const bool staged = n <= stage_rows;
  bool* alive = in_smem ? s_alive : keep + start;
  const T* area = in_smem ? s_areas : areas + start;
  const T* g = kp + start * 3 * K;
  const Rows<T> R = staged ? Rows<T>{s_kp, 1, 3 * n, n} : Rows<T>{g, 3 * int64_t{K}, 3, 1};

  for (int k = tid; k < K; k += kGreedyThreads) {
    const T s = sigmas[k];
    s_inv_var[k] = T(1) / (T(4) * s * s);
  }
  for (int64_t j = tid; j < n; j += kGreedyThreads) {
    alive[j] = true;
    if (in_smem) s_areas[j] = areas[start + j];
  }
  if (staged) {  // coalesced reads of [n][K][3], transposed to [K][3][n]
    const int64_t total = n * 3 * K;
    for (int64_t e = tid; e < total; e += kGreedyThreads) {
      s_kp[nms::greedy_stage_index(e, n, K)] = g[e];
    }
  }
  __syncthreads();

  const OksParams<T> P{s_inv_var, K, vis, has_vis};
  for (int64_t i = 0; i < n; ++i) {
    if (!alive[i]) continue;  // the same value in every thread (written before a barrier)
    const T ai = area[i];
    for (int64_t j = i + 1 + tid; j < n; j += kGreedyThreads) {
      if (alive[j] && oks_rows(R, i, j, half_inv_area(ai, area[j]), P) > threshold)
        alive[j] = false;
    }
    __syncthreads();
  }
  if (in_smem)
    for (int64_t j = tid; j < n; j += kGreedyThreads) keep[start + j] = s_alive[j];
}

// ------------------------------------------------------------------------ kernel 2
template <class T>
struct MaskChunk {  // joints per staging step: 24 KiB of shared memory for rows + columns
  static constexpr int kJoints = nms::mask_chunk_joints(static_cast<int>(sizeof(T)));
};

template <class T>
__global__ void __launch_bounds__(kMaskThreads)
    mask_kernel(const T* __restrict__ kp, const T* __restrict__ areas,
                const int64_t* __restrict__ offsets, const T* __restrict__ sigmas,
                const int* __restrict__ large_count, const int* __restrict__ large_image,
                const int64_t* __restrict__ large_base, unsigned long long* __restrict__ ws,
                int K, T threshold, T vis, bool has_vis) {
  constexpr int KC = MaskChunk<T>::kJoints;
  __shared__ T s_row[KC][3][kTile];
  __shared__ T s_col[KC][3][kTile];
  __shared__ T s_inv_var[KC];
  __shared__ T s_area_r[kTile];
  __shared__ T s_area_c[kTile];

  const int slot = blockIdx.x;
  if (slot >= *large_count) return;
  const int img = large_image[slot];
  const int64_t start = offsets[img];
  const int64_t n = offsets[img + 1] - start;
  const int64_t nw = nms::mask_words_per_row(n);
  unsigned long long* words = ws + large_base[slot];
  const T* g = kp + start * 3 * K;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;

  for (int64_t t = blockIdx.y; t < nw * nw; t += gridDim.y) {
    const nms::MaskTile tile = nms::mask_tile_of(t, nw);
    if (!nms::mask_tile_needed(tile)) continue;  // uniform: lower triangle never read
    const int64_t cb = tile.cb;
    const int64_t r0 = tile.rb * kTile, c0 = cb * kTile;
    if (tid < kTile) {
      s_area_r[tid] = r0 + tid < n ? areas[start + r0 + tid] : T(0);
      s_area_c[tid] = c0 + tid < n ? areas[start + c0 + tid] : T(0);
    }
    T acc[kTileRowsPerThread][2];
    int cnt[kTileRowsPerThread][2];
#pragma unroll
    for (int q = 0; q < kTileRowsPerThread; ++q) {
      acc[q][0] = acc[q][1] = T(0);
      cnt[q][0] = cnt[q][1] = 0;
    }
    __syncthreads();  // areas staged; previous tile's readers are done
    T hi[kTileRowsPerThread][2];
#pragma unroll
    for (int q = 0; q < kTileRowsPerThread; ++q) {
      const T ar = s_area_r[nms::mask_tile_row(warp, q)];
      hi[q][0] = half_inv_area(ar, s_area_c[nms::mask_tile_col(lane, 0)]);
      hi[q][1] = half_inv_area(ar, s_area_c[nms::mask_tile_col(lane, 1)]);
    }

    for (int k0 = 0; k0 < K; k0 += KC) {
      const int kc = K - k0 < KC ? K - k0 : KC;
      // Stage joints k0 .. k0+kc-1 of the 64 rows and 64 columns (coalesced along a row).
      for (int e = tid; e < kTile * kc * 3; e += kMaskThreads) {
        const nms::StageCoord sc = nms::mask_stage_coord(e, kc);
        const int r = sc.r, k = sc.k, c = sc.c;
        const int64_t off = static_cast<int64_t>(k0 + k) * 3 + c;
        s_row[k][c][r] = r0 + r < n ? g[(r0 + r) * 3 * K + off] : T(0);
        s_col[k][c][r] = c0 + r < n ? g[(c0 + r) * 3 * K + off] : T(0);
      }
      if (tid < kc) {
        const T s = sigmas[k0 + tid];
        s_inv_var[tid] = T(1) / (T(4) * s * s);
      }
      __syncthreads();
      for (int k = 0; k < kc; ++k) {
        const T iv = s_inv_var[k];
        const int j0 = nms::mask_tile_col(lane, 0), j1 = nms::mask_tile_col(lane, 1);
        const T cx0 = s_col[k][0][j0], cy0 = s_col[k][1][j0], cv0 = s_col[k][2][j0];
        const T cx1 = s_col[k][0][j1], cy1 = s_col[k][1][j1], cv1 = s_col[k][2][j1];
#pragma unroll
        for (int q = 0; q < kTileRowsPerThread; ++q) {
          const int r = nms::mask_tile_row(warp, q);
          const T rx = s_row[k][0][r], ry = s_row[k][1][r], rv = s_row[k][2][r];
          const T dx0 = rx - cx0, dy0 = ry - cy0, dx1 = rx - cx1, dy1 = ry - cy1;
          const T t0 = dev_exp<T>(-((dx0 * dx0 + dy0 * dy0) * iv * hi[q][0]));
          const T t1 = dev_exp<T>(-((dx1 * dx1 + dy1 * dy1) * iv * hi[q][1]));
          if (has_vis) {
            const bool rvis = rv > vis;
            if (rvis && cv0 > vis) {
              acc[q][0] += t0;
              ++cnt[q][0];
            }
            if (rvis && cv1 > vis) {
              acc[q][1] += t1;
              ++cnt[q][1];
            }
          } else {
            acc[q][0] += t0;
            acc[q][1] += t1;
          }
        }
      }
      __syncthreads();  // the chunk is consumed before the next one is staged
    }

    const OksParams<T> P{nullptr, K, vis, has_vis};
#pragma unroll
    for (int q = 0; q < kTileRowsPerThread; ++q) {
      const int64_t r = r0 + nms::mask_tile_row(warp, q);
      const int64_t ca = c0 + nms::mask_tile_col(lane, 0);
      const int64_t cbk = c0 + nms::mask_tile_col(lane, 1);
      const bool b0 = ca > r && ca < n && oks_finish(acc[q][0], cnt[q][0], P) > threshold;
      const bool b1 = cbk > r && cbk < n && oks_finish(acc[q][1], cnt[q][1], P) > threshold;
      const unsigned lo = __ballot_sync(kFullMask, b0);
      const unsigned hi_bits = __ballot_sync(kFullMask, b1);
      if (lane == 0 && r < n)
        words[nms::mask_word_index(r, nw, cb)] = static_cast<unsigned long long>(lo) |
                                                 (static_cast<unsigned long long>(hi_bits) << 32);
    }
  }
}

// ------------------------------------------------------------------------ kernel 3
__global__ void __launch_bounds__(kWarp)
    scan_kernel(const int64_t* __restrict__ offsets, const int* __restrict__ large_count,
                const int* __restrict__ large_image, const int64_t* __restrict__ large_base,
                const unsigned long long* __restrict__ ws, bool* __restrict__ keep) {
  __shared__ unsigned long long s_removed[kMaxScanWords];
  __shared__ unsigned long long s_diag[kTile];
  __shared__ unsigned long long s_kept;
  const int slot = blockIdx.x;
  if (slot >= *large_count) return;
  const int lane = threadIdx.x;
  const int img = large_image[slot];
  const int64_t start = offsets[img];
  const int64_t n = offsets[img + 1] - start;
  const int64_t nw = nms::mask_words_per_row(n);  // <= kMaxScanWords (checked at reservation)
  const unsigned long long* words = ws + large_base[slot];

  for (int64_t w = lane; w < nw; w += kWarp) s_removed[w] = 0ull;
  for (int64_t wb = 0; wb < nw; ++wb) {
    const int64_t r0 = wb * kTile;
    const int rows = n - r0 < kTile ? static_cast<int>(n - r0) : kTile;
    for (int b = lane; b < rows; b += kWarp)
      s_diag[b] = words[nms::mask_word_index(r0 + b, nw, wb)];
    __syncwarp();  // s_diag and s_removed[wb] (owned by lane wb % 32) visible
    if (lane == 0) {
      unsigned long long cur = s_removed[wb], kept = 0ull;
      for (int b = 0; b < rows; ++b) {
        if (!((cur >> b) & 1ull)) {
          kept |= 1ull << b;
          cur |= s_diag[b];
        }
      }
      s_kept = kept;
    }
    __syncwarp();
    const unsigned long long kept = s_kept;
    for (int64_t w = lane; w < nw; w += kWarp) {  // this lane's own words (w % 32 == lane)
      if (w <= wb) continue;  // rows of earlier blocks: decided already
      unsigned long long acc = s_removed[w];
      for (unsigned long long bits = kept; bits; bits &= bits - 1) {
        const int b = __ffsll(static_cast<long long>(bits)) - 1;
        acc |= words[nms::mask_word_index(r0 + b, nw, w)];
      }
      s_removed[w] = acc;
    }
    for (int b = lane; b < rows; b += kWarp) keep[start + r0 + b] = (kept >> b) & 1ull;
    __syncwarp();  // s_diag / s_kept reused by the next block of rows
  }
}

// ------------------------------------------------------------------------ soft NMS
template <class T>
struct Best {
  T v;
  int64_t row;  // -1: none
};

// Larger score wins; equal scores -> lower row; row -1 never wins.
template <class T>
__device__ __forceinline__ void best_merge(Best<T>& a, T v, int64_t row) {
  if (row < 0) return;
  if (a.row < 0 || v > a.v || (v == a.v && row < a.row)) {
    a.v = v;
    a.row = row;
  }
}

// Block argmax; every thread returns the winner.  Two barriers: s_* is reusable on return.
template <class T>
__device__ Best<T> block_best(Best<T> a, T* s_v, int64_t* s_row) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const T ov = __shfl_xor_sync(kFullMask, a.v, off);
    const long long orow = __shfl_xor_sync(kFullMask, static_cast<long long>(a.row), off);
    best_merge(a, ov, static_cast<int64_t>(orow));
  }
  if (lane == 0) {
    s_v[warp] = a.v;
    s_row[warp] = a.row;
  }
  __syncthreads();
  Best<T> b{T(0), -1};
  for (int w = 0; w < kSoftThreads / kWarp; ++w) best_merge(b, s_v[w], s_row[w]);
  __syncthreads();
  return b;
}

// A score times its soft-NMS factor (in [0, 1]); inf * 0 -> 0 for +inf, -inf for -inf
// (csrc/cpu/nms_kernel.cpp rescale: the same rule on every backend).
template <class T>
__device__ __forceinline__ T rescale(T s, T f) {
  const T p = s * f;
  return p != p ? (s > T(0) ? T(0) : s) : p;
}

template <class T>
__global__ void __launch_bounds__(kSoftThreads)
    soft_nms_kernel(const T* __restrict__ kp, const T* __restrict__ areas,
                    const T* __restrict__ scores, const int64_t* __restrict__ offsets,
                    const T* __restrict__ sigmas, int64_t* __restrict__ rank,
                    T* __restrict__ new_scores, int K, int method, T threshold, T vis,
                    bool has_vis, T score_threshold, int64_t max_dets) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ T s_v[kSoftThreads / kWarp];
  __shared__ int64_t s_row[kSoftThreads / kWarp];
  T* s_inv_var = reinterpret_cast<T*>(smem);
  const int tid = threadIdx.x;
  const int64_t start = offsets[blockIdx.x];
  const int64_t n = offsets[blockIdx.x + 1] - start;
  if (n <= 0) return;
  for (int k = tid; k < K; k += kSoftThreads) {
    const T s = sigmas[k];
    s_inv_var[k] = T(1) / (T(4) * s * s);
  }
  const Rows<T> R{kp + start * 3 * K, 3 * int64_t{K}, 3, 1};
  const OksParams<T> P{s_inv_var, K, vis, has_vis};

  Best<T> mine{T(0), -1};
  for (int64_t j = tid; j < n; j += kSoftThreads) {
    const T s = scores[start + j];
    new_scores[start + j] = s;
    rank[start + j] = -1;
    best_merge(mine, s, j);
  }
  Best<T> best = block_best(mine, s_v, s_row);  // its barriers also publish s_inv_var
  int64_t picks = 0;
  while (best.row >= 0 && (max_dets <= 0 || picks < max_dets) && !(best.v < score_threshold)) {
    const int64_t p = best.row;
    const T ap = areas[start + p];
    mine = Best<T>{T(0), -1};
    for (int64_t j = tid; j < n; j += kSoftThreads) {
      if (j == p) {
        rank[start + j] = picks;
        continue;
      }
      if (rank[start + j] >= 0) continue;  // picked earlier (by this same thread)
      const T o = oks_rows(R, p, j, half_inv_area(ap, areas[start + j]), P);
      T s = new_scores[start + j];
      if (method == 0)
        s = rescale(s, dev_exp<T>(-(o * o) / threshold));
      else if (o >= threshold)
        s = rescale(s, T(1) - o);
      new_scores[start + j] = s;
      best_merge(mine, s, j);
    }
    best = block_best(mine, s_v, s_row);
    ++picks;
  }
}

// ------------------------------------------------------------------------ host
int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  STD_TORCH_CHECK(end != v && *end == '\0' && x >= 0, name,
                  " must be a non-negative integer, got '", v, "'");
  return static_cast<int64_t>(x);
}

// The schema's contract; returns (M, K, I).
std::tuple<int64_t, int64_t, int64_t> check_inputs(const char* op, const Tensor& keypoints,
                                                   const Tensor& areas, const Tensor& offsets,
                                                   const Tensor& sigmas, const Tensor* scores) {
  STD_TORCH_CHECK(keypoints.is_cuda(), op, ": keypoints must be a CUDA tensor");
  const int32_t dev = keypoints.get_device_index();
  const ScalarType dt = keypoints.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::Double, op,
                  ": keypoints must be float32 or float64, got ", dtype_name(dt));
  STD_TORCH_CHECK(keypoints.dim() == 3 && keypoints.size(2) == 3, op,
                  ": keypoints must have shape [M, K, 3]");
  const int64_t M = keypoints.size(0), K = keypoints.size(1);
  STD_TORCH_CHECK(K >= 1 && K <= kMaxJoints, op, ": keypoints must have 1 to ", kMaxJoints,
                  " joints, got K = ", K);
  const Tensor* named[] = {&areas, &sigmas, scores};
  const char* names[] = {"areas", "sigmas", "scores"};
  const int64_t lengths[] = {M, K, M};
  for (int i = 0; i < 3; ++i) {
    if (named[i] == nullptr) continue;
    const Tensor& t = *named[i];
    STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == dev, op, ": ", names[i],
                    " must be a CUDA tensor on the device of keypoints (cuda:", dev, ")");
    STD_TORCH_CHECK(t.scalar_type() == dt, op, ": ", names[i], " is ",
                    dtype_name(t.scalar_type()), " but keypoints is ", dtype_name(dt));
    STD_TORCH_CHECK(t.dim() == 1 && t.size(0) == lengths[i], op, ": ", names[i],
                    " must be 1-D of length ", lengths[i]);
    STD_TORCH_CHECK(t.is_contiguous(), op, ": ", names[i], " must be contiguous");
  }
  STD_TORCH_CHECK(keypoints.is_contiguous(), op, ": keypoints must be contiguous");
  STD_TORCH_CHECK(offsets.is_cuda() && offsets.get_device_index() == dev, op,
                  ": offsets must be a CUDA tensor on the device of keypoints (cuda:", dev, ")");
  STD_TORCH_CHECK(offsets.scalar_type() == ScalarType::Long, op, ": offsets must be int64, got ",
                  dtype_name(offsets.scalar_type()));
  STD_TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.is_contiguous(), op,
                  ": offsets must be a non-empty contiguous 1-D tensor [I + 1]");
  const int64_t I = offsets.size(0) - 1;
  STD_TORCH_CHECK(I <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31-1 images");
  return std::make_tuple(M, K, I);
}

template <class T>
void launch_hard(const Tensor& kp, const Tensor& areas, const Tensor& offsets,
                 const Tensor& sigmas, Tensor& keep, int64_t M, int K, int64_t I, T thr, T vis,
                 bool has_vis, int32_t dev, cudaStream_t stream) {
  constexpr const char* kOp = "mipnet_cuda::oks_nms_sorted";
  const int64_t crossover = env_int("MIPNET_OKS_NMS_CROSSOVER", kCrossover);
  const int64_t words_per_row = env_int("MIPNET_OKS_NMS_MASK_WORDS", kMaskWordsPerRow);
  const size_t elem = sizeof(T);

  // Shared memory: areas + flags for images up to smem_rows, keypoints up to stage_rows.
  const nms::GreedyPlan plan = nms::plan_greedy(K, M, crossover, elem);
  const int64_t smem_rows = plan.smem_rows, stage_rows = plan.stage_rows;
  const GreedySmem layout = plan.layout;

  // Large images: at most min(I, M / (crossover + 1)) of them.
  const int64_t max_large = crossover < M ? std::min<int64_t>(I, M / (crossover + 1)) : 0;
  const unsigned long long capacity = static_cast<unsigned long long>(M) *
                                      static_cast<unsigned long long>(words_per_row);
  const bool bitmask = max_large > 0 && capacity > 0;
  Tensor aux = torch::stable::new_empty(offsets, {bitmask ? 2 + 2 * max_large : 2});
  int64_t* aux_p = static_cast<int64_t*>(aux.data_ptr());
  LargeList large{reinterpret_cast<int*>(aux_p), reinterpret_cast<int*>(aux_p + 2),
                  aux_p + 2 + max_large, reinterpret_cast<unsigned long long*>(aux_p + 1),
                  bitmask ? capacity : 0ull};
  // count (low half of aux[0]) and used (aux[1]) start at zero.
  const cudaError_t err = cudaMemsetAsync(aux_p, 0, 2 * sizeof(int64_t), stream);
  STD_TORCH_CHECK(err == cudaSuccess, kOp, ": cudaMemsetAsync failed: ", cudaGetErrorString(err));

  const T* pk = static_cast<const T*>(kp.data_ptr());
  const T* pa = static_cast<const T*>(areas.data_ptr());
  const int64_t* po = static_cast<const int64_t*>(offsets.data_ptr());
  const T* ps = static_cast<const T*>(sigmas.data_ptr());
  bool* pkeep = static_cast<bool*>(keep.data_ptr());
  greedy_block_kernel<T><<<static_cast<unsigned>(I), kGreedyThreads, layout.total, stream>>>(
      pk, pa, po, ps, pkeep, K, thr, vis, has_vis, crossover, smem_rows, stage_rows, layout,
      large);
  check_launch(kOp);
  if (!bitmask) return;

  STD_TORCH_CHECK(max_large <= std::numeric_limits<int32_t>::max(), kOp, ": too many images");
  // Workspace words; int64 storage read as unsigned long long.
  Tensor ws = torch::stable::new_empty(offsets, {static_cast<int64_t>(capacity)});
  auto* pws = reinterpret_cast<unsigned long long*>(ws.data_ptr());
  // Blocks per large image: about 8 blocks per SM over all of them, at most the tiles of
  // the largest possible image.
  const int64_t largest = std::min<int64_t>(M, int64_t{kMaxScanWords} * kTile);
  const int64_t nw_max = nms::mask_words_per_row(largest);
  int64_t y = (8 * int64_t{common::sm_count(dev)} + max_large - 1) / max_large;
  y = std::max<int64_t>(1, std::min<int64_t>({y, nw_max * nw_max, 65535}));
  const dim3 grid(static_cast<unsigned>(max_large), static_cast<unsigned>(y));
  mask_kernel<T><<<grid, kMaskThreads, 0, stream>>>(pk, pa, po, ps, large.count, large.image,
                                                     large.base, pws, K, thr, vis, has_vis);
  check_launch(kOp);
  scan_kernel<<<static_cast<unsigned>(max_large), kWarp, 0, stream>>>(
      po, large.count, large.image, large.base, pws, pkeep);
  check_launch(kOp);
}

Tensor oks_nms_sorted_cuda(Tensor keypoints, Tensor areas, Tensor offsets, Tensor sigmas,
                           double threshold, double vis_threshold) {
  constexpr const char* kOp = "mipnet_cuda::oks_nms_sorted";
  const auto [M, K, I] = check_inputs(kOp, keypoints, areas, offsets, sigmas, nullptr);
  const int32_t dev = keypoints.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor keep = torch::stable::new_empty(keypoints, {M}, ScalarType::Bool);
  if (M == 0 || I == 0) return keep;
  const bool has_vis = !std::isnan(vis_threshold);
  const double vis = has_vis ? vis_threshold : 0.0;
  const cudaStream_t stream = current_stream(dev);
  if (keypoints.scalar_type() == ScalarType::Double)
    launch_hard<double>(keypoints, areas, offsets, sigmas, keep, M, static_cast<int>(K), I,
                        threshold, vis, has_vis, dev, stream);
  else
    launch_hard<float>(keypoints, areas, offsets, sigmas, keep, M, static_cast<int>(K), I,
                       static_cast<float>(threshold), static_cast<float>(vis), has_vis, dev,
                       stream);
  return keep;
}

template <class T>
void launch_soft(const Tensor& kp, const Tensor& areas, const Tensor& scores,
                 const Tensor& offsets, const Tensor& sigmas, Tensor& rank, Tensor& new_scores,
                 int K, int64_t I, int method, T thr, T vis, bool has_vis, T score_thr,
                 int64_t max_dets, cudaStream_t stream) {
  soft_nms_kernel<T><<<static_cast<unsigned>(I), kSoftThreads, K * sizeof(T), stream>>>(
      static_cast<const T*>(kp.data_ptr()), static_cast<const T*>(areas.data_ptr()),
      static_cast<const T*>(scores.data_ptr()), static_cast<const int64_t*>(offsets.data_ptr()),
      static_cast<const T*>(sigmas.data_ptr()), static_cast<int64_t*>(rank.data_ptr()),
      static_cast<T*>(new_scores.data_ptr()), K, method, thr, vis, has_vis, score_thr,
      max_dets);
  check_launch("mipnet_cuda::soft_oks_nms_sorted");
}

std::tuple<Tensor, Tensor> soft_oks_nms_sorted_cuda(Tensor keypoints, Tensor areas,
                                                    Tensor scores, Tensor offsets, Tensor sigmas,
                                                    int64_t method, double threshold,
                                                    double vis_threshold,
                                                    double score_threshold, int64_t max_dets) {
  constexpr const char* kOp = "mipnet_cuda::soft_oks_nms_sorted";
  const auto [M, K, I] = check_inputs(kOp, keypoints, areas, offsets, sigmas, &scores);
  STD_TORCH_CHECK(method == 0 || method == 1, kOp,
                  ": method must be 0 (gaussian) or 1 (linear), got ", method);
  STD_TORCH_CHECK(method == 1 || threshold > 0, kOp,
                  ": threshold (the gaussian's sigma) must be > 0, got ", threshold);
  const int32_t dev = keypoints.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor rank = torch::stable::new_empty(keypoints, {M}, ScalarType::Long);
  Tensor new_scores = torch::stable::new_empty(scores, {M});
  if (M == 0 || I == 0) return std::make_tuple(rank, new_scores);
  const bool has_vis = !std::isnan(vis_threshold);
  const double vis = has_vis ? vis_threshold : 0.0;
  const cudaStream_t stream = current_stream(dev);
  const int m = static_cast<int>(method);
  if (keypoints.scalar_type() == ScalarType::Double)
    launch_soft<double>(keypoints, areas, scores, offsets, sigmas, rank, new_scores,
                        static_cast<int>(K), I, m, threshold, vis, has_vis, score_threshold,
                        max_dets, stream);
  else
    launch_soft<float>(keypoints, areas, scores, offsets, sigmas, rank, new_scores,
                       static_cast<int>(K), I, m, static_cast<float>(threshold),
                       static_cast<float>(vis), has_vis, static_cast<float>(score_threshold),
                       max_dets, stream);
  return std::make_tuple(rank, new_scores);
}

}  // namespace
}  // namespace cuda
}  // namespace mipnet

STABLE_TORCH_LIBRARY_IMPL(mipnet_cuda, CUDA, m) {
  m.impl("oks_nms_sorted", TORCH_BOX(&mipnet::cuda::oks_nms_sorted_cuda));
  m.impl("soft_oks_nms_sorted", TORCH_BOX(&mipnet::cuda::soft_oks_nms_sorted_cuda));
}
