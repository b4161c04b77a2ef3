// Portable kernels: the reference every SIMD level is tested against, and the fallback.
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

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

// The reference row loops: the per-row kernels above, applied in order (no per-id dispatch).
template <class Index>
void pool_bags_t(const PoolArgs& a, int64_t b0, int64_t b1) {
  const int64_t d = a.dim;
  const Index* ids = static_cast<const Index*>(a.ids);
  const float* sb = a.scale_bias;
  for (int64_t b = b0; b < b1; ++b) {
    float* y = a.out + b * d;
    const int64_t lo = a.offsets[b], hi = a.offsets[b + 1];
    const float init = (a.op == PoolOp::max && hi > lo) ? -std::numeric_limits<float>::infinity() : 0.f;
    for (int64_t t = 0; t < d; ++t) y[t] = init;
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t r = static_cast<int64_t>(ids[i]);
      if (a.op == PoolOp::max) {
        switch (a.storage) {
          case PoolStorage::f32: max_f32(y, static_cast<const float*>(a.data) + r * d, d); break;
          case PoolStorage::f16: max_f16(y, static_cast<const uint16_t*>(a.data) + r * d, d); break;
          case PoolStorage::u8:
            max_u8(y, static_cast<const uint8_t*>(a.data) + r * d, sb[2 * r], sb[2 * r + 1], d);
            break;
        }
      } else {
        const float w = a.weights != nullptr ? a.weights[i] : 1.f;
        switch (a.storage) {
          case PoolStorage::f32: axpy_f32(y, static_cast<const float*>(a.data) + r * d, w, d); break;
          case PoolStorage::f16: axpy_f16(y, static_cast<const uint16_t*>(a.data) + r * d, w, d); break;
          case PoolStorage::u8:
            axpy_u8(y, static_cast<const uint8_t*>(a.data) + r * d, w * sb[2 * r], w * sb[2 * r + 1], d);
            break;
        }
      }
    }
    if (a.op == PoolOp::mean && hi > lo) scale(y, 1.f / static_cast<float>(hi - lo), d);
  }
}

void pool_bags(const PoolArgs& a, int64_t b0, int64_t b1) {
  if (a.ids64) pool_bags_t<int64_t>(a, b0, b1);
  else pool_bags_t<int32_t>(a, b0, b1);
}

void spmm_rows(const SpmmArgs& a, int64_t r0, int64_t r1) {
  const int64_t d = a.d;
  std::vector<float> row(a.next == nullptr ? static_cast<size_t>(d) : 0);
  for (int64_t r = r0; r < r1; ++r) {
    float* y = a.next != nullptr ? a.next + r * d : row.data();
    std::memset(y, 0, sizeof(float) * d);
    for (int64_t i = a.indptr[r]; i < a.indptr[r + 1]; ++i)
      axpy_f32(y, a.x + static_cast<int64_t>(a.indices[i]) * d, a.data[i], d);
    if (a.acc != nullptr) {
      float* o = a.acc + r * d;
      if (a.x0 != nullptr) {
        std::memset(o, 0, sizeof(float) * d);
        axpy_f32(o, a.x0 + r * d, a.w0, d);
      }
      axpy_f32(o, y, a.w, d);
    }
  }
}

const KernelTable kTable = {"scalar", dot_tile, axpy_f32, axpy_f16, axpy_u8,
                            max_f32,  max_f16,  max_u8,   scale, pool_bags, spmm_rows};

}  // namespace

const KernelTable& scalar_table() { return kTable; }

}  // namespace rec_engine::kernels
