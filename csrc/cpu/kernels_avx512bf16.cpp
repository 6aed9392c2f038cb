// AVX512-BF16 kernels (vdpbf16ps: 32 bf16 products a instruction, float32 accumulation) for the native
// bf16 precision: the LoRA terms of a row block and the fused GEMV of few rows. Only this file is
// compiled with avx512bf16 (by the pragma below); the binding calls it only on a CPU that has it
// (the "avx512_bf16" instruction set, which is "avx512" plus these two kernels).
#include <cstdint>
#include <cstring>

#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 10)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi2")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace xk {
namespace {

#include "common.h"

inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// float32 -> bf16, round to nearest even (vcvtneps2bf16), 16 lanes
inline __m256i to_bf16(__m512 v) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)); }

inline __m512 bf16_to_f32(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// count <= 16 elements of a float32 / bf16 / float16 array as float32 (the rest 0)
inline __m512 load_part(const void* base, int dt, int64_t i, __mmask16 mk) {
  if (dt == kF32) return _mm512_maskz_loadu_ps(mk, static_cast<const float*>(base) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(base) + i);
  return dt == kBF16 ? bf16_to_f32(h) : _mm512_cvtph_ps(h);
}

// Two consecutive bf16 values as one dword (the k pair a vdpbf16ps lane multiplies); the second is 0 past n.
inline uint32_t pair_at(const uint16_t* p, int64_t i, int64_t n) {
  const uint32_t lo = p[i];
  const uint32_t hi = i + 1 < n ? p[i + 1] : 0u;
  return lo | (hi << 16);
}

// ---------------------------------------------------------------------------------------------
// LoRA terms of up to 16 rows of one adapter:
//   mid[row, j] = act[row] . shrink[:, j]          (float32, j < r)
//   out[row, n] += scale * bf16(mid[row]) . expand[:, n]
// shrink packed [ceil(n_red / 2)][rp][2], expand packed [rp / 2][n_out][2] (bf16, zero padded).

template <int NB>
void lora_block(const LoraBf16Args& a, int64_t i0) {
  const int64_t K = a.n_red, rp = a.rp, full = K / 2, N = a.n_out;
  alignas(64) uint16_t coef[NB][kLoraBf16MaxRank];  // bf16(scale * mid), the expand's left operand
  const uint16_t* rowp[NB];
  for (int i = 0; i < NB; ++i) rowp[i] = a.act + static_cast<int64_t>(a.rows[i0 + i]) * K;
  for (int64_t jb = 0; jb < rp; jb += 16) {
    __m512 acc[NB];
    for (int i = 0; i < NB; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t p = 0; p < full; ++p) {
      const __m512i s = _mm512_loadu_si512(a.shrink + (p * rp + jb) * 2);
      for (int i = 0; i < NB; ++i) {
        uint32_t xv;
        std::memcpy(&xv, rowp[i] + 2 * p, 4);
        acc[i] = dp(acc[i], _mm512_set1_epi32(static_cast<int>(xv)), s);
      }
    }
    if (full * 2 < K) {  // odd K: the last element pairs with a zero
      const __m512i s = _mm512_loadu_si512(a.shrink + (full * rp + jb) * 2);
      for (int i = 0; i < NB; ++i)
        acc[i] = dp(acc[i], _mm512_set1_epi32(static_cast<int>(pair_at(rowp[i], 2 * full, K))), s);
    }
    const int64_t jn = imin(16, a.r - jb);
    const __mmask16 keep = static_cast<__mmask16>(jn > 0 ? (1u << jn) - 1u : 0u);
    const __m512 sc = _mm512_set1_ps(a.scale);
    for (int i = 0; i < NB; ++i) {
      _mm512_mask_storeu_ps(a.mid + static_cast<int64_t>(a.rows[i0 + i]) * a.r + jb, keep, acc[i]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(&coef[i][jb]), to_bf16(_mm512_mul_ps(acc[i], sc)));
    }
  }
  for (int64_t n = 0; n < N; n += 16) {
    const int64_t cnt = imin(16, N - n);
    const __mmask16 m = static_cast<__mmask16>((1u << cnt) - 1u);
    const __mmask32 m2 = static_cast<__mmask32>((uint64_t{1} << (2 * cnt)) - 1u);
    __m512 t[NB];
    for (int i = 0; i < NB; ++i) t[i] = _mm512_setzero_ps();
    for (int64_t q = 0; q < rp / 2; ++q) {
      const __m512i e = _mm512_maskz_loadu_epi16(m2, a.expand + (q * N + n) * 2);
      for (int i = 0; i < NB; ++i) {
        uint32_t cv;
        std::memcpy(&cv, &coef[i][2 * q], 4);
        t[i] = dp(t[i], _mm512_set1_epi32(static_cast<int>(cv)), e);
      }
    }
    for (int i = 0; i < NB; ++i) {
      const int64_t o = static_cast<int64_t>(a.rows[i0 + i]) * N + n;
      if (a.out_dt == kF32) {
        float* out = static_cast<float*>(a.out) + o;
        _mm512_mask_storeu_ps(out, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, out), t[i]));
      } else {
        uint16_t* out = static_cast<uint16_t*>(a.out) + o;
        const __m512 y = _mm512_add_ps(bf16_to_f32(_mm256_maskz_loadu_epi16(m, out)), t[i]);
        _mm256_mask_storeu_epi16(out, m, to_bf16(y));
      }
    }
  }
}

template <int NB>
inline void lora_dispatch(const LoraBf16Args& a, int nb, int64_t i0) {
  if constexpr (NB >= 1) {
    if (nb == NB) {
      lora_block<NB>(a, i0);
    } else {
      lora_dispatch<NB - 1>(a, nb, i0);
    }
  }
}

void lora_rows(const LoraBf16Args& a, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; i += kLoraBf16Rows)
    lora_dispatch<kLoraBf16Rows>(a, static_cast<int>(imin(kLoraBf16Rows, i1 - i)), i);
}

// ---------------------------------------------------------------------------------------------
// GEMV of few rows: y[m, n] = x[m] . bf16(W[n]) + [a >= 0] coef[m] . B[a][n] for rows n in [n0, n1).
// Each weight byte is decoded once (to bf16, by vpermw in the block's bf16 table) for all G <= 16 rows
// of x; x is bf16, chunk-major [K / 32][M][32] in natural order, so a chunk of all rows is 1 KB.

struct Tab {
  __m512i t;  // the block's 16 codes times its scale in bf16, repeated twice (vpermw reads 5 index bits)
};

inline Tab make_tab(float s) {
  const __m512 t = _mm512_mul_ps(_mm512_load_ps(kNF4Code), _mm512_set1_ps(s));
  return {_mm512_broadcast_i64x4(to_bf16(t))};
}

// 16 packed bytes -> 32 bf16 weights in natural order (word pair per byte: high nibble, then the byte)
inline __m512i decode32(const uint8_t* p, const Tab& tab) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16)), tab.t);
}

template <int G>
void gemv_rows(const GemvBf16Args& a, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t K = a.K, chunks = K / 32;
  const int shift = a.w.bs_shift;
  const int64_t bmask = (int64_t{1} << shift) - 1;
  const uint16_t* xb = a.x + m0 * 32;
  const int64_t xstride = a.M * 32;
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    const int64_t base = n * K;
    const uint8_t* p = a.w.packed + (base >> 1);
    Tab tab = make_tab(block_scale(a.w, base >> shift));
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t e = base + c * 32;
      if (c > 0 && (e & bmask) == 0) tab = make_tab(block_scale(a.w, e >> shift));
      const __m512i w = decode32(p + c * 16, tab);
      const uint16_t* xc = xb + c * xstride;
      for (int g = 0; g < G; ++g) acc[g] = dp(acc[g], w, _mm512_loadu_si512(xc + g * 32));
    }
    for (int g = 0; g < G; ++g) {
      const int64_t m = m0 + g;
      const int32_t ad = a.ids[m];
      if (ad >= 0) {  // the LoRA expand in float32, added before the one horizontal sum: coef[m] . B[a][n]
        const float* cf = a.coef + m * a.r;
        const int64_t off = (static_cast<int64_t>(ad) * a.N + n) * a.r;
        for (int64_t j = 0; j < a.r; j += 16) {
          const int cnt = static_cast<int>(imin(16, a.r - j));
          const __mmask16 mk = static_cast<__mmask16>((1u << cnt) - 1u);
          acc[g] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, cf + j), load_part(a.B, a.b_dt, off + j, mk), acc[g]);
        }
      }
      static_cast<uint16_t*>(a.y)[m * a.N + n] = f32_to_bf16(_mm512_reduce_add_ps(acc[g]));
    }
  }
}

template <int G>
inline void gemv_dispatch(const GemvBf16Args& a, int g, int64_t m0, int64_t n0, int64_t n1) {
  if constexpr (G >= 1) {
    if (g == G) {
      gemv_rows<G>(a, m0, n0, n1);
    } else {
      gemv_dispatch<G - 1>(a, g, m0, n0, n1);
    }
  }
}

void gemv(const GemvBf16Args& a, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < a.M; m0 += 16) {
    const int g = static_cast<int>(imin(16, a.M - m0));
    gemv_dispatch<16>(a, g, m0, n0, n1);
  }
}

const Bf16Kernels kBf16 = {lora_rows, gemv};

}  // namespace
}  // namespace xk

#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace xk {
const Bf16Kernels* kernels_avx512bf16() { return &kBf16; }
}  // namespace xk

#else

namespace xk {
const Bf16Kernels* kernels_avx512bf16() { return nullptr; }
}  // namespace xk

#endif
