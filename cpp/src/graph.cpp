// Normalized bipartite adjacency, SpMM and LightGCN propagation.
#include "rec_engine/graph.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
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
  if (n_users + n_items > std::numeric_limits<int32_t>::max())
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

// y (d) = sum over row r of a: value * x[col]
inline void row_product(const CsrView& a, int64_t r, const float* x, int64_t d, float* y,
                        const kernels::KernelTable& k) {
  std::memset(y, 0, sizeof(float) * d);
  const int64_t lo = a.indptr[r], hi = a.indptr[r + 1];
  for (int64_t i = lo; i < hi; ++i) {
#if defined(__GNUC__)
    if (i + 8 < hi) __builtin_prefetch(x + static_cast<int64_t>(a.indices[i + 8]) * d);
#endif
    k.axpy_f32(y, x + static_cast<int64_t>(a.indices[i]) * d, a.data[i], d);
  }
}

void check_dense(const CsrView& a, const float* x, int64_t d) {
  if (d < 0) throw std::invalid_argument("dense dim must be >= 0");
  if (x == nullptr && a.n_cols * d > 0) throw std::invalid_argument("dense input is null");
}

}  // namespace

void spmm(const CsrView& a, const float* x, int64_t d, float* out, int num_threads) {
  validate_csr(a);
  check_dense(a, x, d);
  if (a.n_rows == 0 || d == 0) return;
  const auto& k = kernels::active();
  const int nt = detail::threads_for(num_threads, (a.nnz() + a.n_rows) * d, a.n_rows / 64);
  detail::parallel_for(a.n_rows, nt, 64, [&](int64_t r) { row_product(a, r, x, d, out + r * d, k); });
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
  // out = w0 * x; then per layer: next = a * cur, out += w_l * next (fused per row).
  detail::parallel_for(n, nt, 256, [&](int64_t r) {
    float* y = out + r * d;
    std::memset(y, 0, sizeof(float) * d);
    k.axpy_f32(y, x + r * d, layer_weights[0], d);
  });
  if (n_layers == 0) return;
  const size_t size = static_cast<size_t>(n * d);
  std::vector<float> buf_a(size), buf_b(n_layers > 1 ? size : 0);
  const float* cur = x;
  float* next = buf_a.data();
  for (int l = 1; l <= n_layers; ++l) {
    const float w = layer_weights[l];
    detail::parallel_for(n, nt, 64, [&](int64_t r) {
      row_product(a, r, cur, d, next + r * d, k);
      k.axpy_f32(out + r * d, next + r * d, w, d);
    });
    cur = next;
    next = (next == buf_a.data()) ? buf_b.data() : buf_a.data();
  }
}

template Csr normalized_adjacency<int32_t>(const int32_t*, const int32_t*, int64_t, int64_t, int64_t, int);
template Csr normalized_adjacency<int64_t>(const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int);

}  // namespace rec_engine
