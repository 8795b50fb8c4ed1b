// Helpers shared by the CUDA kernel translation units (csrc/cuda/*.cu): dtype traits with
// exact float conversions, and host-side stream / launch / device-attribute helpers on
// PyTorch's stable ABI.  Header-only; everything is inline or a template.
//
// (csrc/cuda/decode_kernel.cu predates this header and keeps private copies of the dtype
// traits and host helpers; new kernels use these.)
#pragma once

#ifndef USE_CUDA
#define USE_CUDA 1  // declares the CUDA parts of the stable C shim (the builds define it too)
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/headeronly/util/Exception.h>

#include <atomic>
#include <cstdint>

namespace mipnet {
namespace cuda {
namespace common {

// ------------------------------------------------------------------------ dtypes
// Raw storage + exact conversions (bit manipulation only, so the build's
// __CUDA_NO_HALF_CONVERSIONS__-style macros do not matter).  kVec: elements per 16 bytes.
struct F32 {
  using raw_t = float;
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
};

struct F16 {
  using raw_t = unsigned short;
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(unsigned short v) {
    return __half2float(__ushort_as_half(v));
  }
  __device__ __forceinline__ static unsigned short from_float(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};

struct BF16 {
  using raw_t = unsigned short;
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(unsigned short v) {
    return __uint_as_float(static_cast<unsigned>(v) << 16);
  }
  __device__ __forceinline__ static unsigned short from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

// ------------------------------------------------------------------------ host helpers
// The current CUDA stream of device_index (torch's, so the kernels order with torch ops).
inline cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

// Raises (naming op) if the last kernel launch failed.
inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ",
                  cudaGetErrorString(err));
}

// An integer device attribute, cached per device (attributes never change).
template <cudaDeviceAttr kAttr>
inline int device_attribute(int32_t device_index) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};  // value + 1; 0: not cached yet
  const bool cacheable = device_index >= 0 && device_index < kMaxDevices;
  if (cacheable) {
    const int c = cache[device_index].load(std::memory_order_relaxed);
    if (c > 0) return c - 1;
  }
  int n = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&n, kAttr, device_index);
  STD_TORCH_CHECK(err == cudaSuccess, "mipnet_cuda: cudaDeviceGetAttribute failed: ",
                  cudaGetErrorString(err));
  if (cacheable) cache[device_index].store(n + 1, std::memory_order_relaxed);
  return n;
}

inline int sm_count(int32_t device_index) {
  const int n = device_attribute<cudaDevAttrMultiProcessorCount>(device_index);
  return n < 1 ? 1 : n;
}

}  // namespace common
}  // namespace cuda
}  // namespace mipnet
