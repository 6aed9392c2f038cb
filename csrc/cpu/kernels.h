// xkern native CPU kernels: the plain C++17 layer (no torch headers).
//
// One table of function pointers per instruction set (scalar, AVX2, AVX-512), each compiled in its
// own translation unit with `#pragma GCC target(...)`; the binding (binding.cpp) picks one at run
// time, validates every tensor and drives the parallelism (at::parallel_for) over the ranges these
// functions take. Nothing here allocates, throws or knows about threads.
//
// NF4 format (xkern/nf4.py): element e of the row-major flattened [N, K] weight is nibble
// `packed[e / 2] >> 4` when e is even, `packed[e / 2] & 15` when odd; its value is
// `code[q] * scale(e >> bs_shift)`, scale = absmax[b] or, double-quantized,
// `code2[qabsmax[b]] * absmax2[b >> 8] + offset`.
#pragma once

#include <cstdint>

namespace xk {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct NF4W {
  const uint8_t* packed = nullptr;
  const float* absmax = nullptr;    // float32 block scales (plain), or nullptr
  const uint8_t* qabsmax = nullptr;  // uint8 codes (double quant), or nullptr
  const float* absmax2 = nullptr;
  const float* code2 = nullptr;
  float offset = 0.f;
  int bs_shift = 6;  // log2(blocksize)
};

// Forward for few rows (GEMV): y[m, n] = x[m] . W[n] + [a >= 0] coef[m] . B[a][n], a = ids[m],
// for rows n in [n0, n1) and every m < M (any M: groups of rows, the weight decoded once per group).
// Needs K % 32 == 0.
struct FwdSmallArgs {
  NF4W w;
  int64_t N = 0, K = 0, M = 0;
  // x as float32 [K / 32][M][32]: chunk-major, each 32-chunk permuted (its 16 even, then 16 odd elements)
  const float* xp = nullptr;
  const int32_t* ids = nullptr;  // [M]
  const float* coef = nullptr;   // [M][rp] scale[a] * xa[m], zero padded to rp (a multiple of 16)
  int64_t r = 0, rp = 0;
  const void* B = nullptr;  // [n_adapters][N][r] in b_dt
  int b_dt = kF32;
  void* y = nullptr;  // [M][N] in y_dt
  int y_dt = kF32;
};

// Input grad for few rows: dx[m, k] = sum_n dy[m, n] W[n, k] + [a >= 0] sum_j coef[m, j] A[a][j, k], for
// the 32-element chunks [c0, c1) of K and every m < M (any M: groups of rows, the weight decoded once
// per group). Needs K % 32 == 0.
struct IgradSmallArgs {
  NF4W w;
  int64_t N = 0, K = 0, M = 0;
  const float* dy = nullptr;     // [M][N] float32
  const int32_t* ids = nullptr;  // [M]
  const float* coef = nullptr;   // [M][r] scale[a] * g[m]
  int64_t r = 0;
  const void* A = nullptr;  // [n_adapters][r][K] in a_dt
  int a_dt = kF32;
  float* dx = nullptr;  // [M][K] float32 (also holds the thread's partial sums until its chunks are done)
};

// LoRA shrinks for the rows [m0, m1) (rows with ids[m] < 0 get zeros):
//   forward: out[m, j] = sum_k x[m, k] A[a][j, k]          (x float32 [M][K], A [na][r][K])
//   igrad:   out[m, j] = sum_n dy[m, n] B[a][n, j]         (dy float32 [M][N], B [na][N][r])
struct ShrinkArgs {
  const float* act = nullptr;  // x [M][K] or dy [M][N]
  int64_t M = 0, N = 0, K = 0, r = 0;
  const int32_t* ids = nullptr;
  const void* lora = nullptr;  // A (forward) or B (igrad)
  int lora_dt = kF32;
  float* out = nullptr;  // [M][r]
};

struct KernelTable {
  const char* name;
  // Dequantize the flat elements [e0, e1) into out (element e0 first), any alignment.
  void (*dequant)(const NF4W& w, int64_t e0, int64_t e1, void* out, int out_dt);
  // src [rows][cols] in src_dt -> float32 dst, same layout.
  void (*to_f32)(const void* src, int src_dt, int64_t n, float* dst);
  // src [rows][K] in src_dt -> float32 dst [K / 32][rows][32], each chunk permuted (K % 32 == 0).
  void (*to_f32_perm)(const void* src, int src_dt, int64_t rows, int64_t K, float* dst);
  void (*fwd_small)(const FwdSmallArgs& a, int64_t n0, int64_t n1);
  void (*igrad_small)(const IgradSmallArgs& a, int64_t c0, int64_t c1);
  void (*shrink_fwd)(const ShrinkArgs& a, int64_t m0, int64_t m1);
  void (*shrink_igrad)(const ShrinkArgs& a, int64_t m0, int64_t m1);
  // Operands of the bf16 matmul path (AMX through ATen's brgemm), K % 32 == 0, K in the permuted
  // order of each 32-chunk on both sides (a dot product does not care about the order):
  //   decode_bf16_split: weight rows [n0, n0 + rows) -> hi, lo [rows][K] with W = hi + lo + O(2^-18 |W|);
  //   pack_x_vnni: rows [m0, m1) of x [M][K] -> bf16 (rounded to nearest even; exact for a bf16 x)
  //     in the VNNI layout [K / 2][M][2] of a [K, M] operand.
  void (*decode_bf16_split)(const NF4W& w, int64_t K, int64_t n0, int64_t rows, uint16_t* hi, uint16_t* lo);
  void (*pack_x_vnni)(const void* x, int x_dt, int64_t M, int64_t K, int64_t m0, int64_t m1, uint16_t* out);
};

// ---- AVX512-BF16 additions (native bf16 precision), used on top of the AVX-512 table ----

constexpr int64_t kLoraBf16MaxRank = 256;  // padded ranks the fused bf16 LoRA kernel takes
constexpr int64_t kLoraBf16Rows = 16;      // rows of one adapter per register block

// The LoRA terms of rows rows[i0:i1) (all of one adapter), bf16 operands, float32 accumulation:
//   mid[row, j] = act[row] . S[:, j]  (j < r, float32)
//   out[row, n] += bf16(scale * mid[row]) . E[:, n]  (out bf16, rounded once, or float32)
// forward: act = x [M][K], S = A^T, E = B^T; input grad: act = dy [M][N], S = B, E = A.
struct LoraBf16Args {
  const uint16_t* act = nullptr;  // bf16 [M][n_red]
  int64_t n_red = 0;
  const int32_t* rows = nullptr;
  const uint16_t* shrink = nullptr;  // bf16 [ceil(n_red / 2)][rp][2]: S[2p + t][j] at (p, j, t), zero padded
  const uint16_t* expand = nullptr;  // bf16 [rp / 2][n_out][2]: E[2q + t][n] at (q, n, t), zero padded
  int64_t r = 0, rp = 0;             // rank and its padding to a multiple of 16 (<= kLoraBf16MaxRank)
  int64_t n_out = 0;
  float scale = 1.f;
  float* mid = nullptr;  // [M][r]
  void* out = nullptr;   // [M][n_out] in out_dt (kBF16 or kF32)
  int out_dt = kBF16;
};

// GEMV of few rows in bf16: y[m, n] = x[m] . bf16(W[n]) + [a >= 0] coef[m] . B[a][n], rows n in [n0, n1).
// Needs K % 32 == 0.
struct GemvBf16Args {
  NF4W w;
  int64_t N = 0, K = 0, M = 0;
  const uint16_t* x = nullptr;   // bf16 [K / 32][M][32], natural order inside a chunk
  const int32_t* ids = nullptr;  // [M]
  const float* coef = nullptr;   // [M][r] scale[a] * xa[m]
  int64_t r = 0;
  const void* B = nullptr;  // [n_adapters][N][r] in b_dt
  int b_dt = kF32;
  void* y = nullptr;  // [M][N] bf16
};

struct Bf16Kernels {
  void (*lora_rows)(const LoraBf16Args& a, int64_t i0, int64_t i1);
  void (*gemv)(const GemvBf16Args& a, int64_t n0, int64_t n1);
};

const Bf16Kernels* kernels_avx512bf16();  // nullptr when not compiled

const KernelTable* kernels_scalar();
const KernelTable* kernels_avx2();    // nullptr when not compiled (non-x86 compilers)
const KernelTable* kernels_avx512();  // nullptr when not compiled

}  // namespace xk
