// Small host-side helpers shared by the kernel translation units (csrc/cpu/*.cpp, compiled
// by the C++ compiler, and csrc/cuda/*.cu, compiled by nvcc): inline functions only, on
// PyTorch's stable ABI headers, no device code.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <cstdint>

namespace mipnet {
namespace host {

// The dtype's name as torch spells it, for error messages.
inline const char* dtype_name(torch::headeronly::ScalarType t) {
  using torch::headeronly::ScalarType;
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Double: return "float64";
    case ScalarType::Long: return "int64";
    case ScalarType::Int: return "int32";
    case ScalarType::Bool: return "bool";
    default: return "an unsupported dtype";
  }
}

// The floating dtypes the kernels take: float32, float16, bfloat16.
inline bool is_supported_float(torch::headeronly::ScalarType t) {
  using torch::headeronly::ScalarType;
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// CPU kernels: parallelise (OpenMP, torch's intra-op thread count, whatever thread calls
// us) only when there is enough work to pay for waking the thread team.
constexpr int64_t kMinParallelElems = 1 << 15;

// Threads for `items` work items over `elems` elements of memory traffic.  Always 1 in a
// translation unit built without OpenMP (e.g. nvcc's host pass).
inline int num_threads_for(int64_t items, int64_t elems) {
#ifdef _OPENMP
  if (items < 2 || elems < kMinParallelElems) return 1;
  const int64_t n = static_cast<int64_t>(torch::stable::get_num_threads());
  return static_cast<int>(std::max<int64_t>(1, std::min(n, items)));
#else
  (void)items;
  (void)elems;
  return 1;
#endif
}

}  // namespace host
}  // namespace mipnet
