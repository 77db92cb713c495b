// One decoder layer of a decode step in one call.
//
// A decode step's layer is ~10 kernel calls on a few kilobytes of activations; from Python each costs its
// module call, wrapper and binding (~200 us a layer, about a quarter of a gemma-3-270m step at 4 bits on AVX2).
// Here the same kernels run in the same order on the same tensors, so the outputs are bit-identical to the
// module path (tests/models/test_decode_layer.py): the projections (row tiles, the general group-quantized
// layout, or dense rows), q/k norms + RoPE + cache write, paged decode attention, the residual adds fused
// with the norms, and the gated activation through ATen's own silu / gelu(tanh) and mul.
// Which layers qualify, and when a step may take this path, is decided in Python
// (models/layers/fused_decode.py); the checks here only guard the shapes.
#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "decode_layer.h"
#include "kernels.h"

namespace tokenloom {

at::Tensor Projection::operator()(const at::Tensor& x) const {
  switch (kind) {
    case Kind::kTiles: {  // as GroupQuantLinear._tiled_product: float32 sums, padding rows cut, + bias, cast
      at::Tensor out = gq_tiles_linear(x, a, b, c, high);
      if (out.size(1) != out_features) out = out.narrow(1, 0, out_features);
      if (bias.has_value()) out = out + *bias;
      return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
    }
    case Kind::kRows:  // as group_quant_matmul's kernel regime
      return gq_linear(x, a, b, c, high, bias, false);
    case Kind::kDense:  // as dense_linear's few-rows kernel
      return dense_rows_linear(x, a, bias, false);
  }
  TORCH_CHECK(false, "decode_layer: unknown projection kind");
}

}  // namespace tokenloom

using tokenloom::DecodeLayerPlan;
using tokenloom::Projection;

std::shared_ptr<Projection> make_projection(const std::string& kind, at::Tensor a, c10::optional<at::Tensor> b,
                                            c10::optional<at::Tensor> c, c10::optional<at::Tensor> high,
                                            c10::optional<at::Tensor> bias, int64_t out_features) {
  auto p = std::make_shared<Projection>();
  if (kind == "tiles") {
    p->kind = Projection::Kind::kTiles;
  } else if (kind == "rows") {
    p->kind = Projection::Kind::kRows;
  } else if (kind == "dense") {
    p->kind = Projection::Kind::kDense;
  } else {
    TORCH_CHECK(false, "decode_layer: projection kind must be tiles, rows or dense, not ", kind);
  }
  TORCH_CHECK(p->kind == Projection::Kind::kDense || (b.has_value() && c.has_value()),
              "decode_layer: a group-quantized projection needs its scales and minimums");
  p->a = a;
  if (b.has_value()) p->b = *b;
  if (c.has_value()) p->c = *c;
  p->high = high;
  p->bias = bias;
  p->out_features = out_features;
  return p;
}

std::vector<at::Tensor> decode_layer(const DecodeLayerPlan& plan, at::Tensor x, at::Tensor h, at::Tensor positions,
                                     at::Tensor slots, at::Tensor block_table, at::Tensor lens, at::Tensor k_cache,
                                     at::Tensor v_cache, at::Tensor next_norm) {
  TORCH_CHECK(x.dim() == 2 && h.sizes() == x.sizes(), "decode_layer: x and h must be [rows, hidden]");
  const int64_t rows = x.size(0);
  // Attention block.
  at::Tensor qkv = (*plan.qkv)(h);
  at::Tensor heads = qkv_rope_cache(qkv, positions, plan.cos, plan.sin, plan.q_norm, plan.k_norm, plan.qk_eps,
                                    plan.qk_offset, k_cache, v_cache, slots, plan.heads, plan.kv_heads);
  at::Tensor q = heads.narrow(1, 0, plan.heads);
  at::Tensor attended = paged_decode_attention(q, k_cache, v_cache, block_table, lens, plan.scale, plan.window);
  at::Tensor update = (*plan.o)(attended.view({rows, -1}));
  std::vector<at::Tensor> xh = add_rms_norm(x, update, plan.attn_out_norm, plan.mlp_in_norm, plan.eps, plan.offset);
  // MLP block: down(act(gate) * up).
  at::Tensor gate_up = (*plan.gate_up)(xh[1]);
  const int64_t inter = gate_up.size(1) / 2;
  at::Tensor gate = gate_up.narrow(1, 0, inter), up = gate_up.narrow(1, inter, inter);
  at::Tensor act = plan.gelu_tanh ? at::gelu(gate, "tanh") : at::silu(gate);
  update = (*plan.down)(act * up);
  return add_rms_norm(xh[0], update, plan.mlp_out_norm, next_norm, plan.eps, plan.offset);
}
