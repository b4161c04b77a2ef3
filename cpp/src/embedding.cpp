// Embedding gather and bag pooling over float32, float16 and row-wise int8 tables.
#include "rec_engine/embedding.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/kernels.hpp"
#include "parallel.hpp"

namespace rec_engine {
namespace {

template <class Index>
void check_ids(const Index* ids, int64_t n, int64_t rows, const char* what) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = static_cast<int64_t>(ids[i]);
    if (v < 0 || v >= rows)
      throw std::out_of_range(std::string(what) + "[" + std::to_string(i) + "] = " + std::to_string(v) +
                              " is out of range for a table of " + std::to_string(rows) + " rows");
  }
}

// Row access for one storage type: add(y, r, w) does y += w * row r; max(y, r) does y = max(y, row r).
struct RowOps {
  const TableView& t;
  const kernels::KernelTable& k;

  void prefetch(int64_t r) const {
#if defined(__GNUC__)
    const int64_t bytes = t.dim * elem_size();
    const char* p = static_cast<const char*>(t.data) + r * bytes;
    __builtin_prefetch(p);
    // the second line only when the row reaches it (a 64-byte row of 16 floats at a line boundary, or a
    // linear table's 4-byte row, would otherwise fetch a line of another row)
    if (bytes > 0 && ((reinterpret_cast<uintptr_t>(p) ^ reinterpret_cast<uintptr_t>(p + bytes - 1)) >> 6) != 0)
      __builtin_prefetch(p + 64);
#else
    (void)r;
#endif
  }
  int64_t elem_size() const {
    return t.type == StorageType::float32 ? 4 : t.type == StorageType::float16 ? 2 : 1;
  }
  void add(float* y, int64_t r, float w) const {
    switch (t.type) {
      case StorageType::float32:
        k.axpy_f32(y, static_cast<const float*>(t.data) + r * t.dim, w, t.dim);
        break;
      case StorageType::float16:
        k.axpy_f16(y, static_cast<const uint16_t*>(t.data) + r * t.dim, w, t.dim);
        break;
      case StorageType::int8_rowwise:
        k.axpy_u8(y, static_cast<const uint8_t*>(t.data) + r * t.dim, w * t.scale_bias[2 * r],
                  w * t.scale_bias[2 * r + 1], t.dim);
        break;
    }
  }
  void max(float* y, int64_t r) const {
    switch (t.type) {
      case StorageType::float32:
        k.max_f32(y, static_cast<const float*>(t.data) + r * t.dim, t.dim);
        break;
      case StorageType::float16:
        k.max_f16(y, static_cast<const uint16_t*>(t.data) + r * t.dim, t.dim);
        break;
      case StorageType::int8_rowwise:
        k.max_u8(y, static_cast<const uint8_t*>(t.data) + r * t.dim, t.scale_bias[2 * r],
                 t.scale_bias[2 * r + 1], t.dim);
        break;
    }
  }
};

constexpr int64_t kPrefetchDistance = 8;

// The kernel arguments that describe a table (ids, offsets, weights and out are the caller's).
kernels::PoolArgs table_args(const TableView& t, bool ids64, kernels::PoolOp op) {
  kernels::PoolArgs a;
  a.storage = t.type == StorageType::float32   ? kernels::PoolStorage::f32
              : t.type == StorageType::float16 ? kernels::PoolStorage::f16
                                               : kernels::PoolStorage::u8;
  a.data = t.data;
  a.scale_bias = t.scale_bias;
  a.dim = t.dim;
  a.ids64 = ids64;
  a.op = op;
  return a;
}

inline void prefetch_read(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

}  // namespace

void validate_table(const TableView& t) {
  if (t.rows < 0 || t.dim < 0) throw std::invalid_argument("table rows and dim must be >= 0");
  if (t.data == nullptr && t.rows * t.dim > 0) throw std::invalid_argument("table data is null");
  if (t.type == StorageType::int8_rowwise && t.scale_bias == nullptr && t.rows > 0)
    throw std::invalid_argument("an int8 table needs a rows x 2 scale/bias array");
}

template <class Index>
void gather(const TableView& table, const Index* ids, int64_t n, float* out, int num_threads) {
  validate_table(table);
  if (n < 0) throw std::invalid_argument("gather: n must be >= 0");
  check_ids(ids, n, table.rows, "ids");
  const int64_t d = table.dim;
  if (n == 0 || d == 0) return;
  const RowOps ops{table, kernels::active()};
  const int nt = detail::threads_for(num_threads, n * d, n / 64);
  detail::parallel_for((n + 255) / 256, nt, 1, [&](int64_t chunk) {
    const int64_t end = std::min(n, (chunk + 1) * 256);
    for (int64_t i = chunk * 256; i < end; ++i) {
      if (i + kPrefetchDistance < end) ops.prefetch(static_cast<int64_t>(ids[i + kPrefetchDistance]));
      const int64_t r = static_cast<int64_t>(ids[i]);
      float* y = out + i * d;
      if (table.type == StorageType::float32) {
        std::memcpy(y, static_cast<const float*>(table.data) + r * d, sizeof(float) * d);
      } else {
        std::memset(y, 0, sizeof(float) * d);
        ops.add(y, r, 1.f);
      }
    }
  });
}

template <class Index>
void pool(const TableView& table, const Index* indices, int64_t n_indices, const int64_t* offsets,
          int64_t n_bags, const float* weights, PoolMode mode, float* out, int num_threads) {
  validate_table(table);
  if (n_bags < 0 || n_indices < 0) throw std::invalid_argument("pool: sizes must be >= 0");
  if (weights != nullptr && mode != PoolMode::sum)
    throw std::invalid_argument("per-sample weights are only supported with mode='sum' (as in PyTorch)");
  if (offsets[0] != 0)
    throw std::invalid_argument("offsets[0] must be 0, got " + std::to_string(offsets[0]));
  for (int64_t b = 0; b < n_bags; ++b) {
    if (offsets[b + 1] < offsets[b])
      throw std::invalid_argument("offsets must be non-decreasing: offsets[" + std::to_string(b + 1) +
                                  "] = " + std::to_string(offsets[b + 1]) + " < offsets[" +
                                  std::to_string(b) + "] = " + std::to_string(offsets[b]));
  }
  if (offsets[n_bags] != n_indices)
    throw std::out_of_range("the last offset (" + std::to_string(offsets[n_bags]) +
                            ") must equal the number of indices (" + std::to_string(n_indices) + ")");
  check_ids(indices, n_indices, table.rows, "indices");
  if (weights != nullptr) {
    for (int64_t i = 0; i < n_indices; ++i)
      if (!(weights[i] - weights[i] == 0.f))
        throw std::invalid_argument("weights[" + std::to_string(i) + "] is not finite");
  }
  const int64_t d = table.dim;
  if (n_bags == 0 || d == 0) return;
  kernels::PoolArgs args = table_args(table, sizeof(Index) == 8,
                                      mode == PoolMode::sum    ? kernels::PoolOp::sum
                                      : mode == PoolMode::mean ? kernels::PoolOp::mean
                                                               : kernels::PoolOp::max);
  args.ids = indices;
  args.offsets = offsets;
  args.weights = weights;
  args.out = out;
  const auto& k = kernels::active();  // one kernel call per thread: the row loop lives in the ISA file
  const int nt = detail::threads_for(num_threads, (n_indices + n_bags) * d, n_bags / 16);
  if (nt <= 1) {
    k.pool_bags(args, 0, n_bags);
    return;
  }
  // Static ranges of bags with about the same number of ids each (8 per thread, taken in turn).
  const int64_t parts = std::min<int64_t>(n_bags, int64_t{8} * nt);
  std::vector<int64_t> cut(static_cast<size_t>(parts + 1), n_bags);
  cut[0] = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = n_indices / parts * p + (n_indices % parts) * p / parts;
    const int64_t by_ids = std::lower_bound(offsets, offsets + n_bags + 1, target) - offsets;
    const int64_t by_bags = n_bags * p / parts;
    // Balance ids + bags: midway between the two cut points keeps both kinds of work in check.
    cut[p] = std::max(cut[p - 1], std::min<int64_t>(n_bags, (by_ids + by_bags) / 2));
  }
  detail::parallel_for(parts, nt, 1, [&](int64_t p) { k.pool_bags(args, cut[p], cut[p + 1]); });
}

// The selection is pooled in blocks of this many bags: each block's ids and weights are copied into small
// per-thread compact arrays and pooled by one kernel call into a [block, dim] scratch, whose rows are then
// copied to their dest rows.
constexpr int64_t kSelectBlock = 64;
// The checks run this many selected bags ahead with prefetches: the store is typically a memory-mapped
// file far larger than the caches, and its entries of random bags would otherwise be loaded one
// dependent miss after another (offsets, then ids and weights).
constexpr int64_t kSelectPrefetch = 64;
// The table rows of a block's first this many ids are prefetched as the ids are copied (all of them in a
// block of short bags: more misses in flight than the kernel's own prefetch, a fixed distance ahead
// within its call, keeps; the cap keeps a block of long bags from flushing the cache).
constexpr int64_t kSelectRowPrefetch = 256;
// A thread's share of a selection of at most this many ids has the table rows of every id prefetched
// already by the check of its ids, a whole pass before they are pooled (the rows of a few thousand random
// items then load in parallel instead of a block at a time); a larger one would push them out of the cache.
constexpr int64_t kSelectEarlyRows = 16384;

namespace {

// The first problem a thread found in its share of a selection: stage 1 (a bag's offsets) before stage 2
// (an id or a weight), then the lowest selection index; what the sequential checks would report first.
struct SelectError {
  int stage = 3;
  int64_t i = 0;
  std::string what;
  bool invalid_argument = false;   // else out_of_range
  void set(int st, int64_t at, std::string msg, bool invalid) {
    if (st < stage || (st == stage && at < i)) {
      stage = st;
      i = at;
      what = std::move(msg);
      invalid_argument = invalid;
    }
  }
};

}  // namespace

template <class Index>
void pool_select(const TableView& table, const Index* indices, int64_t n_indices, const int64_t* offsets,
                 int64_t n_bags, const float* weights, const int64_t* bags, const int64_t* dest, int64_t n_select,
                 float* out, int64_t n_out, int num_threads, const TableView* second, float* second_out) {
  validate_table(table);
  if ((second == nullptr) != (second_out == nullptr))
    throw std::invalid_argument("pool_select: give a second table and its output together");
  if (second != nullptr) validate_table(*second);
  if (n_indices < 0 || n_bags < 0 || n_select < 0 || n_out < 0)
    throw std::invalid_argument("pool_select: sizes must be >= 0");
  const int64_t n_rows = second != nullptr ? std::min(table.rows, second->rows) : table.rows;
  // Everything is checked before anything is written, and the first problem is reported in this order: any
  // bag or dest row out of range or named twice (0, the caller's small arrays), then any bag's offsets (1),
  // then any id or weight (2), each at its lowest selected position.
  std::vector<bool> named(static_cast<size_t>(n_out), false);
  for (int64_t i = 0; i < n_select; ++i) {
    const int64_t b = bags[i];
    if (b < 0 || b >= n_bags)
      throw std::out_of_range("bags[" + std::to_string(i) + "] = " + std::to_string(b) + " is out of range for " +
                              std::to_string(n_bags) + " bags");
    const int64_t r = dest[i];
    if (r < 0 || r >= n_out)
      throw std::out_of_range("dest[" + std::to_string(i) + "] = " + std::to_string(r) +
                              " is out of range for an output of " + std::to_string(n_out) + " rows");
    if (named[static_cast<size_t>(r)])
      throw std::invalid_argument("dest[" + std::to_string(i) + "] = " + std::to_string(r) +
                                  " names an output row already named: dest rows must be distinct");
    named[static_cast<size_t>(r)] = true;
  }
  const int64_t d = table.dim, d2 = second != nullptr ? second->dim : 0;
  if (n_select == 0) return;
  const auto& k = kernels::active();
  const RowOps ops{table, k};
  const RowOps ops2{second != nullptr ? *second : table, k};
  const kernels::PoolArgs proto = table_args(table, sizeof(Index) == 8, kernels::PoolOp::sum);
  const kernels::PoolArgs proto2 = second != nullptr ? table_args(*second, sizeof(Index) == 8, kernels::PoolOp::sum)
                                                     : proto;
  const int64_t n_blocks = (n_select + kSelectBlock - 1) / kSelectBlock;
  // (the selected bags' ids are not counted yet: the store's mean bag length stands for theirs)
  const int64_t mean_len = n_bags > 0 ? (n_indices + n_bags - 1) / n_bags : 0;
  const int nt = detail::threads_for(num_threads, n_select * (mean_len + 1) * (d + d2 + 1), n_blocks);
  // 1-2. Each thread checks a contiguous share of the selection (its bags' offsets, kept as [lo, hi), then
  // their ids and weights, starting the loads of their table rows), all threads wait for one another, and
  // then each pools the share it checked, whose store entries and rows its own core has just loaded: the
  // checks are chains of dependent cache misses (offsets, then ids, then rows) that run on every thread.
  std::vector<int64_t> span(static_cast<size_t>(2 * n_select));
  std::vector<SelectError> errors(static_cast<size_t>(nt));
  detail::ExceptionSlot slot;

  auto check_share = [&](int64_t i0, int64_t i1, SelectError& err) {
    for (int64_t i = i0; i < std::min(i1, i0 + kSelectPrefetch); ++i) prefetch_read(offsets + bags[i]);
    for (int64_t i = i0; i < i1; ++i) {
      if (i + kSelectPrefetch < i1) prefetch_read(offsets + bags[i + kSelectPrefetch]);
      const int64_t b = bags[i];
      const int64_t lo = offsets[b], hi = offsets[b + 1];
      if (lo < 0 || hi < lo || hi > n_indices) {
        err.set(1, i, "bag " + std::to_string(b) + " (bags[" + std::to_string(i) + "]) has offsets " +
                          std::to_string(lo) + ".." + std::to_string(hi) +
                          ": they must not decrease and must lie in [0, " + std::to_string(n_indices) + "]",
                true);
        return;
      }
      span[2 * i] = lo;
      span[2 * i + 1] = hi;
    }
    for (int64_t i = i0; i < std::min(i1, i0 + kSelectPrefetch); ++i) {
      if (span[2 * i] < n_indices) {
        prefetch_read(indices + span[2 * i]);
        if (weights != nullptr) prefetch_read(weights + span[2 * i]);
      }
    }
    int64_t n_ids = 0;
    for (int64_t i = i0; i < i1; ++i) {
      if (i + kSelectPrefetch < i1) {
        const int64_t ahead = span[2 * (i + kSelectPrefetch)];
        if (ahead < n_indices) {
          prefetch_read(indices + ahead);
          if (weights != nullptr) prefetch_read(weights + ahead);
        }
      }
      const int64_t lo = span[2 * i], hi = span[2 * i + 1];
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t v = static_cast<int64_t>(indices[j]);
        if (v < 0 || v >= n_rows) {
          err.set(2, i, "indices[" + std::to_string(j) + "] = " + std::to_string(v) + " (bag " +
                            std::to_string(bags[i]) + ", bags[" + std::to_string(i) +
                            "]) is out of range for a table of " + std::to_string(n_rows) + " rows",
                  false);
          return;
        }
        if (weights != nullptr && !(weights[j] - weights[j] == 0.f)) {
          err.set(2, i, "weights[" + std::to_string(j) + "] (bag " + std::to_string(bags[i]) + ", bags[" +
                            std::to_string(i) + "]) is not finite",
                  true);
          return;
        }
        if (n_ids + (j - lo) < kSelectEarlyRows) {
          ops.prefetch(v);
          if (second != nullptr) ops2.prefetch(v);
        }
      }
      n_ids += hi - lo;
    }
  };

  struct Scratch {
    std::vector<Index> ids;
    std::vector<float> w;
    std::vector<int64_t> offs;
    std::vector<float> y;
  };
  auto pool_share = [&](int64_t blk0, int64_t blk1) {
    Scratch s;
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t i0 = blk * kSelectBlock, i1 = std::min(n_select, i0 + kSelectBlock), nb = i1 - i0;
      s.offs.resize(static_cast<size_t>(nb + 1));
      s.offs[0] = 0;
      for (int64_t i = i0; i < i1; ++i) s.offs[i - i0 + 1] = s.offs[i - i0] + (span[2 * i + 1] - span[2 * i]);
      const int64_t m = s.offs[nb];
      if (static_cast<int64_t>(s.ids.size()) < m) s.ids.resize(static_cast<size_t>(m));
      if (weights != nullptr && static_cast<int64_t>(s.w.size()) < m) s.w.resize(static_cast<size_t>(m));
      if (static_cast<int64_t>(s.y.size()) < nb * std::max(d, d2)) s.y.resize(static_cast<size_t>(nb * std::max(d, d2)));
      // Copy the block's ids (and weights) in bag order, starting the loads of their table rows (bags
      // hold a few ids each: plain loops, not a memcpy call per bag).
      Index* ids = s.ids.data();
      float* w = s.w.data();
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t lo = span[2 * i], hi = span[2 * i + 1];
        for (int64_t j = lo; j < hi; ++j) {
          if (ids - s.ids.data() < kSelectRowPrefetch) {
            ops.prefetch(static_cast<int64_t>(indices[j]));
            if (second != nullptr) ops2.prefetch(static_cast<int64_t>(indices[j]));
          }
          *ids++ = indices[j];
        }
        if (weights != nullptr)
          for (int64_t j = lo; j < hi; ++j) *w++ = weights[j];
      }
      // Each table: one kernel call over the compact block into the scratch, then the rows to their places.
      auto pool_block_into = [&](const kernels::PoolArgs& p, int64_t dim, float* to) {
        if (dim == 0) return;
        kernels::PoolArgs args = p;
        args.ids = s.ids.data();
        args.offsets = s.offs.data();
        args.weights = weights != nullptr ? s.w.data() : nullptr;
        args.out = s.y.data();
        k.pool_bags(args, 0, nb);
        for (int64_t i = i0; i < i1; ++i) {
          const float* src = s.y.data() + (i - i0) * dim;
          float* dst = to + dest[i] * dim;
          for (int64_t c = 0; c < dim; ++c) dst[c] = src[c];
        }
      };
      pool_block_into(proto, d, out);
      if (second != nullptr) pool_block_into(proto2, d2, second_out);
    }
  };

  auto run = [&](int t, int T, auto barrier) {
    // shares of whole blocks (the pooling's unit)
    const int64_t b0 = n_blocks * t / T, b1 = n_blocks * (t + 1) / T;
    slot.run([&] { check_share(b0 * kSelectBlock, std::min(n_select, b1 * kSelectBlock), errors[t]); });
    barrier();
    if (slot.failed()) return;
    for (int u = 0; u < T; ++u)
      if (errors[u].stage < 3) return;
    if (d + d2 > 0) slot.run([&] { pool_share(b0, b1); });
  };
#if defined(REC_ENGINE_OPENMP)
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    {
      run(detail::thread_id(), detail::team_size(), [] {
#pragma omp barrier
      });
    }
  } else {
    run(0, 1, [] {});
  }
#else
  run(0, 1, [] {});
#endif
  // (a failure to allocate, say; then the checks' findings, the first of them)
  slot.rethrow();
  const SelectError* first = nullptr;
  for (const SelectError& e : errors)
    if (e.stage < 3 && (first == nullptr || e.stage < first->stage || (e.stage == first->stage && e.i < first->i)))
      first = &e;
  if (first != nullptr) {
    if (first->invalid_argument) throw std::invalid_argument(first->what);
    throw std::out_of_range(first->what);
  }
}

template void gather<int32_t>(const TableView&, const int32_t*, int64_t, float*, int);
template void gather<int64_t>(const TableView&, const int64_t*, int64_t, float*, int);
template void pool<int32_t>(const TableView&, const int32_t*, int64_t, const int64_t*, int64_t,
                            const float*, PoolMode, float*, int);
template void pool<int64_t>(const TableView&, const int64_t*, int64_t, const int64_t*, int64_t,
                            const float*, PoolMode, float*, int);

template void pool_select<int32_t>(const TableView&, const int32_t*, int64_t, const int64_t*, int64_t,
                                   const float*, const int64_t*, const int64_t*, int64_t, float*, int64_t, int,
                                   const TableView*, float*);
template void pool_select<int64_t>(const TableView&, const int64_t*, int64_t, const int64_t*, int64_t,
                                   const float*, const int64_t*, const int64_t*, int64_t, float*, int64_t, int,
                                   const TableView*, float*);

}  // namespace rec_engine
