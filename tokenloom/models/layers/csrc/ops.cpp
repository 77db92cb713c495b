// Python bindings of the CPU kernels (one extension module, built by models/layers/kernels.py).
#include <torch/extension.h>

#include "decode_layer.h"
#include "isa.h"
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<tokenloom::Projection, std::shared_ptr<tokenloom::Projection>>(m, "Projection", py::module_local());
  m.def("make_projection", &make_projection, "a linear layer's weights for decode_layer: kind tiles, rows or dense",
        py::arg("kind"), py::arg("a"), py::arg("b") = py::none(), py::arg("c") = py::none(),
        py::arg("high") = py::none(), py::arg("bias") = py::none(), py::arg("out_features"));
  using Plan = tokenloom::DecodeLayerPlan;
  py::class_<Plan>(m, "DecodeLayerPlan", py::module_local())  // each level's module has its own
      .def(py::init<>())
      .def_readwrite("qkv", &Plan::qkv)
      .def_readwrite("o", &Plan::o)
      .def_readwrite("gate_up", &Plan::gate_up)
      .def_readwrite("down", &Plan::down)
      .def_readwrite("q_norm", &Plan::q_norm)
      .def_readwrite("k_norm", &Plan::k_norm)
      .def_readwrite("qk_eps", &Plan::qk_eps)
      .def_readwrite("qk_offset", &Plan::qk_offset)
      .def_readwrite("cos", &Plan::cos)
      .def_readwrite("sin", &Plan::sin)
      .def_readwrite("attn_out_norm", &Plan::attn_out_norm)
      .def_readwrite("mlp_in_norm", &Plan::mlp_in_norm)
      .def_readwrite("mlp_out_norm", &Plan::mlp_out_norm)
      .def_readwrite("eps", &Plan::eps)
      .def_readwrite("offset", &Plan::offset)
      .def_readwrite("heads", &Plan::heads)
      .def_readwrite("kv_heads", &Plan::kv_heads)
      .def_readwrite("window", &Plan::window)
      .def_readwrite("scale", &Plan::scale)
      .def_readwrite("gelu_tanh", &Plan::gelu_tanh);
  m.def("decode_layer", &decode_layer, "one decoder layer of a decode step: (residual, next block's input)",
        py::call_guard<py::gil_scoped_release>());
  m.def("isa_level", [] { return std::string(TOKENLOOM_ISA_NAME); }, "the instruction-set level this module is built for");
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
  m.def("rms_norm", &rms_norm, "RMSNorm, Llama (offset 0) or Gemma (offset 1) convention");
  m.def("gq_linear", &gq_linear, "4/5/8-bit group-quantized weight x int8 activation product for a few rows",
        py::arg("x"), py::arg("codes"), py::arg("d"), py::arg("m"), py::arg("high") = py::none(),
        py::arg("bias") = py::none(), py::arg("float_out") = false);
  m.def("add_rms_norm", &add_rms_norm, "residual + (normed) update, then the next RMSNorm");
  m.def("qkv_rope_cache", &qkv_rope_cache, "q/k norm, RoPE and the KV cache write of a fused qkv projection");
  m.def("gq_pack", &gq_pack, "quantize a float weight into gq_linear's 4-, 5- or 8-bit layout");
  m.def("gq_dequant", &gq_dequant, "the dense matrix a gq_linear weight stands for", py::arg("codes"), py::arg("d"),
        py::arg("m"), py::arg("high") = py::none(), py::arg("dtype") = at::kFloat);
  m.def("gq_tiles_linear", &gq_tiles_linear, "4- or 5-bit group-quantized rows in tiles of 16 x int8 activations",
        py::arg("x"), py::arg("tiles"), py::arg("d"), py::arg("m"), py::arg("high") = py::none());
  m.def("gq_tiles_high_supported", &gq_tiles_high_supported, "whether gq_tiles_linear takes 5-bit tiles at this level");
  m.def("dense_rows_linear", &dense_rows_linear, "bf16 or fp32 matrix x up to 8 activation rows (float32 sums)",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), py::arg("float_out") = false);
  m.def("dense_rows_supported", &dense_rows_supported,
        "whether dense_rows_linear has a kernel at this level for (x dtype, w dtype)", py::arg("x"), py::arg("w"));
  m.def("lora_add", &lora_add, "each token's own adapter's LoRA update added to a batch's layer output");
  m.def("apply_token_bitmask", &apply_token_bitmask, "-inf, in place, for the tokens a row's bitmask forbids");
  m.def("argmax_rows", &argmax_rows, "row-wise argmax of float32 logits (torch.argmax's answer, vectorised), the "
        "masked rows under their token bitmask", py::arg("x"), py::arg("bitmask") = py::none(),
        py::arg("masked") = py::none());
  m.def("bind_threads", &bind_threads, "pin the calling thread's intra-op pool, thread i to cpus[i % n]");
  m.def("gq_linear_native", &gq_linear_native, "whether gq_linear is vectorised (AVX-512, AVX2 or NEON; else a scalar loop)");
}
