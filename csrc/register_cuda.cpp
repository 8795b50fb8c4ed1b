// Defines the private CUDA op namespace `mipnet_cuda` (torch.ops.mipnet_cuda.*).
//
// Only schemas live here; the kernels and their STABLE_TORCH_LIBRARY_IMPL(mipnet_cuda, CUDA)
// registration are in csrc/cuda/.  Built into mipnet_kernels/_C_cuda only (never the CPU
// extension, which defines `mipnet_cpu` from the same schemas.h), so importing the CPU
// extension never needs a CUDA runtime.  Uses PyTorch's stable ABI only, so one build
// serves torch >= 2.11.

#include <torch/csrc/stable/library.h>

#include "schemas.h"

STABLE_TORCH_LIBRARY(mipnet_cuda, m) {
  m.def(MIPNET_DECODE_HEATMAPS_SCHEMA);
  m.def(MIPNET_FLIP_MERGE_SCHEMA);
  m.def(MIPNET_OKS_NMS_SORTED_SCHEMA);
  m.def(MIPNET_SOFT_OKS_NMS_SORTED_SCHEMA);
  m.def(MIPNET_MIMB_SCALE_FWD_SCHEMA);
  m.def(MIPNET_MIMB_FWD_SCHEMA);
  m.def(MIPNET_MIMB_SCALE_BWD_SCHEMA);
  m.def(MIPNET_MIMB_INSTANCES_SCHEMA);
  m.def(MIPNET_MIMB_INSTANCES_BWD_SCHEMA);
  m.def(MIPNET_MIMB_SCALE_GROUPED_FWD_SCHEMA);
  m.def(MIPNET_MIMB_SCALE_GROUPED_BWD_SCHEMA);
  m.def(MIPNET_MIMB_INSTANCES_GROUPED_SCHEMA);
  m.def(MIPNET_MIMB_INSTANCES_GROUPED_BWD_SCHEMA);
}
