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

}  // namespace rec_engine
