// Detects the CPU once and holds the kernel table in use.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/kernels.hpp"
#include "rec_engine/simd.hpp"

#if defined(REC_ENGINE_HAVE_X86_KERNELS)
#include <cpuid.h>
#endif
#if defined(REC_ENGINE_OPENMP)
#include <omp.h>
#endif

namespace rec_engine {
namespace {

#if defined(REC_ENGINE_HAVE_X86_KERNELS)
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}
#endif

SimdLevel detect() {
#if defined(REC_ENGINE_HAVE_X86_KERNELS)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return SimdLevel::scalar;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  if (!(osxsave && avx && fma && f16c)) return SimdLevel::scalar;
  const uint64_t xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return SimdLevel::scalar;  // XMM and YMM state saved by the OS
  if (__get_cpuid_max(0, nullptr) < 7) return SimdLevel::scalar;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5);
  if (!avx2) return SimdLevel::scalar;
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;  // opmask, ZMM_Hi256, Hi16_ZMM
  return (avx512 && zmm_state) ? SimdLevel::avx512 : SimdLevel::avx2;
#else
  return SimdLevel::scalar;
#endif
}

const kernels::KernelTable& table_for(SimdLevel level) {
  switch (level) {
#if defined(REC_ENGINE_HAVE_X86_KERNELS)
    case SimdLevel::avx512: return kernels::avx512_table();
    case SimdLevel::avx2: return kernels::avx2_table();
#endif
    default: return kernels::scalar_table();
  }
}

const SimdLevel kBest = detect();

std::string g_env_error;  // set during static initialization only, read-only afterwards

// Static initialization must not throw: a bad REC_ENGINE_SIMD is recorded in g_env_error (the Python
// module refuses to import with that message) and the best level is used.
SimdLevel initial_level() {
  const char* env = std::getenv("REC_ENGINE_SIMD");
  if (env == nullptr || *env == '\0') return kBest;
  const std::string name(env);
  if (name != "scalar" && name != "avx2" && name != "avx512") {
    g_env_error = "REC_ENGINE_SIMD=" + name + ": expected scalar, avx2 or avx512";
    return kBest;
  }
  const SimdLevel wanted = parse_simd_level(name);
  if (static_cast<int>(wanted) > static_cast<int>(kBest)) {
    g_env_error = "REC_ENGINE_SIMD=" + name + ": this CPU supports at most " + simd_level_name(kBest);
    return kBest;
  }
  return wanted;
}

std::atomic<SimdLevel> g_level{initial_level()};
std::atomic<const kernels::KernelTable*> g_table{&table_for(g_level.load())};

}  // namespace

SimdLevel simd_level() { return g_level.load(std::memory_order_acquire); }
SimdLevel best_simd_level() { return kBest; }
const std::string& simd_env_error() { return g_env_error; }

std::vector<SimdLevel> supported_simd_levels() {
  std::vector<SimdLevel> out;
  for (int l = 0; l <= static_cast<int>(kBest); ++l) out.push_back(static_cast<SimdLevel>(l));
  return out;
}

void set_simd_level(SimdLevel level) {
  if (static_cast<int>(level) > static_cast<int>(kBest))
    throw std::invalid_argument(std::string("SIMD level ") + simd_level_name(level) +
                                " is not supported here (best: " + simd_level_name(kBest) + ")");
  g_table.store(&table_for(level), std::memory_order_release);
  g_level.store(level, std::memory_order_release);
}

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::avx512: return "avx512";
    case SimdLevel::avx2: return "avx2";
    default: return "scalar";
  }
}

SimdLevel parse_simd_level(const std::string& name) {
  if (name == "scalar") return SimdLevel::scalar;
  if (name == "avx2") return SimdLevel::avx2;
  if (name == "avx512") return SimdLevel::avx512;
  throw std::invalid_argument("unknown SIMD level '" + name + "' (expected scalar, avx2 or avx512)");
}

bool openmp_enabled() {
#if defined(REC_ENGINE_OPENMP)
  return true;
#else
  return false;
#endif
}

int default_num_threads() {
#if defined(REC_ENGINE_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

namespace kernels {
const KernelTable& active() { return *g_table.load(std::memory_order_acquire); }
}  // namespace kernels

}  // namespace rec_engine
