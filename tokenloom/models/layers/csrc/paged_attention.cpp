// Decode attention that reads keys and values in place from the paged cache.
//
// One query token per sequence. The torch-ops formulation gathers every sequence's whole key/value
// history into a padded tensor each step (a copy the size of the cache in use, per layer); this kernel
// walks each sequence's block table instead and reads every cached key and value exactly once.
// Work is split over (sequence, kv head); the query heads of one group share each key/value row read.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

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

template <typename T>
void decode_kernel(const T* q, const T* k_cache, const T* v_cache, const int64_t* table, const int64_t* lens,
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
    std::vector<float> qf(sub * dim), acc(sub * dim), row(dim), scores, maxes(sub), sums(sub);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / (kv_heads * parts), h = (task / parts) % kv_heads, part = task % parts;
      const int64_t first_head = h * group + part * sub;
      const int64_t len = lens[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      to_float(q + (r * heads + first_head) * dim, qf.data(), sub * dim);
      scores.assign(sub * n, 0.f);
      std::fill(maxes.begin(), maxes.end(), -INFINITY);
      const int64_t* blocks = table + r * max_blocks;
      for (int64_t p = first; p < len; ++p) {
        const int64_t slot = blocks[p / block_size] * block_size + p % block_size;
        to_float(k_cache + (slot * kv_heads + h) * dim, row.data(), dim);
        for (int64_t g = 0; g < sub; ++g) {
          const float s = dot(qf.data() + g * dim, row.data(), dim) * scale;
          scores[g * n + (p - first)] = s;
          maxes[g] = std::max(maxes[g], s);
        }
      }
      for (int64_t g = 0; g < sub; ++g) {
        float total = 0.f;
        float* sg = scores.data() + g * n;
        for (int64_t i = 0; i < n; ++i) {
          sg[i] = std::exp(sg[i] - maxes[g]);
          total += sg[i];
        }
        sums[g] = 1.f / total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = first; p < len; ++p) {
        const int64_t slot = blocks[p / block_size] * block_size + p % block_size;
        to_float(v_cache + (slot * kv_heads + h) * dim, row.data(), dim);
        for (int64_t g = 0; g < sub; ++g) axpy(scores[g * n + (p - first)], row.data(), acc.data() + g * dim, dim);
      }
      T* o = out + (r * heads + first_head) * dim;
      for (int64_t g = 0; g < sub; ++g)
        for (int64_t i = 0; i < dim; ++i) o[g * dim + i] = static_cast<T>(acc[g * dim + i] * sums[g]);
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
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "dtype mismatch");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 indices");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "head layout mismatch");
  q = q.contiguous();
  block_table = block_table.contiguous();
  lens = lens.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                            block_table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                            q.size(0), q.size(1), k_cache.size(2), q.size(2), k_cache.size(1), block_table.size(1),
                            static_cast<float>(scale), window);
  });
  return out;
}
