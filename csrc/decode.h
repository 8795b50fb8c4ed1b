// Heatmap decoding math shared by the C++ CPU and the CUDA kernels.
//
// Everything here is per heatmap and templated on a fetch functor `f(y, x) -> float`
// that reads one (already bounds-checked) pixel of the map, so the CPU and CUDA kernels
// differ only in how they scan for the argmax and how they parallelise; the refinement
// formulas exist once.  The specification is the PyTorch reference in
// mipnet_kernels/ops/decode.py; keep the two in step.
//
// Algorithms credited:
//  * quarter offset -- HRNet `get_final_preds` (Sun et al., CVPR 2019);
//  * DARK -- Zhang et al., "Distribution-Aware Coordinate Representation for Human Pose
//    Estimation", CVPR 2020: Gaussian blur, log, one Newton (second-order Taylor) step;
//  * UDP -- Huang et al., "The Devil is in the Details: Delving into Unbiased Data
//    Processing for Human Pose Estimation", CVPR 2020, as MMPose's `post_dark_udp`.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MIPNET_HD __host__ __device__ __forceinline__
#else
#define MIPNET_HD inline
#endif

namespace mipnet {
namespace decode {

enum Mode : int64_t { kArgmax = 0, kQuarter = 1, kDark = 2, kUdp = 3 };

constexpr float kDarkLogFloor = 1e-10f;
// Fast-path threshold: when the original max is > 0 and every blurred sample is >= this,
// the DARK rescale factor c = max(hm) / max(blur) is >= 1 (up to rounding), so c * s never
// reaches the 1e-10 clamp and log(c * s) = log(c) + log(s): log(c) cancels in every
// finite difference and the blurred maximum of the whole map is not needed.
constexpr float kDarkFastFloor = 2e-10f;
constexpr float kUdpClipLo = 0.001f;
constexpr float kUdpClipHi = 50.0f;
constexpr float kUdpEps = 1.1920928955078125e-07f;  // float32 machine epsilon
constexpr int kMaxBlurKernel = 31;

// Round-to-nearest multiply/add with no FMA contraction, so the affine transform gives
// bit-identical results on every backend (nvcc contracts a*b+c into an FMA by default).
MIPNET_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MIPNET_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// sign(d) with sign(NaN) = 0.
MIPNET_HD float sign0(float d) {
  return static_cast<float>(d > 0.0f) - static_cast<float>(d < 0.0f);
}

MIPNET_HD int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// OpenCV BORDER_REFLECT_101 (gfedcb|abcdefgh|gfedcba) for any index and any n >= 1.
MIPNET_HD int reflect101(int i, int n) {
  if (n == 1) return 0;
  const int period = 2 * n - 2;
  i %= period;
  if (i < 0) i += period;
  return i >= n ? period - i : i;
}

// Affine A = [[a0 a1 a2], [a3 a4 a5]] applied to (x, y, 1), in the reference's order.
MIPNET_HD void apply_affine(const float* A, float& x, float& y) {
  const float nx = add_rn(add_rn(mul_rn(A[0], x), mul_rn(A[1], y)), A[2]);
  const float ny = add_rn(add_rn(mul_rn(A[3], x), mul_rn(A[4], y)), A[5]);
  x = nx;
  y = ny;
}

// HRNet's quarter offset at the integer argmax (px, py).
template <class F>
MIPNET_HD void refine_quarter(const F& f, int px, int py, int H, int W, float& x, float& y) {
  if (px > 1 && px < W - 1 && py > 1 && py < H - 1) {
    x += 0.25f * sign0(f(py, px + 1) - f(py, px - 1));
    y += 0.25f * sign0(f(py + 1, px) - f(py - 1, px));
  }
}

// Gaussian blur of the map at (y, x): zero padding (DARK) or reflect-101 (UDP, OpenCV's
// default border).  Row filter first, then the column filter, as OpenCV's separable filter.
template <class F>
MIPNET_HD float blur_zero(const F& f, const float* g, int k, int y, int x, int H, int W) {
  const int r = k / 2;
  float acc = 0.0f;
  for (int i = 0; i < k; ++i) {
    const int yy = y + i - r;
    if (yy < 0 || yy >= H) continue;
    float row = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int xx = x + j - r;
      if (xx >= 0 && xx < W) row += g[j] * f(yy, xx);
    }
    acc += g[i] * row;
  }
  return acc;
}

template <class F>
MIPNET_HD float blur_reflect101(const F& f, const float* g, int k, int y, int x, int H, int W) {
  const int r = k / 2;
  float acc = 0.0f;
  for (int i = 0; i < k; ++i) {
    const int yy = reflect101(y + i - r, H);
    float row = 0.0f;
    for (int j = 0; j < k; ++j) row += g[j] * f(yy, reflect101(x + j - r, W));
    acc += g[i] * row;
  }
  return acc;
}

// ---------------------------------------------------------------------------- DARK
// The 13 points of the DARK Newton step, as (dy, dx) offsets from the argmax.
constexpr int kDarkPoints = 13;
MIPNET_HD int dark_dy(int i) {
  constexpr int dy[kDarkPoints] = {0, 0, 0, 1, -1, 0, 0, 2, -2, 1, -1, 1, -1};
  return dy[i];
}
MIPNET_HD int dark_dx(int i) {
  constexpr int dx[kDarkPoints] = {0, 1, -1, 0, 0, 2, -2, 0, 0, 1, 1, -1, -1};
  return dx[i];
}

MIPNET_HD bool dark_interior(int px, int py, int H, int W) {
  return px > 1 && px < W - 2 && py > 1 && py < H - 2;
}

// Blurred (not yet rescaled) samples s[i] at the 13 points; returns true when the fast
// path applies (every sample >= kDarkFastFloor).
template <class F>
MIPNET_HD bool dark_samples(const F& f, const float* g, int k, int px, int py, int H, int W,
                            float* s) {
  bool fast = true;
  for (int i = 0; i < kDarkPoints; ++i) {
    s[i] = blur_zero(f, g, k, py + dark_dy(i), px + dark_dx(i), H, W);
    fast = fast && (s[i] >= kDarkFastFloor);
  }
  return fast;
}

// Whether v is finite (not NaN, not +-inf), without <cmath> classification (host or device).
MIPNET_HD bool finite(float v) { return v - v == 0.0f; }

// The Newton offset -H^-1 g of DARK and UDP, added to (x, y) only when the Hessian is
// invertible and the offset is finite: an infinite sample (an fp16 map that overflowed to
// +inf at its peak) makes the differences inf - inf = NaN, and such a map keeps its integer
// argmax (as quarter does) -- NaN coordinates only for maps that contain NaN.
MIPNET_HD void newton_offset(float gx, float gy, float hxx, float hyy, float hxy, float& x,
                             float& y) {
  const float det = hxx * hyy - hxy * hxy;
  if (det == 0.0f) return;
  const float ox = -(hyy * gx - hxy * gy) / det;
  const float oy = -(hxx * gy - hxy * gx) / det;
  if (!finite(ox) || !finite(oy)) return;
  x += ox;
  y += oy;
}

// Newton step from the log-samples L[i] (ordered as dark_dy/dark_dx) (newton_offset).
MIPNET_HD void dark_step(const float* L, float& x, float& y) {
  const float dx = 0.5f * (L[1] - L[2]);
  const float dy = 0.5f * (L[3] - L[4]);
  const float dxx = 0.25f * (L[5] - 2.0f * L[0] + L[6]);
  const float dyy = 0.25f * (L[7] - 2.0f * L[0] + L[8]);
  const float dxy = 0.25f * (L[9] - L[10] - L[11] + L[12]);
  newton_offset(dx, dy, dxx, dyy, dxy, x, y);
}

// Log of the samples: fast path (rescale cancels) or exact with the rescale factor c.
MIPNET_HD void dark_log_fast(const float* s, float* L) {
  for (int i = 0; i < kDarkPoints; ++i) L[i] = logf(s[i]);
}
MIPNET_HD void dark_log_rescaled(const float* s, float c, float* L) {
  for (int i = 0; i < kDarkPoints; ++i) L[i] = logf(fmaxf(s[i] * c, kDarkLogFloor));
}

// Serial maximum of the zero-padded blur over the whole map (the exact slow path).
template <class F>
MIPNET_HD float dark_blurred_max_serial(const F& f, const float* g, int k, int H, int W) {
  float m = -INFINITY;
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x) m = fmaxf(m, blur_zero(f, g, k, y, x, H, W));
  return m;
}

// Whether a rescale by c = orig_max / bmax is defined; DarkPose yields NaN otherwise and
// we take no step.
MIPNET_HD bool dark_rescale_valid(float orig_max, float bmax) {
  return orig_max > 0.0f && bmax != 0.0f;
}

// ---------------------------------------------------------------------------- UDP
// MMPose post_dark_udp at (px, py): 7 samples of log(clip(blur_reflect101)) with edge
// padding, Newton step with (H + eps I).  No interior guard.
template <class F>
MIPNET_HD void refine_udp(const F& f, const float* g, int k, int px, int py, int H, int W,
                          float& x, float& y) {
  auto sample = [&](int dy, int dx) {
    const float b = blur_reflect101(f, g, k, clampi(py + dy, 0, H - 1),
                                    clampi(px + dx, 0, W - 1), H, W);
    return logf(fminf(fmaxf(b, kUdpClipLo), kUdpClipHi));
  };
  const float i0 = sample(0, 0);
  const float ix1 = sample(0, 1), ix1_ = sample(0, -1);
  const float iy1 = sample(1, 0), iy1_ = sample(-1, 0);
  const float ix1y1 = sample(1, 1), ix1_y1_ = sample(-1, -1);
  const float dx = 0.5f * (ix1 - ix1_);
  const float dy = 0.5f * (iy1 - iy1_);
  const float hxx = (ix1 - 2.0f * i0 + ix1_) + kUdpEps;
  const float hyy = (iy1 - 2.0f * i0 + iy1_) + kUdpEps;
  const float hxy = 0.5f * (ix1y1 - ix1 - iy1 + i0 + i0 - ix1_ - iy1_ + ix1_y1_);
  newton_offset(dx, dy, hxx, hyy, hxy, x, y);
}

}  // namespace decode
}  // namespace mipnet
