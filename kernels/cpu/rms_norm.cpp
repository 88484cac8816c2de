// hf_fastinfer.kernels.rms_norm, CPU path.
#include "ops.h"
#include "rms_norm.h"

namespace hf_fastinfer {

// RMSNorm with the fused residual add, rows of a contiguous [N, hidden]: h = x + r rounded to T (written to
// res_out), then rms_norm_row (rms_norm.h).
namespace {

template <typename T>
void rms_norm_rows(const T* x, const T* r, const float* w, T* out, T* res_out, int64_t rows, int64_t hidden, double eps,
                   bool gemma) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> h(hidden);
    for (int64_t row = begin; row < end; ++row) {
      const T* xr = x + row * hidden;
      int64_t d = 0;
#ifdef HF_FASTINFER_AVX512
      if constexpr (!std::is_same<T, double>::value)
      for (; d < hidden; d += 16) {
        const __mmask16 m = tail_mask(hidden - d);
        __m512 v = load16(xr + d, m);
        if (r) v = round16(_mm512_add_ps(v, load16(r + row * hidden + d, m)), xr);
        if (res_out) store16(res_out + row * hidden + d, v, m);
        _mm512_mask_storeu_ps(h.data() + d, m, v);
      }
#endif
      for (; d < hidden; ++d) {
        T v = r ? static_cast<T>(static_cast<float>(xr[d]) + static_cast<float>(r[row * hidden + d])) : xr[d];
        if (res_out) res_out[row * hidden + d] = v;
        h[d] = static_cast<float>(v);
      }
      rms_norm_row<T>(h.data(), w, out + row * hidden, hidden, static_cast<float>(eps), gemma);
    }
  });
}

}  // namespace

std::vector<at::Tensor> rms_norm(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> residual,
                                    double eps, bool gemma) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "contiguous x and weight");
  const int64_t hidden = x.size(-1), rows = x.numel() / std::max<int64_t>(hidden, 1);
  auto w = weight.to(at::kFloat).contiguous();
  auto out = at::empty_like(x);
  at::Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(residual->is_contiguous() && residual->scalar_type() == x.scalar_type(), "contiguous residual of x's dtype");
    res = at::empty_like(x);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr,
                            w.data_ptr<float>(), out.data_ptr<scalar_t>(),
                            residual.has_value() ? res.data_ptr<scalar_t>() : nullptr, rows, hidden, eps, gemma);
  });
  return {out, res};
}

}  // namespace hf_fastinfer
