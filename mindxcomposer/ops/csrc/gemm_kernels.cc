// Compute-bound products on the CPU: C[M, N] = A[M, K] B[K, N] with fp32 activations A and fp32 or bf16
// B (stored weights, or a second activation in attention and gradients), fp32 output. Called through
// MindSpore's `ops.Custom(func_type="aot")` (`gemm_kernels.py`); `params` holds the inputs, then the output.
//
// Two arithmetics, one blocked GEMM (packing + register-tiled micro-kernel, BLIS loop order):
// - exact: fp32 products and sums. A bf16 weight is widened to fp32 while it is packed (bf16 -> fp32 is
//   exact), so no fp32 copy of a weight is ever made and a bf16-stored model computes what the same
//   values stored in fp32 compute. Every output element gets the same arithmetic (FMA chains over
//   blocks of k, the blocks summed in order) whatever M, N, the thread count or the row's position:
//   results do not depend on the batch.
// - bf16 products: both inputs are rounded to bf16 (round to nearest even, as torch's `.bfloat16()`)
//   while packed, products accumulate in fp32 (AVX512-BF16 `vdpbf16ps`: pairs of k per instruction).
//   Without AVX512-BF16 the same rounded values go through the fp32 micro-kernel (same products, exact in
//   fp32; only the summation order differs).
//
// The ISA is chosen when the library is built (`-march=native`, one build per CPU: see gemm_kernels.py):
// AVX-512 (12 x 32 tile), AVX2 + FMA (6 x 16), or portable C++.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef MXC_WITH_ONEDNN
#include <cstdio>
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_version.h>
#if DNNL_VERSION_MAJOR < 3
#error "oneDNN 3 or newer is needed (memory descriptors as handles)"
#endif
#endif

namespace {

#if defined(__AVX512F__)
constexpr int MR = 12, NR = 32;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int MR = 6, NR = 16;
#else
constexpr int MR = 4, NR = 8;
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
constexpr bool kNativeBf16 = true;
#else
constexpr bool kNativeBf16 = false;
#endif
#ifndef MXC_KC
#define MXC_KC 256
#endif
#ifndef MXC_KC_BF16
#define MXC_KC_BF16 512
#endif
#ifndef MXC_MC
#define MXC_MC 96
#endif
#ifndef MXC_NC
#define MXC_NC 1024
#endif
constexpr int64_t KC = MXC_KC;            // k per packed block, fp32 panels
constexpr int64_t KC_BF16 = MXC_KC_BF16;  // k per packed block, bf16 pair panels
constexpr int64_t MC = MXC_MC;            // rows of A per block (a multiple of MR)
constexpr int64_t NC = MXC_NC;            // columns of B per packed block (a multiple of NR)

// Floating-point operations (2 m n k per product) of every product this library has run since the last reset
// (`MxcGemmFlops`): what a benchmark divides by the machine's GEMM rate to learn how long its products alone would
// take. One relaxed atomic add per product call; nothing else reads it.
std::atomic<int64_t> g_flops{0};

inline void count_flops(int64_t m, int64_t n, int64_t k) {
  g_flops.fetch_add(2 * m * n * k, std::memory_order_relaxed);
}

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays a quiet NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

// A strided view of an operand: element (r, c) is at p[r * rs + c * cs].
// With `qbits` 8 or 4 it is a quantized weight W [N, K], which only the B packing reads: used as B = W^T
// (rs = 1, cs = K; `dequant_column`: the forward), or with `qrows` as B = W itself (rs = K, cs = 1;
// `dequant_row`: the input gradient dy W).
struct View {
  const void *p;
  int64_t rs, cs;
  bool bf16;
  int qbits = 0;
  bool qrows = false;
  const float *qscales = nullptr;  // [N] (int8) or [N, G] (int4)
  const uint8_t *qzeros = nullptr;  // [N, G] (int4)
  int64_t qgroup = 0, qgroups = 0;  // int4: inputs per group, groups per row
  inline float at(int64_t r, int64_t c) const {
    const int64_t i = r * rs + c * cs;
    return bf16 ? bf16_to_f32(static_cast<const uint16_t *>(p)[i]) : static_cast<const float *>(p)[i];
  }
  inline uint16_t bits(int64_t r, int64_t c) const {  // as bf16, rounded if stored in fp32
    const int64_t i = r * rs + c * cs;
    return bf16 ? static_cast<const uint16_t *>(p)[i] : f32_to_bf16(static_cast<const float *>(p)[i]);
  }
};

// Marks a weight View as quantized: int8 (scales [N]) or int4 (scales and zero points [N, G], G groups of
// `group` inputs along rows of k). False where an int4 group size is missing.
inline bool set_quant(View &b, const void *scales, const void *zeros, int bits, int64_t k, int64_t group) {
  b.qbits = bits;
  b.qscales = static_cast<const float *>(scales);
  if (bits != 4) return true;
  if (group <= 0) return false;
  b.qzeros = static_cast<const uint8_t *>(zeros);
  b.qgroup = group;
  b.qgroups = (k + group - 1) / group;
  return true;
}

// ---- packing --------------------------------------------------------------------------------------
// Row n of a quantized W [N, K], inputs k0 .. k0 + kc, to dst[i * stride] in fp32: exactly the value
// (q - zero) * scale (int8: q * scale) that the dequantized fp32 weight holds (`mindxcomposer/quantization.py`),
// so a quantized weight packs into the panels its dequantized fp32 twin packs into. Tile by tile: no copy of
// the whole weight is ever made. int4 goes group by group through the group's 16 values (each computed as the
// twin computes it): a division and two conversions per weight made packing 2.6 ns a weight (155 ms for one
// [14336, 4096] weight on Zen 2, whatever the number of rows). With `round` (bf16 products) the values are
// rounded to bf16 as they are written; int4 rounds its group's 16 values once, the same values.
void dequant_run(const View &b, int64_t n, int64_t k, int64_t k0, int64_t kc, float *dst, int64_t stride,
                 bool round) {
  if (b.qbits == 8) {
    const int8_t *q = static_cast<const int8_t *>(b.p) + n * k + k0;
    const float s = b.qscales[n];
    for (int64_t i = 0; i < kc; ++i) {
      const float v = static_cast<float>(q[i]) * s;
      dst[i * stride] = round ? round_bf16(v) : v;
    }
    return;
  }
  const uint8_t *q = static_cast<const uint8_t *>(b.p) + n * ((k + 1) / 2);
  const float *sc = b.qscales + n * b.qgroups;
  const uint8_t *zr = b.qzeros + n * b.qgroups;
  const int64_t end = k0 + kc;
  for (int64_t kk = k0; kk < end;) {
    const int64_t g = kk / b.qgroup, stop = (g + 1) * b.qgroup < end ? (g + 1) * b.qgroup : end;
    float values[16];
    for (int v = 0; v < 16; ++v) {
      values[v] = (static_cast<float>(v) - static_cast<float>(zr[g])) * sc[g];
      if (round) values[v] = round_bf16(values[v]);
    }
    if (kk & 1) {  // a high nibble first
      dst[(kk - k0) * stride] = values[q[kk >> 1] >> 4];
      ++kk;
    }
    for (; kk + 1 < stop; kk += 2) {
      const uint8_t byte = q[kk >> 1];
      dst[(kk - k0) * stride] = values[byte & 15];
      dst[(kk + 1 - k0) * stride] = values[byte >> 4];
    }
    if (kk < stop) {  // a low nibble last
      dst[(kk - k0) * stride] = values[q[kk >> 1] & 15];
      ++kk;
    }
  }
}

// Column n of a quantized B = W^T: row n of W, inputs k0 .. k0 + kc, to dst[k * stride].
inline void dequant_column(const View &b, int64_t n, int64_t k0, int64_t kc, float *dst, int64_t stride,
                           bool round) {
  dequant_run(b, n, b.cs, k0, kc, dst, stride, round);
}

// Row n of a quantized W (`View::qrows`, B = W: a row of W is a row of k of the panel), inputs c0 .. c0 + cols,
// to dst[0 .. cols).
inline void dequant_row(const View &b, int64_t n, int64_t c0, int64_t cols, float *dst, bool round) {
  dequant_run(b, n, b.rs, c0, cols, dst, 1, round);
}

// fp32 panels: A as [k][MR] per MR rows, B as [k][NR] per NR columns; zero padding past the edges.
// With `round`, values are rounded to bf16 (the bf16 arithmetic on the fp32 micro-kernel).
// A is always an fp32 activation (every caller's View). Stored by rows (cs = 1) or by columns (rs = 1: the
// transposed operand of a weight gradient, dy^T x), it is copied without per-element index arithmetic: the narrow
// products of the LoRA and the Partial LoRA (rank 64-256 against 4096-14336) use each packed element of A only r
// times, so packing it element by element through `View::at` cost as much as their multiplications.
template <bool kRound>
void pack_a_f32_strided(const float *p, int64_t rs, int64_t cs, int64_t m0, int64_t mc, int64_t k0, int64_t kc,
                        float *dst) {
  for (int64_t i0 = 0; i0 < mc; i0 += MR) {
    const int64_t rows = mc - i0 < MR ? mc - i0 : MR;
    float *panel = dst + (i0 / MR) * kc * MR;
    if (cs == 1 && rows == MR) {  // MR row streams, each read in order; the panel written in order
      const float *src[MR];
      for (int64_t i = 0; i < MR; ++i) src[i] = p + (m0 + i0 + i) * rs + k0;
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t i = 0; i < MR; ++i) panel[k * MR + i] = kRound ? round_bf16(src[i][k]) : src[i][k];
      continue;
    }
    if (rs == 1 && rows == MR) {  // a panel row is MR consecutive values of one column
      for (int64_t k = 0; k < kc; ++k) {
        const float *src = p + (k0 + k) * cs + m0 + i0;
        for (int64_t i = 0; i < MR; ++i) panel[k * MR + i] = kRound ? round_bf16(src[i]) : src[i];
      }
      continue;
    }
    for (int64_t k = 0; k < kc; ++k)  // the last, partial panel
      for (int64_t i = 0; i < MR; ++i) {
        const float v = i < rows ? p[(m0 + i0 + i) * rs + (k0 + k) * cs] : 0.0f;
        panel[k * MR + i] = kRound ? round_bf16(v) : v;
      }
  }
}

void pack_a_f32(const View &a, int64_t m0, int64_t mc, int64_t k0, int64_t kc, float *dst, bool round) {
  const float *p = static_cast<const float *>(a.p);
  if (round)
    pack_a_f32_strided<true>(p, a.rs, a.cs, m0, mc, k0, kc, dst);
  else
    pack_a_f32_strided<false>(p, a.rs, a.cs, m0, mc, k0, kc, dst);
}

// Columns of B contiguous (a weight W [N, K] used as B = W^T): a transpose, done in tiles of NR columns
// x 16 k so that both the reads (16 consecutive k of one row of W) and the writes stay in L1.
template <typename T, typename F>
void pack_b_columns(const T *w, int64_t ldw, int64_t k0, int64_t kc, int64_t cols, float *panel, F widen) {
  for (int64_t kb = 0; kb < kc; kb += 16) {
    const int64_t kn = kc - kb < 16 ? kc - kb : 16;
    for (int64_t j = 0; j < NR; ++j) {
      if (j >= cols) {
        for (int64_t k = 0; k < kn; ++k) panel[(kb + k) * NR + j] = 0.0f;
        continue;
      }
      const T *src = w + j * ldw + k0 + kb;
      for (int64_t k = 0; k < kn; ++k) panel[(kb + k) * NR + j] = widen(src[k]);
    }
  }
}

void pack_b_f32(const View &b, int64_t k0, int64_t kc, int64_t n0, int64_t nc, float *dst, bool round) {
  for (int64_t j0 = 0; j0 < nc; j0 += NR) {
    const int64_t cols = nc - j0 < NR ? nc - j0 : NR;
    float *panel = dst + (j0 / NR) * kc * NR;
    if (b.qbits && b.qrows) {  // B = W: row k0 + k of W gives row k of the panel
      for (int64_t k = 0; k < kc; ++k) {
        float *row = panel + k * NR;
        dequant_row(b, k0 + k, n0 + j0, cols, row, round);
        for (int64_t j = cols; j < NR; ++j) row[j] = 0.0f;
      }
      continue;
    }
    if (b.qbits) {
      for (int64_t j = 0; j < NR; ++j) {
        if (j < cols) {
          dequant_column(b, n0 + j0 + j, k0, kc, panel + j, NR, round);
        } else {
          for (int64_t k = 0; k < kc; ++k) panel[k * NR + j] = 0.0f;
        }
      }
      continue;
    }
    if (b.rs == 1 && b.bf16 && !round && cols == NR && kc % 2 == 0 && b.cs % 2 == 0 && k0 % 2 == 0) {
      // A bf16 weight W [N, K]: transpose 32-bit words (pairs of k) in tiles of NR columns x 16 pairs, then
      // widen each pair into two fp32 rows of the panel (a shift and a mask, vectorised by the compiler).
      const uint32_t *w32 = reinterpret_cast<const uint32_t *>(static_cast<const uint16_t *>(b.p) + (n0 + j0) * b.cs + k0);
      const int64_t ld = b.cs / 2, kc2 = kc / 2;
      alignas(64) uint32_t tmp[16 * NR];
      for (int64_t pb = 0; pb < kc2; pb += 16) {
        const int64_t pn = kc2 - pb < 16 ? kc2 - pb : 16;
        for (int64_t j = 0; j < NR; ++j)
          for (int64_t p = 0; p < pn; ++p) tmp[p * NR + j] = w32[j * ld + pb + p];
        for (int64_t p = 0; p < pn; ++p) {
          uint32_t *lo = reinterpret_cast<uint32_t *>(panel + (2 * (pb + p)) * NR);
          uint32_t *hi = lo + NR;
          for (int64_t j = 0; j < NR; ++j) {
            lo[j] = tmp[p * NR + j] << 16;
            hi[j] = tmp[p * NR + j] & 0xffff0000u;
          }
        }
      }
      continue;
    }
    if (b.rs == 1) {
      if (b.bf16)
        pack_b_columns(static_cast<const uint16_t *>(b.p) + (n0 + j0) * b.cs, b.cs, k0, kc, cols, panel, bf16_to_f32);
      else if (round)
        pack_b_columns(static_cast<const float *>(b.p) + (n0 + j0) * b.cs, b.cs, k0, kc, cols, panel, round_bf16);
      else
        pack_b_columns(static_cast<const float *>(b.p) + (n0 + j0) * b.cs, b.cs, k0, kc, cols, panel,
                       [](float v) { return v; });
      continue;
    }
    if (b.cs == 1) {
      // Rows of B contiguous (B = W in dx = dy W, the input gradient of every linear): a row of the panel is NR
      // consecutive values of a row of B, read in order. A bf16 value is its own bf16 rounding.
      for (int64_t k = 0; k < kc; ++k) {
        float *row = panel + k * NR;
        const int64_t at = (k0 + k) * b.rs + n0 + j0;
        if (b.bf16) {
          const uint16_t *src = static_cast<const uint16_t *>(b.p) + at;
          for (int64_t j = 0; j < cols; ++j) row[j] = bf16_to_f32(src[j]);
        } else if (round) {
          const float *src = static_cast<const float *>(b.p) + at;
          for (int64_t j = 0; j < cols; ++j) row[j] = round_bf16(src[j]);
        } else {
          const float *src = static_cast<const float *>(b.p) + at;
          for (int64_t j = 0; j < cols; ++j) row[j] = src[j];
        }
        for (int64_t j = cols; j < NR; ++j) row[j] = 0.0f;
      }
      continue;
    }
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t j = 0; j < NR; ++j) {
        float v = j < cols ? b.at(k0 + k, n0 + j0 + j) : 0.0f;
        panel[k * NR + j] = round ? round_bf16(v) : v;
      }
  }
}

// bf16 panels for vdpbf16ps: k in pairs. A as [k/2][MR] 32-bit pairs (a[m][2p], a[m][2p+1]); B as
// [k/2][NR][2]. kc2 = number of pairs; an odd k is padded with a zero.
void pack_a_bf16(const View &a, int64_t m0, int64_t mc, int64_t k0, int64_t kc, uint32_t *dst) {
  const int64_t kc2 = (kc + 1) / 2;
  for (int64_t i0 = 0; i0 < mc; i0 += MR) {
    const int64_t rows = mc - i0 < MR ? mc - i0 : MR;
    uint32_t *panel = dst + (i0 / MR) * kc2 * MR;
    for (int64_t i = 0; i < MR; ++i) {
      if (i >= rows) {
        for (int64_t p = 0; p < kc2; ++p) panel[p * MR + i] = 0;
        continue;
      }
      const int64_t r = m0 + i0 + i;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
      if (a.cs == 1 && !a.bf16) {  // a contiguous fp32 row: 32 values to 16 pairs per instruction (RNE)
        const float *src = static_cast<const float *>(a.p) + r * a.rs + k0;
        alignas(64) uint32_t pairs[16];
        int64_t p = 0;
        for (; 2 * p + 32 <= kc; p += 16) {
          const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 2 * p + 16), _mm512_loadu_ps(src + 2 * p));
          _mm512_store_si512(pairs, (__m512i)h);
          for (int q = 0; q < 16; ++q) panel[(p + q) * MR + i] = pairs[q];
        }
        for (; p < kc2; ++p) {
          uint32_t lo = f32_to_bf16(src[2 * p]);
          uint32_t hi = 2 * p + 1 < kc ? f32_to_bf16(src[2 * p + 1]) : 0;
          panel[p * MR + i] = lo | (hi << 16);
        }
        continue;
      }
#endif
      for (int64_t p = 0; p < kc2; ++p) {
        const int64_t k = k0 + 2 * p;
        uint32_t lo = a.bits(r, k);
        uint32_t hi = 2 * p + 1 < kc ? a.bits(r, k + 1) : 0;
        panel[p * MR + i] = lo | (hi << 16);
      }
    }
  }
}

void pack_b_bf16(const View &b, int64_t k0, int64_t kc, int64_t n0, int64_t nc, uint16_t *dst) {
  const int64_t kc2 = (kc + 1) / 2;
  for (int64_t j0 = 0; j0 < nc; j0 += NR) {
    const int64_t cols = nc - j0 < NR ? nc - j0 : NR;
    uint16_t *panel = dst + (j0 / NR) * kc2 * NR * 2;
    if (b.qbits && b.qrows) {  // B = W: rows k0 + 2p and k0 + 2p + 1 of W give pair row p
      alignas(64) float lo[NR], hi[NR];
      for (int64_t p = 0; p < kc2; ++p) {
        const bool two = 2 * p + 1 < kc;
        dequant_row(b, k0 + 2 * p, n0 + j0, cols, lo, false);
        if (two) dequant_row(b, k0 + 2 * p + 1, n0 + j0, cols, hi, false);
        for (int64_t j = 0; j < NR; ++j) {
          panel[(p * NR + j) * 2] = j < cols ? f32_to_bf16(lo[j]) : 0;
          panel[(p * NR + j) * 2 + 1] = j < cols && two ? f32_to_bf16(hi[j]) : 0;
        }
      }
      continue;
    }
    if (b.qbits) {
      alignas(64) float col[KC_BF16 > KC ? KC_BF16 + 1 : KC + 1];
      for (int64_t j = 0; j < NR; ++j) {
        if (j < cols) dequant_column(b, n0 + j0 + j, k0, kc, col, 1, false);
        for (int64_t p = 0; p < kc2; ++p) {
          panel[(p * NR + j) * 2] = j < cols ? f32_to_bf16(col[2 * p]) : 0;
          panel[(p * NR + j) * 2 + 1] = j < cols && 2 * p + 1 < kc ? f32_to_bf16(col[2 * p + 1]) : 0;
        }
      }
      continue;
    }
    if (b.rs == 1 && b.bf16 && cols == NR && kc % 2 == 0 && (b.cs % 2) == 0 && (k0 % 2) == 0) {
      // A bf16 weight W [N, K]: a pair (k, k+1) of column n is one 32-bit word of row n, so the panel is a
      // transpose of 32-bit words, in tiles of NR columns x 16 pairs.
      const uint32_t *w32 = reinterpret_cast<const uint32_t *>(static_cast<const uint16_t *>(b.p) + (n0 + j0) * b.cs + k0);
      uint32_t *p32 = reinterpret_cast<uint32_t *>(panel);
      const int64_t ld = b.cs / 2;
      for (int64_t pb = 0; pb < kc2; pb += 16) {
        const int64_t pn = kc2 - pb < 16 ? kc2 - pb : 16;
        for (int64_t j = 0; j < NR; ++j)
          for (int64_t p = 0; p < pn; ++p) p32[(pb + p) * NR + j] = w32[j * ld + pb + p];
      }
      continue;
    }
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    if (!b.bf16 && cols == NR && (b.rs == 1 || b.cs == 1)) {
      const float *src = static_cast<const float *>(b.p);
      uint32_t *p32 = reinterpret_cast<uint32_t *>(panel);
      if (b.rs == 1) {
        // fp32 B whose columns run along k (keys as K^T, an fp32 weight): 32 values of a column to 16 pairs
        // per instruction (RNE), scattered to the column's slot of each pair row.
        for (int64_t j = 0; j < NR; ++j) {
          const float *col = src + (n0 + j0 + j) * b.cs + k0;
          alignas(64) uint32_t pairs[16];
          int64_t p = 0;
          for (; 2 * p + 32 <= kc; p += 16) {
            _mm512_store_si512(pairs, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(col + 2 * p + 16),
                                                                  _mm512_loadu_ps(col + 2 * p)));
            for (int q = 0; q < 16; ++q) p32[(p + q) * NR + j] = pairs[q];
          }
          for (; p < kc2; ++p)
            p32[p * NR + j] = f32_to_bf16(col[2 * p]) | (2 * p + 1 < kc ? uint32_t(f32_to_bf16(col[2 * p + 1])) << 16 : 0u);
        }
      } else {
        // fp32 B with rows along n (values): two rows to bf16, interleaved into pairs, 16 columns at a time.
        for (int64_t p = 0; p < kc2; ++p) {
          const float *r0 = src + (k0 + 2 * p) * b.rs + n0 + j0;
          const bool two = 2 * p + 1 < kc;
          for (int h = 0; h < NR / 16; ++h) {
            const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + 16 * h)));
            const __m512i hi = two ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + b.rs + 16 * h)))
                                   : _mm512_setzero_si512();
            _mm512_storeu_si512(p32 + p * NR + 16 * h, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
          }
        }
      }
      continue;
    }
#endif
    if (b.bf16 && b.cs == 1) {
      // A bf16 B with rows contiguous (B = W in dx = dy W): pair row p interleaves rows k0 + 2p and k0 + 2p + 1,
      // each read in order (the loop below would walk down the columns).
      const uint16_t *src = static_cast<const uint16_t *>(b.p) + k0 * b.rs + n0 + j0;
      for (int64_t p = 0; p < kc2; ++p) {
        const uint16_t *r0 = src + 2 * p * b.rs, *r1 = r0 + b.rs;
        const bool two = 2 * p + 1 < kc;
        uint16_t *d = panel + p * NR * 2;
        for (int64_t j = 0; j < NR; ++j) {
          d[2 * j] = j < cols ? r0[j] : 0;
          d[2 * j + 1] = j < cols && two ? r1[j] : 0;
        }
      }
      continue;
    }
    for (int64_t j = 0; j < NR; ++j) {
      if (j >= cols) {
        for (int64_t p = 0; p < kc2; ++p) panel[(p * NR + j) * 2] = panel[(p * NR + j) * 2 + 1] = 0;
        continue;
      }
      const int64_t c = n0 + j0 + j;
      for (int64_t p = 0; p < kc2; ++p) {
        panel[(p * NR + j) * 2] = b.bits(k0 + 2 * p, c);
        panel[(p * NR + j) * 2 + 1] = 2 * p + 1 < kc ? b.bits(k0 + 2 * p + 1, c) : 0;
      }
    }
  }
}

// ---- micro-kernels: an MR x NR tile of C (+)= packed A panel x packed B panel ---------------------------
// `c` has row stride ldc; only rows < mv and columns < nv are written. Each k block's sum starts from zero
// and, with `acc`, is then added to C (also in an edge tile): every element gets the same arithmetic, a
// chain of FMAs within each k block and a sum across blocks, which keeps the rounding error of long
// sums (training's weight gradients sum over thousands of positions) near that of a blocked BLAS.
inline void store_tile(const float *tile, float *c, int64_t ldc, int mv, int nv, bool acc) {
  for (int i = 0; i < mv; ++i)
    for (int j = 0; j < nv; ++j) c[i * ldc + j] = acc ? c[i * ldc + j] + tile[i * NR + j] : tile[i * NR + j];
}

#if defined(__AVX512F__)
// The AVX-512 micro-kernels' accumulators to C: straight into a full tile, through `store_tile` at an edge.
inline void store_tile512(const __m512 (&r)[MR][2], float *c, int64_t ldc, int mv, int nv, bool acc) {
  if (mv == MR && nv == NR) {
    for (int i = 0; i < MR; ++i) {
      __m512 lo = r[i][0], hi = r[i][1];
      if (acc) {
        lo = _mm512_add_ps(_mm512_loadu_ps(c + i * ldc), lo);
        hi = _mm512_add_ps(_mm512_loadu_ps(c + i * ldc + 16), hi);
      }
      _mm512_storeu_ps(c + i * ldc, lo);
      _mm512_storeu_ps(c + i * ldc + 16, hi);
    }
    return;
  }
  alignas(64) float tile[MR * NR];
  for (int i = 0; i < MR; ++i) {
    _mm512_store_ps(tile + i * NR, r[i][0]);
    _mm512_store_ps(tile + i * NR + 16, r[i][1]);
  }
  store_tile(tile, c, ldc, mv, nv, acc);
}

void ukr_f32(int64_t kc, const float *a, const float *b, float *c, int64_t ldc, int mv, int nv, bool acc) {
  __m512 r[MR][2];
  for (int i = 0; i < MR; ++i) r[i][0] = r[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * NR), b1 = _mm512_loadu_ps(b + k * NR + 16);
    const float *ak = a + k * MR;
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(ak[i]);
      r[i][0] = _mm512_fmadd_ps(av, b0, r[i][0]);
      r[i][1] = _mm512_fmadd_ps(av, b1, r[i][1]);
    }
  }
  store_tile512(r, c, ldc, mv, nv, acc);
}
#elif defined(__AVX2__) && defined(__FMA__)
// The AVX2 micro-kernel's accumulators to C, as `store_tile512`.
inline void store_tile256(const __m256 (&r)[MR][2], float *c, int64_t ldc, int mv, int nv, bool acc) {
  if (mv == MR && nv == NR) {
    for (int i = 0; i < MR; ++i) {
      __m256 lo = r[i][0], hi = r[i][1];
      if (acc) {
        lo = _mm256_add_ps(_mm256_loadu_ps(c + i * ldc), lo);
        hi = _mm256_add_ps(_mm256_loadu_ps(c + i * ldc + 8), hi);
      }
      _mm256_storeu_ps(c + i * ldc, lo);
      _mm256_storeu_ps(c + i * ldc + 8, hi);
    }
    return;
  }
  alignas(64) float tile[MR * NR];
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(tile + i * NR, r[i][0]);
    _mm256_store_ps(tile + i * NR + 8, r[i][1]);
  }
  store_tile(tile, c, ldc, mv, nv, acc);
}

void ukr_f32(int64_t kc, const float *a, const float *b, float *c, int64_t ldc, int mv, int nv, bool acc) {
  static_assert(MR == 6 && NR == 16, "the AVX2 micro-kernel is written for 6 x 16 tiles");
  // Twelve named accumulators, not an array: with `__m256 r[MR][2]` GCC 12 kept the array in memory and stored
  // all 12 accumulators at every k step (a store per FMA: about half the FMA rate where one store retires a cycle).
  __m256 r0a = _mm256_setzero_ps(), r0b = r0a, r1a = r0a, r1b = r0a, r2a = r0a, r2b = r0a, r3a = r0a, r3b = r0a,
         r4a = r0a, r4b = r0a, r5a = r0a, r5b = r0a;
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * NR), b1 = _mm256_loadu_ps(b + k * NR + 8);
    const float *ak = a + k * MR;
// One row of the tile: broadcast a's element, two FMAs into that row's pair of accumulators.
#define MXC_AVX2_ROW(i)                                     \
  {                                                         \
    const __m256 av = _mm256_broadcast_ss(ak + i);          \
    r##i##a = _mm256_fmadd_ps(av, b0, r##i##a);             \
    r##i##b = _mm256_fmadd_ps(av, b1, r##i##b);             \
  }
    MXC_AVX2_ROW(0) MXC_AVX2_ROW(1) MXC_AVX2_ROW(2) MXC_AVX2_ROW(3) MXC_AVX2_ROW(4) MXC_AVX2_ROW(5)
#undef MXC_AVX2_ROW
  }
  const __m256 r[MR][2] = {{r0a, r0b}, {r1a, r1b}, {r2a, r2b}, {r3a, r3b}, {r4a, r4b}, {r5a, r5b}};
  store_tile256(r, c, ldc, mv, nv, acc);
}
#else
void ukr_f32(int64_t kc, const float *a, const float *b, float *c, int64_t ldc, int mv, int nv, bool acc) {
  float tile[MR * NR];
  for (int i = 0; i < MR * NR; ++i) tile[i] = 0.0f;
  for (int64_t k = 0; k < kc; ++k)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) tile[i * NR + j] = __builtin_fmaf(a[k * MR + i], b[k * NR + j], tile[i * NR + j]);
  store_tile(tile, c, ldc, mv, nv, acc);
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512F__)
void ukr_bf16(int64_t kc2, const uint32_t *a, const uint16_t *b, float *c, int64_t ldc, int mv, int nv, bool acc) {
  __m512 r[MR][2];
  for (int i = 0; i < MR; ++i) r[i][0] = r[i][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kc2; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + p * NR * 2);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + p * NR * 2 + 32);
    const uint32_t *ap = a + p * MR;
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[i]));
      r[i][0] = _mm512_dpbf16_ps(r[i][0], av, b0);
      r[i][1] = _mm512_dpbf16_ps(r[i][1], av, b1);
    }
  }
  store_tile512(r, c, ldc, mv, nv, acc);
}
#endif

template <typename T>
T *scratch(std::vector<T> &v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// One thread's share: C[m0:m0+m, n0:n0+n] for the whole of K. Buffers are the thread's own.
// C[m, n] (+)= packed A rows x packed B panels for one k block of `kc` (bf16 pairs: (kc + 1) / 2), tile by
// tile. `stride` is the k of B's panels (panel j starts at j * NR * stride values): `kc`, or more where the
// panels were packed for a longer k and only a prefix is used.
void macro_kernel(bool native, int64_t kc, int64_t stride, const float *ap_f, const uint32_t *ap_h, const float *bp_f,
                  const uint16_t *bp_h, int64_t m, int64_t n, float *c, int64_t ldc, bool acc) {
#if !(defined(__AVX512BF16__) && defined(__AVX512F__))
  (void)native, (void)ap_h, (void)bp_h;  // bf16 pair panels exist only with AVX512-BF16
#endif
  for (int64_t jr = 0; jr < n; jr += NR) {
    const int nv = static_cast<int>(n - jr < NR ? n - jr : NR);
    for (int64_t ir = 0; ir < m; ir += MR) {
      const int mv = static_cast<int>(m - ir < MR ? m - ir : MR);
      float *ct = c + ir * ldc + jr;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
      if (native) {
        const int64_t kc2 = (kc + 1) / 2, stride2 = (stride + 1) / 2;
        ukr_bf16(kc2, ap_h + ir * kc2, bp_h + jr * stride2 * 2, ct, ldc, mv, nv, acc);
        continue;
      }
#endif
      ukr_f32(kc, ap_f + ir * kc, bp_f + jr * stride, ct, ldc, mv, nv, acc);
    }
  }
}

void gemm_block(const View &a, const View &b, float *c, int64_t ldc, int64_t m0, int64_t m, int64_t n0, int64_t n,
                int64_t k, bool bf16, bool accumulate = false) {
  thread_local std::vector<float> abuf_f, bbuf_f;
  thread_local std::vector<uint32_t> abuf_h;
  thread_local std::vector<uint16_t> bbuf_h;
  const bool native = bf16 && kNativeBf16;
  const int64_t kcb = native ? KC_BF16 : KC;  // k per block
  const int64_t mpad = (m + MR - 1) / MR * MR;
  for (int64_t pc = 0; pc < k; pc += kcb) {
    const int64_t kc = k - pc < kcb ? k - pc : kcb;
    const int64_t kc2 = (kc + 1) / 2;
    const bool acc = accumulate || pc > 0;
    // All of this thread's rows of A for this k block (packed once, reused for every column block).
    float *ap_f = nullptr;
    uint32_t *ap_h = nullptr;
    if (native) {
      ap_h = scratch(abuf_h, mpad * kc2);
      pack_a_bf16(a, m0, m, pc, kc, ap_h);
    } else {
      ap_f = scratch(abuf_f, mpad * kc);
      pack_a_f32(a, m0, m, pc, kc, ap_f, bf16);
    }
    for (int64_t jc = 0; jc < n; jc += NC) {
      const int64_t nc = n - jc < NC ? n - jc : NC;
      const int64_t npad = (nc + NR - 1) / NR * NR;
      float *bp_f = nullptr;
      uint16_t *bp_h = nullptr;
      if (native) {
        bp_h = scratch(bbuf_h, npad * kc2 * 2);
        pack_b_bf16(b, pc, kc, n0 + jc, nc, bp_h);
      } else {
        bp_f = scratch(bbuf_f, npad * kc);
        pack_b_f32(b, pc, kc, n0 + jc, nc, bp_f, bf16);
      }
      for (int64_t ic = 0; ic < m; ic += MC) {
        const int64_t mc = m - ic < MC ? m - ic : MC;
        macro_kernel(native, kc, kc, ap_f ? ap_f + ic * kc : nullptr, ap_h ? ap_h + ic * kc2 : nullptr, bp_f, bp_h,
                     mc, nc, c + (m0 + ic) * ldc + n0 + jc, ldc, acc);
      }
    }
  }
}

#ifdef MXC_WITH_ONEDNN
// ---- bf16 products through oneDNN ------------------------------------------------------------------
// Where oneDNN is installed (the `onednn-cpu-gomp` wheel, found when the library is built), bf16
// products of more than `kOnednnMinRows` rows go to its matmul: it picks the CPU's matrix engine at run
// time (AMX tiles where the CPU and kernel allow them, AVX512-BF16 otherwise), which this file's
// micro-kernel does not have. The arithmetic is the one defined above: both inputs rounded to bf16 (RNE,
// here by one conversion pass), products summed in fp32 into an fp32 C; only the order of the sums
// differs. Any failure (an unsupported shape or stride) returns false and the own GEMM serves.
constexpr int64_t kOnednnMinRows = 1;
int g_onednn_enabled = -1;  // -1: not decided yet (MXC_ONEDNN=0 in the environment turns it off)

bool onednn_enabled() {
  // Only where this CPU multiplies bf16 (AVX512-BF16, which every AMX-BF16 CPU also has): elsewhere oneDNN's
  // bf16 matmul emulates it (on an AVX2 CPU the implementation check below let it serve all the same) and the
  // own GEMM does the same arithmetic at the same rate. Decided by the CPU the library was built for.
  if (!kNativeBf16) return false;
  if (g_onednn_enabled < 0) {
    const char *env = std::getenv("MXC_ONEDNN");
    g_onednn_enabled = (env != nullptr && env[0] == '0') ? 0 : 1;
  }
  return g_onednn_enabled == 1;
}

dnnl_engine_t onednn_engine() {
  static dnnl_engine_t engine = [] {
    dnnl_engine_t e = nullptr;
    return dnnl_engine_create(&e, dnnl_cpu, 0) == dnnl_success ? e : nullptr;
  }();
  return engine;
}

// The layout of a contiguous bf16 copy of the rows x cols operand `v`: v's own memory order (row-major
// unless v's rows are its contiguous direction). Returns whether the copy is column-major.
bool copy_strides(const View &v, int64_t rows, int64_t cols, dnnl_dims_t strides) {
  const bool transposed = v.cs != 1 && v.rs == 1;
  strides[0] = transposed ? 1 : cols;
  strides[1] = transposed ? rows : 1;
  return transposed;
}

// rows x cols of `v` rounded to bf16 (RNE) into `dst`, laid out as `copy_strides` says.
void bf16_copy(const View &v, int64_t rows, int64_t cols, uint16_t *dst) {
  dnnl_dims_t strides;
  const bool transposed = copy_strides(v, rows, cols, strides);
  const View t = transposed ? View{v.p, v.cs, v.rs, v.bf16} : v;
  const int64_t r_n = transposed ? cols : rows, c_n = transposed ? rows : cols;
#pragma omp parallel for schedule(static) if (r_n * c_n >= (1 << 16))
  for (int64_t r = 0; r < r_n; ++r) {
    uint16_t *d = dst + r * c_n;
    int64_t c = 0;
    if (!t.bf16 && t.cs == 1) {
      const float *s = static_cast<const float *>(t.p) + r * t.rs;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
      for (; c + 16 <= c_n; c += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(d + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + c)));
#endif
      for (; c < c_n; ++c) d[c] = f32_to_bf16(s[c]);
    } else {
      for (; c < c_n; ++c) d[c] = t.bits(r, c);
    }
  }
}

// Frees the oneDNN objects of one call, whatever was created.
struct OnednnCall {
  dnnl_memory_desc_t ad = nullptr, bd = nullptr, cd = nullptr;
  dnnl_primitive_attr_t attr = nullptr;
  dnnl_post_ops_t post = nullptr;
  dnnl_primitive_desc_t pd = nullptr;
  dnnl_primitive_t prim = nullptr;
  dnnl_memory_t am = nullptr, bm = nullptr, cm = nullptr;
  dnnl_stream_t stream = nullptr;
  ~OnednnCall() {
    if (stream) dnnl_stream_destroy(stream);
    if (am) dnnl_memory_destroy(am);
    if (bm) dnnl_memory_destroy(bm);
    if (cm) dnnl_memory_destroy(cm);
    if (prim) dnnl_primitive_destroy(prim);
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (post) dnnl_post_ops_destroy(post);
    if (attr) dnnl_primitive_attr_destroy(attr);
    if (ad) dnnl_memory_desc_destroy(ad);
    if (bd) dnnl_memory_desc_destroy(bd);
    if (cd) dnnl_memory_desc_destroy(cd);
  }
};

bool onednn_gemm_bf16(const View &a, const View &b, float *c, int64_t ldc, int64_t m, int64_t n, int64_t k,
                      bool accumulate) {
  dnnl_engine_t engine = onednn_engine();
  if (engine == nullptr) return false;
  OnednnCall call;
  dnnl_dims_t a_dims = {m, k}, b_dims = {k, n}, c_dims = {m, n};
  dnnl_dims_t a_strides, b_strides, c_strides = {ldc, 1};
  copy_strides(a, m, k, a_strides);
  if (b.bf16) {  // a stored bf16 weight is read in place
    b_strides[0] = b.rs;
    b_strides[1] = b.cs;
  } else {
    copy_strides(b, k, n, b_strides);
  }
  bool ok = dnnl_memory_desc_create_with_strides(&call.ad, 2, a_dims, dnnl_bf16, a_strides) == dnnl_success &&
            dnnl_memory_desc_create_with_strides(&call.bd, 2, b_dims, dnnl_bf16, b_strides) == dnnl_success &&
            dnnl_memory_desc_create_with_strides(&call.cd, 2, c_dims, dnnl_f32, c_strides) == dnnl_success &&
            dnnl_primitive_attr_create(&call.attr) == dnnl_success;
  if (ok && accumulate)
    ok = dnnl_post_ops_create(&call.post) == dnnl_success &&
         dnnl_post_ops_append_sum(call.post, 1.0f, 0, dnnl_data_type_undef) == dnnl_success &&
         dnnl_primitive_attr_set_post_ops(call.attr, call.post) == dnnl_success;
  ok = ok && dnnl_matmul_primitive_desc_create(&call.pd, engine, call.ad, call.bd, nullptr, call.cd, call.attr) == dnnl_success;
  if (!ok) return false;
  const char *impl = nullptr;
  if (dnnl_primitive_desc_query(call.pd, dnnl_query_impl_info_str, 0, &impl) != dnnl_success || impl == nullptr ||
      (std::strstr(impl, "amx") == nullptr && std::strstr(impl, "bf16") == nullptr)) {
    // oneDNN would emulate bf16 on this CPU (no AMX, no AVX512-BF16): the own GEMM serves from now on.
    g_onednn_enabled = 0;
    return false;
  }
  thread_local std::vector<uint16_t> a16, b16;
  bf16_copy(a, m, k, scratch(a16, size_t(m * k)));
  const void *b_data = b.p;
  if (!b.bf16) {
    bf16_copy(b, k, n, scratch(b16, size_t(k * n)));
    b_data = b16.data();
  }
  ok = dnnl_primitive_create(&call.prim, call.pd) == dnnl_success &&
       dnnl_memory_create(&call.am, call.ad, engine, a16.data()) == dnnl_success &&
       dnnl_memory_create(&call.bm, call.bd, engine, const_cast<void *>(b_data)) == dnnl_success &&
       dnnl_memory_create(&call.cm, call.cd, engine, c) == dnnl_success &&
       dnnl_stream_create(&call.stream, engine, dnnl_stream_default_flags) == dnnl_success;
  if (!ok) return false;
  dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, call.am}, {DNNL_ARG_WEIGHTS, call.bm}, {DNNL_ARG_DST, call.cm}};
  if (dnnl_primitive_execute(call.prim, call.stream, 3, args) != dnnl_success ||
      dnnl_stream_wait(call.stream) != dnnl_success) {
    // C may be partly written (and C += A B cannot be redone): stop rather than return a wrong result.
    std::fprintf(stderr, "mindxcomposer: oneDNN matmul failed (%lld x %lld x %lld)\n", (long long)m, (long long)k,
                 (long long)n);
    std::abort();
  }
  return true;
}
#endif  // MXC_WITH_ONEDNN

// C[M, N] = A B over the machine's threads. Work is split along N (each thread packs its own columns
// of B once) unless N is too narrow, then along M. Neither split changes any element's arithmetic.
// With `accumulate`, C's values are added to (C += A B: the first k block's sum is added to them as the
// later blocks' are), else overwritten.
// With `c_init` (C's shape, leading dimension ldc, not C itself), C = c_init + A B: each thread copies the part of
// C it then computes, so the copy is split as the product is (instead of one single-threaded copy before it).
void gemm(const View &a, const View &b, float *c, int64_t ldc, int64_t m, int64_t n, int64_t k, bool bf16,
          bool accumulate = false, const float *c_init = nullptr) {
  if (m <= 0 || n <= 0) return;
  auto copy_init = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    for (int64_t i = r0; i < r1; ++i) std::memcpy(c + i * ldc + c0, c_init + i * ldc + c0, sizeof(float) * (c1 - c0));
  };
  if (c_init != nullptr) {
    accumulate = true;
    if (k <= 0) copy_init(0, m, 0, n);
  }
  if (k <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, sizeof(float) * n);
    return;
  }
  count_flops(m, n, k);
  bool copied = false;  // c_init already in C
#ifdef MXC_WITH_ONEDNN
  // (A quantized B stays here: its columns are dequantized while packed.)
  if (bf16 && b.qbits == 0 && m >= kOnednnMinRows && onednn_enabled()) {
    if (c_init != nullptr) {
      copy_init(0, m, 0, n);
      copied = true;
    }
    if (onednn_gemm_bf16(a, b, c, ldc, m, n, k, accumulate)) return;
  }
#endif
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  const int64_t npanels = (n + NR - 1) / NR;
  const bool split_n = npanels >= 4 * threads || m < 2 * MR * threads;
  const int64_t units = split_n ? npanels : (m + MR - 1) / MR;
  const int64_t workers = units < threads ? units : threads;
#pragma omp parallel for schedule(static) num_threads(workers) if (workers > 1)
  for (int64_t t = 0; t < workers; ++t) {
    const int64_t u0 = units * t / workers, u1 = units * (t + 1) / workers;
    if (split_n) {
      const int64_t n0 = u0 * NR, n1 = u1 * NR < n ? u1 * NR : n;
      if (n1 > n0 && c_init != nullptr && !copied) copy_init(0, m, n0, n1);
      if (n1 > n0) gemm_block(a, b, c, ldc, 0, m, n0, n1 - n0, k, bf16, accumulate);
    } else {
      const int64_t m0 = u0 * MR, m1 = u1 * MR < m ? u1 * MR : m;
      if (m1 > m0 && c_init != nullptr && !copied) copy_init(m0, m1, 0, n);
      if (m1 > m0) gemm_block(a, b, c, ldc, m0, m1 - m0, 0, n, k, bf16, accumulate);
    }
  }
}

int64_t numel(int ndim, const int64_t *shape, int upto) {
  int64_t n = 1;
  for (int i = 0; i < upto && i < ndim; ++i) n *= shape[i];
  return n;
}

bool is_bf16(const char *dtype) { return dtype != nullptr && std::strstr(dtype, "bfloat16") != nullptr; }

// The three products of a linear layer y = x W^T (W [N, K] as stored) and its gradients:
//   nt: y[..., N]  = x[..., K] W^T        (forward)
//   nn: dx[..., K] = dy[..., N] W         (input gradient)
//   tn: dW[N, K]   = dy[..., N]^T x[..., K] (weight gradient; both operands activations)
// and the batched products of attention, with any number of leading batch dimensions:
//   bnt: s[..., M, N] = q[..., M, K] k[..., N, K]^T,   bnn: o[..., M, N] = p[..., M, K] v[..., K, N],
//   btn: g[..., M, N] = a[..., K, M]^T b[..., K, N] (their gradients).
int linear_nt(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool bf16) {
  if (nparam != 3) return 1;
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0];
  const int64_t m = numel(ndims[0], shapes[0], ndims[0] - 1);
  View a{params[0], k, 1, false};
  View b{params[1], 1, k, is_bf16(dtypes[1])};  // B(k, n) = W[n, k]
  gemm(a, b, static_cast<float *>(params[2]), n, m, n, k, bf16);
  return 0;
}

// y[..., N] = x[..., K] W^T with W quantized (`View::qbits`): inputs x, qweight, scales[, qzeros, group size
// int32 [1]], output y. int8: qweight int8 [N, K], scales [N]; int4: qweight uint8 [N, ceil(K / 2)], scales and
// qzeros [N, G].
int linear_nt_quant(int nparam, void **params, int *ndims, int64_t **shapes, bool bf16) {
  if (nparam != 4 && nparam != 6) return 1;
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0];
  const int64_t m = numel(ndims[0], shapes[0], ndims[0] - 1);
  View b{params[1], 1, k, false};
  const bool int4 = nparam == 6;
  if (!set_quant(b, params[2], int4 ? params[3] : nullptr, int4 ? 4 : 8, k,
                 int4 ? *static_cast<const int32_t *>(params[4]) : 0) ||
      (int4 && b.qgroups != shapes[2][1]))
    return 1;
  gemm(View{params[0], k, 1, false}, b, static_cast<float *>(params[nparam - 1]), n, m, n, k, bf16);
  return 0;
}

// y[..., N] = c[..., N] + x[..., K] W^T: a linear whose output is added to another (a LoRA's B onto the
// layer's output). C's values start the sum, so with one k block (rank <= 256) this is exactly c + x W^T.
int linear_nt_add(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool bf16) {
  if (nparam != 4) return 1;
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0];
  const int64_t m = numel(ndims[0], shapes[0], ndims[0] - 1);
  float *out = static_cast<float *>(params[3]);
  View a{params[0], k, 1, false};
  View b{params[1], 1, k, is_bf16(dtypes[1])};
  if (out == params[2])
    gemm(a, b, out, n, m, n, k, bf16, true);
  else
    gemm(a, b, out, n, m, n, k, bf16, false, static_cast<const float *>(params[2]));
  return 0;
}

int linear_nn(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool bf16) {
  if (nparam != 3) return 1;
  const int64_t n = shapes[0][ndims[0] - 1], k = shapes[1][1];  // dy [.., N], W [N, K]
  const int64_t m = numel(ndims[0], shapes[0], ndims[0] - 1);
  View a{params[0], n, 1, false};
  View b{params[1], k, 1, is_bf16(dtypes[1])};  // B(j, c) = W[j, c]
  gemm(a, b, static_cast<float *>(params[2]), k, m, k, n, bf16);
  return 0;
}

// dx[..., K] = dy[..., N] W with W quantized (`View::qrows`): the input gradient of `linear_nt_quant`, the
// weight dequantized tile by tile while packed, exactly as its dequantized fp32 twin's `linear_nn` packs it.
// Inputs dy, x (read for its shape only: K, which an int4 qweight's ceil(K / 2) columns do not fix), qweight,
// scales[, qzeros, group size int32 [1]], output dx.
int linear_nn_quant(int nparam, void **params, int *ndims, int64_t **shapes, bool bf16) {
  if (nparam != 5 && nparam != 7) return 1;
  const int64_t n = shapes[0][ndims[0] - 1], k = shapes[1][ndims[1] - 1];
  const int64_t m = numel(ndims[0], shapes[0], ndims[0] - 1);
  if (shapes[2][0] != n) return 1;
  View b{params[2], k, 1, false};
  b.qrows = true;
  const bool int4 = nparam == 7;
  if (!set_quant(b, params[3], int4 ? params[4] : nullptr, int4 ? 4 : 8, k,
                 int4 ? *static_cast<const int32_t *>(params[5]) : 0) ||
      shapes[2][1] != (int4 ? (k + 1) / 2 : k) || (int4 && b.qgroups != shapes[3][1]))
    return 1;
  gemm(View{params[0], n, 1, false}, b, static_cast<float *>(params[nparam - 1]), k, m, k, n, bf16);
  return 0;
}

int linear_tn(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool bf16) {
  if (nparam != 3) return 1;
  const int64_t n = shapes[0][ndims[0] - 1], k = shapes[1][ndims[1] - 1];  // dy [.., N], x [.., K]
  const int64_t m = numel(ndims[0], shapes[0], ndims[0] - 1);
  View a{params[0], 1, n, false};  // A(j, r) = dy[r, j]
  View b{params[1], k, 1, false};  // B(r, c) = x[r, c]
  gemm(a, b, static_cast<float *>(params[2]), k, n, k, m, bf16);
  return 0;
}

enum class Batched { NT, NN, TN };

// nt: a [.., M, K] b [.., N, K]^T; nn: a [.., M, K] b [.., K, N]; tn: a [.., K, M]^T b [.., K, N].
int batched(int nparam, void **params, int *ndims, int64_t **shapes, Batched kind, bool bf16) {
  if (nparam != 3 || ndims[0] < 2 || ndims[0] != ndims[1]) return 1;
  const int nd = ndims[0];
  const int64_t a0 = shapes[0][nd - 2], a1 = shapes[0][nd - 1], b0 = shapes[1][nd - 2], b1 = shapes[1][nd - 1];
  const int64_t m = kind == Batched::TN ? a1 : a0, k = kind == Batched::TN ? a0 : a1;
  const int64_t n = kind == Batched::NT ? b0 : b1;
  const int64_t batch = numel(nd, shapes[0], nd - 2);
  const float *a = static_cast<const float *>(params[0]);
  const float *b = static_cast<const float *>(params[1]);
  float *c = static_cast<float *>(params[2]);
  for (int64_t i = 0; i < batch; ++i) {
    const float *ai = a + i * m * k, *bi = b + i * k * n;
    View av = kind == Batched::TN ? View{ai, 1, m, false} : View{ai, k, 1, false};
    View bv = kind == Batched::NT ? View{bi, 1, k, false} : View{bi, n, 1, false};
    gemm(av, bv, c + i * m * n, n, m, n, k, bf16);
  }
  return 0;
}

// ---- a B packed once, used by many products ------------------------------------------------------------
// Attention multiplies every block of query rows by the same keys and values: they are packed once per head
// (all k blocks, in the panels `gemm_block` would make) and each block's products read a prefix of them.
struct PackedB {
  bool native = false;
  int64_t n = 0, k = 0, kcb = 0;
  std::vector<float> f;
  std::vector<uint16_t> h;
  std::vector<int64_t> offset;  // start of each k block's panels
};

void pack_b_all(const View &b, int64_t n, int64_t k, bool bf16, PackedB &out) {
  out.native = bf16 && kNativeBf16;
  out.n = n;
  out.k = k;
  out.kcb = out.native ? KC_BF16 : KC;
  const int64_t npad = (n + NR - 1) / NR * NR;
  out.offset.clear();
  int64_t size = 0;
  for (int64_t pc = 0; pc < k; pc += out.kcb) {
    const int64_t kc = k - pc < out.kcb ? k - pc : out.kcb;
    out.offset.push_back(size);
    size += out.native ? npad * ((kc + 1) / 2) * 2 : npad * kc;
  }
  if (out.native) {
    if (static_cast<int64_t>(out.h.size()) < size) out.h.resize(size);
  } else if (static_cast<int64_t>(out.f.size()) < size) {
    out.f.resize(size);
  }
  for (int64_t pc = 0, i = 0; pc < k; pc += out.kcb, ++i) {
    const int64_t kc = k - pc < out.kcb ? k - pc : out.kcb;
    if (out.native)
      pack_b_bf16(b, pc, kc, 0, n, out.h.data() + out.offset[i]);
    else
      pack_b_f32(b, pc, kc, 0, n, out.f.data() + out.offset[i], bf16);
  }
}

// C[m, n] = A[m, k] B[:k, :n] on one thread, B from `pack_b_all` (k <= B.k, n <= B.n). The k blocks are
// B's, so every element's arithmetic is what `gemm` gives it.
void gemm_packed(const View &a, int64_t m, const PackedB &b, int64_t n, int64_t k, float *c, int64_t ldc, bool bf16) {
  thread_local std::vector<float> abuf_f;
  thread_local std::vector<uint32_t> abuf_h;
  count_flops(m, n, k);
  const int64_t mpad = (m + MR - 1) / MR * MR;
  for (int64_t pc = 0, blk = 0; pc < k; pc += b.kcb, ++blk) {
    const int64_t full = b.k - pc < b.kcb ? b.k - pc : b.kcb;  // the packed block's k (panel stride)
    const int64_t kc = k - pc < b.kcb ? k - pc : b.kcb;
    if (b.native) {
      uint32_t *ap = scratch(abuf_h, mpad * ((kc + 1) / 2));
      pack_a_bf16(a, 0, m, pc, kc, ap);
      macro_kernel(true, kc, full, nullptr, ap, nullptr, b.h.data() + b.offset[blk], m, n, c, ldc, pc > 0);
    } else {
      float *ap = scratch(abuf_f, mpad * kc);
      pack_a_f32(a, 0, m, pc, kc, ap, bf16);
      macro_kernel(false, kc, full, ap, nullptr, b.f.data() + b.offset[blk], nullptr, m, n, c, ldc, pc > 0);
    }
  }
}

// ---- attention ---------------------------------------------------------------------------------------
// exp for softmax: round-to-nearest range reduction x = n ln2 + r and a degree-6 polynomial (about 1 ulp on
// the range softmax uses, x <= 0); x below -87.3 (masked scores) gives exactly 0, as expf underflows. The
// vector and scalar forms do the same operations, so a value's result does not depend on its position.
constexpr float kExpLo = -87.3f, kExpHi = 88.7f, kLog2e = 1.44269504088896341f, kLn2Hi = -0.693359375f,
                kLn2Lo = 2.12194440e-4f;
constexpr float kExpPoly[] = {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f};

inline float softmax_exp(float x) {
  if (x < kExpLo) return 0.0f;
  if (x > kExpHi) x = kExpHi;
  const float n = __builtin_nearbyintf(x * kLog2e);
  const float r = __builtin_fmaf(n, kLn2Hi, __builtin_fmaf(n, kLn2Lo, x));
  float p = kExpPoly[0];
  for (int i = 1; i < 7; ++i) p = __builtin_fmaf(p, r, kExpPoly[i]);
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

#if defined(__AVX512F__)
inline __m512 softmax_exp16(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLo), _CMP_GE_OQ);
  x = _mm512_min_ps(x, _mm512_set1_ps(kExpHi));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(kLn2Hi), _mm512_fmadd_ps(n, _mm512_set1_ps(kLn2Lo), x));
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  const __m512i bits = _mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23));
  return _mm512_maskz_mov_ps(live, _mm512_castsi512_ps(bits));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define MXC_EXP8 1
// softmax_exp on 8 lanes (AVX2 + FMA): the same operations, so each lane equals softmax_exp of its value.
inline __m256 softmax_exp8(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLo), _CMP_GE_OQ);
  x = _mm256_min_ps(x, _mm256_set1_ps(kExpHi));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(kLn2Hi), _mm256_fmadd_ps(n, _mm256_set1_ps(kLn2Lo), x));
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  const __m256i bits = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
  return _mm256_and_ps(live, _mm256_castsi256_ps(bits));
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// Masked scores: an additive mask at or below this hides a key (the model's masks use fp32's minimum).
constexpr float kHidden = -1e30f;

// A row of scores in place: x / divisor + mask (each only when there is one: a row with neither is only read);
// returns its largest value.
float scale_mask_max(float *row, const float *mask, int64_t len, float divisor) {
  const bool write = divisor != 1.0f || mask != nullptr;
  float top = -INFINITY;
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 vtop = _mm512_set1_ps(-INFINITY);
  const __m512 vdiv = _mm512_set1_ps(divisor);
  for (; j < len; j += 16) {
    const __mmask16 m = len - j >= 16 ? 0xffff : static_cast<__mmask16>((1u << (len - j)) - 1);
    __m512 x = _mm512_maskz_loadu_ps(m, row + j);
    if (divisor != 1.0f) x = _mm512_div_ps(x, vdiv);
    if (mask) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, mask + j));
    if (write) _mm512_mask_storeu_ps(row + j, m, x);
    vtop = _mm512_mask_max_ps(vtop, m, vtop, x);
  }
  top = _mm512_reduce_max_ps(vtop);
#else
#if defined(MXC_EXP8)
  __m256 vtop = _mm256_set1_ps(-INFINITY);
  const __m256 vdiv = _mm256_set1_ps(divisor);
  for (; j + 8 <= len; j += 8) {
    __m256 x = _mm256_loadu_ps(row + j);
    if (divisor != 1.0f) x = _mm256_div_ps(x, vdiv);
    if (mask) x = _mm256_add_ps(x, _mm256_loadu_ps(mask + j));
    if (write) _mm256_storeu_ps(row + j, x);
    vtop = _mm256_max_ps(vtop, x);
  }
  top = hmax8(vtop);
#endif
  for (; j < len; ++j) {
    float x = divisor == 1.0f ? row[j] : row[j] / divisor;
    if (mask) x += mask[j];
    if (write) row[j] = x;
    top = x > top ? x : top;
  }
#endif
  return top;
}

// row[j] = exp(row[j] - top) in place; returns their sum (in 16 or 8 partial sums where the vector units have
// them, then the tail).
float exp_sum(float *row, int64_t len, float top) {
  float sum = 0.0f;
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 vsum = _mm512_setzero_ps();
  const __m512 vt = _mm512_set1_ps(top);
  for (; j < len; j += 16) {
    const __mmask16 m = len - j >= 16 ? 0xffff : static_cast<__mmask16>((1u << (len - j)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(m, softmax_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), vt)));
    _mm512_mask_storeu_ps(row + j, m, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  sum = _mm512_reduce_add_ps(vsum);
#else
#if defined(MXC_EXP8)
  __m256 vsum = _mm256_setzero_ps();
  const __m256 vt = _mm256_set1_ps(top);
  for (; j + 8 <= len; j += 8) {
    const __m256 e = softmax_exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vt));
    _mm256_storeu_ps(row + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  sum = hsum8(vsum);
#endif
  for (; j < len; ++j) {
    row[j] = softmax_exp(row[j] - top);
    sum += row[j];
  }
#endif
  return sum;
}

// row[j] /= sum in place.
void divide_row(float *row, int64_t len, float sum) {
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(sum);
  for (; j < len; j += 16) {
    const __mmask16 m = len - j >= 16 ? 0xffff : static_cast<__mmask16>((1u << (len - j)) - 1);
    _mm512_mask_storeu_ps(row + j, m, _mm512_div_ps(_mm512_maskz_loadu_ps(m, row + j), vs));
  }
#else
#if defined(MXC_EXP8)
  const __m256 vs = _mm256_set1_ps(sum);
  for (; j + 8 <= len; j += 8) _mm256_storeu_ps(row + j, _mm256_div_ps(_mm256_loadu_ps(row + j), vs));
#endif
  for (; j < len; ++j) row[j] /= sum;
#endif
}

// One row of scores in place: x / divisor + mask, then softmax. Returns false if the row sees no key.
bool softmax_row(float *row, const float *mask, int64_t len, float divisor) {
  const float top = scale_mask_max(row, mask, len, divisor);
  if (top <= kHidden) return false;
  divide_row(row, len, exp_sum(row, len, top));
  return true;
}

// out = softmax(q k^T / divisor + mask) v for q [B, KV, R, D] (R = group heads x n queries, query i of row
// r is r % n), k / v [B, KV, S, D], mask [B, 1, n, S] or none, out [B, KV, R, D]. Heads run in parallel;
// each packs its keys and values once, up to the last slot any of its rows sees, then goes block by block of
// query rows, each over the keys that block can see: a prompt chunk early in a long static cache does not
// pay for the empty slots after it, and the scores are never [R, S] at once. The hidden keys it skips
// have probability exactly 0. A row that sees no key (a padding query) gets what the plain softmax gives
// it: the mask swamps every score equally, so its weights are uniform over all slots.
// Where an attention operand's rows are: element (batch b, head h, row r, c) at b * batch + h * head + r * row + c.
// [B, H, S, D] ("BNSD", the decoder's and its cache's layout) or [B, S, H, D] ("BSND", the projections'
// own output, so the ViT needs no transposes).
struct Layout {
  int64_t batch, head, row;
};

// One past the last slot each of `rows_total` query rows sees through its additive mask (0: none; `slots`
// without a mask), shared by the heads: the forward and the gradient stop there.
std::vector<int64_t> last_visible(const float *mask, int64_t rows_total, int64_t slots) {
  std::vector<int64_t> last(rows_total, slots);
  if (mask) {
    for (int64_t i = 0; i < rows_total; ++i) {
      const float *mr = mask + i * slots;
      int64_t l = slots;
      while (l > 0 && mr[l - 1] <= kHidden) --l;
      last[i] = l;
    }
  }
  return last;
}

void attention(const float *q, const float *k, const float *v, const float *mask, float divisor, float *out,
               int64_t batch, int64_t heads, int64_t rows, int64_t n, int64_t slots, int64_t d, bool bf16,
               const Layout &ql, const Layout &kl) {
  constexpr int64_t RB = 8 * MR;  // query rows per block
  const int64_t items = batch * heads;
  const std::vector<int64_t> last = last_visible(mask, batch * n, slots);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t it = 0; it < items; ++it) {
    thread_local PackedB kt, vp;
    thread_local std::vector<float> sbuf;
    const int64_t b = it / heads, h = it % heads;
    const float *qh = q + b * ql.batch + h * ql.head;
    const float *kh = k + b * kl.batch + h * kl.head;
    const float *vh = v + b * kl.batch + h * kl.head;
    const float *mb = mask ? mask + b * n * slots : nullptr;
    float *oh = out + b * ql.batch + h * ql.head;
    int64_t head_limit = 0;
    for (int64_t i = 0; i < (rows < n ? rows : n); ++i) head_limit = std::max(head_limit, last[b * n + i]);
    if (head_limit > 0) {
      pack_b_all(View{kh, 1, kl.row, false}, head_limit, d, bf16, kt);  // B(c, j) = k[j][c]
      pack_b_all(View{vh, kl.row, 1, false}, d, head_limit, bf16, vp);  // B(j, c) = v[j][c]
    }
    for (int64_t r0 = 0; r0 < rows; r0 += RB) {
      const int64_t rn = rows - r0 < RB ? rows - r0 : RB;
      int64_t limit = 0;
      for (int64_t r = 0; r < rn; ++r) limit = std::max(limit, last[b * n + (r0 + r) % n]);
      float *o = oh + r0 * ql.row;
      if (limit > 0) {
        float *sc = scratch(sbuf, rn * limit);
        gemm_packed(View{qh + r0 * ql.row, ql.row, 1, false}, rn, kt, limit, d, sc, limit, bf16);
        for (int64_t r = 0; r < rn; ++r)
          softmax_row(sc + r * limit, mb ? mb + ((r0 + r) % n) * slots : nullptr, limit, divisor);
        gemm_packed(View{sc, limit, 1, false}, rn, vp, d, limit, o, ql.row, bf16);
      }
      for (int64_t r = 0; r < rn; ++r) {
        if (last[b * n + (r0 + r) % n] > 0) continue;
        for (int64_t c = 0; c < d; ++c) {
          float acc = 0.0f;
          for (int64_t j = 0; j < slots; ++j) acc += vh[j * kl.row + c];
          o[r * ql.row + c] = acc / static_cast<float>(slots);
        }
      }
    }
  }
}

// The gradient of `attention` for the incoming gradient dout (same shapes and layouts as q / out): dq, dk, dv, in
// one pass over blocks of query rows per head, the weights recomputed as the forward computes them (same packs,
// same softmax), never [R, S] at once: per block P = softmax(q k^T / divisor + mask), dP = dout v^T,
// dS = P (dP - rowsum(dP P)) / divisor, dq = dS k, dk += dS^T q, dv += P^T dout. Each product rounds its inputs
// as the forward's do (bf16 products: to bf16). A compiled graph keeps every intermediate until it returns, so
// the same computation written with MindSpore ops held all blocks' [heads, block, keys] tensors at once. A row
// that sees no key (uniform weights over all slots in the forward) is differentiated as the plain softmax is:
// P = 1 / slots over every slot.
void attention_grad(const float *q, const float *k, const float *v, const float *mask, float divisor,
                    const float *dout, float *dq, float *dk, float *dv, int64_t batch, int64_t heads, int64_t rows,
                    int64_t n, int64_t slots, int64_t d, bool bf16, const Layout &ql, const Layout &kl) {
  constexpr int64_t RB = 8 * MR;  // query rows per block, as the forward
  const int64_t items = batch * heads;
  const std::vector<int64_t> last = last_visible(mask, batch * n, slots);
  auto rb = [bf16](float x) { return bf16 ? round_bf16(x) : x; };
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t it = 0; it < items; ++it) {
    thread_local PackedB kt, vt, kp;
    thread_local std::vector<float> pbuf, sbuf;
    const int64_t b = it / heads, h = it % heads;
    const float *qh = q + b * ql.batch + h * ql.head, *doh = dout + b * ql.batch + h * ql.head;
    const float *kh = k + b * kl.batch + h * kl.head;
    const float *vh = v + b * kl.batch + h * kl.head;
    const float *mb = mask ? mask + b * n * slots : nullptr;
    float *dqh = dq + b * ql.batch + h * ql.head;
    float *dkh = dk + b * kl.batch + h * kl.head, *dvh = dv + b * kl.batch + h * kl.head;
    for (int64_t j = 0; j < slots; ++j) {
      std::memset(dkh + j * kl.row, 0, sizeof(float) * d);
      std::memset(dvh + j * kl.row, 0, sizeof(float) * d);
    }
    int64_t head_limit = 0;
    for (int64_t i = 0; i < (rows < n ? rows : n); ++i) head_limit = std::max(head_limit, last[b * n + i]);
    if (head_limit > 0) {
      pack_b_all(View{kh, 1, kl.row, false}, head_limit, d, bf16, kt);  // B(c, j) = k[j][c]: scores
      pack_b_all(View{vh, 1, kl.row, false}, head_limit, d, bf16, vt);  // B(c, j) = v[j][c]: dP
      pack_b_all(View{kh, kl.row, 1, false}, d, head_limit, bf16, kp);  // B(j, c) = k[j][c]: dq
    }
    for (int64_t r0 = 0; r0 < rows; r0 += RB) {
      const int64_t rn = rows - r0 < RB ? rows - r0 : RB;
      int64_t limit = 0;
      for (int64_t r = 0; r < rn; ++r) limit = std::max(limit, last[b * n + (r0 + r) % n]);
      if (limit > 0) {
        float *p = scratch(pbuf, rn * limit), *ds = scratch(sbuf, rn * limit);
        const View qb{qh + r0 * ql.row, ql.row, 1, false}, dob{doh + r0 * ql.row, ql.row, 1, false};
        gemm_packed(qb, rn, kt, limit, d, p, limit, bf16);
        gemm_packed(dob, rn, vt, limit, d, ds, limit, bf16);
        for (int64_t r = 0; r < rn; ++r) {
          float *pr = p + r * limit, *sr = ds + r * limit;
          if (last[b * n + (r0 + r) % n] == 0) {  // below, on its own
            std::memset(pr, 0, sizeof(float) * limit);
            std::memset(sr, 0, sizeof(float) * limit);
            continue;
          }
          softmax_row(pr, mb ? mb + ((r0 + r) % n) * slots : nullptr, limit, divisor);
          float delta = 0.0f;
          int64_t j = 0;
          // 16 or 8 partial sums: one chain of dependent additions took as long as the row's products.
#if defined(__AVX512F__)
          __m512 vd = _mm512_setzero_ps();
          for (; j < limit; j += 16) {
            const __mmask16 m = limit - j >= 16 ? 0xffff : static_cast<__mmask16>((1u << (limit - j)) - 1);
            vd = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, sr + j), _mm512_maskz_loadu_ps(m, pr + j), vd);
          }
          delta = _mm512_reduce_add_ps(vd);
#elif defined(MXC_EXP8)
          __m256 vd = _mm256_setzero_ps();
          for (; j + 8 <= limit; j += 8)
            vd = _mm256_add_ps(vd, _mm256_mul_ps(_mm256_loadu_ps(sr + j), _mm256_loadu_ps(pr + j)));
          delta = hsum8(vd);
#endif
          for (; j < limit; ++j) delta += sr[j] * pr[j];
          for (j = 0; j < limit; ++j) sr[j] = pr[j] * (sr[j] - delta) / divisor;
        }
        gemm_packed(View{ds, limit, 1, false}, rn, kp, d, limit, dqh + r0 * ql.row, ql.row, bf16);
        gemm_block(View{ds, 1, limit, false}, qb, dkh, kl.row, 0, limit, 0, d, rn, bf16, true);  // dS^T q
        gemm_block(View{p, 1, limit, false}, dob, dvh, kl.row, 0, limit, 0, d, rn, bf16, true);  // P^T dout
      }
      for (int64_t r = 0; r < rn; ++r) {
        if (last[b * n + (r0 + r) % n] > 0) continue;
        // Uniform weights over every slot.
        const float *qr = qh + (r0 + r) * ql.row, *dor = doh + (r0 + r) * ql.row;
        float *dqr = dqh + (r0 + r) * ql.row;
        const float pu = 1.0f / static_cast<float>(slots);
        std::vector<float> dp(slots);
        float delta = 0.0f;
        for (int64_t j = 0; j < slots; ++j) {
          float acc = 0.0f;
          for (int64_t c = 0; c < d; ++c) acc += rb(dor[c]) * rb(vh[j * kl.row + c]);
          dp[j] = acc;
          delta += acc * pu;
        }
        for (int64_t c = 0; c < d; ++c) dqr[c] = 0.0f;
        for (int64_t j = 0; j < slots; ++j) {
          const float sj = pu * (dp[j] - delta) / divisor;
          for (int64_t c = 0; c < d; ++c) {
            dqr[c] += rb(sj) * rb(kh[j * kl.row + c]);
            dkh[j * kl.row + c] += rb(sj) * rb(qr[c]);
            dvh[j * kl.row + c] += rb(pu) * rb(dor[c]);
          }
        }
      }
    }
  }
}

// CLIP's activation, x sigmoid(1.702 x), as x / (1 + exp(-1.702 x)) with the softmax's exp.
inline float quick_gelu(float x) { return x / (1.0f + softmax_exp(-1.702f * x)); }

// c[m, n] = act(c + bias) (+ residual) row by row, bias [n] in fp32 or bf16, residual [m, n] or null: a
// linear's bias, activation and residual connection in one pass.
void bias_act(float *c, int64_t m, int64_t n, const void *bias, bool bias_bf16, bool gelu, const float *residual) {
  const float *bf = static_cast<const float *>(bias);
  const uint16_t *bh = static_cast<const uint16_t *>(bias);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < m; ++r) {
    float *row = c + r * n;
    int64_t j = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.0f), k = _mm512_set1_ps(-1.702f);
    for (; j + 16 <= n; j += 16) {
      const __m512 b = bias_bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                       _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(bh + j))), 16))
                                 : _mm512_loadu_ps(bf + j);
      __m512 z = _mm512_add_ps(_mm512_loadu_ps(row + j), b);
      if (gelu) z = _mm512_div_ps(z, _mm512_add_ps(one, softmax_exp16(_mm512_mul_ps(z, k))));
      if (residual) z = _mm512_add_ps(_mm512_loadu_ps(residual + r * n + j), z);
      _mm512_storeu_ps(row + j, z);
    }
#elif defined(MXC_EXP8)
    const __m256 one = _mm256_set1_ps(1.0f), k = _mm256_set1_ps(-1.702f);
    for (; j + 8 <= n; j += 8) {
      const __m256 b = bias_bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                                       _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(bh + j))), 16))
                                 : _mm256_loadu_ps(bf + j);
      __m256 z = _mm256_add_ps(_mm256_loadu_ps(row + j), b);
      if (gelu) z = _mm256_div_ps(z, _mm256_add_ps(one, softmax_exp8(_mm256_mul_ps(z, k))));
      if (residual) z = _mm256_add_ps(_mm256_loadu_ps(residual + r * n + j), z);
      _mm256_storeu_ps(row + j, z);
    }
#endif
    for (; j < n; ++j) {
      float z = row[j] + (bias_bf16 ? bf16_to_f32(bh[j]) : bf[j]);
      if (gelu) z = quick_gelu(z);
      row[j] = residual ? residual[r * n + j] + z : z;
    }
  }
}

// y[..., N] = act(x[..., K] W^T + b) (+ r[..., N]): a linear with its bias (CLIP's layers), with `gelu`
// CLIP's MLP activation, with a fourth input the residual it is added to, applied in one pass over the
// product's output in the order r + act(x W^T + b) computes them.
int linear_nt_bias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool bf16,
                   bool gelu) {
  const bool residual = nparam == 5;
  if ((nparam != 4 && nparam != 5) || ndims[2] != 1 || shapes[2][0] != shapes[1][0]) return 1;
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0];
  const int64_t m = numel(ndims[0], shapes[0], ndims[0] - 1);
  if (residual && numel(ndims[3], shapes[3], ndims[3]) != m * n) return 1;
  float *out = static_cast<float *>(params[nparam - 1]);
  gemm(View{params[0], k, 1, false}, View{params[1], 1, k, is_bf16(dtypes[1])}, out, n, m, n, k, bf16);
  bias_act(out, m, n, params[2], is_bf16(dtypes[2]), gelu, residual ? static_cast<const float *>(params[3]) : nullptr);
  return 0;
}

// The output head's cross-entropy and its gradient in one call, for fine-tuning with a frozen head: inputs h [R, K]
// fp32 (the normed hidden rows), W [V, K] fp32 or bf16 (the head), labels int32 [R], weight fp32 [R]; outputs
// loss [R] = weight * (logsumexp(s) - s[label]) with s = h W^T, dh [R, K] = weight * (softmax(s) - onehot(label))
// W, the gradient of loss's sum, and the logits' workspace [R, V] (scratch: its values mean nothing to the caller).
// The workspace is an output so that MindSpore's memory pool provides it: memory the process has already touched.
// Allocated here, the 95 MB of 256 rows of the release's vocabulary were fresh pages on every call, and faulting
// them in took ~35 ms of a ~330 ms call. The two products are `gemm`'s, the softmax is attention's (same
// exponential). A row of weight 0 is all zeros (loss and gradient). Returns 1 for a label outside [0, V).
int head_cross_entropy(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool bf16) {
  if (nparam != 7 || ndims[0] != 2 || ndims[1] != 2 || shapes[1][1] != shapes[0][1]) return 1;
  const int64_t r = shapes[0][0], k = shapes[0][1], v = shapes[1][0];
  if (numel(ndims[2], shapes[2], ndims[2]) != r || numel(ndims[3], shapes[3], ndims[3]) != r) return 1;
  const int32_t *labels = static_cast<const int32_t *>(params[2]);
  const float *weight = static_cast<const float *>(params[3]);
  for (int64_t i = 0; i < r; ++i)
    if (weight[i] != 0.0f && (labels[i] < 0 || labels[i] >= v)) return 1;
  if (numel(ndims[6], shapes[6], ndims[6]) != r * v) return 1;
  float *loss = static_cast<float *>(params[4]);
  float *s = static_cast<float *>(params[6]);  // the product writes every value
  const bool w_bf16 = is_bf16(dtypes[1]);
  gemm(View{params[0], k, 1, false}, View{params[1], 1, k, w_bf16}, s, v, r, v, k, bf16);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < r; ++i) {
    float *row = s + i * v;
    if (weight[i] == 0.0f) {
      loss[i] = 0.0f;
      std::memset(row, 0, sizeof(float) * v);
      continue;
    }
    const float picked = row[labels[i]];
    const float top = scale_mask_max(row, nullptr, v, 1.0f);
    const float sum = exp_sum(row, v, top);
    loss[i] = weight[i] * (top + std::log(sum) - picked);
    divide_row(row, v, sum);
    row[labels[i]] -= 1.0f;
    if (weight[i] != 1.0f)
      for (int64_t j = 0; j < v; ++j) row[j] *= weight[i];
  }
  gemm(View{s, v, 1, false}, View{params[1], k, 1, w_bf16}, static_cast<float *>(params[5]), k, r, k, v, bf16);
  return 0;
}

}  // namespace

#ifdef MXC_KERNEL_PROFILE
// A profiling build (`cpu_kernels`: MXC_KERNEL_PROFILE=1 in the environment when the library is built; the
// fine-tuning benchmark's --kernel-profile): each entry point below is timed per call and counted with its first
// three operands' shapes and the products' FLOPs, for `MxcKernelProfile` to write out. Not in normal builds.
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
namespace {
struct KernelTimes {
  std::mutex mu;
  std::map<std::string, std::vector<double>> rows;  // key -> ms, calls, flops
};
KernelTimes g_kernel_times;

void kernel_time(const char *name, int nparam, const int *ndims, int64_t *const *shapes, double ms, double flops) {
  std::string key = name;
  for (int i = 0; i < nparam && i < 3; ++i) {
    key += i ? " x [" : " [";
    for (int d = 0; d < ndims[i]; ++d) key += (d ? "," : "") + std::to_string(shapes[i][d]);
    key += "]";
  }
  std::lock_guard<std::mutex> lock(g_kernel_times.mu);
  std::vector<double> &row = g_kernel_times.rows[key];
  if (row.empty()) row.assign(3, 0.0);
  row[0] += ms;
  row[1] += 1;
  row[2] += flops;
}
}  // namespace

// Writes "ms<TAB>calls<TAB>flops<TAB>kernel [shapes]" lines to `path` (when not null), then clears the counts when
// `reset`. Returns 0, or -1 when the file cannot be written.
extern "C" int MxcKernelProfile(const char *path, int reset) {
  std::lock_guard<std::mutex> lock(g_kernel_times.mu);
  int rc = 0;
  if (path != nullptr) {
    FILE *f = std::fopen(path, "w");
    if (f == nullptr) {
      rc = -1;
    } else {
      for (const auto &kv : g_kernel_times.rows)
        std::fprintf(f, "%.3f\t%.0f\t%.0f\t%s\n", kv.second[0], kv.second[1], kv.second[2], kv.first.c_str());
      std::fclose(f);
    }
  }
  if (reset) g_kernel_times.rows.clear();
  return rc;
}

#define MXC_AOT(name)                                                                                            \
  static int name##_body(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes);         \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,     \
                      void *) {                                                                                  \
    const auto start = std::chrono::steady_clock::now();                                                         \
    const int64_t flops = g_flops.load();                                                                        \
    const int rc = name##_body(nparam, params, ndims, shapes, dtypes);                                           \
    kernel_time(#name, nparam, ndims, shapes,                                                                    \
                std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count(),     \
                static_cast<double>(g_flops.load() - flops));                                                    \
    return rc;                                                                                                   \
  }                                                                                                              \
  static int name##_body(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes)
#else
extern "C" int MxcKernelProfile(const char *, int) { return -1; }  // not a profiling build
#define MXC_AOT(name) \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *)
#endif

MXC_AOT(MxcLinearNT) { return linear_nt(nparam, params, ndims, shapes, dtypes, false); }
MXC_AOT(MxcLinearNTBf16) { return linear_nt(nparam, params, ndims, shapes, dtypes, true); }
MXC_AOT(MxcLinearNTQuant) { return linear_nt_quant(nparam, params, ndims, shapes, false); }
MXC_AOT(MxcLinearNTQuantBf16) { return linear_nt_quant(nparam, params, ndims, shapes, true); }
MXC_AOT(MxcLinearNNQuant) { return linear_nn_quant(nparam, params, ndims, shapes, false); }
MXC_AOT(MxcLinearNNQuantBf16) { return linear_nn_quant(nparam, params, ndims, shapes, true); }
MXC_AOT(MxcLinearNTAdd) { return linear_nt_add(nparam, params, ndims, shapes, dtypes, false); }
MXC_AOT(MxcLinearNTAddBf16) { return linear_nt_add(nparam, params, ndims, shapes, dtypes, true); }

// One element-wise pass over `count` elements, in chunks of 4096 split among threads: `vec(i)` computes the
// elements i .. i + kLanes - 1 with the CPU's vectors, `one(i)` element i (the chunk's tail). Both must do the
// same operations, so that an element's result does not depend on its position.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#elif defined(MXC_EXP8)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 1;
#endif

template <typename Vec, typename One>
void elementwise(int64_t count, Vec vec, One one) {
#pragma omp parallel for schedule(static)
  for (int64_t i0 = 0; i0 < count; i0 += 4096) {
    const int64_t i1 = i0 + 4096 < count ? i0 + 4096 : count;
    int64_t i = i0;
    for (; i + kLanes <= i1; i += kLanes) vec(i);
    for (; i < i1; ++i) one(i);
  }
}

// SwiGLU's elementwise part: out = silu(g) * u = g / (1 + exp(-g)) * u, g and u of one shape, one pass.
MXC_AOT(MxcSwiGLU) {
  if (nparam != 3) return 1;
  const float *g = static_cast<const float *>(params[0]);
  const float *u = static_cast<const float *>(params[1]);
  float *out = static_cast<float *>(params[2]);
  const auto one = [&](int64_t i) { out[i] = g[i] / (1.0f + softmax_exp(-g[i])) * u[i]; };
  elementwise(numel(ndims[0], shapes[0], ndims[0]), [&](int64_t i) {
#if defined(__AVX512F__)
    const __m512 x = _mm512_loadu_ps(g + i);
    const __m512 e = softmax_exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e)),
                                            _mm512_loadu_ps(u + i)));
#elif defined(MXC_EXP8)
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 e = softmax_exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e)),
                                            _mm256_loadu_ps(u + i)));
#else
    one(i);
#endif
  }, one);
  return 0;
}

// The gradient of `MxcSwiGLU` (y = g s u, s = 1 / (1 + exp(-g)) with the forward's exponential): dg = dy u s
// (1 + g (1 - s)) and du = dy g s in one pass over the block, where the composed gradient was nine element-wise
// kernels over [rows, intermediate] (each a pass through memory: the MLP's widest tensors). Inputs g, u, dy fp32
// (same shape); outputs dg, du.
MXC_AOT(MxcSwiGLUGrad) {
  if (nparam != 5) return 1;
  const float *g = static_cast<const float *>(params[0]);
  const float *u = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dg = static_cast<float *>(params[3]);
  float *du = static_cast<float *>(params[4]);
  const auto one = [&](int64_t i) {
    const float s = 1.0f / (1.0f + softmax_exp(-g[i]));
    du[i] = dy[i] * (g[i] * s);
    dg[i] = dy[i] * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
  };
  elementwise(numel(ndims[0], shapes[0], ndims[0]), [&](int64_t i) {
#if defined(__AVX512F__)
    const __m512 c1 = _mm512_set1_ps(1.0f), x = _mm512_loadu_ps(g + i), d = _mm512_loadu_ps(dy + i);
    const __m512 s = _mm512_div_ps(c1, _mm512_add_ps(c1, softmax_exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    _mm512_storeu_ps(du + i, _mm512_mul_ps(d, _mm512_mul_ps(x, s)));
    const __m512 ds = _mm512_mul_ps(s, _mm512_add_ps(c1, _mm512_mul_ps(x, _mm512_sub_ps(c1, s))));
    _mm512_storeu_ps(dg + i, _mm512_mul_ps(_mm512_mul_ps(d, _mm512_loadu_ps(u + i)), ds));
#elif defined(MXC_EXP8)
    const __m256 c1 = _mm256_set1_ps(1.0f), x = _mm256_loadu_ps(g + i), d = _mm256_loadu_ps(dy + i);
    const __m256 s = _mm256_div_ps(c1, _mm256_add_ps(c1, softmax_exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    _mm256_storeu_ps(du + i, _mm256_mul_ps(d, _mm256_mul_ps(x, s)));
    const __m256 ds = _mm256_mul_ps(s, _mm256_add_ps(c1, _mm256_mul_ps(x, _mm256_sub_ps(c1, s))));
    _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(u + i)), ds));
#else
    one(i);
#endif
  }, one);
  return 0;
}

// Fine-tuning's dropout on the LoRA inputs (`weight_products.hash_dropout`): y = x * keep / (1 - p), keep =
// frac(sin(r 12.9898 + c 78.233 + (seed + salt)) 43758.5453) >= p for the element of row r (row_base[sample] + its
// row in the block) and column c. The graph's operations in the graph's order, each rounded to fp32 (this file is
// compiled as ISO C++: no contraction into FMAs), in one pass instead of ten kernels; only sin is libm's
// rather than MindSpore's, whose last-bit differences flip a mask where the fraction lies next to p or an integer
// (about 4 elements in 100,000; tested). Inputs x fp32 [..., cols], seed [1], salt [1], row_base [B, 1],
// p [1] and keep_prob [1] = 1 - p as the graph rounds them; output y like x.
MXC_AOT(MxcHashDropout) {
  if (nparam != 7 || ndims[0] < 1) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float seed_salt = *static_cast<const float *>(params[1]) + *static_cast<const float *>(params[2]);
  const float *row_base = static_cast<const float *>(params[3]);
  const float p = *static_cast<const float *>(params[4]), keep_prob = *static_cast<const float *>(params[5]);
  float *y = static_cast<float *>(params[6]);
  const int64_t cols = shapes[0][ndims[0] - 1], rows = numel(ndims[0], shapes[0], ndims[0] - 1);
  const int64_t samples = numel(ndims[3], shapes[3], ndims[3]);
  if (samples <= 0 || rows % samples != 0) return 1;
  const int64_t per_sample = rows / samples;
  std::vector<float> col_term(cols);
  for (int64_t c = 0; c < cols; ++c) col_term[c] = static_cast<float>(c) * 78.233f;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const float r = row_base[row / per_sample] + static_cast<float>(row % per_sample);
    const float row_term = r * 12.9898f;
    const float *xr = x + row * cols;
    float *yr = y + row * cols;
    for (int64_t c = 0; c < cols; ++c) {
      const float arg = (row_term + col_term[c]) + seed_salt;
      float u = std::sin(arg) * 43758.5453f;
      u = u - std::floor(u);
      yr[c] = (xr[c] * (u >= p ? 1.0f : 0.0f)) / keep_prob;
    }
  }
  return 0;
}

MXC_AOT(MxcLinearNTBias) { return linear_nt_bias(nparam, params, ndims, shapes, dtypes, false, false); }
MXC_AOT(MxcLinearNTBiasBf16) { return linear_nt_bias(nparam, params, ndims, shapes, dtypes, true, false); }
MXC_AOT(MxcLinearNTBiasResidual) { return linear_nt_bias(nparam, params, ndims, shapes, dtypes, false, false); }
MXC_AOT(MxcLinearNTBiasResidualBf16) { return linear_nt_bias(nparam, params, ndims, shapes, dtypes, true, false); }
MXC_AOT(MxcLinearNTBiasQuickGelu) { return linear_nt_bias(nparam, params, ndims, shapes, dtypes, false, true); }
MXC_AOT(MxcLinearNTBiasQuickGeluBf16) { return linear_nt_bias(nparam, params, ndims, shapes, dtypes, true, true); }
MXC_AOT(MxcHeadCrossEntropy) { return head_cross_entropy(nparam, params, ndims, shapes, dtypes, false); }
MXC_AOT(MxcHeadCrossEntropyBf16) { return head_cross_entropy(nparam, params, ndims, shapes, dtypes, true); }

// Sum of n values in 16 partial sums (the compiler keeps them in vectors), then the tail in order.
template <typename F>
inline float sum16(int64_t n, F value) {
  float lanes[16] = {0.0f};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += value(j + l);
  float s = 0.0f;
  for (int l = 0; l < 16; ++l) s += lanes[l];
  for (; j < n; ++j) s += value(j);
  return s;
}

// A norm's weight or bias [H], fp32 or bf16, as fp32.
static std::vector<float> norm_param(const void *p, bool bf16, int64_t h) {
  std::vector<float> out(h);
  for (int64_t j = 0; j < h; ++j)
    out[j] = bf16 ? bf16_to_f32(static_cast<const uint16_t *>(p)[j]) : static_cast<const float *>(p)[j];
  return out;
}

// A norm gradient's sums over rows: `row(r, acc)` handles row r and adds its terms to `acc` [width]; the rows go in
// blocks of 64 in threads, each block's sums in row order, then the blocks in order into `sums` [width]: the same
// values whatever the thread count.
template <typename Row>
void rows_in_blocks(int64_t rows, int64_t width, Row row, float *sums) {
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
  std::vector<float> partial(static_cast<size_t>(blocks * width), 0.0f);
#pragma omp parallel for schedule(static) if (blocks > 1)
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t r = blk * kBlock; r < rows && r < (blk + 1) * kBlock; ++r) row(r, partial.data() + blk * width);
  for (int64_t j = 0; j < width; ++j) sums[j] = 0.0f;
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t j = 0; j < width; ++j) sums[j] += partial[blk * width + j];
}

// 1 / sqrt(mean(x^2) + eps) of one row of h values: RMSNorm's scale, the same in the forward and the gradient.
inline float rms_inverse(const float *xr, int64_t h, float eps) {
  float ss = 0.0f;
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; j + 16 <= h; j += 16) {
    const __m512 v = _mm512_loadu_ps(xr + j);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  ss = _mm512_reduce_add_ps(acc);
#endif
  for (; j < h; ++j) ss += xr[j] * xr[j];
  return 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
}

// InternLM2's RMSNorm of rows of x [..., H] (fp32) with weight [H] (fp32 or bf16), eps [1]: per row
// r = 1 / sqrt(mean(x^2) + eps), y = w (x r), upstream's order, in one pass of reads and one of writes.
MXC_AOT(MxcRmsNorm) {
  if (nparam != 4 || ndims[1] != 1) return 1;
  const int64_t h = shapes[0][ndims[0] - 1];
  if (shapes[1][0] != h) return 1;
  const int64_t rows = numel(ndims[0], shapes[0], ndims[0] - 1);
  const float *x = static_cast<const float *>(params[0]);
  const std::vector<float> w = norm_param(params[1], is_bf16(dtypes[1]), h);
  const float eps = *static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[3]);
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * h;
    float *yr = out + r * h;
    const float inv = rms_inverse(xr, h, eps);
    for (int64_t j = 0; j < h; ++j) yr[j] = w[j] * (xr[j] * inv);
  }
  return 0;
}

// The gradient of `MxcRmsNorm` for dy: inputs x [..., H] fp32, weight [H] fp32 or bf16, eps [1], dy (x's shape);
// outputs dx (x's shape) and dw [H] fp32. Per row, with r the forward's scale (`rms_inverse`) and g = w dy:
// dx = r g - x r^3 mean(g x); dw = the sum over rows of dy x r. One pass over each row where the same formula
// written with MindSpore ops was ten element-wise kernels and two reductions over [rows, H]. dw adds the rows in
// blocks of 64 (each block's sum in row order, then the blocks in order): the same value whatever the thread count.
MXC_AOT(MxcRmsNormGrad) {
  if (nparam != 6 || ndims[1] != 1) return 1;
  const int64_t h = shapes[0][ndims[0] - 1];
  if (shapes[1][0] != h || numel(ndims[3], shapes[3], ndims[3]) != numel(ndims[0], shapes[0], ndims[0])) return 1;
  const int64_t rows = numel(ndims[0], shapes[0], ndims[0] - 1);
  const float *x = static_cast<const float *>(params[0]);
  const float eps = *static_cast<const float *>(params[2]);
  const float *dy = static_cast<const float *>(params[3]);
  float *dx = static_cast<float *>(params[4]);
  float *dw = static_cast<float *>(params[5]);
  const std::vector<float> w = norm_param(params[1], is_bf16(dtypes[1]), h);
  const float *wp = w.data();
  rows_in_blocks(rows, h, [&](int64_t r, float *pw) {
    const float *xr = x + r * h, *dr = dy + r * h;
    float *dxr = dx + r * h;
    const float inv = rms_inverse(xr, h, eps);
    const float gx = sum16(h, [dr, wp, xr](int64_t j) { return dr[j] * wp[j] * xr[j]; });
    const float c = inv * inv * inv * (gx / static_cast<float>(h));
    for (int64_t j = 0; j < h; ++j) {
      dxr[j] = inv * (dr[j] * wp[j]) - xr[j] * c;
      pw[j] += dr[j] * (xr[j] * inv);
    }
  }, dw);
  return 0;
}

// One row's mean and 1 / sqrt(variance + eps) (two passes: the mean, then the squared deviations from it).
inline void layer_norm_stats(const float *xr, int64_t h, float eps, float *mean, float *rstd) {
  const float m = sum16(h, [xr](int64_t j) { return xr[j]; }) / static_cast<float>(h);
  const float var = sum16(h, [xr, m](int64_t j) { return (xr[j] - m) * (xr[j] - m); }) / static_cast<float>(h);
  *mean = m;
  *rstd = 1.0f / std::sqrt(var + eps);
}

// LayerNorm (the ViT's) of rows of x [..., H] fp32 with weight and bias [H] (fp32 or bf16), eps [1]: per row
// y = (x - mean) rstd w + b. One pass of writes; MindSpore's CPU LayerNorm took 2.4 ms for 1,601 rows of 256.
MXC_AOT(MxcLayerNorm) {
  if (nparam != 5 || ndims[1] != 1 || ndims[2] != 1) return 1;
  const int64_t h = shapes[0][ndims[0] - 1];
  if (shapes[1][0] != h || shapes[2][0] != h) return 1;
  const int64_t rows = numel(ndims[0], shapes[0], ndims[0] - 1);
  const float *x = static_cast<const float *>(params[0]);
  const std::vector<float> w = norm_param(params[1], is_bf16(dtypes[1]), h);
  const std::vector<float> b = norm_param(params[2], is_bf16(dtypes[2]), h);
  const float eps = *static_cast<const float *>(params[3]);
  float *out = static_cast<float *>(params[4]);
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * h;
    float *yr = out + r * h;
    float mean, rstd;
    layer_norm_stats(xr, h, eps, &mean, &rstd);
    for (int64_t j = 0; j < h; ++j) yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
  }
  return 0;
}

// The gradient of `MxcLayerNorm` for dy: inputs x, weight, bias, eps, dy; outputs dx (x's shape), dw and db [H]
// fp32. Per row, with xh = (x - mean) rstd and g = w dy: dx = rstd (g - mean(g) - xh mean(g xh)); dw and db are the
// sums over rows of dy xh and dy, in blocks of 64 rows added in order (the same whatever the thread count).
MXC_AOT(MxcLayerNormGrad) {
  if (nparam != 8 || ndims[1] != 1 || ndims[2] != 1) return 1;
  const int64_t h = shapes[0][ndims[0] - 1];
  if (shapes[1][0] != h || shapes[2][0] != h ||
      numel(ndims[4], shapes[4], ndims[4]) != numel(ndims[0], shapes[0], ndims[0]))
    return 1;
  const int64_t rows = numel(ndims[0], shapes[0], ndims[0] - 1);
  const float *x = static_cast<const float *>(params[0]);
  const std::vector<float> w = norm_param(params[1], is_bf16(dtypes[1]), h);
  const float eps = *static_cast<const float *>(params[3]);
  const float *dy = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[5]);
  float *dw = static_cast<float *>(params[6]);
  float *db = static_cast<float *>(params[7]);
  const float *wp = w.data();
  std::vector<float> sums(static_cast<size_t>(2 * h));  // dw then db
  rows_in_blocks(rows, 2 * h, [&](int64_t r, float *pw) {
    thread_local std::vector<float> buf;
    float *xh = scratch(buf, h);
    const float *xr = x + r * h, *dr = dy + r * h;
    float *dxr = dx + r * h, *pb = pw + h;
    float mean, rstd;
    layer_norm_stats(xr, h, eps, &mean, &rstd);
    for (int64_t j = 0; j < h; ++j) xh[j] = (xr[j] - mean) * rstd;
    const float gm = sum16(h, [dr, wp](int64_t j) { return dr[j] * wp[j]; }) / static_cast<float>(h);
    const float gx = sum16(h, [dr, wp, xh](int64_t j) { return dr[j] * wp[j] * xh[j]; }) / static_cast<float>(h);
    for (int64_t j = 0; j < h; ++j) {
      dxr[j] = rstd * (dr[j] * wp[j] - gm - xh[j] * gx);
      pw[j] += dr[j] * xh[j];
      pb[j] += dr[j];
    }
  }, sums.data());
  std::copy(sums.begin(), sums.begin() + h, dw);
  std::copy(sums.begin() + h, sums.end(), db);
  return 0;
}

// RoPE on the packed q/k/v of the decoder's wqkv output and their split into heads-first tensors, in one pass
// (`weight_products.rope_split`): qkv [B, N, KV, G + 2, D] (per kv group G query heads, the key, the value),
// cos / sin [B, N, 1, G + 2, D] (`rope.packed_rope`: rotate_half's sign folded into sin, cos 1 and sin 0 on the
// value slot) -> q [B, KV G, N, D] (head h G + j = query j of group h), k [B, KV, N, D], v [B, KV, N, D], every
// slot y = x cos + swap_halves(x) sin. The two products and the sum are rounded one by one, never fused into an
// FMA: bit for bit what the portable path's separate Mul, Gather, Mul and Add kernels compute, and so
// upstream's apply_rotary_pos_emb. g++ contracts a * b + c * d into an FMA at -O3 in every C++ mode, also
// written with intrinsics; these two functions are compiled with contraction off (the rest of the library
// keeps it: its sums are not meant to match another implementation's roundings).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
inline void rotate_halves(const float *x, const float *c, const float *s, float *y, int64_t half) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= half; i += 16) {
    const __m512 lo = _mm512_loadu_ps(x + i), hi = _mm512_loadu_ps(x + half + i);
    _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_mul_ps(lo, _mm512_loadu_ps(c + i)),
                                          _mm512_mul_ps(hi, _mm512_loadu_ps(s + i))));
    _mm512_storeu_ps(y + half + i, _mm512_add_ps(_mm512_mul_ps(hi, _mm512_loadu_ps(c + half + i)),
                                                 _mm512_mul_ps(lo, _mm512_loadu_ps(s + half + i))));
  }
#endif
  for (; i < half; ++i) {
    const float lo = x[i], hi = x[half + i];
    const float a = lo * c[i], b = hi * s[i];
    y[i] = a + b;
    const float e = hi * c[half + i], f = lo * s[half + i];
    y[half + i] = e + f;
  }
}

MXC_AOT(MxcRopeSplit) {
  if (nparam != 6 || ndims[0] != 5 || ndims[1] != 5 || ndims[2] != 5) return 1;
  const int64_t b = shapes[0][0], n = shapes[0][1], kv = shapes[0][2], slots = shapes[0][3], d = shapes[0][4];
  if (slots < 2 || d % 2 != 0) return 1;
  for (int i = 0; i < 5; ++i) {
    if (shapes[1][i] != (i == 2 ? 1 : shapes[0][i]) || shapes[2][i] != shapes[1][i]) return 1;
  }
  const int64_t g = slots - 2, half = d / 2;
  const float *x = static_cast<const float *>(params[0]);
  const float *cos = static_cast<const float *>(params[1]);
  const float *sin = static_cast<const float *>(params[2]);
  float *q = static_cast<float *>(params[3]);
  float *k = static_cast<float *>(params[4]);
  float *v = static_cast<float *>(params[5]);
  // One (batch, position) row per iteration: its KV (G + 2) D inputs are contiguous, each of its heads goes to
  // its own D-float row of q, k or v; the row's cos / sin serve every kv group.
#pragma omp parallel for schedule(static) if (b * n > 1)
  for (int64_t r = 0; r < b * n; ++r) {
    const int64_t bi = r / n, t = r % n;
    const float *xr = x + r * kv * slots * d, *cr = cos + r * slots * d, *sr = sin + r * slots * d;
    for (int64_t h = 0; h < kv; ++h) {
      for (int64_t j = 0; j < slots; ++j) {
        float *y = j < g ? q + ((bi * kv * g + h * g + j) * n + t) * d : (j == g ? k : v) + ((bi * kv + h) * n + t) * d;
        rotate_halves(xr + (h * slots + j) * d, cr + j * d, sr + j * d, y, half);
      }
    }
  }
  return 0;
}

// torch.optim.AdamW's single-tensor update of n fp32 values in place (`finetune/optim.py`, `_adamw_update` in numpy
// is the same sequence): p *= decay; m += omb1 (g - m); v = v beta2 + omb2 g g; p += neg_step m / (sqrt(v) / bc2_sqrt
// + eps). Each operation rounded on its own (contraction off, as above): bit for bit numpy's and torch's values.
// In place, in threads: numpy's version made a temporary per operation, and a temporary of the release's head or
// embedding (190 MB at the mid size) came as fresh pages each time: ~0.6-2.9 s a step for one such tensor.
extern "C" void MxcAdamWStep(float *p, float *m, float *v, const float *g, int64_t n, float decay, float omb1,
                             float beta2, float omb2, float bc2_sqrt, float eps, float neg_step) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float pi = p[i] * decay;
    const float mi = m[i] + omb1 * (g[i] - m[i]);
    const float vi = v[i] * beta2 + omb2 * (g[i] * g[i]);
    const float denom = std::sqrt(vi) / bc2_sqrt + eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + neg_step * (mi / denom);
  }
}
#pragma GCC pop_options

// The sum of squares of n fp32 values (a gradient's squared 2-norm), in double: 4096-value blocks (8 partial sums
// each) in threads, then the blocks in order: the same value whatever the thread count. No temporary (numpy's
// square made one of the tensor's size).
extern "C" double MxcSumSquares(const float *x, int64_t n) {
  const int64_t blocks = (n + 4095) / 4096;
  std::vector<double> part(static_cast<size_t>(blocks));
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    double acc[8] = {0.0};
    const int64_t end = std::min(n, (b + 1) * 4096);
    int64_t i = b * 4096;
    for (; i + 8 <= end; i += 8)
      for (int l = 0; l < 8; ++l) acc[l] += static_cast<double>(x[i + l]) * x[i + l];
    for (; i < end; ++i) acc[0] += static_cast<double>(x[i]) * x[i];
    part[b] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) total += part[b];
  return total;
}

MXC_AOT(MxcLinearNN) { return linear_nn(nparam, params, ndims, shapes, dtypes, false); }
MXC_AOT(MxcLinearNNBf16) { return linear_nn(nparam, params, ndims, shapes, dtypes, true); }
MXC_AOT(MxcLinearTN) { return linear_tn(nparam, params, ndims, shapes, dtypes, false); }
MXC_AOT(MxcLinearTNBf16) { return linear_tn(nparam, params, ndims, shapes, dtypes, true); }
MXC_AOT(MxcBatchNT) { return batched(nparam, params, ndims, shapes, Batched::NT, false); }
MXC_AOT(MxcBatchNTBf16) { return batched(nparam, params, ndims, shapes, Batched::NT, true); }
MXC_AOT(MxcBatchNN) { return batched(nparam, params, ndims, shapes, Batched::NN, false); }
MXC_AOT(MxcBatchNNBf16) { return batched(nparam, params, ndims, shapes, Batched::NN, true); }
MXC_AOT(MxcBatchTN) { return batched(nparam, params, ndims, shapes, Batched::TN, false); }
MXC_AOT(MxcBatchTNBf16) { return batched(nparam, params, ndims, shapes, Batched::TN, true); }

// q, k, v, [mask,] divisor[1] -> out (see `attention`).
// q [B, H, R, D], k / v [B, H, S, D], optional mask [B, 1, N, S], divisor [1] -> [B, H, R, D]; or, with
// `tokens` ("BSND", no mask), q / out [B, R, H, D] and k / v [B, S, H, D].
int attention_op(int nparam, void **params, int *ndims, int64_t **shapes, bool bf16, bool tokens = false) {
  const bool masked = nparam == 6;
  if ((nparam != 5 && nparam != 6) || ndims[0] != 4 || ndims[1] != 4 || (tokens && masked)) return 1;
  const int64_t batch = shapes[0][0], d = shapes[0][3];
  const int64_t heads = shapes[0][tokens ? 2 : 1], rows = shapes[0][tokens ? 1 : 2];
  const int64_t slots = shapes[1][tokens ? 1 : 2];
  const int64_t n = masked ? shapes[3][2] : rows;
  const float divisor = *static_cast<const float *>(params[masked ? 4 : 3]);
  const Layout ql = tokens ? Layout{rows * heads * d, d, heads * d} : Layout{heads * rows * d, rows * d, d};
  const Layout kl = tokens ? Layout{slots * heads * d, d, heads * d} : Layout{heads * slots * d, slots * d, d};
  attention(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
            static_cast<const float *>(params[2]), masked ? static_cast<const float *>(params[3]) : nullptr, divisor,
            static_cast<float *>(params[nparam - 1]), batch, heads, rows, n, slots, d, bf16, ql, kl);
  return 0;
}

// q, k, v, [mask,] divisor[1], dout -> dq, dk, dv (see `attention_grad`; shapes and layouts as `attention_op`).
int attention_grad_op(int nparam, void **params, int *ndims, int64_t **shapes, bool bf16, bool tokens = false) {
  const bool masked = nparam == 9;
  if ((nparam != 8 && nparam != 9) || ndims[0] != 4 || ndims[1] != 4 || (tokens && masked)) return 1;
  const int64_t batch = shapes[0][0], d = shapes[0][3];
  const int64_t heads = shapes[0][tokens ? 2 : 1], rows = shapes[0][tokens ? 1 : 2];
  const int64_t slots = shapes[1][tokens ? 1 : 2];
  const int64_t n = masked ? shapes[3][2] : rows;
  const int in = masked ? 6 : 5;  // inputs; then dq, dk, dv
  const float divisor = *static_cast<const float *>(params[in - 2]);
  const Layout ql = tokens ? Layout{rows * heads * d, d, heads * d} : Layout{heads * rows * d, rows * d, d};
  const Layout kl = tokens ? Layout{slots * heads * d, d, heads * d} : Layout{heads * slots * d, slots * d, d};
  attention_grad(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                 static_cast<const float *>(params[2]), masked ? static_cast<const float *>(params[3]) : nullptr,
                 divisor, static_cast<const float *>(params[in - 1]), static_cast<float *>(params[in]),
                 static_cast<float *>(params[in + 1]), static_cast<float *>(params[in + 2]), batch, heads, rows, n,
                 slots, d, bf16, ql, kl);
  return 0;
}

MXC_AOT(MxcAttentionGrad) { return attention_grad_op(nparam, params, ndims, shapes, false); }
MXC_AOT(MxcAttentionGradBf16) { return attention_grad_op(nparam, params, ndims, shapes, true); }
MXC_AOT(MxcAttentionTokensGrad) { return attention_grad_op(nparam, params, ndims, shapes, false, true); }
MXC_AOT(MxcAttentionTokensGradBf16) { return attention_grad_op(nparam, params, ndims, shapes, true, true); }

MXC_AOT(MxcAttention) { return attention_op(nparam, params, ndims, shapes, false); }
MXC_AOT(MxcAttentionBf16) { return attention_op(nparam, params, ndims, shapes, true); }
MXC_AOT(MxcAttentionTokens) { return attention_op(nparam, params, ndims, shapes, false, true); }
MXC_AOT(MxcAttentionTokensBf16) { return attention_op(nparam, params, ndims, shapes, true, true); }

// For tests and benchmarks without MindSpore: C[M, N] = A[M, K] W[N, K]^T with W fp32 or bf16.
extern "C" int MxcGemmNT(const float *a, const void *w, int w_bf16, float *c, int64_t m, int64_t n, int64_t k,
                         int bf16_products) {
  View av{a, k, 1, false};
  View bv{w, 1, k, w_bf16 != 0};
  gemm(av, bv, c, n, m, n, k, bf16_products != 0);
  return 0;
}

// For tests and benchmarks without MindSpore: dX[M, K] = dY[M, N] W with W [N, K] fp32 or bf16 (a linear's input
// gradient, `linear_nn`).
extern "C" int MxcGemmNN(const float *dy, const void *w, int w_bf16, float *dx, int64_t m, int64_t n, int64_t k,
                         int bf16_products) {
  gemm(View{dy, n, 1, false}, View{w, k, 1, w_bf16 != 0}, dx, k, m, k, n, bf16_products != 0);
  return 0;
}

// Whether bf16 products of more than a few rows go to oneDNN: -1 = not built with it; 0 / 1 = built
// with it and off / on. `enable` >= 0 sets it (tests compare both paths on the same inputs).
extern "C" int MxcOnednn(int enable) {
#ifdef MXC_WITH_ONEDNN
  if (enable >= 0) g_onednn_enabled = enable ? 1 : 0;
  return onednn_enabled() ? 1 : 0;
#else
  (void)enable;
  return -1;
#endif
}

// For tests and benchmarks without MindSpore: C[M, N] = A[M, K] W^T with W quantized (bits 8 or 4).
extern "C" int MxcGemmNTQuant(const float *a, const void *q, const float *scales, const uint8_t *zeros, int bits,
                              float *c, int64_t m, int64_t n, int64_t k, int64_t group, int bf16_products) {
  View b{q, 1, k, false};
  if (!set_quant(b, scales, zeros, bits, k, group)) return 1;
  gemm(View{a, k, 1, false}, b, c, n, m, n, k, bf16_products != 0);
  return 0;
}

// For tests without MindSpore: dX[M, K] = dY[M, N] W with W [N, K] quantized (bits 8 or 4).
extern "C" int MxcGemmNNQuant(const float *dy, const void *q, const float *scales, const uint8_t *zeros, int bits,
                              float *dx, int64_t m, int64_t n, int64_t k, int64_t group, int bf16_products) {
  View b{q, k, 1, false};
  b.qrows = true;
  if (!set_quant(b, scales, zeros, bits, k, group)) return 1;
  gemm(View{dy, n, 1, false}, b, dx, k, m, k, n, bf16_products != 0);
  return 0;
}

// The products' floating-point operations since the last reset (`g_flops`); `reset` != 0 sets the count to 0 after
// reading it.
extern "C" int64_t MxcGemmFlops(int reset) {
  return reset ? g_flops.exchange(0, std::memory_order_relaxed) : g_flops.load(std::memory_order_relaxed);
}

// What the library was built with: 2 = AVX-512 with native bf16 products, 1 = AVX-512, 3 = AVX2, 0 = portable.
extern "C" int MxcGemmIsa() {
#if defined(__AVX512F__)
  return kNativeBf16 ? 2 : 1;
#elif defined(__AVX2__) && defined(__FMA__)
  return 3;
#else
  return 0;
#endif
}
