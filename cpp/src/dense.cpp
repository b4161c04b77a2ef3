// The dense part of a DeepFM / Wide&Deep click model (rec_engine/dense.hpp): construction, packing, and the
// forward pass over the kernels of the SIMD level in use (a portable loop below avx512).
#include "rec_engine/dense.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/dense_kernels.hpp"
#include "rec_engine/simd.hpp"
#include "rec_engine/topk.hpp"

namespace rec_engine {
namespace {

using dense_kernels::kPanel;

int64_t panels_of(int64_t out) { return (out + kPanel - 1) / kPanel; }

const dense_kernels::Table* active() {
#if defined(REC_ENGINE_HAVE_X86_KERNELS)
  if (simd_level() == SimdLevel::avx512) return &dense_kernels::avx512_table();
#endif
  return nullptr;
}

// Per-thread scratch of forward(): grown as needed, never shrunk.
struct Scratch {
  std::vector<float> fm, lsum, mlp, x, bias, h[2];
  std::vector<uint16_t> a16[2];
};

int64_t up32(int64_t n) { return (n + 31) / 32 * 32; }

void grow(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
}
void grow16(std::vector<uint16_t>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
}

// the first layer's bias of a call (n values) padded with zeros to width, in the scratch
const float* padded_bias(Scratch& s, const float* first_bias, int64_t n, int64_t width) {
  grow(s.bias, width);
  std::fill(s.bias.begin(), s.bias.begin() + width, 0.f);
  std::copy(first_bias, first_bias + n, s.bias.begin());
  return s.bias.data();
}

// bf16 bits of x, rounded to nearest even (a NaN stays a quiet NaN), as dense_amx.cpp's split16
uint16_t to_bf16(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  if (x != x) return 0x7FC0;
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
float from_bf16(uint16_t h) {
  const uint32_t b = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

// B' of dense_amx.cpp: [n32 / 16][hi, lo][K32 / 32] tiles, element (k, n) of a tile at (k / 2) * 32 + n * 2 + k % 2
std::vector<uint16_t> pack_weights_bf16x3(const DenseLayer& L, int64_t K32, int64_t n32) {
  const int64_t nks = K32 / 32, strip = 2 * nks * 512;
  std::vector<uint16_t> P(static_cast<size_t>(n32 / 16 * strip), 0);
  for (int64_t o = 0; o < L.out; ++o)
    for (int64_t k = 0; k < L.in; ++k) {
      const float w = L.weight[static_cast<size_t>(o * L.in + k)];
      const uint16_t hi = to_bf16(w), lo = to_bf16(w - from_bf16(hi));
      const int64_t at = (o / 16) * strip + (k / 32) * 512 + (k % 32) / 2 * 32 + (o % 16) * 2 + k % 2;
      P[static_cast<size_t>(at)] = hi;
      P[static_cast<size_t>(at + nks * 512)] = lo;
    }
  return P;
}

// An upper bound on the largest singular value of L's weights: with G = W^T W (or W W^T, the smaller), n x n,
// ||G^8||_F >= lambda_max(G)^8 and sigma_max = sqrt(lambda_max), so sigma_max <= ||G^8||_F^(1/16), at most
// n^(1/32) above it (1.2x at n = 400). In double, each product renormalized (its log kept), raised by 1e-9 for
// the rounding (a product's relative error ~n 2^-53).
double spectral_bound(const DenseLayer& L) {
  const int64_t m = L.out, k = L.in, n = std::min(m, k);
  const float* w = L.weight.data();
  std::vector<double> G(static_cast<size_t>(n * n), 0.0), T(static_cast<size_t>(n * n));
  if (k <= m) {   // W^T W: sum over rows of the outer products
    for (int64_t i = 0; i < m; ++i)
      for (int64_t a = 0; a < k; ++a) {
        const double wa = w[i * k + a];
        double* g = G.data() + a * n;
        for (int64_t b = 0; b < k; ++b) g[b] += wa * static_cast<double>(w[i * k + b]);
      }
  } else {        // W W^T
    for (int64_t a = 0; a < m; ++a)
      for (int64_t b = 0; b < m; ++b) {
        double acc = 0.0;
        for (int64_t t = 0; t < k; ++t) acc += static_cast<double>(w[a * k + t]) * static_cast<double>(w[b * k + t]);
        G[static_cast<size_t>(a * n + b)] = acc;
      }
  }
  double logs = 0.0;
  auto normalize = [&]() {
    double f = 0.0;
    for (double v : G) f += v * v;
    f = std::sqrt(f);
    if (!(f > 0.0) || !std::isfinite(f)) return false;
    for (double& v : G) v /= f;
    logs += std::log(f);
    return true;
  };
  if (!normalize()) return std::isfinite(logs) ? 0.0 : std::numeric_limits<double>::infinity();
  for (int it = 0; it < 3; ++it) {   // G <- G G (symmetric)
    std::fill(T.begin(), T.end(), 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t t = 0; t < n; ++t) {
        const double g = G[static_cast<size_t>(i * n + t)];
        const double* src = G.data() + t * n;
        double* dst = T.data() + i * n;
        for (int64_t j = 0; j < n; ++j) dst[j] += g * src[j];
      }
    G.swap(T);
    logs *= 2.0;
    if (!normalize()) return 0.0;   // G^(2^it) vanished: W is 0 (a normalized nonzero G cannot square to 0)
  }
  return std::exp(logs / 16.0) * (1.0 + 1e-9);
}

}  // namespace

DenseNet::DenseNet(int64_t n_fields, int64_t dim, std::vector<int64_t> var_fields, std::vector<DenseLayer> layers,
                   float bias, float fm_scale, bool fm, DensePrecision precision, bool screen)
    : n_fields_(n_fields), dim_(dim), var_fields_(std::move(var_fields)), layers_(std::move(layers)),
      bias_(bias), fm_scale_(fm_scale), fm_(fm), precision_(precision) {
  if (screen && precision != DensePrecision::float32)
    throw std::invalid_argument("DenseNet: the screen bounds the distance to float32 logits: precision must be float32");
  if (n_fields_ <= 0 || dim_ <= 0) throw std::invalid_argument("DenseNet: n_fields and dim must be > 0");
  if (var_fields_.empty()) throw std::invalid_argument("DenseNet: var_fields must not be empty");
  std::vector<bool> seen(static_cast<size_t>(n_fields_), false);
  for (int64_t f : var_fields_) {
    if (f < 0 || f >= n_fields_)
      throw std::invalid_argument("DenseNet: var field " + std::to_string(f) + " is out of range for " +
                                  std::to_string(n_fields_) + " fields");
    if (seen[static_cast<size_t>(f)]) throw std::invalid_argument("DenseNet: var field " + std::to_string(f) + " repeats");
    seen[static_cast<size_t>(f)] = true;
  }
  bool run = true;
  for (size_t i = 1; i < var_fields_.size(); ++i) run = run && var_fields_[i] == var_fields_[i - 1] + 1;
  var_start_ = run ? var_fields_.front() : -1;
  if (layers_.size() < 2) throw std::invalid_argument("DenseNet: needs a first layer and an output layer");
  int64_t in = static_cast<int64_t>(var_fields_.size()) * dim_;
  for (size_t l = 0; l < layers_.size(); ++l) {
    const DenseLayer& L = layers_[l];
    const std::string name = "DenseNet: layer " + std::to_string(l);
    if (L.in != in) throw std::invalid_argument(name + " takes " + std::to_string(L.in) + " inputs, expected " + std::to_string(in));
    if (L.out <= 0) throw std::invalid_argument(name + " has no outputs");
    if (static_cast<int64_t>(L.weight.size()) != L.out * L.in)
      throw std::invalid_argument(name + ": weight must hold out x in values");
    if (l == 0 ? !L.bias.empty() : static_cast<int64_t>(L.bias.size()) != L.out)
      throw std::invalid_argument(name + (l == 0 ? ": the first layer's bias comes with each call"
                                                 : ": bias must hold out values"));
    in = L.out;
  }
  if (layers_.back().out != 1) throw std::invalid_argument("DenseNet: the output layer must have one output");
  // hidden layers (all but the output): panels of kPanel outputs, k-major within a panel; biases padded
  for (size_t l = 0; l + 1 < layers_.size(); ++l) {
    const DenseLayer& L = layers_[l];
    const int64_t np = panels_of(L.out);
    std::vector<float> P(static_cast<size_t>(np * L.in * kPanel), 0.f);
    for (int64_t p = 0; p < np; ++p)
      for (int64_t k = 0; k < L.in; ++k)
        for (int64_t j = 0; j < kPanel && p * kPanel + j < L.out; ++j)
          P[static_cast<size_t>((p * L.in + k) * kPanel + j)] = L.weight[static_cast<size_t>((p * kPanel + j) * L.in + k)];
    packed_.push_back(std::move(P));
    std::vector<float> b;
    if (l > 0) {
      b.assign(static_cast<size_t>(np * kPanel), 0.f);
      std::copy(L.bias.begin(), L.bias.end(), b.begin());
    }
    pbias_.push_back(std::move(b));
  }
#if defined(REC_ENGINE_HAVE_AMX)
  if ((precision_ != DensePrecision::float32 || screen) && amx_available()) {
    for (size_t l = 0; l + 1 < layers_.size(); ++l) {
      const DenseLayer& L = layers_[l];
      k32_.push_back(up32(L.in));
      n32_.push_back(up32(L.out));
      packed16_.push_back(pack_weights_bf16x3(L, k32_.back(), n32_.back()));
      if (l > 0) pbias_[l].resize(static_cast<size_t>(std::max<int64_t>(n32_.back(), static_cast<int64_t>(pbias_[l].size()))), 0.f);
    }
  }
#endif
  if (screen && !packed16_.empty()) {
    for (size_t l = 0; l + 1 < layers_.size(); ++l) {
      const DenseLayer& L = layers_[l];
      double f = 0.0, b = 0.0, mx = 0.0;
      for (float v : L.weight) {
        f += static_cast<double>(v) * v;
        mx = std::max(mx, static_cast<double>(std::fabs(v)));
      }
      for (float v : L.bias) b += static_cast<double>(v) * v;
      fro_.push_back(std::sqrt(f) * (1.0 + 1e-9));
      bnorm_.push_back(std::sqrt(b) * (1.0 + 1e-9));
      wmax_.push_back(mx);
      spec_.push_back(l == 0 ? 0.0 : spectral_bound(L));   // (the first layer's inputs are the same on both paths)
    }
    double o = 0.0;
    for (float v : layers_.back().weight) o += static_cast<double>(v) * v;
    out_norm_ = std::sqrt(o) * (1.0 + 1e-9);
  }
}

bool DenseNet::tiles_active() const {
  return precision_ != DensePrecision::float32 && !packed16_.empty() && amx_enabled();
}

bool DenseNet::screen_active() const {
  return precision_ == DensePrecision::float32 && !packed16_.empty() && amx_enabled();
}

int64_t DenseNet::macs_per_row() const {
  int64_t m = 0;
  for (const DenseLayer& L : layers_) m += L.out * L.in;
  return m;
}

void DenseNet::forward(const float* emb, const float* lin, int64_t rows, const float* first_bias, float* out) const {
  run(emb, lin, rows, first_bias, out, nullptr);
}

void DenseNet::screen(const float* emb, const float* lin, int64_t rows, const float* first_bias, float* logit,
                      float* bound, DensePrecision tiles) const {
  if (tiles == DensePrecision::float32)
    throw std::invalid_argument("DenseNet::screen: tiles must be bf16x3 or bf16");
  if (screen_active()) {
    run(emb, lin, rows, first_bias, logit, bound, tiles == DensePrecision::bf16x3);
  } else {
    run(emb, lin, rows, first_bias, logit, nullptr);
    std::fill(bound, bound + std::max<int64_t>(rows, 0), 0.f);
  }
}

#if defined(REC_ENGINE_HAVE_AMX)
namespace {
// the bound on a float32 sum of n terms' rounding, relative to the sum of their magnitudes
double gamma(double n) { return n * 0x1p-24 / (1.0 - n * 0x1p-24); }
}  // namespace
#endif

// bound != nullptr: the screen (screen_active()): bf16x3 tiles (bf16 without screen_x3), and bound[r] as
// screen() describes
void DenseNet::run(const float* emb, const float* lin, int64_t rows, const float* first_bias, float* out,
                   float* bound, bool screen_x3) const {
  if (rows <= 0) return;
  thread_local Scratch s;
  const int64_t F = n_fields_, d = dim_, row = F * d;
  grow(s.fm, rows);
  grow(s.lsum, rows);
  grow(s.mlp, rows);
  const dense_kernels::Table* k = active();
  // the linear and FM terms
  if (k != nullptr) {
    k->fm_rows(emb, lin, rows, F, d, fm_ ? s.fm.data() : nullptr, s.lsum.data());
  } else {
    std::vector<float> sum(static_cast<size_t>(d)), sq(static_cast<size_t>(d));
    for (int64_t r = 0; r < rows; ++r) {
      const float* e = emb + r * row;
      std::fill(sum.begin(), sum.end(), 0.f);
      std::fill(sq.begin(), sq.end(), 0.f);
      for (int64_t f = 0; fm_ && f < F; ++f)
        for (int64_t t = 0; t < d; ++t) {
          const float v = e[f * d + t];
          sum[static_cast<size_t>(t)] += v;
          sq[static_cast<size_t>(t)] += v * v;
        }
      float acc = 0.f;
      for (int64_t t = 0; t < d; ++t) acc += sum[static_cast<size_t>(t)] * sum[static_cast<size_t>(t)] - sq[static_cast<size_t>(t)];
      s.fm[static_cast<size_t>(r)] = acc;
      float ls = 0.f;
      for (int64_t f = 0; f < F; ++f) ls += lin[r * F + f];
      s.lsum[static_cast<size_t>(r)] = ls;
    }
  }
  // the first layer's input: the var fields of each row, read in place when they are one run of fields
  const int64_t kv = static_cast<int64_t>(var_fields_.size()) * d;
  const float* A = emb + (var_start_ >= 0 ? var_start_ * d : 0);
  int64_t lda = row;
  if (var_start_ < 0) {
    grow(s.x, rows * kv);
    for (int64_t r = 0; r < rows; ++r)
      for (size_t i = 0; i < var_fields_.size(); ++i)
        std::copy(emb + r * row + var_fields_[i] * d, emb + r * row + (var_fields_[i] + 1) * d,
                  s.x.data() + r * kv + static_cast<int64_t>(i) * d);
    A = s.x.data();
    lda = kv;
  }
  // hidden layers
  const size_t n_hidden = layers_.size() - 1;
#if defined(REC_ENGINE_HAVE_AMX)
  // the screen: per row the bound E on the 2-norm of the two paths' difference after each layer, na the norm of
  // a layer's inputs on the tiles' path (double: a row's own)
  thread_local std::vector<double> E, na;
  if (bound != nullptr) {
    E.assign(static_cast<size_t>(rows), 0.0);
    na.resize(static_cast<size_t>(rows));
  }
  if (k != nullptr && (bound != nullptr || tiles_active())) {
    const int64_t rows32 = up32(rows);
    grow16(s.a16[0], rows32 * k32_[0] * 2);
    const bool x3 = bound != nullptr ? screen_x3 : precision_ == DensePrecision::bf16x3;
    dense_kernels::pack_rows_bf16(A, lda, rows, kv, s.a16[0].data(), rows32, k32_[0], x3);
    for (size_t l = 0; l < n_hidden; ++l) {
      const int64_t n32 = n32_[l];
      std::vector<float>& Y = s.h[l % 2];
      grow(Y, rows32 * n32);
      const float* bias = l == 0 ? padded_bias(s, first_bias, layers_[0].out, n32) : pbias_[l].data();
      uint16_t* next = nullptr;
      if (l + 1 < n_hidden) {
        grow16(s.a16[(l + 1) % 2], rows32 * n32 * 2);
        next = s.a16[(l + 1) % 2].data();
      }
      if (bound != nullptr) {
        // |tiles - exact| <= cT (sum |a w| + |b|) and |float32 - exact| <= cF (...) an output, the sums bounded by
        // ||a|| ||w_j|| (Cauchy-Schwarz), over the outputs by ||a|| ||W||_F; the inputs' difference E passes
        // through W at most ||W||_2 larger, through ReLU no larger. abs: flushed denormals (2^-126 a term).
        // bf16x3: the dropped terms <= 2^-15 |a w|, 3K products summed; bf16: hi(a) hi(w) within (1 + 2^-8)^2 - 1
        // = 2^-7 + 2^-16 of a w, K products summed
        const DenseLayer& L = layers_[l];
        const double K = static_cast<double>(L.in);
        const double cT = x3 ? 0x1p-15 * 1.02 + 1.02 * gamma(3 * K + 2) : 0x1p-7 * 1.01 + 1.02 * gamma(K + 2);
        const double cF = gamma(K + 1);
        double nb = bnorm_[l];
        if (l == 0) {
          double b2 = 0.0;
          for (int64_t j = 0; j < L.out; ++j) b2 += static_cast<double>(first_bias[j]) * first_bias[j];
          nb = std::sqrt(b2) * (1.0 + 1e-9);
        }
        const double ab = std::sqrt(static_cast<double>(L.out)) * (3 * K + 2) * 0x1p-125 * (1.0 + wmax_[l]);
        dense_kernels::row_norms(A, lda, rows, L.in, na.data());
        for (int64_t r = 0; r < rows; ++r) {
          const double e = E[static_cast<size_t>(r)], a = na[static_cast<size_t>(r)];
          E[static_cast<size_t>(r)] = cT * (a * fro_[l] + nb) + cF * ((a + e) * fro_[l] + nb) + spec_[l] * e +
                                      ab * (1.0 + a);
        }
      }
      dense_kernels::layer_bf16_amx(s.a16[l % 2].data(), rows32, k32_[l], packed16_[l].data(), n32, bias, Y.data(),
                                    next, x3);
      A = Y.data();
      lda = n32;
    }
  } else
#endif
  for (size_t l = 0; l < n_hidden; ++l) {
    const DenseLayer& L = layers_[l];
    const int64_t np = panels_of(L.out), ldy = np * kPanel;
    std::vector<float>& Y = s.h[l % 2];
    grow(Y, rows * ldy);
    const float* bias = l == 0 ? padded_bias(s, first_bias, L.out, ldy) : pbias_[l].data();
    if (k != nullptr) {
      k->layer(A, lda, rows, L.in, packed_[l].data(), np, bias, Y.data(), ldy, true);
    } else {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = 0; o < L.out; ++o) {
          float acc = bias[o];
          const float* w = L.weight.data() + o * L.in;
          for (int64_t i = 0; i < L.in; ++i) acc += A[r * lda + i] * w[i];
          Y[static_cast<size_t>(r * ldy + o)] = std::max(acc, 0.f);
        }
    }
    A = Y.data();
    lda = ldy;
  }
  // the output layer, then the sum in the graph's order
  const DenseLayer& O = layers_.back();
  if (k != nullptr) {
    k->dot_rows(A, lda, rows, O.in, O.weight.data(), O.bias[0], s.mlp.data());
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      float acc = 0.f;
      for (int64_t i = 0; i < O.in; ++i) acc += A[r * lda + i] * O.weight[static_cast<size_t>(i)];
      s.mlp[static_cast<size_t>(r)] = O.bias[0] + acc;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float logit = bias_ + s.lsum[static_cast<size_t>(r)];
    if (fm_) logit = logit + s.fm[static_cast<size_t>(r)] * fm_scale_;
    out[r] = logit + s.mlp[static_cast<size_t>(r)];
  }
#if defined(REC_ENGINE_HAVE_AMX)
  if (bound != nullptr) {
    // the output layer (the same float32 dot on both paths, over inputs E apart; each within gamma_(K+1) of its
    // exact value), then the last addition's rounding on each path
    const double K = static_cast<double>(O.in), g = gamma(K + 1), ob = std::fabs(static_cast<double>(O.bias[0]));
    dense_kernels::row_norms(A, lda, rows, O.in, na.data());
    for (int64_t r = 0; r < rows; ++r) {
      const double e = E[static_cast<size_t>(r)], a = na[static_cast<size_t>(r)];
      const double dm = out_norm_ * e + g * (out_norm_ * a + ob) + g * (out_norm_ * (a + e) + ob);
      const double B = ((1.0 + 0x1p-22) * dm + 0x1p-22 * 1.01 * std::fabs(static_cast<double>(out[r]))) * (1.0 + 1e-6) +
                       1e-37;
      const float b = static_cast<float>(B);
      bound[r] = std::isfinite(B) && std::isfinite(out[r])
                     ? (static_cast<double>(b) >= B ? b : std::nextafter(b, std::numeric_limits<float>::infinity()))
                     : std::numeric_limits<float>::infinity();
    }
  }
#endif
}

}  // namespace rec_engine
