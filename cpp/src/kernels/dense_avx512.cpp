// AVX-512 kernels of the dense part (rec_engine/dense.hpp). Compiled with AVX-512 flags for this file only;
// every helper stays in the anonymous namespace so no AVX-512 code can be linked into baseline callers.
#include <immintrin.h>

#include "dense_kernels.hpp"

namespace rec_engine::dense_kernels {
namespace {

static_assert(kPanel == 80, "the tile holds 5 vectors of 16 outputs a row");
constexpr int kRows = 5;   // 5 rows x 5 vectors: 25 accumulators, 5 weight vectors and a broadcast of 32 registers

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// MR rows x one panel: the accumulators start at the bias, take one broadcast of A and the panel's 5 vectors
// per k, and are stored (ReLU'd) once.
template <int MR>
inline void tile(const float* A, int64_t lda, const float* B, int64_t K, const float* bias, float* Y, int64_t ldy,
                 bool relu) {
  __m512 c[MR][5];
  for (int j = 0; j < 5; ++j) {
    const __m512 b = _mm512_loadu_ps(bias + 16 * j);
    for (int i = 0; i < MR; ++i) c[i][j] = b;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * kPanel;
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), b2 = _mm512_loadu_ps(b + 32),
                 b3 = _mm512_loadu_ps(b + 48), b4 = _mm512_loadu_ps(b + 64);
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + k]);
      c[i][0] = _mm512_fmadd_ps(a, b0, c[i][0]);
      c[i][1] = _mm512_fmadd_ps(a, b1, c[i][1]);
      c[i][2] = _mm512_fmadd_ps(a, b2, c[i][2]);
      c[i][3] = _mm512_fmadd_ps(a, b3, c[i][3]);
      c[i][4] = _mm512_fmadd_ps(a, b4, c[i][4]);
    }
  }
  const __m512 z = _mm512_setzero_ps();   // max(0, c): a NaN stays a NaN (maxps returns its second operand)
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 5; ++j) _mm512_storeu_ps(Y + i * ldy + 16 * j, relu ? _mm512_max_ps(z, c[i][j]) : c[i][j]);
}

void layer(const float* A, int64_t lda, int64_t rows, int64_t K, const float* packed, int64_t panels,
           const float* bias, float* Y, int64_t ldy, bool relu) {
  // panel by panel over all rows: a panel (K x 80 floats, 128 KB at K = 400) stays in L2 while the rows pass
  for (int64_t p = 0; p < panels; ++p) {
    const float* B = packed + p * K * kPanel;
    const float* bp = bias + p * kPanel;
    float* Yp = Y + p * kPanel;
    int64_t i = 0;
    for (; i + kRows <= rows; i += kRows) tile<kRows>(A + i * lda, lda, B, K, bp, Yp + i * ldy, ldy, relu);
    switch (rows - i) {
      case 4: tile<4>(A + i * lda, lda, B, K, bp, Yp + i * ldy, ldy, relu); break;
      case 3: tile<3>(A + i * lda, lda, B, K, bp, Yp + i * ldy, ldy, relu); break;
      case 2: tile<2>(A + i * lda, lda, B, K, bp, Yp + i * ldy, ldy, relu); break;
      case 1: tile<1>(A + i * lda, lda, B, K, bp, Yp + i * ldy, ldy, relu); break;
      default: break;
    }
  }
}

void dot_rows(const float* h, int64_t ldh, int64_t rows, int64_t K, const float* w, float b, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = h + r * ldh;
    __m512 acc = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), acc);
    if (k < K) {
      const __mmask16 m = tail_mask(K - k);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), _mm512_maskz_loadu_ps(m, w + k), acc);
    }
    out[r] = b + _mm512_reduce_add_ps(acc);
  }
}

void fm_rows(const float* emb, const float* lin, int64_t rows, int64_t F, int64_t d, float* fm, float* lsum) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* e = emb + r * F * d;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t t = 0; fm != nullptr && t < d; t += 16) {
      const __mmask16 m = d - t >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(d - t);
      __m512 s = _mm512_setzero_ps(), q = _mm512_setzero_ps();
      for (int64_t f = 0; f < F; ++f) {
        const __m512 v = _mm512_maskz_loadu_ps(m, e + f * d + t);
        s = _mm512_add_ps(s, v);
        q = _mm512_add_ps(q, _mm512_mul_ps(v, v));
      }
      acc = _mm512_add_ps(acc, _mm512_sub_ps(_mm512_mul_ps(s, s), q));
    }
    if (fm != nullptr) fm[r] = _mm512_reduce_add_ps(acc);
    const float* l = lin + r * F;
    float ls = 0.f;
    for (int64_t f = 0; f < F; ++f) ls += l[f];
    lsum[r] = ls;
  }
}

const Table kTable = {layer, dot_rows, fm_rows};

}  // namespace

const Table& avx512_table() { return kTable; }

}  // namespace rec_engine::dense_kernels
