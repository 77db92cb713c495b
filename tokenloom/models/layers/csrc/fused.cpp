// Fused kernels for the small per-layer steps around the matrix products.
//
// At decode a layer's tensors are a few kilobytes, so each torch op costs its dispatch, not its
// arithmetic: a layer ran ~50 of them. These kernels do in one call what the model code otherwise
// does in 3 to 25, with the same rounding to the activation dtype at the same points:
//   add_rms_norm     residual + norm(update) (or + update), then the next block's input norm;
//   qkv_rope_cache   split q|k|v, q/k RMSNorm (optional), rotary embedding, and the write of the new
//                    keys and values into the paged cache.
// Levels: plain loops the compiler vectorises at each level (as norm_row.h's): the work is a few
// kilobytes a call, so the dispatches saved matter, not the vector width.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "kv_dtype.h"
#include "norm_row.h"

namespace {

template <typename T, typename W>
void add_rms_norm_kernel(const T* residual, const T* update, const W* update_w, const W* next_w, T* new_residual,
                         T* normed, int64_t rows, int64_t dim, float eps, float offset) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(update_w ? dim : 0);
    for (int64_t r = begin; r < end; ++r) {
      const T* u = update + r * dim;
      if (update_w) {
        tokenloom::rms_norm_row(u, update_w, scratch.data(), dim, eps, offset);
        u = scratch.data();
      }
      const T* x = residual + r * dim;
      T* out = new_residual + r * dim;
      for (int64_t i = 0; i < dim; ++i) out[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(u[i]));
      tokenloom::rms_norm_row(out, next_w, normed + r * dim, dim, eps, offset);
    }
  });
}

// One head of one token: optional RMSNorm, then rotate-half RoPE with tables [cos | cos], [-sin | sin]:
// out = round(round(x * cos) + swap_halves(x) * sin), as the torch path (mul, then addcmul) rounds.
template <typename T, typename W>
inline void norm_rope_head(const T* x, const W* norm_w, const T* cos, const T* sin, T* out, T* scratch, int64_t dim,
                           float eps, float offset) {
  if (norm_w) {
    tokenloom::rms_norm_row(x, norm_w, scratch, dim, eps, offset);
    x = scratch;
  }
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < dim; ++i) {
    const T rotated = static_cast<T>(static_cast<float>(x[i]) * static_cast<float>(cos[i]));
    const float swapped = static_cast<float>(x[i < half ? i + half : i - half]);
    out[i] = static_cast<T>(static_cast<float>(rotated) + swapped * static_cast<float>(sin[i]));
  }
}

// Stores a head's keys or values into the cache (dtype C) and leaves `o` holding what was stored, so that
// attention over the fresh keys of a chunk sees exactly what later steps read from the cache.
template <typename T, typename C>
inline void store_rounded(T* o, C* cache, int64_t dim) {
  for (int64_t i = 0; i < dim; ++i) {
    cache[i] = static_cast<C>(static_cast<float>(o[i]));
    if constexpr (!std::is_same_v<T, C>) o[i] = static_cast<T>(static_cast<float>(cache[i]));
  }
}

template <typename T, typename W, typename C>
void qkv_rope_cache_kernel(const T* qkv, const int64_t* positions, const T* cos, const T* sin, const W* q_w,
                           const W* k_w, const int64_t* slots, C* k_cache, C* v_cache, T* out, int64_t tokens,
                           int64_t heads, int64_t kv_heads, int64_t dim, float eps, float offset) {
  const int64_t width = heads + 2 * kv_heads;
  at::parallel_for(0, tokens * width, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / width, h = task % width;
      const T* x = qkv + task * dim;
      T* o = out + task * dim;
      const int64_t pos = positions[t];
      if (h < heads) {
        norm_rope_head(x, q_w, cos + pos * dim, sin + pos * dim, o, scratch.data(), dim, eps, offset);
      } else if (h < heads + kv_heads) {
        norm_rope_head(x, k_w, cos + pos * dim, sin + pos * dim, o, scratch.data(), dim, eps, offset);
        store_rounded(o, k_cache + (slots[t] * kv_heads + h - heads) * dim, dim);
      } else {
        std::copy(x, x + dim, o);
        store_rounded(o, v_cache + (slots[t] * kv_heads + h - heads - kv_heads) * dim, dim);
      }
    }
  });
}

template <typename W>
const W* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<W>() : nullptr;
}

c10::optional<at::Tensor> as_weight(const c10::optional<at::Tensor>& w, const at::Tensor& like, int64_t dim,
                                    const char* what) {
  if (!w.has_value() || !w->defined()) return c10::nullopt;
  TORCH_CHECK(w->dim() == 1 && w->size(0) == dim, what, ": weight must have ", dim, " elements");
  return w->to(like.scalar_type()).contiguous();
}

}  // namespace

// residual, update [..., dim]; update_weight (the update's own norm, Gemma's post-block norms) or None;
// next_weight [dim]. Returns (residual + norm(update), norm_next(that)).
std::vector<at::Tensor> add_rms_norm(at::Tensor residual, at::Tensor update, c10::optional<at::Tensor> update_weight,
                                     at::Tensor next_weight, double eps, double offset) {
  TORCH_CHECK(residual.device().is_cpu() && update.device().is_cpu(), "add_rms_norm: CPU tensors only");
  TORCH_CHECK(residual.sizes() == update.sizes() && residual.scalar_type() == update.scalar_type(),
              "add_rms_norm: residual and update must match in shape and dtype");
  const int64_t dim = residual.size(-1), rows = dim ? residual.numel() / dim : 0;
  residual = residual.contiguous();
  update = update.contiguous();
  auto update_w = as_weight(update_weight, residual, dim, "add_rms_norm");
  auto next_w = as_weight(next_weight, residual, dim, "add_rms_norm").value();
  auto new_residual = at::empty_like(residual), normed = at::empty_like(residual);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, residual.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_kernel<scalar_t, scalar_t>(residual.data_ptr<scalar_t>(), update.data_ptr<scalar_t>(),
                                            optional_ptr<scalar_t>(update_w), next_w.data_ptr<scalar_t>(),
                                            new_residual.data_ptr<scalar_t>(), normed.data_ptr<scalar_t>(), rows, dim,
                                            static_cast<float>(eps), static_cast<float>(offset));
  });
  return {new_residual, normed};
}

// qkv [tokens, (heads + 2 kv_heads) * dim]; positions, slots int64 [tokens]; cos, sin [max_pos, dim] in
// qkv's dtype; q_weight, k_weight [dim] or None; caches [blocks, block_size, kv_heads, dim] in qkv's dtype,
// or float16 / bfloat16 under a wider qkv. Writes the new keys and values at `slots` and returns
// [tokens, heads + 2 kv_heads, dim]: rotated q, k, then v (k and v as the cache holds them).
at::Tensor qkv_rope_cache(at::Tensor qkv, at::Tensor positions, at::Tensor cos, at::Tensor sin,
                          c10::optional<at::Tensor> q_weight, c10::optional<at::Tensor> k_weight, double eps,
                          double offset, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots, int64_t heads,
                          int64_t kv_heads) {
  TORCH_CHECK(qkv.device().is_cpu(), "qkv_rope_cache: CPU tensors only");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == kv_heads,
              "qkv_rope_cache: caches must be [blocks, block_size, kv_heads, dim]");
  const int64_t dim = k_cache.size(3), tokens = qkv.size(0);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (heads + 2 * kv_heads) * dim, "qkv_rope_cache: qkv width mismatch");
  TORCH_CHECK(dim % 2 == 0 && cos.dim() == 2 && cos.size(1) == dim && sin.sizes() == cos.sizes(),
              "qkv_rope_cache: tables must be [positions, dim]");
  TORCH_CHECK(qkv.scalar_type() == cos.scalar_type() && qkv.scalar_type() == sin.scalar_type() &&
                  k_cache.scalar_type() == v_cache.scalar_type() &&
                  tokenloom::cache_dtype_ok(qkv.scalar_type(), k_cache.scalar_type()),
              "qkv_rope_cache: dtype mismatch");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
                  positions.numel() == tokens && slots.numel() == tokens,
              "qkv_rope_cache: positions and slots must be int64 [tokens]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "qkv_rope_cache: caches and tables must be contiguous");
  qkv = qkv.contiguous();
  positions = positions.contiguous();
  slots = slots.contiguous();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "qkv_rope_cache: position ", pos[t], " out of range");
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "qkv_rope_cache: slot ", slot[t], " out of range");
  }
  auto q_w = as_weight(q_weight, qkv, dim, "qkv_rope_cache"), k_w = as_weight(k_weight, qkv, dim, "qkv_rope_cache");
  auto out = at::empty({tokens, heads + 2 * kv_heads, dim}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "qkv_rope_cache", [&] {
    tokenloom::with_cache_type<scalar_t>(k_cache.scalar_type(), [&](auto cache_type) {
      using C = decltype(cache_type);
      qkv_rope_cache_kernel<scalar_t, scalar_t, C>(
          qkv.data_ptr<scalar_t>(), positions.data_ptr<int64_t>(), cos.data_ptr<scalar_t>(),
          sin.data_ptr<scalar_t>(), optional_ptr<scalar_t>(q_w), optional_ptr<scalar_t>(k_w),
          slots.data_ptr<int64_t>(), k_cache.data_ptr<C>(), v_cache.data_ptr<C>(), out.data_ptr<scalar_t>(), tokens,
          heads, kv_heads, dim, static_cast<float>(eps), static_cast<float>(offset));
    });
  });
  return out;
}

