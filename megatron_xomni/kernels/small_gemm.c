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
#include <stdlib.h>
#include <string.h>

#include "simd.h"

/* Weight rows stream from DRAM when the layers outgrow L3: the first tile of a pair prefetches
 * the rows PF ahead (2-32 measured on a 44 MB layer stack: 4-16 into L1 alike, 8 kept). */
#ifndef PFHINT
#define PFHINT _MM_HINT_T0
#endif
#ifndef PF
#define PF 8
#endif

int xomni_small_gemm_abi(void) { return 3; }

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


/* ---- 9-32 rows: the broadcast form ------------------------------------------------------------
 * out^T[n, rows] += w[n, k:k+2] * x^T[k:k+2, rows]: one 64-bit broadcast puts a weight row's pair
 * (k, k+1) in every lane pair, and V vectors hold the rows' pairs (8 rows each, lane 2m + kk =
 * x[m, k + kk]; V = 2 for <= 16 rows, 4 for <= 32), so each broadcast feeds V FMAs and no reduction
 * runs in the K loop (the two halves of a lane pair are added once per output). 24 / V weight rows
 * stream side by side, prefetched two blocks ahead. Hot, 16 x 512 x 1024: 214 GFLOP/s vs the
 * dot-product tiles' 183; in a 4-layer decode stack whose weights stream from DRAM (hidden 512, 16
 * rows) 1.9 ms per step vs oneDNN's 3.0-3.2 and the tiles' 3.7-4.3 (benchmarks/RESULTS.md). At <= 8
 * rows half of each FMA would be padding: the dot-product tiles stay faster there. */
/* In-register transpose: afterwards r[i] lane j holds what r[j] lane i held (4 block-swap
 * stages: at block size h, row i's upper half trades places with row i + h's lower half). */
static inline void transpose16(__m512 r[16]) {
  for (int h = 8; h >= 1; h >>= 1) {
    int lo[16], hi[16];
    for (int j = 0; j < 16; j++) {
      lo[j] = (j & h) ? 16 + j - h : j;
      hi[j] = (j & h) ? 16 + j : j + h;
    }
    const __m512i ilo = _mm512_loadu_si512(lo), ihi = _mm512_loadu_si512(hi);
    for (int i = 0; i < 16; i++) {
      if (i & h) continue;
      const __m512 a = r[i], b = r[i + h];
      r[i] = _mm512_permutex2var_ps(a, ilo, b);
      r[i + h] = _mm512_permutex2var_ps(a, ihi, b);
    }
  }
}

/* w[k], w[k + 1] in every lane pair (one vbroadcastsd; memcpy: no aliasing or alignment claim). */
static inline __m512 pair_of(const float* w) {
  double d;
  memcpy(&d, w, sizeof d);
  return _mm512_castpd_ps(_mm512_set1_pd(d));
}

/* out[16 h + i] lane m = sum over K of w[i, k] x[16 h + m, k] for nb weight rows (<= 24 / V) and
 * 8 V rows of x (V vectors of lane pairs: V = 2 for 16 rows, 4 for 32); pf: the rows PFD ahead. */
static inline __attribute__((always_inline)) void pair_block(const int V, const int nb, const float* xt,
    const float* w, int64_t ldw, int64_t K, __m512 out[32], const float* pf, int npf) {
  __m512 acc[12][4];
  for (int i = 0; i < 24 / V; i++)
    for (int v = 0; v < V; v++) acc[i][v] = _mm512_setzero_ps();
  const int64_t pairs = K >> 1;
  __m512 xv[4];
  for (int64_t kp = 0; kp < pairs; kp++) {
    for (int v = 0; v < V; v++) xv[v] = _mm512_load_ps(xt + 16 * V * kp + 16 * v);
    if ((kp & 7) == 0 && pf)
      for (int i = 0; i < npf; i++) _mm_prefetch((const char*)(pf + i * ldw + 2 * kp), _MM_HINT_T0);
    for (int i = 0; i < nb; i++) {
      const __m512 wv = pair_of(w + i * ldw + 2 * kp);
      for (int v = 0; v < V; v++) acc[i][v] = _mm512_fmadd_ps(wv, xv[v], acc[i][v]);
    }
  }
  if (K & 1) { /* the last k alone: x^T's other lane of each pair is zero there */
    for (int v = 0; v < V; v++) xv[v] = _mm512_load_ps(xt + 16 * V * pairs + 16 * v);
    for (int i = 0; i < nb; i++) {
      const __m512 wv = _mm512_set1_ps(w[i * ldw + 2 * pairs]);
      for (int v = 0; v < V; v++) acc[i][v] = _mm512_fmadd_ps(wv, xv[v], acc[i][v]);
    }
  }
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int i = 0; i < 32; i++) out[i] = _mm512_setzero_ps();
  for (int i = 0; i < nb; i++)
    for (int h = 0; h < V / 2; h++) { /* add each lane pair, then rows 0-7 and 8-15 into one vector */
      const __m512 a = _mm512_add_ps(acc[i][2 * h], _mm512_permute_ps(acc[i][2 * h], 0xB1));
      const __m512 b = _mm512_add_ps(acc[i][2 * h + 1], _mm512_permute_ps(acc[i][2 * h + 1], 0xB1));
      out[16 * h + i] = _mm512_permutex2var_ps(a, even, b);
    }
}

/* x^T in lane pairs, 64-byte aligned: one buffer per thread, grown to the widest K seen
 * (32 * K floats: 64 KiB at K = 512); kept for the process, like a library's scratch pad. */
static __thread float* xt_buf;
static __thread int64_t xt_cap;

static int gemm_pairs(const int V, const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias,
                      float* out, int64_t ldo, int64_t M, int64_t N, int64_t K) {
  const int nbmax = 24 / V;               /* weight rows per block: 12 (16 rows of x) or 6 (32) */
  const int64_t pfd = 2 * nbmax;          /* prefetch two blocks ahead */
  float* xt = scratch(&xt_buf, &xt_cap, 8 * V * ((K + 15) & ~(int64_t)15));
  if (!xt) return -2;
  __m512 r[32];
  /* rows 0-7 / 8-15 of columns k0 + j, k0 + j + 1 as lane pairs */
  const __m512i lo_rows = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_rows = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int kb = K - k0 < 16 ? (int)(K - k0) : 16;
    const __mmask16 km = (__mmask16)((1u << kb) - 1u);
    for (int h = 0; h < V / 2; h++) {
      __m512* t = r + 16 * h;
      for (int m = 0; m < 16; m++)
        t[m] = 16 * h + m < M ? _mm512_maskz_loadu_ps(km, x + (16 * h + m) * ldx + k0) : _mm512_setzero_ps();
      transpose16(t); /* t[j] lane m = x[16 h + m, k0 + j], zero past K */
      for (int j = 0; j < kb; j += 2) {
        float* dst = xt + 16 * V * ((k0 + j) >> 1) + 32 * h;
        _mm512_store_ps(dst, _mm512_permutex2var_ps(t[j], lo_rows, t[j + 1]));
        _mm512_store_ps(dst + 16, _mm512_permutex2var_ps(t[j], hi_rows, t[j + 1]));
      }
    }
  }
  for (int64_t n0 = 0; n0 < N; n0 += nbmax) {
    const int nb = N - n0 < nbmax ? (int)(N - n0) : nbmax;
    const int64_t ahead = n0 + pfd;
    const float* pf = ahead < N ? w + ahead * ldw : 0;
    const int npf = pf ? (N - ahead < nbmax ? (int)(N - ahead) : nbmax) : 0;
    if (nb == nbmax) pair_block(V, 24 / V, xt, w + n0 * ldw, ldw, K, r, pf, npf);
    else pair_block(V, nb, xt, w + n0 * ldw, ldw, K, r, pf, npf);
    const __mmask16 nm = (__mmask16)((1u << nb) - 1u);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(nm, bias + n0) : _mm512_setzero_ps();
    for (int h = 0; h < V / 2; h++) {
      transpose16(r + 16 * h); /* r[16 h + m] lane i = out[16 h + m, n0 + i] */
      for (int m = 0; m < 16 && 16 * h + m < M; m++)
        _mm512_mask_storeu_ps(out + (16 * h + m) * ldo + n0, nm, _mm512_add_ps(r[16 * h + m], bv));
    }
  }
  return 0;
}

int xomni_small_gemm_bcast(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias,
                           float* out, int64_t ldo, int64_t M, int64_t N, int64_t K) {
  if (M < 1 || M > 32) return -1;
  return M <= 16 ? gemm_pairs(2, x, ldx, w, ldw, bias, out, ldo, M, N, K)
                 : gemm_pairs(4, x, ldx, w, ldw, bias, out, ldo, M, N, K);
}
