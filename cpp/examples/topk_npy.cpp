// Loads item vectors and queries from .npy files, runs exact top-k with rec_engine, prints the result.
//   topk_npy items.npy queries.npy [k] [ip|cosine]
// Output: one line per query: "query <q>: <id>:<score> <id>:<score> ..."
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <rec_engine/simd.hpp>
#include <rec_engine/topk.hpp>

#include "npy.hpp"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s items.npy queries.npy [k] [ip|cosine]\n", argv[0]);
    return 2;
  }
  try {
    const NpyMatrix items = read_npy_f32(argv[1]);
    const NpyMatrix queries = read_npy_f32(argv[2]);
    if (items.cols != queries.cols) throw std::invalid_argument("items and queries differ in dimension");
    rec_engine::TopkOptions opt;
    opt.k = argc > 3 ? std::atoll(argv[3]) : 10;
    opt.metric = (argc > 4 && std::string(argv[4]) == "cosine") ? rec_engine::Metric::cosine
                                                               : rec_engine::Metric::inner_product;
    const int64_t width = rec_engine::topk_width(opt.k, items.rows);
    std::vector<int64_t> ids(static_cast<size_t>(queries.rows * width));
    std::vector<float> scores(ids.size());
    rec_engine::topk(queries.data.data(), queries.rows, items.data.data(), items.rows, items.cols, opt,
                     ids.data(), scores.data());
    std::printf("simd %s, %lld items x %lld dims\n", rec_engine::simd_level_name(rec_engine::simd_level()),
                static_cast<long long>(items.rows), static_cast<long long>(items.cols));
    for (int64_t q = 0; q < queries.rows; ++q) {
      std::printf("query %lld:", static_cast<long long>(q));
      for (int64_t r = 0; r < width; ++r)
        std::printf(" %lld:%.6g", static_cast<long long>(ids[q * width + r]), scores[q * width + r]);
      std::printf("\n");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
