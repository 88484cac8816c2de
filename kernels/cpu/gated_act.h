// The gated activation of hf_fastinfer.kernels.gated_act on 16 lanes, shared by the standalone op
// (gated_act.cpp) and the fused decoder layer: T(T(act(g)) * u) with act computed in fp32 (transformers' MLP
// numerics: the activation rounded to the model dtype T, then the product). SiLU: g / (1 + e^-g); GELU
// (tanh): the same form with 2z for g, since 0.5 * (1 + tanh(z)) = 1 / (1 + e^-2z),
// z = sqrt(2/pi) * (g + 0.044715 g^3) (no cancellation for negative g).
#pragma once

#include "simd.h"

namespace hf_fastinfer {

#ifdef HF_FASTINFER_AVX512
// g, u: 16 values each (already T values); the result before its final rounding to T (store16 or round16 do it)
template <typename T>
inline __m512 gated16(__m512 g, __m512 u, bool gelu) {
  __m512 t = g;  // the argument of the logistic function
  if (gelu) {
    const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
    t = _mm512_mul_ps(_mm512_set1_ps(2.f * 0.7978845608028654f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), g3, g));
  }
  // g / d as g * (1 / d), the reciprocal from the 14-bit estimate and one Newton step (relative error
  // about 2^-27, below fp32 rounding; a division is several times slower); d = inf gives 0, as g / d
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), t)));
  __m512 rcp = _mm512_rcp14_ps(d);
  rcp = _mm512_mask_mul_ps(rcp, _mm512_cmp_ps_mask(d, _mm512_set1_ps(1e30f), _CMP_LT_OQ), rcp,
                           _mm512_fnmadd_ps(d, rcp, _mm512_set1_ps(2.f)));
  const __m512 a = _mm512_mul_ps(g, rcp);
  return _mm512_mul_ps(round16(a, static_cast<const T*>(nullptr)), u);
}
#endif

#ifdef HF_FASTINFER_AVX2
// gated16 in 8 lanes: the same formula, g / d by a division (AVX2's reciprocal estimate has 12 bits, and a
// Newton step from it leaves ~2^-22; the division costs little at a layer's few thousand values)
template <typename T>
inline __m256 gated8(__m256 g, __m256 u, bool gelu) {
  __m256 t = g;
  if (gelu) {
    const __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
    t = _mm256_mul_ps(_mm256_set1_ps(2.f * 0.7978845608028654f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), g3, g));
  }
  const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), t)));
  const __m256 a = _mm256_div_ps(g, d);
  return _mm256_mul_ps(round8(a, static_cast<const T*>(nullptr)), u);
}
#endif

}  // namespace hf_fastinfer
