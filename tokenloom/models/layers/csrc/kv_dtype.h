// The KV cache's element type next to the activations': the same type, or float16 / bfloat16 under wider
// activations (`kv_cache_dtype`: half the cache bytes of float32 activations, as llama.cpp's f16 cache).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace tokenloom {

// Whether a cache of `cache` elements may serve activations of `act`.
inline bool cache_dtype_ok(at::ScalarType act, at::ScalarType cache) {
  return cache == act || cache == at::kHalf || cache == at::kBFloat16;
}

// fn(C()) with C the cache's element type for activations of type T (checked by cache_dtype_ok).
template <typename T, typename Fn>
void with_cache_type(at::ScalarType cache, Fn&& fn) {
  if (cache == at::kHalf) {
    fn(c10::Half());
  } else if (cache == at::kBFloat16) {
    fn(c10::BFloat16());
  } else {
    fn(T());
  }
}

}  // namespace tokenloom
