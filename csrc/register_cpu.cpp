// Defines the private CPU op namespace `mipnet_cpu` (torch.ops.mipnet_cpu.*).
//
// Only schemas live here; the kernels and their STABLE_TORCH_LIBRARY_IMPL(mipnet_cpu, CPU)
// registration are in csrc/cpu/.  Built into mipnet_kernels/_C only (never the CUDA
// extension, which defines its own `mipnet_cuda` namespace from the same schemas.h).
// Uses PyTorch's stable ABI only, so one build serves torch >= 2.11.

#include <torch/csrc/stable/library.h>

#include "schemas.h"

STABLE_TORCH_LIBRARY(mipnet_cpu, m) {
  m.def(MIPNET_DECODE_HEATMAPS_SCHEMA);
  m.def(MIPNET_FLIP_MERGE_SCHEMA);
  m.def(MIPNET_MIMB_SCALE_FWD_SCHEMA);
  m.def(MIPNET_MIMB_SCALE_BWD_SCHEMA);
  m.def(MIPNET_MIMB_FWD_SCHEMA);
  m.def(MIPNET_MIMB_INSTANCES_SCHEMA);
  m.def(MIPNET_MIMB_INSTANCES_BWD_SCHEMA);
  m.def(MIPNET_MIMB_TRAIN_FWD_SCHEMA);
  m.def(MIPNET_MIMB_TRAIN_BWD_SCHEMA);
  m.def(MIPNET_OKS_NMS_SORTED_SCHEMA);
  m.def(MIPNET_SOFT_OKS_NMS_SORTED_SCHEMA);
  // The C++ kernels' vector path (csrc/cpu/isa.h): 0 scalar, 1 avx2, 2 avx512.
  m.def("cpu_isa() -> int");
  m.def("cpu_isa_supported(int isa) -> bool");
  m.def("set_cpu_isa(int isa) -> int");
}
