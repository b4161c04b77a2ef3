// Picks the top-k score kernels for the SIMD level in use (portable code: only cpuid here).
#include "rec_engine/simd.hpp"
#include "topk_gemm.hpp"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(REC_ENGINE_HAVE_X86_KERNELS)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace rec_engine::topk_gemm {
namespace {

#if defined(REC_ENGINE_HAVE_X86_KERNELS)
struct Extras {
  bool vnni = false, bf16 = false, amx_bf16 = false;
};

// AMX-BF16 usable by this process: the CPU has AMX-TILE and AMX-BF16, the OS saves the tile state (XCR0 bits
// 17 and 18) and Linux grants this process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM, once, for every
// thread). REC_ENGINE_AMX=0 in the environment skips it (nothing requested).
bool detect_amx(unsigned edx7) {
#if defined(__linux__) && defined(REC_ENGINE_HAVE_AMX)
  const char* env = std::getenv("REC_ENGINE_AMX");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (!(edx7 & (1u << 22)) || !(edx7 & (1u << 24))) return false;
  unsigned a, b, c, d;
  __cpuid(1, a, b, c, d);
  if (!(c & (1u << 27))) return false;   // OSXSAVE: xgetbv is there
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  (void)edx7;
  return false;
#endif
}

Extras detect() {
  Extras e;
  unsigned a, b, c, d;
  if (__get_cpuid_max(0, nullptr) < 7) return e;
  __cpuid_count(7, 0, a, b, c, d);
  e.vnni = c & (1u << 11);
  const unsigned edx7 = d;
  __cpuid_count(7, 1, a, b, c, d);
  e.bf16 = a & (1u << 5);
  e.amx_bf16 = e.bf16 && detect_amx(edx7);
  return e;
}
const Extras kExtras = detect();
std::atomic<bool> g_amx{kExtras.amx_bf16};

// score_bf16 with the AMX tiles for the queries in whole blocks of 16 and the AVX-512 kernel for the rest
void score_bf16_tiles(const uint16_t* q, int64_t nq, int64_t ldq, const uint16_t* panel, int64_t d2, float* out,
                      int64_t ldo) {
  int64_t done = 0;
#if defined(REC_ENGINE_HAVE_AMX)
  if (g_amx.load(std::memory_order_relaxed) && amx_bf16_takes(nq, d2))
    done = score_bf16_amx(q, nq, ldq, panel, d2, out, ldo);
#endif
  if (done < nq) avx512_table().score_bf16(q + done * ldq, nq - done, ldq, panel, d2, out + done * ldo, ldo);
}

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
  } else if (kExtras.amx_bf16) {
    t.score_bf16 = &score_bf16_tiles;
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

bool amx_available() {
#if defined(REC_ENGINE_HAVE_X86_KERNELS)
  return kExtras.amx_bf16;
#else
  return false;
#endif
}

bool amx_enabled() {
#if defined(REC_ENGINE_HAVE_X86_KERNELS)
  return kExtras.amx_bf16 && g_amx.load() && simd_level() == SimdLevel::avx512;
#else
  return false;
#endif
}

void set_amx(bool on) {
#if defined(REC_ENGINE_HAVE_X86_KERNELS)
  g_amx.store(on && kExtras.amx_bf16);
#else
  (void)on;
#endif
}

}  // namespace rec_engine::topk_gemm
