// AVX2 kernels (AVX2 + FMA + F16C). Compiled with those flags for this file only; helpers stay in the
// anonymous namespace so no AVX2 code can be linked into baseline callers.
#include <immintrin.h>


#include "kernels.hpp"

namespace rec_engine::kernels {
namespace {

constexpr int64_t W = 8;

inline __m256i tail_mask(int64_t n) {
  alignas(32) static const int32_t bits[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + 8 - n));
}

inline float hsum(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One MQ x MX register block; each pair has one accumulator over 8-lane chunks (tail zero-masked),
// reduced the same way, so a score does not depend on the block shape.
template <int MQ, int MX>
void micro(const float* q, int64_t ldq, const float* x, int64_t ldx, int64_t d, float* out,
           int64_t ldo) {
  __m256 acc[MQ][MX];
  for (int i = 0; i < MQ; ++i)
    for (int j = 0; j < MX; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + W <= d; t += W) {
    __m256 xv[MX];
    for (int j = 0; j < MX; ++j) xv[j] = _mm256_loadu_ps(x + j * ldx + t);
    for (int i = 0; i < MQ; ++i) {
      const __m256 qv = _mm256_loadu_ps(q + i * ldq + t);
      for (int j = 0; j < MX; ++j) acc[i][j] = _mm256_fmadd_ps(qv, xv[j], acc[i][j]);
    }
  }
  if (t < d) {
    const __m256i m = tail_mask(d - t);
    __m256 xv[MX];
    for (int j = 0; j < MX; ++j) xv[j] = _mm256_maskload_ps(x + j * ldx + t, m);
    for (int i = 0; i < MQ; ++i) {
      const __m256 qv = _mm256_maskload_ps(q + i * ldq + t, m);
      for (int j = 0; j < MX; ++j) acc[i][j] = _mm256_fmadd_ps(qv, xv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MQ; ++i)
    for (int j = 0; j < MX; ++j) out[i * ldo + j] = hsum(acc[i][j]);
}

constexpr int BQ = 2;
constexpr int BX = 4;
using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);

// Plain arrays (no std:: templates instantiated with these ISA flags).
const MicroFn kMicro[BQ][BX] = {
    {&micro<1,1>, &micro<1,2>, &micro<1,3>, &micro<1,4>},
    {&micro<2,1>, &micro<2,2>, &micro<2,3>, &micro<2,4>}};

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

inline __m256 load_f16(const uint16_t* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
inline __m256 load_u8(const uint8_t* x) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x))));
}
inline float f16_scalar(uint16_t h) { return _cvtsh_ss(h); }

void axpy_f32(float* y, const float* x, float a, int64_t d) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t t = 0;
  for (; t + W <= d; t += W)
    _mm256_storeu_ps(y + t, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + t), _mm256_loadu_ps(y + t)));
  for (; t < d; ++t) y[t] = __builtin_fmaf(a, x[t], y[t]);
}
void axpy_f16(float* y, const uint16_t* x, float a, int64_t d) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t t = 0;
  for (; t + W <= d; t += W)
    _mm256_storeu_ps(y + t, _mm256_fmadd_ps(av, load_f16(x + t), _mm256_loadu_ps(y + t)));
  for (; t < d; ++t) y[t] = __builtin_fmaf(a, f16_scalar(x[t]), y[t]);
}
void axpy_u8(float* y, const uint8_t* x, float a, float b, int64_t d) {
  const __m256 av = _mm256_set1_ps(a);
  const __m256 bv = _mm256_set1_ps(b);
  int64_t t = 0;
  for (; t + W <= d; t += W)
    _mm256_storeu_ps(y + t, _mm256_add_ps(_mm256_loadu_ps(y + t), _mm256_fmadd_ps(av, load_u8(x + t), bv)));
  for (; t < d; ++t) y[t] += __builtin_fmaf(a, static_cast<float>(x[t]), b);
}
void max_f32(float* y, const float* x, int64_t d) {
  int64_t t = 0;
  for (; t + W <= d; t += W)
    _mm256_storeu_ps(y + t, _mm256_max_ps(_mm256_loadu_ps(x + t), _mm256_loadu_ps(y + t)));
  for (; t < d; ++t) y[t] = x[t] > y[t] ? x[t] : y[t];
}
void max_f16(float* y, const uint16_t* x, int64_t d) {
  int64_t t = 0;
  for (; t + W <= d; t += W)
    _mm256_storeu_ps(y + t, _mm256_max_ps(load_f16(x + t), _mm256_loadu_ps(y + t)));
  for (; t < d; ++t) {
    const float v = f16_scalar(x[t]);
    y[t] = v > y[t] ? v : y[t];
  }
}
void max_u8(float* y, const uint8_t* x, float a, float b, int64_t d) {
  const __m256 av = _mm256_set1_ps(a);
  const __m256 bv = _mm256_set1_ps(b);
  int64_t t = 0;
  for (; t + W <= d; t += W)
    _mm256_storeu_ps(y + t, _mm256_max_ps(_mm256_fmadd_ps(av, load_u8(x + t), bv), _mm256_loadu_ps(y + t)));
  for (; t < d; ++t) {
    const float v = __builtin_fmaf(a, static_cast<float>(x[t]), b);
    y[t] = v > y[t] ? v : y[t];
  }
}
void scale(float* y, float a, int64_t d) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t t = 0;
  for (; t + W <= d; t += W) _mm256_storeu_ps(y + t, _mm256_mul_ps(_mm256_loadu_ps(y + t), av));
  for (; t < d; ++t) y[t] *= a;
}

struct Isa {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int NR = 8;  // 64 floats of a row per block
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float f) { return _mm256_set1_ps(f); }
  static V ld32(const float* p, int n) { return n == W ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask(n)); }
  static V ld16(const uint16_t* p, int n) {
    if (n == W) return load_f16(p);
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < n; ++j) buf[j] = p[j];
    return load_f16(buf);
  }
  static V ld8(const uint8_t* p, int n) {
    if (n == W) return load_u8(p);
    alignas(16) uint8_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < n; ++j) buf[j] = p[j];
    return load_u8(buf);
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static void st(float* p, V v, int n) {
    if (n == W) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, tail_mask(n), v);
  }
};

#include "rows_impl.hpp"

void pool_bags(const PoolArgs& a, int64_t b0, int64_t b1) { pool_bags_impl<Isa>(a, b0, b1); }
void spmm_rows(const SpmmArgs& a, int64_t r0, int64_t r1) { spmm_rows_impl<Isa>(a, r0, r1); }

const KernelTable kTable = {"avx2", dot_tile, axpy_f32, axpy_f16, axpy_u8,
                            max_f32, max_f16, max_u8, scale, pool_bags, spmm_rows};

}  // namespace

const KernelTable& avx2_table() { return kTable; }

}  // namespace rec_engine::kernels
