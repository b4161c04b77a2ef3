// Exact top-k by inner product or cosine with exclusion and candidate subsets.
//
// Full scans score block by block (a tile of up to kQueryTile queries x kItemBlock items, small enough
// for L2) and keep a running selection (bounded heap) per query. Large batches are split by queries
// (each thread owns a contiguous range of queries and scans all items); a single query or a small batch
// is split by items (one contiguous item range per thread, selections merged at the end). Memory stays
// at O(threads * min(B, kQueryGroup) * k) plus the output, never B x N. Candidate subsets are scored
// per query (parallel over queries).
#include "rec_engine/topk.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/kernels.hpp"
#include "parallel.hpp"

namespace rec_engine {
namespace {

constexpr int64_t kItemBlock = 256;    // items scored per tile
constexpr int64_t kQueryTile = 64;     // queries scored per tile
constexpr int64_t kQueryGroup = 1024;  // queries whose selections are held at once
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kNoNan = std::numeric_limits<int64_t>::max();

struct Entry {
  float score;
  int64_t id;
};

// a ranks before b: higher score, then lower id.
inline bool better(const Entry& a, const Entry& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

// A bounded selection: a heap with the worst kept entry on top.
class Selection {
 public:
  Selection(Entry* storage, int64_t capacity) : data_(storage), cap_(capacity) {}

  float threshold() const { return size_ < cap_ ? kNegInf : data_[0].score; }
  bool accepts(const Entry& e) const { return size_ < cap_ || better(e, data_[0]); }
  void push(const Entry& e) {  // the caller checked accepts()
    if (size_ < cap_) {
      data_[size_++] = e;
      std::push_heap(data_, data_ + size_, better);
    } else {
      std::pop_heap(data_, data_ + size_, better);
      data_[size_ - 1] = e;
      std::push_heap(data_, data_ + size_, better);
    }
  }
  void offer(const Entry& e) {
    if (accepts(e)) push(e);
  }
  int64_t size() const { return size_; }
  const Entry* begin() const { return data_; }
  const Entry* end() const { return data_ + size_; }
  // Best first; leaves the storage sorted (no longer a heap).
  void write_sorted(int64_t width, int64_t* ids, float* scores) {
    std::sort(data_, data_ + size_, better);
    for (int64_t i = 0; i < width; ++i) {
      ids[i] = i < size_ ? data_[i].id : -1;
      scores[i] = i < size_ ? data_[i].score : kNegInf;
    }
  }

 private:
  Entry* data_;
  int64_t cap_;
  int64_t size_ = 0;
};

// Per-query sorted id lists (copied, so the caller's arrays are never touched).
class SortedLists {
 public:
  SortedLists() = default;
  SortedLists(const IdLists& lists, int64_t n_queries, bool dedupe) {
    if (lists.indptr == nullptr) return;
    indptr_.assign(lists.indptr, lists.indptr + n_queries + 1);
    ids_.assign(lists.ids, lists.ids + indptr_[n_queries]);
    for (int64_t q = 0; q < n_queries; ++q) {
      auto b = ids_.begin() + indptr_[q], e = ids_.begin() + indptr_[q + 1];
      std::sort(b, e);
      ends_.push_back(dedupe ? std::unique(b, e) - ids_.begin() : indptr_[q + 1]);
    }
  }
  bool active() const { return !indptr_.empty(); }
  const int64_t* begin(int64_t q) const { return ids_.data() + indptr_[q]; }
  const int64_t* end(int64_t q) const { return ids_.data() + ends_[q]; }
  bool contains(int64_t q, int64_t id) const {
    return active() && std::binary_search(begin(q), end(q), id);
  }

 private:
  std::vector<int64_t> indptr_, ids_, ends_;
};

void check_lists(const IdLists& lists, int64_t n_queries, int64_t n_items, const char* what) {
  if (lists.indptr == nullptr) return;
  if (lists.indptr[0] != 0)
    throw std::invalid_argument(std::string(what) + " indptr[0] must be 0, got " +
                                std::to_string(lists.indptr[0]));
  for (int64_t q = 0; q < n_queries; ++q) {
    if (lists.indptr[q + 1] < lists.indptr[q])
      throw std::invalid_argument(std::string(what) + " indptr must be non-decreasing (at query " +
                                  std::to_string(q) + ")");
    for (int64_t p = lists.indptr[q]; p < lists.indptr[q + 1]; ++p) {
      const int64_t id = lists.ids[p];
      if (id < 0 || id >= n_items)
        throw std::out_of_range(std::string(what) + " of query " + std::to_string(q) + ", position " +
                                std::to_string(p - lists.indptr[q]) + ": item id " + std::to_string(id) +
                                " is out of range for " + std::to_string(n_items) + " items");
    }
  }
}

inline float inv_norm(const kernels::KernelTable& k, const float* v, int64_t d) {
  float n2;
  k.dot_tile(v, 1, d, v, 1, d, d, &n2, 1);
  return n2 > 0.f ? 1.f / std::sqrt(n2) : 0.f;
}

struct Problem {
  const float* queries;
  const float* items;
  int64_t n_queries, n_items, d, width;
  bool cosine;
  const std::vector<float>* query_inv;  // cosine only
  const std::vector<float>* item_inv;   // cosine full scan only
  const SortedLists* exclude;
};

// Offers score s of item id to query q's selection; records NaN scores.
inline void consider(const Problem& p, int64_t q, Selection& sel, float& thr, float s, int64_t id,
                     int64_t& nan_id) {
  if (s >= thr) {
    const Entry e{s, id};
    if (!sel.accepts(e) || p.exclude->contains(q, id)) return;
    sel.push(e);
    thr = sel.threshold();
  } else if (s != s) {
    nan_id = std::min(nan_id, id);
  }
}

// Scores items [i_begin, i_end) for queries [q_begin, q_end) into sels[q - q_begin].
void scan_range(const Problem& p, int64_t q_begin, int64_t q_end, int64_t i_begin, int64_t i_end,
                Selection* sels, std::vector<float>& scratch, int64_t& nan_id) {
  const auto& k = kernels::active();
  const int64_t d = p.d;
  scratch.resize(static_cast<size_t>(kQueryTile * kItemBlock));
  float* tile = scratch.data();
  for (int64_t i0 = i_begin; i0 < i_end; i0 += kItemBlock) {
    const int64_t nx = std::min(kItemBlock, i_end - i0);
    for (int64_t q0 = q_begin; q0 < q_end; q0 += kQueryTile) {
      const int64_t nq = std::min(kQueryTile, q_end - q0);
      k.dot_tile(p.queries + q0 * d, nq, d, p.items + i0 * d, nx, d, d, tile, kItemBlock);
      for (int64_t a = 0; a < nq; ++a) {
        const int64_t q = q0 + a;
        Selection& sel = sels[q - q_begin];
        float thr = sel.threshold();
        const float* row = tile + a * kItemBlock;
        if (p.cosine) {
          const float qi = (*p.query_inv)[q];
          const float* xi = p.item_inv->data() + i0;
          for (int64_t j = 0; j < nx; ++j) consider(p, q, sel, thr, (row[j] * qi) * xi[j], i0 + j, nan_id);
        } else {
          for (int64_t j = 0; j < nx; ++j) consider(p, q, sel, thr, row[j], i0 + j, nan_id);
        }
      }
    }
  }
}

// Scores query q's candidate list (sorted, deduplicated) into sel.
void scan_candidates(const Problem& p, int64_t q, const SortedLists& cands, Selection& sel,
                     std::vector<float>& scratch, int64_t& nan_id) {
  const auto& k = kernels::active();
  const int64_t d = p.d;
  constexpr int64_t kChunk = 64;
  scratch.resize(static_cast<size_t>(kChunk * (d + 1)));
  float* rows = scratch.data();
  float* scores = rows + kChunk * d;
  const float* qv = p.queries + q * d;
  float thr = sel.threshold();
  const int64_t* b = cands.begin(q);
  const int64_t n = cands.end(q) - b;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t nc = std::min(kChunk, n - c0);
    for (int64_t c = 0; c < nc; ++c)
      std::memcpy(rows + c * d, p.items + b[c0 + c] * d, sizeof(float) * static_cast<size_t>(d));
    k.dot_tile(qv, 1, d, rows, nc, d, d, scores, kChunk);
    for (int64_t c = 0; c < nc; ++c) {
      float s = scores[c];
      if (p.cosine) s = (s * (*p.query_inv)[q]) * inv_norm(k, rows + c * d, d);
      consider(p, q, sel, thr, s, b[c0 + c], nan_id);
    }
  }
}

void throw_nan(int64_t nan_id) {
  throw std::invalid_argument("item " + std::to_string(nan_id) +
                              " gives a NaN score: item vectors must be finite");
}

}  // namespace

int64_t topk_width(int64_t k, int64_t n_items) { return std::min(k, n_items); }

void topk(const float* queries, int64_t n_queries, const float* items, int64_t n_items, int64_t dim,
          const TopkOptions& opt, int64_t* out_ids, float* out_scores) {
  if (opt.k < 0) throw std::invalid_argument("k must be >= 0, got " + std::to_string(opt.k));
  if (n_queries < 0 || n_items < 0 || dim < 0) throw std::invalid_argument("sizes must be >= 0");
  for (int64_t i = 0; i < n_queries * dim; ++i)
    if (!std::isfinite(queries[i]))
      throw std::invalid_argument("queries[" + std::to_string(i / dim) + ", " + std::to_string(i % dim) +
                                  "] is not finite");
  check_lists(opt.exclude, n_queries, n_items, "exclude");
  check_lists(opt.candidates, n_queries, n_items, "candidates");
  const int64_t width = topk_width(opt.k, n_items);
  if (n_queries == 0 || width == 0) return;

  const auto& k = kernels::active();
  const bool cosine = opt.metric == Metric::cosine;
  const bool with_candidates = opt.candidates.indptr != nullptr;
  const SortedLists exclude(opt.exclude, n_queries, false);
  const SortedLists cands = with_candidates ? SortedLists(opt.candidates, n_queries, true) : SortedLists();
  std::vector<float> query_inv, item_inv;
  if (cosine) {
    query_inv.resize(static_cast<size_t>(n_queries));
    for (int64_t q = 0; q < n_queries; ++q) query_inv[q] = inv_norm(k, queries + q * dim, dim);
  }
  const Problem p{queries, items, n_queries, n_items, dim, width, cosine, &query_inv, &item_inv, &exclude};
  int64_t nan_id = kNoNan;

  if (with_candidates) {
    const int64_t total = opt.candidates.indptr[n_queries];
    const int nt = detail::threads_for(opt.num_threads, total * dim, n_queries);
    std::vector<Entry> storage(static_cast<size_t>(nt * width));
    std::vector<std::vector<float>> scratch(nt);
    std::vector<int64_t> nan_ids(nt, kNoNan);
    detail::parallel_for(n_queries, nt, 4, [&](int64_t q) {
      const int t = detail::thread_id();
      Selection sel(storage.data() + t * width, width);
      scan_candidates(p, q, cands, sel, scratch[t], nan_ids[t]);
      sel.write_sorted(width, out_ids + q * width, out_scores + q * width);
    });
    for (int64_t v : nan_ids) nan_id = std::min(nan_id, v);
    if (nan_id != kNoNan) throw_nan(nan_id);
    return;
  }

  const int nt = detail::threads_for(opt.num_threads, n_queries * n_items * dim,
                                    std::max(n_items / kItemBlock, n_queries / kQueryTile));
  if (cosine) {
    item_inv.resize(static_cast<size_t>(n_items));
    detail::parallel_for((n_items + 4095) / 4096, nt, 1, [&](int64_t c) {
      for (int64_t i = c * 4096; i < std::min(n_items, (c + 1) * 4096); ++i)
        item_inv[i] = inv_norm(k, items + i * dim, dim);
    });
  }
  const int64_t group = std::min(kQueryGroup, n_queries);
  std::vector<Entry> storage(static_cast<size_t>(nt * group * width));
  std::vector<std::vector<float>> scratch(nt);
  std::vector<int64_t> nan_ids(nt, kNoNan);
  for (int64_t g0 = 0; g0 < n_queries; g0 += group) {
    const int64_t g1 = std::min(n_queries, g0 + group);
    const int64_t ng = g1 - g0;
    std::vector<std::vector<Selection>> sels(nt);
    for (int t = 0; t < nt; ++t)
      for (int64_t a = 0; a < ng; ++a) sels[t].emplace_back(storage.data() + (t * group + a) * width, width);
    if (nt > 1 && ng >= nt * kQueryTile) {
      // A large batch: one contiguous range of queries per thread, each scanning every item (its item
      // blocks stay in cache across its query tiles); the selections are final, nothing to merge.
      detail::parallel_for(nt, nt, 1, [&](int64_t t) {
        const int64_t q0 = g0 + ng * t / nt, q1 = g0 + ng * (t + 1) / nt;
        scan_range(p, q0, q1, 0, n_items, sels[0].data() + (q0 - g0), scratch[t], nan_ids[t]);
      });
      detail::parallel_for(ng, nt, 16, [&](int64_t a) {
        sels[0][a].write_sorted(width, out_ids + (g0 + a) * width, out_scores + (g0 + a) * width);
      });
      continue;
    }
    // A single query or a small batch: one contiguous item range per thread (aligned to item blocks),
    // then the per-thread selections of each query are merged.
    const int64_t blocks = (n_items + kItemBlock - 1) / kItemBlock;
    detail::parallel_for(nt, nt, 1, [&](int64_t t) {
      const int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
      scan_range(p, g0, g1, b0 * kItemBlock, std::min(n_items, b1 * kItemBlock), sels[t].data(),
                 scratch[t], nan_ids[t]);
    });
    detail::parallel_for(ng, nt > 1 && ng > 1 ? nt : 1, 16, [&](int64_t a) {
      const int64_t q = g0 + a;
      if (nt == 1) {
        sels[0][a].write_sorted(width, out_ids + q * width, out_scores + q * width);
        return;
      }
      std::vector<Entry> buf(static_cast<size_t>(width));
      Selection final_sel(buf.data(), width);
      for (int t = 0; t < nt; ++t)
        for (const Entry& e : sels[t][a]) final_sel.offer(e);
      final_sel.write_sorted(width, out_ids + q * width, out_scores + q * width);
    });
  }
  for (int64_t v : nan_ids) nan_id = std::min(nan_id, v);
  if (nan_id != kNoNan) throw_nan(nan_id);
}

}  // namespace rec_engine
