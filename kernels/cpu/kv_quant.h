// int8 KV-cache quantization of one row (hf_fastinfer.kernels.kv_quant's format), shared by the standalone
// quantize-and-append (kv_quant.cpp) and the fused decoder layer, which writes the new token's K/V itself.
#pragma once

#include "simd.h"

namespace hf_fastinfer {

// x: one (sequence, head, token) row of D values. scale = fp16(max|x| / 127) >= 2^-24, q = round-half-even(x /
// scale) clamped to [-127, 127]; writes the D int8 values and the fp16 scale.
template <typename T>
inline void quantize_kv_row(const T* x, int64_t D, int8_t* q, c10::Half* scale) {
  float absmax = 0.f;
  for (int64_t d = 0; d < D; ++d) absmax = std::max(absmax, std::abs(static_cast<float>(x[d])));
  const c10::Half stored = static_cast<c10::Half>(absmax / 127.0f);
  const float sc = std::max(static_cast<float>(stored), 5.960464477539063e-08f);
  for (int64_t d = 0; d < D; ++d) {
    const float v = std::nearbyint(static_cast<float>(x[d]) / sc);  // default rounding: ties to even
    q[d] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
  }
  *scale = static_cast<c10::Half>(sc);
}

}  // namespace hf_fastinfer
