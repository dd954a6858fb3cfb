// AMX tile instructions in plain C++, for testing amx.cpp's tiling on CPUs without AMX: built with
// -DEDGELLM_AMX_EMULATION (tests/test_kernels.py does), the library runs its AMX level through these functions.
// They follow the instructions' definitions (Intel SDM, "TDPBSUD"): C[m][n] += sum over k of
// int8(A[m][k]) * uint8(B[k / 4][4 n + k % 4]).
#pragma once

#include <stdint.h>
#include <string.h>

namespace edgellm::emulated {

struct Tiles {
  uint8_t data[8][16][64];
  int rows[8];
  int colsb[8];
};

inline Tiles& tiles() {
  static thread_local Tiles t;
  return t;
}

inline void loadconfig(const void* config) {
  const uint8_t* c = static_cast<const uint8_t*>(config);
  for (int t = 0; t < 8; ++t) {
    uint16_t colsb;
    memcpy(&colsb, c + 16 + 2 * t, 2);
    tiles().colsb[t] = colsb;
    tiles().rows[t] = c[48 + t];
  }
}

inline void zero(int t) { memset(tiles().data[t], 0, sizeof tiles().data[t]); }

inline void load(int t, const void* base, int64_t stride) {
  for (int r = 0; r < tiles().rows[t]; ++r)
    memcpy(tiles().data[t][r], static_cast<const uint8_t*>(base) + r * stride, tiles().colsb[t]);
}

inline void store(int t, void* base, int64_t stride) {
  for (int r = 0; r < tiles().rows[t]; ++r)
    memcpy(static_cast<uint8_t*>(base) + r * stride, tiles().data[t][r], tiles().colsb[t]);
}

inline void dpbsud(int c, int a, int b) {
  Tiles& t = tiles();
  for (int m = 0; m < t.rows[c]; ++m) {
    for (int n = 0; n < t.colsb[c] / 4; ++n) {
      int32_t sum;
      memcpy(&sum, &t.data[c][m][4 * n], 4);
      for (int k = 0; k < t.colsb[a]; ++k)
        sum += static_cast<int8_t>(t.data[a][m][k]) * static_cast<uint8_t>(t.data[b][k / 4][4 * n + k % 4]);
      memcpy(&t.data[c][m][4 * n], &sum, 4);
    }
  }
}

}  // namespace edgellm::emulated

#undef _tile_loadconfig
#undef _tile_zero
#undef _tile_loadd
#undef _tile_stored
#undef _tile_dpbsud
#undef _tile_release
#define _tile_loadconfig(config) edgellm::emulated::loadconfig(config)
#define _tile_zero(t) edgellm::emulated::zero(t)
#define _tile_loadd(t, base, stride) edgellm::emulated::load(t, base, stride)
#define _tile_stored(t, base, stride) edgellm::emulated::store(t, base, stride)
#define _tile_dpbsud(c, a, b) edgellm::emulated::dpbsud(c, a, b)
#define _tile_release() ((void)0)
