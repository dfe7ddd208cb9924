// Subnormal floats (below 1.2e-38) flushed to zero, on every thread that computes.
//
// x86 multiplies and adds them through a microcode assist, some 100x slower than normal
// floats. Decays multiply them into being: the hybrid generation's delta rule raises
// exp(-50)-a-token decays to a chunk's powers, and a 128-token prompt's layer took 19 ms
// there against 9 with them flushed (Intel Xeon, 2 threads). Flushed, a value below
// 1.2e-38 becomes 0, far below float32's resolution of what it is added to: the outputs
// differ from the reference's by nothing its tolerances see. TensorFlow flushes by default.
#include <ATen/Parallel.h>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

void flush_subnormals_here() {
#if defined(__x86_64__) || defined(_M_X64)
  // MXCSR's flush-to-zero (results) and denormals-are-zero (inputs).
  _mm_setcsr(_mm_getcsr() | 0x8040);
#endif
}

void flush_subnormals() {
  flush_subnormals_here();
  // MXCSR is per thread: one turn on each of at::parallel_for's workers, which torch's own
  // operations share (one OpenMP runtime). Threads started later copy it from the thread
  // that starts them.
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [](int64_t, int64_t) { flush_subnormals_here(); });
}
