// The Python module of the native kernels (see kernels.h for what each one does).
// pybind11 with torch's Tensor casters, not torch/extension.h (the whole C++ frontend).
#include <torch/csrc/utils/pybind.h>

#include "kernels.h"

namespace {

// The DecoderLayerWeights of a Python list, by address (the list keeps them alive).
std::vector<const DecoderLayerWeights*> layer_weights(const py::list& layers) {
  std::vector<const DecoderLayerWeights*> weights;
  for (const auto& layer : layers) weights.push_back(&layer.cast<const DecoderLayerWeights&>());
  return weights;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::dict limits;
  limits["matrix_column_block"] = kMatrixColumnBlock;
  limits["norm_block"] = kNormBlock;
  limits["swiglu_block"] = kSwigluBlock;
  limits["head_dim_block"] = kHeadDimBlock;
  limits["max_head_dim"] = kMaxHeadDim;
  limits["attention_head_dim_block"] = kAttentionHeadDimBlock;
  limits["paged_block_align"] = kPagedBlockAlign;
  limits["prompt_kernel_rows"] = kPromptKernelRows;
  limits["prompt_sdpa_work"] = kPromptSdpaWork;
  limits["delta_dim_block"] = kDeltaDimBlock;
  limits["max_conv_kernel"] = kMaxConvKernel;
  m.attr("LIMITS") = limits;
  m.def("dense_linear", &dense_linear, "x @ W.T for float32, bfloat16 or half weights");
  m.def("set_native_bf16_gemm", &set_native_bf16_gemm,
        "send bfloat16 products of several rows to torch's GEMM (the CPU has AVX512-BF16)");
  m.def("set_avx512_vnni", &set_avx512_vnni,
        "run integer GEMMs with AVX512-VNNI (the CPU and the OS allow it)");
  m.def("set_avx_vnni", &set_avx_vnni,
        "run integer GEMMs with AVX-VNNI where AVX512-VNNI's kernel does not run");
  m.def("cpu_avx_vnni", &cpu_avx_vnni, "whether the CPU has AVX-VNNI (cpuid)");
  m.def("set_dotprod", &set_dotprod,
        "run integer products with ARM's dot-product instruction (an ARM build; elsewhere nothing)");
  m.def("set_i8mm", &set_i8mm,
        "run integer GEMMs with ARM's int8 matrix multiply (an ARM build; elsewhere nothing)");
  m.def("flush_subnormals", &flush_subnormals,
        "flush subnormal floats to zero on this thread and the parallel workers (x86)");
  m.def("set_amx_int8", &set_amx_int8,
        "run Q4_0 products of several rows with AMX-INT8 tiles (the CPU and the OS allow it)");
  m.def("set_avx512_attention", &set_avx512_attention,
        "run attention over bfloat16 and int8 caches with AVX-512 (the CPU and the OS allow it)");
  m.def("set_integer_scores", &set_integer_scores,
        "score int8 caches in integer products (AVX512-VNNI where AVX-512 attention runs)");
  m.def("set_avx512_rows", &set_avx512_rows,
        "run RMSNorm, q/k norm with RoPE and SwiGLU with AVX-512 (the CPU and the OS allow it)");
  m.def("set_avx512_products", &set_avx512_products,
        "run one-row products of float weights with AVX-512 (the CPU and the OS allow it)");
  m.def("q8_linear", &q8_linear, "x @ W.T for group-wise int8 weights");
  m.def("q4_linear", &q4_linear, "x @ W.T for group-wise int4 weights");
  m.def("quantize_rows", &quantize_rows, "round-to-nearest int8/int4 codes and group scales");
  m.def("requantize_blocks", &requantize_blocks,
        "GGUF blocks of another type requantized as quantize_rows does (gguf_block_types)");
  m.attr("GGUF_BLOCK_TYPES") = gguf_block_types();
  m.def("split_blocks", &split_blocks, "GGUF blocks' float16 fields and codes apart, in one pass");
  m.def("interleave_rows", &interleave_rows,
        "int8/int4 codes interleaved by 16 rows for the AVX512-VNNI kernel (in place allowed)");
  m.def("interleaved_rows", &interleaved_rows,
        "rows of interleaved int8/int4 codes dequantized (a quantized table's embeddings)");
  m.def("repack_q4_k", &repack_q4_k, "GGUF Q4_K blocks as int4 codes, scales and zeros per 32");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension");
  m.def("qk_norm_rope", &qk_norm_rope, "split qkv, q/k RMSNorm and RoPE, k/v into the cache");
  m.def("dequantize_kv", &dequantize_kv, "an int8 cache's rows [..., width] as values [..., D]");
  m.def("decode_attention", &decode_attention,
        "attention of the last T positions' queries over the cache (causal)");
  m.def("paged_qk_norm_rope", &paged_qk_norm_rope,
        "qk_norm_rope of N rows, each row's k/v into its slot of a paged cache's layer");
  m.def("paged_attention", &paged_attention,
        "attention of N query rows [N, H, D] over their sequences in a paged cache -> [N, H*D]");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up projection");
  m.def("top_k", &top_k, "each row's k largest values and their ids, largest first");
  m.def("gated_delta_step", &gated_delta_step,
        "Gated DeltaNet's decode step between its projections, conv and delta states in place "
        "(row b on slots[b] of the state pools where slots is given)",
        py::arg("proj"), py::arg("conv_weight"), py::arg("conv_state"), py::arg("A"),
        py::arg("dt_bias"), py::arg("norm"), py::arg("state"), py::arg("num_k_heads"),
        py::arg("head_k_dim"), py::arg("head_v_dim"), py::arg("tiled"), py::arg("eps"),
        py::arg("slots") = py::none());
  py::class_<Matrix>(m, "Matrix")
      .def(py::init([](at::Tensor weight, c10::optional<at::Tensor> scales,
                       c10::optional<at::Tensor> zeros, int64_t bits) {
             return Matrix{std::move(weight), std::move(scales), std::move(zeros), bits};
           }),
           py::arg("weight"), py::arg("scales") = py::none(), py::arg("zeros") = py::none(),
           py::arg("bits") = 0);
  m.def("step_order_rows", &step_order_rows,
        "the most rows a product over this matrix adds as a one-row product does");
  py::class_<DecoderLayerWeights>(m, "DecoderLayerWeights")
      .def(py::init<>())
      .def_readwrite("layer", &DecoderLayerWeights::layer)
      .def_readwrite("num_heads", &DecoderLayerWeights::num_heads)
      .def_readwrite("num_kv_heads", &DecoderLayerWeights::num_kv_heads)
      .def_readwrite("eps", &DecoderLayerWeights::eps)
      .def_readwrite("input_norm", &DecoderLayerWeights::input_norm)
      .def_readwrite("post_norm", &DecoderLayerWeights::post_norm)
      .def_readwrite("q_norm", &DecoderLayerWeights::q_norm)
      .def_readwrite("k_norm", &DecoderLayerWeights::k_norm)
      .def_readwrite("qkv", &DecoderLayerWeights::qkv)
      .def_readwrite("o_proj", &DecoderLayerWeights::o_proj)
      .def_readwrite("gate_up", &DecoderLayerWeights::gate_up)
      .def_readwrite("down", &DecoderLayerWeights::down)
      .def_readwrite("router", &DecoderLayerWeights::router)
      .def_readwrite("expert_gate_up", &DecoderLayerWeights::expert_gate_up)
      .def_readwrite("expert_down", &DecoderLayerWeights::expert_down)
      .def_readwrite("top_k", &DecoderLayerWeights::top_k)
      .def_readwrite("norm_topk_prob", &DecoderLayerWeights::norm_topk_prob)
      .def_readwrite("shared_gate_up", &DecoderLayerWeights::shared_gate_up)
      .def_readwrite("shared_down", &DecoderLayerWeights::shared_down)
      .def_readwrite("shared_gate", &DecoderLayerWeights::shared_gate)
      .def_readwrite("gated", &DecoderLayerWeights::gated)
      .def_readwrite("linear", &DecoderLayerWeights::linear)
      .def_readwrite("tiled", &DecoderLayerWeights::tiled)
      .def_readwrite("in_proj", &DecoderLayerWeights::in_proj)
      .def_readwrite("out_proj", &DecoderLayerWeights::out_proj)
      .def_readwrite("conv_weight", &DecoderLayerWeights::conv_weight)
      .def_readwrite("A", &DecoderLayerWeights::A)
      .def_readwrite("dt_bias", &DecoderLayerWeights::dt_bias)
      .def_readwrite("linear_norm", &DecoderLayerWeights::linear_norm)
      .def_readwrite("k_heads", &DecoderLayerWeights::k_heads)
      .def_readwrite("k_dim", &DecoderLayerWeights::k_dim)
      .def_readwrite("v_dim", &DecoderLayerWeights::v_dim)
      .def_readwrite("attention_group", &DecoderLayerWeights::attention_group)
      .def_readwrite("feed_forward_group", &DecoderLayerWeights::feed_forward_group)
      .def_readwrite("expert_first", &DecoderLayerWeights::expert_first);
  m.def("matmul", &matmul, "x @ W.T with the kernel of W's format");
  // The list's items are cast by reference (a std::vector of them would copy every
  // layer's tensors and matrices on every token). Both calls release the GIL: run across
  // processes, a layer's all-reduce queues on gloo's worker thread, which may be freeing
  // an earlier collective's tensors, and that needs the GIL (held here, a deadlock).
  m.def(
      "decode_layers",
      [](at::Tensor x, const py::list& layers, const at::Tensor& cos, const at::Tensor& sin,
         const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t start,
         const c10::optional<at::Tensor>& conv_cache,
         const c10::optional<at::Tensor>& delta_cache) {
        const auto conv = conv_cache.value_or(at::Tensor());
        const auto delta = delta_cache.value_or(at::Tensor());
        const auto weights = layer_weights(layers);
        py::gil_scoped_release released;
        for (const auto* w : weights)
          x = decode_layer(x, *w, cos, sin, k_cache, v_cache, start, conv, delta);
        return x;
      },
      py::arg("x"), py::arg("layers"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"),
      py::arg("v_cache"), py::arg("start"), py::arg("conv_cache") = py::none(),
      py::arg("delta_cache") = py::none(),
      "one decode step of every decoder layer in turn (a list of DecoderLayerWeights), with "
      "the hybrid generation's linear-layer states where it has them");
  m.def(
      "paged_layers",
      [](at::Tensor x, const py::list& layers, const at::Tensor& cos, const at::Tensor& sin,
         const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& positions,
         const at::Tensor& row_seq, const at::Tensor& block_tables, int64_t block_size,
         const c10::optional<at::Tensor>& conv_cache, const c10::optional<at::Tensor>& delta_cache,
         const c10::optional<at::Tensor>& row_states) {
        const auto cache = paged_kv(k_cache, v_cache, positions, row_seq, block_tables, block_size);
        const auto conv = conv_cache.value_or(at::Tensor());
        const auto delta = delta_cache.value_or(at::Tensor());
        const auto states = row_states.value_or(at::Tensor());
        const auto weights = layer_weights(layers);
        // The server's event loop (its other thread) streams replies meanwhile.
        py::gil_scoped_release released;
        for (const auto* w : weights) x = paged_layer(x, *w, cos, sin, cache, conv, delta, states);
        return x;
      },
      py::arg("x"), py::arg("layers"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"),
      py::arg("v_cache"), py::arg("positions"), py::arg("row_seq"), py::arg("block_tables"),
      py::arg("block_size"), py::arg("conv_cache") = py::none(),
      py::arg("delta_cache") = py::none(), py::arg("row_states") = py::none(),
      "every decoder layer in turn over the rows [N, hidden] of several sequences, with a "
      "paged KV cache (a list of DecoderLayerWeights), and the hybrid generation's state "
      "pools and each row's slot in them where it has linear layers");
}
