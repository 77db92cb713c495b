// A decoder layer's weights for decode_layer (csrc/decode_layer.cpp), held once per layer by Python.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

namespace tokenloom {

// One linear layer: row tiles (a = tiles, b = d, c = m), the general group-quantized layout (a = codes),
// or a dense bf16 / float32 matrix (a = weight).
struct Projection {
  enum class Kind { kTiles, kRows, kDense };
  Kind kind = Kind::kDense;
  at::Tensor a, b, c;
  c10::optional<at::Tensor> high, bias;
  int64_t out_features = 0;

  at::Tensor operator()(const at::Tensor& x) const;
};

struct DecodeLayerPlan {
  std::shared_ptr<Projection> qkv, o, gate_up, down;
  c10::optional<at::Tensor> q_norm, k_norm;  // per-head q/k RMSNorm weights (Qwen3, Gemma 3)
  double qk_eps = 0.0, qk_offset = 0.0;
  at::Tensor cos, sin;                            // the layer's RoPE tables in the activations' dtype
  c10::optional<at::Tensor> attn_out_norm;        // the attention output's own norm (Gemma's sandwich norm)
  at::Tensor mlp_in_norm;                         // the MLP's input norm
  c10::optional<at::Tensor> mlp_out_norm;         // the MLP output's own norm (Gemma)
  double eps = 0.0, offset = 0.0;                 // the layer norms' convention
  int64_t heads = 0, kv_heads = 0, window = 0;    // window 0: full attention
  double scale = 1.0;
  bool gelu_tanh = false;                         // else SiLU
};

}  // namespace tokenloom

// A projection of kind "tiles", "rows" or "dense" (csrc/decode_layer.cpp).
std::shared_ptr<tokenloom::Projection> make_projection(const std::string& kind, at::Tensor a,
                                                       c10::optional<at::Tensor> b, c10::optional<at::Tensor> c,
                                                       c10::optional<at::Tensor> high, c10::optional<at::Tensor> bias,
                                                       int64_t out_features);
// One decoder layer of a decode step: {the new residual, the next block's normalised input}.
std::vector<at::Tensor> decode_layer(const tokenloom::DecodeLayerPlan& plan, at::Tensor x, at::Tensor h,
                                     at::Tensor positions, at::Tensor slots, at::Tensor block_table, at::Tensor lens,
                                     at::Tensor k_cache, at::Tensor v_cache, at::Tensor next_norm);
