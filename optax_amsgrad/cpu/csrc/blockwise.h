// The 8-bit blockwise codes of optax_amsgrad/_blockwise.py, element by
// element: decoding, rounding (to nearest, stochastically) and the
// rescaling of nu_max's old codes, in the same integer and float32
// operations, so that the handler stores the codes the XLA path stores.
// Branch-free, so that the element loops vectorize.

#ifndef OPTAX_AMSGRAD_BLOCKWISE_H_
#define OPTAX_AMSGRAD_BLOCKWISE_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace optax_amsgrad {

#define BLOCKWISE_INLINE inline __attribute__((always_inline))

// Elements per block along the last axis (_blockwise.BLOCK), and the bounds
// of the block scale exponents.
constexpr int64_t kCodeBlock = 256;
constexpr int32_t kMinExponent = -90;
constexpr int32_t kMaxExponent = 127;
constexpr int32_t kExponentShift = 23;
constexpr int32_t kOneBinade = 1 << kExponentShift;

// Bit casts the vectorizer sees through (a memcpy in a selection stops it);
// compilers without __builtin_bit_cast (GCC before 11) get the memcpy. The
// float handlers use them too.
#if defined(__has_builtin)
#if __has_builtin(__builtin_bit_cast)
#define BLOCKWISE_HAS_BIT_CAST 1
#endif
#endif

template <typename To, typename From>
BLOCKWISE_INLINE To BitCast(From x) {
  static_assert(sizeof(To) == sizeof(From), "a bit cast keeps the size");
#ifdef BLOCKWISE_HAS_BIT_CAST
  return __builtin_bit_cast(To, x);
#else
  To y;
  std::memcpy(&y, &x, sizeof(y));
  return y;
#endif
}

BLOCKWISE_INLINE uint32_t Bits(float x) { return BitCast<uint32_t>(x); }

BLOCKWISE_INLINE float FromBits(uint32_t bits) { return BitCast<float>(bits); }

// An 8-bit float-like code (_blockwise.Code): kE exponent and kM mantissa
// bits of magnitude, with a sign bit when kSigned.
template <int kE, int kM, bool kSigned>
struct Code {
  static constexpr bool kIsSigned = kSigned;
  static constexpr int32_t kMantissa = kM;
  static constexpr int32_t kTop = (1 << kE) - 1;
  static constexpr int32_t kNan = kSigned ? 0x80 : 0xFF;
  static constexpr int32_t kMaxMagnitude = kSigned ? 0x7F : 0xFE;
  static constexpr int32_t kShift = kExponentShift - kM;
  // The largest code's mantissa above 1, in float32 mantissa units: the
  // headroom added in Needed carries into the exponent above it.
  static constexpr uint32_t kThreshold =
      static_cast<uint32_t>((kMaxMagnitude & ((1 << kM) - 1))) << kShift;
  // The largest finite magnitude at scale 1 (in [1, 2)).
  static constexpr float TopValue() {
    return 1.0f + static_cast<float>(kMaxMagnitude & ((1 << kM) - 1)) / (1 << kM);
  }
};

using MuCode = Code<4, 3, true>;    // E4M3 and a sign
using NuCode = Code<5, 3, false>;   // E5M3

// `condition ? a : b` as masks. The vectorizer does not if-convert a
// selection of a value computed by a float operation (it may trap, and GCC
// sinks it into the branch that uses it); it vectorizes this.
BLOCKWISE_INLINE int32_t Pick(bool condition, int32_t a, int32_t b) {
  const int32_t mask = -static_cast<int32_t>(condition);
  return (a & mask) | (b & ~mask);
}

BLOCKWISE_INLINE bool IsFinite(float x) {
  return (Bits(x) & 0x7F800000u) != 0x7F800000u;
}

// _blockwise._needed_exponent: the smallest scale exponent at which x rounds
// to a finite code; kMinExponent for zero and non-finite values.
template <typename K>
BLOCKWISE_INLINE int32_t Needed(float x) {
  const uint32_t magnitude = Bits(x) & 0x7FFFFFFFu;
  const int32_t binade =
      static_cast<int32_t>((magnitude + (0x7FFFFFu - K::kThreshold)) >> kExponentShift) - 127;
  const int32_t needed = IsFinite(x) ? binade : kMinExponent;
  return needed < kMinExponent ? kMinExponent : (needed > kMaxExponent ? kMaxExponent : needed);
}

// The bits of 2**(s - top): added to a normal code shifted into a float32's
// mantissa, they give its value's bits.
template <typename K>
BLOCKWISE_INLINE int32_t Offset(int32_t s) {
  return (s + (127 - K::kTop)) << kExponentShift;
}

// _blockwise._values: the float32 value of code c at scale exponent s.
// (Selections are made on integers, before the bits become floats: GCC does
// not vectorize a selection between a bit-cast and a constant.)
template <typename K>
BLOCKWISE_INLINE float Decode(int32_t c, int32_t s) {
  const int32_t magnitude = K::kIsSigned ? (c & 0x7F) : c;
  const int32_t subnormal = magnitude < (1 << K::kMantissa) ? 1 : 0;
  const int32_t offset = Offset<K>(s) + (subnormal << kExponentShift);
  float value = FromBits(static_cast<uint32_t>((magnitude << K::kShift) + offset));
  // 2**(1 - top + s), the smallest normal code's value: exact to subtract.
  value = value - FromBits(static_cast<uint32_t>(offset & -subnormal));
  int32_t bits = static_cast<int32_t>(Bits(value));
  if (K::kIsSigned) bits = bits | ((c & 0x80) << 24);
  return FromBits(static_cast<uint32_t>(Pick(c == K::kNan, 0x7FC00000, bits)));
}

// _blockwise._encode's modes, but "up", which the handlers never take.
enum class Rounding { kNearest, kNearestNonzero, kStochastic };

// _blockwise._encode: the code of x at scale exponent s (at least what x
// needs). `bits`: uniform random bits, of which the high 24 are used, for
// kStochastic.
template <typename K, Rounding kMode>
BLOCKWISE_INLINE int32_t Encode(float x, int32_t s, uint32_t bits) {
  constexpr int32_t m = K::kMantissa;
  constexpr int32_t shift = K::kShift;
  const uint32_t raw = Bits(x);
  const uint32_t magnitude = raw & 0x7FFFFFFFu;
  const uint32_t uniform = bits >> 8;
  // Normal codes: the bits above `shift`, the rest rounded.
  const int32_t t = static_cast<int32_t>(magnitude) - Offset<K>(s);
  const int32_t base = t >> shift, below = t & ((1 << shift) - 1);
  // 0 or 1, kept in int32 (bool arithmetic does not vectorize).
  int32_t up;
  if (kMode == Rounding::kStochastic) {
    up = static_cast<int32_t>(uniform < (static_cast<uint32_t>(below) << (24 - shift)));
  } else {
    constexpr int32_t half = 1 << (shift - 1);
    // Above half, or at half with an odd code (ties to even).
    up = static_cast<int32_t>(below + (base & 1) > half);
  }
  const int32_t normal = base + up;
  // Subnormal codes (|x| below the smallest normal code): multiples of the
  // lowest binade's spacing, rounded as floats. Computed for every element
  // from |x| capped at that code, so that scaled is in [0, 2**m] and the
  // conversions below are exact and defined.
  const uint32_t smallest_normal = static_cast<uint32_t>(Offset<K>(s) + kOneBinade);
  const float scaled =
      FromBits(std::min(magnitude, smallest_normal)) *
      FromBits(static_cast<uint32_t>(K::kTop + m - 1 - s + 127) << kExponentShift);
  int32_t n;
  if (kMode == Rounding::kStochastic) {
    // floor by truncation (scaled >= 0): GCC does not vectorize std::floor.
    const int32_t low = static_cast<int32_t>(scaled);
    n = low + static_cast<int32_t>(static_cast<float>(uniform) * 0x1p-24f <
                                   scaled - static_cast<float>(low));
  } else {
    // To nearest, ties to even, as the FPU rounds: adding 2**23 leaves no
    // fraction bits (nor does GCC vectorize a converted std::nearbyint).
    n = static_cast<int32_t>((scaled + 0x1p23f) - 0x1p23f);
  }
  int32_t c = Pick(t >= kOneBinade, normal, n);
  if (kMode == Rounding::kNearestNonzero) {
    // A positive |x| too small for the arithmetic above still gets code 1.
    c = std::max(c, static_cast<int32_t>(magnitude != 0));
  }
  c = std::min(c, K::kMaxMagnitude);
  // The sign bit, but on code 0 (negative zero is NaN's code).
  if (K::kIsSigned) c = c | Pick(c != 0, static_cast<int32_t>(raw >> 31) << 7, 0);
  return Pick(IsFinite(x), c, K::kNan);
}

// _blockwise._rescaled_up: unsigned code c at a scale `shift` >= 0 binades
// larger, rounded up (a nonzero one never to zero; NaN stays NaN).
template <typename K>
BLOCKWISE_INLINE int32_t RescaledUp(int32_t c, int32_t shift) {
  constexpr int32_t m = K::kMantissa;
  const int32_t moved = c - (shift << m);
  const int32_t e = c >> m;
  const int32_t significand = e > 0 ? ((c & ((1 << m) - 1)) | (1 << m)) : c;
  const int32_t k_raw = shift + 1 - (e > 1 ? e : 1);
  // Where the subnormal branch is taken (shift >= e), k >= 0.
  const int32_t k = k_raw < 0 ? 0 : (k_raw < m + 2 ? k_raw : m + 2);
  const int32_t subnormal = (significand + (1 << k) - 1) >> k;
  const int32_t kept = moved >= (1 << m) ? moved : subnormal;
  return c == K::kNan ? c : kept;
}

}  // namespace optax_amsgrad

#endif  // OPTAX_AMSGRAD_BLOCKWISE_H_
