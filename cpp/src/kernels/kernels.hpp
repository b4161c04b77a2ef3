// The table of instruction-set specific kernels. One instance per level lives in its own source file,
// compiled with that level's flags; dispatch.cpp picks one at run time. Internal header.
#pragma once
#include <cstdint>

namespace rec_engine::kernels {

// One call pools bags [b0, b1) of an embedding table (see rec_engine::pool for the semantics). The
// per-id work (storage type, index type, mode) is resolved once per call inside the ISA file, the row
// loop runs there with the bag's accumulators in registers, and each element sees exactly the operations
// of the axpy/max/scale kernels below, in the same order, so results equal the row-at-a-time path.
enum class PoolStorage : int { f32 = 0, f16 = 1, u8 = 2 };
enum class PoolOp : int { sum = 0, mean = 1, max = 2 };
struct PoolArgs {
  PoolStorage storage;
  const void* data;          // rows x dim
  const float* scale_bias;   // u8 only: rows x 2
  int64_t dim;
  const void* ids;           // int32 or int64
  bool ids64;
  const int64_t* offsets;    // n_bags + 1
  const float* weights;      // per id, or null (sum only)
  PoolOp op;
  float* out;                // n_bags x dim
};

// One call of a CSR x dense product over rows [r0, r1): next[r] = sum_i data[i] * x[indices[i]]
// (y = 0, then y = fma(data[i], x_row, y) in index order, as axpy_f32); when acc is not null, also
// acc[r] = fma(w, next[r], acc[r]) (when x0 is not null, acc[r] = fma(w0, x0[r], 0) first). next may
// be null when only acc is wanted (the last layer of a propagation).
struct SpmmArgs {
  const int64_t* indptr;
  const int32_t* indices;
  const float* data;
  const float* x;
  int64_t d;
  float* next;         // optional when acc is given
  float* acc;          // optional
  float w;
  const float* x0;     // optional: initialize acc from w0 * x0 before adding
  float w0;
};

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
  void (*pool_bags)(const PoolArgs& a, int64_t b0, int64_t b1);
  void (*spmm_rows)(const SpmmArgs& a, int64_t r0, int64_t r1);
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
