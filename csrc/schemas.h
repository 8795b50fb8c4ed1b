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
