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
inline __m256 load8_bf16(const uint16_t *p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i *>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

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

// y[m, n] = sum_k x[m, k] * w[n, k] for MR rows of x at once: one pass over the weight row serves
// every activation row, so the weight (the bytes that bound a decode step) is read once.
template <int MR>
inline void dot_rows(const float *x, int64_t ldx, const uint16_t *w, int64_t k, float *y, int64_t ldy) {
  int64_t i = 0;
  float acc_tail[MR];
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (; i + 16 <= k; i += 16) {
    __m256 w0 = load8_bf16(w + i);
    __m256 w1 = load8_bf16(w + i + 8);
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * ldx + i), acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * ldx + i + 8), acc[m][1]);
    }
  }
  for (int m = 0; m < MR; ++m) acc_tail[m] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
#else
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
  // Rows of the weight are split among threads in contiguous ranges: each thread streams its part.
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t *wr = w + j * k;
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) dot_rows<4>(x + r * k, k, wr, k, y + r * n + j, n);
    for (; r + 2 <= m; r += 2) dot_rows<2>(x + r * k, k, wr, k, y + r * n + j, n);
    for (; r < m; ++r) dot_rows<1>(x + r * k, k, wr, k, y + r * n + j, n);
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
