// hf_fastinfer.kernels.gated_act, CPU path: act(gate) * up of a fused gate/up tensor, rows of a contiguous
// [rows, 2I] tensor, one pass, 16 lanes at a time with a vectorised exp (gated_act.h has the numerics).
#include "gated_act.h"

#include <ATen/EmptyTensor.h>

#include "ops.h"

namespace hf_fastinfer {

#ifdef HF_FASTINFER_AVX512
namespace {

template <typename T>
void gated_act_rows(const T* x, T* out, int64_t rows, int64_t inner, bool gelu) {
  const auto run = [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* gate = x + row * 2 * inner;
      const T* up = gate + inner;
      T* o = out + row * inner;
      for (int64_t i = 0; i < inner; i += 16) {
        const __mmask16 m = tail_mask(inner - i);
        store16(o + i, gated16<T>(load16(gate + i, m), load16(up + i, m), gelu), m);
      }
    }
  };
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(inner, 1));
  if (rows <= grain)
    run(0, rows);  // one token: no thread-pool round trip
  else
    at::parallel_for(0, rows, grain, run);
}

}  // namespace

// Returns None, before any work, unless x is a contiguous float [..., 2I] with I > 0 and the activation is
// "silu" or "gelu_tanh": the Python caller then raises its error (or takes its path for a strided x). The
// checks live here because at one token each Python-level check costs about as much as the kernel.
c10::optional<at::Tensor> gated_act(const at::Tensor& x, const std::string& activation) {
  const auto dtype = x.scalar_type();
  const bool gelu = activation == "gelu_tanh";
  if ((!gelu && activation != "silu") || !(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) ||
      x.dim() < 1 || x.size(-1) == 0 || x.size(-1) % 2 != 0 || !x.is_contiguous())
    return c10::nullopt;
  const int64_t inner = x.size(-1) / 2, rows = x.numel() / (2 * inner);
  c10::SmallVector<int64_t, 6> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = inner;
  // straight to the CPU allocator: the dispatcher's at::empty costs about a microsecond more
  at::Tensor out = at::detail::empty_cpu(out_sizes, dtype, false, c10::nullopt);
  if (dtype == at::kFloat)
    gated_act_rows<float>(x.data_ptr<float>(), out.data_ptr<float>(), rows, inner, gelu);
  else if (dtype == at::kBFloat16)
    gated_act_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, inner, gelu);
  else
    gated_act_rows<c10::Half>(x.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), rows, inner, gelu);
  return out;
}
#endif

}  // namespace hf_fastinfer
