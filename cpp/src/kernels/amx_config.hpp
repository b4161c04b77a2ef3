// The AMX tile configuration the tile kernels load (topk_gemm_amx.cpp, dense_amx.cpp). Internal header.
#pragma once
#include <cstdint>

namespace rec_engine::amx {

// LDTILECFG's 64-byte operand (palette 1)
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

// all eight tiles at their largest: 16 rows of 64 bytes (16 x 32 bf16, or 16 x 16 float32)
inline TileConfig full_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  return c;
}

}  // namespace rec_engine::amx
