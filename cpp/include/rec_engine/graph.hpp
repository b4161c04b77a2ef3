// Sparse graph propagation: the normalized user-item adjacency and sparse x dense products.
#pragma once
#include <cstdint>
#include <vector>

namespace rec_engine {

// A CSR matrix over memory the caller owns (int64 row offsets, int32 column ids, float32 values).
struct CsrView {
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  const int64_t* indptr = nullptr;   // n_rows + 1
  const int32_t* indices = nullptr;  // nnz
  const float* data = nullptr;       // nnz
  int64_t nnz() const { return n_rows > 0 ? indptr[n_rows] : 0; }
};

// A CSR matrix that owns its arrays.
struct Csr {
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  std::vector<int64_t> indptr;
  std::vector<int32_t> indices;
  std::vector<float> data;
  CsrView view() const { return {n_rows, n_cols, indptr.data(), indices.data(), data.data()}; }
};

// Throws std::invalid_argument for offsets that do not start at 0 or decrease, std::out_of_range for
// column ids outside [0, n_cols); the message names the position.
void validate_csr(const CsrView& a);

// The symmetric-normalized adjacency D^-1/2 A D^-1/2 of the bipartite graph of n interactions
// (users[i], items[i]). Nodes are the users 0..n_users-1 followed by the items (node n_users + item).
// Repeated interactions count once. Rows are sorted by column. Nodes without edges have empty rows.
template <class Index>
Csr normalized_adjacency(const Index* users, const Index* items, int64_t n, int64_t n_users,
                         int64_t n_items, int num_threads = 0);

// out (n_rows x d) = a (n_rows x n_cols) * x (n_cols x d). x and out are row-major and contiguous.
void spmm(const CsrView& a, const float* x, int64_t d, float* out, int num_threads = 0);

// LightGCN propagation: e_0 = x, e_{l+1} = a * e_l for l < n_layers, out = sum_l layer_weights[l] * e_l
// over l = 0..n_layers (n_layers + 1 weights). a must be square with n_rows == rows of x.
void lightgcn_propagate(const CsrView& a, const float* x, int64_t d, int n_layers,
                        const float* layer_weights, float* out, int num_threads = 0);

}  // namespace rec_engine
