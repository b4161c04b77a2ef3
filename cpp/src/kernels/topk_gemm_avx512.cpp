// AVX-512 score kernels for full top-k scans (F, BW, DQ, VL; VNNI and BF16 for the reduced-precision
// ones, which dispatch only hands out when the CPU has them). Helpers stay in the anonymous namespace.
#include <immintrin.h>

#include "topk_gemm.hpp"

namespace rec_engine::topk_gemm {
namespace {

// Software prefetch distances of the memory-bound single-query scans (the hardware prefetchers alone left
// a Zen 5 core at 0.75-0.85 of a plain read of the table): 4 KiB ahead (16 rows of 64 floats) for the
// float32 stream, 8 KiB (two int8 panels of 64 x 64) for the int8 scan (1 thread: 0.83-0.87 -> 0.96-0.99), 8 KiB
// (one bf16 panel) for the bf16 scan (1M x 64, caches flushed, in-process A/B against no prefetch: 1 thread
// 0.92-0.98 -> 0.94-1.01 of a plain read of the same bytes, 2 threads +1-3% at k = 10).
constexpr int64_t kStreamPrefetch = 1024;  // floats
constexpr int64_t kI8Prefetch = 8192;      // bytes
constexpr int64_t kBf16Prefetch = 8192;    // bytes

constexpr int kMq = 6;  // queries per register block: 6 x 4 accumulators of 16 items

inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int h = 0; h < 2; ++h) {
    const int o = 8 * h;
    for (int i = 0; i < 4; ++i) {
      t[o + i] = _mm512_shuffle_f32x4(r[o + i], r[o + 4 + i], 0x88);
      t[o + 4 + i] = _mm512_shuffle_f32x4(r[o + i], r[o + 4 + i], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
  }
}

// The 16 items g .. g + 15 of a panel being packed, from dimension t0 on: r[j] = load(item j's row + t0), zeros
// past the nx items, the Lines cache lines that load reads from each row (16 floats each) prefetched two panels
// ahead. (pack_bf16 reads two lines a load; prefetching only the first of them left its loads waiting on the
// second: the bf16 screen of 256 queries over 1M x 64 at k = 500 took ~3 ms more, 85-87 against 82-84 ms.)
template <int Lines, class Load>
inline void load_items16(const float* x, int64_t nx, int64_t ldx, int64_t g, int64_t t0, __m512 (&r)[16], Load load) {
  for (int j = 0; j < 16; ++j) {
    const int64_t item = g + j;
    if (item < nx) {
      const float* src = x + item * ldx + t0;
      for (int l = 0; l < Lines; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(src + 2 * kPanel * ldx + 16 * l), _MM_HINT_T0);
      r[j] = load(src);
    } else {
      r[j] = _mm512_setzero_ps();
    }
  }
}

void pack_f32(const float* x, int64_t nx, int64_t ldx, int64_t d, float* panel) {
  for (int64_t g = 0; g < kPanel; g += 16) {
    for (int64_t t0 = 0; t0 < d; t0 += 16) {
      const int64_t w = d - t0 < 16 ? d - t0 : 16;
      const __mmask16 m = static_cast<__mmask16>((1u << w) - 1u);
      __m512 r[16];
      load_items16<1>(x, nx, ldx, g, t0, r,
                      [&](const float* src) { return w == 16 ? _mm512_loadu_ps(src) : _mm512_maskz_loadu_ps(m, src); });
      transpose16(r);
      for (int64_t c = 0; c < w; ++c) _mm512_storeu_ps(panel + (t0 + c) * kPanel + g, r[c]);
    }
  }
}

// pack_f32's transpose on bf16 pairs: each item's chunk of 32 dimensions converted (round to nearest even,
// denormals to zero) to 16 pairs of bf16, one 32-bit lane a pair, then the 16 x 16 lanes transposed.
template <int D, bool Full>
inline void pack_bf16_t(const float* x, int64_t nx_arg, int64_t ldx_arg, int64_t d_arg, uint16_t* panel) {
  const int64_t nx = Full ? kPanel : nx_arg, ldx = D > 0 ? D : ldx_arg, d = D > 0 ? D : d_arg;
  uint32_t* out = reinterpret_cast<uint32_t*>(panel);
  for (int64_t g = 0; g < kPanel; g += 16) {
    for (int64_t t0 = 0; t0 < d; t0 += 32) {
      const int64_t w = d - t0 < 32 ? d - t0 : 32;  // dimensions in this chunk
      const __mmask16 lo = static_cast<__mmask16>(w >= 16 ? 0xFFFFu : (1u << w) - 1u);
      const __mmask16 hi = static_cast<__mmask16>(w >= 32 ? 0xFFFFu : w > 16 ? (1u << (w - 16)) - 1u : 0u);
      __m512 r[16];
      load_items16<2>(x, nx, ldx, g, t0, r, [&](const float* src) {
        return (__m512)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, src + 16), _mm512_maskz_loadu_ps(lo, src));
      });
      transpose16(r);
      const int64_t pairs = (w + 1) / 2;
      for (int64_t c = 0; c < pairs; ++c)
        _mm512_storeu_si512(out + (t0 / 2 + c) * kPanel + g, _mm512_castps_si512(r[c]));
    }
  }
}

// A full panel of 64-dimensional rows stored back to back (the float32 item tables a bf16 screen converts) is
// packed with its sizes as constants: the 16 rows of a step are addressed from one register, without a bounds
// check a row (as stream_f32's dense case). The bf16 screen of 256 queries over 1M x 64, in-process A/B: k = 500
// 70.0-70.7 -> 68.5-68.8 ms, k = 100 53.8-54.1 -> 51.9-53.5 ms. (pack_f32 the same way measured 1-3 ms slower
// in the float32 batch scan, and stays as it is.)
void pack_bf16(const float* x, int64_t nx, int64_t ldx, int64_t d, uint16_t* panel) {
  if (nx == kPanel && d == 64 && ldx == 64) return pack_bf16_t<64, true>(x, nx, ldx, d, panel);
  pack_bf16_t<0, false>(x, nx, ldx, d, panel);
}

template <int MQ>
void micro_f32(const float* q, int64_t ldq, const float* panel, int64_t d, float* out, int64_t ldo) {
  __m512 acc[MQ][4];
  for (int i = 0; i < MQ; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < d; ++t) {
    const float* xp = panel + t * kPanel;
    const __m512 x0 = _mm512_loadu_ps(xp), x1 = _mm512_loadu_ps(xp + 16), x2 = _mm512_loadu_ps(xp + 32),
                 x3 = _mm512_loadu_ps(xp + 48);
    for (int i = 0; i < MQ; ++i) {
      const __m512 b = _mm512_set1_ps(q[i * ldq + t]);
      acc[i][0] = _mm512_fmadd_ps(b, x0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(b, x1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(b, x2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(b, x3, acc[i][3]);
    }
  }
  for (int i = 0; i < MQ; ++i)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + i * ldo + 16 * j, acc[i][j]);
}

using MicroF32 = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t);
const MicroF32 kMicroF32[kMq] = {&micro_f32<1>, &micro_f32<2>, &micro_f32<3>,
                                 &micro_f32<4>, &micro_f32<5>, &micro_f32<6>};

void score_f32(const float* q, int64_t nq, int64_t ldq, const float* panel, int64_t d, float* out,
               int64_t ldo) {
  for (int64_t i = 0; i < nq; i += kMq) {
    const int64_t m = nq - i < kMq ? nq - i : kMq;
    kMicroF32[m - 1](q + i * ldq, ldq, panel, d, out + i * ldo, ldo);
  }
}

void filter_tile(const float* tile, int64_t nq, int64_t ld, int64_t n, const float* thr, uint64_t* masks) {
  // not (s < thr): s >= thr, or s NaN
  if (n == kPanel) {
    for (int64_t a = 0; a < nq; ++a) {
      const float* r = tile + a * ld;
      const __m512 tv = _mm512_set1_ps(thr[a]);
      const uint64_t m0 = _mm512_cmp_ps_mask(_mm512_loadu_ps(r), tv, _CMP_NLT_UQ);
      const uint64_t m1 = _mm512_cmp_ps_mask(_mm512_loadu_ps(r + 16), tv, _CMP_NLT_UQ);
      const uint64_t m2 = _mm512_cmp_ps_mask(_mm512_loadu_ps(r + 32), tv, _CMP_NLT_UQ);
      const uint64_t m3 = _mm512_cmp_ps_mask(_mm512_loadu_ps(r + 48), tv, _CMP_NLT_UQ);
      masks[a] = m0 | (m1 << 16) | (m2 << 32) | (m3 << 48);
    }
    return;
  }
  for (int64_t a = 0; a < nq; ++a) {
    const float* r = tile + a * ld;
    const __m512 tv = _mm512_set1_ps(thr[a]);
    uint64_t m = 0;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 valid = n - j >= 16 ? static_cast<__mmask16>(0xffff)
                                          : static_cast<__mmask16>((1u << (n - j)) - 1u);
      const uint64_t mj = _mm512_mask_cmp_ps_mask(valid, _mm512_maskz_loadu_ps(valid, r + j), tv, _CMP_NLT_UQ);
      m |= mj << j;
    }
    masks[a] = m;
  }
}

// acc += u8 x s8 dot products of 4 (vpdpbusd). In asm so that the accumulator is updated in place: GCC 12
// copied and spilled the accumulators around the intrinsic (about 1.7x the fp32 kernel's rate instead of 4x).
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// The int8 kernels' end: the integer sums acc of MQ queries x 64 items scaled by the items' scales and
// compared with thr[i] in registers; a vector of scores is stored only when one of its lanes passes.
template <int MQ>
inline void i8_filter_out(const __m512i (&acc)[MQ][4], const float* scale, const float* thr, float* out, int64_t ldo,
                          uint64_t* masks) {
  for (int i = 0; i < MQ; ++i) {
    const __m512 tv = _mm512_set1_ps(thr[i]);
    uint64_t m = 0;
    for (int j = 0; j < 4; ++j) {
      const __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[i][j]), _mm512_loadu_ps(scale + 16 * j));
      const __mmask16 mj = _mm512_cmp_ps_mask(s, tv, _CMP_NLT_UQ);
      if (mj) {
        _mm512_storeu_ps(out + i * ldo + 16 * j, s);
        m |= static_cast<uint64_t>(mj) << (16 * j);
      }
    }
    masks[i] = m;
  }
}

// u8 x s8 scores of MQ queries x 64 items (vpdpbusd, from -corr), scaled, compared with thr[i] in
// registers: a vector of scores is stored only when one of its lanes passes (after the first panels
// almost none does).
template <int MQ>
void micro_i8_filter(const uint8_t* q, int64_t ldq, const int8_t* panel, int64_t d4, const int32_t* corr,
                     const float* scale, const float* thr, float* out, int64_t ldo, uint64_t* masks) {
  __m512i acc[MQ][4];  // from -corr: the sums come out corrected
  for (int j = 0; j < 4; ++j) {
    const __m512i c = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(corr + 16 * j));
    for (int i = 0; i < MQ; ++i) acc[i][j] = c;
  }
  for (int64_t t = 0; t < d4; ++t) {
    const int8_t* xp = panel + t * kPanel * 4;
    if constexpr (MQ == 1)  // the single-query scan is memory-bound: see kStreamPrefetch
      for (int c = 0; c < 4; ++c) _mm_prefetch(reinterpret_cast<const char*>(xp + kI8Prefetch + 64 * c), _MM_HINT_T0);
    const __m512i x0 = _mm512_loadu_si512(xp), x1 = _mm512_loadu_si512(xp + 64),
                  x2 = _mm512_loadu_si512(xp + 128), x3 = _mm512_loadu_si512(xp + 192);
    for (int i = 0; i < MQ; ++i) {
      int32_t v;
      __builtin_memcpy(&v, q + i * ldq + 4 * t, 4);
      const __m512i b = _mm512_set1_epi32(v);
      acc[i][0] = dpbusd(acc[i][0], b, x0);
      acc[i][1] = dpbusd(acc[i][1], b, x1);
      acc[i][2] = dpbusd(acc[i][2], b, x2);
      acc[i][3] = dpbusd(acc[i][3], b, x3);
    }
  }
  i8_filter_out<MQ>(acc, scale, thr, out, ldo, masks);
}

using MicroI8F = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, const int32_t*, const float*,
                          const float*, float*, int64_t, uint64_t*);
const MicroI8F kMicroI8F[kMq] = {&micro_i8_filter<1>, &micro_i8_filter<2>, &micro_i8_filter<3>,
                                 &micro_i8_filter<4>, &micro_i8_filter<5>, &micro_i8_filter<6>};

void score_i8_filter(const uint8_t* q, int64_t nq, int64_t ldq, const int8_t* panel, int64_t d4,
                     const int32_t* corr, const float* scale, const float* thr, float* out, int64_t ldo,
                     uint64_t* masks) {
  for (int64_t i = 0; i < nq; i += kMq) {
    const int64_t m = nq - i < kMq ? nq - i : kMq;
    kMicroI8F[m - 1](q + i * ldq, ldq, panel, d4, corr, scale, thr + i, out + i * ldo, ldo, masks + i);
  }
}


// micro_i8_filter for the streamed scan of 1-3 queries, which is memory-bound: it reads no corr (4 of the 72
// bytes an item of a 64-dim table, with the scale). The roles of the operands swap: the items become u8
// (x ^ 0x80 = x + 128, in registers) and the queries s8 (qu ^ 0x80 = q), so the sums carry 128 sum_t q[t],
// one number a query, instead of each item's 128 sum_t x[t]: acc starts at -128 sum_t q[t] and ends at
// sum_t q[t] x[t], the same integer as micro_i8_filter's (int32 wraps cancel: the end value fits).
template <int MQ>
void micro_i8_stream(const uint8_t* q, int64_t ldq, const int8_t* panel, int64_t d4, const int32_t* qsum,
                     const float* scale, const float* thr, float* out, int64_t ldo, uint64_t* masks) {
  __m512i acc[MQ][4];
  for (int i = 0; i < MQ; ++i)
    for (int j = 0; j < 4; ++j)  // (mod 2^32, as the sums: no signed overflow however long the query)
      acc[i][j] = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(qsum[i]) * 0xFFFFFF80u));
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t t = 0; t < d4; ++t) {
    const int8_t* xp = panel + t * kPanel * 4;
    if constexpr (MQ == 1)  // see kStreamPrefetch
      for (int c = 0; c < 4; ++c) _mm_prefetch(reinterpret_cast<const char*>(xp + kI8Prefetch + 64 * c), _MM_HINT_T0);
    const __m512i x0 = _mm512_xor_si512(_mm512_loadu_si512(xp), flip),
                  x1 = _mm512_xor_si512(_mm512_loadu_si512(xp + 64), flip),
                  x2 = _mm512_xor_si512(_mm512_loadu_si512(xp + 128), flip),
                  x3 = _mm512_xor_si512(_mm512_loadu_si512(xp + 192), flip);
    for (int i = 0; i < MQ; ++i) {
      uint32_t v;
      __builtin_memcpy(&v, q + i * ldq + 4 * t, 4);
      const __m512i b = _mm512_set1_epi32(static_cast<int32_t>(v ^ 0x80808080u));
      acc[i][0] = dpbusd(acc[i][0], x0, b);
      acc[i][1] = dpbusd(acc[i][1], x1, b);
      acc[i][2] = dpbusd(acc[i][2], x2, b);
      acc[i][3] = dpbusd(acc[i][3], x3, b);
    }
  }
  i8_filter_out<MQ>(acc, scale, thr, out, ldo, masks);
}

// score_i8_filter over n_panels consecutive panels (panel_bytes apart, corr/scale kPanel apart) until one
// has a mask bit set; returns the panels gone through (the last one is described by out and masks). Up to 3
// queries (the streamed scan) read no corr: micro_i8_stream.
int64_t scan_i8_filter(const uint8_t* q, int64_t nq, int64_t ldq, const int8_t* panels, int64_t n_panels,
                       int64_t d4, const int32_t* corr, const float* scale, const float* thr, float* out,
                       int64_t ldo, uint64_t* masks) {
  const int64_t panel_bytes = kPanel * d4 * 4;
  int32_t qsum[3] = {0, 0, 0};   // sum_t q[t] of each query (qu - 128)
  if (nq <= 3)
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t t = 0; t < 4 * d4; ++t) qsum[i] += static_cast<int32_t>(q[i * ldq + t]) - 128;
  for (int64_t pi = 0; pi < n_panels; ++pi) {
    const int8_t* panel = panels + pi * panel_bytes;
    if (nq == 1)
      micro_i8_stream<1>(q, ldq, panel, d4, qsum, scale + pi * kPanel, thr, out, ldo, masks);
    else if (nq == 2)
      micro_i8_stream<2>(q, ldq, panel, d4, qsum, scale + pi * kPanel, thr, out, ldo, masks);
    else if (nq == 3)
      micro_i8_stream<3>(q, ldq, panel, d4, qsum, scale + pi * kPanel, thr, out, ldo, masks);
    else
      score_i8_filter(q, nq, ldq, panel, d4, corr + pi * kPanel, scale + pi * kPanel, thr, out, ldo, masks);
    uint64_t any = 0;
    for (int64_t a = 0; a < nq; ++a) any |= masks[a];
    if (any != 0) return pi + 1;
  }
  return n_panels;
}

template <int MQ>
void micro_bf16(const uint16_t* q, int64_t ldq, const uint16_t* panel, int64_t d2, float* out, int64_t ldo) {
  __m512 acc[MQ][4];
  for (int i = 0; i < MQ; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < d2; ++t) {
    const uint16_t* xp = panel + t * kPanel * 2;
    if constexpr (MQ == 1)  // the single-query scan is memory-bound: see kStreamPrefetch
      for (int c = 0; c < 4; ++c) _mm_prefetch(reinterpret_cast<const char*>(xp) + kBf16Prefetch + 64 * c, _MM_HINT_T0);
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xp), x1 = (__m512bh)_mm512_loadu_si512(xp + 32),
                   x2 = (__m512bh)_mm512_loadu_si512(xp + 64), x3 = (__m512bh)_mm512_loadu_si512(xp + 96);
    for (int i = 0; i < MQ; ++i) {
      int32_t v;
      __builtin_memcpy(&v, q + i * ldq + 2 * t, 4);
      const __m512bh b = (__m512bh)_mm512_set1_epi32(v);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], b, x0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], b, x1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], b, x2);
      acc[i][3] = _mm512_dpbf16_ps(acc[i][3], b, x3);
    }
  }
  for (int i = 0; i < MQ; ++i)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + i * ldo + 16 * j, acc[i][j]);
}

using MicroBf16 = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t);
const MicroBf16 kMicroBf16[kMq] = {&micro_bf16<1>, &micro_bf16<2>, &micro_bf16<3>,
                                   &micro_bf16<4>, &micro_bf16<5>, &micro_bf16<6>};

void score_bf16(const uint16_t* q, int64_t nq, int64_t ldq, const uint16_t* panel, int64_t d2, float* out,
                int64_t ldo) {
  for (int64_t i = 0; i < nq; i += kMq) {
    const int64_t m = nq - i < kMq ? nq - i : kMq;
    kMicroBf16[m - 1](q + i * ldq, ldq, panel, d2, out + i * ldo, ldo);
  }
}

// ---------------------------------------------------------------------------- streaming float32 scan
// A few queries against row-major items, read once in memory order (no packing). Each item keeps one
// accumulator over 16-lane chunks of its row (the tail chunk zero-masked), as the kernels' dot_tile does;
// sixteen accumulators are then reduced together into one vector of sixteen sums (30 shuffles + 15 adds
// instead of sixteen horizontal reductions), with the additions of _mm512_reduce_add_ps in its order
// (lanes i + 8, then + 4, + 2, + 1), so a score equals dot_tile's bit for bit.

// Reduces v[p] (p < 16) to one vector; lane L holds the sum of v[kLaneSrc[L]].
inline __m512 reduce16(const __m512 v[16]) {
  __m512 s1[8], s2[4], s3[2];
  for (int i = 0; i < 8; ++i)  // lanes i + (i + 8): [A 0..7 | B 0..7]
    s1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                          _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // + 4: [A 0..3 | B 0..3 | C 0..3 | D 0..3]
    s2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s1[2 * i], s1[2 * i + 1], 0x88),
                          _mm512_shuffle_f32x4(s1[2 * i], s1[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // + 2
    s3[i] = _mm512_add_ps(_mm512_shuffle_ps(s2[2 * i], s2[2 * i + 1], 0x44),
                          _mm512_shuffle_ps(s2[2 * i], s2[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(s3[0], s3[1], 0x88), _mm512_shuffle_ps(s3[0], s3[1], 0xDD));  // + 1
}
// reduce16 leaves the sum of input p in lane 4 * (p % 4) + p / 4; this puts it back in lane p.
inline __m512 unshuffle16(__m512 s) {
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), s);
}

// The dot products of q with rows x_p = x + p * ldx, p < m (m <= 16; rows p >= m score 0), in lane p;
// any d.
inline __m512 dots16_any(const float* q, const float* x, int64_t ldx, int64_t d, int m) {
  __m512 acc[16];
  for (int p = 0; p < 16; ++p) {
    __m512 a = _mm512_setzero_ps();
    if (p < m) {
      const float* r = x + p * ldx;
      int64_t t = 0;
      for (; t + 16 <= d; t += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + t), _mm512_loadu_ps(r + t), a);
      if (t < d) {
        const __mmask16 mk = static_cast<__mmask16>((1u << (d - t)) - 1u);
        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, q + t), _mm512_maskz_loadu_ps(mk, r + t), a);
      }
    }
    acc[p] = a;
  }
  return unshuffle16(reduce16(acc));
}

// The same for 16 full rows and d == 16 * C, the query's chunks in registers, except that the lanes are
// left in reduce16's order (unshuffle16 puts them back). One query: the sixteen accumulators in registers;
// with prefetch, the loads bring the rows in with a software prefetch kStreamPrefetch floats ahead.
// Measured on Zen 5 (EPYC family 26, 1 thread, 1M x 64, against torch.sum of the same table): this shape
// 0.97-0.98 of the plain read for one query; the earlier one (two rows a step, the accumulators stored to an
// L1 buffer and reloaded for the reduction, tuned on Zen 4 where it read at ~0.9) 0.75-0.8, bound by the
// reloads of the 64-byte stores, and 0.97 with the same prefetch.
template <int C>
__attribute__((always_inline)) inline __m512 dots16_one(const __m512 (&qv)[C], const float* x, int64_t ldx,
                                                        bool prefetch) {
  __m512 acc[16];
#pragma GCC unroll 16
  for (int p = 0; p < 16; ++p) {
    const float* row = x + p * ldx;
    if (prefetch)
      for (int c = 0; c < C; ++c) _mm_prefetch(reinterpret_cast<const char*>(row + kStreamPrefetch + 16 * c), _MM_HINT_T0);
    __m512 a = _mm512_fmadd_ps(qv[0], _mm512_loadu_ps(row), _mm512_setzero_ps());  // as dot_tile: from +0
    for (int c = 1; c < C; ++c) a = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(row + 16 * c), a);
    acc[p] = a;
  }
  return reduce16(acc);
}

// reduce16 leaves input p in lane lane_of(p) (a 4 x 4 transpose, so also the input whose sum lane L holds).
constexpr int lane_of(int p) { return 4 * (p % 4) + p / 4; }
struct PairLanes {
  int first[16]{}, second[16]{};
};
// dots16_pair reduces rows 0-7 of two queries into one vector (inputs 0-7: query 0, 8-15: query 1) and rows
// 8-15 into another; these permutex2var indices gather each query's 16 rows into reduce16's lane order.
constexpr PairLanes pair_lanes() {
  PairLanes t;
  for (int L = 0; L < 16; ++L) {
    const int row = lane_of(L);
    t.first[L] = row < 8 ? lane_of(row) : 16 + lane_of(row - 8);
    t.second[L] = row < 8 ? lane_of(row + 8) : 16 + lane_of(row);
  }
  return t;
}
constexpr PairLanes kPairLanes = pair_lanes();

// Two queries at once, eight rows a step: each row is loaded once for both, the 16 accumulators (and the two
// queries' chunks) stay in registers; the same sums in the same order as dots16_one, in the same lanes.
// Measured on Zen 5 (1M x 64, 1 thread, against torch.sum at 5.9-6.4 ms): 2 queries 6.6-7.0 ms, 3 queries
// (a pair, then one from L1) 8.8-9.1 ms, against 8.1-8.2 / 11.0-11.9 ms query by query.
template <int C>
__attribute__((always_inline)) inline void dots16_pair(const __m512 (&q0)[C], const __m512 (&q1)[C], const float* x,
                                                       int64_t ldx, bool prefetch, __m512& r0, __m512& r1) {
  __m512 h[2];
  for (int half = 0; half < 2; ++half) {
    __m512 acc[16];
#pragma GCC unroll 8
    for (int p = 0; p < 8; ++p) {
      const float* row = x + (8 * half + p) * ldx;
      if (prefetch)
        for (int c = 0; c < C; ++c) _mm_prefetch(reinterpret_cast<const char*>(row + kStreamPrefetch + 16 * c), _MM_HINT_T0);
      __m512 xv = _mm512_loadu_ps(row);
      __m512 a0 = _mm512_fmadd_ps(q0[0], xv, _mm512_setzero_ps()), a1 = _mm512_fmadd_ps(q1[0], xv, _mm512_setzero_ps());
      for (int c = 1; c < C; ++c) {
        xv = _mm512_loadu_ps(row + 16 * c);
        a0 = _mm512_fmadd_ps(q0[c], xv, a0);
        a1 = _mm512_fmadd_ps(q1[c], xv, a1);
      }
      acc[p] = a0;
      acc[8 + p] = a1;
    }
    h[half] = reduce16(acc);
  }
  r0 = _mm512_permutex2var_ps(h[0], _mm512_loadu_si512(kPairLanes.first), h[1]);
  r1 = _mm512_permutex2var_ps(h[0], _mm512_loadu_si512(kPairLanes.second), h[1]);
}

// NQ queries (1-kStreamQueries) against 16 full rows: the sums of query i in the lanes of r[i] (reduce16's
// order). Two queries a pass where 2 x C chunks and 16 accumulators fit the 32 registers (C <= 4), else
// one; the first pass brings the rows in (prefetching ahead), later passes read them from L1.
template <int C, int NQ>
__attribute__((always_inline)) inline void dots16_full(const __m512 (&qv)[NQ][C], const float* x, int64_t ldx,
                                                       __m512 (&r)[NQ]) {
  int i = 0;
  if constexpr (C <= 4)
    for (; i + 1 < NQ; i += 2) dots16_pair<C>(qv[i], qv[i + 1], x, ldx, i == 0, r[i], r[i + 1]);
  for (; i < NQ; ++i) r[i] = dots16_one<C>(qv[i], x, ldx, i == 0);
}

// One panel of up to kPanel rows x[0 .. nx) for nq queries: scores in out (when thr is null, or when a
// query has a bit set: then its whole row of kPanel), masks (when thr is set); returns whether a bit is set.
// C > 0: d == 16 * C; C == 0: any d. LD > 0: the row stride is LD (== ldx_arg), a constant.
template <int C, int NQ, int LD = 0>
inline bool stream_panel(const float* q, int64_t nq, int64_t ldq, const float* x, int64_t nx, int64_t ldx_arg,
                         int64_t d, const float* thr, float* out, int64_t ldo, uint64_t* masks) {
  const int64_t ldx = LD > 0 ? LD : ldx_arg;
  __m512 sv[kStreamQueries][kPanel / 16];  // nq <= kStreamQueries (the caller's contract): scores kept for hits
  uint64_t mq[kStreamQueries] = {};
  for (int64_t g = 0; g < kPanel; g += 16) {
    const int m = static_cast<int>(nx - g >= 16 ? 16 : (nx > g ? nx - g : 0));
    const float* xg = x + g * ldx;
    if constexpr (C > 0 && NQ > 0) {
      if (m == 16) {  // full rows, every query at once
        __m512 qv[NQ][C > 0 ? C : 1], r[NQ];
        for (int i = 0; i < NQ; ++i)
          for (int c = 0; c < C; ++c) qv[i][c] = _mm512_loadu_ps(q + i * ldq + 16 * c);
        dots16_full<C, NQ>(qv, xg, ldx, r);  // lanes shuffled
        for (int i = 0; i < NQ; ++i) {
          if (thr != nullptr && _mm512_cmp_ps_mask(r[i], _mm512_set1_ps(thr[i]), _CMP_NLT_UQ) == 0) {
            sv[i][g / 16] = r[i];  // no lane passes (in any order): nothing to unshuffle
            continue;
          }
          const __m512 s = unshuffle16(r[i]);
          if (thr == nullptr) {
            _mm512_storeu_ps(out + i * ldo + g, s);
            continue;
          }
          mq[i] |= static_cast<uint64_t>(_mm512_cmp_ps_mask(s, _mm512_set1_ps(thr[i]), _CMP_NLT_UQ)) << g;
          sv[i][g / 16] = s;
        }
        continue;
      }
    }
    for (int64_t a = 0; a < nq; ++a) {  // any d, or a short group: the 16 rows are in L1 after the first query
      const __m512 s = m > 0 ? dots16_any(q + a * ldq, xg, ldx, d, m) : _mm512_setzero_ps();
      if (thr == nullptr) {
        _mm512_storeu_ps(out + a * ldo + g, s);
        continue;
      }
      // not (s < thr): s >= thr, or s NaN
      const __mmask16 valid = static_cast<__mmask16>(m >= 16 ? 0xffffu : (1u << m) - 1u);
      mq[a] |= static_cast<uint64_t>(_mm512_mask_cmp_ps_mask(valid, s, _mm512_set1_ps(thr[a]), _CMP_NLT_UQ)) << g;
      sv[a][g / 16] = s;
    }
  }
  if (thr == nullptr) return false;
  uint64_t any = 0;
  for (int64_t a = 0; a < nq; ++a) {
    masks[a] = mq[a];
    if (mq[a] != 0)
      for (int64_t g = 0; g < kPanel; g += 16) _mm512_storeu_ps(out + a * ldo + g, sv[a][g / 16]);
    any |= mq[a];
  }
  return any != 0;
}

// See Table::stream_f32: panels of kPanel rows from x, until one has a mask bit set (or, without thr, one).
// The loop stays in this function between hits (after the first panels a hit is rare), so the loads run
// on without a call, a store of the scores or a return to the selections per panel.
template <int C, int NQ, int LD = 0>
int64_t stream_f32_impl(const float* q, int64_t nq, int64_t ldq, const float* x, int64_t n, int64_t ldx, int64_t d,
                        const float* thr, float* out, int64_t ldo, uint64_t* masks) {
  int64_t i = 0;
  while (i < n) {
    const int64_t nx = n - i < kPanel ? n - i : kPanel;
    const bool hit = stream_panel<C, NQ, LD>(q, nq, ldq, x + i * ldx, nx, ldx, d, thr, out, ldo, masks);
    i += nx;
    if (thr == nullptr || hit) break;
  }
  return i;
}

static_assert(kStreamQueries == 3, "stream_f32_c has one case per query count");
template <int C>
int64_t stream_f32_c(const float* q, int64_t nq, int64_t ldq, const float* x, int64_t n, int64_t ldx, int64_t d,
                     const float* thr, float* out, int64_t ldo, uint64_t* masks) {
  // Rows stored back to back (ldx == d, the item tables) get their stride as a constant for one or two
  // queries: the 16 rows of a step are then addressed from one register with immediate offsets, instead of 16
  // pointers kept partly on the stack (1M x 64, two threads, caches flushed, in-process A/B, the same scores
  // bit for bit: one query 0.90-0.93 -> 0.96-0.99 of a plain read of the table at k = 10 and 100, two queries
  // 0.83-0.84 -> 0.86-0.87; three queries were 2-3% slower that way, and keep the stride a variable).
  const bool dense = ldx == 16 * C;
  switch (nq) {
    case 1:
      return dense ? stream_f32_impl<C, 1, 16 * C>(q, nq, ldq, x, n, ldx, d, thr, out, ldo, masks)
                   : stream_f32_impl<C, 1>(q, nq, ldq, x, n, ldx, d, thr, out, ldo, masks);
    case 2:
      return dense ? stream_f32_impl<C, 2, 16 * C>(q, nq, ldq, x, n, ldx, d, thr, out, ldo, masks)
                   : stream_f32_impl<C, 2>(q, nq, ldq, x, n, ldx, d, thr, out, ldo, masks);
    case 3: return stream_f32_impl<C, 3>(q, nq, ldq, x, n, ldx, d, thr, out, ldo, masks);
    default: return stream_f32_impl<0, 0>(q, nq, ldq, x, n, ldx, d, thr, out, ldo, masks);
  }
}

int64_t stream_f32(const float* q, int64_t nq, int64_t ldq, const float* x, int64_t n, int64_t ldx, int64_t d,
                   const float* thr, float* out, int64_t ldo, uint64_t* masks) {
  switch (d) {
    case 16: return stream_f32_c<1>(q, nq, ldq, x, n, ldx, d, thr, out, ldo, masks);
    case 32: return stream_f32_c<2>(q, nq, ldq, x, n, ldx, d, thr, out, ldo, masks);
    case 48: return stream_f32_c<3>(q, nq, ldq, x, n, ldx, d, thr, out, ldo, masks);
    case 64: return stream_f32_c<4>(q, nq, ldq, x, n, ldx, d, thr, out, ldo, masks);
    case 96: return stream_f32_c<6>(q, nq, ldq, x, n, ldx, d, thr, out, ldo, masks);
    case 128: return stream_f32_c<8>(q, nq, ldq, x, n, ldx, d, thr, out, ldo, masks);
    default: return stream_f32_impl<0, 0>(q, nq, ldq, x, n, ldx, d, thr, out, ldo, masks);
  }
}

// score_bf16 over n_panels consecutive panels (kPanel * d2 * 2 values apart), each compared with thr as
// filter_tile does, until one has a mask bit set; returns the panels gone through (the last one is
// described by out and masks).
int64_t scan_bf16_filter(const uint16_t* q, int64_t nq, int64_t ldq, const uint16_t* panels, int64_t n_panels,
                         int64_t d2, const float* thr, float* out, int64_t ldo, uint64_t* masks) {
  const int64_t panel_values = kPanel * d2 * 2;
  for (int64_t pi = 0; pi < n_panels; ++pi) {
    const uint16_t* panel = panels + pi * panel_values;
    if (nq == 1)
      micro_bf16<1>(q, ldq, panel, d2, out, ldo);
    else
      score_bf16(q, nq, ldq, panel, d2, out, ldo);
    filter_tile(out, nq, ldo, kPanel, thr, masks);
    uint64_t any = 0;
    for (int64_t a = 0; a < nq; ++a) any |= masks[a];
    if (any != 0) return pi + 1;
  }
  return n_panels;
}

const Table kTable = {pack_f32,         score_f32,      filter_tile,      score_i8_filter, score_bf16,
                      stream_f32,       scan_i8_filter, scan_bf16_filter, pack_bf16};

}  // namespace

const Table& avx512_table() { return kTable; }

}  // namespace rec_engine::topk_gemm
