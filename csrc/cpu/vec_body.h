// Body of vec.h (the vec:: namespace): NOT a normal header.  Included once per
// instruction set inside the includer's namespace, with MIPNET_VEC_WIDTH defined to 16
// (AVX-512; the includer wraps it in an AVX-512 target region), 8 (AVX2; an AVX2 target
// region unless the build targets AVX2) or 4 (SSE2 / NEON).  vec.h includes it as
// mipnet::cpu::vec for the build's own ISA; decode_kernel.cpp also includes it in its
// per-ISA namespaces (isa.h).  No include guard, on purpose; undefines MIPNET_VEC_WIDTH at
// the end.

#ifndef MIPNET_VEC_WIDTH
#error "define MIPNET_VEC_WIDTH (4, 8 or 16) before including vec_body.h"
#endif

// Native width only: GCC scalarises generic vectors wider than the target's registers
// (comparisons become one comiss per lane), so 16 lanes with AVX-512, 8 with AVX2, else 4.
constexpr int kW = MIPNET_VEC_WIDTH;
static_assert(kW == 4 || kW == 8 || kW == 16, "MIPNET_VEC_WIDTH must be 4, 8 or 16");
typedef float vf __attribute__((vector_size(4 * kW)));
typedef int32_t vi __attribute__((vector_size(4 * kW)));
typedef uint32_t vu __attribute__((vector_size(4 * kW)));
typedef uint16_t vh __attribute__((vector_size(2 * kW)));
// Unaligned, may-alias variants for loads and stores through pointers.
typedef float vf_u __attribute__((vector_size(4 * kW), aligned(4), may_alias));
typedef int32_t vi_u __attribute__((vector_size(4 * kW), aligned(4), may_alias));
typedef uint16_t vh_u __attribute__((vector_size(2 * kW), aligned(2), may_alias));

// Reinterpret a vector as another vector type of the same size: a C-style cast between
// vector types is a bit cast in GCC and Clang, and stays in registers (memcpy or
// __builtin_bit_cast made GCC 12 spill to the stack inside the hot loops).
template <class To, class From>
inline To bits(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between different sizes");
  return (To)v;
}

inline vf splat(float x) {
  vf v;
  for (int l = 0; l < kW; ++l) v[l] = x;
  return v;
}
inline vi splat_i(int32_t x) {
  vi v;
  for (int l = 0; l < kW; ++l) v[l] = x;
  return v;
}
inline vu splat_u(uint32_t x) {
  vu v;
  for (int l = 0; l < kW; ++l) v[l] = x;
  return v;
}
inline vi iota() {
  vi v;
  for (int l = 0; l < kW; ++l) v[l] = l;
  return v;
}

// mask ? a : b, lane-wise (mask lanes are 0 or -1, as vector comparisons produce).
inline vf select(vi mask, vf a, vf b) {
#if defined(__GNUC__) && !defined(__clang__)
  return mask ? a : b;  // GCC: a float blend, no int<->float domain moves
#else
  return bits<vf>((mask & bits<vi>(a)) | (~mask & bits<vi>(b)));
#endif
}
inline vi select(vi mask, vi a, vi b) { return (mask & a) | (~mask & b); }
inline vu select(vi mask, vu a, vu b) {
  const vu m = bits<vu>(mask);
  return (m & a) | (~m & b);
}

// Unsigned a < b via a signed compare (SSE2 has no unsigned vector compare; GCC would
// scalarise it).
inline vi lt_u(vu a, vu b) {
  const vu flip = splat_u(0x80000000u);
  return bits<vi>(a ^ flip) < bits<vi>(b ^ flip);
}

inline vf reverse(vf v) {
#if MIPNET_VEC_WIDTH == 16
#define MIPNET_REV_IDX 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0
#elif MIPNET_VEC_WIDTH == 8
#define MIPNET_REV_IDX 7, 6, 5, 4, 3, 2, 1, 0
#else
#define MIPNET_REV_IDX 3, 2, 1, 0
#endif
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  return __builtin_shufflevector(v, v, MIPNET_REV_IDX);
#else
  return __builtin_shuffle(v, vi{MIPNET_REV_IDX});
#endif
#undef MIPNET_REV_IDX
}

// ------------------------------------------------------------------ loads
inline vf load8(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline vi load8(const int32_t* p) { return *reinterpret_cast<const vi_u*>(p); }

inline vu load8_u16(const void* p) {
  const vh h = *reinterpret_cast<const vh_u*>(p);
  return __builtin_convertvector(h, vu);
}

// c10::BFloat16 -> float: the upper half of the float's bits.
inline vf load8(const c10::BFloat16* p) { return bits<vf>(load8_u16(p) << 16); }

// c10::detail::fp16_ieee_to_fp32_value, lane-parallel (exact for every input).
inline vf load8(const c10::Half* p) {
  const vu w = load8_u16(p) << 16;
  const vu sign = w & splat_u(0x80000000u);
  const vu two_w = w + w;
  const vf exp_scale = bits<vf>(splat_u(15u << 23));  // 2^-112
  const vf normalized = bits<vf>((two_w >> 4) + splat_u(0xE0u << 23)) * exp_scale;
  const vf denormalized = bits<vf>((two_w >> 17) | splat_u(126u << 23)) - splat(0.5f);
  const vi is_denorm = lt_u(two_w, splat_u(1u << 27));
  const vu res = sign | select(is_denorm, bits<vu>(denormalized), bits<vu>(normalized));
  return bits<vf>(res);
}

// ------------------------------------------------------------------ stores
inline void store8(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
inline void store8(int32_t* p, vi v) { *reinterpret_cast<vi_u*>(p) = v; }

// Low 16 bits of each lane (the values fit), stored as kW uint16.
inline void store8_u16(void* p, vu v) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  typedef uint16_t vh2 __attribute__((vector_size(4 * kW)));
  const vh2 w = bits<vh2>(v);  // little-endian: lane l's low half is element 2l
#if MIPNET_VEC_WIDTH == 16
  const vh h = __builtin_shufflevector(w, w, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                       28, 30);
#elif MIPNET_VEC_WIDTH == 8
  const vh h = __builtin_shufflevector(w, w, 0, 2, 4, 6, 8, 10, 12, 14);
#else
  const vh h = __builtin_shufflevector(w, w, 0, 2, 4, 6);
#endif
#else
  const vh h = __builtin_convertvector(v, vh);
#endif
  *reinterpret_cast<vh_u*>(p) = h;
}

// c10::detail::round_to_nearest_even (NaN -> 0x7FC0), lane-parallel.
inline void store8(c10::BFloat16* p, vf f) {
  const vu u = bits<vu>(f);
  const vu rounding_bias = ((u >> 16) & splat_u(1u)) + splat_u(0x7FFFu);
  vu r = (u + rounding_bias) >> 16;
  r = select(f != f, splat_u(0x7FC0u), r);
  store8_u16(p, r);
}

// c10::detail::fp16_ieee_from_fp32_value (round to nearest even), lane-parallel.
inline void store8(c10::Half* p, vf f) {
  const vf scale_to_inf = bits<vf>(splat_u(239u << 23));  // 2^112
  const vf scale_to_zero = bits<vf>(splat_u(17u << 23));  // 2^-110
  const vf absf = bits<vf>(bits<vu>(f) & splat_u(0x7FFFFFFFu));
  vf base = (absf * scale_to_inf) * scale_to_zero;
  const vu w = bits<vu>(f);
  const vu shl1_w = w + w;
  const vu sign = w & splat_u(0x80000000u);
  vu bias = shl1_w & splat_u(0xFF000000u);
  bias = select(lt_u(bias, splat_u(0x71000000u)), splat_u(0x71000000u), bias);
  base = bits<vf>((bias >> 1) + splat_u(0x07800000u)) + base;
  const vu b = bits<vu>(base);
  const vu exp_bits = (b >> 13) & splat_u(0x00007C00u);
  const vu mantissa_bits = b & splat_u(0x00000FFFu);
  const vu nonsign = exp_bits + mantissa_bits;
  const vu res = (sign >> 16) | select(lt_u(splat_u(0xFF000000u), shl1_w), splat_u(0x7E00u), nonsign);
  store8_u16(p, res);
}

#undef MIPNET_VEC_WIDTH
