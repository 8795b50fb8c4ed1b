// Run-time instruction-set dispatch shared by the CPU kernels (mimb_kernel.cpp,
// decode_kernel.cpp).
//
// The pattern: a kernel's hot loops live in a body header with no include guard, included
// once per instruction set, each time inside its own namespace nested in the includer's
// anonymous namespace (isa_base, isa_avx2, ...), so every ISA-specific body has internal
// linkage and a distinct name: the linker can never merge an AVX2 body into the baseline
// path (no ODR hazard).  The AVX2 copies are compiled inside
//   MIPNET_ISA_AVX2_BEGIN ... MIPNET_ISA_AVX2_END
// (a target("avx2,f16c") region), defined only where MIPNET_ISA_DISPATCH_AVX2 is 1: x86-64
// GCC / Clang builds whose baseline is below AVX2.  Builds that already target AVX2
// (MIPNET_ISA_NATIVE_AVX2) compile only the AVX2 variant; other targets only the baseline.
//
// cpu_has_avx2() picks at run time; MIPNET_KERNELS_NO_AVX2=1 forces the baseline variant
// (tests, A/B timing).  All variants of a kernel give bit-identical results.
#pragma once

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
#define MIPNET_ISA_END _Pragma("clang attribute pop")
#else
#define MIPNET_ISA_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,f16c\")")
#define MIPNET_ISA_AVX512BF16_BEGIN \
  _Pragma("GCC push_options")       \
      _Pragma("GCC target(\"avx2,f16c,avx512f,avx512vl,avx512dq,avx512bf16\")")
#define MIPNET_ISA_END _Pragma("GCC pop_options")
#endif
#endif

namespace mipnet {
namespace cpu {

// Whether the AVX2 (+ F16C) variants may run: the CPU has them and MIPNET_KERNELS_NO_AVX2
// is unset, empty or "0".  Compiled for the baseline ISA (this header is included outside
// any target region); evaluated once.
inline bool cpu_has_avx2() {
#if MIPNET_ISA_NATIVE_AVX2
  return true;
#elif MIPNET_ISA_DISPATCH_AVX2
  static const bool has = [] {
    const char* off = std::getenv("MIPNET_KERNELS_NO_AVX2");
    if (off != nullptr && off[0] != '\0' && !(off[0] == '0' && off[1] == '\0')) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return has;
#else
  return false;
#endif
}

// AVX512-BF16 bfloat16 stores (Zen 4, Sapphire Rapids), on top of the AVX2 variants.
inline bool cpu_has_avx512bf16() {
#if MIPNET_ISA_DISPATCH_AVX512BF16
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace mipnet
