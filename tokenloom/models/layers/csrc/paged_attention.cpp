// Decode attention that reads keys and values in place from the paged cache.
//
// One query token per sequence. The torch-ops formulation gathers every sequence's whole key/value
// history into a padded tensor each step (a copy the size of the cache in use, per layer); this kernel
// walks each sequence's block table instead and reads every cached key and value exactly once.
// Work is split over (sequence, kv head); the query heads of one group share each key/value row read.
//
// Levels: at avx512, avx2 and neon (simd.h's vectors of 16, 8 and 8 lanes) head sizes that are a
// multiple of two vectors (32, 16, 16) and groups of 1, 2, 4 or 8 query heads take the vector path;
// everything else, and the portable build, the scalar loops below.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "kv_dtype.h"
#include "simd.h"

namespace {

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

// One (sequence, head group) task in scalar loops: any head size and group size, and the portable build.
// Writes the group's normalised outputs to acc [sub, dim]; scores is scratch [sub, n].
template <typename T>
void decode_task_scalar(int64_t sub, const float* qf, const T* k_cache, const T* v_cache, const int64_t* slots,
                        int64_t n, int64_t kv_heads, int64_t h, int64_t dim, float scale, float* scores, float* acc) {
  std::vector<float> row(dim), maxes(sub, -INFINITY), inv(sub);
  for (int64_t i = 0; i < n; ++i) {
    to_float(k_cache + (slots[i] * kv_heads + h) * dim, row.data(), dim);
    for (int64_t g = 0; g < sub; ++g) {
      const float s = dot(qf + g * dim, row.data(), dim) * scale;
      scores[g * n + i] = s;
      maxes[g] = std::max(maxes[g], s);
    }
  }
  for (int64_t g = 0; g < sub; ++g) {
    float total = 0.f;
    float* sg = scores + g * n;
    for (int64_t i = 0; i < n; ++i) {
      sg[i] = std::exp(sg[i] - maxes[g]);
      total += sg[i];
    }
    inv[g] = 1.f / total;
  }
  std::fill(acc, acc + sub * dim, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    to_float(v_cache + (slots[i] * kv_heads + h) * dim, row.data(), dim);
    for (int64_t g = 0; g < sub; ++g) axpy(scores[g * n + i], row.data(), acc + g * dim, dim);
  }
  for (int64_t g = 0; g < sub; ++g)
    for (int64_t i = 0; i < dim; ++i) acc[g * dim + i] *= inv[g];
}

#ifdef TOKENLOOM_SIMD
using namespace tokenloom::simd;

// Each key/value row is loaded and widened to float once per vector and used by every query head of
// the group from registers; the softmax's exponentials are vectorised; slots are looked up once per
// sequence.

// Softmax numerators of s[0..n) in place (s - max, exponentiated); returns their sum.
inline float exp_shifted(float* s, int64_t n, float max) {
  const vf m = vset1(max);
  vf total = vzero();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf e = vexp(vsub(vload(s + i), m));
    vstore(s + i, e);
    total = vadd(total, e);
  }
  float sum = vsum(total);
  if (i < n) {  // the last n % kLanes scores through a padded vector, so they get the same exp
    float tail[kLanes];
    std::fill(tail, tail + kLanes, max);
    std::copy(s + i, s + n, tail);
    vstore(tail, vexp(vsub(vload(tail), m)));
    for (int64_t j = 0; i + j < n; ++j) {
      s[i + j] = tail[j];
      sum += tail[j];
    }
  }
  return sum;
}

// Scaled scores q_g . k_i of the SUB query heads against the n keys; returns each head's maximum.
template <typename T, int SUB>
void scores_of(const float* qf, const T* k_cache, const int64_t* slots, int64_t n, int64_t kv_heads, int64_t h,
               int64_t dim, float scale, float* scores, float* maxes) {
  for (int g = 0; g < SUB; ++g) maxes[g] = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    const T* krow = k_cache + (slots[i] * kv_heads + h) * dim;
    vf a[SUB];
    for (int g = 0; g < SUB; ++g) a[g] = vzero();
    for (int64_t c = 0; c < dim; c += kLanes) {
      const vf k = vload(krow + c);
      for (int g = 0; g < SUB; ++g) a[g] = vfma(vload(qf + g * dim + c), k, a[g]);
    }
    for (int g = 0; g < SUB; ++g) {
      const float sc = vsum(a[g]) * scale;
      scores[g * n + i] = sc;
      maxes[g] = std::max(maxes[g], sc);
    }
  }
}

// acc_g = sum_i p_gi v_i * inv_g, V vectors of the head dimension at a time: two where the register
// file holds 2 * SUB accumulators besides the value and weight vectors, else one.
template <typename T, int SUB>
void weighted_values(const float* probs, const float* inv, const T* v_cache, const int64_t* slots, int64_t n,
                     int64_t kv_heads, int64_t h, int64_t dim, float* acc) {
  constexpr int V = 2 * SUB + 3 <= kRegs ? 2 : 1;
  for (int64_t c = 0; c < dim; c += V * kLanes) {
    vf o[SUB][V];
    for (int g = 0; g < SUB; ++g)
      for (int u = 0; u < V; ++u) o[g][u] = vzero();
    for (int64_t i = 0; i < n; ++i) {
      const T* vrow = v_cache + (slots[i] * kv_heads + h) * dim + c;
      vf v[V];
      for (int u = 0; u < V; ++u) v[u] = vload(vrow + u * kLanes);
      for (int g = 0; g < SUB; ++g) {
        const vf w = vset1(probs[g * n + i]);
        for (int u = 0; u < V; ++u) o[g][u] = vfma(w, v[u], o[g][u]);
      }
    }
    for (int g = 0; g < SUB; ++g)
      for (int u = 0; u < V; ++u) vstore(acc + g * dim + c + u * kLanes, vmul(o[g][u], vset1(inv[g])));
  }
}

template <typename T, int SUB>
void decode_task_simd(const float* qf, const T* k_cache, const T* v_cache, const int64_t* slots, int64_t n,
                      int64_t kv_heads, int64_t h, int64_t dim, float scale, float* scores, float* acc) {
  float maxes[SUB], inv[SUB];
  scores_of<T, SUB>(qf, k_cache, slots, n, kv_heads, h, dim, scale, scores, maxes);
  for (int g = 0; g < SUB; ++g) inv[g] = 1.f / exp_shifted(scores + g * n, n, maxes[g]);
  weighted_values<T, SUB>(scores, inv, v_cache, slots, n, kv_heads, h, dim, acc);
}

// Runs one (sequence, head group) task on the vector path; false when this shape has no such path.
template <typename T>
bool decode_task_fast(int64_t sub, const float* qf, const T* k_cache, const T* v_cache, const int64_t* slots,
                      int64_t n, int64_t kv_heads, int64_t h, int64_t dim, float scale, float* scores, float* acc) {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    if (dim % (2 * kLanes) != 0) return false;
    auto task = decode_task_simd<T, 1>;
    switch (sub) {
      case 1: break;
      case 2: task = decode_task_simd<T, 2>; break;
      case 4: task = decode_task_simd<T, 4>; break;
      case 8: task = decode_task_simd<T, 8>; break;
      default: return false;
    }
    task(qf, k_cache, v_cache, slots, n, kv_heads, h, dim, scale, scores, acc);
    return true;
  }
}
#else
template <typename T>
bool decode_task_fast(int64_t, const float*, const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                      float, float*, float*) {
  return false;
}
#endif

template <typename T, typename C>
void decode_kernel(const T* q, const C* k_cache, const C* v_cache, const int64_t* table, const int64_t* lens,
                   T* out, int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                   int64_t max_blocks, float scale, int64_t window) {
  const int64_t group = heads / kv_heads;
  // Few sequences (one-stream decode): split each group's query heads over the threads as well, so
  // every core has work; each part re-reads the group's keys and values (from cache: they are small).
  int64_t parts = 1;
  const int64_t threads = at::get_num_threads();
  if (rows > 0 && rows * kv_heads < threads)
    for (int64_t p = std::min(group, threads / (rows * kv_heads)); p > 1; --p)
      if (group % p == 0) {
        parts = p;
        break;
      }
  const int64_t sub = group / parts;
  at::parallel_for(0, rows * kv_heads * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(sub * dim), acc(sub * dim), scores;
    std::vector<int64_t> slots;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / (kv_heads * parts), h = (task / parts) % kv_heads, part = task % parts;
      const int64_t first_head = h * group + part * sub;
      const int64_t len = lens[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      to_float(q + (r * heads + first_head) * dim, qf.data(), sub * dim);
      scores.resize(sub * n);
      const int64_t* blocks = table + r * max_blocks;
      slots.resize(n);
      for (int64_t p = first; p < len; ++p) slots[p - first] = blocks[p / block_size] * block_size + p % block_size;
      if (!decode_task_fast(sub, qf.data(), k_cache, v_cache, slots.data(), n, kv_heads, h, dim, scale,
                            scores.data(), acc.data()))
        decode_task_scalar(sub, qf.data(), k_cache, v_cache, slots.data(), n, kv_heads, h, dim, scale, scores.data(),
                           acc.data());
      T* o = out + (r * heads + first_head) * dim;
      for (int64_t i = 0; i < sub * dim; ++i) o[i] = static_cast<T>(acc[i]);
    }
  });
}

}  // namespace

// q [rows, heads, dim]; caches [blocks, block_size, kv_heads, dim]; block_table [rows, max_blocks] int64;
// lens [rows] int64 (keys per row, the new one included); window <= 0: no sliding window.
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_table,
                                  at::Tensor lens, double scale, int64_t window) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
                  tokenloom::cache_dtype_ok(q.scalar_type(), k_cache.scalar_type()),
              "dtype mismatch");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 indices");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "head layout mismatch");
  q = q.contiguous();
  block_table = block_table.contiguous();
  lens = lens.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    tokenloom::with_cache_type<scalar_t>(k_cache.scalar_type(), [&](auto cache_type) {
      using C = decltype(cache_type);
      decode_kernel<scalar_t, C>(q.data_ptr<scalar_t>(), k_cache.data_ptr<C>(), v_cache.data_ptr<C>(),
                                 block_table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                                 q.size(0), q.size(1), k_cache.size(2), q.size(2), k_cache.size(1),
                                 block_table.size(1), static_cast<float>(scale), window);
    });
  });
  return out;
}
