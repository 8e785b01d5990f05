// Decode-sized products (a few rows) with quantized weights (`mindxcomposer/quantization.py`), called through
// MindSpore's `ops.Custom(func_type="aot")`: the packed weight is read in place, once, for every activation row
// (read-bound: the bytes of the weight are the cost of a decode step), and never widened into a copy.
//
// - int8 [N, K] with an fp32 scale per output channel: y[m, n] = scale[n] * sum_k x[m, k] q[n, k]
//   (the scale is applied to the sum; the twin applies it to each weight: the same value up to one rounding);
// - int4 [N, ceil(K / 2)] (even k in the low nibble) with an fp32 scale and a uint8 zero point per group:
//   every weight becomes exactly the fp32 value (q - zero) * scale that the dequantized fp32 model holds. With
//   AVX-512 a group's 16 possible values are a table and a nibble is an index into it (vpermps reads the low
//   4 bits of each lane), so a weight costs no arithmetic before its FMA. With AVX2 only, (q - zero) is exact and
//   the scale multiplies each group's sum (see `int4_rows`).
//
// Several activation rows (2..16) go through register tiles of activation rows x weight rows (`row_blocks`): each
// weight block is read from memory once and applied to every row.
//
// A batch-1 decode step with long rows (w2: K = 14336, 56 KB of fp32 activations, more than L1) reads each
// activation vector once for a tile of weight rows (`row_tiles`) instead of once per row, with the weight streams
// prefetched; shorter rows are read one at a time (the activations stay in L1, the weight is one stream).
//
// Calling convention of MindSpore's AOT custom ops: `params` holds the inputs, then the outputs.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

int64_t count(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

#if defined(__AVX512F__)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
// The 16 values an int4 weight of one group can take, (q - zero) * scale, exactly as dequantized: a nibble
// looks its value up in this table (`_mm512_permutexvar_ps`).
inline __m512 int4_table(uint8_t zero, float scale) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(static_cast<float>(zero))), _mm512_set1_ps(scale));
}
// Weight streams are prefetched this many bytes ahead (two int4 rows of 4096 inputs). The int4 loop is nearly
// compute-bound (a table lookup per 16 weights), so the hardware prefetcher alone leaves the core waiting on memory
// between bursts of arithmetic; measured on the release's shapes (benchmarks/quant_decode_kernels.py): int4 at one
// row from 13 to about 20 GB/s (from 512 bytes ahead: 17).
constexpr int kAhead = 4096;
#elif defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
#endif

// ---- int8 ---------------------------------------------------------------------------------------------
// MR rows of x [.., K] against one weight row q [K]: y[m * ldy] = scale * sum_k x[m, k] q[k].
template <int MR>
inline void int8_rows(const float *x, int64_t k, const int8_t *q, float scale, float *y, int64_t ldy) {
  float acc[MR];
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 a[MR][2];
  for (int m = 0; m < MR; ++m) a[m][0] = a[m][1] = _mm512_setzero_ps();
  for (; i + 32 <= k; i += 32) {
    if ((i & 63) == 0) _mm_prefetch(reinterpret_cast<const char *>(q + i) + kAhead, _MM_HINT_T0);
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(q + i))));
    const __m512 w1 =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(q + i + 16))));
    for (int m = 0; m < MR; ++m) {
      a[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * k + i), a[m][0]);
      a[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * k + i + 16), a[m][1]);
    }
  }
  for (int m = 0; m < MR; ++m) acc[m] = hsum(_mm512_add_ps(a[m][0], a[m][1]));
#elif defined(__AVX2__) && defined(__FMA__)
  // kV vectors of 8 weights a step, one sum each: 8 independent FMA chains per step whatever MR. With 2 chains
  // at one row the loop waited on the FMA latency (5 cycles on Zen 2): 19 GB/s against 44 read.
  constexpr int kV = MR == 1 ? 8 : MR == 2 ? 4 : 2;
  __m256 a[MR][kV];
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < kV; ++h) a[m][h] = _mm256_setzero_ps();
  for (; i + 8 * kV <= k; i += 8 * kV) {
#pragma GCC unroll 8
    for (int h = 0; h < kV; ++h) {
      const __m256 w = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(q + i + 8 * h))));
      for (int m = 0; m < MR; ++m) a[m][h] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * k + i + 8 * h), a[m][h]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int h = 1; h < kV; ++h) a[m][0] = _mm256_add_ps(a[m][0], a[m][h]);
    acc[m] = hsum(a[m][0]);
  }
#else
  for (int m = 0; m < MR; ++m) acc[m] = 0.0f;
#endif
  for (; i < k; ++i)
    for (int m = 0; m < MR; ++m) acc[m] += static_cast<float>(q[i]) * x[m * k + i];
  for (int m = 0; m < MR; ++m) y[m * ldy] = acc[m] * scale;
}

// ---- int4 ---------------------------------------------------------------------------------------------
// x is first reordered per 32 inputs into [16 even k | 16 odd k] (`split_pairs`), the order in which 16 bytes
// of the packed row give their low nibbles, then their high ones. K is padded to a multiple of 32 with zeros.
inline int64_t padded(int64_t k) { return (k + 31) / 32 * 32; }

void split_pairs(const float *x, int64_t m, int64_t k, float *xs) {
  const int64_t kp = padded(k);
  for (int64_t r = 0; r < m; ++r) {
    const float *src = x + r * k;
    float *dst = xs + r * kp;
    for (int64_t c = 0; c < kp; c += 32)
      for (int64_t j = 0; j < 16; ++j) {
        dst[c + j] = c + 2 * j < k ? src[c + 2 * j] : 0.0f;
        dst[c + 16 + j] = c + 2 * j + 1 < k ? src[c + 2 * j + 1] : 0.0f;
      }
  }
}

inline float deq4(const uint8_t *q, int64_t i, float zero, float scale) {
  const uint8_t b = q[i >> 1];
  return (static_cast<float>((i & 1) ? (b >> 4) : (b & 15)) - zero) * scale;
}

// MR rows (split x, row stride kp) against one packed row q; groups of `gs` inputs.
template <int MR>
void int4_rows(const float *xs, int64_t kp, int64_t k, const uint8_t *q, const float *scales, const uint8_t *zeros,
               int64_t gs, float *y, int64_t ldy) {
  float acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = 0.0f;
  // Vector chunks of 32 inputs lie inside one group when gs is a multiple of 32 (the release's 128): then the
  // group's table serves the whole chunk. Otherwise (and for the tail) the scalar loop.
  int64_t i = 0;
#if defined(__AVX512F__)
  if (gs % 32 == 0) {
    constexpr int kSums = MR == 1 ? 4 : 2;  // independent sums per row: FMA latency (measured: 16% faster at one row, none gained at more)
    __m512 a[MR][4];
    for (int m = 0; m < MR; ++m) a[m][0] = a[m][1] = a[m][2] = a[m][3] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 + 32 <= k; g0 += gs) {
      const int64_t g = g0 / gs;
      const __m512 table = int4_table(zeros[g], scales[g]);
      const int64_t end = g0 + gs < k ? g0 + gs : k / 32 * 32;
      for (i = g0; i + 32 <= end;) {
#pragma GCC unroll 2
        for (int h = 0; h < kSums; h += 2) {
          if (h == 2 && i + 32 > end) break;
          if ((i & 127) == 0) _mm_prefetch(reinterpret_cast<const char *>(q + i / 2) + kAhead, _MM_HINT_T0);
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(q + i / 2)));
          const __m512 lo = _mm512_permutexvar_ps(v, table);
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
          for (int m = 0; m < MR; ++m) {
            a[m][h] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xs + m * kp + i), a[m][h]);
            a[m][h + 1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xs + m * kp + i + 16), a[m][h + 1]);
          }
          i += 32;
        }
      }
      if (end < g0 + gs) break;
    }
    for (int m = 0; m < MR; ++m)
      acc[m] = hsum(_mm512_add_ps(_mm512_add_ps(a[m][0], a[m][1]), _mm512_add_ps(a[m][2], a[m][3])));
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (gs % 32 == 0) {
    // No 16-entry table here (vpermps takes 3 index bits), so a weight is widened by arithmetic: (q - z) exactly,
    // in integers, then converted; the scale is applied once per group to the group's sums, not to each weight:
    // s * sum_k x_k (q_k - z) instead of sum_k x_k ((q_k - z) s). The two differ by roundings of the size of the
    // fp32 sum itself (tests: against float64, activations of both signs and of one sign). Measured on Zen 2
    // (benchmarks/quant_decode_kernels.py, one row): 12.3 -> 8.3 ms a layer. Taking z out of the loop too
    // (s (sum x q - z sum x)) measured 7.5 ms, but for activations of one sign the two terms cancel and the error
    // grew to ten times the fp32 sum's.
    constexpr int kC = MR == 1 ? 4 : 2;  // sums per row within a group: independent FMA chains
    __m256 t[MR][kC];
    for (int m = 0; m < MR; ++m)
      for (int c = 0; c < kC; ++c) t[m][c] = _mm256_setzero_ps();
    const __m256i mask = _mm256_set1_epi32(15);
    const int64_t vend = k / 32 * 32;
    for (int64_t g0 = 0, g = 0; g0 < vend; g0 += gs, ++g) {
      const int64_t end = g0 + gs < vend ? g0 + gs : vend;
      __m256 p[MR][kC];
      const __m256i zero = _mm256_set1_epi32(zeros[g]);
      for (int m = 0; m < MR; ++m)
        for (int c = 0; c < kC; ++c) p[m][c] = _mm256_setzero_ps();
      for (int64_t c0 = g0; c0 < end; c0 += 32) {
        const uint8_t *qc = q + c0 / 2;
        const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(qc)));
        const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(qc + 8)));
        const __m256 w[4] = {_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v0, mask), zero)),
                             _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v1, mask), zero)),
                             _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v0, 4), zero)),
                             _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v1, 4), zero))};
        for (int m = 0; m < MR; ++m)
          for (int h = 0; h < 4; ++h)
            p[m][h % kC] = _mm256_fmadd_ps(w[h], _mm256_loadu_ps(xs + m * kp + c0 + 8 * h), p[m][h % kC]);
      }
      const __m256 scale = _mm256_set1_ps(scales[g]);
      for (int m = 0; m < MR; ++m)
        for (int c = 0; c < kC; ++c) t[m][c] = _mm256_fmadd_ps(scale, p[m][c], t[m][c]);
    }
    for (int m = 0; m < MR; ++m) {
      for (int c = 1; c < kC; ++c) t[m][0] = _mm256_add_ps(t[m][0], t[m][c]);
      acc[m] = hsum(t[m][0]);
    }
    i = vend;
  }
#endif
  if (gs % 32 != 0) i = 0;
  for (; i < k; i += 32) {  // scalar: chunk by chunk in the split order (weights in the original order)
    for (int64_t j = 0; j < 32; ++j) {
      const int64_t kk = i + (j < 16 ? 2 * j : 2 * (j - 16) + 1);  // input index of split position j
      if (kk >= k) continue;
      const int64_t g = kk / gs;
      const float w = deq4(q, kk, static_cast<float>(zeros[g]), scales[g]);
      for (int m = 0; m < MR; ++m) acc[m] += w * xs[m * kp + i + j];
    }
  }
  for (int m = 0; m < MR; ++m) y[m * ldy] = acc[m];
}

#if defined(__AVX512F__)
// One activation row, K and the groups multiples of 128 (the release: groups of 128, K = 4096): a 64-byte load
// holds 128 weights as 16 dwords of 8 nibbles, and vpermps reads only the low 4 bits of each dword lane, so the
// dwords shifted right by 0, 4, ..., 28 bits are the 8 index vectors: no widening (vpmovzxbd, one per 32 weights
// in `int4_rows`, a shuffle like the lookups themselves). Index vector t holds the weights
// k = 8 j + t (j = 0..15) of the chunk, so x is first reordered per 128 inputs into that order (`split_128`).
// One sum per index vector: 8 independent FMA chains. Tables and weights as `int4_rows` (exact values). Measured
// with benchmarks/quant_decode_kernels.py --rows 1 (docs/quantization.md, run 6): the K = 4096 shapes from 23-24
// to 24-26 GB/s; the loop is still bound by its instructions (a lookup and an FMA per 16 weights).
void split_128(const float *x, int64_t k, float *xs) {
  for (int64_t c = 0; c < k; c += 128)
    for (int t = 0; t < 8; ++t)
      for (int j = 0; j < 16; ++j) xs[c + 16 * t + j] = x[c + 8 * j + t];
}

float int4_row128(const float *xs, int64_t k, const uint8_t *q, const float *scales, const uint8_t *zeros,
                  int64_t gs) {
  __m512 a[8];
  for (int t = 0; t < 8; ++t) a[t] = _mm512_setzero_ps();
  for (int64_t g0 = 0, g = 0; g0 < k; g0 += gs, ++g) {
    const __m512 table = int4_table(zeros[g], scales[g]);
    for (int64_t i = g0; i < g0 + gs; i += 128) {
      const uint8_t *qi = q + i / 2;
      _mm_prefetch(reinterpret_cast<const char *>(qi) + kAhead, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(qi);
      a[0] = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, table), _mm512_loadu_ps(xs + i), a[0]);
#define MXC_NIBBLE(t)                                                                                  \
  a[t] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * (t)), table),                  \
                         _mm512_loadu_ps(xs + i + 16 * (t)), a[t]);
      MXC_NIBBLE(1) MXC_NIBBLE(2) MXC_NIBBLE(3) MXC_NIBBLE(4) MXC_NIBBLE(5) MXC_NIBBLE(6) MXC_NIBBLE(7)
#undef MXC_NIBBLE
    }
  }
  return hsum(_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])),
                            _mm512_add_ps(_mm512_add_ps(a[4], a[5]), _mm512_add_ps(a[6], a[7]))));
}
#endif

#if defined(__AVX512F__)
// Batch-1 decode (`row_tiles`): weight rows are taken kTile at a time, each stream prefetched kPrefetch bytes
// ahead (measured on the release's shapes, benchmarks/quant_decode_kernels.py: without the prefetch, tiles are
// slower than single rows where the activations fit in L1; with it, as fast, and w2 twice as fast).
constexpr int kTile = 8;
constexpr int kPrefetch = 256;
// Tiles only where one row's activations (fp32) exceed this (half of a 48 KB L1): at 4096 inputs (16 KB) single
// rows stream as fast or faster (int8: 49 GB/s against 35 with tiles); w2's 14336 (56 KB) gain twice.
constexpr int64_t kTileAbove = 6144;

// int8: one activation row against NR weight rows q, q + ldq, ... (K a multiple of 32): y[n] = scale * sum.
template <int NR>
void int8_row_tile(const float *x, int64_t k, const int8_t *q, int64_t ldq, const float *scales, float *y) {
  __m512 a[NR][2];
  for (int n = 0; n < NR; ++n) a[n][0] = a[n][1] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 32) {
    const __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + 16);
    for (int n = 0; n < NR; ++n) {
      const int8_t *qn = q + n * ldq + i;
      if ((i & 63) == 0) _mm_prefetch(reinterpret_cast<const char *>(qn) + kPrefetch, _MM_HINT_T0);
      const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(qn))));
      const __m512 w1 =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(qn + 16))));
      a[n][0] = _mm512_fmadd_ps(w0, x0, a[n][0]);
      a[n][1] = _mm512_fmadd_ps(w1, x1, a[n][1]);
    }
  }
  for (int n = 0; n < NR; ++n) y[n] = hsum(_mm512_add_ps(a[n][0], a[n][1])) * scales[n];
}

// int4: one activation row (q, q + ldq, ...), K and the groups multiples
// of 32: each activation vector loaded serves NR rows, so that a long row's activations (w2's 14336 inputs: 56 KB,
// more than L1) are read from L2 once per NR weight rows, not once per row. Tables and sums as `int4_rows`.
template <int NR>
void int4_row_tile(const float *xs, int64_t k, const uint8_t *q, int64_t ldq, const float *scales,
                   const uint8_t *zeros, int64_t groups, int64_t gs, float *y) {
  __m512 a[NR][2];
  for (int n = 0; n < NR; ++n) a[n][0] = a[n][1] = _mm512_setzero_ps();
  for (int64_t g0 = 0, g = 0; g0 < k; g0 += gs, ++g) {
    __m512 table[NR];
    for (int n = 0; n < NR; ++n) table[n] = int4_table(zeros[n * groups + g], scales[n * groups + g]);
    const int64_t end = g0 + gs < k ? g0 + gs : k;
    for (int64_t i = g0; i < end; i += 32) {
      const __m512 x0 = _mm512_loadu_ps(xs + i), x1 = _mm512_loadu_ps(xs + i + 16);
      for (int n = 0; n < NR; ++n) {
        if ((i & 127) == 0)  // one line ahead per line read: NR rows are NR streams, each restarting every tile
          _mm_prefetch(reinterpret_cast<const char *>(q + n * ldq + i / 2) + kPrefetch, _MM_HINT_T0);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(q + n * ldq + i / 2)));
        a[n][0] = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, table[n]), x0, a[n][0]);
        a[n][1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table[n]), x1, a[n][1]);
      }
    }
  }
  for (int n = 0; n < NR; ++n) y[n] = hsum(_mm512_add_ps(a[n][0], a[n][1]));
}

// ---- several activation rows (2..16: batched serving, beams) -----------------------------------------------
// A register tile of MR activation rows x NR weight rows: each weight vector is widened (int8) or looked up (int4)
// once for MR rows, each activation vector loaded once for NR weight rows. Per thread, a tile of NR weight rows
// (int4, K = 4096: 8 KB) stays in L1 while every block of MR activation rows passes over it, so the weight is
// read from memory once whatever the number of rows; the activations (16 rows of 4096: 256 KB) come from L2, NR
// times less often than with one weight row at a time. K (and the int4 groups) multiples of 32.
constexpr int kRowsNR = 4;
constexpr int64_t kTilesFromRows = 2;  // activation rows from which the tiles serve (`MxcLinearInt8`)

// int8: y[m * ldy + n] = scales[n] * sum_k x[m, k] q[n, k], MR activation rows (row stride k) x NR weight rows.
template <int MR, int NR>
void int8_tile(const float *x, int64_t k, const int8_t *q, int64_t ldq, const float *scales, float *y, int64_t ldy,
               bool prefetch) {
  __m512 a[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) a[m][n] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    __m512 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_loadu_ps(x + m * k + i);
    for (int n = 0; n < NR; ++n) {
      const int8_t *qn = q + n * ldq + i;
      if (prefetch && (i & 63) == 0) _mm_prefetch(reinterpret_cast<const char *>(qn) + kAhead, _MM_HINT_T0);
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(qn))));
      for (int m = 0; m < MR; ++m) a[m][n] = _mm512_fmadd_ps(w, xv[m], a[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) y[m * ldy + n] = hsum(a[m][n]) * scales[n];
}

// int4: MR split activation rows (row stride kp) x NR packed weight rows; tables as `int4_rows`, one per weight
// row and group. y[m * ldy + n] = sum_k x[m, k] w[n, k], w the dequantized fp32 weight.
template <int MR, int NR>
void int4_tile(const float *xs, int64_t kp, int64_t k, const uint8_t *q, int64_t ldq, const float *scales,
               const uint8_t *zeros, int64_t groups, int64_t gs, float *y, int64_t ldy, bool prefetch) {
  __m512 a[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) a[m][n] = _mm512_setzero_ps();
  for (int64_t g0 = 0, g = 0; g0 < k; g0 += gs, ++g) {
    __m512 table[NR];
    for (int n = 0; n < NR; ++n) table[n] = int4_table(zeros[n * groups + g], scales[n * groups + g]);
    const int64_t end = g0 + gs < k ? g0 + gs : k;
    for (int64_t i = g0; i < end; i += 32) {
      __m512 x0[MR], x1[MR];
      for (int m = 0; m < MR; ++m) {
        x0[m] = _mm512_loadu_ps(xs + m * kp + i);
        x1[m] = _mm512_loadu_ps(xs + m * kp + i + 16);
      }
      for (int n = 0; n < NR; ++n) {
        const uint8_t *qn = q + n * ldq + i / 2;
        if (prefetch && (i & 127) == 0) _mm_prefetch(reinterpret_cast<const char *>(qn) + kAhead, _MM_HINT_T0);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(qn)));
        const __m512 lo = _mm512_permutexvar_ps(v, table[n]);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table[n]);
        for (int m = 0; m < MR; ++m) a[m][n] = _mm512_fmadd_ps(hi, x1[m], _mm512_fmadd_ps(lo, x0[m], a[m][n]));
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) y[m * ldy + n] = hsum(a[m][n]);
}

// Weight rows in tiles of kTile (the last rows one by one), split among threads in contiguous ranges: each
// thread streams its part once. tile(j, NR) computes rows j..j+NR-1.
template <typename Tile>
void row_tiles(int64_t n, Tile tile) {
  const int64_t tiles = n / kTile;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t <= tiles; ++t) {
    if (t < tiles)
      tile(t * kTile, std::integral_constant<int, kTile>());
    else
      for (int64_t j = t * kTile; j < n; ++j) tile(j, std::integral_constant<int, 1>());
  }
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// ---- several activation rows on AVX2 (2..16: batched serving, beams) -----------------------------------------
// int8 as the AVX-512 tiles above, with 2 weight rows a tile (16 ymm registers): each activation vector is loaded
// once for both weight rows. One weight row at a time (`int8_rows`), 4 activation rows needed 4 loads of
// activations per FMA pair and the loop waited on loads: 4 rows cost 2.2x one row. Measured on Zen 2
// (benchmarks/quant_decode_kernels.py, layer ms, two runs): 4 rows 18.9 -> 14.8 / 15.9, 16 rows 76.9 -> 52.4 / 60.9;
// 2 rows slower in tiles (10.3 -> 11.4), so up to 3 rows stay on `int8_rows`. The same tiles for int4 gained
// nothing at 4 rows and 10% at 16: not kept.
constexpr int kRowsNR = 2;
constexpr int64_t kTilesFromRows = 4;

// int8: y[m * ldy + n] = scales[n] * sum_k x[m, k] q[n, k]; kC sums per (row, weight row): 4 to 8 FMA chains.
template <int MR, int NR>
void int8_tile(const float *x, int64_t k, const int8_t *q, int64_t ldq, const float *scales, float *y, int64_t ldy,
               bool) {
  constexpr int kC = MR * NR >= 8 ? 1 : MR * NR >= 4 ? 2 : 4;  // steps of at most 32 inputs (K % 32 == 0)
  __m256 a[MR][NR][kC];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n)
      for (int c = 0; c < kC; ++c) a[m][n][c] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; i += 8 * kC) {
    for (int c = 0; c < kC; ++c) {
      __m256 xv[MR];
      for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * k + i + 8 * c);
      for (int n = 0; n < NR; ++n) {
        const __m256 w = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(q + n * ldq + i + 8 * c))));
        for (int m = 0; m < MR; ++m) a[m][n][c] = _mm256_fmadd_ps(w, xv[m], a[m][n][c]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      for (int c = 1; c < kC; ++c) a[m][n][0] = _mm256_add_ps(a[m][n][0], a[m][n][c]);
      y[m * ldy + n] = hsum(a[m][n][0]) * scales[n];
    }
}
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// m activation rows against all n weight rows by tiles: tiles of kRowsNR weight rows split among threads in
// contiguous ranges (the last n % kRowsNR rows one at a time); per tile, blocks of 4, 2, 1 activation rows.
// tile(j, r, MR, NR, first) computes weight rows j.. and activation rows r..; `first` says the block is the first
// to read the tile's weights (it prefetches).
template <typename Tile>
void row_blocks(int64_t m, int64_t n, Tile tile) {
  const int64_t tiles = (n + kRowsNR - 1) / kRowsNR;
  auto rows = [&](int64_t j, auto nr) {
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) tile(j, r, std::integral_constant<int, 4>(), nr, r == 0);
    for (; r + 2 <= m; r += 2) tile(j, r, std::integral_constant<int, 2>(), nr, r == 0);
    for (; r < m; ++r) tile(j, r, std::integral_constant<int, 1>(), nr, r == 0);
  };
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    if ((t + 1) * kRowsNR <= n)
      rows(t * kRowsNR, std::integral_constant<int, kRowsNR>());
    else
      for (int64_t j = t * kRowsNR; j < n; ++j) rows(j, std::integral_constant<int, 1>());
  }
}

#endif

template <typename Rows>
void over_rows(int64_t m, int64_t n, Rows rows) {
  // Rows of the weight are split among threads in contiguous ranges: each thread streams its part once.
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) rows(j, r, std::integral_constant<int, 4>());
    for (; r + 2 <= m; r += 2) rows(j, r, std::integral_constant<int, 2>());
    for (; r < m; ++r) rows(j, r, std::integral_constant<int, 1>());
  }
}

}  // namespace

extern "C" {

// x fp32 [..., K], q int8 [N, K], scales fp32 [N] -> y fp32 [..., N].
int MxcLinearInt8(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 4) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const int8_t *q = static_cast<const int8_t *>(params[1]);
  const float *scales = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t k = shapes[1][1], n = shapes[1][0], m = count(ndims[0], shapes[0]) / k;
#if defined(__AVX512F__)
  if (m == 1 && k % 32 == 0 && k > kTileAbove) {
    row_tiles(n, [&](int64_t j, auto nr) { int8_row_tile<decltype(nr)::value>(x, k, q + j * k, k, scales + j, y + j); });
    return 0;
  }
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  if (m >= kTilesFromRows && k % 32 == 0) {
    row_blocks(m, n, [&](int64_t j, int64_t r, auto mr, auto nr, bool first) {
      int8_tile<decltype(mr)::value, decltype(nr)::value>(x + r * k, k, q + j * k, k, scales + j, y + r * n + j, n,
                                                           first);
    });
    return 0;
  }
#endif
  over_rows(m, n, [&](int64_t j, int64_t r, auto mr) {
    int8_rows<decltype(mr)::value>(x + r * k, k, q + j * k, scales[j], y + r * n + j, n);
  });
  return 0;
}

// x fp32 [..., K], q uint8 [N, ceil(K / 2)], scales fp32 [N, G], zeros uint8 [N, G], group size int32 [1]
// -> y fp32 [..., N].
int MxcLinearInt4(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 6) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const uint8_t *q = static_cast<const uint8_t *>(params[1]);
  const float *scales = static_cast<const float *>(params[2]);
  const uint8_t *zeros = static_cast<const uint8_t *>(params[3]);
  const int64_t gs = *static_cast<const int32_t *>(params[4]);
  float *y = static_cast<float *>(params[5]);
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0], m = count(ndims[0], shapes[0]) / k;
  const int64_t ld = shapes[1][1], groups = shapes[2][1], kp = padded(k);
  if (gs <= 0 || ld != (k + 1) / 2 || groups != (k + gs - 1) / gs) return 1;
#if defined(__AVX512F__)
  if (m == 1 && k % 128 == 0 && gs % 128 == 0 && k <= kTileAbove) {
    std::vector<float> xs(k);
    split_128(x, k, xs.data());
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; ++j)
      y[j] = int4_row128(xs.data(), k, q + j * ld, scales + j * groups, zeros + j * groups, gs);
    return 0;
  }
#endif
  std::vector<float> xs(m * kp);
  split_pairs(x, m, k, xs.data());
#if defined(__AVX512F__)
  if (m == 1 && k % 32 == 0 && gs % 32 == 0 && k > kTileAbove) {
    row_tiles(n, [&](int64_t j, auto nr) {
      int4_row_tile<decltype(nr)::value>(xs.data(), k, q + j * ld, ld, scales + j * groups, zeros + j * groups,
                                         groups, gs, y + j);
    });
    return 0;
  }
  if (m > 1 && k % 32 == 0 && gs % 32 == 0) {
    row_blocks(m, n, [&](int64_t j, int64_t r, auto mr, auto nr, bool first) {
      int4_tile<decltype(mr)::value, decltype(nr)::value>(xs.data() + r * kp, kp, k, q + j * ld, ld,
                                                          scales + j * groups, zeros + j * groups, groups, gs,
                                                          y + r * n + j, n, first);
    });
    return 0;
  }
#endif
  over_rows(m, n, [&](int64_t j, int64_t r, auto mr) {
    int4_rows<decltype(mr)::value>(xs.data() + r * kp, kp, k, q + j * ld, scales + j * groups, zeros + j * groups, gs,
                                   y + r * n + j, n);
  });
  return 0;
}

// For tests and benchmarks without MindSpore (same kernels): y [M, N] from x [M, K] and a quantized weight.
int MxcQuantLinear(const float *x, const void *q, const float *scales, const uint8_t *zeros, int bits, float *y,
                   int64_t m, int64_t n, int64_t k, int64_t gs) {
  int64_t xs0[2] = {m, k};
  int64_t qs8[2] = {n, k}, qs4[2] = {n, (k + 1) / 2};
  int64_t ss8[1] = {n}, ss4[2] = {n, gs > 0 ? (k + gs - 1) / gs : 0};
  int64_t one[1] = {1}, ys[2] = {m, n};
  int32_t g32 = static_cast<int32_t>(gs);
  if (bits == 8) {
    void *p[4] = {const_cast<float *>(x), const_cast<void *>(q), const_cast<float *>(scales), y};
    int nd[4] = {2, 2, 1, 2};
    int64_t *sh[4] = {xs0, qs8, ss8, ys};
    return MxcLinearInt8(4, p, nd, sh, nullptr, nullptr, nullptr);
  }
  void *p[6] = {const_cast<float *>(x), const_cast<void *>(q), const_cast<float *>(scales),
                const_cast<uint8_t *>(zeros), &g32, y};
  int nd[6] = {2, 2, 2, 2, 1, 2};
  int64_t *sh[6] = {xs0, qs4, ss4, ss4, one, ys};
  return MxcLinearInt4(6, p, nd, sh, nullptr, nullptr, nullptr);
}

}  // extern "C"
