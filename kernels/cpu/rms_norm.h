// RMSNorm of one row (hf_fastinfer.kernels.rms_norm's numerics), shared by the standalone op (rms_norm.cpp)
// and the fused decoder layer.
#pragma once

#include <type_traits>

#include "simd.h"

namespace hf_fastinfer {

// h: the row's n values (T values held as float); w: float32 weight. n = h * rsqrt(mean(h^2) + eps) in fp32,
// then Llama: T(n) * w rounded to T (the weight as the model holds it, dtype T; fp32: n * w), Gemma:
// n * (1 + w) in fp32, rounded to T. Writes T-rounded values to out (float or T; out may be h).
// With AVX-512 the squares are summed in 16 lanes, then across them (each square rounded, as torch's pow then
// mean): a scalar sum is a chain of n dependent adds, ~2,300 cycles a row at the default model's 576, which
// made a prompt's norms a tenth of its time. Summation order differs from torch's either way.
template <typename T, typename O>
inline void rms_norm_row(const float* h, const float* w, O* out, int64_t n, float eps, bool gemma) {
  // float32 / bf16 / fp16 (the standalone op also dispatches double, which keeps the scalar loops)
  constexpr bool vector = !std::is_same<T, double>::value && !std::is_same<O, double>::value;
  float ss = 0.f;
  int64_t d = 0;
#ifdef HF_FASTINFER_AVX512
  if constexpr (vector) {
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= n; d += 16) {
      const __m512 v = _mm512_loadu_ps(h + d);
      acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
    }
    if (d < n) {
      const __m512 v = _mm512_maskz_loadu_ps(tail_mask(n - d), h + d);
      acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
      d = n;
    }
    ss = _mm512_reduce_add_ps(acc);
  }
#endif
  for (; d < n; ++d) ss += h[d] * h[d];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  d = 0;
#ifdef HF_FASTINFER_AVX512
  if constexpr (vector) {
    const T* tag = nullptr;  // round16's dtype
    const __m512 iv = _mm512_set1_ps(inv), one = _mm512_set1_ps(1.0f);
    for (; d < n; d += 16) {
      const __mmask16 m = tail_mask(n - d);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, h + d), iv);
      const __m512 wv = _mm512_maskz_loadu_ps(m, w + d);
      const __m512 r = gemma ? round16(_mm512_mul_ps(v, _mm512_add_ps(one, wv)), tag)
                             : round16(_mm512_mul_ps(round16(v, tag), round16(wv, tag)), tag);
      store16(out + d, r, m);
    }
  }
#endif
  for (; d < n; ++d) {
    const float v = h[d] * inv;
    out[d] = static_cast<O>(gemma ? round_to<T>(v * (1.0f + w[d])) : round_to<T>(round_to<T>(v) * round_to<T>(w[d])));
  }
}

}  // namespace hf_fastinfer
