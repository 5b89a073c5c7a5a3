/* out[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]) in fp32 for few rows (a decode step), AVX-512.
 *
 * Why: oneDNN's dense inner product reorders the whole weight into its blocked layout on every
 * call, and MKL's sgemm takes its AVX2 path on AMD CPUs; with 8-32 rows both run at 30-60 % of
 * the core's FMA peak on decode shapes (benchmarks/RESULTS.md). Reading the weight rows where they
 * are, as dot products, needs no reorder and no copy of the parameter.
 *
 * Tile: 8 rows of x by 2 rows of w, 16 zmm accumulators over K in 16-float chunks (8 FMAs per
 * w load pair, FMA-bound); the 16 partial vectors of a tile are reduced by one transpose-and-add
 * tree. Rows are taken in chunks of 16 (two tiles) so that a chunk's activations stay in L1 while
 * the weight streams once per chunk. A K tail uses masked loads, an odd N reuses the last row.
 * Summation order differs from MKL/oneDNN (fp32 rounding only).
 */
#include <immintrin.h>
#include <stdint.h>

/* Weight rows stream from DRAM when the layers outgrow L3: the first tile of a pair prefetches
 * the rows PF ahead (2-32 measured on a 44 MB layer stack: 4-16 into L1 alike, 8 kept). */
#ifndef PFHINT
#define PFHINT _MM_HINT_T0
#endif
#ifndef PF
#define PF 8
#endif

int xomni_small_gemm_abi(void) { return 1; }

/* v[q] -> one vector whose lane q is the sum of v[q]'s 16 lanes. */
static inline __m512 reduce16(__m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; i++)
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; i++)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; i++)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  __m512 s = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
  /* the tree leaves v[4i + j]'s sum in lane 4j + i */
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, s);
}

/* One tile: MT (compile-time after inlining) rows of x against w rows n0 and n0 + 1. */
static inline __attribute__((always_inline)) void tile(
    const int MT, const float* x, int64_t ldx, const float* w0, const float* w1, int64_t K,
    __mmask16 tail, float* out, int64_t ldo, int64_t n0, int two, const float* bias, int first,
    const float* pf, int64_t ldpf) {
  __m512 acc[16];
  for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
  const int64_t kfull = K & ~(int64_t)15;
  for (int64_t k = 0; k < kfull; k += 16) {
    __m512 a0 = _mm512_loadu_ps(w0 + k), a1 = _mm512_loadu_ps(w1 + k);
    if (pf) {
      _mm_prefetch((const char*)(pf + k), PFHINT);
      _mm_prefetch((const char*)(pf + ldpf + k), PFHINT);
    }
    for (int m = 0; m < MT; m++) {
      __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      acc[2 * m] = _mm512_fmadd_ps(xv, a0, acc[2 * m]);
      acc[2 * m + 1] = _mm512_fmadd_ps(xv, a1, acc[2 * m + 1]);
    }
  }
  if (tail) {
    __m512 a0 = _mm512_maskz_loadu_ps(tail, w0 + kfull), a1 = _mm512_maskz_loadu_ps(tail, w1 + kfull);
    for (int m = 0; m < MT; m++) {
      __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * ldx + kfull);
      acc[2 * m] = _mm512_fmadd_ps(xv, a0, acc[2 * m]);
      acc[2 * m + 1] = _mm512_fmadd_ps(xv, a1, acc[2 * m + 1]);
    }
  }
  float s[16];
  _mm512_storeu_ps(s, reduce16(acc));
  const float b0 = bias ? bias[n0] : 0.0f, b1 = (bias && two) ? bias[n0 + 1] : 0.0f;
  for (int m = 0; m < MT; m++) {
    float* o = out + m * ldo + n0;
    if (first) {
      o[0] = s[2 * m] + b0;
      if (two) o[1] = s[2 * m + 1] + b1;
    } else {
      o[0] += s[2 * m];
      if (two) o[1] += s[2 * m + 1];
    }
  }
}

#define TILE(MT) tile(MT, xm, ldx, w0, w1, kb, tail, om, ldo, n0, two, first ? bias : 0, first, \
                      m0 == c0 && n0 + PF + 1 < N ? w0 + PF * ldw : 0, ldw)

/* K is taken in blocks of KB floats (the second and later blocks add to out) so that a 16-row
 * chunk of activations, 16 x KB floats = 32 KiB, stays in L1 for wide inputs (the MLP's fc2). */
#define KB 512

void xomni_small_gemm(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias,
                      float* out, int64_t ldo, int64_t M, int64_t N, int64_t K) {
  for (int64_t k0 = 0; k0 < K; k0 += KB) {
    const int64_t kb = K - k0 < KB ? K - k0 : KB;
    const __mmask16 tail = (__mmask16)((1u << (kb & 15)) - 1u);
    const int first = k0 == 0;
    for (int64_t c0 = 0; c0 < M; c0 += 16) {
      const int64_t cend = M < c0 + 16 ? M : c0 + 16;
      for (int64_t n0 = 0; n0 < N; n0 += 2) {
        const int two = n0 + 1 < N;
        const float* w0 = w + n0 * ldw + k0;
        const float* w1 = two ? w0 + ldw : w0;
        for (int64_t m0 = c0; m0 < cend; m0 += 8) {
          const float* xm = x + m0 * ldx + k0;
          float* om = out + m0 * ldo;
          switch (cend - m0 < 8 ? cend - m0 : 8) {
            case 8: TILE(8); break;
            case 7: TILE(7); break;
            case 6: TILE(6); break;
            case 5: TILE(5); break;
            case 4: TILE(4); break;
            case 3: TILE(3); break;
            case 2: TILE(2); break;
            default: TILE(1); break;
          }
        }
      }
    }
  }
}
