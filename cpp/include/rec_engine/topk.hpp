// Exact top-k retrieval by inner product or cosine similarity, with per-query exclusion and candidate
// subsets. Items are scored block by block with a running selection per query, so memory stays at
// O(B * k) plus a fixed scratch per thread: the B x N score matrix is never materialized.
#pragma once
#include <cstdint>

namespace rec_engine {

enum class Metric { inner_product, cosine };

// Per-query id lists in CSR form: the ids of query q are ids[indptr[q] .. indptr[q+1]).
struct IdLists {
  const int64_t* indptr = nullptr;  // B + 1 entries, or nullptr for "no list"
  const int64_t* ids = nullptr;
};

struct TopkOptions {
  int64_t k = 10;
  Metric metric = Metric::inner_product;
  IdLists exclude;     // items never returned for that query (e.g. already seen)
  IdLists candidates;  // when set, only these items are scored for that query
  int num_threads = 0; // <= 0: the default (OpenMP's), 1: serial
};

// Number of result columns: min(k, n_items).
int64_t topk_width(int64_t k, int64_t n_items);

// queries: B x d, items: N x d, both row-major and contiguous. out_ids and out_scores: B x topk_width.
// Row q holds the best items best first (ties: lower id first); when fewer than width items are
// eligible the row is padded with id -1 and score -inf. Throws std::invalid_argument for k < 0, a
// non-finite query, NaN scores (NaN in items) or malformed id lists, std::out_of_range for ids
// outside [0, N) (the message names query and position).
void topk(const float* queries, int64_t n_queries, const float* items, int64_t n_items, int64_t dim,
          const TopkOptions& options, int64_t* out_ids, float* out_scores);

// Reduced precision (opt-in): items converted once to bfloat16 or int8 (symmetric, one scale per item)
// in a panel layout; a scan in that precision keeps a shortlist per query, which is re-scored exactly in
// float32 from the original items. Returned scores are exact. With the items' norms (quantized_norms) the
// ids are exact too: each query's shortlist is checked against a rigorous bound on the reduced-precision
// error (no item left out can reach the k-th score), and a query that fails the check is scanned again in
// float32 (first with a 4x shortlist). Without them the ids are those of the exact top-k unless a true top-k item fell out of the
// shortlist (recall < 1 is possible).
enum class Precision { bf16, int8 };

struct QuantizedItems {  // views of arrays filled by quantize_items (not owned)
  Precision precision = Precision::int8;
  int64_t n_items = 0, dim = 0;
  const uint8_t* packed = nullptr;  // quantized_bytes(...) bytes
  const int32_t* corr = nullptr;    // int8: 128 * sum of the item's int8 values; quantized_rows entries
  const float* scale = nullptr;     // int8: the item's scale; quantized_rows entries
  // Exact mode: the float32 rows' L2 norms from quantized_norms (n_items entries). nullptr: the shortlist
  // is trusted (approximate ids). heavy: sorted ids of items re-scored for every query whatever their
  // reduced-precision score (a few of outsized norm or scale, which would otherwise widen every bound);
  // norm_max / scale_max: the maxima of norm and scale over the other items; *_all_max: over all items.
  const float* norm = nullptr;
  const int64_t* heavy = nullptr;
  int64_t n_heavy = 0;
  float norm_max = 0.f, scale_max = 0.f, norm_all_max = 0.f, scale_all_max = 0.f;
};

int64_t quantized_rows(int64_t n_items);  // n_items rounded up to whole panels
// Whether the SIMD level in use scans that precision with its own kernels (int8: AVX512-VNNI, bf16:
// AVX512-BF16, at the avx512 level), which also lets a bf16 index without packed panels convert them.
bool reduced_kernels(Precision precision);
// The bf16 scans of 16 queries or more on AMX-BF16 tiles (Intel Sapphire Rapids and later, Linux): whether
// this process can (the CPU has them and the kernel granted them; REC_ENGINE_AMX=0 in the environment: not
// asked), whether they are in use now (available, switched on and the avx512 level in use), and the switch
// (on by default; the scores are the same sums of bf16 products, see topk_gemm_amx.cpp).
bool amx_available();
bool amx_enabled();
void set_amx(bool on);
int64_t quantized_bytes(Precision precision, int64_t n_items, int64_t dim);
// Throws std::invalid_argument for a non-finite item value.
void quantize_items(const float* items, int64_t n_items, int64_t dim, Precision precision, uint8_t* packed,
                    int32_t* corr, float* scale, int num_threads);
// Per-item norms for the exact mode: norm[i] >= the L2 norm of items[i] (computed in double, rounded up
// to float); the same for both precisions.
void quantized_norms(const float* items, int64_t n_items, int64_t dim, Precision precision, float* norm,
                     int num_threads);
// Inner product only; options.candidates must be unset (candidate subsets are scored exactly by topk).
// shortlist: candidates kept per query before the exact re-scoring (clamped to [width, n_items]).
// n_fallback (optional, exact mode): set to the number of queries whose shortlist failed the check (or
// whose values could overflow) and were scanned again: with a 4x shortlist, then, if need be, in float32
// (results as topk's for a batch of 4 or more queries: the packed scores).
void topk_quantized(const float* queries, int64_t n_queries, const float* items, const QuantizedItems& index,
                    const TopkOptions& options, int64_t shortlist, int64_t* out_ids, float* out_scores,
                    int64_t* n_fallback = nullptr);

}  // namespace rec_engine
