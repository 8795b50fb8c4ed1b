// MIPNET_HD: functions compiled both for the device (nvcc) and for the host (plain g++).
//
// The kernels' index and tiling math (mimb_tiling.h, nms_layout.h, decode_layout.h) is
// written once with it, so that the kernels use it and tests/test_cuda_index_math.py can
// compile the very same code on a machine without a GPU or nvcc and check it over a grid
// of shapes.  These headers include nothing from CUDA, torch or the standard library beyond
// <cstdint>.
//
// The definition is token for token the one of csrc/decode.h, so that the two headers can
// be included in any order.
#pragma once

#ifndef MIPNET_HD
#if defined(__CUDACC__)
#define MIPNET_HD __host__ __device__ __forceinline__
#else
#define MIPNET_HD inline
#endif
#endif
