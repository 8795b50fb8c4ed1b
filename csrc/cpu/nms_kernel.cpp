// C++ CPU kernels of batched OKS-NMS (torch.ops.mipnet_cpu.*).
//
//   oks_nms_sorted(keypoints, areas, offsets, sigmas, threshold, vis_threshold) -> keep
//   soft_oks_nms_sorted(keypoints, areas, scores, offsets, sigmas, method, threshold,
//                       vis_threshold, score_threshold, max_dets) -> (rank, new_scores)
//
// Contracts: csrc/schemas.h.  Specification: the PyTorch references in
// mipnet_kernels/ops/nms.py (ARCHITECTURE.md "OKS"), i.e. HRNet's oks_iou / oks_nms /
// soft_oks_nms (lib/nms/nms.py) with MMPose's visibility `&`:
//   oks(i, j) = mean_k exp(-e_k),  e_k = d_k^2 / vars_k / ((a_i + a_j) / 2 + eps) / 2,
//   vars = (2 sigma)^2, eps = 2.220446049250313e-16, the mean over the joints both scored
//   > vis_threshold when one is given (none: OKS 0).  Evaluated in that order, in T.
//
// The op layer has already sorted the rows (by image, then descending score), so an image
// is a contiguous segment and the greedy scan is a walk down it:
//   hard: keep a row unless its OKS with an already kept row of the image is > threshold.
//         The OKS is computed lazily, only against the kept rows (a compact list), and the
//         walk over them stops at the first suppressor -- HRNet's full OKS row per pick
//         becomes ~n * kept / 2 pairs at most, far fewer when most rows are suppressed early;
//         and a pair's sum over joints stops as soon as it cannot reach the threshold
//         (Oks::exceeds: distant pairs cost a few multiplications instead of K exps).
//   soft: each pick rescans the remaining rows (O(picks * n) OKS evaluations, as HRNet).
// Images are independent: OpenMP over images with a dynamic schedule, largest images first
// (real workloads mix thousands of 1-60 candidate images with a few crowded ones).  The
// result does not depend on the thread count.
//
// Arithmetic in T (float or double), scalars (threshold, vis_threshold, score_threshold)
// rounded to T first, as the PyTorch reference compares a tensor with a Python float.
// No FMA (-ffp-contract=off).  Uses only PyTorch's stable ABI.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <vector>

#include "../host_utils.h"

namespace mipnet {
namespace cpu {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using host::dtype_name;

constexpr double kOksEps = 2.220446049250313e-16;  // np.spacing(1)
constexpr double kBoundMargin = 1e-4;  // early-exit margin of Oks::exceeds, on the mean OKS
constexpr double kFar = 8.0;           // Oks::exceeds: a joint with e >= kFar adds <= kFarTerm
constexpr double kFarTerm = 3.36e-4;   // > exp(-8) = 3.3546e-4

// The OKS of pairs of sorted rows.  With a visibility threshold the joints that count are
// those whose scores are both > vis_threshold: a bit per joint and row ([M, W] 64-bit words,
// built once), so a pair's joint set is an AND and its count a popcount.
template <class T>
struct Oks {
  const T* kp;              // [M, K, 3] (x, y, score), sorted rows
  const T* areas;           // [M]
  const T* vars;            // [K] (2 sigma)^2
  const T* inv_vars;        // [K] 1 / vars (the rounded reciprocal: bounds only)
  int64_t K;
  const uint64_t* visible;  // [M, W] "score > vis_threshold" bits, or nullptr: all joints count
  int64_t W;

  int64_t count(int64_t i, int64_t j) const {
    if (visible == nullptr) return K;
    int64_t n = 0;
    for (int64_t w = 0; w < W; ++w) n += __builtin_popcountll(visible[i * W + w] & visible[j * W + w]);
    return n;
  }

  // f(k) for every counted joint k of the pair, ascending, while f returns true.
  template <class F>
  void for_joints(int64_t i, int64_t j, F&& f) const {
    if (visible == nullptr) {
      for (int64_t k = 0; k < K; ++k)
        if (!f(k)) return;
      return;
    }
    for (int64_t w = 0; w < W; ++w) {
      for (uint64_t m = visible[i * W + w] & visible[j * W + w]; m != 0; m &= m - 1)
        if (!f(w * 64 + __builtin_ctzll(m))) return;
    }
  }

  // exp(-e_k) with e_k = d_k^2 / vars_k / s / 2, in HRNet's order of operations.
  T term(const T* a, const T* b, T s, int64_t k) const {
    const T dx = b[3 * k] - a[3 * k];
    const T dy = b[3 * k + 1] - a[3 * k + 1];
    return std::exp(-((dx * dx + dy * dy) / vars[k] / s / T(2)));
  }

  T scale(int64_t i, int64_t j) const { return (areas[i] + areas[j]) / T(2) + T(kOksEps); }

  T operator()(int64_t i, int64_t j) const {
    const int64_t n = count(i, j);
    if (n == 0) return T(0);
    const T* a = kp + i * K * 3;
    const T* b = kp + j * K * 3;
    const T s = scale(i, j);
    T sum = 0;
    for_joints(i, j, [&](int64_t k) {
      sum += term(a, b, s, k);
      return true;
    });
    return sum / T(n);
  }

  // oks(i, j) > thr: the same decision as `operator()(i, j) > thr`, usually much sooner.
  // Every term exp(-e) is <= 1, and <= exp(-kFar) when e >= kFar, so the mean is bounded
  // by the joints seen so far; once the bound is below thr - kBoundMargin the answer is no.
  //   1. without any exp or division: e is bounded from below by d^2 * (1 / vars) *
  //      (1 / 2s) shrunk by 1e-5 (more than the rounding of either form), and joints with
  //      e >= kFar are counted -- distant pairs are rejected after two or three joints;
  //   2. otherwise the exact sum in operator()'s order, stopping when the exact terms so
  //      far plus 1 per joint left fall below the bound.
  // The margin (1e-4 on the mean) dwarfs the rounding of the full mean (~1e-6 in float), so
  // an early "no" is always the full computation's answer; a pair that is not rejected is
  // summed to the end and compared exactly as operator() does.
  bool exceeds(int64_t i, int64_t j, T thr) const {
    const int64_t n = count(i, j);
    if (n == 0) return T(0) > thr;
    const T* a = kp + i * K * 3;
    const T* b = kp + j * K * 3;
    const T s = scale(i, j);
    const T limit = (thr - T(kBoundMargin)) * T(n);
    const T e_scale = T(1) / (T(2) * s) * T(1 - 1e-5);
    int64_t far = 0;
    bool below = false;
    for_joints(i, j, [&](int64_t k) {
      const T dx = b[3 * k] - a[3 * k];
      const T dy = b[3 * k + 1] - a[3 * k + 1];
      if ((dx * dx + dy * dy) * inv_vars[k] * e_scale >= T(kFar)) {
        ++far;
        below = T(n - far) + T(far) * T(kFarTerm) < limit;
      }
      return !below;
    });
    if (below) return false;
    T sum = 0;
    int64_t left = n;
    for_joints(i, j, [&](int64_t k) {
      sum += term(a, b, s, k);
      below = sum + T(--left) < limit;
      return !below;
    });
    return !below && sum / T(n) > thr;
  }
};

// Image ids, largest first (ties by id): the dynamic schedule then balances well.
std::vector<int64_t> images_by_size(const int64_t* off, int64_t I) {
  std::vector<int64_t> ids(I);
  std::iota(ids.begin(), ids.end(), int64_t{0});
  std::stable_sort(ids.begin(), ids.end(), [off](int64_t a, int64_t b) {
    return off[a + 1] - off[a] > off[b + 1] - off[b];
  });
  return ids;
}

// Threads for the images: one unless the pairs of candidates of an image (sum n^2 / 2, the
// most OKS evaluations the scans can need) are enough to pay for waking a thread team --
// on a busy machine a team costs milliseconds when a thread waits for a core.
int threads_for(const int64_t* off, int64_t I) {
  int64_t pairs = 0;
  for (int64_t i = 0; i < I; ++i) pairs += (off[i + 1] - off[i]) * (off[i + 1] - off[i]) / 2;
  return host::num_threads_for(I, pairs);
}

template <class T>
void hard_impl(const Oks<T>& oks, const int64_t* off, int64_t I, T thr, bool* keep) {
  const std::vector<int64_t> ids = images_by_size(off, I);
  const int nt = threads_for(off, I);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<int64_t> kept;  // kept rows of the current image, in visiting order
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < I; ++t) {
      const int64_t img = ids[t];
      kept.clear();
      for (int64_t r = off[img]; r < off[img + 1]; ++r) {
        bool suppressed = false;
        for (const int64_t q : kept) {
          if (oks.exceeds(q, r, thr)) {
            suppressed = true;
            break;
          }
        }
        keep[r] = !suppressed;
        if (!suppressed) kept.push_back(r);
      }
    }
  }
}

// A score times its soft-NMS factor (in [0, 1]).  inf * 0 would be NaN: a fully suppressed
// +inf score becomes 0 and -inf stays -inf (the same rule on every backend; NaN scores,
// refused by the op's checks, stay NaN).
template <class T>
inline T rescale(T s, T f) {
  const T p = s * f;
  return p != p ? (s > T(0) ? T(0) : s) : p;
}

template <class T>
void soft_impl(const Oks<T>& oks, const T* scores, const int64_t* off, int64_t I, int64_t method,
               T thr, T score_thr, int64_t max_dets, int64_t* rank, T* new_scores) {
  const std::vector<int64_t> ids = images_by_size(off, I);
  const int nt = threads_for(off, I);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<int64_t> alive;  // remaining rows, ascending (so ties go to the lower row)
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < I; ++t) {
      const int64_t img = ids[t], lo = off[img], hi = off[img + 1];
      T* cur = new_scores + lo;  // current scores, updated in place; frozen when picked
      std::copy(scores + lo, scores + hi, cur);
      std::fill(rank + lo, rank + hi, int64_t{-1});
      alive.resize(static_cast<size_t>(hi - lo));
      std::iota(alive.begin(), alive.end(), lo);
      const int64_t picks = max_dets > 0 ? std::min(max_dets, hi - lo) : hi - lo;
      for (int64_t p = 0; p < picks; ++p) {
        size_t best = 0;
        for (size_t a = 1; a < alive.size(); ++a)
          if (cur[alive[a] - lo] > cur[alive[best] - lo]) best = a;
        const int64_t b = alive[best];
        if (cur[b - lo] < score_thr) break;
        rank[b] = p;
        alive.erase(alive.begin() + static_cast<std::ptrdiff_t>(best));
        for (const int64_t r : alive) {
          const T o = oks(b, r);
          T& s = cur[r - lo];
          if (method == 0)
            s = rescale(s, std::exp(-(o * o) / thr));
          else if (o >= thr)
            s = rescale(s, T(1) - o);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------- checks
struct Common {
  int64_t M, K, I;
  ScalarType dt;
};

Common check_common(const char* op, const Tensor& keypoints, const Tensor& areas,
                    const Tensor& offsets, const Tensor& sigmas) {
  STD_TORCH_CHECK(keypoints.is_cpu() && areas.is_cpu() && offsets.is_cpu() && sigmas.is_cpu(), op,
                  ": keypoints, areas, offsets and sigmas must be CPU tensors");
  STD_TORCH_CHECK(keypoints.dim() == 3 && keypoints.size(2) == 3 && keypoints.size(1) >= 1, op,
                  ": keypoints must have shape [M, K, 3] with K >= 1");
  const int64_t M = keypoints.size(0), K = keypoints.size(1);
  const ScalarType dt = keypoints.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::Double, op,
                  ": keypoints must be float32 or float64, got ", dtype_name(dt));
  STD_TORCH_CHECK(areas.scalar_type() == dt && sigmas.scalar_type() == dt, op,
                  ": areas and sigmas must have the dtype of keypoints (", dtype_name(dt), ")");
  STD_TORCH_CHECK(areas.dim() == 1 && areas.size(0) == M, op, ": areas must have shape [M] = [", M,
                  "]");
  STD_TORCH_CHECK(sigmas.dim() == 1 && sigmas.size(0) == K, op,
                  ": sigmas must have shape [K] = [", K, "]");
  STD_TORCH_CHECK(offsets.scalar_type() == ScalarType::Long && offsets.dim() == 1 &&
                      offsets.size(0) >= 1,
                  op, ": offsets must be a 1-D int64 tensor [I + 1]");
  STD_TORCH_CHECK(keypoints.is_contiguous() && areas.is_contiguous() && sigmas.is_contiguous() &&
                      offsets.is_contiguous(),
                  op, ": keypoints, areas, sigmas and offsets must be contiguous");
  const int64_t I = offsets.size(0) - 1;
  const int64_t* off = static_cast<const int64_t*>(offsets.data_ptr());
  STD_TORCH_CHECK(off[0] == 0 && off[I] == M, op, ": offsets must start at 0 and end at M = ", M,
                  ", got ", off[0], " and ", off[I]);
  for (int64_t i = 0; i < I; ++i)
    STD_TORCH_CHECK(off[i] <= off[i + 1], op, ": offsets must be non-decreasing (offsets[", i,
                    "] = ", off[i], " > offsets[", i + 1, "] = ", off[i + 1], ")");
  return {M, K, I, dt};
}

// The Oks of the inputs; `vars` ([2, K]: vars, 1 / vars) and `visible` own its arrays.
template <class T>
Oks<T> make_oks(const Tensor& keypoints, const Tensor& areas, const Tensor& sigmas, int64_t M,
                int64_t K, double vis_threshold, std::vector<T>& vars,
                std::vector<uint64_t>& visible) {
  const T* kp = static_cast<const T*>(keypoints.data_ptr());
  const T* sg = static_cast<const T*>(sigmas.data_ptr());
  vars.resize(static_cast<size_t>(2 * K));
  for (int64_t k = 0; k < K; ++k) {
    vars[k] = (sg[k] * T(2)) * (sg[k] * T(2));
    vars[K + k] = T(1) / vars[k];
  }
  const int64_t W = (K + 63) / 64;
  if (!std::isnan(vis_threshold)) {
    const T vis = static_cast<T>(vis_threshold);
    visible.assign(static_cast<size_t>(M * W), 0);
    const int nt = host::num_threads_for(M, M * K);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t r = 0; r < M; ++r)
      for (int64_t k = 0; k < K; ++k)
        if (kp[(r * K + k) * 3 + 2] > vis) visible[r * W + k / 64] |= uint64_t{1} << (k % 64);
  }
  return Oks<T>{kp, static_cast<const T*>(areas.data_ptr()), vars.data(), vars.data() + K, K,
                visible.empty() ? nullptr : visible.data(), W};
}

template <class T>
void run_hard(const Tensor& keypoints, const Tensor& areas, const Tensor& sigmas, const Common& c,
              const int64_t* off, double threshold, double vis_threshold, bool* keep) {
  std::vector<T> vars;
  std::vector<uint64_t> visible;
  const Oks<T> oks = make_oks<T>(keypoints, areas, sigmas, c.M, c.K, vis_threshold, vars, visible);
  hard_impl(oks, off, c.I, static_cast<T>(threshold), keep);
}

template <class T>
void run_soft(const Tensor& keypoints, const Tensor& areas, const Tensor& scores,
              const Tensor& sigmas, const Common& c, const int64_t* off, int64_t method,
              double threshold, double vis_threshold, double score_threshold, int64_t max_dets,
              int64_t* rank, void* new_scores) {
  std::vector<T> vars;
  std::vector<uint64_t> visible;
  const Oks<T> oks = make_oks<T>(keypoints, areas, sigmas, c.M, c.K, vis_threshold, vars, visible);
  soft_impl(oks, static_cast<const T*>(scores.data_ptr()), off, c.I, method,
            static_cast<T>(threshold), static_cast<T>(score_threshold), max_dets, rank,
            static_cast<T*>(new_scores));
}

Tensor oks_nms_sorted_cpu(Tensor keypoints, Tensor areas, Tensor offsets, Tensor sigmas,
                          double threshold, double vis_threshold) {
  const Common c = check_common("mipnet_cpu::oks_nms_sorted", keypoints, areas, offsets, sigmas);
  Tensor keep = torch::stable::new_empty(keypoints, {c.M}, ScalarType::Bool);
  if (c.M == 0) return keep;
  const int64_t* off = static_cast<const int64_t*>(offsets.data_ptr());
  bool* out = static_cast<bool*>(keep.data_ptr());
  if (c.dt == ScalarType::Double)
    run_hard<double>(keypoints, areas, sigmas, c, off, threshold, vis_threshold, out);
  else
    run_hard<float>(keypoints, areas, sigmas, c, off, threshold, vis_threshold, out);
  return keep;
}

std::tuple<Tensor, Tensor> soft_oks_nms_sorted_cpu(Tensor keypoints, Tensor areas, Tensor scores,
                                                   Tensor offsets, Tensor sigmas, int64_t method,
                                                   double threshold, double vis_threshold,
                                                   double score_threshold, int64_t max_dets) {
  const char* op = "mipnet_cpu::soft_oks_nms_sorted";
  const Common c = check_common(op, keypoints, areas, offsets, sigmas);
  STD_TORCH_CHECK(scores.is_cpu() && scores.scalar_type() == c.dt && scores.dim() == 1 &&
                      scores.size(0) == c.M && scores.is_contiguous(),
                  op, ": scores must be a contiguous CPU tensor [M] = [", c.M, "] of dtype ",
                  dtype_name(c.dt));
  STD_TORCH_CHECK(method == 0 || method == 1, op, ": method must be 0 (gaussian) or 1 (linear), got ",
                  method);
  STD_TORCH_CHECK(method == 1 || threshold > 0, op,
                  ": threshold must be > 0 for the gaussian method, got ", threshold);
  Tensor rank = torch::stable::new_empty(keypoints, {c.M}, ScalarType::Long);
  Tensor new_scores = torch::stable::new_empty(keypoints, {c.M}, c.dt);
  if (c.M == 0) return std::make_tuple(rank, new_scores);
  const int64_t* off = static_cast<const int64_t*>(offsets.data_ptr());
  int64_t* rk = static_cast<int64_t*>(rank.data_ptr());
  if (c.dt == ScalarType::Double)
    run_soft<double>(keypoints, areas, scores, sigmas, c, off, method, threshold, vis_threshold,
                     score_threshold, max_dets, rk, new_scores.data_ptr());
  else
    run_soft<float>(keypoints, areas, scores, sigmas, c, off, method, threshold, vis_threshold,
                    score_threshold, max_dets, rk, new_scores.data_ptr());
  return std::make_tuple(rank, new_scores);
}

}  // namespace
}  // namespace cpu
}  // namespace mipnet

STABLE_TORCH_LIBRARY_IMPL(mipnet_cpu, CPU, m) {
  m.impl("oks_nms_sorted", TORCH_BOX(&mipnet::cpu::oks_nms_sorted_cpu));
  m.impl("soft_oks_nms_sorted", TORCH_BOX(&mipnet::cpu::soft_oks_nms_sorted_cpu));
}
