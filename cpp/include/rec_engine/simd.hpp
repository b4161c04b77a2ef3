// Instruction-set level used by the kernels. The CPU is probed once (cpuid plus the OS check that the
// wide registers are saved); REC_ENGINE_SIMD=scalar|avx2|avx512 in the environment forces a level.
#pragma once
#include <string>
#include <vector>

namespace rec_engine {

enum class SimdLevel { scalar = 0, avx2 = 1, avx512 = 2 };

// The level every kernel call uses now.
SimdLevel simd_level();
// The best level this CPU (and this build) supports.
SimdLevel best_simd_level();
// All levels this CPU supports, lowest first.
std::vector<SimdLevel> supported_simd_levels();
// Switch the level for the whole process (thread-safe; calls already running finish on the old one).
// Throws std::invalid_argument when the CPU or the build lacks it.
void set_simd_level(SimdLevel level);

// Non-empty when REC_ENGINE_SIMD held a value that could not be honoured (the best level is used).
const std::string& simd_env_error();

const char* simd_level_name(SimdLevel level);
// "scalar", "avx2" or "avx512"; throws std::invalid_argument otherwise.
SimdLevel parse_simd_level(const std::string& name);

// Whether the library was built with OpenMP, and the thread count a call with num_threads <= 0 uses.
bool openmp_enabled();
int default_num_threads();

}  // namespace rec_engine
