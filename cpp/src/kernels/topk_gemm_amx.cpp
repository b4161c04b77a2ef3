// AMX-BF16 score kernel for the bf16 scans of many queries (Intel Sapphire / Emerald Rapids and later).
// Compiled with AMX flags for this file only; dispatch hands it out only when the CPU has AMX-BF16 and the
// kernel granted this process the tile state (see topk_gemm_dispatch.cpp).
//
// A bf16 panel (kPanel items, pairs of dimensions one 32-bit lane each, item-contiguous: see topk_gemm.hpp)
// is, 16 items at a time, exactly the B operand of TDPBF16PS (16 pair-rows of 16 lanes, the next pair-row
// kPanel * 4 bytes further); the queries (bf16, row-major) are its A operand, 16 queries x 32 dimensions. A
// tile product adds, per output, the 32 exact bf16 products in float32 with round to nearest even and denormals
// flushed, as vdpbf16ps does, so the scans' error bounds (topk.cpp, "bf16: r = a, the float sum of bf16
// products") hold for it unchanged.
//
// Measured on an Emerald Rapids core (256 queries x one panel of 64 items x 64 dimensions): 4.5 us a panel,
// ~230 G multiply-adds a second, against ~40 G for the vdpbf16ps kernel on the same core (whose vdpbf16ps
// runs at half the float32 FMA rate there). The item tiles of a panel's 16 items stay loaded while every
// pair of query blocks passes; each output tile takes its d / 32 products and is stored once.
#include <immintrin.h>

#include <cstring>

#include "amx_config.hpp"
#include "topk_gemm.hpp"

namespace rec_engine::topk_gemm {
namespace {

// tiles 0, 1: the outputs of two query blocks x 16 items; the item tiles (one per 32 dimensions) and the
// query tiles share the other six: up to 2 item tiles with 4 query tiles, or 3-4 item tiles with 2 query tiles
// reloaded per product
const amx::TileConfig kConfig = amx::full_tiles();

// Scores queries [0, nq16) (a multiple of 16) against the 16 items [c, c + 16) of the panel.
template <int KB>
void item_block(const uint16_t* q, int64_t nq16, int64_t ldq, const uint16_t* panel, int64_t c, float* out,
                int64_t ldo) {
  const int64_t bstride = kPanel * 4, qstride = ldq * 2, ostride = ldo * 4;
  const uint16_t* b = panel + c * 2;
  static_assert(KB >= 1 && KB <= 4, "one item tile a 32 dimensions, at most 4");
  if constexpr (KB <= 2) {
    _tile_loadd(6, b, bstride);
    if constexpr (KB == 2) _tile_loadd(7, b + 16 * kPanel * 2, bstride);
    int64_t i = 0;
    for (; i + 32 <= nq16; i += 32) {
      const uint16_t* qa = q + i * ldq;
      const uint16_t* qz = qa + 16 * ldq;
      _tile_zero(0);
      _tile_zero(1);
      _tile_loadd(2, qa, qstride);
      _tile_loadd(4, qz, qstride);
      if constexpr (KB == 2) {
        _tile_loadd(3, qa + 32, qstride);
        _tile_loadd(5, qz + 32, qstride);
      }
      _tile_dpbf16ps(0, 2, 6);
      _tile_dpbf16ps(1, 4, 6);
      if constexpr (KB == 2) {
        _tile_dpbf16ps(0, 3, 7);
        _tile_dpbf16ps(1, 5, 7);
      }
      _tile_stored(0, out + i * ldo + c, ostride);
      _tile_stored(1, out + (i + 16) * ldo + c, ostride);
    }
    if (i < nq16) {
      const uint16_t* qa = q + i * ldq;
      _tile_zero(0);
      _tile_loadd(2, qa, qstride);
      _tile_dpbf16ps(0, 2, 6);
      if constexpr (KB == 2) {
        _tile_loadd(3, qa + 32, qstride);
        _tile_dpbf16ps(0, 3, 7);
      }
      _tile_stored(0, out + i * ldo + c, ostride);
    }
  } else {
    _tile_loadd(4, b, bstride);
    _tile_loadd(5, b + 16 * kPanel * 2, bstride);
    _tile_loadd(6, b + 32 * kPanel * 2, bstride);
    if constexpr (KB == 4) _tile_loadd(7, b + 48 * kPanel * 2, bstride);
    for (int64_t i = 0; i < nq16; i += 16) {
      const uint16_t* qa = q + i * ldq;
      _tile_zero(0);
      _tile_loadd(2, qa, qstride);
      _tile_loadd(3, qa + 32, qstride);
      _tile_dpbf16ps(0, 2, 4);
      _tile_dpbf16ps(0, 3, 5);
      _tile_loadd(2, qa + 64, qstride);
      _tile_dpbf16ps(0, 2, 6);
      if constexpr (KB == 4) {
        _tile_loadd(3, qa + 96, qstride);
        _tile_dpbf16ps(0, 3, 7);
      }
      _tile_stored(0, out + i * ldo + c, ostride);
    }
  }
}

}  // namespace

bool amx_bf16_takes(int64_t nq, int64_t d2) { return nq >= 16 && d2 > 0 && d2 % 16 == 0 && d2 <= 64; }

// out[i * ldo + j] for i < nq rounded down to 16 (amx_bf16_takes(nq, d2) holds), j < kPanel.
int64_t score_bf16_amx(const uint16_t* q, int64_t nq, int64_t ldq, const uint16_t* panel, int64_t d2, float* out,
                       int64_t ldo) {
  const int64_t nq16 = nq / 16 * 16;
  _tile_loadconfig(&kConfig);
  for (int64_t c = 0; c < kPanel; c += 16) {
    switch (d2 / 16) {
      case 1: item_block<1>(q, nq16, ldq, panel, c, out, ldo); break;
      case 2: item_block<2>(q, nq16, ldq, panel, c, out, ldo); break;
      case 3: item_block<3>(q, nq16, ldq, panel, c, out, ldo); break;
      default: item_block<4>(q, nq16, ldq, panel, c, out, ldo); break;
    }
  }
  _tile_release();
  return nq16;
}

}  // namespace rec_engine::topk_gemm
