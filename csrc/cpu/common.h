// Scalar helpers shared by every instruction-set translation unit.
//
// Included by kernels_<isa>.cpp INSIDE its `#pragma GCC target` region and inside an anonymous
// namespace, after every standard header: each translation unit gets its own internal copy, so no
// function compiled for AVX-512 can be merged by the linker into the scalar path. Hence: no
// standard-library templates or inline functions are used below, only builtins.

alignas(64) static const float kNF4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

static inline uint32_t f32_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}

static inline float bits_f32(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

static inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN -> 0x7FC0 (what torch's conversion does).
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu;
  uint32_t m = h & 0x3FFu;
  if (e == 0x1Fu) return bits_f32(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    if (m == 0) return bits_f32(sign);
    e = 113;  // normalize the subnormal: value m * 2^-24
    while (!(m & 0x400u)) {
      m <<= 1;
      --e;
    }
    return bits_f32(sign | (e << 23) | ((m & 0x3FFu) << 13));
  }
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

// IEEE binary16, round to nearest even, overflow to infinity, NaN -> quiet NaN.
static inline uint16_t f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return sign | (x > 0x7F800000u ? 0x7E00 : 0x7C00);
  if (x >= 0x477FF000u) return sign | 0x7C00;  // >= 65520 rounds to infinity
  if (x >= 0x38800000u) {                       // normal half
    uint32_t h = (x >> 13) - (112u << 10);
    const uint32_t rem = x & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return sign | static_cast<uint16_t>(h);
  }
  const uint32_t e = x >> 23;
  if (e < 102) return sign;  // below 2^-25: rounds to zero
  const uint32_t mant = (x & 0x7FFFFFu) | 0x800000u;
  const uint32_t s = 126 - e;  // 14..24
  uint32_t h = mant >> s;
  const uint32_t rem = mant & ((1u << s) - 1u);
  const uint32_t half = 1u << (s - 1);
  if (rem > half || (rem == half && (h & 1u))) ++h;
  return sign | static_cast<uint16_t>(h);
}

static inline float load1(const void* base, int dt, int64_t i) {
  if (dt == xk::kF32) return static_cast<const float*>(base)[i];
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  return dt == xk::kBF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

static inline void store1(void* base, int dt, int64_t i, float v) {
  if (dt == xk::kF32) {
    static_cast<float*>(base)[i] = v;
  } else {
    static_cast<uint16_t*>(base)[i] = dt == xk::kBF16 ? f32_to_bf16(v) : f32_to_f16(v);
  }
}

// Per-block scale; written as a product then a sum (built with -ffp-contract=off) so it rounds
// exactly like the torch reference (values * absmax2, then + offset).
static inline float block_scale(const xk::NF4W& w, int64_t b) {
  if (w.absmax) return w.absmax[b];
  const float t = w.code2[w.qabsmax[b]] * w.absmax2[b >> 8];
  return t + w.offset;
}

static inline float nf4_elem(const xk::NF4W& w, int64_t e) {
  const uint8_t byte = w.packed[e >> 1];
  const int q = (e & 1) ? (byte & 15) : (byte >> 4);
  return kNF4Code[q] * block_scale(w, e >> w.bs_shift);
}
