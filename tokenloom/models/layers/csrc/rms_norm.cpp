// RMSNorm in one pass per row, in the two conventions checkpoints use (see models/layers/norm.py).
//
// The row formula, and how it vectorises at each instruction-set level, are in norm_row.h. torch's CPU
// rms_norm runs as five or six separate ops (each a pass over the data and a dispatch); at decode, with
// one 640-wide row, the dispatches cost more than the arithmetic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "kernels.h"
#include "norm_row.h"

namespace {

template <typename T, typename W>
void rms_norm_kernel(const T* x, const W* w, T* out, int64_t rows, int64_t dim, float eps, float offset) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) tokenloom::rms_norm_row(x + r * dim, w, out + r * dim, dim, eps, offset);
  });
}

}  // namespace

// x [..., dim] (made contiguous), weight [dim] of x's dtype or float32.
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps, double offset) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0), "rms_norm: weight must match the last dimension");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
              "rms_norm: weight dtype must be x's or float32");
  x = x.contiguous();
  weight = weight.contiguous();
  auto out = at::empty_like(x);
  const int64_t dim = x.size(-1), rows = dim ? x.numel() / dim : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    if (weight.scalar_type() == at::kFloat && x.scalar_type() != at::kFloat) {
      rms_norm_kernel<scalar_t, float>(x.data_ptr<scalar_t>(), weight.data_ptr<float>(), out.data_ptr<scalar_t>(),
                                       rows, dim, static_cast<float>(eps), static_cast<float>(offset));
    } else {
      rms_norm_kernel<scalar_t, scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                          out.data_ptr<scalar_t>(), rows, dim, static_cast<float>(eps),
                                          static_cast<float>(offset));
    }
  });
  return out;
}
