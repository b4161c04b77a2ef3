"""Process-wide settings of the C++ core: the SIMD level and OpenMP threads."""
from __future__ import annotations

from . import _core


def simd_level() -> str:
    """The instruction set the kernels use now: ``"avx512"``, ``"avx2"`` or ``"scalar"``.

    Chosen once from the CPU's features at import; ``REC_ENGINE_SIMD=scalar|avx2|avx512`` in the
    environment forces a level (an unknown or unsupported value makes the import fail)."""
    return _core.simd_level()


def supported_simd_levels() -> list[str]:
    """The levels this CPU and build support, lowest first (``"scalar"`` always)."""
    return list(_core.supported_simd_levels())


def set_simd_level(level: str) -> None:
    """Switch every kernel to ``level`` for the whole process (mainly for tests and benchmarks).

    Raises ValueError if the level is unknown or the CPU lacks it. Calls already running finish on the
    level they started with."""
    if not isinstance(level, str):
        raise TypeError(f"level must be a str, got {type(level).__name__}")
    _core.set_simd_level(level)


def openmp_enabled() -> bool:
    """Whether the core was built with OpenMP (without it every kernel runs on the calling thread)."""
    return bool(_core.openmp_enabled())


def default_num_threads() -> int:
    """Threads a kernel uses when ``num_threads`` is None: OpenMP's default (``OMP_NUM_THREADS`` or the
    number of cores), 1 without OpenMP. Small calls always run on the calling thread."""
    return int(_core.default_num_threads())
