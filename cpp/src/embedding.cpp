// Embedding gather and bag pooling over float32, float16 and row-wise int8 tables.
#include "rec_engine/embedding.hpp"

#include <algorithm>
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
    const char* p = static_cast<const char*>(t.data) + r * t.dim * elem_size();
    __builtin_prefetch(p);
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
  kernels::PoolArgs args;
  args.storage = table.type == StorageType::float32   ? kernels::PoolStorage::f32
                 : table.type == StorageType::float16 ? kernels::PoolStorage::f16
                                                      : kernels::PoolStorage::u8;
  args.data = table.data;
  args.scale_bias = table.scale_bias;
  args.dim = d;
  args.ids = indices;
  args.ids64 = sizeof(Index) == 8;
  args.offsets = offsets;
  args.weights = weights;
  args.op = mode == PoolMode::sum ? kernels::PoolOp::sum : mode == PoolMode::mean ? kernels::PoolOp::mean
                                                                                  : kernels::PoolOp::max;
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

template void gather<int32_t>(const TableView&, const int32_t*, int64_t, float*, int);
template void gather<int64_t>(const TableView&, const int64_t*, int64_t, float*, int);
template void pool<int32_t>(const TableView&, const int32_t*, int64_t, const int64_t*, int64_t,
                            const float*, PoolMode, float*, int);
template void pool<int64_t>(const TableView&, const int64_t*, int64_t, const int64_t*, int64_t,
                            const float*, PoolMode, float*, int);

}  // namespace rec_engine
