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
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

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

#ifdef __AVX512F__
// AVX-512 path for head sizes that are a multiple of 32: each key/value row is loaded and widened to
// float once per 16 lanes and used by every query head of the group from registers; the softmax's
// exponentials are vectorized; slots are looked up once per sequence.
template <typename T>
inline __m512 load16(const T* p);
template <>
inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
template <>
inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// exp(x) as 2^n * 2^f, f in [-0.5, 0.5], 2^f by its degree-6 Taylor polynomial (relative error ~1e-7).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381610e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Softmax numerators of s[0..n) in place (s - max, exponentiated); returns their sum.
inline float exp_shifted(float* s, int64_t n, float max) {
  const __m512 m = _mm512_set1_ps(max);
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), m));
    _mm512_mask_storeu_ps(s + i, k, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(k, e));
  }
  return _mm512_reduce_add_ps(total);
}

template <typename T, int SUB>
void decode_task_avx512(const float* qf, const T* k_cache, const T* v_cache, const int64_t* slots, int64_t n,
                        int64_t kv_heads, int64_t h, int64_t dim, float scale, float* scores, float* acc) {
  float maxes[SUB];
  for (int g = 0; g < SUB; ++g) maxes[g] = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    const T* krow = k_cache + (slots[i] * kv_heads + h) * dim;
    __m512 a[SUB];
    for (int g = 0; g < SUB; ++g) a[g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < dim; c += 16) {
      const __m512 k = load16(krow + c);
      for (int g = 0; g < SUB; ++g) a[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * dim + c), k, a[g]);
    }
    for (int g = 0; g < SUB; ++g) {
      const float sc = _mm512_reduce_add_ps(a[g]) * scale;
      scores[g * n + i] = sc;
      maxes[g] = std::max(maxes[g], sc);
    }
  }
  float inv[SUB];
  for (int g = 0; g < SUB; ++g) inv[g] = 1.f / exp_shifted(scores + g * n, n, maxes[g]);
  for (int64_t c = 0; c < dim; c += 32) {
    __m512 lo[SUB], hi[SUB];
    for (int g = 0; g < SUB; ++g) lo[g] = hi[g] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      const T* vrow = v_cache + (slots[i] * kv_heads + h) * dim + c;
      const __m512 v0 = load16(vrow), v1 = load16(vrow + 16);
      for (int g = 0; g < SUB; ++g) {
        const __m512 w = _mm512_set1_ps(scores[g * n + i]);
        lo[g] = _mm512_fmadd_ps(w, v0, lo[g]);
        hi[g] = _mm512_fmadd_ps(w, v1, hi[g]);
      }
    }
    for (int g = 0; g < SUB; ++g) {
      const __m512 s = _mm512_set1_ps(inv[g]);
      _mm512_storeu_ps(acc + g * dim + c, _mm512_mul_ps(lo[g], s));
      _mm512_storeu_ps(acc + g * dim + c + 16, _mm512_mul_ps(hi[g], s));
    }
  }
}

// Runs one (sequence, head group) task on the AVX-512 path; false when this shape has no such path.
template <typename T>
bool decode_task_fast(int64_t sub, const float* qf, const T* k_cache, const T* v_cache, const int64_t* slots,
                      int64_t n, int64_t kv_heads, int64_t h, int64_t dim, float scale, float* scores, float* acc) {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
  if (dim % 32 != 0) return false;
  switch (sub) {
    case 1: decode_task_avx512<T, 1>(qf, k_cache, v_cache, slots, n, kv_heads, h, dim, scale, scores, acc); return true;
    case 2: decode_task_avx512<T, 2>(qf, k_cache, v_cache, slots, n, kv_heads, h, dim, scale, scores, acc); return true;
    case 4: decode_task_avx512<T, 4>(qf, k_cache, v_cache, slots, n, kv_heads, h, dim, scale, scores, acc); return true;
    case 8: decode_task_avx512<T, 8>(qf, k_cache, v_cache, slots, n, kv_heads, h, dim, scale, scores, acc); return true;
    default: return false;
  }
  }
}
#else
template <typename T>
bool decode_task_fast(int64_t, const float*, const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                      float, float*, float*) {
  return false;
}
#endif

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
    std::vector<int64_t> slots;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / (kv_heads * parts), h = (task / parts) % kv_heads, part = task % parts;
      const int64_t first_head = h * group + part * sub;
      const int64_t len = lens[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      to_float(q + (r * heads + first_head) * dim, qf.data(), sub * dim);
      scores.assign(sub * n, 0.f);
      const int64_t* blocks_r = table + r * max_blocks;
      slots.resize(n);
      for (int64_t p = first; p < len; ++p) slots[p - first] = blocks_r[p / block_size] * block_size + p % block_size;
      if (decode_task_fast(sub, qf.data(), k_cache, v_cache, slots.data(), n, kv_heads, h, dim, scale, scores.data(),
                           acc.data())) {
        T* o = out + (r * heads + first_head) * dim;
        for (int64_t i = 0; i < sub * dim; ++i) o[i] = static_cast<T>(acc[i]);
        continue;
      }
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
