// AVX-512 kernels (F, BW, DQ, VL + FMA + F16C). Compiled with those flags for this file only; every
// helper stays in the anonymous namespace so no AVX-512 code can be linked into baseline callers.
#include <immintrin.h>


#include "kernels.hpp"

namespace rec_engine::kernels {
namespace {

constexpr int64_t W = 16;

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// One MQ x MX register block. Each pair keeps a single accumulator over 16-lane chunks (the tail
// chunk zero-masked) and is reduced the same way, so the result does not depend on MQ or MX.
template <int MQ, int MX>
void micro(const float* q, int64_t ldq, const float* x, int64_t ldx, int64_t d, float* out,
           int64_t ldo) {
  __m512 acc[MQ][MX];
  for (int i = 0; i < MQ; ++i)
    for (int j = 0; j < MX; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + W <= d; t += W) {
    __m512 xv[MX];
    for (int j = 0; j < MX; ++j) xv[j] = _mm512_loadu_ps(x + j * ldx + t);
    for (int i = 0; i < MQ; ++i) {
      const __m512 qv = _mm512_loadu_ps(q + i * ldq + t);
      for (int j = 0; j < MX; ++j) acc[i][j] = _mm512_fmadd_ps(qv, xv[j], acc[i][j]);
    }
  }
  if (t < d) {
    const __mmask16 m = tail_mask(d - t);
    __m512 xv[MX];
    for (int j = 0; j < MX; ++j) xv[j] = _mm512_maskz_loadu_ps(m, x + j * ldx + t);
    for (int i = 0; i < MQ; ++i) {
      const __m512 qv = _mm512_maskz_loadu_ps(m, q + i * ldq + t);
      for (int j = 0; j < MX; ++j) acc[i][j] = _mm512_fmadd_ps(qv, xv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MQ; ++i)
    for (int j = 0; j < MX; ++j) out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]);
}

constexpr int BQ = 4;
constexpr int BX = 4;
using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);


// Plain arrays (no std:: templates instantiated with these ISA flags).
const MicroFn kMicro[BQ][BX] = {
    {&micro<1,1>, &micro<1,2>, &micro<1,3>, &micro<1,4>},
    {&micro<2,1>, &micro<2,2>, &micro<2,3>, &micro<2,4>},
    {&micro<3,1>, &micro<3,2>, &micro<3,3>, &micro<3,4>},
    {&micro<4,1>, &micro<4,2>, &micro<4,3>, &micro<4,4>}};

void dot_tile(const float* q, int64_t nq, int64_t ldq, const float* x, int64_t nx, int64_t ldx,
              int64_t d, float* out, int64_t ldo) {
  for (int64_t i = 0; i < nq; i += BQ) {
    const int mq = static_cast<int>(nq - i < BQ ? nq - i : BQ);
    for (int64_t j = 0; j < nx; j += BX) {
      const int mx = static_cast<int>(nx - j < BX ? nx - j : BX);
      kMicro[mq - 1][mx - 1](q + i * ldq, ldq, x + j * ldx, ldx, d, out + i * ldo + j, ldo);
    }
  }
}

inline __m512 load_f16(const uint16_t* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}
inline __m512 load_f16_tail(const uint16_t* x, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, x));
}
inline __m512 load_u8(const uint8_t* x) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))));
}
inline __m512 load_u8_tail(const uint8_t* x, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, x)));
}

// y op= f(x): Load gives a full chunk, LoadTail a masked one; Op combines (y, value).
template <class Load, class LoadTail, class Op>
inline void rowwise(float* y, int64_t d, Load load, LoadTail load_tail, Op op) {
  int64_t t = 0;
  for (; t + W <= d; t += W) _mm512_storeu_ps(y + t, op(_mm512_loadu_ps(y + t), load(t)));
  if (t < d) {
    const __mmask16 m = tail_mask(d - t);
    _mm512_mask_storeu_ps(y + t, m, op(_mm512_maskz_loadu_ps(m, y + t), load_tail(t, m)));
  }
}

void axpy_f32(float* y, const float* x, float a, int64_t d) {
  const __m512 av = _mm512_set1_ps(a);
  rowwise(
      y, d, [&](int64_t t) { return _mm512_loadu_ps(x + t); },
      [&](int64_t t, __mmask16 m) { return _mm512_maskz_loadu_ps(m, x + t); },
      [&](__m512 yv, __m512 xv) { return _mm512_fmadd_ps(av, xv, yv); });
}
void axpy_f16(float* y, const uint16_t* x, float a, int64_t d) {
  const __m512 av = _mm512_set1_ps(a);
  rowwise(
      y, d, [&](int64_t t) { return load_f16(x + t); },
      [&](int64_t t, __mmask16 m) { return load_f16_tail(x + t, m); },
      [&](__m512 yv, __m512 xv) { return _mm512_fmadd_ps(av, xv, yv); });
}
void axpy_u8(float* y, const uint8_t* x, float a, float b, int64_t d) {
  const __m512 av = _mm512_set1_ps(a);
  const __m512 bv = _mm512_set1_ps(b);
  rowwise(
      y, d, [&](int64_t t) { return load_u8(x + t); },
      [&](int64_t t, __mmask16 m) { return load_u8_tail(x + t, m); },
      [&](__m512 yv, __m512 xv) { return _mm512_add_ps(yv, _mm512_fmadd_ps(av, xv, bv)); });
}
void max_f32(float* y, const float* x, int64_t d) {
  rowwise(
      y, d, [&](int64_t t) { return _mm512_loadu_ps(x + t); },
      [&](int64_t t, __mmask16 m) { return _mm512_maskz_loadu_ps(m, x + t); },
      [](__m512 yv, __m512 xv) { return _mm512_max_ps(xv, yv); });
}
void max_f16(float* y, const uint16_t* x, int64_t d) {
  rowwise(
      y, d, [&](int64_t t) { return load_f16(x + t); },
      [&](int64_t t, __mmask16 m) { return load_f16_tail(x + t, m); },
      [](__m512 yv, __m512 xv) { return _mm512_max_ps(xv, yv); });
}
void max_u8(float* y, const uint8_t* x, float a, float b, int64_t d) {
  const __m512 av = _mm512_set1_ps(a);
  const __m512 bv = _mm512_set1_ps(b);
  rowwise(
      y, d, [&](int64_t t) { return load_u8(x + t); },
      [&](int64_t t, __mmask16 m) { return load_u8_tail(x + t, m); },
      [&](__m512 yv, __m512 xv) { return _mm512_max_ps(_mm512_fmadd_ps(av, xv, bv), yv); });
}
void scale(float* y, float a, int64_t d) {
  const __m512 av = _mm512_set1_ps(a);
  rowwise(
      y, d, [](int64_t) { return _mm512_setzero_ps(); },
      [](int64_t, __mmask16) { return _mm512_setzero_ps(); },
      [&](__m512 yv, __m512) { return _mm512_mul_ps(yv, av); });
}

struct Isa {
  using V = __m512;
  static constexpr int W = 16;
  static constexpr int NR = 4;  // 64 floats of a row per block
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float f) { return _mm512_set1_ps(f); }
  static V ld32(const float* p, int n) { return n == W ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(tail_mask(n), p); }
  static V ld16(const uint16_t* p, int n) { return n == W ? load_f16(p) : load_f16_tail(p, tail_mask(n)); }
  static V ld8(const uint8_t* p, int n) { return n == W ? load_u8(p) : load_u8_tail(p, tail_mask(n)); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static void st(float* p, V v, int n) {
    if (n == W) _mm512_storeu_ps(p, v);
    else _mm512_mask_storeu_ps(p, tail_mask(n), v);
  }
};

#include "rows_impl.hpp"

void pool_bags(const PoolArgs& a, int64_t b0, int64_t b1) { pool_bags_impl<Isa>(a, b0, b1); }
void spmm_rows(const SpmmArgs& a, int64_t r0, int64_t r1) { spmm_rows_impl<Isa>(a, r0, r1); }

const KernelTable kTable = {"avx512", dot_tile, axpy_f32, axpy_f16, axpy_u8,
                            max_f32,  max_f16,  max_u8,   scale, pool_bags, spmm_rows};

}  // namespace

const KernelTable& avx512_table() { return kTable; }

}  // namespace rec_engine::kernels
