// AMX kernels for many rows (prefill): int8 tiles multiply 16 activation rows by a panel's 16 outputs over a
// block (tdpbsud: signed activations, unsigned codes), and AVX-512 applies the block's scales to the 16 x 16
// integer sums, so the results are the AVX-512 VNNI kernels' up to float summation order. Few rows (decoding)
// stay on the VNNI GEMV, which the memory bounds anyway.
//
// The panel layout (kernels.h) is AMX's own B-tile layout once the codes are widened to bytes: a block's group of
// 4 inputs is one 64-byte tile row holding 4 codes of each of the 16 outputs.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#ifdef EDGELLM_AMX_EMULATION
#include "amx_emulation.h"
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")
#else
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,amx-tile,amx-int8")
#endif

namespace edgellm {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tile 0: C, 16 rows x 16 int32; tile 1: A, 16 activation rows x `step` bytes; tile 2: B, step / 4 rows x 64 bytes.
void configure(int step) {
  TileConfig config;
  config.rows[0] = 16;
  config.colsb[0] = 64;
  config.rows[1] = 16;
  config.colsb[1] = static_cast<uint16_t>(step);
  config.rows[2] = static_cast<uint8_t>(step / 4);
  config.colsb[2] = 64;
  _tile_loadconfig(&config);
}

struct Scratch {  // per thread: the panel's codes widened to bytes, its scales and minimums as float32
  uint8_t* codes = nullptr;
  float* scales = nullptr;
  size_t code_capacity = 0, scale_capacity = 0;
  ~Scratch() {
    free(codes);
    free(scales);
  }
  void reserve(size_t code_bytes, size_t floats) {
    if (code_bytes > code_capacity) {
      free(codes);
      code_capacity = (code_bytes + 63) / 64 * 64;
      codes = static_cast<uint8_t*>(aligned_alloc(64, code_capacity));
    }
    if (floats > scale_capacity) {
      free(scales);
      scale_capacity = (floats + 15) / 16 * 16;
      scales = static_cast<float*>(aligned_alloc(64, scale_capacity * 4));
    }
  }
};

template <bool HALF>
inline __m512 load16(const uint8_t* p) {
  if (HALF) return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_load_ps(reinterpret_cast<const float*>(p));
}

template <int BITS, bool MINS, bool HALF>
void gemm_panel_format(const PackedWeight* w, const QuantizedRows* q, int64_t p, float* y, int64_t ldy) {
  static thread_local Scratch scratch;
  const int bs = w->block;
  const int64_t kb = w->k_blocks;
  const int groups = bs / 4;
  const int step = bs < 64 ? bs : 64;  // inputs per tile product
  scratch.reserve(static_cast<size_t>(kb) * bs * kPanel, static_cast<size_t>(kb) * kPanel * 2);
  uint8_t* codes = scratch.codes;
  float* scales = scratch.scales;
  float* mins = scales + kb * kPanel;

  const uint8_t* panel = w->data + p * w->panel_bytes;
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  for (int64_t b = 0; b < kb; ++b) {
    const uint32_t* at = w->offsets + 3 * b;
    const uint8_t* source = panel + at[0];
    uint8_t* out = codes + b * groups * 64;
    if (BITS == 4) {
      for (int h = 0; h < groups / 2; ++h) {
        const __m512i v = _mm512_load_si512(source + h * 64);
        _mm512_store_si512(out + 2 * h * 64, _mm512_and_si512(v, low4));
        _mm512_store_si512(out + (2 * h + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
      }
    } else {
      memcpy(out, source, w->code_bytes);
    }
    _mm512_store_ps(scales + b * kPanel, load16<HALF>(panel + at[1]));
    if (MINS) _mm512_store_ps(mins + b * kPanel, load16<HALF>(panel + at[2]));
  }

  configure(step);
  alignas(64) int32_t sums[16 * 16];
  const int64_t n0 = p * kPanel;
  const int64_t count = w->n - n0 < kPanel ? w->n - n0 : kPanel;
  const __mmask16 keep = count == kPanel ? 0xffff : static_cast<__mmask16>((1u << count) - 1);
  for (int64_t r0 = 0; r0 < q->m; r0 += 16) {  // q's rows are padded to a multiple of 16 (matmul.cpp)
    __m512 f[16];
    for (int r = 0; r < 16; ++r) f[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < kb; ++b) {
      _tile_zero(0);
      for (int s = 0; s < bs / step; ++s) {
        _tile_loadd(1, q->q + r0 * q->k_pad + b * bs + s * step, q->k_pad);
        _tile_loadd(2, codes + (b * groups + s * step / 4) * 64, 64);
        _tile_dpbsud(0, 1, 2);
      }
      _tile_stored(0, sums, 64);
      const __m512 d = _mm512_load_ps(scales + b * kPanel);
      const __m512 mn = MINS ? _mm512_load_ps(mins + b * kPanel) : _mm512_setzero_ps();
      for (int r = 0; r < 16; ++r) {
        const int64_t at = (r0 + r) * kb + b;
        __m512i total = _mm512_load_si512(sums + r * 16);
        if (!MINS) total = _mm512_add_epi32(total, _mm512_set1_epi32(q->offset[at]));
        f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(d, _mm512_set1_ps(q->scale[at])), f[r]);
        if (MINS) f[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(q->sum[at]), f[r]);
      }
    }
    const int64_t rows = q->m - r0 < 16 ? q->m - r0 : 16;
    for (int r = 0; r < rows; ++r) _mm512_mask_storeu_ps(y + (r0 + r) * ldy, keep, f[r]);
  }
  _tile_release();
}

}  // namespace

void amx_gemm_panel(const PackedWeight* w, const QuantizedRows* q, int64_t p, float* y, int64_t ldy) {
  const int key = (w->bits == 8) * 4 + w->mins * 2 + w->half;
  switch (key) {
    case 0: return gemm_panel_format<4, false, false>(w, q, p, y, ldy);
    case 1: return gemm_panel_format<4, false, true>(w, q, p, y, ldy);
    case 2: return gemm_panel_format<4, true, false>(w, q, p, y, ldy);
    case 3: return gemm_panel_format<4, true, true>(w, q, p, y, ldy);
    case 4: return gemm_panel_format<8, false, false>(w, q, p, y, ldy);
    case 5: return gemm_panel_format<8, false, true>(w, q, p, y, ldy);
    case 6: return gemm_panel_format<8, true, false>(w, q, p, y, ldy);
    default: return gemm_panel_format<8, true, true>(w, q, p, y, ldy);
  }
}

}  // namespace edgellm
