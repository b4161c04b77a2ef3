// Picks the top-k score kernels for the SIMD level in use (portable code: only cpuid here).
#include "rec_engine/simd.hpp"
#include "topk_gemm.hpp"

#if defined(REC_ENGINE_HAVE_X86_KERNELS)
#include <cpuid.h>
#endif

namespace rec_engine::topk_gemm {
namespace {

#if defined(REC_ENGINE_HAVE_X86_KERNELS)
struct Extras {
  bool vnni = false, bf16 = false;
};
Extras detect() {
  Extras e;
  unsigned a, b, c, d;
  if (__get_cpuid_max(0, nullptr) < 7) return e;
  __cpuid_count(7, 0, a, b, c, d);
  e.vnni = c & (1u << 11);
  __cpuid_count(7, 1, a, b, c, d);
  e.bf16 = a & (1u << 5);
  return e;
}
const Extras kExtras = detect();

Table make_avx512() {
  Table t = avx512_table();
  if (!kExtras.vnni) {
    t.score_i8_filter = nullptr;
    t.scan_i8_filter = nullptr;
  }
  if (!kExtras.bf16) {
    t.score_bf16 = nullptr;
    t.scan_bf16_filter = nullptr;
    t.pack_bf16 = nullptr;
  }
  return t;
}
#endif

}  // namespace

const Table* active() {
#if defined(REC_ENGINE_HAVE_X86_KERNELS)
  static const Table avx512 = make_avx512();
  if (simd_level() == SimdLevel::avx512) return &avx512;
#endif
  return nullptr;
}

}  // namespace rec_engine::topk_gemm
