// Shared by hf_fastinfer's compiled CPU kernels (one op per .cpp file beside this header, one extension
// built from all of them by kernels/_cpu_ext.py): scalar conversions, AVX-512 loads and stores of float32 /
// bfloat16 / float16 as float32, rounding to a model dtype, a vectorised exp (the same in 8 lanes for CPUs with
// AVX2 and FMA but no AVX-512), and the team of threads a kernel runs on.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__) || defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HF_FASTINFER_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
// CPUs without AVX-512 (AMD Zen 2 / 3, older Intel): the kernels that have an 8-lane road take it
#define HF_FASTINFER_AVX2 1
#endif
#if defined(HF_FASTINFER_AVX512) && defined(__AVX512VNNI__)
#define HF_FASTINFER_A16 1
#endif

namespace hf_fastinfer {

// Scales and zeros (float32 or float16) as float32. F16C converts fp16 in one instruction where the CPU has
// it (c10::Half's portable conversion is a dozen integer operations, paid once per group and row).
inline float to_f32(float v) { return v; }
inline float to_f32(c10::Half v) {
#if defined(__F16C__)
  return _cvtsh_ss(v.x);
#else
  return static_cast<float>(v);
#endif
}
inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }

// v rounded to the model dtype T and back to float (round to nearest even, as torch does): the model rounds
// every op's output to its dtype, and the fused kernels round at the same points so that they compute what
// the model computes.
template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}
template <>
inline float round_to<float>(float v) {
  return v;
}

// Each thread's share [begin, end) of n items split into chunks of `align` (the last thread takes the rest).
inline void thread_share(int64_t n, int64_t align, int tid, int nthreads, int64_t& begin, int64_t& end) {
  const int64_t units = (n + align - 1) / align;
  const int64_t per = units / nthreads, extra = units % nthreads;
  const int64_t u0 = tid * per + std::min<int64_t>(tid, extra);
  const int64_t u1 = u0 + per + (tid < extra ? 1 : 0);
  begin = std::min(n, u0 * align);
  end = std::min(n, u1 * align);
}

// The number of threads a kernel's parallel region uses: torch's intra-op setting (torch.set_num_threads),
// so that the fused kernels follow what the user chose for torch itself.
inline int team_size() { return std::max(1, at::get_num_threads()); }

#ifdef HF_FASTINFER_AVX512

// the lanes of a 16-wide chunk that hold one of the n values left (all 16 when n >= 16)
inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// Loads and stores of 16 values of T as float32 (bf16 and fp16 rounded to nearest even, as torch does).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
// float -> bf16 bits in the high half of each lane, rounded to nearest even. NaN needs no special case here:
// the only NaNs these kernels see carry a bf16 input's payload (low 16 bits zero) or are the default NaN, and
// adding 0x7FFF to those leaves them NaN.
inline __m512i bf16_round(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                          _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
}
inline __m256i bf16_bits(__m512 v) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_round(v), 16)); }
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(c10::Half* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, bf16_bits(v)); }
// 16 values rounded to T and back (the vector form of round_to)
inline __m512 round16(__m512 v, const float*) { return v; }
inline __m512 round16(__m512 v, const c10::Half*) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline __m512 round16(__m512 v, const c10::BFloat16*) { return _mm512_castsi512_ps(bf16_round(v)); }

// a · b over n floats, 16 lanes at a time (a scalar loop here is a chain of dependent FMAs)
inline float dot16(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// e^x for 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r (the classic single-
// precision minimax coefficients, about 1 ulp), then 2^n by vscalefps, which overflows to inf and underflows
// to 0 as e^x does. x is clamped to +-100 (e^x is inf / 0 there already) so that r stays small and
// +-inf gives no NaN; NaN x gives a finite value, and callers propagate NaN inputs themselves.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(100.f)), _mm512_set1_ps(-100.f));
  // n = round(x log2 e): adding 1.5 * 2^23 leaves no fraction bits, so the FMA itself rounds to nearest
  const __m512 shifter = _mm512_set1_ps(12582912.f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shifter), shifter);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n * hi
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

#endif  // HF_FASTINFER_AVX512

#ifdef HF_FASTINFER_AVX2

// The 8-lane forms of the AVX-512 helpers above, for the kernels' AVX2 + FMA roads. AVX2 has no masked loads
// of 8- or 16-bit elements, so these take whole 8s: the callers take a row's last values one by one.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
// int8 values (the int8 KV cache) as float, before their scale
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
// 8 values rounded to T and back (round16's form; bf16 to nearest even by the same integer trick)
inline __m256 round8(__m256 v, const float*) { return v; }
inline __m256 round8(__m256 v, const c10::Half*) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline __m256 round8(__m256 v, const c10::BFloat16*) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))),
                                              _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
// 8 floats stored as T (bf16 and fp16 rounded to nearest even)
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i bits = _mm256_srli_epi32(_mm256_castps_si256(round8(v, static_cast<const c10::BFloat16*>(nullptr))), 16);
  // the 8 16-bit values are below 2^16, so the signed-to-unsigned saturating pack keeps them as they are
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
}

// the sum and the maximum of 8 lanes (the maximum of lanes none of which is NaN)
inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
inline float hmax8(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

// e^x for 8 lanes: exp16's reduction and polynomial, with 2^n built in the exponent bits (AVX2 has no
// vscalefps), so x is clamped to the range where 2^n is a normal float: below it the result is 0 (e^x is a
// denormal or 0 there, which a softmax's probability or a logistic's term never distinguishes), above it inf.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654475f), hi = _mm256_set1_ps(88.02969193f);  // ln 2^-126, ln 2^127
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ), over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  const __m256 shifter = _mm256_set1_ps(12582912.f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shifter), shifter);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // n in [-126, 127]: its biased exponent shifted into place is 2^n
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  p = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  p = _mm256_andnot_ps(under, p);
  return _mm256_blendv_ps(p, _mm256_set1_ps(std::numeric_limits<float>::infinity()), over);
}

#endif  // HF_FASTINFER_AVX2

}  // namespace hf_fastinfer
