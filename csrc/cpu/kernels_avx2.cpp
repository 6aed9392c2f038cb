// AVX2 + FMA + F16C kernels (compiled for those by the pragma below only; chosen at run time).
#include <cstdint>
#include <cstring>

#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace xk {
namespace {

#include "common.h"

struct I {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int NV = 4;          // a 32-chunk: even 0-7, even 8-15, odd 0-7, odd 8-15
  static constexpr int kMaxAcc = 8;     // of 16 ymm
  static constexpr int kMaxAccIg = 12;
  static constexpr int kGroupFwd = 8;
  static constexpr int kGroupIg = 3;
  struct Tab {
    __m256 lo, hi;  // codes 0-7 and 8-15, scaled
  };

  static inline Tab make_tab(float s) {
    const __m256 sv = _mm256_set1_ps(s);
    return {_mm256_mul_ps(_mm256_load_ps(kNF4Code), sv), _mm256_mul_ps(_mm256_load_ps(kNF4Code + 8), sv)};
  }
  // Look up 8 indices held in the low 4 bits of each lane (higher bits ignored): the two 8-entry
  // halves are permuted with the low 3 bits and blended on bit 3, shifted to the sign bit.
  static inline V lookup(__m256i idx, const Tab& t) {
    const __m256 mask = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx), _mm256_permutevar8x32_ps(t.hi, idx), mask);
  }
  static inline void decode32(const uint8_t* p, const Tab& t, V* w) {
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
    w[0] = lookup(_mm256_srli_epi32(b0, 4), t);  // high nibbles: even elements 0-7
    w[1] = lookup(_mm256_srli_epi32(b1, 4), t);  // even elements 8-15
    w[2] = lookup(b0, t);                        // low nibbles: odd elements 0-7
    w[3] = lookup(b1, t);
  }
  static inline void keep(V& v) { asm("" : "+x"(v)); }
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V set1(float f) { return _mm256_set1_ps(f); }
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  static inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // 8 vectors -> their 8 sums
  static inline V hsum_many(const V* v) {
    V u[4], h[2];
    for (int i = 0; i < 4; ++i)  // 128-bit lane 0: 4 partials of v[2 i], lane 1: of v[2 i + 1]
      u[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                           _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
    for (int i = 0; i < 2; ++i)  // lane k: 2 partials of v[4 i + k], then 2 of v[4 i + 2 + k]
      h[i] = _mm256_add_ps(_mm256_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm256_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    // lane k: sums of v[k], v[2 + k], v[4 + k], v[6 + k]
    const V r = _mm256_add_ps(_mm256_shuffle_ps(h[0], h[1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm256_shuffle_ps(h[0], h[1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }
  static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

  static inline V cvt16(__m128i h, int dt) {
    if (dt == kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
  static inline V load_cvt(const void* base, int dt, int64_t i) {
    if (dt == kF32) return _mm256_loadu_ps(static_cast<const float*>(base) + i);
    return cvt16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i)), dt);
  }
  static inline V load_cvt_part(const void* base, int dt, int64_t i, int count) {
    alignas(32) float tmp[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < count; ++j) tmp[j] = load1(base, dt, i + j);
    return _mm256_load_ps(tmp);
  }
  static inline __m128i to_bf16(V v) {
    const __m256i u = _mm256_castps_si256(v);
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                                     _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    r = _mm256_srli_epi32(r, 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    return _mm256_castsi256_si128(r);
  }
  static inline void store_cvt(void* base, int dt, int64_t i, V v) {
    if (dt == kF32) {
      _mm256_storeu_ps(static_cast<float*>(base) + i, v);
      return;
    }
    const __m128i h = dt == kBF16 ? to_bf16(v) : _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i), h);
  }
  // two natural vectors (elements 0-7, 8-15) -> their even and odd elements
  static inline void deinterleave(V a, V b, V* even, V* odd) {
    *even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), 0xD8));
    *odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), 0xD8));
  }
  // v = hi + lo + O(2^-18 |v|): hi = bf16(v), lo = bf16(v - hi), both rounded to nearest even
  static inline void store_bf16_split(uint16_t* hi, uint16_t* lo, V v) {
    const __m128i h = to_bf16(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), h);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), to_bf16(_mm256_sub_ps(v, cvt16(h, kBF16))));
  }
  static constexpr bool kHasBf16Tables = false;
  struct Bf16Tab {};
  static inline Bf16Tab make_bf16_tab(float) { return {}; }
  static inline void decode64_bf16(const uint8_t*, const Bf16Tab&, uint16_t*, uint16_t*) {}
  static inline void decode64_bf16_nat(const uint8_t*, const Bf16Tab&, uint16_t*) {}
  static inline void load_perm32(const void* base, int dt, int64_t i, V* w) {
    deinterleave(load_cvt(base, dt, i), load_cvt(base, dt, i + 8), &w[0], &w[2]);
    deinterleave(load_cvt(base, dt, i + 16), load_cvt(base, dt, i + 24), &w[1], &w[3]);
  }
  static inline void store_nat32(void* base, int dt, int64_t i, const V* w) {
    for (int h = 0; h < 2; ++h) {
      const V lo = _mm256_unpacklo_ps(w[h], w[2 + h]);  // E0 O0 E1 O1 | E4 O4 E5 O5
      const V hi = _mm256_unpackhi_ps(w[h], w[2 + h]);  // E2 O2 E3 O3 | E6 O6 E7 O7
      store_cvt(base, dt, i + 16 * h, _mm256_permute2f128_ps(lo, hi, 0x20));
      store_cvt(base, dt, i + 16 * h + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
  }
};

#define XK_ISA_NAME "avx2"
#include "kernels_impl.h"
#undef XK_ISA_NAME

}  // namespace
}  // namespace xk

#pragma GCC pop_options

namespace xk {
const KernelTable* kernels_avx2() { return &kTable; }
}  // namespace xk

#else

namespace xk {
const KernelTable* kernels_avx2() { return nullptr; }
}  // namespace xk

#endif
