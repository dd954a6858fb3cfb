// AVX2 kernels, the floor every x86-64 host of the last decade has: the panel layout of the AVX-512 kernels read
// as two halves of 8 outputs, vpmaddubsw (unsigned codes x int8 activations, pairs summed to int16) and vpmaddwd
// to widen to int32. 8-bit codes are split into nibbles so that no int16 sum can saturate.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#pragma GCC target("avx2,fma,f16c")

#include "simd_avx2.h"

namespace edgellm {
namespace {

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

void quantize(const float* x, int64_t k, int64_t row0, int64_t row1, int zero_point, QuantizedRows* q) {
  const int bs = q->block;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t r = row0; r < row1; ++r) {
    const float* xr = x + r * k;
    int8_t* qr = q->q + r * q->k_pad;
    for (int64_t b = 0; b < q->k_blocks; ++b) {
      const int64_t c0 = b * bs;
      const int64_t len = k - c0 < bs ? k - c0 : bs;
      __m256 vmax = _mm256_setzero_ps();
      for (int64_t i = 0; i < len; i += 8) {
        const __m256 v = len - i >= 8 ? _mm256_loadu_ps(xr + c0 + i) : _mm256_maskload_ps(xr + c0 + i, tail_mask8(len - i));
        vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
      }
      const float amax = hmax8(vmax);
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      const __m256 vinv = _mm256_set1_ps(inv);
      __m256i qsum = _mm256_setzero_si256();
      for (int64_t i = 0; i < bs; i += 8) {
        const int64_t left = len - i;
        __m256 v = _mm256_setzero_ps();
        if (left >= 8) v = _mm256_loadu_ps(xr + c0 + i);
        else if (left > 0) v = _mm256_maskload_ps(xr + c0 + i, tail_mask8(left));
        const __m256i qi = _mm256_cvtps_epi32(_mm256_mul_ps(v, vinv));  // round half to even
        qsum = _mm256_add_epi32(qsum, qi);
        const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
        const __m128i w8 = _mm_packs_epi16(w16, w16);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + c0 + i), w8);
      }
      const int64_t at = r * q->k_blocks + b;
      const int32_t total = hsum_epi32(qsum);
      q->scale[at] = amax / 127.0f;
      q->offset[at] = -zero_point * total;
      q->sum[at] = q->scale[at] * static_cast<float>(total);
    }
  }
}

template <bool HALF>
inline __m256 load8(const uint8_t* p) {
  if (HALF) return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_load_ps(reinterpret_cast<const float*>(p));
}

// Reading a panel, ask for the bytes this far ahead (as avx512.cpp does).
constexpr int kPrefetch = 4096;

// Rows [row0, row0 + M) against panels [p0, p1): both halves of each panel (8 outputs each) in one pass where
// HALVES is 2 (few rows: the registers hold both), else the half `half` alone.
template <int M, int BITS, bool MINS, bool HALF, int HALVES>
void gemv_halves(const PackedWeight* w, const QuantizedRows* q, int64_t row0, int64_t p0, int64_t p1, int half,
                 float* y, int64_t ldy) {
  const int bs = w->block;
  const int64_t kb = w->k_blocks;
  const size_t scale_half = HALF ? 16 : 32;
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i sixteens = _mm256_set1_epi16(16);
  const int32_t* xg[M];
  const float* dx[M];
  const int32_t* off[M];
  const float* sx[M];
  for (int r = 0; r < M; ++r) {
    xg[r] = reinterpret_cast<const int32_t*>(q->q + (row0 + r) * q->k_pad);
    dx[r] = q->scale + (row0 + r) * kb;
    off[r] = q->offset + (row0 + r) * kb;
    sx[r] = q->sum + (row0 + r) * kb;
  }
  const int first = HALVES == 2 ? 0 : half;
  const int groups = bs / 4;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = w->data + p * w->panel_bytes;
    __m256 f[HALVES][M];
    _Pragma("GCC unroll 2") for (int e = 0; e < HALVES; ++e)
      _Pragma("GCC unroll 4") for (int r = 0; r < M; ++r) f[e][r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < kb; ++b) {
      const uint32_t* at = w->offsets + 3 * b;
      const uint8_t* codes = panel + at[0];
      __m256i a[HALVES][M];
      _Pragma("GCC unroll 2") for (int e = 0; e < HALVES; ++e)
        _Pragma("GCC unroll 4") for (int r = 0; r < M; ++r)
          a[e][r] = MINS ? _mm256_setzero_si256() : _mm256_set1_epi32(off[r][b]);
      const int64_t g0 = b * groups;
      if (BITS == 4) {
        // int16 sums: each vpmaddubsw lane is at most 2 * 15 * 127; four pairs of groups stay below 32767
        __m256i s[HALVES][M];
        _Pragma("GCC unroll 2") for (int e = 0; e < HALVES; ++e)
          _Pragma("GCC unroll 4") for (int r = 0; r < M; ++r) s[e][r] = _mm256_setzero_si256();
        for (int h = 0; h < groups / 2; ++h) {
          if (first == 0) _mm_prefetch(reinterpret_cast<const char*>(codes + h * 64 + kPrefetch), _MM_HINT_T0);
          _Pragma("GCC unroll 2") for (int e = 0; e < HALVES; ++e) {
            const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(codes + h * 64 + (first + e) * 32));
            const __m256i lo = _mm256_and_si256(v, low4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            _Pragma("GCC unroll 4") for (int r = 0; r < M; ++r) {
              const __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(xg[r][g0 + 2 * h])),
                                                 _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xg[r][g0 + 2 * h + 1])));
              s[e][r] = _mm256_add_epi16(s[e][r], t);
            }
          }
          if ((h & 3) == 3 || h == groups / 2 - 1) {
            _Pragma("GCC unroll 2") for (int e = 0; e < HALVES; ++e)
              _Pragma("GCC unroll 4") for (int r = 0; r < M; ++r) {
                a[e][r] = _mm256_add_epi32(a[e][r], _mm256_madd_epi16(s[e][r], ones));
                s[e][r] = _mm256_setzero_si256();
              }
          }
        }
      } else {
        // 8-bit codes as 16 * high nibble + low nibble, each product sum bounded as for 4 bits
        __m256i lo_sum[HALVES][M], hi_sum[HALVES][M];
        _Pragma("GCC unroll 2") for (int e = 0; e < HALVES; ++e)
          _Pragma("GCC unroll 4") for (int r = 0; r < M; ++r) lo_sum[e][r] = hi_sum[e][r] = _mm256_setzero_si256();
        for (int g = 0; g < groups; ++g) {
          if (first == 0) _mm_prefetch(reinterpret_cast<const char*>(codes + g * 64 + kPrefetch), _MM_HINT_T0);
          _Pragma("GCC unroll 2") for (int e = 0; e < HALVES; ++e) {
            const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(codes + g * 64 + (first + e) * 32));
            const __m256i lo = _mm256_and_si256(v, low4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            _Pragma("GCC unroll 4") for (int r = 0; r < M; ++r) {
              const __m256i xv = _mm256_set1_epi32(xg[r][g0 + g]);
              lo_sum[e][r] = _mm256_add_epi16(lo_sum[e][r], _mm256_maddubs_epi16(lo, xv));
              hi_sum[e][r] = _mm256_add_epi16(hi_sum[e][r], _mm256_maddubs_epi16(hi, xv));
            }
          }
          if ((g & 7) == 7 || g == groups - 1) {
            _Pragma("GCC unroll 2") for (int e = 0; e < HALVES; ++e)
              _Pragma("GCC unroll 4") for (int r = 0; r < M; ++r) {
                a[e][r] = _mm256_add_epi32(a[e][r], _mm256_add_epi32(_mm256_madd_epi16(lo_sum[e][r], ones),
                                                                     _mm256_madd_epi16(hi_sum[e][r], sixteens)));
                lo_sum[e][r] = hi_sum[e][r] = _mm256_setzero_si256();
              }
          }
        }
      }
      _Pragma("GCC unroll 2") for (int e = 0; e < HALVES; ++e) {
        const __m256 d = load8<HALF>(panel + at[1] + (first + e) * scale_half);
        _Pragma("GCC unroll 4") for (int r = 0; r < M; ++r)
          f[e][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[e][r]), _mm256_mul_ps(d, _mm256_set1_ps(dx[r][b])),
                                    f[e][r]);
        if (MINS) {
          const __m256 mn = load8<HALF>(panel + at[2] + (first + e) * scale_half);
          _Pragma("GCC unroll 4") for (int r = 0; r < M; ++r)
            f[e][r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(sx[r][b]), f[e][r]);
        }
      }
    }
    for (int e = 0; e < HALVES; ++e) {
      const int64_t count = w->n - (p * kPanel + (first + e) * 8);
      for (int r = 0; r < M; ++r) {
        float* out = y + r * ldy + (p - p0) * kPanel + (first + e) * 8;
        if (count >= 8) {
          _mm256_storeu_ps(out, f[e][r]);
        } else if (count > 0) {
          _mm256_maskstore_ps(out, tail_mask8(count), f[e][r]);
        }
      }
    }
  }
}

template <int BITS, bool MINS, bool HALF>
void gemv_format(const PackedWeight* w, const QuantizedRows* q, int64_t row0, int rows, int64_t p0, int64_t p1,
                 float* y, int64_t ldy) {
  if (rows == 1) return gemv_halves<1, BITS, MINS, HALF, 2>(w, q, row0, p0, p1, 0, y, ldy);
  if (rows == 2) return gemv_halves<2, BITS, MINS, HALF, 2>(w, q, row0, p0, p1, 0, y, ldy);
  for (int half = 0; half < 2; ++half) {  // more rows: each half of the panels in its own pass
    for (int r = 0; r < rows;) {
      const int take = rows - r >= 4 ? 4 : rows - r;
      float* out = y + r * ldy;
      switch (take) {
        case 1: gemv_halves<1, BITS, MINS, HALF, 1>(w, q, row0 + r, p0, p1, half, out, ldy); break;
        case 2: gemv_halves<2, BITS, MINS, HALF, 1>(w, q, row0 + r, p0, p1, half, out, ldy); break;
        case 3: gemv_halves<3, BITS, MINS, HALF, 1>(w, q, row0 + r, p0, p1, half, out, ldy); break;
        default: gemv_halves<4, BITS, MINS, HALF, 1>(w, q, row0 + r, p0, p1, half, out, ldy); break;
      }
      r += take;
    }
  }
}

void gemv(const PackedWeight* w, const QuantizedRows* q, int64_t row0, int rows, int64_t p0, int64_t p1, float* y,
          int64_t ldy) {
  const int key = (w->bits == 8) * 4 + w->mins * 2 + w->half;
  switch (key) {
    case 0: return gemv_format<4, false, false>(w, q, row0, rows, p0, p1, y, ldy);
    case 1: return gemv_format<4, false, true>(w, q, row0, rows, p0, p1, y, ldy);
    case 2: return gemv_format<4, true, false>(w, q, row0, rows, p0, p1, y, ldy);
    case 3: return gemv_format<4, true, true>(w, q, row0, rows, p0, p1, y, ldy);
    case 4: return gemv_format<8, false, false>(w, q, row0, rows, p0, p1, y, ldy);
    case 5: return gemv_format<8, false, true>(w, q, row0, rows, p0, p1, y, ldy);
    case 6: return gemv_format<8, true, false>(w, q, row0, rows, p0, p1, y, ldy);
    default: return gemv_format<8, true, true>(w, q, row0, rows, p0, p1, y, ldy);
  }
}

void gemm_panel(const PackedWeight* w, const QuantizedRows* q, int64_t p, float* y, int64_t ldy) {
  for (int64_t r0 = 0; r0 < q->m; r0 += 8) {
    const int rows = q->m - r0 < 8 ? static_cast<int>(q->m - r0) : 8;
    gemv(w, q, r0, rows, p, p + 1, y + r0 * ldy, ldy);
  }
}

void silu_glu(const float* y, int64_t ldy, int64_t rows, float* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int h = 0; h < kPanel; h += 8) {
      const __m256 gate = _mm256_loadu_ps(y + r * ldy + h), up = _mm256_loadu_ps(y + r * ldy + kPanel + h);
      const __m256 silu = _mm256_div_ps(gate, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(
          _mm256_setzero_ps(), gate))));
      _mm256_storeu_ps(out + r * ldo + h, _mm256_mul_ps(silu, up));
    }
  }
}

}  // namespace

const IsaKernels kAvx2Kernels = {quantize, gemv, gemm_panel, silu_glu};

}  // namespace edgellm
