// Python bindings of the CPU kernels (one extension module, built by models/layers/kernels.py).
#include <torch/extension.h>

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_table,
                                  at::Tensor lens, double scale, int64_t window);
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps, double offset);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
  m.def("rms_norm", &rms_norm, "RMSNorm, Llama (offset 0) or Gemma (offset 1) convention");
}
