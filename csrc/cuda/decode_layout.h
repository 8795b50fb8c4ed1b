// The index math of the CUDA heatmap kernels (csrc/cuda/decode_kernel.cu): which block
// decodes which (b, k) map, how a block's threads split a map's elements, and the
// incremental (b, k, y, x) digits of flip_merge's grid-stride loop.  Host-and-device code
// (host_device.h): the kernels use these functions, and tests/test_cuda_index_math.py
// compiles them with plain g++ and checks that the blocks cover every map once and that
// every thread set reads every element of a map exactly once, within bounds.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace mipnet {
namespace cuda {
namespace decode_layout {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;  // decode block size cap (launch bounds)

// ------------------------------------------------------------------ decode_heatmaps
// One block per (b, k) map, grid = B * K: block `map` decodes sample map / K, joint map % K.
struct MapIndex {
  int b, k;
};

MIPNET_HD MapIndex map_of(int map, int K) {
  const int b = map / K;
  return MapIndex{b, map - b * K};
}

// Threads per decode block: about eight loads per thread (16-byte vectors for flat maps,
// scalars otherwise) in whole warps, at least one warp.  With many maps (>= 4 per SM) the
// block is capped at 128 threads so that every block of the grid is resident at once
// (<= 64 registers by the launch bounds -> 8 such blocks per SM; the benchmark's 816 maps
// need 7 per SM on H100/H200) and the whole tensor is in flight in one wave; with few maps
// larger blocks (up to kMaxThreads) give each map more memory parallelism.
MIPNET_HD int decode_threads(int64_t HW, int64_t elem, bool flat, int64_t maps, int sms) {
  const int64_t loads = flat ? (HW * elem + 15) / 16 : HW;
  const int64_t cap = maps >= 4 * static_cast<int64_t>(sms) ? 128 : kMaxThreads;
  int64_t t = (loads + 7) / 8;
  t = (t + kWarp - 1) / kWarp * kWarp;
  if (t > cap) t = cap;
  if (t < kWarp) t = kWarp;
  return static_cast<int>(t);
}

// A contiguous map of n elements of elem_size bytes at address addr, read with V-element
// (16-byte) vectors: a scalar head of up to V - 1 elements to the first 16-byte boundary,
// nvec vectors, then a scalar tail [tail, n).  A map that is not even element-aligned
// (never produced by torch) is all head.
struct FlatSplit {
  int head, nvec, tail;
};

MIPNET_HD FlatSplit flat_split(uint64_t addr, int n, int elem_size, int V) {
  FlatSplit f;
  if (addr % static_cast<uint64_t>(elem_size) != 0) {
    f.head = n;
  } else {
    f.head = static_cast<int>(((16u - static_cast<unsigned>(addr & 15u)) & 15u) /
                              static_cast<unsigned>(elem_size));
    if (f.head > n) f.head = n;
  }
  f.nvec = (n - f.head) / V;
  f.tail = f.head + f.nvec * V;
  return f;
}

// (y, x) of the flat index i = tid + j * nt of an H x W map, carried from one j to the next
// without a division (scan_strided).
struct StridedCursor {
  int y, x;            // current (y, x)
  int step_y, step_x;  // nt = step_y * W + step_x
};

MIPNET_HD StridedCursor strided_cursor(int tid, int nt, int W) {
  return StridedCursor{tid / W, tid - (tid / W) * W, nt / W, nt - (nt / W) * W};
}

MIPNET_HD void advance(StridedCursor& c, int W) {
  c.x += c.step_x;
  c.y += c.step_y;
  if (c.x >= W) {
    c.x -= W;
    ++c.y;
  }
}

// ------------------------------------------------------------------ flip_merge
// Mixed-radix digits of a flat index i = ((b * K + k) * H + y) * W + x.  The grid-stride
// loop carries the digits of its thread's index and adds the digits of the stride, one
// carry per digit (each digit of the sum stays below twice its radix).  32-bit unsigned
// on entry: the host caps the grid so that the stride and every first index fit.
struct Digits {
  int x, y, k;
  int64_t b;
};

MIPNET_HD Digits flat_digits(unsigned i, int W, int H, int K) {
  const unsigned uW = static_cast<unsigned>(W), uH = static_cast<unsigned>(H),
                 uK = static_cast<unsigned>(K);
  Digits d;
  d.x = static_cast<int>(i % uW);
  i /= uW;
  d.y = static_cast<int>(i % uH);
  i /= uH;
  d.k = static_cast<int>(i % uK);
  d.b = i / uK;
  return d;
}

// d += s (s: the digits of the stride).
MIPNET_HD void advance(Digits& d, const Digits& s, int W, int H, int K) {
  d.x += s.x;
  int c = d.x >= W;
  d.x -= c ? W : 0;
  d.y += s.y + c;
  c = d.y >= H;
  d.y -= c ? H : 0;
  d.k += s.k + c;
  c = d.k >= K;
  d.k -= c ? K : 0;
  d.b += s.b + c;
}

}  // namespace decode_layout
}  // namespace cuda
}  // namespace mipnet
