/* One decode step's attention over a static KV cache, fused, in fp32, AVX-512: RoPE on the new
 * queries and key, the key and value written into the cache, and for every query its softmax over
 * the cached positions and the weighted sum of the cached values.
 *
 * Why: a decode step's attention is a few small products per KV group. As separate torch ops
 * (RoPE's roll and products, cache writes, two batched products or SDPA, the softmax) it cost a
 * quarter of a 4-layer hidden-256 decode step in per-op overhead, and SDPA's CPU flash kernel read
 * a cache pushed out of L3 at a third of the stream rate (benchmarks/RESULTS.md). Here each KV
 * group's cache rows are read once for the scores and once for the values, as they lie.
 *
 * Summation order differs from torch's (float32 rounding only; the exponential is a degree-7
 * polynomial after range reduction, within a few ulp of expf).
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#include "simd.h"

int xomni_decode_attention_abi(void) { return 1; }

/* e^x for x <= 0 (scores minus their maximum): x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-7
 * Taylor polynomial (truncation < 1e-8 relative), times 2^n by scalef; below -87.3: 0. */
static inline __m512 exp_nonpositive(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);      /* ln2 high part */
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);       /* ln2 low part */
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps((__mmask16)~tiny, _mm512_scalef_ps(p, n));
}

/* Rotated queries and scores: one buffer per thread, grown to the largest step seen (G * (d +
 * positions) floats), kept for the process, like a library's scratch pad. */
static __thread float* ws_buf;
static __thread int64_t ws_cap;

/* One decode step's attention for R rows, each at its own position pos[r]:
 *   qkv [R, g * (G + 2) * d] (row stride ldq): per KV group G queries, the key, the value;
 *   RoPE from the tables cosine / signed sine [max_len, d] at pos[r]:
 *     rope(x)[j] = x[j] cos[j] + x[(j + d/2) mod d] ssin[j];
 *   the rotated key and the value written to kc / vc [row, group, pos, :] (strides s0, s1, d;
 *   positions < max_len, the cache's length: the tables hold at least max_len rows);
 *   each query attends over positions 0..pos[r] of its group: softmax(scale q.k) . v;
 *   out [R, g * G * d], heads in (group, query) order.
 * d must be a multiple of 32 (<= 512). Returns 0, or < 0 when it cannot run (-2: no memory,
 * -3: a position outside the cache; nothing is written then). */
int xomni_decode_attention(int64_t R, int64_t g, int64_t G, int64_t d, const float* qkv, int64_t ldq,
                           const float* cosine, const float* ssin, const int64_t* pos, float* kc, float* vc,
                           int64_t s0, int64_t s1, int64_t max_len, float scale, float* out) {
  if (d % 32 || d > 512 || G < 1) return -1; /* RoPE rotates by d / 2: whole vectors */
  int64_t maxpos = 0;
  for (int64_t r = 0; r < R; r++) {
    if (pos[r] < 0 || pos[r] >= max_len) return -3; /* outside the cache (and the RoPE tables) */
    maxpos = pos[r] > maxpos ? pos[r] : maxpos;
  }
  const int64_t tpad = (maxpos + 1 + 15) & ~(int64_t)15;
  float* q = scratch(&ws_buf, &ws_cap, G * d + G * tpad); /* [G, d] rotated queries, then */
  if (!q) return -2;
  float* sc = q + G * d;                                   /* [G, tpad] scores, probabilities */
  const int64_t half = d / 2, nv = d / 16;
  for (int64_t r = 0; r < R; r++) {
    const int64_t p = pos[r], T = p + 1;
    const float* c = cosine + p * d;
    const float* sn = ssin + p * d;
    for (int64_t gi = 0; gi < g; gi++) {
      const float* src = qkv + r * ldq + gi * (G + 2) * d;
      float* K = kc + r * s0 + gi * s1;
      float* V = vc + r * s0 + gi * s1;
      /* RoPE on the G queries and the key; the value as it is */
      for (int64_t h = 0; h <= G; h++) {
        const float* x = src + h * d;
        float* dst = h < G ? q + h * d : K + p * d;
        for (int64_t j = 0; j < d; j += 16) {
          const int64_t jr = j < half ? j + half : j - half;
          const __m512 xv = _mm512_loadu_ps(x + j), xr = _mm512_loadu_ps(x + jr);
          _mm512_storeu_ps(dst + j, _mm512_fmadd_ps(xr, _mm512_loadu_ps(sn + j),
                                                    _mm512_mul_ps(xv, _mm512_loadu_ps(c + j))));
        }
      }
      for (int64_t j = 0; j < d; j += 16) _mm512_storeu_ps(V + p * d + j, _mm512_loadu_ps(src + (G + 1) * d + j));
      /* scores, 16 keys at a time: 16 dot products reduced by one transpose-and-add */
      for (int64_t t0 = 0; t0 < T; t0 += 16) {
        const int nk = T - t0 < 16 ? (int)(T - t0) : 16;
        for (int64_t h = 0; h < G; h++) {
          __m512 acc[16];
          for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
          for (int64_t cc = 0; cc < nv; cc++) {
            const __m512 qv = _mm512_load_ps(q + h * d + 16 * cc);
            for (int j = 0; j < nk; j++)
              acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(K + (t0 + j) * d + 16 * cc), acc[j]);
          }
          _mm512_store_ps(sc + h * tpad + t0, _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale)));
        }
      }
      /* softmax over the T scores of each query (lanes past T: -inf -> 0) */
      for (int64_t h = 0; h < G; h++) {
        float* s = sc + h * tpad;
        for (int64_t t = T; t < tpad; t++) s[t] = -INFINITY;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t t = 0; t < tpad; t += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(s + t));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t t = 0; t < tpad; t += 16) {
          const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(s + t), m));
          _mm512_store_ps(s + t, e);
          sum = _mm512_add_ps(sum, e);
        }
        const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
        for (int64_t t = 0; t < tpad; t += 16) _mm512_store_ps(s + t, _mm512_div_ps(_mm512_load_ps(s + t), total));
      }
      /* weighted sum of the values: two queries x 128 columns of accumulators per pass */
      float* o = out + r * g * G * d + gi * G * d;
      for (int64_t d0 = 0; d0 < d; d0 += 128) {
        const int nd = (int)((d - d0 < 128 ? d - d0 : 128) / 16);
        for (int64_t h0 = 0; h0 < G; h0 += 2) {
          const int two = h0 + 1 < G;
          __m512 a0[8], a1[8];
          for (int j = 0; j < 8; j++) a0[j] = a1[j] = _mm512_setzero_ps();
          const float* p0 = sc + h0 * tpad;
          const float* p1 = two ? p0 + tpad : p0;
          for (int64_t t = 0; t < T; t++) {
            const float* vr = V + t * d + d0;
            const __m512 w0 = _mm512_set1_ps(p0[t]), w1 = _mm512_set1_ps(p1[t]);
            for (int j = 0; j < nd; j++) {
              const __m512 vv = _mm512_loadu_ps(vr + 16 * j);
              a0[j] = _mm512_fmadd_ps(w0, vv, a0[j]);
              a1[j] = _mm512_fmadd_ps(w1, vv, a1[j]);
            }
          }
          for (int j = 0; j < nd; j++) {
            _mm512_storeu_ps(o + h0 * d + d0 + 16 * j, a0[j]);
            if (two) _mm512_storeu_ps(o + (h0 + 1) * d + d0 + 16 * j, a1[j]);
          }
        }
      }
    }
  }
  return 0;
}
