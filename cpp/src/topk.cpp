// Exact top-k by inner product or cosine with exclusion and candidate subsets.
//
// Row-major full scans score block by block (a tile of up to kQueryTile queries x kItemBlock items,
// small enough for L2) and keep a running Selection per query (a buffer of 2k entries cut back to the k
// best when full). A batch of at least kQueryTile queries per thread is split by queries (each thread
// owns a contiguous range of queries and scans all items); a single query or a smaller batch is split by
// items (one contiguous item range per thread, selections merged at the end). Memory stays at
// O(threads * min(B, kQueryGroup) * k) plus the output, never B x N. Candidate subsets are scored per
// query (parallel over queries).
//
// At the avx512 level (topk_gemm::active() != nullptr) full scans of kPackedMinQueries (4) or more
// queries take the packed path instead: each thread owns a contiguous range of kPanel-item panels, packs
// each panel once (transposed, so that a register-blocked kernel scores 6 queries x 64 items per step
// from broadcast query values), scores every query of the group against it, drops in SIMD the scores
// below each query's current k-th best, and merges the per-thread selections at the end. Every float32
// score there is one FMA chain over the dimensions (see kernels/topk_gemm.hpp), so results do not depend
// on the thread count or on how many queries (4 or more) share the call.
//
// Fewer queries (1-3) are memory-bound: at the avx512 level they take the streaming path (scan_stream,
// topk_gemm's stream_f32), which reads the row-major items once, in memory order, 16 rows per step, reduces
// the 16 accumulators together into one vector of scores, compares it with each query's threshold in
// SIMD and returns to the selections only for a panel with a score at or above a threshold (after the
// first panels, rarely). It reads the table at about the speed of a plain read of it (bench/bench_scan.py).
// Its scores are summed as the kernels' dot_tile sums (one accumulator over 16-lane chunks, the lanes
// reduced in _mm512_reduce_add_ps's order), bit for bit, and the same for 1, 2 or 3 queries; at the
// scalar and avx2 levels the row-major dot_tile blocks (scan_range) do it. That sum order differs from the
// packed path's FMA chain, so a score can differ in its last bit between a lone query (or 2-3) and the same
// query inside a batch of 4 or more; the ids agree except between such near-ties.
//
// Item-split scans hand the panels out in chunks, dynamically: which thread scores which item never
// changes a result (a Selection keeps the exact best of what it is offered, in any order). Reduced
// precision (topk_quantized) scans pre-packed bf16/int8 panels the same way into a shortlist and
// re-scores it exactly.
#include "rec_engine/topk.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/kernels.hpp"
#include "kernels/topk_gemm.hpp"
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

// A bounded selection of the cap best entries. Entries at or above the threshold are appended to a
// buffer of slots(cap) = 2 * cap entries; a full buffer is cut back to its cap best (nth_element) and
// the threshold raised to the worst of them. Appends are sequential (a heap of a few hundred entries per
// query of a batch does not fit in L2, and its sift-downs missed the cache at every level), and the kept
// set is the exact top cap whatever the order of the offers.
class Selection {
 public:
  static int64_t slots(int64_t cap) { return 2 * cap; }
  Selection(Entry* storage, int64_t capacity) : data_(storage), cap_(capacity) {}

  float threshold() const { return thr_; }
  // Accepts only entries scoring at least f from now on (a floor below the final k-th score: see
  // sample_floors; the caller checks that the selection still fills, and rescans without it if not).
  void set_floor(float f) { thr_ = f; }
  bool accepts(const Entry& e) const { return cap_ > 0 && !(e.score < thr_); }
  void push(const Entry& e) {  // the caller checked accepts()
    data_[size_++] = e;
    if (size_ == 2 * cap_) trim();
  }
  void offer(const Entry& e) {
    if (accepts(e)) push(e);
  }
  // Keeps the cap best entries only (in no particular order): the cap-th best score t by nth_element on
  // the bare scores (a float select is several times faster than one over entries with the two-key
  // comparison), then every entry above t and, of those equal to t, the lowest ids. Entries never hold
  // NaN (consider() does not offer them).
  void trim() {
    if (size_ <= cap_) return;
    thread_local std::vector<float> keys;
    thread_local std::vector<Entry> ties;
    keys.resize(static_cast<size_t>(size_));
    for (int64_t i = 0; i < size_; ++i) keys[i] = data_[i].score;
    std::nth_element(keys.begin(), keys.begin() + (cap_ - 1), keys.end(), std::greater<float>());
    const float t = keys[cap_ - 1];
    ties.clear();
    int64_t w = 0;
    for (int64_t i = 0; i < size_; ++i) {
      if (data_[i].score > t)
        data_[w++] = data_[i];
      else if (data_[i].score == t)
        ties.push_back(data_[i]);
    }
    const int64_t need = cap_ - w;  // >= 1: t itself is among the cap best
    if (static_cast<int64_t>(ties.size()) > need)
      std::sort(ties.begin(), ties.end(), [](const Entry& a, const Entry& b) { return a.id < b.id; });
    for (int64_t i = 0; i < need; ++i) data_[w++] = ties[i];
    size_ = cap_;
    thr_ = t;
  }
  int64_t size() const { return size_; }
  const Entry* begin() const { return data_; }
  const Entry* end() const { return data_ + size_; }
  // Best first; the storage is left sorted.
  void write_sorted(int64_t width, int64_t* ids, float* scores) {
    trim();
    std::sort(data_, data_ + size_, [](const Entry& a, const Entry& b) { return better(a, b); });
    for (int64_t i = 0; i < width; ++i) {
      ids[i] = i < size_ ? data_[i].id : -1;
      scores[i] = i < size_ ? data_[i].score : kNegInf;
    }
  }

 private:
  Entry* data_;
  int64_t cap_;
  int64_t size_ = 0;
  float thr_ = kNegInf;
};

// Per-query sorted id lists (copied, so the caller's arrays are never touched).
class SortedLists {
 public:
  SortedLists() = default;
  SortedLists(const IdLists& lists, int64_t n_queries, bool dedupe) {
    if (lists.indptr == nullptr) return;
    indptr_.assign(lists.indptr, lists.indptr + n_queries + 1);
    ids_.assign(lists.ids, lists.ids + indptr_[n_queries]);
    bloom_.assign(static_cast<size_t>(n_queries * kBloomWords), 0);
    for (int64_t q = 0; q < n_queries; ++q) {
      auto b = ids_.begin() + indptr_[q], e = ids_.begin() + indptr_[q + 1];
      std::sort(b, e);
      ends_.push_back(dedupe ? std::unique(b, e) - ids_.begin() : indptr_[q + 1]);
      for (auto it = b; it != e; ++it) {
        const uint64_t h = bloom_bit(*it);
        bloom_[q * kBloomWords + (h >> 6)] |= uint64_t{1} << (h & 63);
      }
    }
  }
  bool active() const { return !indptr_.empty(); }
  const int64_t* begin(int64_t q) const { return ids_.data() + indptr_[q]; }
  const int64_t* end(int64_t q) const { return ids_.data() + ends_[q]; }
  // A 512-bit Bloom filter per query answers most lookups (an id not in the list) without the binary
  // search: a scan asks for every item that enters a selection, a few thousand per query.
  bool contains(int64_t q, int64_t id) const {
    if (!active()) return false;
    const uint64_t h = bloom_bit(id);
    if (!((bloom_[q * kBloomWords + (h >> 6)] >> (h & 63)) & 1)) return false;
    return std::binary_search(begin(q), end(q), id);
  }

 private:
  static constexpr int64_t kBloomWords = 8;
  static uint64_t bloom_bit(int64_t id) { return (static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull) >> 55; }
  std::vector<int64_t> indptr_, ids_, ends_;
  std::vector<uint64_t> bloom_;
};

void check_lists(const IdLists& lists, int64_t n_queries, int64_t n_items, const char* what) {
  if (lists.indptr == nullptr) return;
  if (lists.indptr[0] != 0)
    throw std::invalid_argument(std::string(what) + " indptr[0] must be 0, got " +
                                std::to_string(lists.indptr[0]));
  // every step first: a later decrease must be refused before an earlier list is read past the ids' end
  for (int64_t q = 0; q < n_queries; ++q)
    if (lists.indptr[q + 1] < lists.indptr[q])
      throw std::invalid_argument(std::string(what) + " indptr must be non-decreasing (at query " +
                                  std::to_string(q) + ")");
  for (int64_t q = 0; q < n_queries; ++q) {
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

// Scores query q's candidates b[0 .. n) (distinct ids) into sel.
void scan_candidates(const Problem& p, int64_t q, const int64_t* b, int64_t n, Selection& sel,
                     std::vector<float>& scratch, int64_t& nan_id) {
  const auto& k = kernels::active();
  const topk_gemm::Table* g = topk_gemm::active();
  const int64_t d = p.d;
  constexpr int64_t kChunk = topk_gemm::kPanel;
  scratch.resize(static_cast<size_t>(kChunk * (2 * d + 1)));
  float* rows = scratch.data();
  float* scores = rows + kChunk * d;
  float* panel = scores + kChunk;
  const float* qv = p.queries + q * d;
  float thr = sel.threshold();
  // The candidates' rows are scattered: their cache misses are started a chunk ahead (a shortlist of a
  // few hundred rows otherwise waits for them one memcpy at a time).
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(float));
  auto prefetch_chunk = [&](int64_t c0) {
    for (int64_t c = c0; c < std::min(n, c0 + kChunk); ++c) {
      const char* r = reinterpret_cast<const char*>(p.items + b[c] * d);
      for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(r + o);
    }
  };
  prefetch_chunk(0);
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t nc = std::min(kChunk, n - c0);
    prefetch_chunk(c0 + kChunk);
    for (int64_t c = 0; c < nc; ++c)
      std::memcpy(rows + c * d, p.items + b[c0 + c] * d, sizeof(float) * static_cast<size_t>(d));
    if (g != nullptr) {  // the same FMA chain as the packed full scan
      g->pack_f32(rows, nc, d, d, panel);
      g->score_f32(qv, 1, d, panel, d, scores, kChunk);
    } else {
      k.dot_tile(qv, 1, d, rows, nc, d, d, scores, kChunk);
    }
    for (int64_t c = 0; c < nc; ++c) {
      float s = scores[c];
      if (p.cosine) s = (s * (*p.query_inv)[q]) * inv_norm(k, rows + c * d, d);
      consider(p, q, sel, thr, s, b[c0 + c], nan_id);
    }
  }
}

constexpr int64_t kPanel = topk_gemm::kPanel;
static_assert(kPanel <= 64, "a panel's filter result is one 64-bit mask per query");
constexpr int64_t kPanelQueries = 48;      // queries scored per panel visit (a multiple of the kernel's 6)
constexpr int64_t kPackedMinQueries = 4;   // fewer queries take the row-major path
constexpr int64_t kExactBatchMaxShortlist = 320;   // longer exact-mode shortlists, of this many entries
constexpr int64_t kExactBatchMaxEntries = 24576;    // or more over a batch's queries: the batch scans in float32
static_assert(kPackedMinQueries == topk_gemm::kStreamQueries + 1, "fewer queries stream (stream_f32's limit)");

// Per-thread buffers of the packed scans.
struct PanelWork {
  std::vector<float> panel, tile;
  std::vector<uint16_t> bf16;   // a bf16 panel converted from the float32 items (an index without a copy)
};

// Offers the items whose bit is set in masks[a] (scores tile[a * kPanel + j] of item i0 + j) to query
// q0 + a's selection sels[a], for a < nq; thrs[a] is the threshold the masks were computed against.
inline void offer_masked(const Problem& p, int64_t q0, int64_t nq, Selection* sels, const float* thrs,
                         const uint64_t* masks, const float* tile, int64_t i0, int64_t& nan_id) {
  for (int64_t a = 0; a < nq; ++a) {
    uint64_t m = masks[a];
    if (m == 0) continue;
    Selection& sel = sels[a];
    float thr = thrs[a];
    const float* row = tile + a * kPanel;
    do {
      const int j = __builtin_ctzll(m);
      m &= m - 1;
      consider(p, q0 + a, sel, thr, row[j], i0 + j, nan_id);
    } while (m != 0);
  }
}

// Scans panels [pa, pb) for queries [q_begin, q_end) into sels[q - q_begin]. prepare(panel, nx) readies
// a panel of nx items; score(panel, q0, nq, tile, thr, masks) writes nq x kPanel scores (row stride
// kPanel; only the first min(kPanel, n_items - panel * kPanel) columns are items) and returns false, or
// compares them with thr[a] itself, writes masks[a] (see filter_tile) and the 16-score vectors with a bit
// set, and returns true.
template <class Prepare, class Score>
void scan_panels(const Problem& p, int64_t q_begin, int64_t q_end, int64_t pa, int64_t pb, Selection* sels,
                 PanelWork& w, int64_t& nan_id, const topk_gemm::Table* g, Prepare prepare, Score score) {
  w.tile.resize(static_cast<size_t>(kPanelQueries * kPanel));
  float* tile = w.tile.data();
  float thrs[kPanelQueries];
  uint64_t masks[kPanelQueries];
  for (int64_t pi = pa; pi < pb; ++pi) {
    const int64_t i0 = pi * kPanel;
    const int64_t nx = std::min(kPanel, p.n_items - i0);
    prepare(pi, nx);
    for (int64_t q0 = q_begin; q0 < q_end; q0 += kPanelQueries) {
      const int64_t nq = std::min(kPanelQueries, q_end - q0);
      Selection* s0 = sels + (q0 - q_begin);
      for (int64_t a = 0; a < nq; ++a) thrs[a] = s0[a].threshold();
      if (score(pi, q0, nq, tile, thrs, masks)) {  // compared with thrs in the kernel
        if (nx < kPanel) {
          const uint64_t valid = (uint64_t{1} << nx) - 1;
          for (int64_t a = 0; a < nq; ++a) masks[a] &= valid;
        }
      } else {
        if (p.cosine) {
          const float* xi = p.item_inv->data() + i0;
          for (int64_t a = 0; a < nq; ++a) {
            const float qi = (*p.query_inv)[q0 + a];
            float* row = tile + a * kPanel;
            for (int64_t j = 0; j < nx; ++j) row[j] = (row[j] * qi) * xi[j];
          }
        }
        if (g != nullptr) {
          g->filter_tile(tile, nq, kPanel, nx, thrs, masks);
        } else {
          for (int64_t a = 0; a < nq; ++a) {
            const float* row = tile + a * kPanel;
            uint64_t m = 0;
            for (int64_t j = 0; j < nx; ++j)
              if (!(row[j] < thrs[a])) m |= uint64_t{1} << j;
            masks[a] = m;
          }
        }
      }
      offer_masked(p, q0, nq, s0, thrs, masks, tile, i0, nan_id);
    }
  }
}

// The streaming scan of 1-3 queries (avx512): items of panels [pa, pb) for queries [q_begin, q_end), read
// once in memory order by topk_gemm's stream_f32, which runs on from panel to panel until a score reaches
// a query's threshold; only then does it come back here, with that panel's scores and masks, to offer the
// items to the selections. Cosine scores take one panel per call (scaled, then filtered here).
void scan_stream(const Problem& p, int64_t q_begin, int64_t q_end, int64_t pa, int64_t pb, Selection* sels,
                 PanelWork& w, int64_t& nan_id, const topk_gemm::Table* g) {
  const int64_t nq = q_end - q_begin, d = p.d;
  w.tile.resize(static_cast<size_t>(nq * kPanel));
  float* tile = w.tile.data();
  float thrs[topk_gemm::kStreamQueries];
  uint64_t masks[topk_gemm::kStreamQueries];
  const float* q = p.queries + q_begin * d;
  const int64_t end = std::min(pb * kPanel, p.n_items);
  int64_t i = pa * kPanel;
  while (i < end) {
    for (int64_t a = 0; a < nq; ++a) thrs[a] = sels[a].threshold();
    int64_t i0, nx;
    if (p.cosine) {
      nx = g->stream_f32(q, nq, d, p.items + i * d, std::min(kPanel, end - i), d, d, nullptr, tile, kPanel, nullptr);
      i0 = i;
      const float* xi = p.item_inv->data() + i0;
      for (int64_t a = 0; a < nq; ++a) {
        const float qi = (*p.query_inv)[q_begin + a];
        float* row = tile + a * kPanel;
        for (int64_t j = 0; j < nx; ++j) row[j] = (row[j] * qi) * xi[j];
      }
      g->filter_tile(tile, nq, kPanel, nx, thrs, masks);
    } else {
      const int64_t used = g->stream_f32(q, nq, d, p.items + i * d, end - i, d, d, thrs, tile, kPanel, masks);
      i0 = i + (used - 1) / kPanel * kPanel;
      nx = used - (i0 - i);
    }
    i = i0 + nx;
    offer_masked(p, q_begin, nq, sels, thrs, masks, tile, i0, nan_id);
  }
}

// The reduced-precision scan of 1-3 queries over panels [pa, pb): run(pi, n, thrs, tile, masks) (topk_gemm's
// scan_i8_filter or scan_bf16_filter) goes on from panel pi to the next while no score reaches a query's
// threshold, for at most n panels, and returns the panels it went through; only then does the scan come
// back here, for the last of them (as scan_stream does).
template <class Run>
void scan_reduced_stream(const Problem& p, int64_t q_begin, int64_t q_end, int64_t pa, int64_t pb, Selection* sels,
                         PanelWork& w, int64_t& nan_id, Run run) {
  const int64_t nq = q_end - q_begin;
  w.tile.resize(static_cast<size_t>(nq * kPanel));
  float* tile = w.tile.data();
  float thrs[kPackedMinQueries];
  uint64_t masks[kPackedMinQueries];
  int64_t pi = pa;
  while (pi < pb) {
    for (int64_t a = 0; a < nq; ++a) thrs[a] = sels[a].threshold();
    const int64_t used = run(pi, pb - pi, thrs, tile, masks);
    const int64_t i0 = (pi + used - 1) * kPanel;
    pi += used;
    const int64_t nx = std::min(kPanel, p.n_items - i0);
    if (nx < kPanel)  // the zero padding of the last panel
      for (int64_t a = 0; a < nq; ++a) masks[a] &= (uint64_t{1} << nx) - 1;
    offer_masked(p, q_begin, nq, sels, thrs, masks, tile, i0, nan_id);
  }
}

// Runs scan(t, panel_begin, panel_end, sels_of_thread) over nt threads splitting the panels, for a group
// of ng queries, then merges each query's per-thread selections and hands the result to emit(a, sel).
// The panels are handed out in chunks (about 16 per thread, dynamically scheduled): on a shared machine a
// thread that loses its core for a while no longer holds the whole call up, the others take its chunks.
// Which thread scans which panel does not change the result: a Selection keeps the exact best entries of
// what it was offered, whatever the order, and the merge keeps the exact best of their union.
template <class Scan, class Emit>
void item_split(int64_t n_panels, int nt, int64_t ng, int64_t width, std::vector<Entry>& storage,
                Scan scan, Emit emit, const float* floors = nullptr) {
  const int64_t slots = Selection::slots(width);
  storage.resize(static_cast<size_t>(nt * ng * slots));
  std::vector<std::vector<Selection>> sels(nt);
  for (int t = 0; t < nt; ++t)
    for (int64_t a = 0; a < ng; ++a) {
      sels[t].emplace_back(storage.data() + (t * ng + a) * slots, width);
      if (floors != nullptr) sels[t].back().set_floor(floors[a]);
    }
  if (nt == 1) {
    scan(0, 0, n_panels, sels[0].data());
  } else {
    const int64_t chunk = std::max<int64_t>(1, n_panels / (16 * nt));
    detail::parallel_for((n_panels + chunk - 1) / chunk, nt, 1, [&](int64_t c) {
      const int t = detail::thread_id();
      scan(t, c * chunk, std::min(n_panels, (c + 1) * chunk), sels[t].data());
    });
  }
  detail::parallel_for(ng, nt > 1 && ng > 1 ? nt : 1, 16, [&](int64_t a) {
    if (nt == 1) {
      emit(a, sels[0][a]);
      return;
    }
    std::vector<Entry> buf(static_cast<size_t>(slots));
    Selection final_sel(buf.data(), width);
    for (int t = 0; t < nt; ++t)
      for (const Entry& e : sels[t][a]) final_sel.offer(e);
    emit(a, final_sel);
  });
}

// Floors for a large k (the single-query scan at k = 500 and batches of recommend_batch's candidates): a
// selection starts at -inf, so each thread's first 2k items and every later one above its running k-th
// score enter it, with a trim each time its buffer fills (about k ln(N / k) entries and a dozen trims per
// query and thread). Scoring a sample of kSampleBlocks blocks of kSampleRows consecutive items spread
// over the table, a query's floor is the sample score of rank r, r chosen so that about
// kFloorMargin x (k + its excluded items) items are expected to score at least that; then only those enter.
// The result stays exact: every item scoring at least the floor is offered, so when a query's selection
// still fills (k entries at or above the floor) it holds the true top k; when it does not (an unlucky
// sample, items ordered by score, many exclusions), that query is scanned again without a floor.
constexpr int64_t kSampleBlocks = 16, kSampleRows = 128, kSample = kSampleBlocks * kSampleRows;
constexpr int64_t kFloorMargin = 3;

// The r-th largest of b[0, n) (1 <= r <= n, no NaN): a min-heap of the r largest seen, about one
// comparison a value when r is small (nth_element over a few thousand samples took ~45 us).
float rth_largest(const float* b, int64_t n, int64_t r, std::vector<float>& heap) {
  heap.assign(b, b + r);
  std::make_heap(heap.begin(), heap.end(), std::greater<float>());
  for (int64_t i = r; i < n; ++i)
    if (b[i] > heap.front()) {
      std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
      heap.back() = b[i];
      std::push_heap(heap.begin(), heap.end(), std::greater<float>());
    }
  return heap.front();
}

// floors[a] for queries [q0, q0 + nq), or false when no floor is worth having (small tables or k).
bool sample_floors(const Problem& p, int64_t q0, int64_t nq, const IdLists& exclude, int nt,
                   std::vector<float>& floors) {
  if (p.cosine || p.n_items < 32 * kSample || p.width < 64) return false;
  const auto& k = kernels::active();
  const int64_t d = p.d;
  std::vector<float> scores(static_cast<size_t>(nq * kSample));
  floors.assign(static_cast<size_t>(nq), kNegInf);
  detail::parallel_for(kSampleBlocks, nt, 1, [&](int64_t b) {
    const int64_t i0 = (p.n_items - kSampleRows) * b / (kSampleBlocks - 1);
    thread_local std::vector<float> tile;
    tile.resize(static_cast<size_t>(kQueryTile * kSampleRows));
    for (int64_t a0 = 0; a0 < nq; a0 += kQueryTile) {
      const int64_t m = std::min(kQueryTile, nq - a0);
      k.dot_tile(p.queries + (q0 + a0) * d, m, d, p.items + i0 * d, kSampleRows, d, d, tile.data(), kSampleRows);
      for (int64_t a = 0; a < m; ++a)
        std::copy(tile.data() + a * kSampleRows, tile.data() + (a + 1) * kSampleRows,
                  scores.data() + (a0 + a) * kSample + b * kSampleRows);
    }
  });
  bool any = false;
  std::vector<float> heap;
  for (int64_t a = 0; a < nq; ++a) {
    const int64_t q = q0 + a;
    const int64_t excluded = exclude.indptr != nullptr ? exclude.indptr[q + 1] - exclude.indptr[q] : 0;
    const double want = static_cast<double>(kFloorMargin) * static_cast<double>(p.width + excluded);
    const int64_t r = static_cast<int64_t>(std::ceil(want * kSample / static_cast<double>(p.n_items))) + 8;
    if (r > kSample / 4) continue;  // a floor that would let a quarter of the table in: not worth it
    float* s = scores.data() + a * kSample;
    float* e = std::remove_if(s, s + kSample, [](float v) { return v != v; });   // (NaN items: the scan reports them)
    if (e - s <= r) continue;
    floors[a] = rth_largest(s, e - s, r, heap);
    any = true;
  }
  return any;
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
    const int64_t slots = Selection::slots(width);
    std::vector<Entry> storage(static_cast<size_t>(nt * slots));
    std::vector<std::vector<float>> scratch(nt);
    std::vector<int64_t> nan_ids(nt, kNoNan);
    detail::parallel_for(n_queries, nt, 4, [&](int64_t q) {
      const int t = detail::thread_id();
      Selection sel(storage.data() + t * slots, width);
      scan_candidates(p, q, cands.begin(q), cands.end(q) - cands.begin(q), sel, scratch[t], nan_ids[t]);
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
  // The packed path pays a transpose per item panel, which only a batch amortizes: fewer than
  // kPackedMinQueries queries stream the rows as they are (memory-bound; the per-pair sum order differs
  // from the packed one, so a score can differ in its last bit between a lone query and the same query
  // inside a batch).
  const topk_gemm::Table* g = topk_gemm::active();
  if (g != nullptr) {
    const bool stream = n_queries <= topk_gemm::kStreamQueries;
    const int64_t n_panels = (n_items + kPanel - 1) / kPanel;
    const int ntp = static_cast<int>(std::min<int64_t>(nt, n_panels));
    std::vector<PanelWork> work(ntp);
    std::vector<int64_t> nan_ids(ntp, kNoNan);
    std::vector<Entry> storage;
    std::vector<float> floors;
    // Queries [q0, q0 + nq) with floors (or none); returns those whose selection did not fill above the floor.
    auto run_group = [&](int64_t q0, int64_t nq, const float* fl) {
      std::vector<char> short_of(static_cast<size_t>(nq), 0);
      item_split(
          n_panels, ntp, nq, width, storage,
          [&](int t, int64_t pa, int64_t pb, Selection* sels) {
            PanelWork& w = work[t];
            if (stream) {
              scan_stream(p, q0, q0 + nq, pa, pb, sels, w, nan_ids[t], g);
              return;
            }
            w.panel.resize(static_cast<size_t>(kPanel * dim));
            scan_panels(
                p, q0, q0 + nq, pa, pb, sels, w, nan_ids[t], g,
                [&](int64_t pi, int64_t nx) { g->pack_f32(items + pi * kPanel * dim, nx, dim, dim, w.panel.data()); },
                [&](int64_t, int64_t qa, int64_t m, float* tile, const float*, uint64_t*) {
                  g->score_f32(queries + qa * dim, m, dim, w.panel.data(), dim, tile, kPanel);
                  return false;
                });
          },
          [&](int64_t a, Selection& sel) {
            if (fl != nullptr && fl[a] > kNegInf && sel.size() < width) {
              short_of[a] = 1;     // fewer than k items reached the floor: rescanned without it below
              return;
            }
            sel.write_sorted(width, out_ids + (q0 + a) * width, out_scores + (q0 + a) * width);
          },
          fl);
      return short_of;
    };
    for (int64_t g0 = 0; g0 < n_queries; g0 += kQueryGroup) {
      const int64_t ng = std::min(kQueryGroup, n_queries - g0);
      const bool floored = sample_floors(p, g0, ng, opt.exclude, ntp, floors);
      const std::vector<char> short_of = run_group(g0, ng, floored ? floors.data() : nullptr);
      for (int64_t a = 0; a < ng; ++a)
        if (short_of[a]) run_group(g0 + a, 1, nullptr);
    }
    for (int64_t v : nan_ids) nan_id = std::min(nan_id, v);
    if (nan_id != kNoNan) throw_nan(nan_id);
    return;
  }
  const int64_t group = std::min(kQueryGroup, n_queries);
  const int64_t slots = Selection::slots(width);
  std::vector<Entry> storage(static_cast<size_t>(nt * group * slots));
  std::vector<std::vector<float>> scratch(nt);
  std::vector<int64_t> nan_ids(nt, kNoNan);
  for (int64_t g0 = 0; g0 < n_queries; g0 += group) {
    const int64_t g1 = std::min(n_queries, g0 + group);
    const int64_t ng = g1 - g0;
    std::vector<std::vector<Selection>> sels(nt);
    for (int t = 0; t < nt; ++t)
      for (int64_t a = 0; a < ng; ++a) sels[t].emplace_back(storage.data() + (t * group + a) * slots, width);
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
      std::vector<Entry> buf(static_cast<size_t>(slots));
      Selection final_sel(buf.data(), width);
      for (int t = 0; t < nt; ++t)
        for (const Entry& e : sels[t][a]) final_sel.offer(e);
      final_sel.write_sorted(width, out_ids + q * width, out_scores + q * width);
    });
  }
  for (int64_t v : nan_ids) nan_id = std::min(nan_id, v);
  if (nan_id != kNoNan) throw_nan(nan_id);
}

// ------------------------------------------------------------------------------ reduced precision
namespace {

int64_t padded_dim(Precision pr, int64_t d) { return pr == Precision::int8 ? (d + 3) / 4 * 4 : (d + 1) / 2 * 2; }

inline uint16_t to_bf16(float v) {  // round to nearest even (finite values only)
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

// Symmetric int8 of v[0 .. d) with one scale; returns the scale (0 for a zero vector).
inline float quantize_row(const float* v, int64_t d, int8_t* out) {
  float m = 0.f;
  for (int64_t t = 0; t < d; ++t) m = std::max(m, std::fabs(v[t]));
  const float scale = m / 127.f;
  const float inv = m > 0.f ? 127.f / m : 0.f;
  if (!std::isfinite(inv)) {  // m below ~3.7e-37: 127 / m overflows float (0 * inf would be NaN): in double
    const double dinv = 127.0 / static_cast<double>(m);
    for (int64_t t = 0; t < d; ++t)
      out[t] = static_cast<int8_t>(std::max(-127.0, std::min(127.0, std::nearbyint(v[t] * dinv))));
    return scale;
  }
  for (int64_t t = 0; t < d; ++t)
    out[t] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(v[t] * inv))));
  return scale;
}

// Portable scorers for the quantized panels (same layout as the kernels): the scalar and avx2 levels, and
// avx512 CPUs without VNNI (int8) or AVX512-BF16 (bf16).
void score_i8_portable(const uint8_t* q, int64_t nq, int64_t ldq, const int8_t* panel, int64_t d4,
                       const int32_t* corr, const float* scale, float* out, int64_t ldo) {
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t j = 0; j < kPanel; ++j) {
      int32_t acc = 0;
      for (int64_t t = 0; t < d4; ++t)
        for (int r = 0; r < 4; ++r)
          acc += static_cast<int32_t>(q[i * ldq + 4 * t + r]) * panel[(t * kPanel + j) * 4 + r];
      out[i * ldo + j] = static_cast<float>(acc - corr[j]) * scale[j];
    }
}
// (Accumulates a row of kPanel sums over t: GCC 12 at -O3 miscompiled the former per-item loop nest
// -- outer-loop vectorization of the t reduction over the interleaved pairs gave wrong sums, which is
// what lowered the bf16 recall at the scalar and avx2 levels.)
void score_bf16_portable(const uint16_t* q, int64_t nq, int64_t ldq, const uint16_t* panel, int64_t d2,
                         float* out, int64_t ldo) {
  for (int64_t i = 0; i < nq; ++i) {
    float acc[kPanel] = {};
    for (int64_t t = 0; t < d2; ++t) {
      const float q0 = from_bf16(q[i * ldq + 2 * t]), q1 = from_bf16(q[i * ldq + 2 * t + 1]);
      const uint16_t* xp = panel + t * kPanel * 2;
      for (int64_t j = 0; j < kPanel; ++j) {
        acc[j] += q1 * from_bf16(xp[2 * j + 1]);
        acc[j] += q0 * from_bf16(xp[2 * j]);
      }
    }
    for (int64_t j = 0; j < kPanel; ++j) out[i * ldo + j] = acc[j];
  }
}

}  // namespace

int64_t quantized_rows(int64_t n_items) { return (n_items + kPanel - 1) / kPanel * kPanel; }

bool reduced_kernels(Precision precision) {
  const topk_gemm::Table* g = topk_gemm::active();
  if (g == nullptr) return false;
  return precision == Precision::int8 ? g->score_i8_filter != nullptr
                                      : g->score_bf16 != nullptr && g->pack_bf16 != nullptr;
}

bool amx_available() { return topk_gemm::amx_available(); }
bool amx_enabled() { return topk_gemm::amx_enabled(); }
void set_amx(bool on) { topk_gemm::set_amx(on); }

int64_t quantized_bytes(Precision precision, int64_t n_items, int64_t dim) {
  const int64_t per = precision == Precision::int8 ? 1 : 2;
  return quantized_rows(n_items) * padded_dim(precision, dim) * per;
}

void quantize_items(const float* items, int64_t n_items, int64_t dim, Precision precision, uint8_t* packed,
                    int32_t* corr, float* scale, int num_threads) {
  if (n_items < 0 || dim < 0) throw std::invalid_argument("sizes must be >= 0");
  for (int64_t i = 0; i < n_items * dim; ++i)
    if (!std::isfinite(items[i]))
      throw std::invalid_argument("items[" + std::to_string(i / dim) + ", " + std::to_string(i % dim) +
                                  "] is not finite");
  const int64_t rows = quantized_rows(n_items);
  const int64_t dp = padded_dim(precision, dim);
  std::memset(packed, 0, static_cast<size_t>(quantized_bytes(precision, n_items, dim)));
  std::fill(corr, corr + rows, 0);
  std::fill(scale, scale + rows, 0.f);
  const int64_t n_panels = rows / kPanel;
  const int nt = detail::threads_for(num_threads, n_items * dim, n_panels);
  detail::parallel_for(n_panels, nt, 16, [&](int64_t pi) {
    std::vector<int8_t> row(static_cast<size_t>(dim));
    for (int64_t j = 0; j < kPanel && pi * kPanel + j < n_items; ++j) {
      const int64_t item = pi * kPanel + j;
      const float* v = items + item * dim;
      if (precision == Precision::int8) {
        scale[item] = quantize_row(v, dim, row.data());
        int32_t sum = 0;
        int8_t* dst = reinterpret_cast<int8_t*>(packed) + pi * kPanel * dp;
        for (int64_t t = 0; t < dim; ++t) {
          dst[((t / 4) * kPanel + j) * 4 + t % 4] = row[t];
          sum += row[t];
        }
        corr[item] = 128 * sum;
      } else {
        uint16_t* dst = reinterpret_cast<uint16_t*>(packed) + pi * kPanel * dp;
        for (int64_t t = 0; t < dim; ++t) dst[((t / 2) * kPanel + j) * 2 + t % 2] = to_bf16(v[t]);
      }
    }
  });
}

void quantized_norms(const float* items, int64_t n_items, int64_t dim, Precision precision, float* norm,
                     int num_threads) {
  (void)precision;  // one kind of norm serves both precisions' bounds
  if (n_items < 0 || dim < 0) throw std::invalid_argument("sizes must be >= 0");
  const int nt = detail::threads_for(num_threads, n_items * dim, n_items / 1024 + 1);
  detail::parallel_for(n_items, nt, 4096, [&](int64_t i) {
    const float* v = items + i * dim;
    double s = 0.0;
    for (int64_t t = 0; t < dim; ++t) s += static_cast<double>(v[t]) * v[t];
    // The double sum of dim terms is within dim * 2^-53 of the true one: a relative margin of 1e-9 and a
    // round up to float keep the stored value an upper bound.
    s = std::sqrt(s);
    s *= 1.0 + 1e-9;
    float f = static_cast<float>(s);
    if (static_cast<double>(f) < s) f = std::nextafter(f, std::numeric_limits<float>::infinity());
    norm[i] = f;
  });
}

namespace {

// The exact mode's check of one query's shortlist (see topk.hpp). Every bound is on |f - r|, f the
// float32 score the re-scoring computes and r the scan's reduced-precision score mapped to the same scale,
// with P = |q|_2 |x|_2 >= sum_t |q_t x_t| (|x|_2 from quantized_norms):
//   int8:  r = sq * a, a = float(q8 . x8) * sx. With q~ = sq q8 and x~ = sx x8 (|x - x~| <= sx / 2 per
//          coordinate, up to float rounding), q.x - q~.x~ = (q - q~).x + q~.(x - x~), so its size is at most
//          |q - q~|_2 |x|_2 + |q~|_1 sx / 2 (the query's rounding error is known exactly); the rounding of a
//          adds |r| 2^-23.
//   bf16:  r = a, the float sum of bf16 products. Each bf16 value is within 2^-8 of its float (relative),
//          so |q.x - q~.x~| <= (2^-7 + 2^-16) P, and the sum's rounding adds gamma'_d P.
// f's own FMA chain adds gamma_d P. Bounds are taken 1% wider than derived. Underflow (subnormal scales,
// values, products and sums; the bf16 instructions flush denormal inputs and outputs) costs at most 2^-126
// per coordinate times max|q| or |x| or 1: an absolute term d 2^-120 (1 + max|q| + sq + |q~|_1 + |x|_2)
// covers it. Items outside the shortlist have a <= a_min and, unless they are among the index's heavy items
// (which are always re-scored), norms and scales <= the maxima of the others. The check: a_min's upper
// bound is below the width-th best lower bound inside the shortlist, so no item left out can reach the k-th
// best exact score (ties included: the inequality is strict). It assumes IEEE float arithmetic in the
// re-scoring (no flush-to-zero mode set by another library), and that nothing overflows: a query for which
// a reduced-precision score or an exact one could (query_fits) is not checked but scanned in float32.
struct QueryBound {
  double sq = 0, dq2 = 0, q1 = 0, qmax = 0, q2 = 0;  // int8: scale, |q - q~|_2, |q~|_1; both: max|q|, |q|_2
};

// Returns whether the check passes; if so, also drops from ids[0 .. n) (the entries' ids, in order) the
// items whose upper bound is below the width-th best lower bound (they cannot be in the top-k either, so
// only the rest is re-scored) and returns their new count in n.
// out_a: when finite, the reduced-precision score (as the scan computes it) that every item left out
// stays below: the selection's floor, when it did not fill (else the shortlist's lowest score is).
bool shortlist_certified(const QuantizedItems& index, const QueryBound& qb, const Entry* entries, int64_t& n,
                         int64_t width, int64_t* ids, std::vector<double>& bounds,
                         float out_a = std::numeric_limits<float>::quiet_NaN()) {
  if (n < width) return false;
  const double d = static_cast<double>(index.dim);
  const double gamma = (d + 4.0) * 0x1p-24 * 1.01, gamma2 = (d + 16.0) * 0x1p-24 * 1.01;
  const bool i8 = index.precision == Precision::int8;
  const double tiny = d * 0x1p-120 * (1.0 + qb.qmax + qb.sq + qb.q1);   // (underflow: see above)
  auto err = [&](double r, double nrm, double sx) {
    const double p = qb.q2 * nrm, under = tiny + d * 0x1p-120 * nrm;
    if (i8) return 1.01 * (qb.dq2 * nrm + 0.5001 * sx * qb.q1 + gamma * p + std::fabs(r) * 0x1p-23) + under;
    return 1.01 * p * (0x1p-7 + 0x1p-16 + gamma + gamma2 * 1.01) + under;
  };
  // bounds[2 i], bounds[2 i + 1]: entry i's lower and upper bound; then its lower bounds, for the select
  bounds.resize(static_cast<size_t>(3 * n));
  // (the entries' norms and scales lie at random: their loads are all started first, not met one by one:
  // 2064 entries of k = 500 after an int8 scan of 1M items, 115 -> 74 us)
  for (int64_t i = 0; i < n; ++i) {
    __builtin_prefetch(index.norm + entries[i].id);
    if (i8) __builtin_prefetch(index.scale + entries[i].id);
  }
  double a_min = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = entries[i].id;
    const double r = i8 ? qb.sq * entries[i].score : entries[i].score;
    if (!std::isfinite(r)) return false;  // (query_fits rules this out; a guard against NaN in the select)
    a_min = std::min(a_min, r);
    const double e = err(r, index.norm[id], i8 ? index.scale[id] : 0.0);
    bounds[2 * i] = bounds[2 * n + i] = r - e;
    bounds[2 * i + 1] = r + e;
  }
  double* lows = bounds.data() + 2 * n;
  std::nth_element(lows, lows + (width - 1), lows + n, std::greater<double>());
  const double t = lows[width - 1];
  if (out_a == out_a) a_min = i8 ? qb.sq * out_a : out_a;   // (out_a >= every score left out)
  if (!std::isfinite(a_min) || !(a_min + err(a_min, index.norm_max, index.scale_max) < t)) return false;
  int64_t w = 0;
  for (int64_t i = 0; i < n; ++i)
    if (bounds[2 * i + 1] >= t) ids[w++] = ids[i];
  n = w;  // >= width: the width entries with lows >= t have highs >= t
  return true;
}

constexpr int64_t kFloorMinItems = 65536;   // tables from this size get floors (see reduced_floors)
constexpr int64_t kSelectionBytes = int64_t{256} << 20;   // a group's selection storage, at most (about)
constexpr int64_t kFloorSamplePanels = 128;

// Floors for the nq queries of a reduced-precision scan: each query's r-th best score over
// kFloorSamplePanels panels spread over the table, r chosen so that about 2 sl items are expected above it
// (its count varies by about 1 / sqrt(r) = 16%; a floor too high only costs a failed check and a rescan).
// panel(pi, buf) gives panel pi's packed values (buf: room for one panel, for an index that converts them).
template <class Panel>
std::vector<float> reduced_floors(const QuantizedItems& index, const void* q, int64_t nq, int64_t dp, int64_t sl,
                                  const topk_gemm::Table* g, int nt, Panel panel) {
  const bool i8 = index.precision == Precision::int8;
  const int64_t n_panels = (index.n_items + kPanel - 1) / kPanel;
  const int64_t samples = kFloorSamplePanels * kPanel;
  const int64_t r = std::min<int64_t>(samples, (2 * sl * samples + index.n_items - 1) / index.n_items + 3);
  std::vector<float> scores(static_cast<size_t>(nq * samples));
  detail::parallel_for(kFloorSamplePanels, nq >= kPanelQueries ? nt : 1, 8, [&](int64_t s) {
    thread_local std::vector<uint16_t> buf;
    thread_local std::vector<float> tile;
    buf.resize(static_cast<size_t>(kPanel * dp));
    tile.resize(static_cast<size_t>(kPanelQueries * kPanel));
    float thr[kPanelQueries];
    uint64_t masks[kPanelQueries];
    std::fill(thr, thr + kPanelQueries, -std::numeric_limits<float>::infinity());
    const int64_t pi = s * (n_panels - 1) / kFloorSamplePanels;  // never the last (padded) panel
    const uint8_t* p = panel(pi, buf.data());
    for (int64_t a0 = 0; a0 < nq; a0 += kPanelQueries) {
      const int64_t m = std::min(kPanelQueries, nq - a0);
      if (i8)
        g->score_i8_filter(static_cast<const uint8_t*>(q) + a0 * dp, m, dp, reinterpret_cast<const int8_t*>(p), dp / 4,
                           index.corr + pi * kPanel, index.scale + pi * kPanel, thr, tile.data(), kPanel, masks);
      else
        g->score_bf16(static_cast<const uint16_t*>(q) + a0 * dp, m, dp, reinterpret_cast<const uint16_t*>(p), dp / 2,
                      tile.data(), kPanel);
      for (int64_t a = 0; a < m; ++a)
        std::copy_n(tile.data() + a * kPanel, kPanel, scores.data() + (a0 + a) * samples + s * kPanel);
    }
  });
  // each query's r-th best sample (r is a few dozen for a short list, a few hundred for k = 500)
  std::vector<float> floors(static_cast<size_t>(nq));
  detail::parallel_for(nq, nq >= 16 ? nt : 1, 4, [&](int64_t a) {
    thread_local std::vector<float> heap;
    floors[a] = rth_largest(scores.data() + a * samples, samples, r, heap);
  });
  return floors;
}

// Whether nothing can overflow for this query, so that the check's bounds hold: the int8 scores
// (|a| <= 127^2 d max sx) and the bf16 codes (|x| <= |x|_2 < 2^120, far below bf16's largest finite value)
// stay finite, as do the exact scores (|f| <= |q|_2 max|x|_2), and the int8 accumulators do not wrap
// (d <= 65536: 4 products of at most 255 x 127 per step, d / 4 steps). A query that fails is scanned in
// float32. The maxima include the heavy items.
bool query_fits(const QuantizedItems& index, const QueryBound& qb) {
  constexpr double kBig = 0x1p120;
  const double d = static_cast<double>(index.dim);
  if (index.dim > 65536 || !(index.norm_all_max < kBig) || !(qb.q2 * index.norm_all_max < kBig)) return false;
  return index.precision != Precision::int8 || 16129.0 * d * index.scale_all_max < kBig;
}

}  // namespace

namespace {

// Runs scan(queries', nb, options', ids', scores') over rows `rows` of the queries (each with its exclusions)
// as one batch of at least min_rows rows, the last one repeated, and writes each row's answer in its place.
// The float32 scan of a batch of kPackedMinQueries rows or more takes the packed path, whose scores are the
// re-scoring's (1-3 queries would stream, summing in another order).
template <class Scan>
void scan_rows(const float* queries, int64_t dim, const TopkOptions& opt, const std::vector<int64_t>& rows,
               int64_t min_rows, int64_t width, int64_t* out_ids, float* out_scores, Scan scan) {
  const int64_t nf = static_cast<int64_t>(rows.size());
  const int64_t nb = std::max(nf, min_rows);
  std::vector<float> fq(static_cast<size_t>(nb * dim));
  std::vector<int64_t> f_indptr(static_cast<size_t>(nb + 1), 0), f_ids;
  for (int64_t r = 0; r < nb; ++r) {
    const int64_t q = rows[std::min(r, nf - 1)];
    if (dim > 0) std::memcpy(fq.data() + r * dim, queries + q * dim, sizeof(float) * static_cast<size_t>(dim));
    if (opt.exclude.indptr != nullptr)
      f_ids.insert(f_ids.end(), opt.exclude.ids + opt.exclude.indptr[q], opt.exclude.ids + opt.exclude.indptr[q + 1]);
    f_indptr[r + 1] = static_cast<int64_t>(f_ids.size());
  }
  TopkOptions fo = opt;
  fo.candidates = IdLists{};
  fo.exclude = opt.exclude.indptr != nullptr ? IdLists{f_indptr.data(), f_ids.data()} : IdLists{};
  std::vector<int64_t> f_out_ids(static_cast<size_t>(nb * width));
  std::vector<float> f_out_scores(static_cast<size_t>(nb * width));
  scan(fq.data(), nb, fo, f_out_ids.data(), f_out_scores.data());
  for (int64_t r = 0; r < nf; ++r) {
    std::copy_n(f_out_ids.data() + r * width, width, out_ids + rows[r] * width);
    std::copy_n(f_out_scores.data() + r * width, width, out_scores + rows[r] * width);
  }
}

}  // namespace

void topk_quantized(const float* queries, int64_t n_queries, const float* items, const QuantizedItems& index,
                    const TopkOptions& opt, int64_t shortlist, int64_t* out_ids, float* out_scores,
                    int64_t* n_fallback) {
  if (n_fallback != nullptr) *n_fallback = 0;
  const int64_t n_items = index.n_items, dim = index.dim;
  if (opt.k < 0) throw std::invalid_argument("k must be >= 0, got " + std::to_string(opt.k));
  if (opt.metric != Metric::inner_product)
    throw std::invalid_argument("reduced precision supports the inner product metric only");
  if (opt.candidates.indptr != nullptr)
    throw std::invalid_argument("reduced precision does not take candidates (score them exactly with topk)");
  if (n_queries < 0 || n_items < 0 || dim < 0) throw std::invalid_argument("sizes must be >= 0");
  for (int64_t i = 0; i < n_queries * dim; ++i)
    if (!std::isfinite(queries[i]))
      throw std::invalid_argument("queries[" + std::to_string(i / dim) + ", " + std::to_string(i % dim) +
                                  "] is not finite");
  check_lists(opt.exclude, n_queries, n_items, "exclude");
  const int64_t width = topk_width(opt.k, n_items);
  if (n_queries == 0 || width == 0) return;
  const int64_t sl = std::min(n_items, std::max(width, shortlist));
  const topk_gemm::Table* g = topk_gemm::active();
  const bool i8 = index.precision == Precision::int8;
  // Without packed panels (bf16 only), each panel is converted from the float32 items as the scan reaches
  // it: batches of kPackedMinQueries queries or more on CPUs with AVX512-BF16; anything else is the exact
  // float32 scan (the same answer), as is a table whose values could overflow bf16 (the check's bounds
  // would send every query there anyway).
  const bool convert = index.packed == nullptr && dim > 0;   // (dim 0: no panel byte is ever read)
  if (convert && i8) throw std::invalid_argument("an int8 index needs its packed panels");
  if (convert && (!reduced_kernels(Precision::bf16) || n_queries < kPackedMinQueries ||
                  (index.norm != nullptr && !(index.norm_all_max < 0x1p120f)))) {
    std::vector<int64_t> rows(static_cast<size_t>(n_queries));
    for (int64_t q = 0; q < n_queries; ++q) rows[q] = q;
    scan_rows(queries, dim, opt, rows, kPackedMinQueries, width, out_ids, out_scores,
              [&](const float* fq, int64_t nb, const TopkOptions& fo, int64_t* ids, float* scores) {
                topk(fq, nb, items, n_items, dim, fo, ids, scores);
              });
    return;
  }
  // Exact mode over a large table: each selection starts at a floor from a sample of panels (reduced_floors)
  const bool floored_scan = index.norm != nullptr && n_items >= kFloorMinItems && sl >= 64 &&
                            reduced_kernels(index.precision);
  if (!floored_scan && index.norm != nullptr && n_queries >= kPackedMinQueries && sl > kExactBatchMaxShortlist &&
      n_queries * sl >= kExactBatchMaxEntries) {   // (4 queries or more: the packed path's scores)
    // Without floors a long shortlist costs its selection and re-scoring for every query, while a batch's
    // float32 scan (whose answer the exact mode returns anyway) reads the table once: past a few queries it
    // is faster (measured before floors, 1M x 64, int8, k = 500 with its 2064 shortlist: 8 queries 8.8 ms
    // against 9.4 ms in float32, 16 queries 16.9 against 12.1 ms, 256 queries 247 against 110 ms).
    topk(queries, n_queries, items, n_items, dim, opt, out_ids, out_scores);
    return;
  }
  const SortedLists exclude(opt.exclude, n_queries, false);
  const Problem p{queries, items, n_queries, n_items, dim, width, false, nullptr, nullptr, &exclude};

  // Queries in the scan's precision (int8: symmetric per query, stored as u8 = q + 128).
  const int64_t dp = padded_dim(index.precision, dim);
  std::vector<uint8_t> qu;
  std::vector<uint16_t> qb;
  const bool exact = index.norm != nullptr;
  std::vector<QueryBound> qbounds(exact ? static_cast<size_t>(n_queries) : 0);
  for (int64_t q = 0; q < static_cast<int64_t>(qbounds.size()); ++q) {
    double m = 0, s2 = 0;
    for (int64_t t = 0; t < dim; ++t) {
      const double v = queries[q * dim + t];
      m = std::max(m, std::fabs(v));
      s2 += v * v;
    }
    qbounds[q].qmax = m;
    qbounds[q].q2 = std::sqrt(s2) * (1.0 + 1e-9);
  }
  if (i8) {
    qu.assign(static_cast<size_t>(n_queries * dp), 128);
    std::vector<int8_t> row(static_cast<size_t>(dim));
    for (int64_t q = 0; q < n_queries; ++q) {
      const float sq = quantize_row(queries + q * dim, dim, row.data());
      int64_t l1 = 0;
      double e2 = 0;  // |q - q~|^2, exactly enough in double
      for (int64_t t = 0; t < dim; ++t) {
        qu[q * dp + t] = static_cast<uint8_t>(row[t] + 128);
        l1 += row[t] < 0 ? -row[t] : row[t];
        const double e = static_cast<double>(queries[q * dim + t]) - static_cast<double>(sq) * row[t];
        e2 += e * e;
      }
      if (exact) {
        qbounds[q].sq = sq;
        qbounds[q].dq2 = std::sqrt(e2) * (1.0 + 1e-9);
        qbounds[q].q1 = static_cast<double>(sq) * static_cast<double>(l1);
      }
    }
  } else {
    qb.assign(static_cast<size_t>(n_queries * dp), 0);
    for (int64_t q = 0; q < n_queries; ++q)
      for (int64_t t = 0; t < dim; ++t) qb[q * dp + t] = to_bf16(queries[q * dim + t]);
  }

  auto* ki8 = &score_i8_portable;
  auto* kbf = g != nullptr && g->score_bf16 != nullptr ? g->score_bf16 : &score_bf16_portable;
  auto* ki8f = g != nullptr ? g->score_i8_filter : nullptr;
  const int64_t n_panels = (n_items + kPanel - 1) / kPanel;
  const int64_t panel_bytes = kPanel * dp * (i8 ? 1 : 2);
  const int nt = static_cast<int>(std::min<int64_t>(
      detail::threads_for(opt.num_threads, n_queries * n_items * dim / 4, n_panels), n_panels));
  std::vector<PanelWork> work(nt);
  std::vector<int64_t> nan_ids(nt, kNoNan);
  std::vector<Entry> storage;
  std::vector<int64_t> short_ids;
  std::vector<int64_t> failed;  // exact mode: queries whose shortlist failed the check
  bool all_fit = true;          // and none of them could overflow (else a longer shortlist cannot help)
  // Groups of queries whose selections (2 sl entries a query and thread) fit kSelectionBytes: a long shortlist
  // on many threads would otherwise ask for gigabytes (1,024 queries x 64 threads x 4,128 entries at k = 500)
  const int64_t group = std::max<int64_t>(
      kPackedMinQueries,
      std::min<int64_t>(kQueryGroup, kSelectionBytes / (static_cast<int64_t>(sizeof(Entry)) * nt *
                                                        std::max<int64_t>(1, Selection::slots(sl)))));
  for (int64_t g0 = 0; g0 < n_queries; g0 += group) {
    const int64_t ng = std::min(group, n_queries - g0);
    short_ids.assign(static_cast<size_t>(ng * sl), -1);
    std::vector<int64_t> short_n(static_cast<size_t>(ng), 0);
    std::vector<char> uncertain(static_cast<size_t>(ng), 0), with_heavy(static_cast<size_t>(ng), 0);
    // Exact mode, 1-3 queries streamed over a large table with a long shortlist: each selection starts at a
    // floor taken from a sample of panels, about 2 sl items expected above it, so that the scan offers those
    // instead of every thread's first 2 sl items and the trims after them. A selection that does not fill
    // holds every item at or above its floor, which then bounds the items left out in the check.
    // The same floors serve a batch's packed scan: about 4 sl offers a query instead of each thread's
    // first 2 sl and every later item above its running threshold (1M x 64, 256 queries, exact int8 at k =
    // 100: 86 -> 45 ms; k = 500: 100 -> 88 ms, no longer slower than the float32 scan).
    std::vector<float> floors;
    const bool streamed = !convert && ng < kPackedMinQueries && g != nullptr &&
                          (i8 ? g->scan_i8_filter != nullptr : g->scan_bf16_filter != nullptr);
    if (floored_scan)
      floors = reduced_floors(index, i8 ? static_cast<const void*>(qu.data() + g0 * dp)
                                        : static_cast<const void*>(qb.data() + g0 * dp),
                              ng, dp, sl, g, nt, [&](int64_t pi, uint16_t* buf) -> const uint8_t* {
                                if (!convert) return index.packed + pi * panel_bytes;
                                g->pack_bf16(items + pi * kPanel * dim, std::min(kPanel, n_items - pi * kPanel), dim,
                                             dim, buf);
                                return reinterpret_cast<const uint8_t*>(buf);
                              });
    item_split(
        n_panels, nt, ng, sl, storage,
        [&](int t, int64_t pa, int64_t pb, Selection* sels) {
          if (streamed && i8) {
            scan_reduced_stream(p, g0, g0 + ng, pa, pb, sels, work[t], nan_ids[t],
                                [&](int64_t pi, int64_t n, const float* thr, float* tile, uint64_t* masks) {
                                  return g->scan_i8_filter(
                                      qu.data() + g0 * dp, ng, dp,
                                      reinterpret_cast<const int8_t*>(index.packed + pi * panel_bytes), n, dp / 4,
                                      index.corr + pi * kPanel, index.scale + pi * kPanel, thr, tile, kPanel, masks);
                                });
            return;
          }
          if (streamed && !i8) {
            scan_reduced_stream(p, g0, g0 + ng, pa, pb, sels, work[t], nan_ids[t],
                                [&](int64_t pi, int64_t n, const float* thr, float* tile, uint64_t* masks) {
                                  return g->scan_bf16_filter(
                                      qb.data() + g0 * dp, ng, dp,
                                      reinterpret_cast<const uint16_t*>(index.packed + pi * panel_bytes), n,
                                      dp / 2, thr, tile, kPanel, masks);
                                });
            return;
          }
          PanelWork& w = work[t];
          if (convert) w.bf16.resize(static_cast<size_t>(kPanel * dp));
          scan_panels(
              p, g0, g0 + ng, pa, pb, sels, w, nan_ids[t], g,
              [&](int64_t pi, int64_t nx) {
                if (convert) g->pack_bf16(items + pi * kPanel * dim, nx, dim, dim, w.bf16.data());
              },
              [&](int64_t pi, int64_t q0, int64_t nq, float* tile, const float* thr, uint64_t* masks) {
                const uint8_t* panel = convert ? reinterpret_cast<const uint8_t*>(w.bf16.data())
                                               : index.packed + pi * panel_bytes;
                if (i8 && ki8f != nullptr) {
                  ki8f(qu.data() + q0 * dp, nq, dp, reinterpret_cast<const int8_t*>(panel), dp / 4,
                       index.corr + pi * kPanel, index.scale + pi * kPanel, thr, tile, kPanel, masks);
                  return true;
                }
                if (i8)
                  ki8(qu.data() + q0 * dp, nq, dp, reinterpret_cast<const int8_t*>(panel), dp / 4,
                      index.corr + pi * kPanel, index.scale + pi * kPanel, tile, kPanel);
                else
                  kbf(qb.data() + q0 * dp, nq, dp, reinterpret_cast<const uint16_t*>(panel), dp / 2, tile, kPanel);
                return false;
              });
        },
        [&](int64_t a, Selection& sel) {
          sel.trim();
          int64_t n = 0;
          for (const Entry& e : sel) short_ids[a * sl + n++] = e.id;
          short_n[a] = n;
          // A shortlist that did not fill holds every eligible item (without a floor): nothing to check.
          if (!exact) return;
          const bool floored = !floors.empty() && n < sl;
          if (!query_fits(index, qbounds[g0 + a])) {
            uncertain[a] = 1;
          } else if ((n == sl && sl < n_items) || floored) {
            thread_local std::vector<double> bounds;
            uncertain[a] = !shortlist_certified(index, qbounds[g0 + a], sel.begin(), short_n[a], width,
                                                short_ids.data() + a * sl, bounds,
                                                floored ? floors[a] : std::numeric_limits<float>::quiet_NaN());
            with_heavy[a] = !uncertain[a] && index.n_heavy > 0;
          }
        },
        floors.empty() ? nullptr : floors.data());
    // Exact float32 re-scoring of each shortlist.
    const int ntq = detail::threads_for(opt.num_threads, ng * sl * dim, ng);
    std::vector<Entry> sel_storage(static_cast<size_t>(ntq * Selection::slots(width)));
    std::vector<std::vector<float>> scratch(ntq);
    std::vector<int64_t> nan_q(ntq, kNoNan);
    detail::parallel_for(ng, ntq, 4, [&](int64_t a) {
      const int t = detail::thread_id();
      if (uncertain[a]) return;  // scanned again below: its shortlist's scores would be thrown away
      Selection sel(sel_storage.data() + t * Selection::slots(width), width);
      const int64_t q = g0 + a;
      int64_t* ids = short_ids.data() + a * sl;
      int64_t n = short_n[a];
      std::sort(ids, ids + n);  // rows read in memory order
      if (with_heavy[a]) {      // the heavy items are re-scored whatever their reduced-precision score
        thread_local std::vector<int64_t> merged;
        merged.resize(static_cast<size_t>(n + index.n_heavy));
        n = std::set_union(ids, ids + n, index.heavy, index.heavy + index.n_heavy, merged.begin()) - merged.begin();
        ids = merged.data();
      }
      scan_candidates(p, q, ids, n, sel, scratch[t], nan_q[t]);
      sel.write_sorted(width, out_ids + q * width, out_scores + q * width);
    });
    for (int64_t a = 0; a < ng; ++a)
      if (uncertain[a]) {
        failed.push_back(g0 + a);
        all_fit = all_fit && query_fits(index, qbounds[g0 + a]);
      }
  }
  if (failed.empty()) return;
  if (n_fallback != nullptr) *n_fallback = static_cast<int64_t>(failed.size());
  // The queries that failed the check are scanned again: with a 4x shortlist while that stays under an
  // eighth of the items, else exactly in float32 (as a batch of at least kPackedMinQueries rows).
  const bool again = all_fit && 4 * sl <= n_items / 8;
  scan_rows(queries, dim, opt, failed, again ? 0 : kPackedMinQueries, width, out_ids, out_scores,
            [&](const float* fq, int64_t nb, const TopkOptions& fo, int64_t* ids, float* scores) {
              if (again)
                topk_quantized(fq, nb, items, index, fo, 4 * sl, ids, scores);
              else
                topk(fq, nb, items, n_items, dim, fo, ids, scores);
            });
}

}  // namespace rec_engine
