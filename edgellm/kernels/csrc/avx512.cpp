// AVX-512 VNNI kernels: vpdpbusd multiplies the unsigned codes of 16 outputs x 4 inputs by 4 int8 activations
// broadcast to every output, so one 64-byte load of a panel feeds 16 outputs at once and no horizontal sums are
// needed. Float work is one multiply-add per block and output.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")

namespace edgellm {
namespace {

// Reading a panel, ask for the bytes this far ahead: the hardware prefetchers alone leave the multi-row kernels
// waiting on memory.
constexpr int kPrefetch = 4096;

inline float reduce_max(__m512 v) { return _mm512_reduce_max_ps(v); }

void quantize(const float* x, int64_t k, int64_t row0, int64_t row1, int zero_point, QuantizedRows* q) {
  const int bs = q->block;
  for (int64_t r = row0; r < row1; ++r) {
    const float* xr = x + r * k;
    int8_t* qr = q->q + r * q->k_pad;
    for (int64_t b = 0; b < q->k_blocks; ++b) {
      const int64_t c0 = b * bs;
      const int64_t len = k - c0 < bs ? k - c0 : bs;
      __m512 vmax = _mm512_setzero_ps();
      for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 m = len - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (len - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, xr + c0 + i);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
      }
      const float amax = reduce_max(vmax);
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      const __m512 vinv = _mm512_set1_ps(inv);
      __m512i qsum = _mm512_setzero_si512();
      for (int64_t i = 0; i < bs; i += 16) {
        const int64_t left = len - i;
        const __mmask16 m = left >= 16 ? 0xffff : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, xr + c0 + i);
        const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v, vinv));  // round half to even
        qsum = _mm512_add_epi32(qsum, qi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + c0 + i), _mm512_cvtepi32_epi8(qi));
      }
      const int64_t at = r * q->k_blocks + b;
      const int32_t total = _mm512_reduce_add_epi32(qsum);
      q->scale[at] = amax / 127.0f;
      q->offset[at] = -zero_point * total;
      q->sum[at] = q->scale[at] * static_cast<float>(total);
    }
  }
}

template <bool HALF>
inline __m512 load16(const uint8_t* p) {
  if (HALF) return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_load_ps(reinterpret_cast<const float*>(p));
}

// Rows [row0, row0 + M) against panels [p0, p1): each block's codes are loaded and widened once for all M rows.
template <int M, int BITS, bool MINS, bool HALF>
void gemv_rows(const PackedWeight* w, const QuantizedRows* q, int64_t row0, int64_t p0, int64_t p1, float* y,
               int64_t ldy) {
  const int bs = w->block;
  const int64_t kb = w->k_blocks;
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  const int32_t* xg[M];
  const float* dx[M];
  const int32_t* off[M];
  const float* sx[M];
  _Pragma("GCC unroll 8") for (int r = 0; r < M; ++r) {
    xg[r] = reinterpret_cast<const int32_t*>(q->q + (row0 + r) * q->k_pad);
    dx[r] = q->scale + (row0 + r) * kb;
    off[r] = q->offset + (row0 + r) * kb;
    sx[r] = q->sum + (row0 + r) * kb;
  }
  const int groups = bs / 4;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = w->data + p * w->panel_bytes;
    __m512 f[M];
    _Pragma("GCC unroll 8") for (int r = 0; r < M; ++r) f[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < kb; ++b) {
      const uint32_t* at = w->offsets + 3 * b;
      const uint8_t* codes = panel + at[0];
      __m512i a0[M], a1[M];
      _Pragma("GCC unroll 8") for (int r = 0; r < M; ++r) {
        a0[r] = MINS ? _mm512_setzero_si512() : _mm512_set1_epi32(off[r][b]);
        a1[r] = _mm512_setzero_si512();
      }
      const int64_t g0 = b * groups;
      if (BITS == 4) {
        for (int h = 0; h < groups / 2; ++h) {
          _mm_prefetch(reinterpret_cast<const char*>(codes + h * 64 + kPrefetch), _MM_HINT_T0);
          const __m512i v = _mm512_load_si512(codes + h * 64);
          const __m512i lo = _mm512_and_si512(v, low4);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          _Pragma("GCC unroll 8") for (int r = 0; r < M; ++r) {
            a0[r] = _mm512_dpbusd_epi32(a0[r], lo, _mm512_set1_epi32(xg[r][g0 + 2 * h]));
            a1[r] = _mm512_dpbusd_epi32(a1[r], hi, _mm512_set1_epi32(xg[r][g0 + 2 * h + 1]));
          }
        }
      } else {
        for (int g = 0; g < groups; g += 2) {
          _mm_prefetch(reinterpret_cast<const char*>(codes + g * 64 + kPrefetch), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(codes + g * 64 + 64 + kPrefetch), _MM_HINT_T0);
          const __m512i v0 = _mm512_load_si512(codes + g * 64);
          const __m512i v1 = _mm512_load_si512(codes + g * 64 + 64);
          _Pragma("GCC unroll 8") for (int r = 0; r < M; ++r) {
            a0[r] = _mm512_dpbusd_epi32(a0[r], v0, _mm512_set1_epi32(xg[r][g0 + g]));
            a1[r] = _mm512_dpbusd_epi32(a1[r], v1, _mm512_set1_epi32(xg[r][g0 + g + 1]));
          }
        }
      }
      const __m512 d = load16<HALF>(panel + at[1]);
      _Pragma("GCC unroll 8") for (int r = 0; r < M; ++r) {
        const __m512 s = _mm512_mul_ps(d, _mm512_set1_ps(dx[r][b]));
        f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0[r], a1[r])), s, f[r]);
      }
      if (MINS) {
        const __m512 mn = load16<HALF>(panel + at[2]);
        _Pragma("GCC unroll 8") for (int r = 0; r < M; ++r) f[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sx[r][b]), f[r]);
      }
    }
    const int64_t n0 = p * kPanel;
    const int64_t count = w->n - n0 < kPanel ? w->n - n0 : kPanel;
    const __mmask16 keep = count == kPanel ? 0xffff : static_cast<__mmask16>((1u << count) - 1);
    _Pragma("GCC unroll 8") for (int r = 0; r < M; ++r) _mm512_mask_storeu_ps(y + r * ldy + (p - p0) * kPanel, keep, f[r]);
  }
}

template <int BITS, bool MINS, bool HALF>
void gemv_format(const PackedWeight* w, const QuantizedRows* q, int64_t row0, int rows, int64_t p0, int64_t p1,
                 float* y, int64_t ldy) {
  switch (rows) {
    case 1: return gemv_rows<1, BITS, MINS, HALF>(w, q, row0, p0, p1, y, ldy);
    case 2: return gemv_rows<2, BITS, MINS, HALF>(w, q, row0, p0, p1, y, ldy);
    case 3: return gemv_rows<3, BITS, MINS, HALF>(w, q, row0, p0, p1, y, ldy);
    case 4: return gemv_rows<4, BITS, MINS, HALF>(w, q, row0, p0, p1, y, ldy);
    case 5: return gemv_rows<5, BITS, MINS, HALF>(w, q, row0, p0, p1, y, ldy);
    case 6: return gemv_rows<6, BITS, MINS, HALF>(w, q, row0, p0, p1, y, ldy);
    case 7: return gemv_rows<7, BITS, MINS, HALF>(w, q, row0, p0, p1, y, ldy);
    default: return gemv_rows<8, BITS, MINS, HALF>(w, q, row0, p0, p1, y, ldy);
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

// Many rows: the panel's codes stay in the caches while every tile of 8 rows passes over them.
void gemm_panel(const PackedWeight* w, const QuantizedRows* q, int64_t p, float* y, int64_t ldy) {
  for (int64_t r0 = 0; r0 < q->m; r0 += 8) {
    const int rows = q->m - r0 < 8 ? static_cast<int>(q->m - r0) : 8;
    gemv(w, q, r0, rows, p, p + 1, y + r0 * ldy, ldy);
  }
}

// exp(x) to about 2 ulp: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to r^6, times 2^n
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

void silu_glu(const float* y, int64_t ldy, int64_t rows, float* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 gate = _mm512_loadu_ps(y + r * ldy), up = _mm512_loadu_ps(y + r * ldy + kPanel);
    const __m512 silu = _mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(
        _mm512_setzero_ps(), gate))));
    _mm512_storeu_ps(out + r * ldo, _mm512_mul_ps(silu, up));
  }
}

}  // namespace

const IsaKernels kAvx512Kernels = {quantize, gemv, gemm_panel, silu_glu};

}  // namespace edgellm
