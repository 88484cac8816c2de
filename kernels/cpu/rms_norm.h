// RMSNorm of one row (hf_fastinfer.kernels.rms_norm's numerics), shared by the standalone op (rms_norm.cpp)
// and the fused decoder layer.
#pragma once

#include "simd.h"

namespace hf_fastinfer {

// h: the row's n values (T values held as float); w: float32 weight. n = h * rsqrt(mean(h^2) + eps) in fp32,
// then Llama: T(n) * w rounded to T (the weight as the model holds it, dtype T; fp32: n * w), Gemma:
// n * (1 + w) in fp32, rounded to T. Writes T-rounded values to out (float or T).
template <typename T, typename O>
inline void rms_norm_row(const float* h, const float* w, O* out, int64_t n, float eps, bool gemma) {
  float ss = 0.f;
  for (int64_t d = 0; d < n; ++d) ss += h[d] * h[d];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t d = 0; d < n; ++d) {
    const float v = h[d] * inv;
    out[d] = static_cast<O>(gemma ? round_to<T>(v * (1.0f + w[d])) : round_to<T>(round_to<T>(v) * round_to<T>(w[d])));
  }
}

}  // namespace hf_fastinfer
