// Portable kernels: the reference every SIMD level is tested against, and the fallback.
#include <algorithm>
#include <cstring>

#include "kernels.hpp"

namespace rec_engine::kernels {

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal half: normalize
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

namespace {

void dot_tile(const float* q, int64_t nq, int64_t ldq, const float* x, int64_t nx, int64_t ldx,
              int64_t d, float* out, int64_t ldo) {
  for (int64_t i = 0; i < nq; ++i) {
    const float* qi = q + i * ldq;
    for (int64_t j = 0; j < nx; ++j) {
      const float* xj = x + j * ldx;
      float s = 0.f;
      for (int64_t t = 0; t < d; ++t) s += qi[t] * xj[t];
      out[i * ldo + j] = s;
    }
  }
}

void axpy_f32(float* y, const float* x, float a, int64_t d) {
  for (int64_t t = 0; t < d; ++t) y[t] += a * x[t];
}
void axpy_f16(float* y, const uint16_t* x, float a, int64_t d) {
  for (int64_t t = 0; t < d; ++t) y[t] += a * half_to_float(x[t]);
}
void axpy_u8(float* y, const uint8_t* x, float a, float b, int64_t d) {
  for (int64_t t = 0; t < d; ++t) y[t] += a * static_cast<float>(x[t]) + b;
}
void max_f32(float* y, const float* x, int64_t d) {
  for (int64_t t = 0; t < d; ++t) y[t] = std::max(y[t], x[t]);
}
void max_f16(float* y, const uint16_t* x, int64_t d) {
  for (int64_t t = 0; t < d; ++t) y[t] = std::max(y[t], half_to_float(x[t]));
}
void max_u8(float* y, const uint8_t* x, float a, float b, int64_t d) {
  for (int64_t t = 0; t < d; ++t) y[t] = std::max(y[t], a * static_cast<float>(x[t]) + b);
}
void scale(float* y, float a, int64_t d) {
  for (int64_t t = 0; t < d; ++t) y[t] *= a;
}

const KernelTable kTable = {"scalar", dot_tile, axpy_f32, axpy_f16, axpy_u8,
                            max_f32,  max_f16,  max_u8,   scale};

}  // namespace

const KernelTable& scalar_table() { return kTable; }

}  // namespace rec_engine::kernels
