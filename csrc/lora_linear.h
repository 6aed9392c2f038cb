// torch-facing entry points of the CUDA lora_linear decode kernel (defined in lora_linear.cpp).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <vector>

// y [M, N] (x.dtype), xa [M, r] float32 for 1 <= M <= 16 rows of float16 / bfloat16 activations.
// split_k: 0 = heuristic, > 0 forces it; force_generic: byte-wise path even when 16-byte loads work.
std::vector<at::Tensor> lora_linear_decode(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                           const std::optional<at::Tensor>& absmax2,
                                           const std::optional<at::Tensor>& code2,
                                           const std::optional<at::Tensor>& offset, int64_t n_out, int64_t k,
                                           int64_t blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                           const at::Tensor& scale, const at::Tensor& ids, int64_t split_k,
                                           bool force_generic);

// [vec, mt, rows_per_block, n_tiles, split_k, k_slab] the kernel would use (16-byte aligned pointers).
std::vector<int64_t> lora_linear_decode_plan(int64_t m, int64_t n_out, int64_t k, int64_t num_sms, int64_t split_k,
                                             bool force_generic);
