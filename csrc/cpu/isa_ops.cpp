// torch.ops.mipnet_cpu.cpu_isa / cpu_isa_supported / set_cpu_isa: the C++ kernels' vector
// path (isa.h), read and chosen from Python (mipnet_kernels/_extension.py maps the numbers
// to "scalar" / "avx2" / "avx512" and applies MIPNET_KERNELS_CPU_ISA).  No tensor
// arguments, so the ops are registered for CompositeExplicitAutograd (any dispatch key).
//
// Uses only PyTorch's stable ABI (torch/csrc/stable, torch/headeronly).

#include <torch/csrc/stable/library.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>

#include "isa.h"

namespace mipnet {
namespace cpu {
namespace {

Isa checked_isa(int64_t isa, const char* op) {
  STD_TORCH_CHECK(isa >= 0 && isa < kNumIsas, "mipnet_cpu::", op, ": isa must be 0 (scalar), ",
                  "1 (avx2) or 2 (avx512), got ", isa);
  return static_cast<Isa>(isa);
}

int64_t cpu_isa() { return static_cast<int64_t>(current_isa()); }

bool cpu_isa_supported(int64_t isa) { return isa_supported(checked_isa(isa, "cpu_isa_supported")); }

// Returns the previous path.
int64_t set_cpu_isa(int64_t isa) {
  const Isa want = checked_isa(isa, "set_cpu_isa");
  const int64_t before = cpu_isa();
  STD_TORCH_CHECK(set_isa(want), "mipnet_cpu::set_cpu_isa: the ", isa_name(want),
                  " path is not available here (", isa_supported(Isa::kAvx2) ? "" : "no avx2; ",
                  "the CPU or this build lacks it); the best available is ",
                  isa_name(best_isa()));
  return before;
}

}  // namespace
}  // namespace cpu
}  // namespace mipnet

STABLE_TORCH_LIBRARY_IMPL(mipnet_cpu, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", TORCH_BOX(&mipnet::cpu::cpu_isa));
  m.impl("cpu_isa_supported", TORCH_BOX(&mipnet::cpu::cpu_isa_supported));
  m.impl("set_cpu_isa", TORCH_BOX(&mipnet::cpu::set_cpu_isa));
}
