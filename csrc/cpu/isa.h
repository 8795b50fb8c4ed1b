// Run-time instruction-set dispatch shared by the CPU kernels (mimb_kernel.cpp,
// decode_kernel.cpp).
//
// The pattern: a kernel's hot loops live in a body header with no include guard, included
// once per instruction set, each time inside its own namespace nested in the includer's
// anonymous namespace (isa_base, isa_avx2, isa_avx512, ...), so every ISA-specific body has
// internal linkage and a distinct name: the linker can never merge an AVX2 body into the
// baseline path (no ODR hazard).  The AVX2 copies are compiled inside
//   MIPNET_ISA_AVX2_BEGIN ... MIPNET_ISA_END
// (a target("avx2,f16c") region) and the AVX-512 ones inside MIPNET_ISA_AVX512_BEGIN
// (avx512f/bw/vl/dq + avx2/f16c), defined only where MIPNET_ISA_DISPATCH_AVX2 is 1: x86-64
// GCC / Clang builds whose baseline is below AVX2.  Builds that already target AVX2
// (MIPNET_ISA_NATIVE_AVX2) compile only the AVX2 variant; other targets only the baseline.
//
// The path in use is one process-wide setting, Isa (scalar | avx2 | avx512): the best the
// CPU supports unless set_cpu_isa() chose another (torch.ops.mipnet_cpu.set_cpu_isa; the
// Python side applies MIPNET_KERNELS_CPU_ISA and mipnet_kernels.set_cpu_isa()).  Kernels
// read it on every call (one relaxed atomic load), so tests run every path in one process.
// "scalar" is the build's baseline ISA with no run-time-dispatched extension (4-lane SSE2
// vectors on x86-64, NEON on aarch64).  What each path means per kernel, and which results
// are bit-identical across paths, is said where the kernel picks its variant.
#pragma once

#include <atomic>
#include <cstdlib>

#if defined(__AVX2__)
#define MIPNET_ISA_NATIVE_AVX2 1
#define MIPNET_ISA_DISPATCH_AVX2 0
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MIPNET_ISA_NATIVE_AVX2 0
#define MIPNET_ISA_DISPATCH_AVX2 1
#else
#define MIPNET_ISA_NATIVE_AVX2 0
#define MIPNET_ISA_DISPATCH_AVX2 0
#endif

// AVX512-BF16 (vcvtneps2bf16) regions need GCC >= 10 or Clang >= 9.
#if MIPNET_ISA_DISPATCH_AVX2 && \
    ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10))
#define MIPNET_ISA_DISPATCH_AVX512BF16 1
#else
#define MIPNET_ISA_DISPATCH_AVX512BF16 0
#endif

#if MIPNET_ISA_DISPATCH_AVX2
#if defined(__clang__)
#define MIPNET_ISA_AVX2_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,f16c\"))), apply_to = function)")
#define MIPNET_ISA_AVX512BF16_BEGIN                                                           \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,f16c,avx512f,avx512vl,"        \
          "avx512dq,avx512bf16\"))), apply_to = function)")
#define MIPNET_ISA_AVX512_BEGIN                                                             \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,f16c,avx512f,avx512bw,"      \
          "avx512vl,avx512dq\"))), apply_to = function)")
#define MIPNET_ISA_END _Pragma("clang attribute pop")
#else
#define MIPNET_ISA_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,f16c\")")
#define MIPNET_ISA_AVX512BF16_BEGIN \
  _Pragma("GCC push_options")       \
      _Pragma("GCC target(\"avx2,f16c,avx512f,avx512vl,avx512dq,avx512bf16\")")
#define MIPNET_ISA_AVX512_BEGIN \
  _Pragma("GCC push_options")   \
      _Pragma("GCC target(\"avx2,f16c,avx512f,avx512bw,avx512vl,avx512dq\")")
#define MIPNET_ISA_END _Pragma("GCC pop_options")
#endif
#endif

namespace mipnet {
namespace cpu {

// The vector paths, in order of preference.  The numbers are the values of the
// mipnet_cpu::cpu_isa / set_cpu_isa ops (mipnet_kernels/_extension.py names them).
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumIsas = 3;

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    default: return "scalar";
  }
}

// Whether this build has a variant for isa and this CPU can run it.  Evaluated once per isa.
inline bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return !MIPNET_ISA_NATIVE_AVX2;  // such a build has no baseline variant
    case Isa::kAvx2: {
#if MIPNET_ISA_NATIVE_AVX2
      return true;
#elif MIPNET_ISA_DISPATCH_AVX2
      static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
      return has;
#else
      return false;
#endif
    }
    case Isa::kAvx512: {
#if MIPNET_ISA_DISPATCH_AVX2
      static const bool has = isa_supported(Isa::kAvx2) && __builtin_cpu_supports("avx512f") &&
                              __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vl") &&
                              __builtin_cpu_supports("avx512dq");
      return has;
#else
      return false;  // a build that targets AVX2 natively compiles only its AVX2 variant
#endif
    }
  }
  return false;
}

inline Isa best_isa() {
  for (int i = kNumIsas - 1; i >= 0; --i)
    if (isa_supported(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return Isa::kScalar;
}

// The process-wide setting (one object: an inline function's static is shared by every
// translation unit of the extension).
inline std::atomic<int>& isa_setting() {
  static std::atomic<int> isa{static_cast<int>(best_isa())};
  return isa;
}

// The path the kernels take now.
inline Isa current_isa() {
  return static_cast<Isa>(isa_setting().load(std::memory_order_relaxed));
}

// Chooses the path; false (nothing changed) when the build or the CPU lacks it.
inline bool set_isa(Isa isa) {
  if (!isa_supported(isa)) return false;
  isa_setting().store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

// The kernel table K of the path in use: make(isa) for every path, built once (per K and
// make), then picked on every call.  The one place the kernels turn the setting into code.
template <class K, K (*Make)(Isa)>
const K& isa_variant() {
  static const K k[kNumIsas] = {Make(Isa::kScalar), Make(Isa::kAvx2), Make(Isa::kAvx512)};
  return k[static_cast<int>(current_isa())];
}

// AVX512-BF16 (vcvtneps2bf16: Zen 4, Sapphire Rapids) bfloat16 stores, used by the MIMB
// kernels on the avx512 path.
inline bool cpu_has_avx512bf16() {
#if MIPNET_ISA_DISPATCH_AVX512BF16
  static const bool has = isa_supported(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace mipnet
