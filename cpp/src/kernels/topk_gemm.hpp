// Register-blocked score kernels for full top-k scans (internal header). Items are scored one panel of
// kPanel items at a time, laid out so that a kernel reads them as contiguous 16-lane vectors:
//   float32: panel[t * kPanel + j]              (packed per call from the row-major items)
//   int8:    panel[(t4 * kPanel + j) * 4 + r]   (dimension t = 4 * t4 + r; packed once by quantize)
//   bf16:    panel[(t2 * kPanel + j) * 2 + r]   (dimension t = 2 * t2 + r; packed once by quantize)
// Every float32 score is one FMA chain over t = 0 .. d-1 from 0, so it does not depend on how the work
// was split into tiles, panels or threads.
#pragma once
#include <cstdint>

namespace rec_engine::topk_gemm {

constexpr int64_t kPanel = 64;
// The most queries stream_f32 takes. Measured on Zen 5 (1M x 64, 1 thread): 4-6 queries streamed two a pass
// took 11.9-17 ms against 9.7-11 ms packed; 3 queries about level (10.5-11 ms either way), so 1-3 stream.
constexpr int64_t kStreamQueries = 3;

struct Table {
  // Packs rows x[j * ldx .. + d) for j < nx (nx <= kPanel) into panel; missing items are zero.
  void (*pack_f32)(const float* x, int64_t nx, int64_t ldx, int64_t d, float* panel);
  // out[i * ldo + j] = <q_i, x_j> for i < nq, j < kPanel.
  void (*score_f32)(const float* q, int64_t nq, int64_t ldq, const float* panel, int64_t d, float* out,
                    int64_t ldo);
  // For each row a < nq of tile (row stride ld): bit j of masks[a] is set, for j < n (n <= kPanel), when
  // tile[a * ld + j] >= thr[a] or is NaN. One call per panel visit instead of one per query: after the
  // first panels almost every mask is 0 and the scan goes on without touching the selections.
  void (*filter_tile)(const float* tile, int64_t nq, int64_t ld, int64_t n, const float* thr, uint64_t* masks);
  // Scores s_ij = (sum_t qu_i[t] * x_j[t] - corr[j]) * scale[j] (qu u8 = q + 128, x s8) of nq queries x
  // kPanel items, compared with thr[i] as filter_tile does (n = kPanel; the caller masks a short panel's
  // tail): writes masks[i], and out[i * ldo + 16 v ..] only for the 16-score vectors v with a bit set.
  // nullptr when the CPU lacks AVX512-VNNI.
  void (*score_i8_filter)(const uint8_t* q, int64_t nq, int64_t ldq, const int8_t* panel, int64_t d4,
                          const int32_t* corr, const float* scale, const float* thr, float* out, int64_t ldo,
                          uint64_t* masks);
  // out[i * ldo + j] = bf16 dot products (vdpbf16ps); nullptr when the CPU lacks AVX512-BF16.
  void (*score_bf16)(const uint16_t* q, int64_t nq, int64_t ldq, const uint16_t* panel, int64_t d2,
                     float* out, int64_t ldo);
  // Streaming scan of nq <= kStreamQueries queries over n row-major items x + j * ldx, read once in memory order, one
  // panel of kPanel items after another. A score is <q_i, x_j> summed exactly as
  // kernels::KernelTable::dot_tile at the same level sums it (one accumulator over 16-lane chunks, then
  // the lanes reduced in _mm512_reduce_add_ps's order). With thr: bit j of masks[i] is set when item j of
  // the current panel scores >= thr[i] or NaN (as filter_tile); the scan goes on to the next panel while
  // no bit is set and stops after the first panel with one, which out[i * ldo + j] then holds (the rows
  // of the queries with a bit set). Without thr (masks unused) it stops after the first panel and out
  // holds all nq rows (0 past the items). Returns the number of items gone through: the panel described
  // starts at ((returned - 1) / kPanel) * kPanel.
  int64_t (*stream_f32)(const float* q, int64_t nq, int64_t ldq, const float* x, int64_t n, int64_t ldx,
                        int64_t d, const float* thr, float* out, int64_t ldo, uint64_t* masks);
  // score_i8_filter over n_panels consecutive panels (kPanel * d4 * 4 bytes apart; corr and scale advance
  // kPanel a panel) until one has a mask bit set: returns the panels gone through, the last of which
  // out and masks describe (as score_i8_filter does). nullptr when the CPU lacks AVX512-VNNI.
  int64_t (*scan_i8_filter)(const uint8_t* q, int64_t nq, int64_t ldq, const int8_t* panels, int64_t n_panels,
                            int64_t d4, const int32_t* corr, const float* scale, const float* thr, float* out,
                            int64_t ldo, uint64_t* masks);
  // score_bf16 over n_panels consecutive panels (kPanel * d2 * 2 values apart), each compared with thr as
  // filter_tile does, until one has a mask bit set: returns the panels gone through, the last of which
  // out (all nq rows) and masks describe. nullptr when the CPU lacks AVX512-BF16.
  int64_t (*scan_bf16_filter)(const uint16_t* q, int64_t nq, int64_t ldq, const uint16_t* panels,
                              int64_t n_panels, int64_t d2, const float* thr, float* out, int64_t ldo,
                              uint64_t* masks);
  // Packs rows x[j * ldx .. + d) for j < nx (nx <= kPanel), converted to bf16 (round to nearest even;
  // denormal values become zero), into a bf16 panel of (d + 1) / 2 pairs as quantize_items lays it out;
  // missing items and the odd dimension's pair half are zero. nullptr when the CPU lacks AVX512-BF16.
  void (*pack_bf16)(const float* x, int64_t nx, int64_t ldx, int64_t d, uint16_t* panel);
};

// The table for the SIMD level in use, or nullptr (scalar and avx2 levels use the portable path).
const Table* active();

// AMX-BF16 (Sapphire Rapids and later, Linux): the bf16 score kernel of the avx512 table runs queries in
// blocks of 16 on the tiles when the CPU has them and this process was granted them (REC_ENGINE_AMX=0 in
// the environment: never asked). amx_enabled: available, switched on (set_amx, default on) and the avx512
// level in use.
bool amx_available();
bool amx_enabled();
void set_amx(bool on);

#if defined(REC_ENGINE_HAVE_X86_KERNELS)
const Table& avx512_table();
// topk_gemm_amx.cpp: whether the tiles take nq queries of d2 pairs (nq >= 16, d2 a multiple of 16 up to 64),
// then out rows [0, returned) (nq rounded down to 16) as score_bf16 writes them
bool amx_bf16_takes(int64_t nq, int64_t d2);
int64_t score_bf16_amx(const uint16_t* q, int64_t nq, int64_t ldq, const uint16_t* panel, int64_t d2, float* out,
                       int64_t ldo);
#endif

}  // namespace rec_engine::topk_gemm
