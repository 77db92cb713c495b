// The kernels' entry points, defined in their own sources: the bindings (ops.cpp) and the fused decode
// layer (decode_layer.cpp) call them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_table,
                                  at::Tensor lens, double scale, int64_t window);
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps, double offset);
at::Tensor gq_linear(at::Tensor x, at::Tensor codes, at::Tensor d, at::Tensor m, c10::optional<at::Tensor> high,
                     c10::optional<at::Tensor> bias, bool float_out);
bool gq_linear_native();
std::vector<at::Tensor> add_rms_norm(at::Tensor residual, at::Tensor update, c10::optional<at::Tensor> update_weight,
                                     at::Tensor next_weight, double eps, double offset);
at::Tensor qkv_rope_cache(at::Tensor qkv, at::Tensor positions, at::Tensor cos, at::Tensor sin,
                          c10::optional<at::Tensor> q_weight, c10::optional<at::Tensor> k_weight, double eps,
                          double offset, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots, int64_t heads,
                          int64_t kv_heads);
std::vector<at::Tensor> gq_pack(at::Tensor weight, int64_t bits);
at::Tensor argmax_rows(at::Tensor x, c10::optional<at::Tensor> bitmask, c10::optional<at::Tensor> masked);
at::Tensor dense_rows_linear(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias, bool float_out);
bool dense_rows_supported(at::ScalarType x, at::ScalarType w);
at::Tensor gq_tiles_linear(at::Tensor x, at::Tensor tiles, at::Tensor d, at::Tensor m, c10::optional<at::Tensor> high);
bool gq_tiles_high_supported();
std::vector<int64_t> bind_threads(std::vector<int64_t> cpus);
void lora_add(at::Tensor out, at::Tensor x, at::Tensor a, at::Tensor b_flat, at::Tensor cols, at::Tensor token_slot,
              at::Tensor ranges);
void apply_token_bitmask(at::Tensor logits, at::Tensor bitmask, at::Tensor rows);
at::Tensor gq_dequant(at::Tensor codes, at::Tensor d, at::Tensor m, c10::optional<at::Tensor> high,
                      at::ScalarType dtype);
