// Embedding tables and bag pooling (the semantics of torch.nn.functional.embedding_bag).
//
// A table is a view over memory the caller owns: rows x dim values stored as float32, float16, or
// 8-bit codes with a per-row scale and bias (value = scale[r] * code + bias[r], FBGEMM's row-wise int8).
// Nothing is copied; the memory may be a memory-mapped file. All functions are safe to call from many
// threads at once on the same table.
#pragma once
#include <cstdint>

namespace rec_engine {

enum class StorageType { float32, float16, int8_rowwise };
enum class PoolMode { sum, mean, max };

struct TableView {
  StorageType type = StorageType::float32;
  const void* data = nullptr;          // rows x dim elements, row-major, contiguous
  int64_t rows = 0;
  int64_t dim = 0;
  const float* scale_bias = nullptr;   // int8_rowwise only: rows x 2 (scale, bias)
};

// Checks the view (non-null data when rows*dim > 0, scale_bias for int8); throws std::invalid_argument.
void validate_table(const TableView& table);

// out[i, :] = table[ids[i], :] as float32; out is n x dim. Throws std::out_of_range naming the position
// of the first id outside [0, rows). num_threads <= 0 means the default.
template <class Index>
void gather(const TableView& table, const Index* ids, int64_t n, float* out, int num_threads = 0);

// Bag i covers indices[offsets[i] .. offsets[i+1]); offsets has n_bags + 1 entries, offsets[0] == 0,
// non-decreasing, offsets[n_bags] == n_indices. weights (optional, n_indices) scale each row; they are
// allowed with PoolMode::sum only, as in PyTorch. Empty bags give zeros. out is n_bags x dim.
template <class Index>
void pool(const TableView& table, const Index* indices, int64_t n_indices, const int64_t* offsets,
          int64_t n_bags, const float* weights, PoolMode mode, float* out, int num_threads = 0);

// Sum-pools the selected bags bags[0..n_select) of a bag list (indices / offsets / optional weights laid
// out as in pool(): offsets has n_bags + 1 entries) into out rows dest[0..n_select):
// out[dest[i], :] = sum over j in [offsets[bags[i]], offsets[bags[i]+1]) of weights[j] * table[indices[j], :]
// (weight 1 without weights); an empty bag gives zeros. out has n_out x dim floats; rows not named in dest
// are left untouched. A bag may be selected more than once; a dest row may not. Each row is bit-identical
// to pool() of the taken bags (the same kernel, the ids of a bag in the same order). Only the selected
// bags are read, so a memory-mapped store is touched only where it is used.
// Throws std::out_of_range for a bag outside [0, n_bags), a dest row outside [0, n_out) or an index
// outside the table; std::invalid_argument for a dest row named twice, a selected bag whose offsets
// decrease or lie outside [0, n_indices], or a non-finite weight of a selected bag. Checks everything
// before writing anything. num_threads <= 0 means the default.
// second / second_out (both or neither): the same bags pooled from a second table over the same ids (a CTR
// model's linear weights beside its embeddings) into second_out (n_out x second->dim), reading the store
// once for both; the ids must then be rows of both tables.
template <class Index>
void pool_select(const TableView& table, const Index* indices, int64_t n_indices, const int64_t* offsets,
                 int64_t n_bags, const float* weights, const int64_t* bags, const int64_t* dest, int64_t n_select,
                 float* out, int64_t n_out, int num_threads = 0, const TableView* second = nullptr,
                 float* second_out = nullptr);

}  // namespace rec_engine
