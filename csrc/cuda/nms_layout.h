// The index math of the CUDA OKS-NMS kernels (csrc/cuda/nms_kernel.cu): the bitmask of a
// large image (which block and thread computes which pair, which word and bit holds it,
// which words the scan reads) and the shared-memory plan of the per-image greedy kernel.
// Host-and-device code (host_device.h): the kernels use these functions, and
// tests/test_cuda_index_math.py compiles them with plain g++ and checks that the words
// cover every pair (r, c), r < c < n, exactly once, that every word the scan reads has been
// written, and that every index stays within the workspace and shared memory.
//
// Bitmask (the "Faster R-CNN" GPU NMS layout, as in torchvision's nms_kernel.cu): an image
// of n rows has nw = ceil(n / 64) 64-bit words per row; bit c % 64 of word (r, c / 64), at
// r * nw + c / 64, says OKS(r, c) > threshold, for c > r only.  The words form nw x nw tiles
// of 64 x 64 pairs; tiles below the diagonal are neither computed nor read.
#pragma once

#include <cstddef>
#include <cstdint>

#include "host_device.h"

namespace mipnet {
namespace cuda {
namespace nms {

constexpr int kWarp = 32;
constexpr int kTile = 64;          // rows / columns of a mask tile, bits of a word
constexpr int kMaskThreads = 256;  // 8 warps; each thread 8 rows x 2 columns of a tile
constexpr int kMaskWarps = kMaskThreads / kWarp;
constexpr int kTileRowsPerThread = kTile / kMaskWarps;
// Largest image (in words per row) the scan kernel takes: ceil(n/64) <= 1024, n <= 65536.
constexpr int kMaxScanWords = 1024;
constexpr int kGreedyThreads = 128;
constexpr int kMaxJoints = 1024;          // 1/(2 sigma)^2 table in shared memory
constexpr int64_t kMaxSmemRows = 2048;    // areas + alive flags of an image in shared memory
constexpr size_t kSmemLimit = 48 * 1024;  // dynamic shared memory without opt-in
constexpr size_t kStageBytes = 24 * 1024; // keypoint staging budget of greedy_block_kernel

// ------------------------------------------------------------------ the bitmask
MIPNET_HD int64_t mask_words_per_row(int64_t n) { return (n + kTile - 1) / kTile; }

// Word (r, w) of an image with nw words per row.
MIPNET_HD int64_t mask_word_index(int64_t r, int64_t nw, int64_t w) { return r * nw + w; }

// Tile t (0 <= t < nw * nw, row-major) of the mask: rows 64 rb.., columns 64 cb...
struct MaskTile {
  int64_t rb, cb;
};

MIPNET_HD MaskTile mask_tile_of(int64_t t, int64_t nw) {
  const int64_t rb = t / nw;
  return MaskTile{rb, t - rb * nw};
}

// Whether the tile holds pairs c > r (the scan never reads the tiles below the diagonal).
MIPNET_HD bool mask_tile_needed(const MaskTile& tile) { return tile.cb >= tile.rb; }

// Thread (warp, lane) of a mask block: its q-th row of the tile (q < kTileRowsPerThread,
// so the warps interleave: row warp + 8 q) and its two columns, lane and lane + 32 -- which
// are also the bits of the row's word its ballots set (half 0: the low 32 bits).
MIPNET_HD int mask_tile_row(int warp, int q) { return warp + kMaskWarps * q; }
MIPNET_HD int mask_tile_col(int lane, int half) { return lane + kWarp * half; }

// The mask kernel stages joints k0 .. k0+kc-1 of the tile's 64 rows as [kc][3][64]; the
// block's flat element e (< 64 * kc * 3, consecutive e along a row's joints: coalesced
// reads) is row r, joint k, component c.
struct StageCoord {
  int r, k, c;
};

MIPNET_HD StageCoord mask_stage_coord(int e, int kc) {
  StageCoord s;
  s.r = e / (kc * 3);
  const int rest = e - s.r * (kc * 3);
  s.k = rest / 3;
  s.c = rest - s.k * 3;
  return s;
}

// Joints per staging step of the mask kernel: 24 KiB of shared memory for rows + columns.
MIPNET_HD constexpr int mask_chunk_joints(int elem_size) { return 16 * 4 / elem_size; }

// ------------------------------------------------------------------ greedy kernel
// greedy_block_kernel stages an image's keypoints, read as [n][K][3] (coalesced), into
// shared memory as [K][3][n] (consecutive threads read consecutive words): element e of the
// image goes to index (e % 3K) * n + e / 3K.
MIPNET_HD int64_t greedy_stage_index(int64_t e, int64_t n, int64_t K) {
  const int64_t r = e / (3 * K);
  const int64_t kc = e - r * 3 * K;  // = 3k + c
  return kc * n + r;
}

// Dynamic shared memory of greedy_block_kernel, byte offsets of each region (16-aligned):
// 1/(2 sigma)^2 [K] T | areas [smem_rows] T | staged keypoints [K][3][stage_rows] T |
// alive [smem_rows] bool.
struct GreedySmem {
  size_t inv_var, areas, staged, alive, total;
};

MIPNET_HD size_t align16(size_t v) { return (v + 15) / 16 * 16; }

MIPNET_HD GreedySmem greedy_smem(int64_t K, int64_t smem_rows, int64_t stage_rows, size_t elem) {
  GreedySmem s;
  s.inv_var = 0;
  s.areas = align16(s.inv_var + K * elem);
  s.staged = align16(s.areas + smem_rows * elem);
  s.alive = align16(s.staged + 3 * K * stage_rows * elem);
  s.total = align16(s.alive + smem_rows);
  return s;
}

// The plan of one launch (M rows in all, K <= kMaxJoints joints, elem-byte floats): images
// of up to smem_rows rows keep areas and flags in shared memory, images of up to stage_rows
// rows their keypoints too; the layout fits kSmemLimit.
struct GreedyPlan {
  int64_t smem_rows, stage_rows;
  GreedySmem layout;
};

MIPNET_HD GreedyPlan plan_greedy(int64_t K, int64_t M, int64_t crossover, size_t elem) {
  GreedyPlan p;
  p.smem_rows = crossover < M ? crossover : M;
  if (p.smem_rows > kMaxSmemRows) p.smem_rows = kMaxSmemRows;
  const size_t fixed = greedy_smem(K, p.smem_rows, 0, elem).total;
  const size_t room = kSmemLimit - fixed;  // fixed <= 16 KiB (K) + 18 KiB (2048 rows)
  const size_t budget = room < kStageBytes ? room : kStageBytes;
  p.stage_rows = static_cast<int64_t>(budget / (3 * K * elem + 16));
  if (p.stage_rows > p.smem_rows) p.stage_rows = p.smem_rows;
  p.layout = greedy_smem(K, p.smem_rows, p.stage_rows, elem);
  while (p.layout.total > kSmemLimit && p.stage_rows > 0) {  // alignment padding
    --p.stage_rows;
    p.layout = greedy_smem(K, p.smem_rows, p.stage_rows, elem);
  }
  return p;
}

}  // namespace nms
}  // namespace cuda
}  // namespace mipnet
