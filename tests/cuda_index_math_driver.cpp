// Host driver of tests/test_cuda_index_math.py: runs the CUDA kernels' index and tiling math
// (csrc/cuda/mimb_tiling.h, nms_layout.h, decode_layout.h -- the very functions the kernels
// call, compiled here by plain g++) over a grid of shapes and checks, by counting, that every
// element is read exactly once, every partial sum and bitmask word is written exactly once,
// and every index stays within the tensor, the workspace and shared memory.
//
//   cuda_index_math_driver mimb C_LIST HW_LIST   (lists: "1-2048" or "255,256,257")
//   cuda_index_math_driver nms N_LIST
//   cuda_index_math_driver greedy
//   cuda_index_math_driver decode
//   cuda_index_math_driver flip
//   cuda_index_math_driver mimb-lost-partials C_LIST HW_LIST
//       the mimb check with the NHWC partial writers of the old kernel (one channel per
//       thread: the channels of a tile past the 256th got none): must fail for C > 256.
//
// Prints the first failures ("FAIL <case>: <what>") and a summary; exit status 1 on any
// failure.  Each case is simulated thread by thread, in the order the kernels' loops run.
#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "mimb_tiling.h"
#include "nms_layout.h"
#include "decode_layout.h"

namespace {

int64_t g_checks = 0, g_failures = 0, g_printed = 0;
int64_t g_case_failures = 0;  // failures of the current case (loops stop early at 30)
std::string g_case;
std::vector<std::string> g_failed_cases;
bool g_lost_partials = false;  // mimb-lost-partials: the defect the check must catch

// Starts a case: the name that failures are reported under.
void begin_case(const std::string& name) {
  g_case = name;
  g_case_failures = 0;
}

// Records a failed check; prints the first three of each case (at most 60 lines in all).
bool expect(bool ok, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
bool expect(bool ok, const char* fmt, ...) {
  ++g_checks;
  if (ok) return true;
  ++g_failures;
  if (g_case_failures++ == 0) g_failed_cases.push_back(g_case);
  if (g_case_failures <= 3 && ++g_printed <= 60) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    std::printf("FAIL %s: %s\n", g_case.c_str(), msg);
  }
  return false;
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[256];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

// "1-4,7,9-10" -> {1, 2, 3, 4, 7, 9, 10}
std::vector<int64_t> parse_list(const char* s) {
  std::vector<int64_t> out;
  std::string str(s);
  size_t pos = 0;
  while (pos <= str.size()) {
    size_t end = str.find(',', pos);
    if (end == std::string::npos) end = str.size();
    const std::string item = str.substr(pos, end - pos);
    const size_t dash = item.find('-', 1);
    if (dash == std::string::npos) {
      out.push_back(std::atoll(item.c_str()));
    } else {
      const int64_t a = std::atoll(item.substr(0, dash).c_str());
      const int64_t b = std::atoll(item.substr(dash + 1).c_str());
      for (int64_t v = a; v <= b; ++v) out.push_back(v);
    }
    pos = end + 1;
  }
  return out;
}

// ================================================================== MIMB
namespace mm = mipnet::cuda::mimb;

template <int V>
void check_mimb_tiling(int B, int C, int HW, int nhwc, int kvec) {
  mm::Tiling g{};
  g.C = C;
  g.HW = HW;
  g.nhwc = nhwc;
  mm::plan_tiling(g, V);
  const int smem_floats = mm::reduce_smem_floats(kvec);

  // The plan itself.
  expect(g.lanes >= 1 && g.rows >= 1 && g.rows * g.lanes <= mm::kThreads,
         "lanes %d x rows %d exceed the %d threads of a block", g.lanes, g.rows, mm::kThreads);
  if (!nhwc)
    expect(g.lanes <= mm::kWarp && (g.lanes & (g.lanes - 1)) == 0,
           "NCHW lanes %d: not a power of two <= 32 (the shuffle tree would leave the warp)",
           g.lanes);
  expect(g.ctile == (nhwc ? g.lanes * V : g.rows), "ctile %d inconsistent", g.ctile);
  expect(static_cast<int64_t>(g.nct) * g.ctile >= C && static_cast<int64_t>(g.nct - 1) * g.ctile < C,
         "nct %d x ctile %d does not cover C = %d tightly", g.nct, g.ctile, C);
  expect(g.L >= 1 && static_cast<int64_t>(g.nsp) * g.L >= HW &&
             static_cast<int64_t>(g.nsp - 1) * g.L < HW,
         "nsp %d x L %d does not cover HW = %d tightly", g.nsp, g.L, HW);

  const int64_t sample = static_cast<int64_t>(C) * HW;
  std::vector<uint8_t> reads(static_cast<size_t>(B * sample), 0);
  std::vector<uint8_t> tile_seen(static_cast<size_t>(B) * g.nct * g.nsp, 0);
  // partials written per (plane, b, sp, c): the instances backward's [planes, B, nsp, C]
  // workspace (plane 0 alone: the other kernels' [B, nsp, C])
  const int planes = 3;  // N = 2 instances: s and g_a[0], g_a[1]
  const int64_t plane_size = static_cast<int64_t>(B) * g.nsp * C;
  std::vector<uint8_t> part(static_cast<size_t>(planes * plane_size), 0);
  std::vector<int> red_writer(static_cast<size_t>(smem_floats));
  const int nblocks = B * g.nct * g.nsp;
  for (int local = 0; local < nblocks && g_case_failures < 30; ++local) {
    const mm::Tile tl = mm::tile_of(g, local);
    if (!expect(tl.b >= 0 && tl.b < B && tl.ct >= 0 && tl.ct < g.nct && tl.sp >= 0 &&
                    tl.sp < g.nsp,
                "block %d -> tile (b=%d, ct=%d, sp=%d) out of range", local, tl.b, tl.ct, tl.sp))
      continue;
    uint8_t& seen = tile_seen[(static_cast<size_t>(tl.b) * g.nct + tl.ct) * g.nsp + tl.sp];
    expect(++seen == 1, "tile (b=%d, ct=%d, sp=%d) taken by two blocks", tl.b, tl.ct, tl.sp);
    expect(tl.p0 >= 0 && tl.p0 < tl.p1 && tl.p1 <= HW, "tile pixels [%d, %d) of HW = %d",
           tl.p0, tl.p1, HW);
    std::fill(red_writer.begin(), red_writer.end(), -1);
    const int c_lo = tl.ct * g.ctile;
    const int c_hi = c_lo + g.ctile < C ? c_lo + g.ctile : C;  // the tile's channels
    std::vector<int> tile_part(static_cast<size_t>(g.ctile), 0);

    for (int t = 0; t < mm::kThreads; ++t) {
      const mm::ThreadMap m = mm::thread_map<V>(g, tl, t);
      expect(m.n >= 0 && m.n <= mm::kRegVecs, "thread %d holds %d vectors (registers: %d)", t,
             m.n, mm::kRegVecs);
      if (m.n > 0) expect(m.c >= c_lo && m.c + (nhwc ? V : 1) <= c_hi,
                          "thread %d: channel %d outside the tile's [%d, %d)", t, m.c, c_lo, c_hi);
      for (int k = 0; k < m.n; ++k) {
        const int64_t off = m.base + k * m.step;
        if (V > 1) expect(off % V == 0, "thread %d: vector %d at offset %lld is not aligned", t,
                          k, static_cast<long long>(off));
        for (int j = 0; j < V; ++j) {
          const int64_t e = off + j;
          if (!expect(e >= 0 && e < sample, "thread %d reads element %lld of a %lld-element sample",
                      t, static_cast<long long>(e), static_cast<long long>(sample)))
            continue;
          const int64_t c = nhwc ? e % C : e / HW, p = nhwc ? e / C : e % HW;
          expect(c == (nhwc ? m.c + j : m.c) && p >= tl.p0 && p < tl.p1,
                 "thread %d: element (c=%lld, p=%lld) is not its channel / the tile's pixels", t,
                 static_cast<long long>(c), static_cast<long long>(p));
          ++reads[static_cast<size_t>(tl.b * sample + e)];
        }
      }
      if (!nhwc) {
        const int c = mm::nchw_partial_channel(m);
        if (c >= 0 && expect(c >= c_lo && c < c_hi, "NCHW partial of channel %d outside the tile", c))
          ++tile_part[c - c_lo];
      } else if (m.row < g.rows) {  // the thread's V column sums into shared memory
        for (int j = 0; j < V; ++j) {
          const int r = mm::red_index(g, m.row, m.lane * V + j);
          if (!expect(r >= 0 && r < smem_floats,
                      "thread %d writes red[%d]; shared memory holds %d floats", t, r,
                      smem_floats))
            continue;
          expect(red_writer[r] < 0, "red[%d] written by threads %d and %d", r, red_writer[r], t);
          red_writer[r] = t;
        }
      }
    }
    if (nhwc) {  // after the barrier: the column totals
      for (int t = 0; t < mm::kThreads; ++t) {
        mm::ChannelRange cr = mm::nhwc_partial_channels(g, tl, t);
        if (g_lost_partials && cr.end > t + 1) cr.end = t + 1;
        for (int i = cr.first; i < cr.end; i += cr.step) {
          if (!expect(i >= 0 && i < g.ctile && c_lo + i < C,
                      "thread %d writes the partial of tile column %d (ctile %d, C %d)", t, i,
                      g.ctile, C))
            continue;
          for (int r = 0; r < g.rows; ++r) {
            const int s = mm::red_index(g, r, i);
            expect(s >= 0 && s < smem_floats && red_writer[s] >= 0,
                   "thread %d reads red[%d] (row %d, column %d), which no thread wrote", t, s, r,
                   i);
          }
          ++tile_part[i];
        }
      }
    }
    for (int i = 0; i < c_hi - c_lo; ++i) {
      expect(tile_part[i] == 1,
             "partial of channel %d in tile (b=%d, ct=%d, sp=%d) written %d times, expected 1",
             c_lo + i, tl.b, tl.ct, tl.sp, tile_part[i]);
      for (int j = 0; j < planes; ++j) {
        const int64_t w = mm::partial_plane(g, B, j) + mm::partial_index(g, tl, c_lo + i);
        if (expect(w >= j * plane_size && w < (j + 1) * plane_size,
                   "partial index %lld outside plane %d of the workspace", static_cast<long long>(w), j))
          part[static_cast<size_t>(w)] += static_cast<uint8_t>(tile_part[i]);
      }
    }
  }
  for (size_t i = 0; i < tile_seen.size() && g_case_failures < 30; ++i)
    expect(tile_seen[i] == 1, "tile %zu taken by %d blocks", i, tile_seen[i]);
  for (size_t i = 0; i < part.size() && g_case_failures < 30; ++i)
    expect(part[i] == 1, "workspace partial (plane, b, sp, c) #%zu written %d times", i, part[i]);
  for (size_t i = 0; i < reads.size() && g_case_failures < 30; ++i)
    expect(reads[i] == 1, "element %zu of x read %d times, expected 1", i, reads[i]);
}

int run_mimb(const std::vector<int64_t>& Cs, const std::vector<int64_t>& HWs) {
  // dtypes by their vector width (float32: 4, float16 / bfloat16: 8), aligned or not; the
  // vector width the launcher would use (mm::use_vectors), each distinct case once.
  const int kvecs[] = {4, 8};
  int cases = 0;
  for (int64_t C : Cs)
    for (int64_t HW : HWs)
      for (int nhwc = 0; nhwc < 2; ++nhwc) {
        if (!nhwc && HW == 1 && C > 1) continue;  // the launcher runs H*W == 1 as NHWC
        int done_v[9] = {0};
        for (int kvec : kvecs)
          for (int aligned = 0; aligned < 2; ++aligned) {
            const int V = mm::use_vectors(nhwc ? C : HW, kvec, aligned != 0) ? kvec : 1;
            if (done_v[V]++) continue;
            begin_case(fmt("mimb C=%lld HW=%lld %s V=%d (kVec %d)", static_cast<long long>(C),
                         static_cast<long long>(HW), nhwc ? "NHWC" : "NCHW", V, kvec));
            const int B = 2;
            if (V == 1) check_mimb_tiling<1>(B, static_cast<int>(C), static_cast<int>(HW), nhwc, kvec);
            else if (V == 4) check_mimb_tiling<4>(B, static_cast<int>(C), static_cast<int>(HW), nhwc, kvec);
            else check_mimb_tiling<8>(B, static_cast<int>(C), static_cast<int>(HW), nhwc, kvec);
            ++cases;
          }
      }
  return cases;
}

// ================================================================== NMS bitmask
namespace nm = mipnet::cuda::nms;

void check_nms_mask(int64_t n, int64_t grid_y) {
  const int64_t nw = nm::mask_words_per_row(n);
  expect(nw <= nm::kMaxScanWords || n > int64_t{nm::kMaxScanWords} * nm::kTile,
         "nw = %lld words per row", static_cast<long long>(nw));
  const int64_t nwords = n * nw;  // the image's slice of the workspace
  std::vector<uint8_t> word_writes(static_cast<size_t>(nwords), 0);
  std::vector<uint8_t> pair(static_cast<size_t>(n * n), 0);
  std::vector<uint8_t> tile_visits(static_cast<size_t>(nw * nw), 0);
  for (int64_t y = 0; y < grid_y; ++y) {           // blockIdx.y
    for (int64_t t = y; t < nw * nw; t += grid_y) {  // the kernel's grid-stride tile loop
      ++tile_visits[static_cast<size_t>(t)];
      const nm::MaskTile tile = nm::mask_tile_of(t, nw);
      expect(tile.rb >= 0 && tile.rb < nw && tile.cb >= 0 && tile.cb < nw, "tile %lld -> (%lld, %lld)",
             static_cast<long long>(t), static_cast<long long>(tile.rb), static_cast<long long>(tile.cb));
      if (!nm::mask_tile_needed(tile)) continue;
      const int64_t r0 = tile.rb * nm::kTile, c0 = tile.cb * nm::kTile;
      std::vector<int> row_seen(nm::kTile, 0), col_seen(nm::kTile, 0);
      for (int tid = 0; tid < nm::kMaskThreads; ++tid) {
        const int lane = tid % nm::kWarp, warp = tid / nm::kWarp;
        for (int q = 0; q < nm::kTileRowsPerThread; ++q) {
          const int tr = nm::mask_tile_row(warp, q);
          if (!expect(tr >= 0 && tr < nm::kTile, "tile row %d", tr)) continue;
          if (lane == 0) ++row_seen[tr];
          const int64_t r = r0 + tr;
          for (int half = 0; half < 2; ++half) {
            const int tc = nm::mask_tile_col(lane, half);
            if (!expect(tc >= 0 && tc < nm::kTile, "tile column %d", tc)) continue;
            if (warp == 0 && q == 0) ++col_seen[tc];
            const int64_t c = c0 + tc;
            // The ballot of half `half` puts lane's bit at tc: the word's bit c % 64.
            expect(tc == c % nm::kTile, "column %lld lands on bit %d", static_cast<long long>(c), tc);
            if (c > r && c < n) ++pair[static_cast<size_t>(r * n + c)];
          }
          if (lane == 0 && r < n) {  // the word store
            const int64_t w = nm::mask_word_index(r, nw, tile.cb);
            if (expect(w >= 0 && w < nwords, "word %lld of %lld", static_cast<long long>(w),
                       static_cast<long long>(nwords)))
              ++word_writes[static_cast<size_t>(w)];
          }
        }
      }
      for (int i = 0; i < nm::kTile; ++i)
        expect(row_seen[i] == 1 && col_seen[i] == 1, "tile row/column %d covered %d/%d times", i,
               row_seen[i], col_seen[i]);
    }
  }
  for (int64_t t = 0; t < nw * nw; ++t)
    expect(tile_visits[static_cast<size_t>(t)] == 1, "tile %lld visited %d times",
           static_cast<long long>(t), tile_visits[static_cast<size_t>(t)]);
  for (int64_t r = 0; r < n && g_case_failures < 30; ++r)
    for (int64_t c = r + 1; c < n; ++c)
      expect(pair[static_cast<size_t>(r * n + c)] == 1, "pair (%lld, %lld) evaluated %d times",
             static_cast<long long>(r), static_cast<long long>(c), pair[static_cast<size_t>(r * n + c)]);
  // The scan reads, per block wb of 64 rows, the diagonal words (r, wb) and, for the kept
  // rows, the words (r, w > wb): every one must have been written exactly once (the
  // workspace is not zeroed), and never a word twice.
  for (int64_t wb = 0; wb < nw; ++wb) {
    const int64_t r0 = wb * nm::kTile;
    const int64_t rows = n - r0 < nm::kTile ? n - r0 : nm::kTile;
    for (int64_t b = 0; b < rows; ++b)
      for (int64_t w = wb; w < nw; ++w) {
        const int64_t i = nm::mask_word_index(r0 + b, nw, w);
        if (expect(i >= 0 && i < nwords, "scan reads word %lld of %lld", static_cast<long long>(i),
                   static_cast<long long>(nwords)))
          expect(word_writes[static_cast<size_t>(i)] == 1,
                 "scan reads word (row %lld, %lld), written %d times", static_cast<long long>(r0 + b),
                 static_cast<long long>(w), word_writes[static_cast<size_t>(i)]);
      }
  }
  for (size_t i = 0; i < word_writes.size(); ++i)
    expect(word_writes[i] <= 1, "word %zu written %d times", i, word_writes[i]);
}

void check_mask_staging() {
  for (int elem : {4, 8}) {
    const int KC = nm::mask_chunk_joints(elem);
    expect(2 * KC * 3 * nm::kTile * elem <= 24 * 1024, "staging of %d joints x %d bytes: %d bytes",
           KC, elem, 2 * KC * 3 * nm::kTile * elem);
    for (int kc = 1; kc <= KC; ++kc) {
      begin_case(fmt("nms mask staging elem=%d kc=%d", elem, kc));
      std::vector<int> seen(static_cast<size_t>(KC * 3 * nm::kTile), 0);
      for (int e = 0; e < nm::kTile * kc * 3; ++e) {
        const nm::StageCoord s = nm::mask_stage_coord(e, kc);
        if (expect(s.r >= 0 && s.r < nm::kTile && s.k >= 0 && s.k < kc && s.c >= 0 && s.c < 3,
                   "e=%d -> (r=%d, k=%d, c=%d)", e, s.r, s.k, s.c))
          ++seen[static_cast<size_t>((s.k * 3 + s.c) * nm::kTile + s.r)];
        expect(s.r * kc * 3 + s.k * 3 + s.c == e, "e=%d is not row-major (r, k, c)", e);
      }
      for (int k = 0; k < kc; ++k)
        for (int c = 0; c < 3; ++c)
          for (int r = 0; r < nm::kTile; ++r)
            expect(seen[static_cast<size_t>((k * 3 + c) * nm::kTile + r)] == 1,
                   "staged (k=%d, c=%d, r=%d) written %d times", k, c, r,
                   seen[static_cast<size_t>((k * 3 + c) * nm::kTile + r)]);
    }
  }
}

int run_nms(const std::vector<int64_t>& ns) {
  int cases = 0;
  for (int64_t n : ns) {
    const int64_t nw = nm::mask_words_per_row(n);
    for (int64_t gy : {int64_t{1}, int64_t{7}, nw * nw + 3}) {
      begin_case(fmt("nms mask n=%lld gridDim.y=%lld", static_cast<long long>(n),
                   static_cast<long long>(gy)));
      check_nms_mask(n, gy);
      ++cases;
    }
  }
  check_mask_staging();
  return cases;
}

int run_greedy() {
  int cases = 0;
  const int64_t Ks[] = {1, 2, 3, 14, 17, 100, 133, 512, 1000, nm::kMaxJoints};
  const int64_t Ms[] = {1, 5, 100, 512, 513, 2047, 3000, 100000};
  const int64_t crossovers[] = {0, 1, 64, 512, 2048, int64_t{1} << 40};
  for (size_t elem : {size_t{4}, size_t{8}})
    for (int64_t K : Ks)
      for (int64_t M : Ms)
        for (int64_t x : crossovers) {
          begin_case(fmt("nms greedy smem K=%lld M=%lld crossover=%lld elem=%zu",
                       static_cast<long long>(K), static_cast<long long>(M),
                       static_cast<long long>(x), elem));
          ++cases;
          const nm::GreedyPlan p = nm::plan_greedy(K, M, x, elem);
          const nm::GreedySmem& s = p.layout;
          expect(s.total <= nm::kSmemLimit, "%zu bytes of shared memory (limit %zu)", s.total,
                 nm::kSmemLimit);
          expect(p.smem_rows >= 0 && p.smem_rows <= nm::kMaxSmemRows && p.smem_rows <= M &&
                     p.stage_rows >= 0 && p.stage_rows <= p.smem_rows,
                 "smem_rows %lld, stage_rows %lld", static_cast<long long>(p.smem_rows),
                 static_cast<long long>(p.stage_rows));
          // Regions in order, 16-aligned, none overlapping the next.
          expect(s.inv_var == 0 && s.inv_var + K * elem <= s.areas &&
                     s.areas + p.smem_rows * elem <= s.staged &&
                     s.staged + 3 * K * p.stage_rows * elem <= s.alive &&
                     s.alive + p.smem_rows <= s.total,
                 "regions overlap: %zu %zu %zu %zu %zu", s.inv_var, s.areas, s.staged, s.alive,
                 s.total);
          expect(s.areas % 16 == 0 && s.staged % 16 == 0 && s.alive % 16 == 0,
                 "regions not 16-aligned");
          // The transposed staging of an image of n <= stage_rows rows stays in its region
          // and fills it once.
          for (int64_t n : {int64_t{1}, p.stage_rows / 2, p.stage_rows}) {
            if (n < 1 || n > p.stage_rows) continue;
            std::vector<uint8_t> seen(static_cast<size_t>(3 * K * n), 0);
            for (int64_t e = 0; e < 3 * K * n; ++e) {
              const int64_t i = nm::greedy_stage_index(e, n, K);
              if (expect(i >= 0 && i < 3 * K * n, "staged index %lld of %lld", static_cast<long long>(i),
                         static_cast<long long>(3 * K * n)))
                ++seen[static_cast<size_t>(i)];
            }
            for (size_t i = 0; i < seen.size(); ++i)
              expect(seen[i] == 1, "staged slot %zu written %d times (n=%lld)", i, seen[i],
                     static_cast<long long>(n));
          }
        }
  return cases;
}

// ================================================================== decode / flip_merge
namespace dl = mipnet::cuda::decode_layout;

int run_decode() {
  int cases = 0;
  // Blocks -> maps.
  for (int B : {1, 2, 7, 48})
    for (int K : {1, 14, 17, 133}) {
      begin_case(fmt("decode blocks B=%d K=%d", B, K));
      ++cases;
      std::vector<int> seen(static_cast<size_t>(B * K), 0);
      for (int map = 0; map < B * K; ++map) {
        const dl::MapIndex m = dl::map_of(map, K);
        if (expect(m.b >= 0 && m.b < B && m.k >= 0 && m.k < K, "block %d -> (%d, %d)", map, m.b, m.k))
          ++seen[static_cast<size_t>(m.b * K + m.k)];
      }
      for (size_t i = 0; i < seen.size(); ++i)
        expect(seen[i] == 1, "map %zu decoded by %d blocks", i, seen[i]);
    }
  // Block sizes.
  for (int64_t HW : {1, 2, 31, 64 * 48, 96 * 72, 256 * 192, 1 << 20})
    for (int64_t elem : {2, 4})
      for (bool flat : {false, true})
        for (int64_t maps : {1, 100, 816, 100000}) {
          begin_case(fmt("decode threads HW=%lld elem=%lld flat=%d maps=%lld", static_cast<long long>(HW),
                       static_cast<long long>(elem), flat ? 1 : 0, static_cast<long long>(maps)));
          ++cases;
          const int t = dl::decode_threads(HW, elem, flat, maps, 132);
          expect(t % dl::kWarp == 0 && t >= dl::kWarp && t <= dl::kMaxThreads &&
                     (maps < 4 * 132 || t <= 128),
                 "%d threads", t);
        }
  // A block's scan of a contiguous map (scan_flat's loops over flat_split) and of a strided
  // one (scan_strided's cursor): every element once, vectors 16-byte aligned.
  std::vector<int64_t> ns;
  for (int n = 1; n <= 70; ++n) ns.push_back(n);
  for (int64_t n : {127, 128, 129, 255, 333, 64 * 48, 96 * 72, 17 * 13}) ns.push_back(n);
  for (int64_t n : ns)
    for (int elem : {2, 4})
      for (int misalign = 0; misalign <= 16; misalign += (misalign == 0 ? 1 : elem)) {
        const int V = 16 / elem;
        const uint64_t addr = 0x10000 + static_cast<uint64_t>(misalign);
        for (int nt : {32, 64, 96, 128, 512}) {
          begin_case(fmt("decode scan_flat n=%lld elem=%d addr%%16=%d threads=%d",
                       static_cast<long long>(n), elem, static_cast<int>(addr % 16), nt));
          ++cases;
          const dl::FlatSplit f = dl::flat_split(addr, static_cast<int>(n), elem, V);
          if (!expect(f.head >= 0 && f.head <= n && f.nvec >= 0 && f.tail == f.head + f.nvec * V &&
                          n - f.tail >= 0 && (n - f.tail < V || addr % elem != 0),
                      "split head %d nvec %d tail %d", f.head, f.nvec, f.tail))
            continue;
          if (addr % elem == 0) expect(f.head < V, "head of %d elements", f.head);
          std::vector<int> seen(static_cast<size_t>(n), 0);
          for (int tid = 0; tid < nt; ++tid) {
            for (int i = tid; i < f.head; i += nt) ++seen[static_cast<size_t>(i)];
            int v = tid;
            auto vec = [&](int vi) {
              const uint64_t a = addr + static_cast<uint64_t>(f.head + vi * V) * elem;
              expect(a % 16 == 0, "vector %d at address %% 16 = %d", vi, static_cast<int>(a % 16));
              for (int e = 0; e < V; ++e) {
                const int i = f.head + vi * V + e;
                if (expect(i >= 0 && i < n, "vector element %d of %lld", i, static_cast<long long>(n)))
                  ++seen[static_cast<size_t>(i)];
              }
            };
            for (; v + 3 * nt < f.nvec; v += 4 * nt)
              for (int u = 0; u < 4; ++u) vec(v + u * nt);
            for (; v < f.nvec; v += nt) vec(v);
            for (int i = f.tail + tid; i < n; i += nt) ++seen[static_cast<size_t>(i)];
          }
          for (int64_t i = 0; i < n; ++i)
            expect(seen[static_cast<size_t>(i)] == 1, "element %lld read %d times",
                   static_cast<long long>(i), seen[static_cast<size_t>(i)]);
        }
      }
  for (int H : {1, 2, 5, 48, 64})
    for (int W : {1, 3, 17, 48, 200})
      for (int nt : {32, 96, 128, 512}) {
        begin_case(fmt("decode scan_strided H=%d W=%d threads=%d", H, W, nt));
        ++cases;
        for (int tid = 0; tid < nt; ++tid) {
          dl::StridedCursor c = dl::strided_cursor(tid, nt, W);
          for (int i = tid; i < H * W; i += nt) {
            expect(c.y == i / W && c.x == i % W && c.y < H, "index %d at (%d, %d)", i, c.y, c.x);
            dl::advance(c, W);
          }
        }
      }
  return cases;
}

int run_flip() {
  int cases = 0;
  struct Shape {
    int B, K, H, W;
  };
  const Shape shapes[] = {{1, 1, 1, 1}, {2, 17, 64, 48}, {3, 14, 5, 7}, {1, 3, 1, 200},
                          {5, 1, 33, 1}, {48, 17, 16, 12}};
  for (const Shape& s : shapes)
    for (unsigned S : {1u, 256u, 3u * 256, 8u * 132 * 256, 1u << 20}) {
      begin_case(fmt("flip_merge B=%d K=%d H=%d W=%d stride=%u", s.B, s.K, s.H, s.W, S));
      ++cases;
      const int64_t N = static_cast<int64_t>(s.B) * s.K * s.H * s.W;
      std::vector<uint8_t> seen(static_cast<size_t>(N), 0);
      const dl::Digits step = dl::flat_digits(S, s.W, s.H, s.K);
      for (unsigned i0 = 0; i0 < S && i0 < N; ++i0) {
        dl::Digits d = dl::flat_digits(i0, s.W, s.H, s.K);
        for (int64_t i = i0; i < N; i += S) {
          const int64_t want = ((d.b * s.K + d.k) * s.H + d.y) * s.W + d.x;
          if (expect(want == i && d.x >= 0 && d.x < s.W && d.y >= 0 && d.y < s.H && d.k >= 0 &&
                         d.k < s.K && d.b < s.B,
                     "index %lld has digits (b=%lld, k=%d, y=%d, x=%d)", static_cast<long long>(i),
                     static_cast<long long>(d.b), d.k, d.y, d.x))
            ++seen[static_cast<size_t>(i)];
          dl::advance(d, step, s.W, s.H, s.K);
        }
      }
      for (int64_t i = 0; i < N; ++i)
        expect(seen[static_cast<size_t>(i)] == 1, "element %lld written %d times",
               static_cast<long long>(i), seen[static_cast<size_t>(i)]);
    }
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s mimb C_LIST HW_LIST | nms N_LIST | greedy | decode | flip\n",
                 argv[0]);
    return 2;
  }
  const std::string what = argv[1];
  int cases = 0;
  if ((what == "mimb" || what == "mimb-lost-partials") && argc == 4) {
    g_lost_partials = what == "mimb-lost-partials";
    cases = run_mimb(parse_list(argv[2]), parse_list(argv[3]));
  } else if (what == "nms" && argc == 3) {
    cases = run_nms(parse_list(argv[2]));
  } else if (what == "greedy") {
    cases = run_greedy();
  } else if (what == "decode") {
    cases = run_decode();
  } else if (what == "flip") {
    cases = run_flip();
  } else {
    std::fprintf(stderr, "unknown command or arguments: %s\n", what.c_str());
    return 2;
  }
  for (size_t i = 0; i < g_failed_cases.size() && i < 100; ++i)
    std::printf("failed case: %s\n", g_failed_cases[i].c_str());
  std::printf("%s: %d cases, %lld checks, %lld failures in %zu cases\n", what.c_str(), cases,
              static_cast<long long>(g_checks), static_cast<long long>(g_failures),
              g_failed_cases.size());
  return g_failures == 0 && cases > 0 ? 0 : 1;
}
