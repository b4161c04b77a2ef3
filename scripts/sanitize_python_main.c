/* A python executable whose main program carries the ThreadSanitizer runtime (scripts/sanitize.sh tsan).
 * TSan's runtime cannot be LD_PRELOADed into an uninstrumented python (LLVM 14 on Linux: even /bin/true
 * segfaults that way); linked into the main executable, it can. This file is that executable: it runs
 * the ordinary libpython, which then imports the TSan-instrumented rec_engine._core. */
#include <Python.h>

int main(int argc, char** argv) { return Py_BytesMain(argc, argv); }
