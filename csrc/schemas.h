// Schemas of the private kernel ops, shared by the CPU (`mipnet_cpu`) and CUDA
// (`mipnet_cuda`) registrations so both backends expose exactly the same signature.
//
// The public ops (`torch.ops.mipnet.*`, mipnet_kernels/ops/decode.py) validate the
// arguments, pick a backend and call these.  Contracts (every kernel checks them again):
//
// decode_heatmaps(heatmaps, mode, affine, blur_weights) -> (coords, scores)
//   heatmaps     [B, K, H, W] float32 / float16 / bfloat16, any strides;
//   mode         0 argmax, 1 quarter, 2 dark, 3 udp (mipnet::decode::Mode in decode.h);
//   affine       None or contiguous float32 [B, 2, 3] on the heatmaps' device;
//   blur_weights contiguous float32 1-D Gaussian taps of odd length k <= 31 for dark/udp,
//                empty for argmax/quarter;
//   coords       [B, K, 2] float32 contiguous (x, y) = (column, row);
//   scores       [B, K] float32 contiguous, the heatmap maxima.
//
// flip_merge(heatmaps, flipped, flip_index, shift) -> merged
//   heatmaps, flipped  [B, K, H, W], same dtype (float32 / float16 / bfloat16), any strides;
//   flip_index         int64 [K] permutation on the same device;
//   merged             contiguous, dtype of heatmaps:
//     merged[b,k,y,x] = (float(hm[b,k,y,x]) + float(fl[b,flip_index[k],y,W-1-xs])) * 0.5f
//     with xs = (shift && x >= 1) ? x - 1 : x, rounded once to the dtype.
#pragma once

#define MIPNET_DECODE_HEATMAPS_SCHEMA \
  "decode_heatmaps(Tensor heatmaps, int mode, Tensor? affine, Tensor blur_weights) -> (Tensor, Tensor)"

#define MIPNET_FLIP_MERGE_SCHEMA \
  "flip_merge(Tensor heatmaps, Tensor flipped, Tensor flip_index, bool shift) -> Tensor"

// ---------------------------------------------------------------------------------- MIMB
// Multi-Instance Modulation Block (mipnet_kernels/ops/mimb/: the public functions' docstrings in
// api.py, the kernel tables in kernels.py; ARCHITECTURE.md "MIMB", docs/ops.md "MIMB").
// All arithmetic is float32; small operands may have any float dtype (read as float).
//
// mimb_scale_fwd(x, w1, w2, v) -> (y, s)
//   x   [B, C, H, W] float32 / float16 / bfloat16, contiguous (NCHW) or channels_last;
//   w1  [Cr, C], w2 [C, Cr], v [B, C]: float32 / float16 / bfloat16, any strides;
//   s   [B, C] float32 contiguous: s = mean_hw(x);
//   y   x's shape and dtype, contiguous if x.is_contiguous() else channels_last:
//       y = x * (e * v)[:, :, None, None],  e = sigmoid(w2 @ relu(w1 @ s)) per sample.
//
// mimb_scale_bwd(dy, x, w1, w2, v, s) -> (dx, dw1, dw2, dv)
//   dy  x's shape and dtype (any layout; copied to x's layout when it differs);
//   s   [B, C] the forward's s (any float dtype);
//   dx  x's dtype and memory format (rule of y above); dw1 / dw2 contiguous in the
//       dtypes of w1 / w2; dv [B, C] contiguous in v's dtype.  The weight gradients are
//       summed over the batch in a fixed order (bit-identical for any thread count).
//
// mimb_instances(x, w1, w2, table) -> y
//   table [N, C] (one row per instance) or [N, B, C] (one row per output sample, B =
//   x.size(0): training, where the embedding is BatchNorm'd over all N*B selectors); any
//   float dtype, any strides.  Write t[n, b] = table[n] ([N, C]) or table[n, b] ([N, B, C]).
//   y [N*B, C, H, W] (instance-major), x's dtype and memory format (rule of y above):
//       y[n*B + b] = x[b] * (e[b] * t[n, b])[:, None, None].
//
// mimb_instances_bwd(dy, x, w1, w2, table) -> (dx, dw1, dw2, dtable)
//   dy  [N*B, C, H, W], x's dtype (any layout; copied to x's layout when it differs).
//   The sum over the instances of mimb_scale_bwd(dy[n*B:(n+1)*B], x, w1, w2, v = t[n, :]):
//   dx x's dtype and memory format; dw1 / dw2 contiguous in the dtypes of w1 / w2; dtable
//   contiguous, table's shape and dtype: dtable[n, b] = instance n's dv[b] ([N, B, C]), or
//   its sum over b ([N, C]).  s = mean_hw(x) is computed inside (x is read for it anyway).
//   Sums over n and b in a fixed order (bit-identical for any thread count).
#define MIPNET_MIMB_SCALE_FWD_SCHEMA \
  "mimb_scale_fwd(Tensor x, Tensor w1, Tensor w2, Tensor v) -> (Tensor y, Tensor s)"

#define MIPNET_MIMB_SCALE_BWD_SCHEMA                                                       \
  "mimb_scale_bwd(Tensor dy, Tensor x, Tensor w1, Tensor w2, Tensor v, Tensor s) -> "      \
  "(Tensor dx, Tensor dw1, Tensor dw2, Tensor dv)"

// mimb_fwd(x, lam, w1, w2, e1, b1, e2, b2) -> (y, s)
//   mimb_scale_fwd with the instance embedding computed inside the kernel, per sample in
//   float32:  v = sigmoid(e2 @ relu(e1 @ lam[b] + b1) + b2);
//   lam [B, N], e1 [K, N], b1 [K], e2 [C, K], b2 [C]: float32 / float16 / bfloat16, any
//   strides;  y, s as mimb_scale_fwd.
#define MIPNET_MIMB_FWD_SCHEMA                                                             \
  "mimb_fwd(Tensor x, Tensor lam, Tensor w1, Tensor w2, Tensor e1, Tensor b1, Tensor e2, "  \
  "Tensor b2) -> (Tensor y, Tensor s)"

// mimb_train_fwd(x, lam, w1, w2, e1, b1, gamma, beta, e2, b2, running_mean, running_var,
//                momentum, eps, batch_norm) -> (y, state)     (CPU only)
//   A training step's forward of the official block, the embedding's BatchNorm1d on batch
//   statistics included: z = lam @ e1.T + b1; zn = (z - mean_B) * invstd (biased variance);
//   v = sigmoid(relu(gamma * zn + beta) @ e2.T + b2); y as mimb_scale_fwd.  Updates
//   running_mean / running_var in place (float32 [K], unbiased variance) unless they are
//   empty; batch_norm=false drops the BatchNorm (zn = z; gamma, beta, running unused).
//   state: float32 [B*(3C + Cr + 2K) + (2K if batch_norm)] =
//   [s | v | e | z1 | zn hi | zn lo | invstd hi | invstd lo] (csrc/cpu/mimb_kernel.cpp
//   TrainState), for the backward only; the same layout on every backend
//   (mipnet_kernels/ops/mimb/reference.py pack_state), so any backward reads any forward's.
// mimb_train_bwd(dy, x, lam, w1, w2, e1, gamma, beta, e2, state, batch_norm)
//   -> (dx, dlam, dw1, dw2, de1, db1, dgamma, dbeta, de2, db2), each in its operand's dtype
//   (dgamma / dbeta [0] without the BatchNorm).
#define MIPNET_MIMB_TRAIN_FWD_SCHEMA                                                        \
  "mimb_train_fwd(Tensor x, Tensor lam, Tensor w1, Tensor w2, Tensor e1, Tensor b1, "        \
  "Tensor gamma, Tensor beta, Tensor e2, Tensor b2, Tensor(a!) running_mean, "               \
  "Tensor(b!) running_var, float momentum, float eps, bool batch_norm) -> "                  \
  "(Tensor y, Tensor state)"

#define MIPNET_MIMB_TRAIN_BWD_SCHEMA                                                        \
  "mimb_train_bwd(Tensor dy, Tensor x, Tensor lam, Tensor w1, Tensor w2, Tensor e1, "        \
  "Tensor gamma, Tensor beta, Tensor e2, Tensor state, bool batch_norm) -> (Tensor dx, "     \
  "Tensor dlam, Tensor dw1, Tensor dw2, Tensor de1, Tensor db1, Tensor dgamma, "             \
  "Tensor dbeta, Tensor de2, Tensor db2)"

#define MIPNET_MIMB_INSTANCES_SCHEMA \
  "mimb_instances(Tensor x, Tensor w1, Tensor w2, Tensor table) -> Tensor"

#define MIPNET_MIMB_INSTANCES_BWD_SCHEMA                                                    \
  "mimb_instances_bwd(Tensor dy, Tensor x, Tensor w1, Tensor w2, Tensor table) -> "         \
  "(Tensor dx, Tensor dw1, Tensor dw2, Tensor dtable)"

// Grouped forms (CUDA only; the CPU extension loops over the single ops): the ops above
// on lists of branch tensors (HRNet: different C, H, W; one x dtype per launch), each list
// element with the contract of the single op; all on one device.  The kernel runs up to
// four branches per launch.
#define MIPNET_MIMB_SCALE_GROUPED_FWD_SCHEMA                                                \
  "mimb_scale_grouped_fwd(Tensor[] xs, Tensor[] w1s, Tensor[] w2s, Tensor[] vs) -> "       \
  "(Tensor[] ys, Tensor[] ss)"

#define MIPNET_MIMB_SCALE_GROUPED_BWD_SCHEMA                                                \
  "mimb_scale_grouped_bwd(Tensor[] dys, Tensor[] xs, Tensor[] w1s, Tensor[] w2s, "         \
  "Tensor[] vs, Tensor[] ss) -> (Tensor[] dxs, Tensor[] dw1s, Tensor[] dw2s, Tensor[] dvs)"

#define MIPNET_MIMB_INSTANCES_GROUPED_SCHEMA                                                \
  "mimb_instances_grouped(Tensor[] xs, Tensor[] w1s, Tensor[] w2s, Tensor[] tables) -> "   \
  "Tensor[]"

#define MIPNET_MIMB_INSTANCES_GROUPED_BWD_SCHEMA                                            \
  "mimb_instances_grouped_bwd(Tensor[] dys, Tensor[] xs, Tensor[] w1s, Tensor[] w2s, "     \
  "Tensor[] tables) -> (Tensor[] dxs, Tensor[] dw1s, Tensor[] dw2s, Tensor[] dtables)"

// ------------------------------------------------------------------------------ OKS-NMS
// Greedy OKS-NMS over many images at once (mipnet_kernels/ops/nms.py; ARCHITECTURE.md
// "OKS").  The public op validates, sorts and segments; the kernels see candidates already
// sorted: grouped by image (segments in ascending image order), inside an image by
// descending score, ties by lower original index.
//
// oks_nms_sorted(keypoints, areas, offsets, sigmas, threshold, vis_threshold) -> keep
//   keypoints [M, K, 3] (x, y, score), areas [M], sigmas [K]: all float32 or all float64
//             (OKS computed in that dtype), contiguous;
//   offsets   [I + 1] int64 contiguous, offsets[0] = 0, offsets[I] = M, non-decreasing:
//             image i owns sorted rows offsets[i] .. offsets[i+1]-1;
//   vis_threshold: NaN means "no visibility threshold" (all K joints count); otherwise only
//             joints with both scores > vis_threshold count, and a pair with none has OKS 0;
//   keep      [M] bool in sorted order: visit rows in order, keep a row unless its OKS with
//             an already kept row of the same image is > threshold.
//
// soft_oks_nms_sorted(keypoints, areas, scores, offsets, sigmas, method, threshold,
//                     vis_threshold, score_threshold, max_dets) -> (rank, new_scores)
//   scores [M] same dtype as keypoints; method 0 = gaussian (s * exp(-oks^2 / threshold)),
//   1 = linear (s * (1 - oks) where oks >= threshold); per image, repeatedly pick the
//   remaining row with the highest current score (ties: lower sorted row), rescore the
//   others against it, until max_dets picks (max_dets <= 0: no limit), nothing remains, or
//   the best current score is < score_threshold;
//   rank   [M] int64: the pick number inside the image (0, 1, ...) or -1 if not picked;
//   new_scores [M] scores' dtype: the score at pick time (for rows never picked: their
//   current score when the loop stopped).
#define MIPNET_OKS_NMS_SORTED_SCHEMA                                                        \
  "oks_nms_sorted(Tensor keypoints, Tensor areas, Tensor offsets, Tensor sigmas, "          \
  "float threshold, float vis_threshold) -> Tensor"

#define MIPNET_SOFT_OKS_NMS_SORTED_SCHEMA                                                   \
  "soft_oks_nms_sorted(Tensor keypoints, Tensor areas, Tensor scores, Tensor offsets, "     \
  "Tensor sigmas, int method, float threshold, float vis_threshold, float score_threshold, " \
  "int max_dets) -> (Tensor, Tensor)"
