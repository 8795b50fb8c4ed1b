// The tiling and index math of the CUDA MIMB kernels (csrc/cuda/mimb_kernel.cu): which block
// reduces which tile of a sample, which elements each thread of the block loads, and which
// thread writes which per-channel partial sum.  Host-and-device code (host_device.h): the
// kernels use these functions, and tests/test_cuda_index_math.py compiles them with plain
// g++ and checks, over a grid of shapes, vector widths and layouts, that every element is
// read exactly once, every channel partial is written exactly once per tile, and every
// index stays within the tensor, the workspace and shared memory.
//
// Geometry (see "tiles" in mimb_kernel.cu).  A sample's [C, HW] map is cut into nct channel
// tiles x nsp pixel splits; one block of kThreads threads per tile.  Thread t is lane
// t % lanes of row t / lanes (rows = kThreads / lanes; threads of a row >= rows idle):
//   NCHW: a row is a channel (ctile = rows channels per tile), its lanes stride over the
//         pixels of the split with vectors of V pixels;
//   NHWC: a lane is a vector of V channels (ctile = lanes * V channels per tile), the rows
//         stride over the pixels of the split.
// Every thread holds at most kRegVecs vectors of its tile (the single-pass kernel keeps the
// tile in registers).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace mipnet {
namespace cuda {
namespace mimb {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // every MIMB block
constexpr int kRegVecs = 8;    // vectors per thread per tile (registers)

MIPNET_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
MIPNET_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
MIPNET_HD int imin(int a, int b) { return a < b ? a : b; }

// The tiling of one branch.  The launcher fills C, HW and nhwc, plan_tiling the rest.
struct Tiling {
  int C, HW;  // channels; pixels per channel (H * W)
  int nhwc;   // 1: channels_last traversal (also used when H * W == 1), 0: NCHW
  int lanes, rows, ctile, nct, nsp, L;  // see above; L: pixels per split (the last: fewer)
};

// Vectors of V elements need 16-byte aligned operands and planes (NCHW: len = HW) or pixel
// rows (NHWC: len = C) a whole number of vectors long; else single elements (V = 1).
MIPNET_HD bool use_vectors(int64_t len, int V, bool aligned) { return aligned && len % V == 0; }

// The tiling: a function of the shape, the layout and the vector width only -- never of the
// device, the path or the other branches of a launch -- so every path and every grouping
// adds the same numbers in the same order.  Each thread gets at most kRegVecs vectors per
// tile, the splits as even as possible; the fewest tiles that allows, so that the
// single-pass kernel fits on the device as often as possible.
MIPNET_HD void plan_tiling(Tiling& g, int V) {
  const int64_t C = g.C, HW = g.HW;
  int64_t per, step;  // vectors per thread over a whole sample; pixels per thread step
  if (!g.nhwc) {
    const int64_t nv = cdiv(HW, V);
    int lanes = 1;  // a power of two <= 32: the shuffle tree of a plane stays in its warp
    while (lanes < kWarp && lanes < nv) lanes *= 2;
    g.lanes = lanes;
    g.rows = kThreads / lanes;
    g.ctile = g.rows;
    g.nct = static_cast<int>(cdiv(C, g.rows));
    per = cdiv(nv, lanes);
    step = static_cast<int64_t>(lanes) * V;
  } else {
    const int64_t nvc = cdiv(C, V);  // vectors per pixel row
    g.nct = static_cast<int>(cdiv(nvc, kThreads));
    g.lanes = static_cast<int>(cdiv(nvc, g.nct));  // <= kThreads, so rows >= 1
    g.rows = kThreads / g.lanes;
    g.ctile = g.lanes * V;  // up to kThreads * V channels: more than there are threads
    per = cdiv(HW, g.rows);
    step = g.rows;
  }
  const int64_t chunk = cdiv(per, cdiv(per, kRegVecs));  // vectors per thread per split
  g.L = static_cast<int>(min64(chunk * step, HW));
  g.nsp = static_cast<int>(cdiv(HW, g.L));
}

struct Tile {
  int b, ct, sp, p0, p1;  // sample, channel tile, split; pixels [p0, p1)
};

// Tile number `local` of the branch (block blockIdx.x - block0): sample-major, then channel
// tile, then split.
MIPNET_HD Tile tile_of(const Tiling& g, int local) {
  Tile t;
  const int per_sample = g.nct * g.nsp;
  t.b = local / per_sample;
  const int r = local - t.b * per_sample;
  t.ct = r / g.nsp;
  t.sp = r - t.ct * g.nsp;
  t.p0 = t.sp * g.L;
  t.p1 = imin(t.p0 + g.L, g.HW);
  return t;
}

// Thread t's vectors in the tile: element offsets (within the sample, element units)
// base + k * step + j for k < n, j < V; all of channel c (NCHW) or of channels c .. c+V-1
// (NHWC); c = -1 and n = 0: none.  lane and row are set for every thread.
struct ThreadMap {
  int64_t base, step;  // int64: base + k * step is in range only for k < n
  int n, c, lane, row;
};

template <int V>
MIPNET_HD ThreadMap thread_map(const Tiling& g, const Tile& tl, int t) {
  ThreadMap m{0, 0, 0, -1, 0, 0};
  m.lane = t % g.lanes;
  m.row = t / g.lanes;
  if (m.row >= g.rows) return m;
  int c, pstart, pstep;
  if (!g.nhwc) {
    c = tl.ct * g.ctile + m.row;
    pstart = tl.p0 + m.lane * V;
    pstep = g.lanes * V;
    if (c >= g.C) return m;
    m.base = static_cast<int64_t>(c) * g.HW + pstart;
    m.step = pstep;
  } else {
    c = tl.ct * g.ctile + m.lane * V;
    pstart = tl.p0 + m.row;
    pstep = g.rows;
    if (c >= g.C) return m;
    m.base = static_cast<int64_t>(pstart) * g.C + c;
    m.step = static_cast<int64_t>(pstep) * g.C;
  }
  m.c = c;
  m.n = pstart < tl.p1 ? (tl.p1 - pstart + pstep - 1) / pstep : 0;  // <= kRegVecs (plan)
  return m;
}

// ------------------------------------------------------------------ partial sums
// Each tile writes one float32 partial per channel of the tile into the workspace
// part[b][sp][c] ([B, nsp, C]); the per-sample sums add the nsp partials in order.

// Workspace index of the partial of channel c in tile tl.
MIPNET_HD int64_t partial_index(const Tiling& g, const Tile& tl, int c) {
  return (static_cast<int64_t>(tl.b) * g.nsp + tl.sp) * g.C + c;
}

// The instances backward reduces N + 1 sums per channel in one pass over a tile (x for s,
// dy_n * x for each instance's g_a[n]): N + 1 planes of the [B, nsp, C] layout, plane j
// ([(N + 1), B, nsp, C] in all) starting at partial_plane(g, B, j).
MIPNET_HD int64_t partial_plane(const Tiling& g, int B, int j) {
  return static_cast<int64_t>(j) * B * g.nsp * g.C;
}

// NCHW: the lanes of a plane reduce their sums with a shuffle tree; lane 0 writes the
// plane's partial.  The channel thread m writes, or -1.
MIPNET_HD int nchw_partial_channel(const ThreadMap& m) { return m.lane == 0 ? m.c : -1; }

// NHWC: every thread stores its V column sums in shared memory, red[row][lane * V + j]
// (rows x ctile floats), and after a barrier the ctile column totals are summed over the
// rows.  A tile has up to kThreads * V channels -- more than threads -- so thread t takes
// the tile's channels i = t, t + kThreads, ... below `end` (channel ct * ctile + i).
struct ChannelRange {
  int first, end, step;
};

MIPNET_HD ChannelRange nhwc_partial_channels(const Tiling& g, const Tile& tl, int t) {
  return ChannelRange{t, imin(g.ctile, g.C - tl.ct * g.ctile), kThreads};
}

// Floats of shared memory the NHWC reduction needs for vectors of up to kVec elements
// (rows * ctile = rows * lanes * V <= kThreads * kVec).
constexpr int reduce_smem_floats(int kVec) { return kThreads * kVec; }

// Index in red of column i of row r.
MIPNET_HD int red_index(const Tiling& g, int r, int i) { return r * g.ctile + i; }

}  // namespace mimb
}  // namespace cuda
}  // namespace mipnet
