// The Python module of the native kernels (see kernels.h for what each one does).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dense_linear", &dense_linear, "x @ W.T for float32, bfloat16 or half weights");
  m.def("q8_linear", &q8_linear, "x @ W.T for group-wise int8 weights");
  m.def("q4_linear", &q4_linear, "x @ W.T for group-wise int4 weights");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension");
  m.def("qk_norm_rope", &qk_norm_rope, "split qkv, q/k RMSNorm and RoPE, k/v into the cache");
  m.def("decode_attention", &decode_attention, "attention of one query token over the cache");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up projection");
}
