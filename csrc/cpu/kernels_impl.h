// The kernels, written once over an instruction-set traits class `I` (defined by each
// kernels_<isa>.cpp just before including this file, inside the same anonymous namespace and the
// same `#pragma GCC target` region). See kernels.h for what each function computes.
//
// Traits interface (V: a vector of W floats; a "32-chunk" is 16 packed bytes = 32 weights, held as
// NV = 32 / W vectors in the PERMUTED layout: positions 0..15 are the even elements (high
// nibbles), 16..31 the odd ones (low nibbles), which is what unpacking nibbles yields for free):
//   Tab make_tab(float s)                         the 16 NF4 codes times s (one block's scale)
//   void decode32(const uint8_t* p, Tab, V* w)     16 bytes -> NV vectors, permuted layout
//   V zero(), set1(float), load(const float*), add(V, V), fmadd(a, b, c) = a * b + c
//   void store(float*, V); float hsum(V); V hsum_many(const V* v): lane i = sum of v[i]
//   V load_cvt(base, dt, i) / load_cvt_part(base, dt, i, count): W (or count < W, rest 0) elements
//   void load_perm32(base, dt, i, V* w)            32 natural elements -> permuted layout
//   void store_nat32(base, dt, i, const V* w)      permuted layout -> 32 natural elements
//   void store_cvt(base, dt, i, V)                 W elements
//   void prefetch(const void*)
//   void keep(V&)                                  optimization barrier: keep a value in a register
//   void store_bf16_split(uint16_t* hi, uint16_t* lo, V)  W elements as bf16 hi + bf16 lo
//   kHasBf16Tables; if true: Bf16Tab make_bf16_tab(float s), decode64_bf16(p, tab, hi, lo): 32 bytes ->
//     64 hi and 64 lo bf16 parts, two 32-chunks in the permuted layout
//   kMaxAcc (forward accumulators), kGroupFwd / kGroupIg (rows of x per pass), kMaxAccIg

using V = I::V;
constexpr int W = I::W;
constexpr int NV = I::NV;

// ---------------------------------------------------------------------------------------------
// dequantize

// bf16 output by lookups in the block's bf16 table, 64 weights a step (blocksize >= 64): the same
// rounding as decoding to float32 and rounding each weight to nearest even
void dequant_bf16_tables(const xk::NF4W& w, int64_t e0, int64_t e1, uint16_t* out) {
  int64_t e = e0;
  for (; e < e1 && (e & 63); ++e) out[e - e0] = f32_to_bf16(nf4_elem(w, e));
  int64_t cur = -1;
  I::Bf16Tab tab{};
  for (; e + 64 <= e1; e += 64) {
    const int64_t b = e >> w.bs_shift;
    if (b != cur) {
      tab = I::make_bf16_tab(block_scale(w, b));
      cur = b;
    }
    I::decode64_bf16_nat(w.packed + (e >> 1), tab, out + (e - e0));
  }
  for (; e < e1; ++e) out[e - e0] = f32_to_bf16(nf4_elem(w, e));
}

void dequant(const xk::NF4W& w, int64_t e0, int64_t e1, void* out, int dt) {
  if constexpr (I::kHasBf16Tables) {
    if (dt == xk::kBF16 && w.bs_shift >= 6) {
      dequant_bf16_tables(w, e0, e1, static_cast<uint16_t*>(out));
      return;
    }
  }
  int64_t e = e0;
  for (; e < e1 && (e & 31); ++e) store1(out, dt, e - e0, nf4_elem(w, e));
  int64_t cur = -1;
  I::Tab tab{};
  V v[NV];
  for (; e + 32 <= e1; e += 32) {
    const int64_t b = e >> w.bs_shift;  // a 32-aligned chunk lies in one block (blocksize % 32 == 0)
    if (b != cur) {
      tab = I::make_tab(block_scale(w, b));
      cur = b;
    }
    I::decode32(w.packed + (e >> 1), tab, v);
    I::store_nat32(out, dt, e - e0, v);
  }
  for (; e < e1; ++e) store1(out, dt, e - e0, nf4_elem(w, e));
}

// ---------------------------------------------------------------------------------------------
// conversions

void to_f32(const void* src, int dt, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + W <= n; i += W) I::store(dst + i, I::load_cvt(src, dt, i));
  for (; i < n; ++i) dst[i] = load1(src, dt, i);
}

// dst[(c * rows + m) * 32 + i]: chunk-major, so a K block of all rows is one contiguous range
void to_f32_perm(const void* src, int dt, int64_t rows, int64_t K, float* dst) {
  V v[NV];
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t c = 0; c < K / 32; ++c) {
      I::load_perm32(src, dt, m * K + c * 32, v);
      float* d = dst + (c * rows + m) * 32;
      for (int j = 0; j < NV; ++j) I::store(d + j * W, v[j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// forward, few rows: every weight byte is decoded once per group of G rows of x.
//
// Blocking: a thread's output rows go in tiles of kTileN; for each tile the K axis goes in blocks
// sized so that the G rows' slice of x (chunk-major, so the slice is contiguous) stays in L1 while
// the tile's weight rows stream past it; per (row, x row) vector accumulators live in registers
// within a K block and in a small L1 buffer between blocks; one horizontal sum per output at the end.

constexpr int kTileN = 16;
constexpr int64_t kXBlockBytes = 16 * 1024;

// acc (the base dot product, still a vector, not yet summed) + coef[m] . B[a][n, :]
static inline V add_lora(const xk::FwdSmallArgs& a, int64_t m, int64_t n, V t) {
  const int32_t ad = a.ids[m];
  if (ad >= 0 && a.r > 0) {
    const float* c = a.coef + m * a.rp;
    const int64_t off = (static_cast<int64_t>(ad) * a.N + n) * a.r;
    int64_t j = 0;
    for (; j + W <= a.r; j += W) t = I::fmadd(I::load(c + j), I::load_cvt(a.B, a.b_dt, off + j), t);
    if (j < a.r) t = I::fmadd(I::load(c + j), I::load_cvt_part(a.B, a.b_dt, off + j, static_cast<int>(a.r - j)), t);
  }
  return t;
}

// Weight rows [n, n + R) x columns [kb, ke) against x rows [m0, m0 + G): buf[r][g][s] += partial dots.
template <int G, int R, int S>
static inline void fwd_kblock(const xk::FwdSmallArgs& a, int64_t m0, int64_t n, int64_t kb, int64_t ke, V* buf,
                              bool first) {
  const int64_t K = a.K;
  const int shift = a.w.bs_shift;
  const int64_t bmask = (int64_t{1} << shift) - 1;
  V acc[R][G][S];
  I::Tab tab[R];
  int64_t base[R];
  const uint8_t* p[R];
  for (int r = 0; r < R; ++r) {
    base[r] = (n + r) * K;
    p[r] = a.w.packed + (base[r] >> 1);
    tab[r] = I::make_tab(block_scale(a.w, (base[r] + kb) >> shift));
    for (int g = 0; g < G; ++g)
      for (int s = 0; s < S; ++s) acc[r][g][s] = first ? I::zero() : buf[(r * G + g) * S + s];
  }
  const float* xc = a.xp + ((kb >> 5) * a.M + m0) * 32;
  const int64_t xstride = a.M * 32;
  for (int64_t k = kb; k < ke; k += 32, xc += xstride) {
    V wv[R][NV];
    for (int r = 0; r < R; ++r) {
      if (k != kb && ((base[r] + k) & bmask) == 0) tab[r] = I::make_tab(block_scale(a.w, (base[r] + k) >> shift));
      I::decode32(p[r] + (k >> 1), tab[r], wv[r]);
    }
    for (int g = 0; g < G; ++g) {
      for (int v = 0; v < NV; ++v) {
        V xv = I::load(xc + g * 32 + v * W);
        if (R > 1) I::keep(xv);  // one load feeding R FMAs (the compiler would re-load it per FMA)
        for (int r = 0; r < R; ++r) acc[r][g][v % S] = I::fmadd(wv[r][v], xv, acc[r][g][v % S]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g)
      for (int s = 0; s < S; ++s) buf[(r * G + g) * S + s] = acc[r][g][s];
}

template <int G>
void fwd_group(const xk::FwdSmallArgs& a, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int R = (G * 4 <= I::kMaxAcc) ? 4 : (G * 2 <= I::kMaxAcc ? 2 : 1);
  constexpr int S = (G * R * 2 <= I::kMaxAcc) ? 2 : 1;  // split accumulators when registers allow
  static_assert(kTileN % R == 0, "tile must hold whole row groups");
  const int64_t K = a.K;
  const int64_t kblock = imin(K, imin(int64_t{4096}, kXBlockBytes / (4 * G)) / 32 * 32);  // >= 32: G <= 128
  alignas(64) V buf[kTileN * G * S];
  for (int64_t nt = n0; nt < n1; nt += kTileN) {
    const int64_t ne = imin(nt + kTileN, n1);
    const int64_t n_main = nt + (ne - nt) / R * R;
    for (int64_t kb = 0; kb < K; kb += kblock) {
      const int64_t ke = imin(K, kb + kblock);
      int64_t n = nt;
      for (; n < n_main; n += R) fwd_kblock<G, R, S>(a, m0, n, kb, ke, buf + (n - nt) * G * S, kb == 0);
      for (; n < ne; ++n) fwd_kblock<G, 1, S>(a, m0, n, kb, ke, buf + (n - nt) * G * S, kb == 0);
    }
    // y[m, n] = sum of the accumulator vector (+ LoRA): W outputs at a time through one transposing
    // reduction (a few shuffles per output instead of a full horizontal sum each), stored as a vector
    for (int g = 0; g < G; ++g) {
      const int64_t m = m0 + g;
      int64_t n = nt;
      for (; n + W <= ne; n += W) {
        V t[W];
        for (int i = 0; i < W; ++i) {
          const V* b = buf + ((n + i - nt) * G + g) * S;
          t[i] = add_lora(a, m, n + i, S == 2 ? I::add(b[0], b[S - 1]) : b[0]);
        }
        I::store_cvt(a.y, a.y_dt, m * a.N + n, I::hsum_many(t));
      }
      for (; n < ne; ++n) {
        const V* b = buf + ((n - nt) * G + g) * S;
        store1(a.y, a.y_dt, m * a.N + n, I::hsum(add_lora(a, m, n, S == 2 ? I::add(b[0], b[S - 1]) : b[0])));
      }
    }
  }
}

template <int G>
static inline void fwd_dispatch(const xk::FwdSmallArgs& a, int g, int64_t m0, int64_t n0, int64_t n1) {
  if constexpr (G >= 1) {
    if (g == G) {
      fwd_group<G>(a, m0, n0, n1);
    } else {
      fwd_dispatch<G - 1>(a, g, m0, n0, n1);
    }
  }
}

void fwd_small(const xk::FwdSmallArgs& a, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < a.M; m0 += I::kGroupFwd) {
    const int g = static_cast<int>(imin(I::kGroupFwd, a.M - m0));
    fwd_dispatch<I::kGroupFwd>(a, g, m0, n0, n1);
  }
}

// ---------------------------------------------------------------------------------------------
// input grad, few rows: a thread owns 32-chunks of K and walks the W rows in blocks of kIgRows
// (their bytes of the thread's chunks stay in L1/L2 and their pages in the TLB while every chunk
// group passes over them); within a block the accumulators of CW chunks x G rows stay in registers,
// between blocks they wait in dx itself (in the permuted layout), which the last pass turns into
// natural order after adding the LoRA term.

constexpr int64_t kIgRows = 64;

template <int G, int CW>
void igrad_chunks(const xk::IgradSmallArgs& a, int64_t m0, int64_t c, int64_t n0, int64_t n1) {
  const int64_t K = a.K, N = a.N;
  const int shift = a.w.bs_shift;
  const int64_t k0 = c * 32;
  V acc[G][CW][NV];
  for (int g = 0; g < G; ++g)
    for (int cw = 0; cw < CW; ++cw)
      for (int v = 0; v < NV; ++v)
        acc[g][cw][v] = n0 == 0 ? I::zero() : I::load(a.dx + (m0 + g) * K + k0 + cw * 32 + v * W);
  const float* dy = a.dy + m0 * N;
  const int64_t row_bytes = K >> 1;
  const uint8_t* p = a.w.packed + ((n0 * K + k0) >> 1);
  constexpr int kPrefetchRows = 8;
  for (int64_t n = n0; n < n1; ++n, p += row_bytes) {
    if (n + kPrefetchRows < n1) I::prefetch(p + kPrefetchRows * row_bytes);
    const int64_t base = n * K + k0;
    int64_t cur = -1;
    I::Tab tab{};
    V d[G];
    for (int g = 0; g < G; ++g) d[g] = I::set1(dy[g * N + n]);
    for (int cw = 0; cw < CW; ++cw) {
      const int64_t b = (base + cw * 32) >> shift;
      if (b != cur) {
        tab = I::make_tab(block_scale(a.w, b));
        cur = b;
      }
      V wv[NV];
      I::decode32(p + cw * 16, tab, wv);
      for (int g = 0; g < G; ++g)
        for (int v = 0; v < NV; ++v) acc[g][cw][v] = I::fmadd(wv[v], d[g], acc[g][cw][v]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int cw = 0; cw < CW; ++cw)
      for (int v = 0; v < NV; ++v) I::store(a.dx + (m0 + g) * K + k0 + cw * 32 + v * W, acc[g][cw][v]);
}

// dx rows [m0, m0 + G), chunks [c0, c1): permuted partial sums -> + LoRA term -> natural order
template <int G>
void igrad_finish(const xk::IgradSmallArgs& a, int64_t m0, int64_t c0, int64_t c1) {
  const int64_t K = a.K;
  for (int g = 0; g < G; ++g) {
    const int64_t m = m0 + g;
    const int32_t ad = a.ids[m];
    for (int64_t c = c0; c < c1; ++c) {
      float* d = a.dx + m * K + c * 32;
      V acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = I::load(d + v * W);
      if (ad >= 0) {
        for (int64_t j = 0; j < a.r; ++j) {
          const V cj = I::set1(a.coef[m * a.r + j]);
          V av[NV];
          I::load_perm32(a.A, a.a_dt, (static_cast<int64_t>(ad) * a.r + j) * K + c * 32, av);
          for (int v = 0; v < NV; ++v) acc[v] = I::fmadd(av[v], cj, acc[v]);
        }
      }
      I::store_nat32(d, xk::kF32, 0, acc);
    }
  }
}

template <int G>
void igrad_group(const xk::IgradSmallArgs& a, int64_t m0, int64_t c0, int64_t c1) {
  constexpr int CW = (G * 4 * NV <= I::kMaxAccIg) ? 4 : (G * 2 * NV <= I::kMaxAccIg ? 2 : 1);
  for (int64_t n0 = 0; n0 < a.N; n0 += kIgRows) {
    const int64_t n1 = imin(a.N, n0 + kIgRows);
    int64_t c = c0;
    for (; c + CW <= c1; c += CW) igrad_chunks<G, CW>(a, m0, c, n0, n1);
    for (; c < c1; ++c) igrad_chunks<G, 1>(a, m0, c, n0, n1);
  }
  igrad_finish<G>(a, m0, c0, c1);
}

template <int G>
static inline void igrad_dispatch(const xk::IgradSmallArgs& a, int g, int64_t m0, int64_t c0, int64_t c1) {
  if constexpr (G >= 1) {
    if (g == G) {
      igrad_group<G>(a, m0, c0, c1);
    } else {
      igrad_dispatch<G - 1>(a, g, m0, c0, c1);
    }
  }
}

void igrad_small(const xk::IgradSmallArgs& a, int64_t c0, int64_t c1) {
  for (int64_t m0 = 0; m0 < a.M; m0 += I::kGroupIg) {
    const int g = static_cast<int>(imin(I::kGroupIg, a.M - m0));
    igrad_dispatch<I::kGroupIg>(a, g, m0, c0, c1);
  }
}

// ---------------------------------------------------------------------------------------------
// LoRA shrinks, each row against its own adapter only

void shrink_fwd(const xk::ShrinkArgs& a, int64_t m0, int64_t m1) {
  const int64_t K = a.K;
  for (int64_t m = m0; m < m1; ++m) {
    float* out = a.out + m * a.r;
    const int32_t ad = a.ids[m];
    if (ad < 0) {
      for (int64_t j = 0; j < a.r; ++j) out[j] = 0.f;
      continue;
    }
    const float* x = a.act + m * K;
    for (int64_t j = 0; j < a.r; ++j) {
      const int64_t off = (static_cast<int64_t>(ad) * a.r + j) * K;
      V s0 = I::zero(), s1 = I::zero(), s2 = I::zero(), s3 = I::zero();
      int64_t k = 0;
      for (; k + 4 * W <= K; k += 4 * W) {
        s0 = I::fmadd(I::load(x + k), I::load_cvt(a.lora, a.lora_dt, off + k), s0);
        s1 = I::fmadd(I::load(x + k + W), I::load_cvt(a.lora, a.lora_dt, off + k + W), s1);
        s2 = I::fmadd(I::load(x + k + 2 * W), I::load_cvt(a.lora, a.lora_dt, off + k + 2 * W), s2);
        s3 = I::fmadd(I::load(x + k + 3 * W), I::load_cvt(a.lora, a.lora_dt, off + k + 3 * W), s3);
      }
      for (; k + W <= K; k += W) s0 = I::fmadd(I::load(x + k), I::load_cvt(a.lora, a.lora_dt, off + k), s0);
      float tail = 0.f;
      for (; k < K; ++k) tail += x[k] * load1(a.lora, a.lora_dt, off + k);
      out[j] = I::hsum(I::add(I::add(s0, s1), I::add(s2, s3))) + tail;
    }
  }
}

void shrink_igrad(const xk::ShrinkArgs& a, int64_t m0, int64_t m1) {
  const int64_t N = a.N, r = a.r;
  for (int64_t m = m0; m < m1; ++m) {
    float* out = a.out + m * r;
    const int32_t ad = a.ids[m];
    if (ad < 0) {
      for (int64_t j = 0; j < r; ++j) out[j] = 0.f;
      continue;
    }
    const float* dy = a.act + m * N;
    const int64_t base = static_cast<int64_t>(ad) * N * r;
    for (int64_t j = 0; j < r; j += W) {
      const int cnt = static_cast<int>(imin(W, r - j));
      V s0 = I::zero(), s1 = I::zero();
      int64_t n = 0;
      if (cnt == W) {
        for (; n + 2 <= N; n += 2) {
          s0 = I::fmadd(I::set1(dy[n]), I::load_cvt(a.lora, a.lora_dt, base + n * r + j), s0);
          s1 = I::fmadd(I::set1(dy[n + 1]), I::load_cvt(a.lora, a.lora_dt, base + (n + 1) * r + j), s1);
        }
        for (; n < N; ++n) s0 = I::fmadd(I::set1(dy[n]), I::load_cvt(a.lora, a.lora_dt, base + n * r + j), s0);
      } else {
        for (; n < N; ++n) s0 = I::fmadd(I::set1(dy[n]), I::load_cvt_part(a.lora, a.lora_dt, base + n * r + j, cnt), s0);
      }
      alignas(64) float tmp[W];
      I::store(tmp, I::add(s0, s1));
      for (int i = 0; i < cnt; ++i) out[j + i] = tmp[i];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// bf16 split operands for the AMX matmul path (see kernels.h)

void decode_bf16_split(const xk::NF4W& w, int64_t K, int64_t n0, int64_t rows, uint16_t* hi, uint16_t* lo) {
  const int shift = w.bs_shift;
  if constexpr (I::kHasBf16Tables) {
    // hi and lo parts of the block's 16 scaled codes, looked up directly (64 weights a step): the same
    // roundings as the generic path below, computed once per block instead of once per weight
    if (shift >= 6 && K % 64 == 0) {
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t base = (n0 + i) * K;
        I::Bf16Tab tab{};
        for (int64_t k = 0; k < K; k += 64) {
          if (k == 0 || ((base + k) & ((int64_t{1} << shift) - 1)) == 0)
            tab = I::make_bf16_tab(block_scale(w, (base + k) >> shift));
          I::decode64_bf16(w.packed + ((base + k) >> 1), tab, hi + i * K + k, lo + i * K + k);
        }
      }
      return;
    }
  }
  V v[NV];
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t base = (n0 + i) * K;
    int64_t cur = -1;
    I::Tab tab{};
    for (int64_t k = 0; k < K; k += 32) {
      const int64_t b = (base + k) >> shift;
      if (b != cur) {
        tab = I::make_tab(block_scale(w, b));
        cur = b;
      }
      I::decode32(w.packed + ((base + k) >> 1), tab, v);
      const int64_t o = i * K + k;
      for (int j = 0; j < NV; ++j) I::store_bf16_split(hi + o + j * W, lo + o + j * W, v[j]);
    }
  }
}

void pack_x_vnni(const void* x, int dt, int64_t M, int64_t K, int64_t m0, int64_t m1, uint16_t* out) {
  alignas(64) float buf[32];
  V v[NV];
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t c = 0; c < K; c += 32) {
      I::load_perm32(x, dt, m * K + c, v);
      for (int j = 0; j < NV; ++j) I::store(buf + j * W, v[j]);
      for (int p = 0; p < 32; p += 2) {
        uint16_t* o = out + (((c + p) >> 1) * M + m) * 2;
        o[0] = f32_to_bf16(buf[p]);
        o[1] = f32_to_bf16(buf[p + 1]);
      }
    }
  }
}

const xk::KernelTable kTable = {
    XK_ISA_NAME, dequant, to_f32, to_f32_perm, fwd_small, igrad_small, shrink_fwd, shrink_igrad,
    decode_bf16_split, pack_x_vnni,
};
