// The Python module of hf_fastinfer's compiled CPU kernels: bindings only, the ops live one per file beside it.
#include <torch/extension.h>

#include "ops.h"
#include "phases.h"
#include "simd.h"

namespace py = pybind11;
using namespace hf_fastinfer;

#ifdef HF_FASTINFER_PHASES
namespace hf_fastinfer {
namespace phases {
uint64_t counters[kMaxThreads][kCount] = {};
thread_local uint64_t last = 0;
}  // namespace phases
}  // namespace hf_fastinfer
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef HF_FASTINFER_PHASES
  // the profiling build only (phases.h): cycles per [thread][phase] since the last reset, and the phase names
  m.def("phase_cycles", []() {
    std::vector<std::vector<uint64_t>> out(phases::kMaxThreads, std::vector<uint64_t>(phases::kCount));
    for (int t = 0; t < phases::kMaxThreads; ++t)
      for (int p = 0; p < phases::kCount; ++p) out[t][p] = phases::counters[t][p];
    return out;
  });
  m.def("phase_reset", []() {
    for (auto& row : phases::counters)
      for (auto& c : row) c = 0;
  });
  m.def("phase_names", []() { return std::vector<std::string>(phases::kNames, phases::kNames + phases::kCount); });
  m.def("read_tsc", []() { return static_cast<uint64_t>(__rdtsc()); });
#endif
  m.def("simd_road", []() {
#if defined(HF_FASTINFER_AVX512)
    return std::string("avx512");
#elif defined(HF_FASTINFER_AVX2)
    return std::string("avx2");
#else
    return std::string("portable");
#endif
  }, "the hand-vectorised loops this build takes: avx512, avx2 (with FMA) or portable (compiler-vectorised scalar code)");
  m.def("team_size", &team_size, "threads the compiled kernels' parallel regions use (torch.get_num_threads())");
  m.def("quant_gemv", &quant_gemv, "weight-only quantized GEMV for a few activation rows");
  m.def("quant_prefetch_nta", &quant_prefetch_nta,
        "whether the quantized GEMVs prefetch their weights non-temporally (off by default: measured slower or no faster)");
  m.def("set_quant_prefetch_nta", &set_quant_prefetch_nta, py::arg("nta"),
        "override that choice, process-wide (for benchmarks' A/B in one process)");
  m.def("int8_int16_activations", &int8_int16_activations,
        "whether int8 weights meet bf16 activations held as int16 per group (integer products; on by default)");
  m.def("set_int8_int16_activations", &set_int8_int16_activations, py::arg("on"),
        "turn that road off or on, process-wide (for benchmarks' A/B in one process)");
  m.def("int4_int16_activations", &int4_int16_activations,
        "whether int4 weights meet bf16 activations held as int16 per group (integer products; on by default)");
  m.def("set_int4_int16_activations", &set_int4_int16_activations, py::arg("on"),
        "turn that road off or on, process-wide (for benchmarks' A/B in one process)");
  m.def("quant_prefetch_two_level", &quant_prefetch_two_level,
        "whether the GEMVs' prefetches that are not non-temporal go into L2 far ahead and into L1 near (on by default)");
  m.def("set_quant_prefetch_two_level", &set_quant_prefetch_two_level, py::arg("on"),
        "turn that off (prefetch into L1 alone) or on, process-wide (for benchmarks' A/B in one process)");
  m.def("int8_group_pairs", &int8_group_pairs,
        "whether int8 group-32 weights against int16 activations take two groups per product vector (on by default)");
  m.def("set_int8_group_pairs", &set_int8_group_pairs, py::arg("on"),
        "turn that road off or on, process-wide (for benchmarks' A/B in one process)");
  m.def("int4_byte_products", &int4_byte_products,
        "whether int4 group-32 weights against int16 activations on AVX-512 VNNI multiply the nibbles by x's bytes "
        "(vpdpbusd; on by default) or by its int16 values (vpdpwssd): the same integer sums");
  m.def("set_int4_byte_products", &set_int4_byte_products, py::arg("on"),
        "turn that road off or on, process-wide (for benchmarks' A/B in one process)");
  m.def("bf16_dot_products", &bf16_dot_products,
        "whether bf16 weights meet the activations through AVX512-BF16 dot products (on where the CPU has them)");
  m.def("set_bf16_dot_products", &set_bf16_dot_products, py::arg("on"),
        "turn that road off or on, process-wide (for benchmarks' A/B in one process)");
  m.def("dense_gemv", &dense_gemv, "float-weight GEMV for a few activation rows");
  m.def("prefill_linear", &prefill_linear, py::call_guard<py::gil_scoped_release>(),
        "many-row product with a float or quantized weight: the weight in fp32, then oneDNN's linear (onednn) or "
        "BLAS; or, bf16 x with native_bf16, the weight in bf16 and one bf16 GEMM",
        py::arg("x"), py::arg("weight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"), py::arg("bits"),
        py::arg("group_size"), py::arg("in_features"), py::arg("native_bf16") = false, py::arg("onednn") = false);
#if defined(HF_FASTINFER_AVX512) || defined(HF_FASTINFER_AVX2)
  m.def("prefill_attention", &prefill_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"),
        py::arg("scaling"), py::arg("causal"), py::call_guard<py::gil_scoped_release>(),
        "attention for many query tokens (prompts): causal, full or bool-masked, grouped KV heads unexpanded");
#endif
  m.def("rms_norm", &rms_norm, "RMSNorm with an optional fused residual add");
  m.def("kv_append", &kv_append, "int8 KV-cache quantize-and-append at given slots");
  m.def("rotary", &rotary, "rotary embedding of q and k (in place when the outputs are the inputs)");
  m.def("rotary_model", &rotary_model, "rotary embedding of q and k in the model's dtype arithmetic (prompts)",
        py::arg("q"), py::arg("k"), py::arg("cos"), py::arg("sin"), py::arg("rotary_dim"));
#ifdef HF_FASTINFER_AVX512
  m.def("gated_act", &gated_act, "act(gate) * up of a fused gate/up tensor (SiLU or GELU-tanh)");
#endif
  py::class_<Projection>(m, "Projection")
      .def(py::init<at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>, int64_t,
                    int64_t, int64_t>(),
           py::arg("weight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"), py::arg("bits"),
           py::arg("group_size"), py::arg("in_features"))
      .def_property_readonly("in_features", &Projection::in_features)
      .def_property_readonly("out_features", &Projection::out_features)
      .def_property_readonly("bits", &Projection::bits)
      .def_property_readonly("nbytes", &Projection::nbytes);
  py::class_<DecodeHead>(m, "DecodeHead")
      .def(py::init<at::Tensor, double, bool, Projection, c10::ScalarType>(), py::arg("norm_weight"), py::arg("eps"),
           py::arg("gemma_norm"), py::arg("proj"), py::arg("dtype"));
  // The two calls release the GIL: other Python threads (a streamer's consumer, a notebook's UI) run meanwhile.
  py::class_<DecoderLayer>(m, "DecoderLayer")
      .def(py::init<at::Tensor, c10::optional<at::Tensor>, double, bool, std::vector<Projection>, Projection,
                    std::vector<Projection>, c10::optional<Projection>, c10::optional<at::Tensor>,
                    c10::optional<at::Tensor>, double, int64_t, int64_t, int64_t, int64_t, double, double,
                    const std::string&, c10::ScalarType>(),
           py::arg("input_norm"), py::arg("post_attention_norm"), py::arg("eps"), py::arg("gemma_norm"), py::arg("qkv"),
           py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("q_norm"), py::arg("k_norm"), py::arg("qk_eps"),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("rotary_dim"),
           py::arg("scaling"), py::arg("softcap"), py::arg("activation"), py::arg("dtype"))
      .def("attn_in", &DecoderLayer::attn_in, py::call_guard<py::gil_scoped_release>())
      .def("attn_out_mlp", &DecoderLayer::attn_out_mlp, py::arg("hidden"), py::arg("q"), py::arg("k"), py::arg("v"),
           py::arg("keys"), py::arg("values"), py::arg("k_scale"), py::arg("v_scale"), py::arg("mask"),
           py::arg("slot") = -1, py::arg("attend_len") = 0, py::arg("next_layer") = nullptr,
           py::arg("next_cos") = py::none(), py::arg("next_sin") = py::none(), py::call_guard<py::gil_scoped_release>())
      .def("decode_chain", &DecoderLayer::decode_chain, py::arg("chain"), py::arg("hidden"), py::arg("q"), py::arg("k"),
           py::arg("v"), py::arg("keys"), py::arg("values"), py::arg("k_scales"), py::arg("v_scales"), py::arg("slots"),
           py::arg("attend_lens"), py::arg("mask"), py::arg("cos"), py::arg("sin"), py::arg("next_layer") = nullptr,
           py::arg("head") = nullptr, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("weight_bytes", &DecoderLayer::weight_bytes);
  // (holds raw pointers to the layers and the head: the Python caller keeps those objects alive)
  py::class_<DecodePlan>(m, "DecodePlan")
      .def(py::init<std::vector<const DecoderLayer*>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<c10::optional<at::Tensor>>, std::vector<c10::optional<at::Tensor>>, const DecodeHead*>(),
           py::arg("layers"), py::arg("keys"), py::arg("values"), py::arg("k_scales"), py::arg("v_scales"),
           py::arg("head") = nullptr)
      .def("run", &DecodePlan::run, py::arg("hidden"), py::arg("cos"), py::arg("sin"), py::arg("mask"),
           py::arg("slot"), py::arg("attend_len"), py::call_guard<py::gil_scoped_release>());
}
