/* AVX-512 helpers shared by this folder's kernels (included; build.py hashes it with each source). */
#ifndef XOMNI_SIMD_H
#define XOMNI_SIMD_H
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

/* v[q] -> one vector whose lane q is the sum of v[q]'s 16 lanes: a transpose-and-add tree, which
 * leaves v[4i + j]'s sum in lane 4j + i; the last permute puts it in lane 4i + j. */
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
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, s);
}

/* A 64-byte aligned scratch buffer of at least `need` floats: *buf grown (never shrunk) to the
 * largest request seen, kept for the process like a library's scratch pad (one per thread: the
 * callers pass __thread variables). NULL when memory runs out (*buf is then left as it was). */
static inline float* scratch(float** buf, int64_t* cap, int64_t need) {
  if (need > *cap) {
    float* p = aligned_alloc(64, (size_t)need * sizeof(float));
    if (!p) return 0;
    free(*buf);
    *buf = p;
    *cap = need;
  }
  return *buf;
}

#endif
