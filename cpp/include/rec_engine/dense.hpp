// The dense part of a factorization-machine / MLP click model (DeepFM, Wide&Deep), run natively.
//
// For an example with pooled field embeddings e[F][d] and linear weights l[F]:
//   logit = ((bias + sum_f l[f]) + fm_scale * sum_t((sum_f e[f][t])^2 - sum_f e[f][t]^2)) + mlp(x)
// where x is the embeddings of the fields var_fields, in that order, flattened (the first layer's input),
// mlp's hidden layers are relu(W h + b) and its last layer (one output) is W h + b. The first layer's bias
// is given per call (first_bias: a request's share of the first layer from the fields that are the same on
// all its rows, plus the layer's bias; see rec_engine.dense_split). The sums are float32; the order of the
// additions follows the ONNX graph the training exporter writes, the matrix products differ from ONNX
// Runtime's in rounding only.
//
// A DenseNet is immutable once built: forward() is safe from many threads at once (each keeps its own
// scratch). At the avx512 level the matrix products run in register tiles of 5 rows x 80 outputs over
// weights packed at construction (the layer's 80-output panels, one after another); at other levels a
// portable loop computes the same sums.
//
// Reduced precision (opt-in) for the hidden layers' products, on AMX-BF16 tiles, as PyTorch's float32 matmul
// precisions on CPUs with bf16 units: bf16x3 ("high") splits each float32 into two bf16 numbers (x = hi + lo,
// ~16 significant bits) and sums three bf16 products a term (hi hi + hi lo + lo hi) in float32; bf16
// ("medium") takes hi hi alone (~8 bits). A permission, not an order: the float32 kernels run whenever the
// tiles are not in use (no AMX-BF16, REC_ENGINE_AMX=0, set_amx(false), below the avx512 level), and
// tiles_active() says which. A product's relative error is then ~2^-16 (bf16x3) or ~2^-8 (bf16).
//
// The screen (float32 precision, built with screen = true; see screen()): the same bf16x3 (or bf16) tile products
// with a bound on each row's distance to forward()'s float32 logit, so that a caller who wants the best rows of a
// request can compute all rows on the tiles and only the contenders in float32, and answer exactly what
// float32 alone answers. The bound is the worst case of both paths' rounding (|x - hi - lo| <= 2^-17 |x|, a
// dropped lo lo term; bf16: |x - hi| <= 2^-8 |x|, a product within 2^-7 + 2^-16 of its own; float32 sums of n
// terms within gamma_n = n u / (1 - n u) of the exact sum, u = 2^-24), carried through the layers with
// Cauchy-Schwarz (the Frobenius norm of each layer's weights), ReLU's Lipschitz constant 1 and an upper bound on
// each layer's spectral norm (||(W^T W)^8||_F^(1/16), in double, at construction).
#pragma once
#include <cstdint>
#include <vector>

namespace rec_engine {

enum class DensePrecision { float32, bf16x3, bf16 };

struct DenseLayer {
  std::vector<float> weight;   // out x in, row-major (ONNX Gemm with transB = 1)
  std::vector<float> bias;     // out (empty for the first layer: its bias comes with each call)
  int64_t out = 0, in = 0;
};

class DenseNet {
 public:
  // Throws std::invalid_argument on inconsistent sizes: var_fields must be distinct fields in [0, n_fields),
  // layers[0].in == var_fields.size() * dim, each layer's in the previous one's out, the last layer's out 1,
  // at least two layers (the first and the output).
  DenseNet(int64_t n_fields, int64_t dim, std::vector<int64_t> var_fields, std::vector<DenseLayer> layers,
           float bias, float fm_scale, bool fm, DensePrecision precision = DensePrecision::float32,
           bool screen = false);

  // out[r] for r < rows: emb rows x n_fields x dim, lin rows x n_fields, first_bias layers[0].out values.
  void forward(const float* emb, const float* lin, int64_t rows, const float* first_bias, float* out) const;

  int64_t n_fields() const { return n_fields_; }
  int64_t dim() const { return dim_; }
  int64_t first_out() const { return layers_.front().out; }
  int64_t macs_per_row() const;
  DensePrecision precision() const { return precision_; }
  // whether forward() runs the bf16 tiles now (a reduced precision asked, the tiles available and switched on)
  bool tiles_active() const;

  // logit[r] and bound[r] for r < rows (arguments as forward's) with |logit[r] - forward's logit of row r| <=
  // bound[r] (+inf where a value is not finite). While screen_active() the logits come from the tiles, bf16x3 or
  // bf16 as `tiles` says (bf16: ~0.6 of the time, bounds ~70x wider); otherwise they are forward()'s own and every
  // bound is 0. Throws std::invalid_argument when tiles is float32.
  void screen(const float* emb, const float* lin, int64_t rows, const float* first_bias, float* logit,
              float* bound, DensePrecision tiles = DensePrecision::bf16x3) const;
  // built with screen (float32 precision) and the tiles in use now
  bool screen_active() const;

 private:
  int64_t n_fields_, dim_;
  std::vector<int64_t> var_fields_;
  int64_t var_start_ = -1;         // the var fields as one contiguous run starting here, or -1
  std::vector<DenseLayer> layers_;
  std::vector<std::vector<float>> packed_;   // per layer but the last: panels of kPanel outputs
  std::vector<std::vector<float>> pbias_;    // per hidden layer: the bias padded to the panels (layer 0: empty)
  // reduced precision: per hidden layer the weights as TDPBF16PS B tiles (hi and lo parts; dense_amx.cpp),
  // inputs padded to k32_ and outputs to n32_ (multiples of 32); empty when not asked or not available
  std::vector<std::vector<uint16_t>> packed16_;
  std::vector<int64_t> k32_, n32_;
  float bias_, fm_scale_;
  bool fm_;
  DensePrecision precision_;
  // the screen's constants: per hidden layer the Frobenius norm, a spectral-norm bound, the bias's 2-norm
  // (layer 0: given per call), the largest |weight|; the output layer's weight norm
  std::vector<double> fro_, spec_, bnorm_, wmax_;
  double out_norm_ = 0.0;

  void run(const float* emb, const float* lin, int64_t rows, const float* first_bias, float* out,
           float* bound, bool screen_x3 = true) const;
};

}  // namespace rec_engine
