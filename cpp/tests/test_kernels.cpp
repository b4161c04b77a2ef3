// Every kernel table the CPU supports against the scalar table, and the public API against brute force.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/kernels.hpp"
#include "kernels/topk_gemm.hpp"
#include "rec_engine/dense.hpp"
#include "rec_engine/embedding.hpp"
#include "rec_engine/graph.hpp"
#include "rec_engine/keys.hpp"
#include "rec_engine/simd.hpp"
#include "rec_engine/topk.hpp"

namespace k = rec_engine::kernels;
using namespace rec_engine;

static int g_failures = 0;
#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (!(cond)) {                                                    \
      ++g_failures;                                                   \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                              \
      std::fprintf(stderr, "\n");                                     \
    }                                                                 \
  } while (0)

static bool close(float a, float b, float tol) { return std::fabs(a - b) <= tol * (1.f + std::fabs(b)); }

static std::vector<float> randn(std::mt19937& g, size_t n) {
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (auto& x : v) x = dist(g);
  return v;
}

static uint16_t float_to_half(float f) {  // round-to-nearest for normal values (test data only)
  uint32_t b;
  std::memcpy(&b, &f, 4);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const int exp = static_cast<int>((b >> 23) & 0xff) - 127 + 15;
  const uint32_t mant = b & 0x7fffffu;
  if (exp <= 0) return static_cast<uint16_t>(sign);
  uint32_t h = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  if (mant & 0x1000u) ++h;
  return static_cast<uint16_t>(h);
}

static void test_table(const k::KernelTable& t) {
  const k::KernelTable& ref = k::scalar_table();
  std::mt19937 g(42);
  for (int64_t d : {1, 7, 15, 16, 17, 31, 33, 64, 100, 1023}) {
    // dot_tile: every (nq, nx) shape up to 6 x 9, against the scalar table.
    for (int64_t nq : {1, 3, 5, 6})
      for (int64_t nx : {1, 2, 4, 9}) {
        auto q = randn(g, nq * d), x = randn(g, nx * d);
        std::vector<float> a(nq * nx), b(nq * nx);
        t.dot_tile(q.data(), nq, d, x.data(), nx, d, d, a.data(), nx);
        ref.dot_tile(q.data(), nq, d, x.data(), nx, d, d, b.data(), nx);
        for (int64_t i = 0; i < nq * nx; ++i)
          CHECK(close(a[i], b[i], 1e-4f), "%s dot_tile d=%lld: %g vs %g", t.name, (long long)d, a[i], b[i]);
        // A pair scores the same inside any tile shape.
        float single;
        t.dot_tile(q.data() + (nq - 1) * d, 1, d, x.data() + (nx - 1) * d, 1, d, d, &single, 1);
        CHECK(single == a[nq * nx - 1], "%s dot_tile is not tile-shape independent", t.name);
      }
    auto x = randn(g, d), y0 = randn(g, d);
    std::vector<uint16_t> h(d);
    std::vector<uint8_t> c(d);
    for (int64_t i = 0; i < d; ++i) {
      h[i] = float_to_half(x[i]);
      c[i] = static_cast<uint8_t>(g() & 0xff);
    }
    auto run = [&](auto fn_t, auto fn_ref, const char* what) {
      std::vector<float> a = y0, b = y0;
      fn_t(a.data());
      fn_ref(b.data());
      for (int64_t i = 0; i < d; ++i)
        CHECK(close(a[i], b[i], 1e-5f), "%s %s d=%lld i=%lld: %g vs %g", t.name, what, (long long)d,
              (long long)i, a[i], b[i]);
    };
    run([&](float* y) { t.axpy_f32(y, x.data(), 0.7f, d); }, [&](float* y) { ref.axpy_f32(y, x.data(), 0.7f, d); }, "axpy_f32");
    run([&](float* y) { t.axpy_f16(y, h.data(), -1.3f, d); }, [&](float* y) { ref.axpy_f16(y, h.data(), -1.3f, d); }, "axpy_f16");
    run([&](float* y) { t.axpy_u8(y, c.data(), 0.01f, -0.5f, d); }, [&](float* y) { ref.axpy_u8(y, c.data(), 0.01f, -0.5f, d); }, "axpy_u8");
    run([&](float* y) { t.max_f32(y, x.data(), d); }, [&](float* y) { ref.max_f32(y, x.data(), d); }, "max_f32");
    run([&](float* y) { t.max_f16(y, h.data(), d); }, [&](float* y) { ref.max_f16(y, h.data(), d); }, "max_f16");
    run([&](float* y) { t.max_u8(y, c.data(), 0.02f, -2.f, d); }, [&](float* y) { ref.max_u8(y, c.data(), 0.02f, -2.f, d); }, "max_u8");
    run([&](float* y) { t.scale(y, 0.25f, d); }, [&](float* y) { ref.scale(y, 0.25f, d); }, "scale");
  }
}

static void test_half_conversion() {
  CHECK(k::half_to_float(0x3c00) == 1.f, "1.0");
  CHECK(k::half_to_float(0xc000) == -2.f, "-2.0");
  CHECK(k::half_to_float(0x0001) == std::ldexp(1.f, -24), "smallest subnormal");
  CHECK(std::isinf(k::half_to_float(0x7c00)), "inf");
  CHECK(std::isnan(k::half_to_float(0x7e00)), "nan");
}

static void test_topk_api() {
  std::mt19937 g(7);
  const int64_t b = 5, n = 3000, d = 19, kk = 17;
  auto q = randn(g, b * d), x = randn(g, n * d);
  std::vector<int64_t> ex_indptr = {0, 2, 2, 3, 3, 3}, ex_ids = {5, 9, 11};
  TopkOptions opt;
  opt.k = kk;
  opt.exclude = {ex_indptr.data(), ex_ids.data()};
  std::vector<int64_t> ids(b * kk);
  std::vector<float> scores(b * kk);
  topk(q.data(), b, x.data(), n, d, opt, ids.data(), scores.data());
  for (int64_t qi = 0; qi < b; ++qi) {
    std::vector<std::pair<float, int64_t>> all;
    for (int64_t j = 0; j < n; ++j) {
      bool skip = false;
      for (int64_t p = ex_indptr[qi]; p < ex_indptr[qi + 1]; ++p) skip = skip || ex_ids[p] == j;
      if (skip) continue;
      double s = 0;
      for (int64_t t = 0; t < d; ++t) s += double(q[qi * d + t]) * x[j * d + t];
      all.push_back({static_cast<float>(s), j});
    }
    std::sort(all.begin(), all.end(), [](auto& a, auto& c) { return a.first > c.first || (a.first == c.first && a.second < c.second); });
    for (int64_t r = 0; r < kk; ++r)
      CHECK(close(scores[qi * kk + r], all[r].first, 1e-4f), "topk score q=%lld r=%lld", (long long)qi, (long long)r);
  }
  bool threw = false;
  ex_ids[0] = n;  // out of range
  try {
    topk(q.data(), b, x.data(), n, d, opt, ids.data(), scores.data());
  } catch (const std::out_of_range&) {
    threw = true;
  }
  CHECK(threw, "an excluded id out of range must throw std::out_of_range");
}

// The streaming scan kernel scores every pair exactly as the avx512 dot_tile does (bit for bit), zero-fills
// a short panel, sets the mask bits of scores >= thr or NaN, and runs on from panel to panel until a bit
// is set.
static void test_stream_f32() {
#if defined(REC_ENGINE_HAVE_X86_KERNELS)
  bool have = false;
  for (SimdLevel level : supported_simd_levels()) have = have || level == SimdLevel::avx512;
  if (!have) return;
  const auto& st = rec_engine::topk_gemm::avx512_table();
  const k::KernelTable& dt = k::avx512_table();
  constexpr int64_t P = rec_engine::topk_gemm::kPanel;
  std::mt19937 g(11);
  for (int64_t d : {1, 7, 16, 17, 32, 48, 64, 96, 100, 128, 300})
    for (int64_t nq : {1, 2, 3})
      for (int64_t nx : {1, 15, 16, 17, 40, 63, 64}) {
        const int64_t ldx = d + (d % 3 == 0 ? 5 : 0);  // a row stride larger than d, sometimes
        auto q = randn(g, nq * d), x = randn(g, nx * ldx);
        if (nx > 5) x[5 * ldx] = std::numeric_limits<float>::quiet_NaN();
        std::vector<float> out(nq * P, -7.f), all(nq * P, -7.f), ref(nq * nx), thr(nq);
        std::vector<uint64_t> masks(nq, ~uint64_t{0});
        dt.dot_tile(q.data(), nq, d, x.data(), nx, ldx, d, ref.data(), nx);
        // without a threshold: every score of the panel, 0 past the items
        CHECK(st.stream_f32(q.data(), nq, d, x.data(), nx, ldx, d, nullptr, all.data(), P, nullptr) == nx,
              "stream_f32 without thr goes through one panel");
        for (int64_t a = 0; a < nq; ++a)
          for (int64_t j = 0; j < P; ++j) {
            const float v = all[a * P + j];
            if (j >= nx) {
              CHECK(v == 0.f, "stream_f32 d=%lld nx=%lld: lane %lld past the items is %g", (long long)d,
                    (long long)nx, (long long)j, v);
              continue;
            }
            const float r = ref[a * nx + j];
            CHECK((std::isnan(v) && std::isnan(r)) || std::memcmp(&v, &r, 4) == 0,
                  "stream_f32 d=%lld nq=%lld nx=%lld (%lld, %lld): %.9g vs dot_tile %.9g", (long long)d,
                  (long long)nq, (long long)nx, (long long)a, (long long)j, v, r);
          }
        for (int64_t a = 0; a < nq; ++a) thr[a] = a == 0 ? 0.f : (a == 1 ? -1e30f : 2.f);
        CHECK(st.stream_f32(q.data(), nq, d, x.data(), nx, ldx, d, thr.data(), out.data(), P, masks.data()) == nx,
              "stream_f32 with thr, one panel");
        for (int64_t a = 0; a < nq; ++a) {
          uint64_t want = 0;
          for (int64_t j = 0; j < nx; ++j)
            if (!(ref[a * nx + j] < thr[a])) want |= uint64_t{1} << j;
          CHECK(masks[a] == want, "stream_f32 mask d=%lld nq=%lld nx=%lld query %lld", (long long)d,
                (long long)nq, (long long)nx, (long long)a);
          if (want != 0)
            CHECK(std::memcmp(out.data() + a * P, all.data() + a * P, 4 * P) == 0,
                  "stream_f32 scores of a query with hits d=%lld", (long long)d);
        }
      }
  // Several panels: it runs on until the panel holding the one item above the threshold.
  for (int64_t d : {16, 64, 37}) {
    const int64_t n = 7 * P + 9;
    std::vector<float> x(n * d, 0.01f), q(d, 1.f), out(P);
    for (int64_t hit : {int64_t{0}, 3 * P + 5, n - 1}) {
      std::fill(x.begin(), x.end(), 0.01f);
      x[hit * d] = 100.f;
      const float thr = 50.f;
      uint64_t mask = 0;
      const int64_t used = st.stream_f32(q.data(), 1, d, x.data(), n, d, d, &thr, out.data(), P, &mask);
      const int64_t start = (used - 1) / P * P;
      CHECK(start <= hit && hit < used && mask == uint64_t{1} << (hit - start),
            "stream_f32 multi-panel d=%lld hit %lld: used %lld mask %llx", (long long)d, (long long)hit,
            (long long)used, (unsigned long long)mask);
      const float none = 1e9f;
      CHECK(st.stream_f32(q.data(), 1, d, x.data(), n, d, d, &none, out.data(), P, &mask) == n && mask == 0,
            "stream_f32 without a hit goes through every item");
    }
  }
#endif
}

// The reduced-precision multi-panel scans stop at the first panel with a mask bit and score it as the
// one-panel kernels do.
static void test_reduced_scans() {
#if defined(REC_ENGINE_HAVE_X86_KERNELS)
  bool have = false;
  for (SimdLevel level : supported_simd_levels()) have = have || level == SimdLevel::avx512;
  if (!have) return;
  namespace tg = rec_engine::topk_gemm;
  const SimdLevel before = simd_level();
  set_simd_level(SimdLevel::avx512);
  const tg::Table* t = tg::active();
  constexpr int64_t P = tg::kPanel;
  std::mt19937 g(5);
  const int64_t n = 5 * P, d = 64;
  auto x = randn(g, n * d);
  for (Precision pr : {Precision::int8, Precision::bf16}) {
    if ((pr == Precision::int8 && t->scan_i8_filter == nullptr) || (pr == Precision::bf16 && t->scan_bf16_filter == nullptr))
      continue;
    std::vector<uint8_t> packed(quantized_bytes(pr, n, d));
    std::vector<int32_t> corr(quantized_rows(n));
    std::vector<float> scale(quantized_rows(n));
    quantize_items(x.data(), n, d, pr, packed.data(), corr.data(), scale.data(), 1);
    std::vector<uint8_t> qu(d, 128);
    std::vector<uint16_t> qb(d);
    for (int64_t i = 0; i < d; ++i) {
      qu[i] = static_cast<uint8_t>(128 + (static_cast<int>(g() % 255) - 127));
      qb[i] = 0x3f80;  // bf16 1.0
    }
    const int64_t panel_bytes = P * d * (pr == Precision::int8 ? 1 : 2);
    auto scan = [&](int64_t p0, int64_t np, float thr, float* out, uint64_t* mask) {
      if (pr == Precision::int8)
        return t->scan_i8_filter(qu.data(), 1, d, reinterpret_cast<const int8_t*>(packed.data() + p0 * panel_bytes), np,
                                 d / 4, corr.data() + p0 * P, scale.data() + p0 * P, &thr, out, P, mask);
      return t->scan_bf16_filter(qb.data(), 1, d, reinterpret_cast<const uint16_t*>(packed.data() + p0 * panel_bytes),
                                 np, d / 2, &thr, out, P, mask);
    };
    std::vector<float> out(P), one(P);
    uint64_t mask = 1;
    CHECK(scan(0, 5, 1e30f, out.data(), &mask) == 5 && mask == 0, "reduced scan without a hit goes through every panel");
    // the threshold of panel 3's best score: panels 0-2 may hit first only if they hold a score as high
    for (int64_t p0 = 0; p0 < 5; ++p0) {
      uint64_t m1 = 0;
      CHECK(scan(p0, 1, -1e30f, one.data(), &m1) == 1 && m1 == ~uint64_t{0}, "every score passes -1e30");
      const float best = *std::max_element(one.begin(), one.end());
      const int64_t used = scan(0, 5, best, out.data(), &mask);
      CHECK(used >= 1 && used <= p0 + 1 && mask != 0, "reduced scan stops at the first panel with a hit");
      if (used == p0 + 1) {
        const int j = __builtin_ctzll(mask);
        CHECK(out[j] == one[j] && out[j] >= best, "reduced scan scores the hit as the one-panel kernel does");
      }
    }
  }
  set_simd_level(before);
#endif
}

// topk of 1-3 queries (the streaming path at avx512) against brute force: k = 500, n not a multiple of
// 16 or 64, integer data with many ties (lower id first), exclusions, cosine, 1 and 2 threads agreeing
// bit for bit.
static void test_topk_small_batches() {
  std::mt19937 g(3);
  std::uniform_int_distribution<int> small(-2, 2);
  for (int64_t n : {1, 63, 1000, 5003})
    for (int64_t b : {1, 2, 3})
      for (int64_t kk : {1, 10, 500}) {
        const int64_t d = 24;
        std::vector<float> q(b * d), x(n * d);
        for (auto& v : q) v = static_cast<float>(small(g));
        for (auto& v : x) v = static_cast<float>(small(g));
        std::vector<int64_t> ex_indptr = {0}, ex_ids;
        for (int64_t qi = 0; qi < b; ++qi) {
          for (int64_t j = qi; j < n; j += 7) ex_ids.push_back(j);
          ex_indptr.push_back(static_cast<int64_t>(ex_ids.size()));
        }
        for (Metric metric : {Metric::inner_product, Metric::cosine}) {
          TopkOptions opt;
          opt.k = kk;
          opt.metric = metric;
          opt.exclude = {ex_indptr.data(), ex_ids.data()};
          const int64_t w = topk_width(kk, n);
          std::vector<int64_t> ids1(b * w), ids2(b * w);
          std::vector<float> s1(b * w), s2(b * w);
          opt.num_threads = 1;
          topk(q.data(), b, x.data(), n, d, opt, ids1.data(), s1.data());
          opt.num_threads = 2;
          topk(q.data(), b, x.data(), n, d, opt, ids2.data(), s2.data());
          CHECK(ids1 == ids2 && std::memcmp(s1.data(), s2.data(), 4 * s1.size()) == 0,
                "topk n=%lld b=%lld k=%lld: 1 and 2 threads differ", (long long)n, (long long)b, (long long)kk);
          if (metric == Metric::cosine) continue;  // integer scores are exact for the inner product only
          for (int64_t qi = 0; qi < b; ++qi) {
            std::vector<std::pair<float, int64_t>> all;
            for (int64_t j = 0; j < n; ++j) {
              if (std::find(ex_ids.begin() + ex_indptr[qi], ex_ids.begin() + ex_indptr[qi + 1], j) !=
                  ex_ids.begin() + ex_indptr[qi + 1])
                continue;
              float s = 0;
              for (int64_t t = 0; t < d; ++t) s += q[qi * d + t] * x[j * d + t];
              all.push_back({s, j});
            }
            std::sort(all.begin(), all.end(),
                      [](auto& a, auto& c) { return a.first > c.first || (a.first == c.first && a.second < c.second); });
            for (int64_t r = 0; r < w; ++r) {
              const int64_t want = r < static_cast<int64_t>(all.size()) ? all[r].second : -1;
              CHECK(ids1[qi * w + r] == want, "topk n=%lld b=%lld k=%lld query %lld rank %lld: id %lld, want %lld",
                    (long long)n, (long long)b, (long long)kk, (long long)qi, (long long)r,
                    (long long)ids1[qi * w + r], (long long)want);
            }
          }
        }
      }
}

static void test_pool_and_graph_api() {
  std::mt19937 g(3);
  const int64_t rows = 50, d = 9;
  auto w = randn(g, rows * d);
  TableView t{StorageType::float32, w.data(), rows, d, nullptr};
  std::vector<int64_t> idx = {1, 2, 3, 49, 0}, offs = {0, 3, 3, 5};
  std::vector<float> out(3 * d);
  pool(t, idx.data(), 5, offs.data(), 3, nullptr, PoolMode::mean, out.data());
  for (int64_t c = 0; c < d; ++c) {
    CHECK(close(out[c], (w[1 * d + c] + w[2 * d + c] + w[3 * d + c]) / 3, 1e-5f), "mean bag 0");
    CHECK(out[d + c] == 0.f, "empty bag gives zeros");
  }
  std::vector<int32_t> users = {0, 0, 1}, items = {0, 1, 1};
  Csr a = normalized_adjacency(users.data(), items.data(), 3, 2, 2);
  CHECK(a.n_rows == 4 && a.indptr[4] == 6, "adjacency nnz %lld", (long long)a.indptr[4]);
  // user 0 (deg 2) - item 0 (deg 1): 1/sqrt(2)
  CHECK(a.indices[0] == 2 && close(a.data[0], 1.f / std::sqrt(2.f), 1e-6f), "adjacency value");
}

// pool_select against pool() over the taken bags: bit-identical rows at their dest, other rows untouched,
// for every storage type, int32 and int64 ids, with and without weights, empty bags, repeated bags, 1 and
// 2 threads; then every error, each leaving out as it was.
template <class Index>
static void pool_select_case(const TableView& t, std::mt19937& g, int64_t n_bags, int64_t n_select, bool weighted,
                             int num_threads, const char* what) {
  const int64_t d = t.dim;
  std::uniform_int_distribution<int> len(0, 5);
  std::vector<int64_t> offs = {0};
  for (int64_t b = 0; b < n_bags; ++b) offs.push_back(offs.back() + (b % 7 == 3 ? 0 : len(g)));
  const int64_t n = offs.back();
  std::vector<Index> idx(static_cast<size_t>(n));
  for (auto& v : idx) v = static_cast<Index>(g() % static_cast<uint64_t>(t.rows));
  std::vector<float> w = randn(g, static_cast<size_t>(n));
  const float* wp = weighted ? w.data() : nullptr;
  const int64_t n_out = n_select + 9;
  std::vector<int64_t> bags(static_cast<size_t>(n_select)), perm(static_cast<size_t>(n_out));
  for (auto& b : bags) b = static_cast<int64_t>(g() % static_cast<uint64_t>(n_bags));
  if (n_select > 3) bags[1] = bags[0];  // a repeated bag
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), g);
  std::vector<int64_t> dest(perm.begin(), perm.begin() + n_select);
  // the reference: the taken bags pooled by pool()
  std::vector<Index> tidx;
  std::vector<float> tw;
  std::vector<int64_t> toffs = {0};
  for (int64_t b : bags) {
    for (int64_t j = offs[b]; j < offs[b + 1]; ++j) {
      tidx.push_back(idx[j]);
      tw.push_back(w[j]);
    }
    toffs.push_back(static_cast<int64_t>(tidx.size()));
  }
  std::vector<float> ref(static_cast<size_t>(n_select * d));
  pool(t, tidx.data(), static_cast<int64_t>(tidx.size()), toffs.data(), n_select, weighted ? tw.data() : nullptr,
       PoolMode::sum, ref.data(), 1);
  const float sentinel = 7.25f;
  std::vector<float> out(static_cast<size_t>(n_out * d), sentinel);
  pool_select(t, idx.data(), n, offs.data(), n_bags, wp, bags.data(), dest.data(), n_select, out.data(), n_out,
              num_threads);
  std::vector<bool> named(static_cast<size_t>(n_out));
  for (int64_t i = 0; i < n_select; ++i) {
    named[dest[i]] = true;
    CHECK(std::memcmp(out.data() + dest[i] * d, ref.data() + i * d, sizeof(float) * d) == 0,
          "%s pool_select %s d=%lld n_select=%lld weighted=%d threads=%d: row %lld differs from pool", k::active().name,
          what, (long long)d, (long long)n_select, (int)weighted, num_threads, (long long)i);
  }
  for (int64_t r = 0; r < n_out; ++r)
    if (!named[r])
      for (int64_t c = 0; c < d; ++c)
        CHECK(out[r * d + c] == sentinel, "%s pool_select %s: row %lld not in dest was written", k::active().name,
              what, (long long)r);

  // with a second table (float32, dim 3) in the same call: each output equals its own single-table call
  {
    const int64_t d2 = 3;
    std::vector<float> v2 = randn(g, static_cast<size_t>(t.rows * d2));
    const TableView t2{StorageType::float32, v2.data(), t.rows, d2, nullptr};
    std::vector<float> both(out.size(), sentinel), both2(static_cast<size_t>(n_out * d2), sentinel),
        alone2(static_cast<size_t>(n_out * d2), sentinel);
    pool_select(t, idx.data(), n, offs.data(), n_bags, wp, bags.data(), dest.data(), n_select, both.data(), n_out,
                num_threads, &t2, both2.data());
    pool_select(t2, idx.data(), n, offs.data(), n_bags, wp, bags.data(), dest.data(), n_select, alone2.data(), n_out,
                num_threads);
    CHECK(both == out, "%s pool_select %s with a second table: the first output differs", k::active().name, what);
    CHECK(both2 == alone2, "%s pool_select %s: the second table's output differs from its own call",
          k::active().name, what);
  }

  // errors: each one thrown before anything is written
  if (n_select < 4) return;
  auto expect = [&](auto exc_tag, auto&& mutate, const char* err, bool with_weights = false) {
    using Exc = decltype(exc_tag);
    auto idx2 = idx;
    auto offs2 = offs;
    auto w2 = w;
    auto bags2 = bags;
    auto dest2 = dest;
    mutate(idx2, offs2, w2, bags2, dest2);
    std::vector<float> o(static_cast<size_t>(n_out * d), sentinel);
    bool threw = false;
    try {
      pool_select(t, idx2.data(), n, offs2.data(), n_bags, weighted || with_weights ? w2.data() : nullptr,
                  bags2.data(), dest2.data(), n_select, o.data(), n_out, num_threads);
    } catch (const Exc&) {
      threw = true;
    } catch (...) {
    }
    CHECK(threw, "%s pool_select %s: %s must throw the documented exception", k::active().name, what, err);
    bool same = true;
    for (float v : o) same = same && v == sentinel;
    CHECK(same, "%s pool_select %s: %s wrote to out before throwing", k::active().name, what, err);
  };
  using V = std::vector<Index>;
  using O = std::vector<int64_t>;
  using W = std::vector<float>;
  const int64_t last = n_select - 1;
  expect(std::out_of_range(""), [&](V&, O&, W&, O& b, O&) { b[last] = n_bags; }, "bag == n_bags");
  expect(std::out_of_range(""), [&](V&, O&, W&, O& b, O&) { b[last] = -1; }, "bag -1");
  expect(std::out_of_range(""), [&](V&, O&, W&, O&, O& de) { de[last] = n_out; }, "dest == n_out");
  expect(std::out_of_range(""), [&](V&, O&, W&, O&, O& de) { de[last] = -1; }, "dest -1");
  expect(std::invalid_argument(""), [&](V&, O&, W&, O&, O& de) { de[last] = de[0]; }, "a repeated dest");
  // a selected bag with at least one id, for the per-id errors
  int64_t pos = -1;
  for (int64_t i = n_select - 1; i >= 0 && pos < 0; --i)
    if (offs[bags[i] + 1] > offs[bags[i]]) pos = i;
  if (pos < 0) return;
  const int64_t b = bags[pos], j = offs[b + 1] - 1;
  expect(std::out_of_range(""), [&](V& ix, O&, W&, O&, O&) { ix[j] = static_cast<Index>(t.rows); }, "id == rows");
  expect(std::out_of_range(""), [&](V& ix, O&, W&, O&, O&) { ix[j] = static_cast<Index>(-1); }, "id -1");
  expect(std::invalid_argument(""), [&](V&, O& of, W&, O&, O&) { of[b + 1] = of[b] - 1; }, "decreasing offsets");
  expect(std::invalid_argument(""), [&](V&, O& of, W&, O&, O&) { of[b + 1] = n + 1; }, "an offset past the ids");
  expect(std::invalid_argument(""), [&](V&, O& of, W&, O&, O&) { of[b] = -1; }, "a negative offset");
  expect(std::invalid_argument(""), [&](V&, O&, W& ww, O&, O&) { ww[j] = std::numeric_limits<float>::quiet_NaN(); },
         "a NaN weight", true);
  expect(std::invalid_argument(""), [&](V&, O&, W& ww, O&, O&) { ww[j] = -std::numeric_limits<float>::infinity(); },
         "an infinite weight", true);
}

static void test_pool_select() {
  std::mt19937 g(17);
  for (int64_t d : {1, 7, 16, 33, 100}) {
    const int64_t rows = 300;
    auto vals = randn(g, rows * d);
    std::vector<uint16_t> h(vals.size());
    std::vector<uint8_t> c(vals.size());
    for (size_t i = 0; i < vals.size(); ++i) {
      h[i] = float_to_half(vals[i]);
      c[i] = static_cast<uint8_t>(g() & 0xff);
    }
    auto sb = randn(g, rows * 2);
    const TableView tables[] = {{StorageType::float32, vals.data(), rows, d, nullptr},
                                {StorageType::float16, h.data(), rows, d, nullptr},
                                {StorageType::int8_rowwise, c.data(), rows, d, sb.data()}};
    const char* names[] = {"f32", "f16", "int8"};
    for (int s = 0; s < 3; ++s)
      for (int64_t n_select : {0, 1, 5, 63, 64, 65, 300})
        for (bool weighted : {false, true}) {
          pool_select_case<int32_t>(tables[s], g, 200, n_select, weighted, 1, names[s]);
          pool_select_case<int64_t>(tables[s], g, 200, n_select, weighted, 1, names[s]);
        }
    // large enough for the parallel path (2 threads), and the same with 1
    for (int s = 0; s < 3; ++s)
      for (int nt : {1, 2}) {
        pool_select_case<int32_t>(tables[s], g, 20000, 6000, true, nt, names[s]);
        pool_select_case<int64_t>(tables[s], g, 20000, 6000, false, nt, names[s]);
      }
  }
  // the size checks
  float x = 0.f, o = 0.f;
  int64_t offs[2] = {0, 0}, bag = 0, dst = 0;
  int32_t id = 0;
  TableView t{StorageType::float32, &x, 1, 1, nullptr};
  bool threw = false;
  try {
    pool_select(t, &id, 0, offs, 1, nullptr, &bag, &dst, -1, &o, 1);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "pool_select: a negative n_select must throw std::invalid_argument");
  pool_select(t, &id, 0, offs, 1, nullptr, &bag, &dst, 1, &o, 1);  // one empty bag: zeros
  CHECK(o == 0.f, "pool_select: an empty bag gives zeros");
}

static void test_key_index() {
  std::mt19937_64 g(5);
  // integer keys spread over int64, found one by one and in batches; absent keys give -1
  std::vector<int64_t> keys(5000);
  for (auto& x : keys) x = static_cast<int64_t>(g());
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  std::shuffle(keys.begin(), keys.end(), g);
  const int64_t n = static_cast<int64_t>(keys.size());
  KeyIndex ints = KeyIndex::from_ints(keys.data(), n);
  std::vector<int64_t> probes(keys.begin(), keys.end()), out(keys.size() + 3);
  probes.push_back(INT64_MIN);
  probes.push_back(42);
  probes.push_back(-1);
  ints.find_many(probes.data(), static_cast<int64_t>(probes.size()), out.data());
  for (int64_t i = 0; i < n; ++i) CHECK(out[i] == i && ints.find(keys[i]) == i, "int key %lld", (long long)i);
  for (size_t i = keys.size(); i < probes.size(); ++i) {
    const int64_t at = std::find(keys.begin(), keys.end(), probes[i]) - keys.begin();
    CHECK(out[i] == (at < n ? at : -1), "probe %lld", (long long)probes[i]);
  }
  CHECK(ints.find(std::string_view("x")) == -1, "a string in an int index is absent");
  // string keys, including the empty one and bytes that are not ASCII
  std::vector<std::string> strs = {"", "a", "007", "7", "caf\xc3\xa9", "sku-1837", std::string(100, 'z')};
  for (int i = 0; i < 300; ++i) strs.push_back("k" + std::to_string(i * 7919));
  std::string blob;
  std::vector<int64_t> offs = {0};
  for (const auto& s : strs) {
    blob += s;
    offs.push_back(static_cast<int64_t>(blob.size()));
  }
  const int64_t m = static_cast<int64_t>(strs.size());
  KeyIndex si = KeyIndex::from_strings(blob.data(), offs.data(), m);
  std::vector<std::string_view> views(strs.begin(), strs.end());
  views.push_back("07");
  views.push_back("k1");
  std::vector<int64_t> sout(views.size());
  si.find_many(views.data(), static_cast<int64_t>(views.size()), sout.data());
  for (int64_t i = 0; i < m; ++i) CHECK(sout[i] == i && si.find(views[i]) == i, "string key %lld", (long long)i);
  CHECK(sout[m] == -1 && sout[m + 1] == -1, "absent strings");
  CHECK(si.string_at(2) == "007", "string_at");
  // duplicates are refused, naming both positions
  std::vector<int64_t> dup = {3, 9, 3};
  bool thrown = false;
  try {
    KeyIndex::from_ints(dup.data(), 3);
  } catch (const DuplicateKey& e) {
    thrown = e.first == 0 && e.second == 2;
  }
  CHECK(thrown, "duplicate int keys");
}

// DenseNet at every level against a double recomputation (fields in a run and scattered, hidden sizes off the
// 80-output panels, 1 to 41 rows), and its refusals.
static void test_dense_net() {
  std::mt19937 g(11);
  struct Case {
    int64_t F, d;
    std::vector<int64_t> var, hidden;
    bool fm;
  };
  for (const Case& c : {Case{6, 16, {2, 3, 4}, {81, 20}, true}, Case{5, 7, {4, 0}, {9}, false},
                        Case{3, 33, {0, 1, 2}, {160, 1}, true}}) {
    std::vector<DenseLayer> layers;
    int64_t in = static_cast<int64_t>(c.var.size()) * c.d;
    std::vector<int64_t> outs = c.hidden;
    outs.push_back(1);
    for (size_t l = 0; l < outs.size(); ++l) {
      DenseLayer L;
      L.in = in;
      L.out = outs[l];
      L.weight = randn(g, static_cast<size_t>(L.in * L.out));
      for (float& w : L.weight) w *= 0.2f;
      if (l > 0) L.bias = randn(g, static_cast<size_t>(L.out));
      layers.push_back(L);
      in = L.out;
    }
    const DenseNet net(c.F, c.d, c.var, layers, 0.25f, 0.5f, c.fm);
    for (int64_t rows : {1, 4, 5, 6, 41}) {
      auto emb = randn(g, static_cast<size_t>(rows * c.F * c.d)), lin = randn(g, static_cast<size_t>(rows * c.F));
      auto fb = randn(g, static_cast<size_t>(c.hidden[0]));
      std::vector<float> out(static_cast<size_t>(rows));
      net.forward(emb.data(), lin.data(), rows, fb.data(), out.data());
      for (int64_t r = 0; r < rows; ++r) {
        const float* e = emb.data() + r * c.F * c.d;
        double logit = 0.25;
        for (int64_t f = 0; f < c.F; ++f) logit += lin[static_cast<size_t>(r * c.F + f)];
        if (c.fm) {
          double fm = 0;
          for (int64_t t = 0; t < c.d; ++t) {
            double s = 0, q = 0;
            for (int64_t f = 0; f < c.F; ++f) {
              s += e[f * c.d + t];
              q += double(e[f * c.d + t]) * e[f * c.d + t];
            }
            fm += s * s - q;
          }
          logit += 0.5 * fm;
        }
        std::vector<double> h;
        for (int64_t f : c.var)
          for (int64_t t = 0; t < c.d; ++t) h.push_back(e[f * c.d + t]);
        for (size_t l = 0; l < layers.size(); ++l) {
          std::vector<double> nx(static_cast<size_t>(layers[l].out));
          for (int64_t o = 0; o < layers[l].out; ++o) {
            double acc = l == 0 ? fb[static_cast<size_t>(o)] : layers[l].bias[static_cast<size_t>(o)];
            for (int64_t i = 0; i < layers[l].in; ++i)
              acc += h[static_cast<size_t>(i)] * layers[l].weight[static_cast<size_t>(o * layers[l].in + i)];
            nx[static_cast<size_t>(o)] = l + 1 < layers.size() ? std::max(acc, 0.0) : acc;
          }
          h = nx;
        }
        logit += h[0];
        CHECK(std::fabs(out[static_cast<size_t>(r)] - logit) <= 1e-4 * std::max(1.0, std::fabs(logit)),
              "%s DenseNet rows=%lld r=%lld: %g vs %g", simd_level_name(simd_level()), (long long)rows, (long long)r,
              out[static_cast<size_t>(r)], logit);
      }
    }
  }
  bool threw = false;
  try {
    DenseNet bad(3, 2, {0, 5}, {}, 0.f, 0.f, false);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "DenseNet takes a field past n_fields");
}

int main() {
  test_half_conversion();
  test_key_index();
  test_stream_f32();
  test_reduced_scans();
  for (SimdLevel level : supported_simd_levels()) {
    set_simd_level(level);
    const k::KernelTable& t = k::active();
    std::printf("testing kernel table %s\n", t.name);
    test_table(t);
    test_topk_api();
    test_topk_small_batches();
    test_pool_and_graph_api();
    test_pool_select();
    test_dense_net();
  }
  std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "OK", g_failures);
  return g_failures ? 1 : 0;
}
