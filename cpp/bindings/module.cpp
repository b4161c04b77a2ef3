// The pybind11 module rec_engine._core: argument validation, GIL release and exception mapping only.
// Hot-path arrays are taken as they are (C-contiguous, exact dtype, native byte order) and never copied;
// anything else raises TypeError naming the argument. The Python facade converts for callers who want it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "rec_engine/dense.hpp"
#include "rec_engine/embedding.hpp"
#include "rec_engine/errors.hpp"
#include "rec_engine/graph.hpp"
#include "rec_engine/keys.hpp"
#include "rec_engine/simd.hpp"
#include "rec_engine/topk.hpp"

namespace py = pybind11;
using namespace rec_engine;

namespace {

struct DType {
  char kind;
  int size;
  const char* name;
};
constexpr DType kF32{'f', 4, "float32"};
constexpr DType kF16{'f', 2, "float16"};
constexpr DType kU8{'u', 1, "uint8"};
constexpr DType kI32{'i', 4, "int32"};
constexpr DType kI64{'i', 8, "int64"};

bool has_dtype(const py::array& a, const DType& t) {
  const py::dtype dt = a.dtype();
  return dt.kind() == t.kind && dt.itemsize() == t.size && dt.attr("isnative").cast<bool>();
}

// Aligned to its dtype (NumPy's ALIGNED flag): kernels dereference typed pointers, and a misaligned one is
// undefined behaviour (a vectorized loop may use aligned loads). Views at odd byte offsets lack it.
bool is_aligned(const py::array& a) { return (a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) != 0; }

std::string describe(const py::array& a) {
  std::string s = py::str(a.dtype()).cast<std::string>();
  s += a.ndim() == 1 ? ", 1 dimension" : ", " + std::to_string(a.ndim()) + " dimensions";
  if (!(a.flags() & py::array::c_style)) s += ", not C-contiguous";
  if (!is_aligned(a)) s += ", not aligned to its dtype";
  return s;
}

// Returns obj as an array of one of the accepted dtypes, C-contiguous, with ndim dimensions.
py::array take(py::handle obj, const char* name, std::initializer_list<DType> dtypes, int ndim) {
  std::string expected;
  for (const DType& t : dtypes) expected += (expected.empty() ? "" : " or ") + std::string(t.name);
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be a numpy.ndarray of " + expected + ", got " +
                         py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
  py::array a = py::reinterpret_borrow<py::array>(obj);
  bool ok = false;
  for (const DType& t : dtypes) ok = ok || has_dtype(a, t);
  if (!ok || !(a.flags() & py::array::c_style) || !is_aligned(a))
    throw py::type_error(std::string(name) + " must be a C-contiguous " + expected + " array, got " +
                         describe(a));
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + " must have " + std::to_string(ndim) + " dimension" +
                          (ndim == 1 ? "" : "s") + ", got shape with " + std::to_string(a.ndim()));
  return a;
}

template <class T>
const T* ptr(const py::array& a) {
  return static_cast<const T*>(a.data());
}

template <class T>
py::array_t<T> owned(std::vector<T>&& v) {
  auto holder = std::make_unique<std::vector<T>>(std::move(v));
  const py::ssize_t n = static_cast<py::ssize_t>(holder->size());
  T* data = holder->data();
  py::capsule owner(holder.get(), [](void* p) { delete static_cast<std::vector<T>*>(p); });
  holder.release();
  return py::array_t<T>({n}, {static_cast<py::ssize_t>(sizeof(T))}, data, owner);
}

// The per-index float32 weights of a bag list of n indices (kept alive in keep), or null when none are given.
const float* optional_weights(py::handle obj, int64_t n, py::array& keep) {
  if (obj.is_none()) return nullptr;
  keep = take(obj, "weights", {kF32}, 1);
  if (keep.shape(0) != n)
    throw py::value_error("weights must have one entry per index (" + std::to_string(n) + "), got " +
                          std::to_string(keep.shape(0)));
  return ptr<float>(keep);
}

PoolMode parse_mode(const std::string& mode) {
  if (mode == "sum") return PoolMode::sum;
  if (mode == "mean") return PoolMode::mean;
  if (mode == "max") return PoolMode::max;
  throw py::value_error("mode must be 'sum', 'mean' or 'max', got '" + mode + "'");
}

Metric parse_metric(const std::string& m) {
  if (m == "ip" || m == "inner_product" || m == "dot") return Metric::inner_product;
  if (m == "cosine") return Metric::cosine;
  throw py::value_error("metric must be 'ip' or 'cosine', got '" + m + "'");
}

// An embedding table over NumPy memory (kept alive here, never copied).
class PyEmbeddingTable {
 public:
  PyEmbeddingTable(py::handle weights, py::object scale_bias) {
    weights_ = take(weights, "weights", {kF32, kF16, kU8}, 2);
    view_.rows = weights_.shape(0);
    view_.dim = weights_.shape(1);
    view_.data = weights_.data();
    if (has_dtype(weights_, kU8)) {
      if (scale_bias.is_none())
        throw py::value_error("a uint8 (row-wise int8) table needs scale_bias, a rows x 2 float32 array");
      scale_bias_ = take(scale_bias, "scale_bias", {kF32}, 2);
      if (scale_bias_.shape(0) != view_.rows || scale_bias_.shape(1) != 2)
        throw py::value_error("scale_bias must have shape (" + std::to_string(view_.rows) + ", 2)");
      view_.type = StorageType::int8_rowwise;
      view_.scale_bias = ptr<float>(scale_bias_);
    } else {
      if (!scale_bias.is_none()) throw py::value_error("scale_bias is only used with uint8 tables");
      view_.type = has_dtype(weights_, kF32) ? StorageType::float32 : StorageType::float16;
    }
  }

  py::array_t<float> gather(py::handle ids_obj, int num_threads) const {
    py::array ids = take(ids_obj, "ids", {kI32, kI64}, 1);
    const int64_t n = ids.shape(0);
    py::array_t<float> out({n, view_.dim});
    float* o = out.mutable_data();
    const bool i32 = has_dtype(ids, kI32);
    {
      py::gil_scoped_release release;
      if (i32)
        rec_engine::gather(view_, ptr<int32_t>(ids), n, o, num_threads);
      else
        rec_engine::gather(view_, ptr<int64_t>(ids), n, o, num_threads);
    }
    return out;
  }

  // indices: 1-D with offsets (n_bags + 1 int64 entries, or n_bags when include_last_offset is false),
  // or 2-D (bags, L) with offsets None: fixed-size bags. The common request path (int32/int64 ids, int64
  // offsets, all of the right dtype) is recognized with C-level checks only (no Python attribute calls).
  // out: None (a new array is returned) or a C-contiguous, writeable float32 (n_bags, dim) array that is
  // filled and returned (a caller that pools into the same input buffer on every request, e.g. one bound
  // to an ONNX Runtime IOBinding, allocates nothing).
  py::array_t<float> pool(py::handle indices_obj, py::handle offsets_obj, py::handle weights_obj,
                          const std::string& mode_name, int num_threads, bool include_last_offset,
                          py::handle out_obj) const {
    using I32 = py::array_t<int32_t, py::array::c_style>;
    using I64 = py::array_t<int64_t, py::array::c_style>;
    // (a default-constructed py::array is an empty array, not a null handle: test the handle itself)
    const bool fixed = offsets_obj.is_none();
    const bool fast_ids = (py::isinstance<I64>(indices_obj) || py::isinstance<I32>(indices_obj)) &&
                          py::reinterpret_borrow<py::array>(indices_obj).ndim() == (fixed ? 2 : 1) &&
                          is_aligned(py::reinterpret_borrow<py::array>(indices_obj));
    const py::array indices = fast_ids ? py::reinterpret_borrow<py::array>(indices_obj)
                                       : take(indices_obj, "indices", {kI32, kI64}, fixed ? 2 : 1);
    const PoolMode mode = mode_name == "sum" ? PoolMode::sum : parse_mode(mode_name);
    const int64_t n = indices.size();
    int64_t n_bags;
    const int64_t* offs;
    py::array offsets;
    std::vector<int64_t> own;  // offsets built here (fixed-size bags, or the appended last offset)
    if (fixed) {
      n_bags = indices.shape(0);
      const int64_t len = indices.shape(1);
      own.resize(static_cast<size_t>(n_bags + 1));
      for (int64_t b = 0; b <= n_bags; ++b) own[b] = b * len;
      offs = own.data();
    } else {
      const bool fast_offsets =
          py::isinstance<I64>(offsets_obj) && py::reinterpret_borrow<py::array>(offsets_obj).ndim() == 1 &&
          is_aligned(py::reinterpret_borrow<py::array>(offsets_obj));
      offsets = fast_offsets ? py::reinterpret_borrow<py::array>(offsets_obj) : take(offsets_obj, "offsets", {kI64}, 1);
      if (include_last_offset) {
        if (offsets.shape(0) < 1) throw py::value_error("offsets must hold n_bags + 1 entries (at least 1)");
        n_bags = offsets.shape(0) - 1;
        offs = ptr<int64_t>(offsets);
      } else {
        n_bags = offsets.shape(0);
        own.resize(static_cast<size_t>(n_bags + 1));
        for (int64_t b = 0; b < n_bags; ++b) own[b] = ptr<int64_t>(offsets)[b];
        if (n_bags > 0 && own[n_bags - 1] > n)
          throw py::index_error("offsets[" + std::to_string(n_bags - 1) + "] = " + std::to_string(own[n_bags - 1]) +
                                " is past the end of indices (length " + std::to_string(n) + ")");
        own[n_bags] = n;
        offs = own.data();
      }
    }
    py::array weights;
    const float* w = optional_weights(weights_obj, n, weights);
    py::array_t<float> out;
    if (out_obj.is_none()) {
      out = py::array_t<float>({n_bags, view_.dim});
    } else {
      py::array given = take(out_obj, "out", {kF32}, 2);
      if (given.shape(0) != n_bags || given.shape(1) != view_.dim)
        throw py::value_error("out must have shape (" + std::to_string(n_bags) + ", " + std::to_string(view_.dim) +
                              "), got (" + std::to_string(given.shape(0)) + ", " + std::to_string(given.shape(1)) +
                              ")");
      if (!given.writeable()) throw py::value_error("out must be writeable");
      out = py::reinterpret_borrow<py::array_t<float>>(given);
    }
    float* o = out.mutable_data();
    const bool i32 = indices.itemsize() == 4;
    {
      py::gil_scoped_release release;
      if (i32)
        rec_engine::pool(view_, ptr<int32_t>(indices), n, offs, n_bags, w, mode, o, num_threads);
      else
        rec_engine::pool(view_, ptr<int64_t>(indices), n, offs, n_bags, w, mode, o, num_threads);
    }
    return out;
  }

  // Sum-pools the selected bags of a bag store (indices with n_bags + 1 int64 offsets, optional float32
  // weights) into rows of out: out[dest[i]] = pool of bag bags[i]. out (float32, (n_out, dim), C-contiguous,
  // writeable) is written in place and returned; rows not named in dest are left as they are. Nothing is
  // written when a check fails.
  // second / second_out: the same bags pooled from another table over the same ids into second_out
  // (float32, (n_out, second.dim)), the store read once for both.
  py::array pool_select(py::handle indices_obj, py::handle offsets_obj, py::handle weights_obj, py::handle bags_obj,
                        py::handle dest_obj, py::handle out_obj, int num_threads, py::object second_obj,
                        py::handle second_out_obj) const {
    const py::array indices = take(indices_obj, "indices", {kI32, kI64}, 1);
    const py::array offsets = take(offsets_obj, "offsets", {kI64}, 1);
    const py::array bags = take(bags_obj, "bags", {kI64}, 1);
    const py::array dest = take(dest_obj, "dest", {kI64}, 1);
    const int64_t n = indices.shape(0);
    if (offsets.shape(0) < 1) throw py::value_error("offsets must hold n_bags + 1 entries (at least 1)");
    const int64_t n_bags = offsets.shape(0) - 1;
    if (bags.shape(0) != dest.shape(0))
      throw py::value_error("bags and dest must have the same length, got " + std::to_string(bags.shape(0)) +
                            " and " + std::to_string(dest.shape(0)));
    py::array weights;
    const float* w = optional_weights(weights_obj, n, weights);
    py::array out = take(out_obj, "out", {kF32}, 2);
    if (out.shape(1) != view_.dim)
      throw py::value_error("out must have " + std::to_string(view_.dim) + " columns (the table's dim), got " +
                            std::to_string(out.shape(1)));
    if (!out.writeable()) throw py::value_error("out must be writeable");
    float* o = static_cast<float*>(out.mutable_data());
    const int64_t n_out = out.shape(0), n_select = bags.shape(0);
    const bool i32 = indices.itemsize() == 4;
    if (second_obj.is_none() != second_out_obj.is_none())
      throw py::value_error("give second and second_out together");
    const TableView* second = nullptr;
    float* o2 = nullptr;
    py::array out2;
    if (!second_obj.is_none()) {
      if (!py::isinstance<PyEmbeddingTable>(second_obj)) throw py::type_error("second must be an EmbeddingTable");
      second = &second_obj.cast<const PyEmbeddingTable&>().view_;
      out2 = take(second_out_obj, "second_out", {kF32}, 2);
      if (out2.shape(0) != n_out || out2.shape(1) != second->dim)
        throw py::value_error("second_out must have shape (" + std::to_string(n_out) + ", " +
                              std::to_string(second->dim) + "), got (" + std::to_string(out2.shape(0)) + ", " +
                              std::to_string(out2.shape(1)) + ")");
      if (!out2.writeable()) throw py::value_error("second_out must be writeable");
      const auto* a0 = static_cast<const char*>(out.data());
      const auto* b0 = static_cast<const char*>(out2.data());
      if (out.nbytes() > 0 && out2.nbytes() > 0 && a0 < b0 + out2.nbytes() && b0 < a0 + out.nbytes())
        throw py::value_error("second_out must not overlap out");
      o2 = static_cast<float*>(out2.mutable_data());
    }
    {
      py::gil_scoped_release release;
      if (i32)
        rec_engine::pool_select(view_, ptr<int32_t>(indices), n, ptr<int64_t>(offsets), n_bags, w, ptr<int64_t>(bags),
                                ptr<int64_t>(dest), n_select, o, n_out, num_threads, second, o2);
      else
        rec_engine::pool_select(view_, ptr<int64_t>(indices), n, ptr<int64_t>(offsets), n_bags, w, ptr<int64_t>(bags),
                                ptr<int64_t>(dest), n_select, o, n_out, num_threads, second, o2);
    }
    return out;
  }

  int64_t rows() const { return view_.rows; }
  int64_t dim() const { return view_.dim; }
  std::string storage() const {
    return view_.type == StorageType::float32 ? "float32" : view_.type == StorageType::float16 ? "float16" : "int8";
  }
  py::array weights() const { return weights_; }
  py::object scale_bias() const { return scale_bias_ ? py::object(scale_bias_) : py::none(); }

 private:
  py::array weights_, scale_bias_;
  TableView view_;
};

struct PyCsr {
  py::array indptr, indices, data;
  CsrView view;
};

PyCsr take_csr(py::handle indptr, py::handle indices, py::handle data, int64_t n_cols) {
  PyCsr c;
  c.indptr = take(indptr, "indptr", {kI64}, 1);
  c.indices = take(indices, "indices", {kI32}, 1);
  c.data = take(data, "data", {kF32}, 1);
  if (c.indptr.shape(0) < 1) throw py::value_error("indptr must hold n_rows + 1 entries (at least 1)");
  if (n_cols < 0) throw py::value_error("n_cols must be >= 0");
  c.view = {c.indptr.shape(0) - 1, n_cols, ptr<int64_t>(c.indptr), ptr<int32_t>(c.indices), ptr<float>(c.data)};
  const int64_t nnz = c.view.indptr[c.view.n_rows];
  if (c.indices.shape(0) != c.data.shape(0))
    throw py::value_error("indices and data must have the same length");
  if (nnz != c.indices.shape(0))
    throw py::value_error("indptr[-1] (" + std::to_string(nnz) + ") must equal the number of stored values (" +
                          std::to_string(c.indices.shape(0)) + ")");
  return c;
}

py::array take_dense(py::handle x, const char* name, int64_t rows) {
  py::array a = take(x, name, {kF32}, 2);
  if (a.shape(0) != rows)
    throw py::value_error(std::string(name) + " must have " + std::to_string(rows) + " rows, got " +
                          std::to_string(a.shape(0)));
  return a;
}

struct PyIdLists {
  py::array indptr, ids;
  IdLists view;
};

PyIdLists take_lists(py::object indptr, py::object ids, int64_t n_queries, const char* name) {
  PyIdLists l;
  if (indptr.is_none() && ids.is_none()) return l;
  if (indptr.is_none() || ids.is_none())
    throw py::value_error(std::string(name) + ": give both indptr and ids, or neither");
  l.indptr = take(indptr, (std::string(name) + "_indptr").c_str(), {kI64}, 1);
  l.ids = take(ids, (std::string(name) + "_ids").c_str(), {kI64}, 1);
  if (l.indptr.shape(0) != n_queries + 1)
    throw py::value_error(std::string(name) + "_indptr must have n_queries + 1 = " +
                          std::to_string(n_queries + 1) + " entries, got " + std::to_string(l.indptr.shape(0)));
  const int64_t last = ptr<int64_t>(l.indptr)[n_queries];
  if (last != l.ids.shape(0))
    throw py::value_error(std::string(name) + "_indptr[-1] (" + std::to_string(last) +
                          ") must equal the number of ids (" + std::to_string(l.ids.shape(0)) + ")");
  l.view = {ptr<int64_t>(l.indptr), ptr<int64_t>(l.ids)};
  return l;
}


// A KeyIndex over NumPy key storage (kept alive here, never copied): int64 keys, or a uint8 UTF-8 blob
// with int64 offsets. Look-ups take an int64 array (GIL released) or any sequence of Python ints / strs.
// The dense part of a DeepFM / Wide&Deep model (rec_engine/dense.hpp), built from NumPy arrays (copied and
// packed once); forward() writes into the caller's arrays with the GIL released.
class PyDenseNet {
 public:
  PyDenseNet(int64_t n_fields, int64_t dim, std::vector<int64_t> var_fields, py::list weights, py::list biases,
             float bias, float fm_scale, bool fm, const std::string& precision, bool screen) {
    const DensePrecision prec = parse_precision(precision, "precision", true);
    if (py::len(weights) != py::len(biases))
      throw py::value_error("weights and biases must have one entry per layer");
    std::vector<DenseLayer> layers;
    for (size_t l = 0; l < py::len(weights); ++l) {
      const std::string wn = "weights[" + std::to_string(l) + "]", bn = "biases[" + std::to_string(l) + "]";
      py::array w = take(weights[l], wn.c_str(), {kF32}, 2);
      DenseLayer L;
      L.out = w.shape(0);
      L.in = w.shape(1);
      L.weight.assign(ptr<float>(w), ptr<float>(w) + L.out * L.in);
      if (!biases[l].is_none()) {
        py::array b = take(biases[l], bn.c_str(), {kF32}, 1);
        L.bias.assign(ptr<float>(b), ptr<float>(b) + b.shape(0));
      }
      layers.push_back(std::move(L));
    }
    try {
      net_ = std::make_unique<DenseNet>(n_fields, dim, std::move(var_fields), std::move(layers), bias, fm_scale, fm,
                                        prec, screen);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }

  // out[r] = the logit of row r; emb (rows, n_fields, dim), lin (rows, n_fields), first_bias first_out values,
  // out (rows,) float32, C-contiguous and writeable: written in place and returned.
  py::array forward(py::handle emb_obj, py::handle lin_obj, py::handle fb_obj, py::handle out_obj) const {
    Args a = args(emb_obj, lin_obj, fb_obj, out_obj, "out");
    {
      py::gil_scoped_release release;
      net_->forward(a.emb, a.lin, a.rows, a.fb, a.out);
    }
    return a.out_array;
  }

  // logit and bound (rows,) float32, C-contiguous, writeable, as DenseNet::screen writes them
  py::tuple screen(py::handle emb_obj, py::handle lin_obj, py::handle fb_obj, py::handle logit_obj,
                   py::handle bound_obj, const std::string& tiles) const {
    const DensePrecision t = parse_precision(tiles, "tiles", false);
    Args a = args(emb_obj, lin_obj, fb_obj, logit_obj, "logit");
    py::array bound = take(bound_obj, "bound", {kF32}, 1);
    if (bound.shape(0) != a.rows) throw py::value_error("bound must have " + std::to_string(a.rows) + " entries");
    if (!bound.writeable()) throw py::value_error("bound must be writeable");
    if (bound.ptr() == a.out_array.ptr() || bound.data() == a.out_array.data())
      throw py::value_error("logit and bound must be different arrays");
    float* b = static_cast<float*>(bound.mutable_data());
    {
      py::gil_scoped_release release;
      net_->screen(a.emb, a.lin, a.rows, a.fb, a.out, b, t);
    }
    return py::make_tuple(a.out_array, bound);
  }

  int64_t macs_per_row() const { return net_->macs_per_row(); }
  std::string precision() const {
    switch (net_->precision()) {
      case DensePrecision::bf16x3: return "bf16x3";
      case DensePrecision::bf16: return "bf16";
      default: return "float32";
    }
  }
  bool tiles_active() const { return net_->tiles_active(); }
  bool screen_active() const { return net_->screen_active(); }

 private:
  // "float32" (where with_float32), "bf16x3" or "bf16"; a ValueError naming `what` otherwise
  static DensePrecision parse_precision(const std::string& s, const char* what, bool with_float32) {
    if (s == "bf16x3") return DensePrecision::bf16x3;
    if (s == "bf16") return DensePrecision::bf16;
    if (s == "float32" && with_float32) return DensePrecision::float32;
    throw py::value_error(std::string(what) + " must be " + (with_float32 ? "'float32', " : "") +
                          "'bf16x3' or 'bf16', got '" + s + "'");
  }

  struct Args {
    const float *emb, *lin, *fb;
    float* out;
    int64_t rows;
    py::array out_array;
  };
  // forward's / screen's arrays checked: emb (rows, n_fields, dim), lin (rows, n_fields), first_bias first_out
  // values, the output (rows,) float32 C-contiguous and writeable
  Args args(py::handle emb_obj, py::handle lin_obj, py::handle fb_obj, py::handle out_obj, const char* out_name) const {
    const DenseNet& n = *net_;
    py::array emb = take(emb_obj, "emb", {kF32}, 3);
    py::array lin = take(lin_obj, "lin", {kF32}, 2);
    py::array out = take(out_obj, out_name, {kF32}, 1);
    if (!py::isinstance<py::array>(fb_obj)) throw py::type_error("first_bias must be a numpy.ndarray of float32");
    py::array fb = py::reinterpret_borrow<py::array>(fb_obj);
    if (!has_dtype(fb, kF32) || !(fb.flags() & py::array::c_style) || !is_aligned(fb))
      throw py::type_error("first_bias must be a C-contiguous float32 array, got " + describe(fb));
    const int64_t rows = emb.shape(0);
    if (emb.shape(1) != n.n_fields() || emb.shape(2) != n.dim())
      throw py::value_error("emb must have shape (rows, " + std::to_string(n.n_fields()) + ", " +
                            std::to_string(n.dim()) + ")");
    if (lin.shape(0) != rows || lin.shape(1) != n.n_fields())
      throw py::value_error("lin must have shape (" + std::to_string(rows) + ", " + std::to_string(n.n_fields()) + ")");
    if (out.shape(0) != rows) throw py::value_error(std::string(out_name) + " must have " + std::to_string(rows) + " entries");
    if (!out.writeable()) throw py::value_error(std::string(out_name) + " must be writeable");
    if (fb.size() != n.first_out())
      throw py::value_error("first_bias must hold " + std::to_string(n.first_out()) + " values, got " +
                            std::to_string(fb.size()));
    return {ptr<float>(emb), ptr<float>(lin), ptr<float>(fb), static_cast<float*>(out.mutable_data()), rows, out};
  }

  std::unique_ptr<DenseNet> net_;
};

class PyKeyIndex {
 public:
  PyKeyIndex(py::handle keys, py::handle offsets) {
    if (offsets.is_none()) {
      keys_ = take(keys, "keys", {kI64}, 1);
      const int64_t n = keys_.shape(0);
      const int64_t* k = ptr<int64_t>(keys_);
      build([&] { return KeyIndex::from_ints(k, n); });
    } else {
      keys_ = take(keys, "blob", {kU8}, 1);
      offsets_ = take(offsets, "offsets", {kI64}, 1);
      const int64_t n = offsets_.shape(0) - 1;
      if (n < 0) throw py::value_error("offsets must hold n_keys + 1 entries (at least 1)");
      const int64_t* o = ptr<int64_t>(offsets_);
      if (o[n] != keys_.shape(0))
        throw py::value_error("offsets[-1] (" + std::to_string(o[n]) + ") must equal the blob's length (" +
                              std::to_string(keys_.shape(0)) + ")");
      const char* b = static_cast<const char*>(keys_.data());
      build([&] { return KeyIndex::from_strings(b, o, n); });
    }
  }

  int64_t size() const { return index_->size(); }
  bool holds_strings() const { return index_->holds_strings(); }

  // The dense id of one key, -1 when absent; TypeError for a key of the other type.
  int64_t find(py::handle key) const { return find_one(key, -1); }

  // Dense ids (int64, -1 where absent) of an int64 array or a sequence of keys.
  py::array_t<int64_t> lookup(py::handle keys) const {
    using I64 = py::array_t<int64_t, py::array::c_style>;
    if (py::isinstance<I64>(keys) && py::reinterpret_borrow<py::array>(keys).ndim() == 1 &&
        is_aligned(py::reinterpret_borrow<py::array>(keys)) &&
        py::reinterpret_borrow<py::array>(keys).dtype().attr("isnative").cast<bool>()) {
      const py::array a = py::reinterpret_borrow<py::array>(keys);
      if (holds_strings())
        throw py::type_error("keys of this map are strings, got an int64 array");
      const int64_t n = a.shape(0);
      py::array_t<int64_t> out(n);
      int64_t* o = out.mutable_data();
      const int64_t* k = ptr<int64_t>(a);
      {
        py::gil_scoped_release release;
        index_->find_many(k, n, o);
      }
      return out;
    }
    if (py::isinstance<py::str>(keys) || py::isinstance<py::bytes>(keys))
      throw py::type_error("keys must be a sequence of keys, not a single " +
                           py::str(py::type::handle_of(keys).attr("__name__")).cast<std::string>());
    // a list or tuple (or anything else, copied to one): the keys are read with the GIL held, then found
    // in one batch
    py::object fast = py::reinterpret_steal<py::object>(PySequence_Fast(keys.ptr(), "keys must be a sequence"));
    if (!fast) throw py::error_already_set();
    const int64_t n = static_cast<int64_t>(PySequence_Fast_GET_SIZE(fast.ptr()));
    PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
    py::array_t<int64_t> out(n);
    int64_t* o = out.mutable_data();
    if (holds_strings()) {
      std::vector<std::string_view> views(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) views[i] = utf8_of(items[i], i);
      index_->find_many(views.data(), n, o);
    } else {
      std::vector<int64_t> ints(static_cast<size_t>(n));
      std::vector<int64_t> outside;  // positions of integers beyond int64: never found
      for (int64_t i = 0; i < n; ++i)
        if (!int_of(items[i], i, &ints[i])) outside.push_back(i);
      index_->find_many(ints.data(), n, o);
      for (int64_t i : outside) o[i] = -1;
    }
    return out;
  }

  // The string keys of dense ids (a list of str); IndexError for an id outside [0, n).
  py::list strings(py::handle ids_obj) const {
    if (!holds_strings()) throw py::type_error("this key map holds integer keys");
    const py::array ids = take(ids_obj, "ids", {kI64}, 1);
    const int64_t n = ids.shape(0), size = index_->size();
    const int64_t* id = ptr<int64_t>(ids);
    py::list out(n);
    for (int64_t i = 0; i < n; ++i) {
      if (id[i] < 0 || id[i] >= size)
        throw py::index_error("id " + std::to_string(id[i]) + " at position " + std::to_string(i) +
                              " is outside [0, " + std::to_string(size) + ")");
      const std::string_view s = index_->string_at(id[i]);
      PyObject* u = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "strict");
      if (u == nullptr) throw py::error_already_set();
      PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), u);
    }
    return out;
  }

 private:
  template <class F>
  void build(F make) {
    try {
      py::gil_scoped_release release;
      index_ = std::make_unique<KeyIndex>(make());
    } catch (const DuplicateKey& e) {
      throw py::value_error("duplicate key at positions " + std::to_string(e.first) + " and " +
                            std::to_string(e.second) + ": keys must be distinct");
    }
  }

  static std::string where(int64_t pos) { return pos >= 0 ? " at position " + std::to_string(pos) : ""; }
  static std::string type_name(PyObject* o) {
    return py::str(py::type::handle_of(py::handle(o)).attr("__name__")).cast<std::string>();
  }

  // The UTF-8 bytes of a str key (valid while the str lives); TypeError for anything else.
  static std::string_view utf8_of(PyObject* key, int64_t pos) {
    if (!PyUnicode_Check(key)) throw py::type_error("keys of this map are strings, got " + type_name(key) + where(pos));
    Py_ssize_t len = 0;
    const char* s = PyUnicode_AsUTF8AndSize(key, &len);
    if (s == nullptr) throw py::error_already_set();  // e.g. a lone surrogate: not UTF-8
    return {s, static_cast<size_t>(len)};
  }

  // An integer key (Python int or NumPy integer, never bool) into *v; false when it is outside int64.
  static bool int_of(PyObject* key, int64_t pos, int64_t* v) {
    if (PyBool_Check(key) || PyFloat_Check(key) || !(PyLong_Check(key) || PyIndex_Check(key)))
      throw py::type_error("keys of this map are integers, got " + type_name(key) + where(pos));
    py::object as_int = py::reinterpret_steal<py::object>(PyNumber_Index(key));
    if (!as_int) throw py::error_already_set();
    int overflow = 0;
    const long long x = PyLong_AsLongLongAndOverflow(as_int.ptr(), &overflow);
    if (overflow != 0) return false;
    if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
    *v = static_cast<int64_t>(x);
    return true;
  }

  int64_t find_one(py::handle key, int64_t pos) const {
    if (holds_strings()) return index_->find(utf8_of(key.ptr(), pos));
    int64_t v = 0;
    return int_of(key.ptr(), pos, &v) ? index_->find(v) : -1;
  }

  py::array keys_, offsets_;
  std::unique_ptr<KeyIndex> index_;
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "rec_engine C++ core: embedding lookup, graph propagation and top-k (see rec_engine for the API)";
  if (!simd_env_error().empty()) throw py::value_error(simd_env_error());
  py::register_exception<rec_engine::Error>(m, "RecEngineError", PyExc_RuntimeError);

  m.def("simd_level", [] { return std::string(simd_level_name(simd_level())); });
  m.def("best_simd_level", [] { return std::string(simd_level_name(best_simd_level())); });
  m.def(
      "reduced_kernels",
      [](const std::string& precision) {
        if (precision != "int8" && precision != "bf16")
          throw py::value_error("precision must be 'int8' or 'bf16', got '" + precision + "'");
        return reduced_kernels(precision == "int8" ? Precision::int8 : Precision::bf16);
      },
      py::arg("precision"));
  m.def("amx_available", &amx_available);
  m.def("amx_enabled", &amx_enabled);
  m.def("set_amx", &set_amx, py::arg("on"));
  m.def("supported_simd_levels", [] {
    std::vector<std::string> out;
    for (SimdLevel l : supported_simd_levels()) out.emplace_back(simd_level_name(l));
    return out;
  });
  m.def("set_simd_level", [](const std::string& name) { set_simd_level(parse_simd_level(name)); });
  m.def("openmp_enabled", &openmp_enabled);
  m.def("default_num_threads", &default_num_threads);

  py::class_<PyKeyIndex>(m, "KeyIndex")
      .def(py::init<py::handle, py::handle>(), py::arg("keys"), py::arg("offsets") = py::none())
      .def("find", &PyKeyIndex::find, py::arg("key"))
      .def("lookup", &PyKeyIndex::lookup, py::arg("keys"))
      .def("strings", &PyKeyIndex::strings, py::arg("ids"))
      .def("__len__", &PyKeyIndex::size)
      .def_property_readonly("holds_strings", &PyKeyIndex::holds_strings);

  py::class_<PyDenseNet>(m, "DenseNet")
      .def(py::init<int64_t, int64_t, std::vector<int64_t>, py::list, py::list, float, float, bool, const std::string&,
                    bool>(),
           py::arg("n_fields"), py::arg("dim"), py::arg("var_fields"), py::arg("weights"), py::arg("biases"),
           py::arg("bias"), py::arg("fm_scale"), py::arg("fm"), py::kw_only(), py::arg("precision") = "float32",
           py::arg("screen") = false)
      .def("forward", &PyDenseNet::forward, py::arg("emb"), py::arg("lin"), py::arg("first_bias"), py::arg("out"))
      .def("screen", &PyDenseNet::screen, py::arg("emb"), py::arg("lin"), py::arg("first_bias"), py::arg("logit"),
           py::arg("bound"), py::arg("tiles") = "bf16x3")
      .def_property_readonly("screen_active", &PyDenseNet::screen_active)
      .def_property_readonly("macs_per_row", &PyDenseNet::macs_per_row)
      .def_property_readonly("precision", &PyDenseNet::precision)
      .def_property_readonly("tiles_active", &PyDenseNet::tiles_active);

  py::class_<PyEmbeddingTable>(m, "EmbeddingTable")
      .def(py::init<py::handle, py::object>(), py::arg("weights"), py::arg("scale_bias") = py::none())
      .def("gather", &PyEmbeddingTable::gather, py::arg("ids"), py::arg("num_threads") = 0)
      .def("pool", &PyEmbeddingTable::pool, py::arg("indices"), py::arg("offsets") = py::none(),
           py::arg("weights") = py::none(), py::arg("mode") = "sum", py::arg("num_threads") = 0,
           py::arg("include_last_offset") = true, py::arg("out") = py::none())
      .def("pool_select", &PyEmbeddingTable::pool_select, py::arg("indices"), py::arg("offsets"),
           py::arg("weights"), py::arg("bags"), py::arg("dest"), py::arg("out"), py::arg("num_threads") = 0,
           py::arg("second") = py::none(), py::arg("second_out") = py::none())
      .def_property_readonly("rows", &PyEmbeddingTable::rows)
      .def_property_readonly("dim", &PyEmbeddingTable::dim)
      .def_property_readonly("storage", &PyEmbeddingTable::storage)
      .def_property_readonly("weights", &PyEmbeddingTable::weights)
      .def_property_readonly("scale_bias", &PyEmbeddingTable::scale_bias);

  m.def(
      "normalized_adjacency",
      [](py::handle users_obj, py::handle items_obj, int64_t n_users, int64_t n_items, int num_threads) {
        py::array users = take(users_obj, "users", {kI32, kI64}, 1);
        py::array items = take(items_obj, "items", {kI32, kI64}, 1);
        if (users.shape(0) != items.shape(0))
          throw py::value_error("users and items must have the same length, got " +
                                std::to_string(users.shape(0)) + " and " + std::to_string(items.shape(0)));
        if (users.dtype().itemsize() != items.dtype().itemsize())
          throw py::type_error("users and items must have the same dtype");
        const bool i32 = has_dtype(users, kI32);  // dtype checks call into Python: before the release
        Csr csr;
        {
          py::gil_scoped_release release;
          if (i32)
            csr = normalized_adjacency(ptr<int32_t>(users), ptr<int32_t>(items), users.shape(0), n_users, n_items, num_threads);
          else
            csr = normalized_adjacency(ptr<int64_t>(users), ptr<int64_t>(items), users.shape(0), n_users, n_items, num_threads);
        }
        return py::make_tuple(owned(std::move(csr.indptr)), owned(std::move(csr.indices)), owned(std::move(csr.data)));
      },
      py::arg("users"), py::arg("items"), py::arg("n_users"), py::arg("n_items"), py::arg("num_threads") = 0);

  m.def(
      "spmm",
      [](py::handle indptr, py::handle indices, py::handle data, int64_t n_cols, py::handle x_obj, int num_threads) {
        PyCsr a = take_csr(indptr, indices, data, n_cols);
        py::array x = take_dense(x_obj, "dense", n_cols);
        const int64_t d = x.shape(1);
        py::array_t<float> out({a.view.n_rows, d});
        float* o = out.mutable_data();
        {
          py::gil_scoped_release release;
          spmm(a.view, ptr<float>(x), d, o, num_threads);
        }
        return out;
      },
      py::arg("indptr"), py::arg("indices"), py::arg("data"), py::arg("n_cols"), py::arg("dense"),
      py::arg("num_threads") = 0);

  m.def(
      "lightgcn_propagate",
      [](py::handle indptr, py::handle indices, py::handle data, py::handle x_obj, py::handle weights_obj,
         int num_threads) {
        py::array x = take(x_obj, "embeddings", {kF32}, 2);
        PyCsr a = take_csr(indptr, indices, data, x.shape(0));
        if (a.view.n_rows != x.shape(0))
          throw py::value_error("the adjacency has " + std::to_string(a.view.n_rows) + " rows but embeddings has " +
                                std::to_string(x.shape(0)));
        py::array w = take(weights_obj, "layer_weights", {kF32}, 1);
        if (w.shape(0) < 1) throw py::value_error("layer_weights needs n_layers + 1 >= 1 entries");
        const int n_layers = static_cast<int>(w.shape(0) - 1);
        const int64_t d = x.shape(1);
        py::array_t<float> out({x.shape(0), d});
        float* o = out.mutable_data();
        {
          py::gil_scoped_release release;
          lightgcn_propagate(a.view, ptr<float>(x), d, n_layers, ptr<float>(w), o, num_threads);
        }
        return out;
      },
      py::arg("indptr"), py::arg("indices"), py::arg("data"), py::arg("embeddings"), py::arg("layer_weights"),
      py::arg("num_threads") = 0);

  m.def(
      "topk",
      [](py::handle q_obj, py::handle x_obj, int64_t k, const std::string& metric, py::object ex_indptr,
         py::object ex_ids, py::object cand_indptr, py::object cand_ids, int num_threads) {
        py::array q = take(q_obj, "queries", {kF32}, 2);
        py::array x = take(x_obj, "items", {kF32}, 2);
        if (q.shape(1) != x.shape(1))
          throw py::value_error("queries have dimension " + std::to_string(q.shape(1)) + " but items have " +
                                std::to_string(x.shape(1)));
        if (k < 0) throw py::value_error("k must be >= 0, got " + std::to_string(k));
        TopkOptions opt;
        opt.k = k;
        opt.metric = parse_metric(metric);
        opt.num_threads = num_threads;
        const int64_t b = q.shape(0), n = x.shape(0);
        PyIdLists ex = take_lists(ex_indptr, ex_ids, b, "exclude");
        PyIdLists cand = take_lists(cand_indptr, cand_ids, b, "candidates");
        opt.exclude = ex.view;
        opt.candidates = cand.view;
        const int64_t width = topk_width(k, n);
        py::array_t<int64_t> ids({b, width});
        py::array_t<float> scores({b, width});
        int64_t* pi = ids.mutable_data();
        float* ps = scores.mutable_data();
        {
          py::gil_scoped_release release;
          topk(ptr<float>(q), b, ptr<float>(x), n, x.shape(1), opt, pi, ps);
        }
        return py::make_tuple(ids, scores);
      },
      py::arg("queries"), py::arg("items"), py::arg("k"), py::arg("metric") = "ip",
      py::arg("exclude_indptr") = py::none(), py::arg("exclude_ids") = py::none(),
      py::arg("candidates_indptr") = py::none(), py::arg("candidates_ids") = py::none(),
      py::arg("num_threads") = 0);

  // Reduced-precision top-k: quantize_items once, then topk_quantized per call.
  auto parse_precision = [](const std::string& s) {
    if (s == "int8") return Precision::int8;
    if (s == "bf16") return Precision::bf16;
    throw py::value_error("precision must be 'int8' or 'bf16', got '" + s + "'");
  };
  m.def(
      "quantize_items",
      [parse_precision](py::handle x_obj, const std::string& precision, int num_threads) {
        py::array x = take(x_obj, "items", {kF32}, 2);
        const Precision pr = parse_precision(precision);
        const int64_t n = x.shape(0), d = x.shape(1);
        py::array_t<uint8_t> packed(quantized_bytes(pr, n, d));
        py::array_t<int32_t> corr(quantized_rows(n));
        py::array_t<float> scale(quantized_rows(n));
        uint8_t* pp = packed.mutable_data();
        int32_t* pc = corr.mutable_data();
        float* ps = scale.mutable_data();
        {
          py::gil_scoped_release release;
          quantize_items(ptr<float>(x), n, d, pr, pp, pc, ps, num_threads);
        }
        return py::make_tuple(packed, corr, scale);
      },
      py::arg("items"), py::arg("precision"), py::arg("num_threads") = 0);
  m.def(
      "quantized_norms",
      [parse_precision](py::handle x_obj, const std::string& precision, int num_threads) {
        py::array x = take(x_obj, "items", {kF32}, 2);
        const Precision pr = parse_precision(precision);
        const int64_t n = x.shape(0), d = x.shape(1);
        py::array_t<float> norm(n);
        float* pn = norm.mutable_data();
        {
          py::gil_scoped_release release;
          quantized_norms(ptr<float>(x), n, d, pr, pn, num_threads);
        }
        return norm;
      },
      py::arg("items"), py::arg("precision"), py::arg("num_threads") = 0);
  m.def(
      "topk_quantized",
      [parse_precision](py::handle q_obj, py::handle x_obj, py::handle packed_obj, py::handle corr_obj,
                        py::handle scale_obj, const std::string& precision, int64_t k, int64_t shortlist,
                        py::object ex_indptr, py::object ex_ids, int num_threads, py::object norm_obj,
                        float norm_max, float scale_max, py::object heavy_obj, float norm_all_max,
                        float scale_all_max) {
        py::array q = take(q_obj, "queries", {kF32}, 2);
        py::array x = take(x_obj, "items", {kF32}, 2);
        const Precision pr = parse_precision(precision);
        // packed, corr and scale all None: a bf16 index without a copy (panels converted as they are scanned)
        const bool convert = packed_obj.is_none() && corr_obj.is_none() && scale_obj.is_none();
        if (convert && pr != Precision::bf16)
          throw py::value_error("an int8 index needs its packed, corr and scale arrays");
        py::array packed, corr, scale;
        const int64_t b = q.shape(0), n = x.shape(0), d = x.shape(1);
        if (q.shape(1) != d)
          throw py::value_error("queries have dimension " + std::to_string(q.shape(1)) + " but items have " +
                                std::to_string(d));
        if (!convert) {
          packed = take(packed_obj, "packed", {kU8}, 1);
          corr = take(corr_obj, "corr", {kI32}, 1);
          scale = take(scale_obj, "scale", {kF32}, 1);
          if (packed.shape(0) != quantized_bytes(pr, n, d) || corr.shape(0) != quantized_rows(n) ||
              scale.shape(0) != quantized_rows(n))
            throw py::value_error("the quantized arrays do not match the items (rebuild them with quantize_items)");
        }
        if (k < 0) throw py::value_error("k must be >= 0, got " + std::to_string(k));
        TopkOptions opt;
        opt.k = k;
        opt.num_threads = num_threads;
        PyIdLists ex = take_lists(ex_indptr, ex_ids, b, "exclude");
        opt.exclude = ex.view;
        QuantizedItems index;
        index.precision = pr;
        index.n_items = n;
        index.dim = d;
        if (!convert) {
          index.packed = ptr<uint8_t>(packed);
          index.corr = ptr<int32_t>(corr);
          index.scale = ptr<float>(scale);
        }
        py::array norm, heavy;
        if (!norm_obj.is_none()) {  // exact mode: the items' norms (quantized_norms), the heavy items' sorted
          norm = take(norm_obj, "norm", {kF32}, 1);  // ids and the maxima (trusted, like the arrays' contents:
          if (norm.shape(0) != n)                      // ItemIndex computes them at build)
            throw py::value_error("norm must hold one value per item (" + std::to_string(n) + "), got " +
                                  std::to_string(norm.shape(0)));
          // (inf passes: every check then fails, and the queries are scanned in float32)
          if (!(norm_max >= 0.f) || !(scale_max >= 0.f) || !(norm_all_max >= norm_max) ||
              !(scale_all_max >= scale_max))
            throw py::value_error("norm_max and scale_max must be >= 0 (not NaN), and at most norm_all_max and "
                                  "scale_all_max");
          index.norm = ptr<float>(norm);
          index.norm_max = norm_max;
          index.scale_max = scale_max;
          index.norm_all_max = norm_all_max;
          index.scale_all_max = scale_all_max;
          if (!heavy_obj.is_none()) {
            heavy = take(heavy_obj, "heavy", {kI64}, 1);
            const int64_t* h = ptr<int64_t>(heavy);
            for (int64_t i = 0; i < heavy.shape(0); ++i)
              if (h[i] < 0 || h[i] >= n || (i > 0 && h[i] <= h[i - 1]))
                throw py::value_error("heavy must hold increasing item ids in [0, " + std::to_string(n) + ")");
            index.heavy = h;
            index.n_heavy = heavy.shape(0);
          }
        }
        const int64_t width = topk_width(k, n);
        py::array_t<int64_t> ids({b, width});
        py::array_t<float> scores({b, width});
        int64_t* pi = ids.mutable_data();
        float* ps = scores.mutable_data();
        int64_t fallback = 0;
        {
          py::gil_scoped_release release;
          topk_quantized(ptr<float>(q), b, ptr<float>(x), index, opt, shortlist, pi, ps, &fallback);
        }
        return py::make_tuple(ids, scores, fallback);
      },
      py::arg("queries"), py::arg("items"), py::arg("packed"), py::arg("corr"), py::arg("scale"),
      py::arg("precision"), py::arg("k"), py::arg("shortlist"), py::arg("exclude_indptr") = py::none(),
      py::arg("exclude_ids") = py::none(), py::arg("num_threads") = 0, py::arg("norm") = py::none(),
      py::arg("norm_max") = 0.f, py::arg("scale_max") = 0.f, py::arg("heavy") = py::none(),
      py::arg("norm_all_max") = std::numeric_limits<float>::infinity(),
      py::arg("scale_all_max") = std::numeric_limits<float>::infinity());
}
