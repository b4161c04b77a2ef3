// The table of instruction-set specific kernels. One instance per level lives in its own source file,
// compiled with that level's flags; dispatch.cpp picks one at run time. Internal header.
#pragma once
#include <cstdint>

namespace rec_engine::kernels {

struct KernelTable {
  const char* name;
  // out[i * ldo + j] = <q_i, x_j> for i < nq, j < nx; q_i = q + i * ldq, x_j = x + j * ldx.
  // Each pair is summed in the same order whatever nq and nx are, so a score does not depend on how
  // the work was split into tiles or threads.
  void (*dot_tile)(const float* q, int64_t nq, int64_t ldq, const float* x, int64_t nx, int64_t ldx,
                   int64_t d, float* out, int64_t ldo);
  // y += a * x
  void (*axpy_f32)(float* y, const float* x, float a, int64_t d);
  void (*axpy_f16)(float* y, const uint16_t* x, float a, int64_t d);
  // y += a * x + b  (row-wise int8: a = w * scale, b = w * bias)
  void (*axpy_u8)(float* y, const uint8_t* x, float a, float b, int64_t d);
  // y = max(y, x)
  void (*max_f32)(float* y, const float* x, int64_t d);
  void (*max_f16)(float* y, const uint16_t* x, int64_t d);
  void (*max_u8)(float* y, const uint8_t* x, float a, float b, int64_t d);
  // y *= a
  void (*scale)(float* y, float a, int64_t d);
};

const KernelTable& scalar_table();
#if defined(REC_ENGINE_HAVE_X86_KERNELS)
const KernelTable& avx2_table();
const KernelTable& avx512_table();
#endif

// The table in use (one atomic load; take it once per call or per block, never per element).
const KernelTable& active();

// IEEE half -> float without F16C (used by the scalar table and tests).
float half_to_float(uint16_t h);

}  // namespace rec_engine::kernels
