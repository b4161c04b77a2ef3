// The dense part's hidden layers in bf16x3 or bf16 on AMX-BF16 tiles (rec_engine/dense.hpp).
// Compiled with AMX and AVX-512 flags for this file only; dense.cpp calls it only when topk_gemm::amx_enabled()
// (the CPU has AMX-BF16, the kernel granted this process the tile state, nobody switched it off).
//
// Each float32 x is split as x = hi + lo + r with hi = bf16(x), lo = bf16(x - hi) (round to nearest even), |r|
// <= 2^-17 |x|; a product a w is taken as hi(a) hi(w) + hi(a) lo(w) + lo(a) hi(w) (the lo lo term, ~2^-16 of it,
// dropped), each bf16 product exact and summed in float32 by TDPBF16PS. That is PyTorch's "high" float32 matmul
// precision on CPUs with bf16 units (~16 significant bits a product against float32's 24), at three tile
// products for one. bf16 takes hi(a) hi(w) alone (~8 significant bits: PyTorch's "medium").
//
// Layouts (uint16 bf16 bits, 512 = 16 x 32 values a tile):
//   A' (the activations): [rows32 / 16][part hi, lo][K32 / 32] tiles of 16 rows x 32 inputs, row-major;
//   B' (a layer's weights): [n32 / 16][part hi, lo][K32 / 32] tiles of 16 pair-rows x 16 outputs x 2 inputs,
//   TDPBF16PS's B operand (pack_weights_bf16x3 in dense.cpp writes it).
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "amx_config.hpp"
#include "dense_kernels.hpp"

namespace rec_engine::dense_kernels {
namespace {

// tiles 0-3: a 2 x 2 block of outputs (32 rows x 32 outputs); 4, 5: the rows' inputs; 6, 7: the weights
const amx::TileConfig kConfig = amx::full_tiles();

// 16 floats -> their bf16 hi part, and with x3 their lo part (round to nearest even; NaN stays a quiet NaN)
inline void split16(__m512 x, bool x3, __m256i& hi, __m256i& lo) {
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF);
  const __m512i qnan = _mm512_set1_epi32(0x7FC00000);
  auto round = [&](__m512 v) {
    const __m512i b = _mm512_castps_si512(v);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(b, 16), one)));
    r = _mm512_mask_mov_epi32(r, nan, qnan);
    return _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));   // the bf16 as a float
  };
  const __m512i h = round(x);
  hi = _mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16));
  if (x3) lo = _mm512_cvtepi32_epi16(_mm512_srli_epi32(round(_mm512_sub_ps(x, _mm512_castsi512_ps(h))), 16));
}

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// row r (< 16) of the 16-row block `blk` of A' from x[0, K) (zeros up to K32); its lo parts only with x3 (bf16
// reads the hi parts alone)
inline void split_row(const float* x, int64_t K, uint16_t* blk, int64_t r, int64_t nks, bool x3) {
  uint16_t* hi = blk + r * 32;
  uint16_t* lo = blk + nks * 512 + r * 32;
  for (int64_t k = 0; k < nks * 32; k += 16) {
    const int64_t left = K - k;
    const __m512 v = left >= 16 ? _mm512_loadu_ps(x + k)
                                : (left > 0 ? _mm512_maskz_loadu_ps(tail_mask(left), x + k) : _mm512_setzero_ps());
    __m256i h, l;
    split16(v, x3, h, l);
    const int64_t off = (k / 32) * 512 + (k % 32);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + off), h);
    if (x3) _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + off), l);
  }
}

}  // namespace

void pack_rows_bf16(const float* A, int64_t lda, int64_t rows, int64_t K, uint16_t* Ap, int64_t rows32,
                    int64_t K32, bool x3) {
  const int64_t nks = K32 / 32;
  for (int64_t i = 0; i < rows32; ++i) {
    uint16_t* blk = Ap + (i / 16) * 2 * nks * 512;
    split_row(i < rows ? A + i * lda : nullptr, i < rows ? K : 0, blk, i % 16, nks, x3);
  }
}

namespace {

// tiles 0-3 += the products of the two row tiles at a0, a1 (into 4, 5) with the two weight tiles at b0, b1 (6, 7)
inline void products(const uint16_t* a0, const uint16_t* a1, const uint16_t* b0, const uint16_t* b1) {
  _tile_loadd(4, a0, 64);
  _tile_loadd(6, b0, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_loadd(5, a1, 64);
  _tile_dpbf16ps(2, 5, 6);
  _tile_loadd(7, b1, 64);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(3, 5, 7);
}

// the 2 x 2 output tiles of rows [i, i + 32) x outputs [j, j + 32): X3 the three products a term, else hi hi only
template <bool X3>
inline void block(const uint16_t* a0, const uint16_t* a1, const uint16_t* b0, const uint16_t* b1, int64_t nks) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < nks; ++s) {
    const int64_t h = s * 512, l = (nks + s) * 512;
    products(a0 + h, a1 + h, b0 + h, b1 + h);   // hi(a) hi(w)
    if constexpr (X3) {
      _tile_loadd(6, b0 + l, 64);               // hi(a) lo(w): the row tiles stay
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      _tile_loadd(7, b1 + l, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
      products(a0 + l, a1 + l, b0 + h, b1 + h);  // lo(a) hi(w)
    }
  }
}

}  // namespace

void layer_bf16_amx(const uint16_t* Ap, int64_t rows32, int64_t K32, const uint16_t* Bp, int64_t n32,
                    const float* bias, float* C, uint16_t* next, bool x3) {
  const int64_t nks = K32 / 32, strip = 2 * nks * 512, ldc = n32, cstride = n32 * 4;
  const int64_t next_nks = n32 / 32;
  _tile_loadconfig(&kConfig);
  for (int64_t i = 0; i < rows32; i += 32) {
    const uint16_t* a0 = Ap + (i / 16) * strip;
    const uint16_t* a1 = a0 + strip;
    for (int64_t j = 0; j < n32; j += 32) {
      const uint16_t* b0 = Bp + (j / 16) * strip;
      const uint16_t* b1 = b0 + strip;
      if (x3)
        block<true>(a0, a1, b0, b1, nks);
      else
        block<false>(a0, a1, b0, b1, nks);
      float* c = C + i * ldc + j;
      _tile_stored(0, c, cstride);
      _tile_stored(1, c + 16, cstride);
      _tile_stored(2, c + 16 * ldc, cstride);
      _tile_stored(3, c + 16 * ldc + 16, cstride);
    }
    // these 32 rows: bias and ReLU in place, and the next layer's A' when there is one
    const __m512 z = _mm512_setzero_ps();
    for (int64_t r = i; r < i + 32; ++r) {
      float* y = C + r * ldc;
      for (int64_t j = 0; j < n32; j += 16)   // (max(0, NaN) is the NaN: maxps returns its second operand)
        _mm512_storeu_ps(y + j, _mm512_max_ps(z, _mm512_add_ps(_mm512_loadu_ps(y + j), _mm512_loadu_ps(bias + j))));
      if (next != nullptr) split_row(y, n32, next + (r / 16) * 2 * next_nks * 512, r % 16, next_nks, x3);
    }
  }
  _tile_release();
}

void row_norms(const float* A, int64_t lda, int64_t rows, int64_t n, double* out) {
  // each of the 16 lanes sums ceil(n / 16) squares, then 16 lanes in a tree of 4: relative error <= gamma_(n/16 + 6)
  // (the squares' own rounding included), within the (n / 16 + 8) 2^-23 added below
  const double raise = 1.0 + static_cast<double>(n / 16 + 8) * 0x1p-23;
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = A + r * lda;
    __m512 acc = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
      const __m512 v = _mm512_loadu_ps(x + k);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    if (k < n) {
      const __m512 v = _mm512_maskz_loadu_ps(tail_mask(n - k), x + k);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    out[r] = std::sqrt(static_cast<double>(_mm512_reduce_add_ps(acc)) * raise);
  }
}

}  // namespace rec_engine::dense_kernels
