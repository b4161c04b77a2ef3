// The dense part's SIMD kernels (see rec_engine/dense.hpp). Internal header.
#pragma once
#include <cstdint>

namespace rec_engine::dense_kernels {

// Outputs per packed panel: a layer's weights W [out, in] are stored as ceil(out / kPanel) panels, panel p
// holding in x kPanel values P[k * kPanel + j] = W[p * kPanel + j][k] (0 past out).
constexpr int64_t kPanel = 80;

struct Table {
  // Y[i * ldy + p * kPanel + j] = act(bias[p * kPanel + j] + sum_k A[i * lda + k] * P_p[k * kPanel + j]) for
  // i < rows, every panel p < panels, j < kPanel (bias padded to panels * kPanel; ldy >= panels * kPanel).
  void (*layer)(const float* A, int64_t lda, int64_t rows, int64_t K, const float* packed, int64_t panels,
                const float* bias, float* Y, int64_t ldy, bool relu);
  // out[r] = b + sum_k h[r * ldh + k] * w[k]
  void (*dot_rows)(const float* h, int64_t ldh, int64_t rows, int64_t K, const float* w, float b, float* out);
  // fm[r] = sum_t((sum_f e[f][t])^2 - sum_f e[f][t]^2) (skipped when fm is null), lsum[r] = sum_f l[f] (fields
  // summed in order)
  void (*fm_rows)(const float* emb, const float* lin, int64_t rows, int64_t F, int64_t d, float* fm, float* lsum);
};

#if defined(REC_ENGINE_HAVE_X86_KERNELS)
const Table& avx512_table();
#endif

#if defined(REC_ENGINE_HAVE_AMX)
// dense_amx.cpp (bf16x3 / bf16 on AMX tiles; layouts there). A': rows32 (a multiple of 32) rows of K32 (a
// multiple of 32) inputs, each split into its bf16 hi part and, with x3, its lo part; rows past `rows` and inputs
// past K are zeros.
void pack_rows_bf16(const float* A, int64_t lda, int64_t rows, int64_t K, uint16_t* Ap, int64_t rows32, int64_t K32,
                    bool x3);
// C[i * n32 + j] = relu(bias[j] + sum_k A[i][k] W[j][k]) for i < rows32, j < n32 (a multiple of 32; bias padded
// with zeros) from A' and B' (x3: bf16x3's three products a term, else bf16's hi hi); when next is not null,
// also the next layer's A' of C (K32 = n32; its lo parts only with x3).
void layer_bf16_amx(const uint16_t* Ap, int64_t rows32, int64_t K32, const uint16_t* Bp, int64_t n32,
                    const float* bias, float* C, uint16_t* next, bool x3);
// out[r] >= the 2-norm of A's row r (n values; float32 sums of squares, raised by their rounding's bound)
void row_norms(const float* A, int64_t lda, int64_t rows, int64_t n, double* out);
#endif

}  // namespace rec_engine::dense_kernels
