// Row-loop kernels shared by the SIMD files: bag pooling and CSR x dense rows, written once over an ISA
// traits struct and included INSIDE each ISA file's anonymous namespace (so every copy is compiled with
// that file's flags and stays private to it). Internal header; include after kernels.hpp.
//
// The traits struct I provides: a vector type V of I::W floats, I::NR (how many V accumulators a block
// keeps in registers), zero(), set1(f), ld32/ld16/ld8(ptr, n) (n valid lanes, the rest 0), fma(a, b, c)
// = a * b + c rounded once, add, mul, max(a, b) (b when either is NaN, as the max instructions), and
// st(ptr, v, n) (stores n lanes).
//
// Every output element goes through exactly the operations of the row-at-a-time axpy/max/scale kernels,
// in the same order (only the accumulator lives in a register instead of memory), so the results are
// bit-identical to them.
// (No #pragma once: each ISA file includes it once, inside its own namespace.)

// Prefetches the cache lines of p[0..n) with the given locality (3: into L1, 2: into L2).
template <int Locality, class T>
inline void prefetch_span(const T* p, int64_t n) {
  const char* b = reinterpret_cast<const char*>(p);
  const uintptr_t first = reinterpret_cast<uintptr_t>(b) & ~uintptr_t{63};
  const uintptr_t last = reinterpret_cast<uintptr_t>(b + n * static_cast<int64_t>(sizeof(T)) - 1);
  for (uintptr_t q = first; q <= last; q += 64) __builtin_prefetch(reinterpret_cast<const void*>(q), 0, Locality);
}

// Embedding rows are prefetched this many ids ahead into L2 (prefetcht1): tables are far larger than
// the caches, so the rows come from DRAM, and L2 prefetches keep many more misses in flight than L1
// ones (measured on Zen 4 with a 1M x 64 float32 table: 32 ahead into L2 ~2x faster than 12 into L1).
constexpr int64_t kBagPrefetch = 32;
// Graph rows (the dense input is L3-sized) are prefetched into L1 this many stored values ahead.
constexpr int64_t kSpmmPrefetch = 16;

template <class I, class Index, PoolStorage S, PoolOp OP, int NRU, int D = 0>
void pool_block(const PoolArgs& a, int64_t c0, int last_arg, int64_t b0, int64_t b1) {
  using V = typename I::V;
  constexpr int W = I::W;
  const int64_t d = D > 0 ? D : a.dim;
  const int last = D > 0 ? W : last_arg;
  const int64_t span = (NRU - 1) * W + last;
  const Index* ids = static_cast<const Index*>(a.ids);
  const int64_t i_end = a.offsets[b1];
  const float* sb = a.scale_bias;
  auto row_ptr = [&](int64_t r) {
    if constexpr (S == PoolStorage::f32) return static_cast<const float*>(a.data) + r * d + c0;
    else if constexpr (S == PoolStorage::f16) return static_cast<const uint16_t*>(a.data) + r * d + c0;
    else return static_cast<const uint8_t*>(a.data) + r * d + c0;
  };
  auto load = [&](const auto* p, int k) {
    const int n = k == NRU - 1 ? last : W;
    if constexpr (S == PoolStorage::f32) return I::ld32(p + k * W, n);
    else if constexpr (S == PoolStorage::f16) return I::ld16(p + k * W, n);
    else return I::ld8(p + k * W, n);
  };
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t lo = a.offsets[b], hi = a.offsets[b + 1];
    float* y = a.out + b * d + c0;
    V acc[NRU];
    const V init = (OP == PoolOp::max && hi > lo) ? I::set1(-__builtin_inff()) : I::zero();
    for (int k = 0; k < NRU; ++k) acc[k] = init;
    for (int64_t i = lo; i < hi; ++i) {
      if (i + kBagPrefetch < i_end) {
        const int64_t pr = static_cast<int64_t>(ids[i + kBagPrefetch]);
        prefetch_span<2>(row_ptr(pr), span);
        if constexpr (S == PoolStorage::u8) __builtin_prefetch(sb + 2 * pr, 0, 2);
      }
      const int64_t r = static_cast<int64_t>(ids[i]);
      const auto* p = row_ptr(r);
      if constexpr (OP == PoolOp::max) {
        if constexpr (S == PoolStorage::u8) {
          const V av = I::set1(sb[2 * r]), bv = I::set1(sb[2 * r + 1]);
          for (int k = 0; k < NRU; ++k) acc[k] = I::max(I::fma(av, load(p, k), bv), acc[k]);
        } else {
          for (int k = 0; k < NRU; ++k) acc[k] = I::max(load(p, k), acc[k]);
        }
      } else {
        const float w = a.weights != nullptr ? a.weights[i] : 1.f;
        if constexpr (S == PoolStorage::u8) {
          const V av = I::set1(w * sb[2 * r]), bv = I::set1(w * sb[2 * r + 1]);
          for (int k = 0; k < NRU; ++k) acc[k] = I::add(acc[k], I::fma(av, load(p, k), bv));
        } else {
          const V wv = I::set1(w);
          for (int k = 0; k < NRU; ++k) acc[k] = I::fma(wv, load(p, k), acc[k]);
        }
      }
    }
    if (OP == PoolOp::mean && hi > lo) {
      const V s = I::set1(1.f / static_cast<float>(hi - lo));
      for (int k = 0; k < NRU; ++k) acc[k] = I::mul(acc[k], s);
    }
    for (int k = 0; k < NRU; ++k) I::st(y + k * W, acc[k], k == NRU - 1 ? last : W);
  }
}

// One column of float32 rows (a linear model's weights beside an embedding table): the same single-rounded
// fma chain per bag in scalar code, without a masked vector load and store per id and bag.
template <class Index, PoolOp OP>
void pool_scalar_f32(const PoolArgs& a, int64_t b0, int64_t b1) {
  const Index* ids = static_cast<const Index*>(a.ids);
  const float* x = static_cast<const float*>(a.data);
  const int64_t i_end = a.offsets[b1];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t lo = a.offsets[b], hi = a.offsets[b + 1];
    float acc = 0.f;
    for (int64_t i = lo; i < hi; ++i) {
      if (i + kBagPrefetch < i_end) __builtin_prefetch(x + static_cast<int64_t>(ids[i + kBagPrefetch]), 0, 2);
      const float w = a.weights != nullptr ? a.weights[i] : 1.f;
      acc = __builtin_fmaf(w, x[static_cast<int64_t>(ids[i])], acc);
    }
    if (OP == PoolOp::mean && hi > lo) acc = acc * (1.f / static_cast<float>(hi - lo));
    a.out[b] = acc;
  }
}

template <class I, class Index, PoolStorage S, PoolOp OP>
void pool_cols(const PoolArgs& a, int64_t b0, int64_t b1) {
  constexpr int W = I::W;
  if constexpr (S == PoolStorage::f32 && OP != PoolOp::max) {
    if (a.dim == 1) {
      pool_scalar_f32<Index, OP>(a, b0, b1);
      return;
    }
  }
  if (a.dim == W) {   // rows of one vector (the CTR models' 16-dim tables at avx512): sizes as constants
    pool_block<I, Index, S, OP, 1, W>(a, 0, W, b0, b1);
    return;
  }
  for (int64_t c0 = 0; c0 < a.dim; c0 += I::NR * W) {
    const int64_t n = a.dim - c0 < I::NR * W ? a.dim - c0 : I::NR * W;
    const int nru = static_cast<int>((n + W - 1) / W);
    const int last = static_cast<int>(n - (nru - 1) * W);
    switch (nru) {
      case 1: pool_block<I, Index, S, OP, 1>(a, c0, last, b0, b1); break;
      case 2: pool_block<I, Index, S, OP, 2>(a, c0, last, b0, b1); break;
      case 3: pool_block<I, Index, S, OP, 3>(a, c0, last, b0, b1); break;
      case 4: pool_block<I, Index, S, OP, 4>(a, c0, last, b0, b1); break;
      default:
        if constexpr (I::NR >= 8) {
          switch (nru) {
            case 5: pool_block<I, Index, S, OP, 5>(a, c0, last, b0, b1); break;
            case 6: pool_block<I, Index, S, OP, 6>(a, c0, last, b0, b1); break;
            case 7: pool_block<I, Index, S, OP, 7>(a, c0, last, b0, b1); break;
            default: pool_block<I, Index, S, OP, 8>(a, c0, last, b0, b1); break;
          }
        }
        break;
    }
  }
}

template <class I, class Index, PoolStorage S>
void pool_op(const PoolArgs& a, int64_t b0, int64_t b1) {
  switch (a.op) {
    case PoolOp::sum: pool_cols<I, Index, S, PoolOp::sum>(a, b0, b1); break;
    case PoolOp::mean: pool_cols<I, Index, S, PoolOp::mean>(a, b0, b1); break;
    case PoolOp::max: pool_cols<I, Index, S, PoolOp::max>(a, b0, b1); break;
  }
}

template <class I, class Index>
void pool_storage(const PoolArgs& a, int64_t b0, int64_t b1) {
  switch (a.storage) {
    case PoolStorage::f32: pool_op<I, Index, PoolStorage::f32>(a, b0, b1); break;
    case PoolStorage::f16: pool_op<I, Index, PoolStorage::f16>(a, b0, b1); break;
    case PoolStorage::u8: pool_op<I, Index, PoolStorage::u8>(a, b0, b1); break;
  }
}

template <class I>
void pool_bags_impl(const PoolArgs& a, int64_t b0, int64_t b1) {
  if (a.ids64) pool_storage<I, int64_t>(a, b0, b1);
  else pool_storage<I, int32_t>(a, b0, b1);
}

// ------------------------------------------------------------------------------------------ CSR rows
template <class I, int NRU>
void spmm_block(const SpmmArgs& a, int64_t c0, int last, int64_t r0, int64_t r1) {
  using V = typename I::V;
  constexpr int W = I::W;
  const int64_t d = a.d;
  const int64_t span = (NRU - 1) * W + last;
  const int64_t i_end = a.indptr[r1];
  for (int64_t r = r0; r < r1; ++r) {
    V acc[NRU];
    for (int k = 0; k < NRU; ++k) acc[k] = I::zero();
    const int64_t lo = a.indptr[r], hi = a.indptr[r + 1];
    for (int64_t i = lo; i < hi; ++i) {
      if (i + kSpmmPrefetch < i_end)
        prefetch_span<3>(a.x + static_cast<int64_t>(a.indices[i + kSpmmPrefetch]) * d + c0, span);
      const float* p = a.x + static_cast<int64_t>(a.indices[i]) * d + c0;
      const V v = I::set1(a.data[i]);
      for (int k = 0; k < NRU; ++k) acc[k] = I::fma(v, I::ld32(p + k * W, k == NRU - 1 ? last : W), acc[k]);
    }
    if (a.next != nullptr) {
      float* y = a.next + r * d + c0;
      for (int k = 0; k < NRU; ++k) I::st(y + k * W, acc[k], k == NRU - 1 ? last : W);
    }
    if (a.acc != nullptr) {
      float* o = a.acc + r * d + c0;
      const V wv = I::set1(a.w);
      if (a.x0 != nullptr) {
        const float* x0 = a.x0 + r * d + c0;
        const V w0 = I::set1(a.w0);
        for (int k = 0; k < NRU; ++k) {
          const int n = k == NRU - 1 ? last : W;
          I::st(o + k * W, I::fma(wv, acc[k], I::fma(w0, I::ld32(x0 + k * W, n), I::zero())), n);
        }
      } else {
        for (int k = 0; k < NRU; ++k) {
          const int n = k == NRU - 1 ? last : W;
          I::st(o + k * W, I::fma(wv, acc[k], I::ld32(o + k * W, n)), n);
        }
      }
    }
  }
}

template <class I>
void spmm_rows_impl(const SpmmArgs& a, int64_t r0, int64_t r1) {
  constexpr int W = I::W;
  for (int64_t c0 = 0; c0 < a.d; c0 += I::NR * W) {
    const int64_t n = a.d - c0 < I::NR * W ? a.d - c0 : I::NR * W;
    const int nru = static_cast<int>((n + W - 1) / W);
    const int last = static_cast<int>(n - (nru - 1) * W);
    switch (nru) {
      case 1: spmm_block<I, 1>(a, c0, last, r0, r1); break;
      case 2: spmm_block<I, 2>(a, c0, last, r0, r1); break;
      case 3: spmm_block<I, 3>(a, c0, last, r0, r1); break;
      case 4: spmm_block<I, 4>(a, c0, last, r0, r1); break;
      default:
        if constexpr (I::NR >= 8) {
          switch (nru) {
            case 5: spmm_block<I, 5>(a, c0, last, r0, r1); break;
            case 6: spmm_block<I, 6>(a, c0, last, r0, r1); break;
            case 7: spmm_block<I, 7>(a, c0, last, r0, r1); break;
            default: spmm_block<I, 8>(a, c0, last, r0, r1); break;
          }
        }
        break;
    }
  }
}
