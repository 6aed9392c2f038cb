// xkern._cpu: native CPU kernels for the NF4 + multi-adapter LoRA linear (pybind11 bindings).
//
// This file owns everything torch: argument checks, allocation, the choice of path, threading
// (at::parallel_for, so torch.set_num_threads is honoured and a call from inside a parallel region
// runs inline) and the instruction set (chosen at run time). The kernels themselves
// (kernels_<isa>.cpp) are plain C++ over raw pointers.
//
// Paths (both compute in float32 with float32 accumulation, exactly the reference's semantics):
//  * few rows (M <= gemv_rows(), 16 by default) and K % 32 == 0: fused GEMV kernels that decode every weight byte once
//    for a group of up to 16 rows (forward: threads own output rows n; input grad: threads own
//    32-column chunks of K and walk the weight rows); the LoRA expand joins the same pass.
//  * otherwise: the weight is decoded into a float32 slab of rows (threads split the slab) and
//    multiplied with at::mm (MKL/oneDNN), slab after slab; the LoRA terms run per adapter segment
//    (gather the segment's rows, two small matmuls, scatter-add).
//  * forward of a bf16 x with AMX (isa avx512 on a CPU whose bf16 brgemm ATen can pack, K % 32 == 0,
//    M > 16): each thread decodes a tile of weight rows to bf16 hi + lo parts (W = hi + lo +
//    O(2^-18 |W|), kept in L2) and multiplies both with x (exact in bf16) through ATen's brgemm
//    (oneDNN ukernel, AMX tiles, float32 accumulation): two bf16 products, ~1e-6 of the output
//    before the final rounding to bf16, where a single bf16 product of the weight (bitsandbytes'
//    default path) is ~1e-3. For float32 / float16 x, 4 such products measured no faster than the
//    float32 slab path, which stays exact to ~1e-7, so they keep it.
// ATen + torch's pybind11 casters only (not <torch/extension.h>, which pulls in all of libtorch's C++
// API and doubles this file's compile time).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>
#if __has_include(<ATen/native/CPUBlas.h>)
#include <ATen/native/CPUBlas.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

using xk::KernelTable;

constexpr int64_t kSmallRows = 16;           // default largest M on the fused GEMV paths
constexpr int64_t kSlabBytes = 8 << 20;      // float32 bytes of one decoded weight slab
constexpr int64_t kBf16SlabBytes = 32 << 20; // bf16 bytes of one decoded weight slab (native bf16 path)
constexpr int64_t kNestedBlock = 256;
constexpr int64_t kAmxTileRows = 64;         // weight rows a thread decodes (bf16 hi + lo) and multiplies
constexpr int64_t kAmxTileCols = 128;        // rows of x per brgemm call
constexpr int64_t kAmxKBlock = 1024;         // K per brgemm call (a multiple of 32)

// ------------------------------------------------------------------------------------------------
// instruction set

bool cpu_supports(const std::string& isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa == "avx512_bf16") {
    return xk::kernels_avx512bf16() != nullptr && cpu_supports("avx512") && __builtin_cpu_supports("avx512bf16");
  }
  if (isa == "avx512") {
    return xk::kernels_avx512() != nullptr && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2");
  }
  if (isa == "avx2") {
    return xk::kernels_avx2() != nullptr && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }
#endif
  return isa == "scalar";
}

// "avx512_bf16": the AVX-512 kernels, plus the AVX512-BF16 ones (bf16_kernels) for the native bf16 precision
const KernelTable* avx512_bf16_table() {
  static const KernelTable table = [] {
    KernelTable t = *xk::kernels_avx512();
    t.name = "avx512_bf16";
    return t;
  }();
  return &table;
}

bool is_avx512(const KernelTable* kt) { return std::string(kt->name).rfind("avx512", 0) == 0; }

// The AVX512-BF16 kernels under the "avx512_bf16" instruction set, else nullptr (the native bf16 precision
// then runs its GEMV in float32 and its LoRA terms through ATen's bf16 matmuls).
const xk::Bf16Kernels* bf16_kernels(const KernelTable* kt) {
  return std::string(kt->name) == "avx512_bf16" ? xk::kernels_avx512bf16() : nullptr;
}

const KernelTable* table_for(const std::string& isa) {
  if (isa == "avx512_bf16") return avx512_bf16_table();
  if (isa == "avx512") return xk::kernels_avx512();
  if (isa == "avx2") return xk::kernels_avx2();
  return xk::kernels_scalar();
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* isa : {"avx512_bf16", "avx512", "avx2", "scalar"})
    if (cpu_supports(isa)) out.emplace_back(isa);
  return out;
}

std::atomic<const KernelTable*> g_kernels{nullptr};

// Largest M on the GEMV paths; settable (private _set_gemv_rows) so tests can drive every path with
// any M and benchmarks can find the crossover.
std::atomic<int64_t> g_gemv_rows{kSmallRows};
int64_t gemv_rows() { return g_gemv_rows.load(std::memory_order_relaxed); }
int64_t set_gemv_rows(int64_t rows) {
  TORCH_CHECK_VALUE(rows >= 0, "the GEMV row limit must be >= 0, got ", rows);
  return g_gemv_rows.exchange(rows);
}

const KernelTable* kernels() {
  const KernelTable* kt = g_kernels.load(std::memory_order_acquire);
  if (!kt) {
    kt = table_for(supported_isas().front());
    g_kernels.store(kt, std::memory_order_release);
  }
  return kt;
}

std::string isa() { return kernels()->name; }

#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define XK_HAVE_BRGEMM 1
bool amx_available() {
  static const bool ok = at::native::cpublas::could_pack(at::kBFloat16);
  return ok;
}
#else
bool amx_available() { return false; }
#endif

// The AMX forward path: bf16 x, under the avx512 instruction set only (avx2 / scalar test the others).
bool use_amx(const KernelTable* kt, int x_dt, int64_t M, int64_t K) {
  return x_dt == xk::kBF16 && is_avx512(kt) && K % 32 == 0 && M > gemv_rows() && amx_available();
}

void set_isa(const std::string& name) {
  TORCH_CHECK_VALUE(name == "avx512_bf16" || name == "avx512" || name == "avx2" || name == "scalar",
                    "unknown instruction set '", name, "'; expected 'avx512_bf16', 'avx512', 'avx2' or 'scalar'");
  TORCH_CHECK_VALUE(cpu_supports(name), "this CPU cannot run the '", name, "' kernels (supported: ",
                    c10::Join(", ", supported_isas()), ")");
  g_kernels.store(table_for(name), std::memory_order_release);
}

std::string build_info() {
  std::string s = "xkern._cpu: NF4 + multi-adapter LoRA CPU kernels; compiled ISAs: scalar";
  if (xk::kernels_avx2()) s += ", avx2";
  if (xk::kernels_avx512()) s += ", avx512";
  if (xk::kernels_avx512bf16()) s += ", avx512_bf16";
  s += "; this CPU supports: " + c10::Join(", ", supported_isas());
  s += "; in use: " + isa();
#if defined(__VERSION__)
  s += "; compiler: " + std::string(__VERSION__);
#endif
  s += "; threads: " + std::to_string(at::get_num_threads());
  s += "; fused GEMV paths for M <= " + std::to_string(gemv_rows()) + " and K % 32 == 0";
  s += amx_available() ? "; AMX bf16 hi/lo matmul (ATen brgemm) for exact bf16 x and larger M under avx512"
                       : "; no AMX brgemm (float32 slab matmul for exact larger M)";
  s += bf16_kernels(kernels()) ? "; native bf16: vdpbf16ps GEMV and LoRA kernels, oneDNN bf16 GEMM"
                               : "; native bf16: float32 GEMV, oneDNN bf16 GEMM and LoRA matmuls";
  return s;
}

// ------------------------------------------------------------------------------------------------
// argument checks

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " is undefined");
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

int float_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return xk::kF32;
    case at::kBFloat16:
      return xk::kBF16;
    case at::kHalf:
      return xk::kF16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return xk::kF32;  // unreachable
}

void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, name, " must be ", want, ", got ", t.scalar_type());
}

// The weight: checks every part against numel and blocksize and returns the raw view.
xk::NF4W make_weight(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& absmax2,
                     const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset, int64_t numel,
                     int64_t blocksize) {
  TORCH_CHECK_VALUE(numel > 0, "the weight must have at least one element, got numel ", numel);
  int shift = -1;
  for (int s = 5; s <= 12; ++s)
    if (blocksize == (int64_t{1} << s)) shift = s;
  TORCH_CHECK_VALUE(shift >= 0, "blocksize must be a power of two in [32, 4096], got ", blocksize);
  check_cpu(packed, "packed");
  check_dtype(packed, at::kByte, "packed");
  TORCH_CHECK_VALUE(packed.numel() == (numel + 1) / 2, "packed has ", packed.numel(), " bytes, ", numel,
                    " elements need ", (numel + 1) / 2);
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  check_cpu(absmax, "absmax");
  TORCH_CHECK_VALUE(absmax.numel() == n_blocks, "absmax has ", absmax.numel(), " entries, expected ", n_blocks);
  const bool nested = absmax2.has_value() || code2.has_value() || offset.has_value();
  xk::NF4W w;
  w.packed = packed.data_ptr<uint8_t>();
  w.bs_shift = shift;
  if (!nested) {
    check_dtype(absmax, at::kFloat, "absmax (not double-quantized)");
    w.absmax = absmax.data_ptr<float>();
    return w;
  }
  TORCH_CHECK_VALUE(absmax2.has_value() && code2.has_value() && offset.has_value(),
                    "double quantization needs absmax2, code2 and offset together");
  check_dtype(absmax, at::kByte, "absmax (double-quantized)");
  check_cpu(*absmax2, "absmax2");
  check_cpu(*code2, "code2");
  check_cpu(*offset, "offset");
  check_dtype(*absmax2, at::kFloat, "absmax2");
  check_dtype(*code2, at::kFloat, "code2");
  check_dtype(*offset, at::kFloat, "offset");
  TORCH_CHECK_VALUE(absmax2->numel() == (n_blocks + kNestedBlock - 1) / kNestedBlock, "absmax2 has ",
                    absmax2->numel(), " entries, expected ", (n_blocks + kNestedBlock - 1) / kNestedBlock);
  TORCH_CHECK_VALUE(code2->numel() == 256, "code2 must have 256 entries, got ", code2->numel());
  TORCH_CHECK_VALUE(offset->numel() == 1, "offset must have one element, got ", offset->numel());
  w.qabsmax = absmax.data_ptr<uint8_t>();
  w.absmax2 = absmax2->data_ptr<float>();
  w.code2 = code2->data_ptr<float>();
  w.offset = offset->data_ptr<float>()[0];
  return w;
}

struct Lora {
  int64_t n_adapters = 0, r = 0;
  int a_dt = xk::kF32, b_dt = xk::kF32;
};

// lora_A [na, r, K], lora_B [na, N, r], scale float32 [na], and the routing: ids [M] in [-1, na),
// order a permutation of the rows, starts [na + 2] with rows order[starts[j]:starts[j + 1]] all of
// adapter j - 1. Checked in full (O(M)), so no kernel can read out of bounds whatever the caller.
Lora check_lora(const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scale, const at::Tensor& ids,
                const at::Tensor& order, const at::Tensor& starts, int64_t M, int64_t N, int64_t K) {
  check_cpu(lora_A, "lora_A");
  check_cpu(lora_B, "lora_B");
  check_cpu(scale, "scale");
  check_cpu(ids, "ids");
  check_cpu(order, "order");
  check_cpu(starts, "starts");
  Lora l;
  l.a_dt = float_dtype(lora_A, "lora_A");
  l.b_dt = float_dtype(lora_B, "lora_B");
  TORCH_CHECK_VALUE(lora_A.dim() == 3, "lora_A must be [n_adapters, r, K], got shape ", lora_A.sizes());
  l.n_adapters = lora_A.size(0);
  l.r = lora_A.size(1);
  TORCH_CHECK_VALUE(lora_A.size(2) == K, "lora_A must be [n_adapters, r, ", K, "], got ", lora_A.sizes());
  TORCH_CHECK_VALUE(lora_B.dim() == 3 && lora_B.size(0) == l.n_adapters && lora_B.size(1) == N && lora_B.size(2) == l.r,
                    "lora_B must be [", l.n_adapters, ", ", N, ", ", l.r, "], got ", lora_B.sizes());
  check_dtype(scale, at::kFloat, "scale");
  TORCH_CHECK_VALUE(scale.numel() == l.n_adapters, "scale must have ", l.n_adapters, " entries, got ", scale.numel());
  check_dtype(ids, at::kInt, "ids");
  check_dtype(order, at::kInt, "order");
  check_dtype(starts, at::kInt, "starts");
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.numel() == M, "ids must be [", M, "], got ", ids.sizes());
  TORCH_CHECK_VALUE(order.dim() == 1 && order.numel() == M, "order must be [", M, "], got ", order.sizes());
  TORCH_CHECK_VALUE(starts.dim() == 1 && starts.numel() == l.n_adapters + 2, "starts must be [", l.n_adapters + 2,
                    "], got ", starts.sizes());
  const int32_t* id = ids.data_ptr<int32_t>();
  const int32_t* ord = order.data_ptr<int32_t>();
  const int32_t* st = starts.data_ptr<int32_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK_VALUE(id[m] >= -1 && id[m] < l.n_adapters, "ids[", m, "] = ", id[m], " is outside [-1, ",
                      l.n_adapters, ")");
  TORCH_CHECK_VALUE(st[0] == 0 && st[l.n_adapters + 1] == M, "starts must begin at 0 and end at M = ", M);
  std::vector<char> seen(static_cast<size_t>(M), 0);
  for (int64_t j = 0; j <= l.n_adapters; ++j) {
    TORCH_CHECK_VALUE(st[j] <= st[j + 1], "starts must be non-decreasing (starts[", j, "] = ", st[j], " > starts[",
                      j + 1, "] = ", st[j + 1], ")");
    for (int64_t i = st[j]; i < st[j + 1]; ++i) {
      const int32_t row = ord[i];
      TORCH_CHECK_VALUE(row >= 0 && row < M && !seen[row], "order must be a permutation of the ", M,
                        " rows (order[", i, "] = ", row, ")");
      seen[row] = 1;
      TORCH_CHECK_VALUE(id[row] == j - 1, "order/starts do not match ids: row ", row, " (ids = ", id[row],
                        ") lies in the segment of adapter ", j - 1);
    }
  }
  return l;
}

void check_x(const at::Tensor& x, int64_t K, const char* name) {
  check_cpu(x, name);
  float_dtype(x, name);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == K, name, " must be [M, ", K, "], got ", x.sizes());
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// float32 copy of a [rows, cols] activation (the tensor itself when already float32)
at::Tensor as_f32(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return t;
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(at::kFloat));
  const KernelTable* kt = kernels();
  const int dt = float_dtype(t, "activation");
  const void* src = t.data_ptr();
  float* dst = out.data_ptr<float>();
  const int64_t esize = t.element_size();
  at::parallel_for(0, t.numel(), 1 << 16, [&](int64_t b, int64_t e) {
    kt->to_f32(static_cast<const char*>(src) + b * esize, dt, e - b, dst + b);
  });
  return out;
}

// Decodes weight rows [n0, n0 + nb) into slab ([nb, K] float32), threads splitting the elements.
void decode_rows(const KernelTable* kt, const xk::NF4W& w, int64_t K, int64_t n0, int64_t nb, float* slab) {
  const int64_t e0 = n0 * K;
  at::parallel_for(0, nb * K, 1 << 14, [&](int64_t b, int64_t e) { kt->dequant(w, e0 + b, e0 + e, slab + b, xk::kF32); });
}

int64_t slab_rows(int64_t N, int64_t K) { return std::max<int64_t>(1, std::min<int64_t>(N, kSlabBytes / (4 * K))); }

// Decodes weight rows [n0, n0 + nb) into a bf16 slab ([nb, K]), each weight rounded to bf16 once.
void decode_rows_bf16(const KernelTable* kt, const xk::NF4W& w, int64_t K, int64_t n0, int64_t nb, at::Tensor& slab) {
  const int64_t e0 = n0 * K;
  auto* out = reinterpret_cast<uint16_t*>(slab.data_ptr());
  at::parallel_for(0, nb * K, 1 << 15, [&](int64_t b, int64_t e) { kt->dequant(w, e0 + b, e0 + e, out + b, xk::kBF16); });
}

// bf16 slabs hold more rows than float32 ones: the whole weight of every common projection fits one
int64_t slab_rows_bf16(int64_t N, int64_t K) {
  return std::max<int64_t>(1, std::min<int64_t>(N, kBf16SlabBytes / (2 * K)));
}



at::Tensor seg_rows(const at::Tensor& order, int64_t s0, int64_t s1) {
  return order.narrow(0, s0, s1 - s0).to(at::kLong);
}

// First row of a segment whose rows are consecutive in the batch (order is increasing inside a segment,
// so the rows are consecutive exactly when the last is first + count - 1), else -1. Samples keep their
// rows together and X-Cross stacks streams, so most segments are ranges: views instead of gathers.
int64_t seg_range(const at::Tensor& order, int64_t s0, int64_t s1) {
  const int32_t* o = order.data_ptr<int32_t>();
  return o[s1 - 1] - o[s0] == s1 - s0 - 1 ? o[s0] : -1;
}

// Whether the LoRA can be folded into the weight per segment: every segment (base rows included) is a range
// of consecutive rows, and every adapter's segment has at least 8 r rows (so W + s B A costs little next to
// the segment's matmul).
bool foldable(const at::Tensor& order, const at::Tensor& starts, int64_t n_adapters, int64_t r) {
  const int32_t* st = starts.data_ptr<int32_t>();
  for (int64_t j = 0; j <= n_adapters; ++j) {
    const int64_t s0 = st[j], s1 = st[j + 1];
    if (s1 == s0) continue;
    if (seg_range(order, s0, s1) < 0) return false;
    if (j > 0 && s1 - s0 < 8 * r) return false;
  }
  return true;
}

// Every adapter folded into the decoded weight, one matmul pass per segment (the caller checked foldable()):
// forward  out[seg] = act[seg] (W + s B A)^T and returns xa[seg] = act[seg] A^T,
// transposed (input grad) out[seg] = act[seg] (W + s B A) and returns g[seg] = act[seg] B;
// base-only rows use W itself.
at::Tensor fold_segments(const KernelTable* kt, const xk::NF4W& w, int64_t N, int64_t K, const at::Tensor& act,
                         at::Tensor& out, const at::Tensor& lora_A, const at::Tensor& lora_B, const float* sc,
                         const at::Tensor& order, const at::Tensor& starts, int64_t n_adapters, int64_t r,
                         bool transposed) {
  const auto f32 = act.options().dtype(at::kFloat);
  at::Tensor slab = at::empty({N, K}, f32);
  decode_rows(kt, w, K, 0, N, slab.data_ptr<float>());
  at::Tensor mid = at::zeros({act.size(0), r}, f32);
  const int32_t* st = starts.data_ptr<int32_t>();
  const int32_t* o = order.data_ptr<int32_t>();
  for (int64_t j = 0; j <= n_adapters; ++j) {
    const int64_t s0 = st[j], s1 = st[j + 1];
    if (s1 == s0) continue;
    const int64_t first = o[s0], count = s1 - s0;
    at::Tensor a_seg = act.narrow(0, first, count);
    at::Tensor out_seg = out.narrow(0, first, count);
    at::Tensor weight = slab;
    if (j > 0) {
      at::Tensor a = lora_A[j - 1].to(at::kFloat), b = lora_B[j - 1].to(at::kFloat);
      weight = at::addmm(slab, b, a, 1.0, sc[j - 1]);
      at::Tensor mid_seg = mid.narrow(0, first, count);
      at::mm_out(mid_seg, a_seg, transposed ? b : a.t());
    }
    at::mm_out(out_seg, a_seg, transposed ? weight : weight.t());
  }
  return mid;
}

// The LoRA terms of one adapter segment: out[rows] += scale * (act[rows] D^T) U^T, and the shrink saved in
// mid[rows] (forward: D = A, U = B; input grad: D = B^T, U = A^T, passed already transposed as needed).
void segment_lora(const at::Tensor& order, int64_t s0, int64_t s1, const at::Tensor& act, const at::Tensor& shrink_t,
                  const at::Tensor& expand_t, float scale, at::Tensor& mid, at::Tensor& out) {
  const int64_t first = seg_range(order, s0, s1);
  if (first >= 0) {
    at::Tensor m = mid.narrow(0, first, s1 - s0);
    at::mm_out(m, act.narrow(0, first, s1 - s0), shrink_t);
    out.narrow(0, first, s1 - s0).addmm_(m, expand_t, 1.0, scale);
    return;
  }
  at::Tensor rows = seg_rows(order, s0, s1);
  at::Tensor part = at::mm(act.index_select(0, rows), shrink_t);
  mid.index_copy_(0, rows, part);
  out.index_add_(0, rows, at::mm(part, expand_t), scale);
}

// One adapter's [rows, cols] LoRA matrix (float32 / bf16 / float16) as the bf16 pairs a vdpbf16ps lane
// multiplies: out[p][c][t] = src(2p + t, c) for p < red_pad / 2, c < cols_pad (zero outside n_red x n_cols),
// where src(i, c) = red_is_rows ? src[i][c] : src[c][i] (i runs over the reduced dimension).
void pack_pairs(const at::Tensor& src, bool red_is_rows, int64_t red_pad, int64_t cols_pad, uint16_t* out) {
  const int64_t n_red = red_is_rows ? src.size(0) : src.size(1), n_cols = red_is_rows ? src.size(1) : src.size(0);
  const int64_t row_len = src.size(1);
  std::fill(out, out + red_pad * cols_pad, uint16_t{0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "pack_pairs", [&] {
    const scalar_t* p = src.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n_red; ++i)
      for (int64_t c = 0; c < n_cols; ++c) {
        const float v = static_cast<float>(red_is_rows ? p[i * row_len + c] : p[c * row_len + i]);
        out[((i / 2) * cols_pad + c) * 2 + (i & 1)] = c10::BFloat16(v).x;  // round to nearest even
      }
  });
}

// The LoRA terms of native_bf16 (below) by the AVX512-BF16 kernel: every adapter's operands packed once per
// call, its rows in blocks of 16 (threads split the blocks of all adapters).
void lora_bf16_fused(const xk::Bf16Kernels* bk, const at::Tensor& act, const at::Tensor& lora_A,
                     const at::Tensor& lora_B, const float* sc, const at::Tensor& order, const at::Tensor& starts,
                     int64_t n_adapters, int64_t r, bool transposed, at::Tensor& mid, at::Tensor& out) {
  const int64_t rp = round_up(r, 16), n_red = act.size(1), n_out = out.size(1);
  const int64_t red_pad = round_up(n_red, 2);
  const int32_t* st = starts.data_ptr<int32_t>();
  std::vector<int64_t> used;
  for (int64_t ad = 0; ad < n_adapters; ++ad)
    if (st[ad + 2] > st[ad + 1]) used.push_back(ad);
  if (used.empty()) return;
  const int64_t shrink_len = red_pad * rp, expand_len = rp * n_out;
  at::Tensor packed = at::empty({static_cast<int64_t>(used.size()) * (shrink_len + expand_len)},
                                act.options().dtype(at::kBFloat16));
  auto* base = reinterpret_cast<uint16_t*>(packed.data_ptr());
  std::vector<xk::LoraBf16Args> args(used.size());
  at::parallel_for(0, static_cast<int64_t>(used.size()), 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t ad = used[u];
      uint16_t* sh = base + u * (shrink_len + expand_len);
      uint16_t* ex = sh + shrink_len;
      at::Tensor a = lora_A[ad].contiguous(), b = lora_B[ad].contiguous();  // [r, K], [N, r]
      // forward: S = A^T, E = B^T; input grad: S = B (reduce over N), E = A
      pack_pairs(transposed ? b : a, transposed, red_pad, rp, sh);
      pack_pairs(transposed ? a : b, transposed, rp, n_out, ex);
      xk::LoraBf16Args& g = args[u];
      g.act = reinterpret_cast<const uint16_t*>(act.data_ptr());
      g.n_red = n_red;
      g.rows = order.data_ptr<int32_t>() + st[ad + 1];
      g.shrink = sh;
      g.expand = ex;
      g.r = r;
      g.rp = rp;
      g.n_out = n_out;
      g.scale = sc[ad];
      g.mid = mid.data_ptr<float>();
      g.out = out.data_ptr();
      g.out_dt = out.scalar_type() == at::kFloat ? xk::kF32 : xk::kBF16;
    }
  });
  // work items: (adapter, first row of a block of 16 within its segment)
  std::vector<std::pair<int64_t, int64_t>> items;
  for (size_t u = 0; u < used.size(); ++u) {
    const int64_t len = st[used[u] + 2] - st[used[u] + 1];
    for (int64_t i = 0; i < len; i += xk::kLoraBf16Rows) items.emplace_back(static_cast<int64_t>(u), i);
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const auto [u, i] = items[t];
      const int64_t len = st[used[u] + 2] - st[used[u] + 1];
      bk->lora_rows(args[u], i, std::min(len, i + xk::kLoraBf16Rows));
    }
  });
}

// The native bf16 products (bitsandbytes' compute_dtype=bfloat16 and PEFT's semantics): the weight
// decoded to bf16 once, one bf16 product per term with float32 accumulation inside oneDNN's GEMM,
// the LoRA terms in bf16 (adapter weights rounded to bf16 for the product), results rounded to bf16.
//   forward     out [M, N] = act W^T + s (act A^T) B^T, mid = act A^T        (act = x)
//   input grad  out [M, K] = act W   + s (act B) A,     mid = act B          (act = dy)
// mid comes back in float32 (the weight gradients read it); out is float32 when it accumulates over
// several slabs of a large weight (input grad), bf16 otherwise.
std::tuple<at::Tensor, at::Tensor> native_bf16(const KernelTable* kt, const xk::NF4W& w, int64_t N, int64_t K,
                                                const at::Tensor& act, const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, const float* sc, const at::Tensor& order,
                                                const at::Tensor& starts, int64_t n_adapters, int64_t r,
                                                bool transposed) {
  const auto bf16 = act.options().dtype(at::kBFloat16);
  const int64_t M = act.size(0), out_cols = transposed ? K : N;
  const int64_t nb_max = slab_rows_bf16(N, K);
  at::Tensor slab = at::empty({nb_max, K}, bf16);
  at::Tensor out;
  if (nb_max == N) {
    decode_rows_bf16(kt, w, K, 0, N, slab);
    out = transposed ? at::mm(act, slab) : at::mm(act, slab.t());
  } else {
    // several slabs: the forward writes column blocks of out; the input grad sums in float32
    out = transposed ? at::zeros({M, out_cols}, act.options().dtype(at::kFloat)) : at::empty({M, out_cols}, bf16);
    for (int64_t n0 = 0; n0 < N; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, N - n0);
      decode_rows_bf16(kt, w, K, n0, nb, slab);
      at::Tensor s = slab.narrow(0, 0, nb);
      if (transposed) {
        out.add_(at::mm(act.narrow(1, n0, nb), s));
      } else {
        out.narrow(1, n0, nb).copy_(at::mm(act, s.t()));
      }
    }
  }
  at::Tensor mid = at::zeros({M, r}, act.options().dtype(at::kFloat));
  const xk::Bf16Kernels* bk = bf16_kernels(kt);
  if (r > 0 && bk && round_up(r, 16) <= xk::kLoraBf16MaxRank) {
    lora_bf16_fused(bk, act, lora_A, lora_B, sc, order, starts, n_adapters, r, transposed, mid, out);
  } else if (r > 0) {
    const int32_t* st = starts.data_ptr<int32_t>();
    for (int64_t ad = 0; ad < n_adapters; ++ad) {
      const int64_t s0 = st[ad + 1], s1 = st[ad + 2];
      if (s1 == s0) continue;
      at::Tensor a = lora_A[ad].to(at::kBFloat16), b = lora_B[ad].to(at::kBFloat16);
      at::Tensor shrink_t = transposed ? b : a.t(), expand_t = transposed ? a : b.t();
      const int64_t first = seg_range(order, s0, s1);
      if (first >= 0) {
        at::Tensor part = at::mm(act.narrow(0, first, s1 - s0), shrink_t);
        mid.narrow(0, first, s1 - s0).copy_(part);
        out.narrow(0, first, s1 - s0).add_(at::mm(part, expand_t), sc[ad]);
      } else {
        at::Tensor rows = seg_rows(order, s0, s1);
        at::Tensor part = at::mm(act.index_select(0, rows), shrink_t);
        mid.index_copy_(0, rows, part.to(at::kFloat));
        out.index_add_(0, rows, at::mm(part, expand_t).to(out.scalar_type()), sc[ad]);
      }
    }
  }
  return {out, mid};
}

// y32 [M, N] = x W^T for a bf16 x on AMX: y^T = W x^T with weight rows as the brgemm A operand ([rows, K],
// bf16 hi and lo parts) and x^T as the VNNI B operand ([K / 2, M, 2] bf16), both in the permuted
// 32-chunk order of K.
void base_amx(const KernelTable* kt, const xk::NF4W& w, const at::Tensor& x, int x_dt, int64_t M, int64_t N,
              int64_t K, at::Tensor& y32) {
#ifdef XK_HAVE_BRGEMM
  const auto bf16 = x.options().dtype(at::kBFloat16);
  at::Tensor xv = at::empty({K * M}, bf16);
  auto* xvp = reinterpret_cast<uint16_t*>(xv.data_ptr());
  const void* xp = x.data_ptr();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
    kt->pack_x_vnni(xp, x_dt, M, K, m0, m1, xvp);
  });
  at::Tensor yT = at::empty({N, M}, y32.options());
  float* yTp = yT.data_ptr<float>();
  using BF = at::BFloat16;
  const BF* xb = reinterpret_cast<const BF*>(xvp);
  // a task: decode kAmxTileRows weight rows (hi + lo stay in L2), multiply them with every column tile of x^T
  const int64_t tasks = (N + kAmxTileRows - 1) / kAmxTileRows;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor buf = at::empty({2 * kAmxTileRows * K}, bf16);
    auto* wh = reinterpret_cast<uint16_t*>(buf.data_ptr());
    uint16_t* wl = wh + kAmxTileRows * K;
    const BF* ah = reinterpret_cast<const BF*>(wh);
    const BF* al = reinterpret_cast<const BF*>(wl);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kAmxTileRows, rn = std::min(kAmxTileRows, N - r0);
      kt->decode_bf16_split(w, K, r0, rn, wh, wl);
      // K in blocks so a block of the weight tile and of x^T stay in L2 across the column tiles
      for (int64_t k0 = 0; k0 < K; k0 += kAmxKBlock) {
        const int64_t kn = std::min(kAmxKBlock, K - k0);
        for (int64_t c0 = 0; c0 < M; c0 += kAmxTileCols) {
          const int64_t cn = std::min(kAmxTileCols, M - c0);
          float* c = yTp + r0 * M + c0;
          at::native::cpublas::brgemm(rn, cn, kn, K, M, M, k0 > 0, ah + k0, xb + k0 * M + 2 * c0, c, true);
          at::native::cpublas::brgemm(rn, cn, kn, K, M, M, true, al + k0, xb + k0 * M + 2 * c0, c, true);
        }
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
  y32.copy_(yT.t());
#else
  TORCH_CHECK(false, "xkern._cpu was built without ATen's bf16 brgemm");
#endif
}

// ------------------------------------------------------------------------------------------------
// forward

// The shrink of few rows in float32, per row for its own adapter: forward xa = x A[a]^T (act = x, lora = A),
// input grad g = dy B[a] (transposed: act = dy, lora = B); and the expand's coefficients
// coef[m, j] = scale[a] * shrink[m, j] in rows of coef_stride floats (zero past r and for base rows).
std::tuple<at::Tensor, at::Tensor> small_shrink(const KernelTable* kt, const at::Tensor& act32, const at::Tensor& lora,
                                                int lora_dt, int64_t r, const float* sc, const at::Tensor& ids,
                                                int64_t coef_stride, bool transposed) {
  const int64_t M = act32.size(0), K = act32.size(1);
  const auto f32 = act32.options();
  at::Tensor xa = at::zeros({M, r}, f32);
  at::Tensor coef = at::zeros({M, std::max<int64_t>(coef_stride, 1)}, f32);
  if (r == 0) return {xa, coef};
  const int32_t* id = ids.data_ptr<int32_t>();
  xk::ShrinkArgs s;
  s.act = act32.data_ptr<float>();
  s.M = M;
  (transposed ? s.N : s.K) = K;
  s.r = r;
  s.ids = id;
  s.lora = lora.data_ptr();
  s.lora_dt = lora_dt;
  s.out = xa.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / (r * K)), [&](int64_t m0, int64_t m1) {
    transposed ? kt->shrink_igrad(s, m0, m1) : kt->shrink_fwd(s, m0, m1);
  });
  const float* xap = xa.data_ptr<float>();
  float* cp = coef.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    if (id[m] >= 0)
      for (int64_t j = 0; j < r; ++j) cp[m * coef_stride + j] = sc[id[m]] * xap[m * r + j];
  return {xa, coef};
}

// Few rows of a bf16 x in native precision (K % 32 == 0): the shrink xa = x A[a]^T in float32 per row, then
// the vdpbf16ps GEMV with the expand s[a] xa . B[a][n] added before each output's one rounding to bf16.
std::tuple<at::Tensor, at::Tensor> gemv_bf16(const xk::Bf16Kernels* bk, const KernelTable* kt, const xk::NF4W& w,
                                             const at::Tensor& x, int64_t N, int64_t K, const at::Tensor& lora_A,
                                             const at::Tensor& lora_B, const Lora& l, const float* sc,
                                             const at::Tensor& ids) {
  const int64_t M = x.size(0), r = l.r;
  const int32_t* id = ids.data_ptr<int32_t>();
  auto [xa, coef] = small_shrink(kt, as_f32(x), lora_A, l.a_dt, r, sc, ids, r, false);
  // x chunk-major: [K / 32][M][32]
  at::Tensor xc = at::empty({K * M}, x.options());
  const auto* src = reinterpret_cast<const uint16_t*>(x.data_ptr());
  auto* dst = reinterpret_cast<uint16_t*>(xc.data_ptr());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K / 32; ++c) std::copy_n(src + m * K + c * 32, 32, dst + (c * M + m) * 32);
  at::Tensor y = at::empty({M, N}, x.options());
  xk::GemvBf16Args a;
  a.w = w;
  a.N = N;
  a.K = K;
  a.M = M;
  a.x = dst;
  a.ids = id;
  a.coef = coef.data_ptr<float>();
  a.r = r;
  a.B = lora_B.data_ptr();
  a.b_dt = l.b_dt;
  a.y = y.data_ptr();
  const int64_t grain = std::max<int64_t>(4, 65536 / (K * M));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { bk->gemv(a, n0, n1); });
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor> lora_linear_forward(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& absmax2,
    const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset, int64_t n_out, int64_t k,
    int64_t blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scale,
    const at::Tensor& ids, const at::Tensor& order, const at::Tensor& starts, bool exact) {
  TORCH_CHECK_VALUE(n_out > 0 && k > 0, "n_out and k must be positive, got ", n_out, " and ", k);
  const int64_t N = n_out, K = k;
  const xk::NF4W w = make_weight(packed, absmax, absmax2, code2, offset, N * K, blocksize);
  check_x(x, K, "x");
  const int64_t M = x.size(0);
  const Lora l = check_lora(lora_A, lora_B, scale, ids, order, starts, M, N, K);
  const int64_t r = l.r;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return {y, at::zeros({0, r}, x.options().dtype(at::kFloat))};
  const KernelTable* kt = kernels();
  const int x_dt = float_dtype(x, "x");
  const float* sc = scale.data_ptr<float>();

  if (K % 32 == 0 && M <= gemv_rows() && !exact && x_dt == xk::kBF16 && bf16_kernels(kt))
    return gemv_bf16(bf16_kernels(kt), kt, w, x, N, K, lora_A, lora_B, l, sc, ids);
  if (K % 32 == 0 && M <= gemv_rows()) {
    at::Tensor x32 = as_f32(x);
    at::Tensor xp = at::empty({M, K}, x.options().dtype(at::kFloat));
    kt->to_f32_perm(x.data_ptr(), x_dt, M, K, xp.data_ptr<float>());
    const int64_t rp = round_up(r, 16);
    const int32_t* id = ids.data_ptr<int32_t>();
    auto [xa, coef] = small_shrink(kt, x32, lora_A, l.a_dt, r, sc, ids, rp, false);
    xk::FwdSmallArgs a;
    a.w = w;
    a.N = N;
    a.K = K;
    a.M = M;
    a.xp = xp.data_ptr<float>();
    a.ids = id;
    a.coef = coef.data_ptr<float>();
    a.r = r;
    a.rp = rp;
    a.B = lora_B.data_ptr();
    a.b_dt = l.b_dt;
    a.y = y.data_ptr();
    a.y_dt = x_dt;
    const int64_t grain = round_up(std::max<int64_t>(4, 32768 / (K * M)), 4);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { kt->fwd_small(a, n0, n1); });
    return {y, xa};
  }

  if (!exact && x_dt == xk::kBF16) return native_bf16(kt, w, N, K, x, lora_A, lora_B, sc, order, starts, l.n_adapters, r,
                                                      false);

  // large M or K % 32 != 0: decoded slabs + a matmul, LoRA per adapter segment
  at::Tensor x32 = as_f32(x);
  at::Tensor y32 = x_dt == xk::kF32 ? y : at::empty({M, N}, x.options().dtype(at::kFloat));
  if (!use_amx(kt, x_dt, M, K) && slab_rows(N, K) == N && r > 0 && foldable(order, starts, l.n_adapters, r)) {
    // every segment is a range of rows and large next to r: one pass per segment, see fold_segments
    at::Tensor xa = fold_segments(kt, w, N, K, x32, y32, lora_A, lora_B, sc, order, starts, l.n_adapters, r, false);
    if (x_dt != xk::kF32) y.copy_(y32);
    return {y, xa};
  }
  if (use_amx(kt, x_dt, M, K)) {
    base_amx(kt, w, x, x_dt, M, N, K, y32);
  } else {
    const int64_t nb_max = slab_rows(N, K);
    at::Tensor slab = at::empty({nb_max, K}, x.options().dtype(at::kFloat));
    for (int64_t n0 = 0; n0 < N; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, N - n0);
      decode_rows(kt, w, K, n0, nb, slab.data_ptr<float>());
      at::Tensor s = slab.narrow(0, 0, nb);
      if (nb == N) {
        at::mm_out(y32, x32, s.t());  // the whole weight in one slab: x W^T straight into y
      } else {
        // y^T = W x^T measured faster with MKL than x W^T for slabs of a large weight
        y32.narrow(1, n0, nb).copy_(at::mm(s, x32.t()).t());
      }
    }
  }
  at::Tensor xa = at::zeros({M, r}, x.options().dtype(at::kFloat));
  if (r > 0) {
    const int32_t* st = starts.data_ptr<int32_t>();
    for (int64_t ad = 0; ad < l.n_adapters; ++ad) {
      const int64_t s0 = st[ad + 1], s1 = st[ad + 2];
      if (s1 == s0) continue;
      segment_lora(order, s0, s1, x32, lora_A[ad].to(at::kFloat).t(), lora_B[ad].to(at::kFloat).t(), sc[ad], xa, y32);
    }
  }
  if (x_dt != xk::kF32) y.copy_(y32);
  return {y, xa};
}

// ------------------------------------------------------------------------------------------------
// input grad

std::tuple<at::Tensor, at::Tensor> lora_linear_input_grad(
    const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
    const std::optional<at::Tensor>& offset, int64_t n_out, int64_t k, int64_t blocksize, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& scale, const at::Tensor& ids, const at::Tensor& order,
    const at::Tensor& starts, bool exact) {
  TORCH_CHECK_VALUE(n_out > 0 && k > 0, "n_out and k must be positive, got ", n_out, " and ", k);
  const int64_t N = n_out, K = k;
  const xk::NF4W w = make_weight(packed, absmax, absmax2, code2, offset, N * K, blocksize);
  check_x(grad_out, N, "grad_out");
  const int64_t M = grad_out.size(0);
  const Lora l = check_lora(lora_A, lora_B, scale, ids, order, starts, M, N, K);
  const int64_t r = l.r;
  const auto f32 = grad_out.options().dtype(at::kFloat);
  if (M == 0) return {at::empty({0, K}, f32), at::zeros({0, r}, f32)};
  const KernelTable* kt = kernels();
  const float* sc = scale.data_ptr<float>();
  if (!exact && grad_out.scalar_type() == at::kBFloat16 && !(K % 32 == 0 && M <= gemv_rows())) {
    auto [dx, g] = native_bf16(kt, w, N, K, grad_out, lora_A, lora_B, sc, order, starts, l.n_adapters, r, true);
    return {dx.to(at::kFloat), g};
  }
  at::Tensor dy32 = as_f32(grad_out);

  if (K % 32 == 0 && M <= gemv_rows()) {
    const int32_t* id = ids.data_ptr<int32_t>();
    auto [g, coef] = small_shrink(kt, dy32, lora_B, l.b_dt, r, sc, ids, r, true);
    at::Tensor dx = at::empty({M, K}, f32);
    xk::IgradSmallArgs a;
    a.w = w;
    a.N = N;
    a.K = K;
    a.M = M;
    a.dy = dy32.data_ptr<float>();
    a.ids = id;
    a.coef = coef.data_ptr<float>();
    a.r = r;
    a.A = lora_A.data_ptr();
    a.a_dt = l.a_dt;
    a.dx = dx.data_ptr<float>();
    at::parallel_for(0, K / 32, 1, [&](int64_t c0, int64_t c1) { kt->igrad_small(a, c0, c1); });
    return {dx, g};
  }

  at::Tensor dx = at::empty({M, K}, f32);
  const int64_t nb_max = slab_rows(N, K);
  if (nb_max == N && r > 0 && foldable(order, starts, l.n_adapters, r)) {
    at::Tensor g = fold_segments(kt, w, N, K, dy32, dx, lora_A, lora_B, sc, order, starts, l.n_adapters, r, true);
    return {dx, g};
  }
  at::Tensor slab = at::empty({nb_max, K}, f32);
  for (int64_t n0 = 0; n0 < N; n0 += nb_max) {
    const int64_t nb = std::min(nb_max, N - n0);
    decode_rows(kt, w, K, n0, nb, slab.data_ptr<float>());
    at::Tensor s = slab.narrow(0, 0, nb);
    at::Tensor d = dy32.narrow(1, n0, nb);
    if (n0 == 0) {
      at::mm_out(dx, d, s);
    } else {
      dx.addmm_(d, s);
    }
  }
  at::Tensor g = at::zeros({M, r}, f32);
  if (r > 0) {
    const int32_t* st = starts.data_ptr<int32_t>();
    for (int64_t ad = 0; ad < l.n_adapters; ++ad) {
      const int64_t s0 = st[ad + 1], s1 = st[ad + 2];
      if (s1 == s0) continue;
      segment_lora(order, s0, s1, dy32, lora_B[ad].to(at::kFloat), lora_A[ad].to(at::kFloat), sc[ad], g, dx);
    }
  }
  return {dx, g};
}

// ------------------------------------------------------------------------------------------------
// dequantize

at::Tensor dequantize_nf4(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& absmax2,
                          const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset,
                          int64_t numel, int64_t blocksize, at::ScalarType dtype) {
  const xk::NF4W w = make_weight(packed, absmax, absmax2, code2, offset, numel, blocksize);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  const int dt = float_dtype(out, "dtype");
  const KernelTable* kt = kernels();
  char* base = static_cast<char*>(out.data_ptr());
  const int64_t esize = out.element_size();
  at::parallel_for(0, numel, 1 << 16, [&](int64_t b, int64_t e) { kt->dequant(w, b, e, base + b * esize, dt); });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "xkern native CPU kernels: fused NF4 + multi-adapter LoRA linear (scalar, AVX2, AVX-512)";
  m.def("lora_linear_forward", &lora_linear_forward, py::call_guard<py::gil_scoped_release>(),
        "y = x W^T + scale[a] (x A[a]^T) B[a]^T per row (a = ids[m], -1: base only), computed in float32 (exact, "
        "or any x but bf16), else for a bf16 x with the weight rounded to bf16 and bf16 products (native); "
        "returns (y [M, N] in x.dtype, xa [M, r] float32)",
        py::arg("x"), py::arg("packed"), py::arg("absmax"), py::arg("absmax2"), py::arg("code2"), py::arg("offset"),
        py::arg("n_out"), py::arg("k"), py::arg("blocksize"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scale"),
        py::arg("ids"), py::arg("order"), py::arg("starts"), py::arg("exact") = true);
  m.def("lora_linear_input_grad", &lora_linear_input_grad, py::call_guard<py::gil_scoped_release>(),
        "dx = dy W + scale[a] (dy B[a]) A[a] per row (bf16 products for a bf16 dy unless exact); "
        "returns (dx [M, K], g = dy B[a] [M, r]) in float32",
        py::arg("grad_out"), py::arg("packed"), py::arg("absmax"), py::arg("absmax2"), py::arg("code2"),
        py::arg("offset"), py::arg("n_out"), py::arg("k"), py::arg("blocksize"), py::arg("lora_A"), py::arg("lora_B"),
        py::arg("scale"), py::arg("ids"), py::arg("order"), py::arg("starts"), py::arg("exact") = true);
  m.def("dequantize_nf4", &dequantize_nf4, py::call_guard<py::gil_scoped_release>(),
        "The flat weight [numel] in dtype (computed in float32, then rounded to nearest even)", py::arg("packed"),
        py::arg("absmax"), py::arg("absmax2"), py::arg("code2"), py::arg("offset"), py::arg("numel"),
        py::arg("blocksize"), py::arg("dtype"));
  m.def("isa", &isa, "The instruction set in use: 'avx512', 'avx2' or 'scalar'");
  m.def("supported_isas", &supported_isas, "The instruction sets this CPU can run, best first");
  m.def("set_isa", &set_isa, "Force an instruction set (ValueError if this CPU cannot run it)", py::arg("name"));
  m.def("build_info", &build_info, "How the extension was built and what it runs");
  m.def("_set_gemv_rows", &set_gemv_rows,
        "Private (tests, tuning): the largest M sent to the GEMV paths (default 16); returns the previous value",
        py::arg("rows"));
}
