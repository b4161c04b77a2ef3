// Normalized bipartite adjacency, SpMM and LightGCN propagation.
#include "rec_engine/graph.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>

#include "kernels/kernels.hpp"
#include "parallel.hpp"

namespace rec_engine {

void validate_csr(const CsrView& a) {
  if (a.n_rows < 0 || a.n_cols < 0) throw std::invalid_argument("CSR shape must be >= 0");
  if (a.indptr == nullptr) throw std::invalid_argument("CSR indptr is null");
  if (a.indptr[0] != 0)
    throw std::invalid_argument("CSR indptr[0] must be 0, got " + std::to_string(a.indptr[0]));
  for (int64_t r = 0; r < a.n_rows; ++r)
    if (a.indptr[r + 1] < a.indptr[r])
      throw std::invalid_argument("CSR indptr must be non-decreasing: indptr[" + std::to_string(r + 1) +
                                  "] = " + std::to_string(a.indptr[r + 1]) + " < indptr[" +
                                  std::to_string(r) + "] = " + std::to_string(a.indptr[r]));
  const int64_t nnz = a.indptr[a.n_rows];
  for (int64_t i = 0; i < nnz; ++i)
    if (a.indices[i] < 0 || a.indices[i] >= a.n_cols)
      throw std::out_of_range("CSR indices[" + std::to_string(i) + "] = " + std::to_string(a.indices[i]) +
                              " is out of range for " + std::to_string(a.n_cols) + " columns");
}

template <class Index>
Csr normalized_adjacency(const Index* users, const Index* items, int64_t n, int64_t n_users,
                         int64_t n_items, int num_threads) {
  if (n < 0 || n_users < 0 || n_items < 0) throw std::invalid_argument("sizes must be >= 0");
  // (compared without adding: n_users + n_items can overflow int64 itself)
  if (n_users > std::numeric_limits<int32_t>::max() || n_items > std::numeric_limits<int32_t>::max() - n_users)
    throw std::invalid_argument("n_users + n_items must fit in int32 column ids");
  for (int64_t i = 0; i < n; ++i) {
    if (users[i] < 0 || static_cast<int64_t>(users[i]) >= n_users)
      throw std::out_of_range("users[" + std::to_string(i) + "] = " + std::to_string(users[i]) +
                              " is out of range for " + std::to_string(n_users) + " users");
    if (items[i] < 0 || static_cast<int64_t>(items[i]) >= n_items)
      throw std::out_of_range("items[" + std::to_string(i) + "] = " + std::to_string(items[i]) +
                              " is out of range for " + std::to_string(n_items) + " items");
  }
  const int64_t nodes = n_users + n_items;
  // Count both directions, fill, then sort and deduplicate every row.
  std::vector<int64_t> start(nodes + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    ++start[static_cast<int64_t>(users[i]) + 1];
    ++start[n_users + static_cast<int64_t>(items[i]) + 1];
  }
  for (int64_t r = 0; r < nodes; ++r) start[r + 1] += start[r];
  std::vector<int32_t> cols(static_cast<size_t>(start[nodes]));
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t u = users[i], v = n_users + static_cast<int64_t>(items[i]);
      cols[fill[u]++] = static_cast<int32_t>(v);
      cols[fill[v]++] = static_cast<int32_t>(u);
    }
  }
  std::vector<int64_t> degree(nodes, 0);
  const int nt = detail::threads_for(num_threads, start[nodes] * 8, nodes / 256);
  detail::parallel_for(nodes, nt, 256, [&](int64_t r) {
    auto b = cols.begin() + start[r], e = cols.begin() + start[r + 1];
    std::sort(b, e);
    degree[r] = std::unique(b, e) - b;
  });
  Csr out;
  out.n_rows = out.n_cols = nodes;
  out.indptr.assign(nodes + 1, 0);
  for (int64_t r = 0; r < nodes; ++r) out.indptr[r + 1] = out.indptr[r] + degree[r];
  out.indices.resize(static_cast<size_t>(out.indptr[nodes]));
  out.data.resize(out.indices.size());
  detail::parallel_for(nodes, nt, 256, [&](int64_t r) {
    const double dr = static_cast<double>(degree[r]);
    for (int64_t t = 0; t < degree[r]; ++t) {
      const int32_t c = cols[start[r] + t];
      out.indices[out.indptr[r] + t] = c;
      out.data[out.indptr[r] + t] = static_cast<float>(1.0 / std::sqrt(dr * static_cast<double>(degree[c])));
    }
  });
  return out;
}

namespace {

void check_dense(const CsrView& a, const float* x, int64_t d) {
  if (d < 0) throw std::invalid_argument("dense dim must be >= 0");
  if (x == nullptr && a.n_cols * d > 0) throw std::invalid_argument("dense input is null");
}

// Row ranges with about the same work (stored values + rows) each, 16 per thread, taken dynamically:
// power-law degrees make equal row counts very unequal in work. Every row is computed the same way
// whatever range it lands in, so the split does not change the results.
std::vector<int64_t> balanced_cuts(const CsrView& a, int nt) {
  const int64_t n = a.n_rows;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(n, nt <= 1 ? 1 : int64_t{16} * nt));
  std::vector<int64_t> cut(static_cast<size_t>(parts + 1), n);
  cut[0] = 0;
  const int64_t total = a.nnz() + n;
  int64_t r = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = total / parts * p + (total % parts) * p / parts;
    // first row r with indptr[r] + r >= target (indptr + row index is increasing)
    int64_t lo = r, hi = n;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (a.indptr[mid] + mid < target) lo = mid + 1;
      else hi = mid;
    }
    r = lo;
    cut[p] = r;
  }
  return cut;
}

void run_rows(const CsrView& a, const kernels::SpmmArgs& args, int nt) {
  const auto& k = kernels::active();
  if (nt <= 1) {
    k.spmm_rows(args, 0, a.n_rows);
    return;
  }
  const std::vector<int64_t> cut = balanced_cuts(a, nt);
  const int64_t parts = static_cast<int64_t>(cut.size()) - 1;
  detail::parallel_for(parts, nt, 1, [&](int64_t p) {
    if (cut[p] < cut[p + 1]) k.spmm_rows(args, cut[p], cut[p + 1]);
  });
}

}  // namespace

void spmm(const CsrView& a, const float* x, int64_t d, float* out, int num_threads) {
  validate_csr(a);
  check_dense(a, x, d);
  if (a.n_rows == 0 || d == 0) return;
  const int nt = detail::threads_for(num_threads, (a.nnz() + a.n_rows) * d, a.n_rows / 64);
  kernels::SpmmArgs args{a.indptr, a.indices, a.data, x, d, out, nullptr, 0.f, nullptr, 0.f};
  run_rows(a, args, nt);
}

void lightgcn_propagate(const CsrView& a, const float* x, int64_t d, int n_layers,
                        const float* layer_weights, float* out, int num_threads) {
  validate_csr(a);
  check_dense(a, x, d);
  if (a.n_rows != a.n_cols)
    throw std::invalid_argument("propagation needs a square adjacency, got " + std::to_string(a.n_rows) +
                                " x " + std::to_string(a.n_cols));
  if (n_layers < 0) throw std::invalid_argument("n_layers must be >= 0");
  for (int l = 0; l <= n_layers; ++l)
    if (!std::isfinite(layer_weights[l]))
      throw std::invalid_argument("layer_weights[" + std::to_string(l) + "] is not finite");
  const int64_t n = a.n_rows;
  if (n == 0 || d == 0) return;
  const auto& k = kernels::active();
  const int nt = detail::threads_for(num_threads, (a.nnz() + n) * d * std::max(n_layers, 1), n / 64);
  // out = w0 * x (as fma(w0, x, 0)); then per layer: next = a * cur and out += w_l * next, fused per
  // row in one pass (the first layer also writes w0 * x there, so out is written once per layer).
  if (n_layers == 0) {
    detail::parallel_for(n, nt, 256, [&](int64_t r) {
      float* y = out + r * d;
      std::memset(y, 0, sizeof(float) * d);
      k.axpy_f32(y, x + r * d, layer_weights[0], d);
    });
    return;
  }
  const size_t size = static_cast<size_t>(n * d);
  // The last layer only adds into out: its product is not stored. (Scratch is left uninitialized: each
  // layer writes every row before the next reads it; zeroing 2 x n x d floats cost ~10% of a call.)
  std::unique_ptr<float[]> buf_a(n_layers > 1 ? new float[size] : nullptr);
  std::unique_ptr<float[]> buf_b(n_layers > 2 ? new float[size] : nullptr);
  const float* cur = x;
  float* next = buf_a.get();
  for (int l = 1; l <= n_layers; ++l) {
    kernels::SpmmArgs args{a.indptr, a.indices, a.data, cur, d, l < n_layers ? next : nullptr, out, layer_weights[l],
                           l == 1 ? x : nullptr, layer_weights[0]};
    run_rows(a, args, nt);
    cur = next;
    next = (next == buf_a.get()) ? buf_b.get() : buf_a.get();
  }
}

template Csr normalized_adjacency<int32_t>(const int32_t*, const int32_t*, int64_t, int64_t, int64_t, int);
template Csr normalized_adjacency<int64_t>(const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int);

}  // namespace rec_engine
