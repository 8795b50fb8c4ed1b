// Portable native-width float vectors (GCC/Clang vector extensions) for the CPU kernels, with
// loads/stores that convert float16 / bfloat16 <-> float32 bit-exactly like c10::Half /
// c10::BFloat16 (same formulas, written lane-parallel so they vectorise; the scalar c10
// half conversion does not).  Here for the build's own ISA (SSE2 on x86-64, NEON on
// aarch64, or AVX2 when the build targets it); the code is in vec_body.h, which
// decode_kernel.cpp also compiles per instruction set for run-time dispatch (isa.h).
//
// No fast-math anywhere: comparisons keep IEEE semantics (NaN compares false), which the
// argmax / NaN tracking relies on.
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__)
// Passing 32-byte vectors between the inline helpers below is ABI-neutral here (nothing
// is exported); silence GCC's note about the AVX calling convention.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace mipnet {
namespace cpu {
namespace vec {

#if defined(__AVX2__)
#define MIPNET_VEC_WIDTH 8
#else
#define MIPNET_VEC_WIDTH 4
#endif
#include "vec_body.h"

}  // namespace vec
}  // namespace cpu
}  // namespace mipnet
