// AVX-512 (F, BW, VL, DQ) kernels. Only this file is compiled for AVX-512 (by the pragma below,
// never by a global -m flag); the binding calls it only after __builtin_cpu_supports says so.
#include <cstdint>
#include <cstring>

#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")
// GCC 12 flags _mm512_undefined_ps() inside its own intrinsics as maybe-uninitialized
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace xk {
namespace {

#include "common.h"

struct I {
  using V = __m512;
  static constexpr int W = 16;
  static constexpr int NV = 2;
  static constexpr int kMaxAcc = 16;    // forward accumulators (of 32 zmm)
  static constexpr int kMaxAccIg = 24;  // input-grad accumulators
  static constexpr int kGroupFwd = 8;
  static constexpr int kGroupIg = 12;
  struct Tab {
    __m512 t;
  };

  static inline Tab make_tab(float s) { return {_mm512_mul_ps(_mm512_load_ps(kNF4Code), _mm512_set1_ps(s))}; }
  // 16 bytes -> 16 int32 lanes; the table permute reads only the low 4 bits of each index, so the low
  // nibble (odd element) needs no mask and the high nibble (even element) one shift.
  static inline void decode32(const uint8_t* p, const Tab& tab, V* w) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    w[0] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab.t);
    w[1] = _mm512_permutexvar_ps(b, tab.t);
  }
  static inline void keep(V& v) { asm("" : "+v"(v)); }
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V set1(float f) { return _mm512_set1_ps(f); }
  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  static inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float hsum(V v) { return _mm512_reduce_add_ps(v); }
  // 16 vectors -> their 16 sums: halve the width 4 times, each step adding two shuffles of two vectors
  static inline V hsum_many(const V* v) {
    V u[8], q[4], h[2];
    for (int i = 0; i < 8; ++i)  // 128-bit lanes [a0+a2, a1+a3, b0+b2, b1+b3]
      u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; ++i)  // lane k: the 4 partial sums of v[4 i + k]
      q[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; ++i)  // lane k: 2 partials of v[8 i + k], then 2 of v[8 i + 4 + k]
      h[i] = _mm512_add_ps(_mm512_shuffle_ps(q[2 * i], q[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(q[2 * i], q[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    // lane k: sums of v[k], v[4 + k], v[8 + k], v[12 + k]; then put sum i at position i
    const V r = _mm512_add_ps(_mm512_shuffle_ps(h[0], h[1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_ps(h[0], h[1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
  }
  static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

  static inline V cvt_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static inline V load_cvt(const void* base, int dt, int64_t i) {
    if (dt == kF32) return _mm512_loadu_ps(static_cast<const float*>(base) + i);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
    return dt == kBF16 ? cvt_bf16(h) : _mm512_cvtph_ps(h);
  }
  static inline V load_cvt_part(const void* base, int dt, int64_t i, int count) {
    const __mmask16 k = static_cast<__mmask16>((1u << count) - 1u);
    if (dt == kF32) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(base) + i);
    const __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(base) + i);
    return dt == kBF16 ? cvt_bf16(h) : _mm512_cvtph_ps(h);
  }
  static inline __m256i to_bf16(V v) {
    const __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_srli_epi32(r, 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }
  static inline void store_cvt(void* base, int dt, int64_t i, V v) {
    if (dt == kF32) {
      _mm512_storeu_ps(static_cast<float*>(base) + i, v);
      return;
    }
    const __m256i h = dt == kBF16 ? to_bf16(v) : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i), h);
  }
  // v = hi + lo + O(2^-18 |v|): hi = bf16(v), lo = bf16(v - hi), both rounded to nearest even
  static inline void store_bf16_split(uint16_t* hi, uint16_t* lo, V v) {
    const __m256i h = to_bf16(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), h);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), to_bf16(_mm512_sub_ps(v, cvt_bf16(h))));
  }
  // bf16 hi / lo parts of the block's scaled codes, each 16-entry table repeated twice: vpermw reads 5
  // index bits, so a low nibble needs no mask (bit 4, the high nibble's lowest, picks the copy)
  static constexpr bool kHasBf16Tables = true;
  struct Bf16Tab {
    __m512i hi, lo;
  };
  static inline Bf16Tab make_bf16_tab(float s) {
    const V t = _mm512_mul_ps(_mm512_load_ps(kNF4Code), _mm512_set1_ps(s));
    const __m256i h = to_bf16(t);
    const __m256i l = to_bf16(_mm512_sub_ps(t, cvt_bf16(h)));
    return {_mm512_broadcast_i64x4(h), _mm512_broadcast_i64x4(l)};
  }
  static inline void decode64_bf16(const uint8_t* p, const Bf16Tab& t, uint16_t* hi, uint16_t* lo) {
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i e = _mm512_srli_epi16(b, 4);  // words 0-15: chunk 0's even elements, 16-31: chunk 1's
    const __m512i he = _mm512_permutexvar_epi16(e, t.hi), ho = _mm512_permutexvar_epi16(b, t.hi);
    const __m512i le = _mm512_permutexvar_epi16(e, t.lo), lw = _mm512_permutexvar_epi16(b, t.lo);
    // per chunk: its 16 even then its 16 odd elements
    _mm512_storeu_si512(hi, _mm512_shuffle_i64x2(he, ho, _MM_SHUFFLE(1, 0, 1, 0)));
    _mm512_storeu_si512(hi + 32, _mm512_shuffle_i64x2(he, ho, _MM_SHUFFLE(3, 2, 3, 2)));
    _mm512_storeu_si512(lo, _mm512_shuffle_i64x2(le, lw, _MM_SHUFFLE(1, 0, 1, 0)));
    _mm512_storeu_si512(lo + 32, _mm512_shuffle_i64x2(le, lw, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // 32 bytes -> 64 bf16 weights (the table's hi parts, i.e. each weight rounded to bf16 once) in natural
  // order: per byte one dword of two word indices, (high nibble, whole byte); vpermw reads 5 bits of
  // each and the table is repeated, so the byte needs no mask
  static inline void decode64_bf16_nat(const uint8_t* p, const Bf16Tab& t, uint16_t* out) {
    for (int h = 0; h < 2; ++h) {
      const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h)));
      const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16));
      _mm512_storeu_si512(out + 32 * h, _mm512_permutexvar_epi16(idx, t.hi));
    }
  }
  static inline void load_perm32(const void* base, int dt, int64_t i, V* w) {
    const V a = load_cvt(base, dt, i), b = load_cvt(base, dt, i + 16);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    w[0] = _mm512_permutex2var_ps(a, even, b);
    w[1] = _mm512_permutex2var_ps(a, odd, b);
  }
  static inline void store_nat32(void* base, int dt, int64_t i, const V* w) {
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    store_cvt(base, dt, i, _mm512_permutex2var_ps(w[0], lo, w[1]));
    store_cvt(base, dt, i + 16, _mm512_permutex2var_ps(w[0], hi, w[1]));
  }
};

#define XK_ISA_NAME "avx512"
#include "kernels_impl.h"
#undef XK_ISA_NAME

}  // namespace
}  // namespace xk

#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace xk {
const KernelTable* kernels_avx512() { return &kTable; }
}  // namespace xk

#else

namespace xk {
const KernelTable* kernels_avx512() { return nullptr; }
}  // namespace xk

#endif
