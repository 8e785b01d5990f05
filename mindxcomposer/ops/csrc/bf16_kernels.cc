// CPU kernels for bf16-stored weights with fp32 activations, called through MindSpore's
// `ops.Custom(func_type="aot")`. MindSpore 2.7 has no CPU MatMul/Gather for bf16; casting a whole
// weight to fp32 inside a decode graph would allocate an fp32 copy of every weight (CPU graphs keep
// their intermediates until they return). These kernels read the bf16 bits directly: bf16 -> fp32 is
// exact (the 16 bits become the high half of the fp32), so the products are fp32 products of the
// stored values, only the summation order differs from an fp32 MatMul.
//
// Calling convention of MindSpore's AOT custom ops: `params` holds the inputs then the outputs.
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  lo = _mm_add_ss(lo, sh);
  return _mm_cvtss_f32(lo);
}
#endif

// x reordered per 16 inputs into [8 even k | 8 odd k] (`split16`): the order in which 16 bf16 weights, loaded as 8
// dwords, become fp32 with one instruction each (the even ones shifted into the high half, the odd ones masked in
// place). Inputs past the last whole 16 stay in x's order (the scalar tail reads x).
void split16(const float *x, int64_t m, int64_t k, float *xs) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c + 16 <= k; c += 16)
      for (int j = 0; j < 8; ++j) {
        xs[r * k + c + j] = x[r * k + c + 2 * j];
        xs[r * k + c + 8 + j] = x[r * k + c + 2 * j + 1];
      }
}

// y[m, n] = sum_k x[m, k] * w[n, k] for MR rows of x at once: one pass over the weight row serves
// every activation row, so the weight (the bytes that bound a decode step) is read once. xs: x as `split16`.
template <int MR>
inline void dot_rows(const float *x, const float *xs, int64_t ldx, const uint16_t *w, int64_t k, float *y,
                     int64_t ldy) {
  int64_t i = 0;
  float acc_tail[MR];
#if defined(__AVX2__) && defined(__FMA__)
  // kV steps of 16 weights an iteration, two sums each (even, odd k): 8 independent FMA chains whatever MR. Before,
  // each 8 weights were widened by two instructions (vpmovzxwd, shift) and one row had 2 chains, which waited on
  // the FMA's latency: 29 GB/s against a 44 GB/s read probe on Zen 2.
  constexpr int kV = MR == 1 ? 4 : MR == 2 ? 2 : 1;
  __m256 acc[MR][2 * kV];
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < 2 * kV; ++h) acc[m][h] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (; i + 16 * kV <= k; i += 16 * kV) {
#pragma GCC unroll 4
    for (int h = 0; h < kV; ++h) {
      // Several rows: the weight stream prefetched 4 KB ahead (measured on Zen 2: 2 and 4 rows ~15% faster; one row
      // 5% slower, so not there).
      if (MR > 1 && ((i + 16 * h) & 31) == 0)
        _mm_prefetch(reinterpret_cast<const char *>(w + i + 16 * h) + 4096, _MM_HINT_T0);
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(w + i + 16 * h));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(raw, high));
      for (int m = 0; m < MR; ++m) {
        acc[m][2 * h] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xs + m * ldx + i + 16 * h), acc[m][2 * h]);
        acc[m][2 * h + 1] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xs + m * ldx + i + 16 * h + 8), acc[m][2 * h + 1]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int h = 1; h < 2 * kV; ++h) acc[m][0] = _mm256_add_ps(acc[m][0], acc[m][h]);
    acc_tail[m] = hsum(acc[m][0]);
  }
#else
  (void)xs;
  for (int m = 0; m < MR; ++m) acc_tail[m] = 0.0f;
#endif
  for (; i < k; ++i) {
    float wv = bf16_to_float(w[i]);
    for (int m = 0; m < MR; ++m) acc_tail[m] += wv * x[m * ldx + i];
  }
  for (int m = 0; m < MR; ++m) y[m * ldy] = acc_tail[m];
}

}  // namespace

// x fp32 [..., K], w bf16 [N, K] -> y fp32 [..., N] (y = x w^T, torch's Linear without bias).
extern "C" int MxcLinearBf16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 3) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const uint16_t *w = static_cast<const uint16_t *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t k = shapes[1][ndims[1] - 1];
  const int64_t n = shapes[1][0];
  const int64_t m = numel(ndims[0], shapes[0]) / k;
#if defined(__AVX2__) && defined(__FMA__)
  std::vector<float> split(m * k);
  split16(x, m, k, split.data());
  const float *xs = split.data();
#else
  const float *xs = x;  // read by the vector loop only
#endif
  // Rows of the weight are split among threads in contiguous ranges: each thread streams its part.
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t *wr = w + j * k;
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) dot_rows<4>(x + r * k, xs + r * k, k, wr, k, y + r * n + j, n);
    for (; r + 2 <= m; r += 2) dot_rows<2>(x + r * k, xs + r * k, k, wr, k, y + r * n + j, n);
    for (; r < m; ++r) dot_rows<1>(x + r * k, xs + r * k, k, wr, k, y + r * n + j, n);
  }
  return 0;
}

// ids int32 [...], table bf16 [V, H] -> fp32 [..., H]. Out-of-range ids give zeros, as MindSpore's
// CPU Gather does.
extern "C" int MxcEmbeddingBf16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (nparam != 3) return 1;
  const int32_t *ids = static_cast<const int32_t *>(params[0]);
  const uint16_t *table = static_cast<const uint16_t *>(params[1]);
  float *out = static_cast<float *>(params[2]);
  const int64_t v = shapes[1][0];
  const int64_t h = shapes[1][1];
  const int64_t count = numel(ndims[0], shapes[0]);
  for (int64_t t = 0; t < count; ++t) {
    float *o = out + t * h;
    const int64_t id = ids[t];
    if (id < 0 || id >= v) {
      std::memset(o, 0, sizeof(float) * h);
      continue;
    }
    const uint16_t *row = table + id * h;
    for (int64_t c = 0; c < h; ++c) o[c] = bf16_to_float(row[c]);
  }
  return 0;
}
