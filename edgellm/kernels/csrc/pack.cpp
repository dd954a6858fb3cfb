// Repacking MatMulNBits weights into panels (kernels.h): done once per weight when a session is created.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <vector>

#include "kernels.h"

namespace edgellm {
namespace {

uint16_t to_half(float f) {  // round to nearest even, subnormals included (libgcc's conversion)
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t bits;
  memcpy(&bits, &h, 2);
  return bits;
}

// float16 keeps a scale to 2^-11 of itself: zero, or in float16's normal range
bool half_keeps_scale(float f) {
  const float a = fabsf(f);
  return a == 0.0f || (a >= 6.103515625e-05f && a <= 65504.0f);
}

// a minimum is added to scale * code: float16's absolute step below its normal range (2^-24) is far below the
// scales that float16 keeps, so any minimum in range will do
bool half_keeps_minimum(float f) { return fabsf(f) <= 65504.0f; }

// Decoding streams the weights end to end, 4 KiB apart in pages where the memory has no huge pages: a TLB miss
// per page, and the prefetchers stop at page ends. Asked for before the first write, Linux backs the 2 MiB-aligned
// part of a buffer with huge pages (where THP is "madvise" or "always"); the edges keep small ones.
void advise_huge_pages(void* data, size_t bytes) {
  const uintptr_t huge = 2u << 20, begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + huge - 1) / huge * huge, last = (begin + bytes) / huge * huge;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
}

}  // namespace

const char* pack_weight(const uint8_t* codes, const float* scales, const uint8_t* zero_points, const float* mins,
                        int64_t n, int64_t k, int bits, int block, int64_t widened_k, bool glu, PackedWeight* out) {
  if (bits != 4 && bits != 8) return "only 4- and 8-bit blocks are supported";
  if (glu && n % (2 * kPanel) != 0) return "a gated weight needs halves of whole panels";
  if (block < 16 || block > 256 || (block & (block - 1))) return "the block size must be a power of two in 16..256";
  if (n <= 0 || k <= 0) return "empty weight";
  const int64_t k_blocks_in = (k + block - 1) / block;  // the blocks the graph's weight holds
  const int64_t k_real = widened_k > 0 ? widened_k : k;  // the input the kernel multiplies
  if (widened_k > 0 && (widened_k % block != 0 || widened_k > k))
    return "folded minimums need an input of whole blocks";
  const int64_t k_blocks = (k_real + block - 1) / block;
  const int blob = block * bits / 8;
  const int mid = 1 << (bits - 1);
  const bool min_form = zero_points != nullptr || mins != nullptr || widened_k > 0;

  // Decoded per output and block: scale and (min form) minimum, in double while the folded parts are summed.
  std::vector<double> scale(static_cast<size_t>(n * k_blocks)), minimum;
  if (min_form) minimum.assign(static_cast<size_t>(n * k_blocks), 0.0);
  auto zero_point = [&](int64_t row, int64_t b) -> int {
    if (!zero_points) return mid;
    if (bits == 8) return zero_points[row * k_blocks_in + b];
    const int64_t per_row = (k_blocks_in + 1) / 2;
    const uint8_t byte = zero_points[row * per_row + b / 2];
    return (b & 1) ? (byte >> 4) : (byte & 15);
  };
  auto code = [&](int64_t row, int64_t col) -> int {  // col over the graph's (possibly widened) input
    const int64_t b = col / block, i = col % block;
    const uint8_t* p = codes + (row * k_blocks_in + b) * blob;
    if (bits == 8) return p[i];
    return (i & 1) ? (p[i / 2] >> 4) : (p[i / 2] & 15);
  };
  for (int64_t row = 0; row < n; ++row) {
    for (int64_t b = 0; b < k_blocks; ++b) {
      const double s = scales[row * k_blocks_in + b];
      scale[row * k_blocks + b] = s;
      if (min_form) {
        double m = -s * zero_point(row, b);
        if (mins) m += mins[b * n + row];
        minimum[row * k_blocks + b] = m;
      }
    }
    if (widened_k > 0) {  // columns past widened_k multiply copies of the block sums: block sum (c - k_real) % k_blocks
      for (int64_t c = k_real; c < k; ++c) {
        const int64_t b = c / block;
        const double value = scales[row * k_blocks_in + b] * (code(row, c) - zero_point(row, b));
        minimum[row * k_blocks + (c - k_real) % k_blocks] += value;
      }
    }
  }
  // float16 scales: for 4-bit codes wherever float16 keeps them to 2^-11, far below what 4 bits round away; for
  // 8-bit codes only where they are float16 values already (GGUF's Q8_0), since 2^-11 is not far below 8 bits' step
  bool half = true;
  for (size_t i = 0; i < scale.size() && half; ++i) {
    const float s = static_cast<float>(scale[i]);
    half = bits == 4 ? half_keeps_scale(s) : static_cast<float>(static_cast<_Float16>(s)) == s;
  }
  for (size_t i = 0; i < minimum.size() && half; ++i) {
    const float m = static_cast<float>(minimum[i]);
    half = bits == 4 ? half_keeps_minimum(m) : static_cast<float>(static_cast<_Float16>(m)) == m;
  }

  PackedWeight w;
  w.n = n;
  w.k = k_real;
  w.bits = bits;
  w.block = block;
  w.k_blocks = k_blocks;
  w.panels = (n + kPanel - 1) / kPanel;
  w.mins = min_form;
  w.half = half;
  w.glu = glu;
  w.code_bytes = static_cast<size_t>(block) * kPanel * bits / 8;
  w.scale_bytes = kPanel * (half ? 2 : 4);
  const size_t tail = w.scale_bytes * (min_form ? 2 : 1);
  w.group = tail % 64 == 0 ? 1 : 2;
  w.offsets = static_cast<uint32_t*>(malloc(static_cast<size_t>(k_blocks) * 3 * sizeof(uint32_t)));
  if (!w.offsets) return "out of memory while repacking a weight";
  size_t at = 0;
  for (int64_t first = 0; first < k_blocks; first += w.group) {  // record by record
    const int64_t in_record = k_blocks - first < w.group ? k_blocks - first : w.group;
    for (int64_t slot = 0; slot < in_record; ++slot) {
      uint32_t* o = w.offsets + (first + slot) * 3;
      o[0] = static_cast<uint32_t>(at + slot * w.code_bytes);
      o[1] = static_cast<uint32_t>(at + in_record * w.code_bytes + slot * w.scale_bytes);
      o[2] = static_cast<uint32_t>(at + in_record * (w.code_bytes + w.scale_bytes) + slot * w.scale_bytes);
    }
    at += in_record * (w.code_bytes + tail);
  }
  w.panel_bytes = (at + 63) / 64 * 64;
  w.bytes = w.panel_bytes * w.panels;
  w.data = static_cast<uint8_t*>(aligned_alloc(64, w.bytes));
  if (!w.data) {
    free(w.offsets);
    return "out of memory while repacking a weight";
  }
  advise_huge_pages(w.data, w.bytes);
  memset(w.data, 0, w.bytes);

  for (int64_t p = 0; p < w.panels; ++p) {
    uint8_t* base = w.data + p * w.panel_bytes;
    for (int j = 0; j < kPanel; ++j) {
      // a glu weight's panels alternate between the gate's rows and the up projection's
      const int64_t row = glu ? (p % 2) * (n / 2) + (p / 2) * kPanel + j : p * kPanel + j;
      if (row >= n) break;  // padding rows: zero codes and zero scales (and minimums) contribute nothing
      const uint8_t* source = codes + row * k_blocks_in * blob;
      for (int64_t b = 0; b < k_blocks; ++b) {
        const uint32_t* o = w.offsets + b * 3;
        uint8_t* c = base + o[0] + j * 4;
        const uint8_t* s = source + b * blob;
        if (bits == 8) {  // 4 codes of a group are consecutive in both layouts
          for (int g = 0; g < block / 4; ++g) memcpy(c + g * 64, s + g * 4, 4);
        } else {
          // 4 source bytes hold inputs 8h..8h+7, two per byte, low nibble first; the panel wants input 8h+i in the
          // low nibble of byte i and input 8h+4+i in its high nibble
          for (int h = 0; h < block / 8; ++h) {
            uint32_t v;
            memcpy(&v, s + h * 4, 4);
            const uint32_t even = v & 0x0f0f0f0fu, odd = (v >> 4) & 0x0f0f0f0fu;  // inputs 0,2,4,6 / 1,3,5,7
            const uint32_t low = (even & 0xff) | ((odd & 0xff) << 8) | (((even >> 8) & 0xff) << 16) |
                                 (((odd >> 8) & 0xff) << 24);
            const uint32_t high = ((even >> 16) & 0xff) | (((odd >> 16) & 0xff) << 8) |
                                  (((even >> 24) & 0xff) << 16) | (((odd >> 24) & 0xff) << 24);
            const uint32_t word = low | (high << 4);
            memcpy(c + h * 64, &word, 4);
          }
        }
        const float sc = static_cast<float>(scale[row * k_blocks + b]);
        const float m = min_form ? static_cast<float>(minimum[row * k_blocks + b]) : 0.0f;
        uint8_t* scale_out = base + o[1];
        uint8_t* min_out = base + o[2];
        if (half) {
          reinterpret_cast<uint16_t*>(scale_out)[j] = to_half(sc);
          if (min_form) reinterpret_cast<uint16_t*>(min_out)[j] = to_half(m);
        } else {
          reinterpret_cast<float*>(scale_out)[j] = sc;
          if (min_form) reinterpret_cast<float*>(min_out)[j] = m;
        }
      }
    }
  }
  *out = w;
  return nullptr;
}

void free_weight(PackedWeight* w) {
  free(w->data);
  free(w->offsets);
  w->data = nullptr;
  w->offsets = nullptr;
}

}  // namespace edgellm
