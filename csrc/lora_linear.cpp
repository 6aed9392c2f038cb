// torch-facing wrapper of the decode-regime NF4 + multi-adapter LoRA kernel (nf4_lora_decode.cu).
// Validates the tensors, allocates the outputs and the split-K workspace on the caching allocator
// (so the call is CUDA-graph capturable), and launches on the current stream.
#include "lora_linear.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <vector>

#include "nf4_lora_decode.h"

namespace {

xkern::DType dtype_code(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return xkern::DType::kFloat32;
    case at::kHalf: return xkern::DType::kFloat16;
    case at::kBFloat16: return xkern::DType::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t);
  }
  return xkern::DType::kFloat32;
}

// Multiprocessor count of a device, queried once (so a call under CUDA graph capture queries nothing).
int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device >= 0 && device < 64) {
    const int cached = cache[device].load();
    if (cached > 0) return cached;
  }
  int n = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  TORCH_CHECK(err == cudaSuccess, "cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
  if (device >= 0 && device < 64) cache[device].store(n);
  return n;
}

void check_on(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), ", x is on ", x.device());
}

}  // namespace

std::vector<at::Tensor> lora_linear_decode(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                           const std::optional<at::Tensor>& absmax2,
                                           const std::optional<at::Tensor>& code2,
                                           const std::optional<at::Tensor>& offset, int64_t n_out, int64_t k,
                                           int64_t blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                           const at::Tensor& scale, const at::Tensor& ids, int64_t split_k,
                                           bool force_generic) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "the decode kernel takes float16 or bfloat16 activations, got ", x.scalar_type());
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= 16, "the decode kernel takes 1..16 rows, got ", M);
  TORCH_CHECK(k >= 1 && x.size(1) == k, "x has K=", x.size(1), ", weight has K=", k);
  TORCH_CHECK(n_out >= 1 && n_out <= INT32_MAX && k <= INT32_MAX, "bad weight shape [", n_out, ", ", k, "]");
  TORCH_CHECK(blocksize >= 32 && (blocksize & (blocksize - 1)) == 0, "blocksize must be a power of two >= 32");
  const int64_t numel = n_out * k;
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == (numel + 1) / 2,
              "packed must be contiguous uint8 with ", (numel + 1) / 2, " bytes");
  TORCH_CHECK(absmax.is_contiguous() && absmax.numel() == n_blocks, "absmax must be contiguous with ", n_blocks,
              " entries");
  const bool double_quant = absmax2.has_value();
  TORCH_CHECK(code2.has_value() == double_quant && offset.has_value() == double_quant,
              "double quantization needs absmax2, code2 and offset together");
  check_on(packed, x, "packed");
  check_on(absmax, x, "absmax");
  at::Tensor absmax2_c, code2_c, offset_c;
  if (double_quant) {
    TORCH_CHECK(absmax.scalar_type() == at::kByte, "double-quantized absmax must be uint8");
    absmax2_c = absmax2->to(at::kFloat).contiguous();
    code2_c = code2->to(at::kFloat).contiguous();
    offset_c = offset->to(at::kFloat).contiguous();
    TORCH_CHECK(absmax2_c.numel() == (n_blocks + 255) / 256, "absmax2 must have ", (n_blocks + 255) / 256,
                " entries");
    TORCH_CHECK(code2_c.numel() == 256, "code2 must have 256 entries");
    TORCH_CHECK(offset_c.numel() == 1, "offset must be a single value");
    check_on(absmax2_c, x, "absmax2");
    check_on(code2_c, x, "code2");
    check_on(offset_c, x, "offset");
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be float32");
  }
  TORCH_CHECK(lora_A.dim() == 3 && lora_A.size(2) == k, "lora_A must be [n_adapters, r, K=", k, "]");
  const int64_t n_adapters = lora_A.size(0);
  const int64_t rank = lora_A.size(1);
  TORCH_CHECK(lora_B.dim() == 3 && lora_B.size(0) == n_adapters && lora_B.size(1) == n_out && lora_B.size(2) == rank,
              "lora_B must be [", n_adapters, ", ", n_out, ", ", rank, "]");
  TORCH_CHECK(scale.numel() == n_adapters, "scale must have n_adapters=", n_adapters, " entries");
  TORCH_CHECK(ids.numel() == M, "ids must have one entry per row");
  check_on(lora_A, x, "lora_A");
  check_on(lora_B, x, "lora_B");
  check_on(scale, x, "scale");
  check_on(ids, x, "ids");

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor A = lora_A.contiguous();
  const at::Tensor B = lora_B.contiguous();
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  const at::Tensor id = ids.to(at::kInt).contiguous();

  at::Tensor y = at::empty({M, n_out}, xc.options());
  const bool has_lora = n_adapters > 0 && rank > 0;
  at::Tensor xa = has_lora ? at::empty({M, rank}, xc.options().dtype(at::kFloat))
                           : at::zeros({M, rank}, xc.options().dtype(at::kFloat));

  xkern::DecodeParams p;
  p.x = xc.data_ptr();
  p.act_dtype = dtype_code(xc.scalar_type(), "x");
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(n_out);
  p.K = static_cast<int>(k);
  p.packed = packed.data_ptr<uint8_t>();
  p.absmax = absmax.data_ptr();
  p.blocksize = static_cast<int>(blocksize);
  p.double_quant = double_quant;
  if (double_quant) {
    p.absmax2 = absmax2_c.data_ptr<float>();
    p.code2 = code2_c.data_ptr<float>();
    p.offset = offset_c.data_ptr<float>();
  }
  p.ids = id.data_ptr<int32_t>();
  p.lora_A = A.data_ptr();
  p.a_dtype = dtype_code(A.scalar_type(), "lora_A");
  p.lora_B = B.data_ptr();
  p.b_dtype = dtype_code(B.scalar_type(), "lora_B");
  p.scale = s.data_ptr<float>();
  p.n_adapters = static_cast<int>(n_adapters);
  p.rank = static_cast<int>(rank);
  p.y = y.data_ptr();
  p.xa = xa.data_ptr<float>();

  const int num_sms = sm_count(static_cast<int>(x.device().index()));
  const xkern::DecodePlan plan =
      xkern::plan_nf4_lora_decode(p, num_sms, static_cast<int>(split_k), force_generic);
  at::Tensor partial, counters;
  if (plan.split_k > 1) {
    partial = at::empty({static_cast<int64_t>(plan.partial_elems)}, xc.options().dtype(at::kFloat));
    counters = at::empty({static_cast<int64_t>(plan.counter_elems)}, xc.options().dtype(at::kInt));
    p.partial = partial.data_ptr<float>();
    p.counters = counters.data_ptr<int32_t>();
  }
  const cudaError_t err = xkern::launch_nf4_lora_decode(p, plan, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "xkern decode kernel launch failed: ", cudaGetErrorString(err));
  return {y, xa};
}

std::vector<int64_t> lora_linear_decode_plan(int64_t m, int64_t n_out, int64_t k, int64_t num_sms, int64_t split_k,
                                             bool force_generic) {
  // The plan for 16-byte aligned pointers, for tests and benchmarks (no device needed).
  xkern::DecodeParams p;
  alignas(16) static const unsigned char dummy[16] = {};
  p.x = dummy;
  p.packed = dummy;
  p.M = static_cast<int>(m);
  p.N = static_cast<int>(n_out);
  p.K = static_cast<int>(k);
  const xkern::DecodePlan plan =
      xkern::plan_nf4_lora_decode(p, static_cast<int>(num_sms), static_cast<int>(split_k), force_generic);
  return {plan.vec ? 1 : 0, plan.mt, plan.rows_per_block, plan.n_tiles, plan.split_k, plan.k_slab};
}
