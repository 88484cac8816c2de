// hf_fastinfer's compiled CPU kernels. First: weight-only quantized matrix-vector products for a few
// activation rows (decode); then rotary embedding, KV-cache quantize-and-append and RMSNorm (bottom of the file):
// decode-sized ops whose cost in eager torch is mostly per-op dispatch.
//
// y[m, n] = sum_g s[n, g] * (sum_{k in g} x[m, k] * q[n, k] - z[n, g] * sum_{k in g} x[m, k]) + bias[n]
//
// Each weight row is read once, as integers, and reused for every activation row while it sits in L1;
// the inner loops are plain C++ that the compiler vectorises (-O3 -march=native, with reassociation allowed
// for the float sums). Rows of the weight are split across torch's intra-op threads (at::parallel_for).
// Formats: hf_fastinfer.kernels.quant_format (int8 [N, K]; int4 nibbles q + 8, low nibble = even column).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <algorithm>
#include <vector>
#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// acc += x[k] * (q[k] * s) over one group of int8 weights, 16 lanes at a time (masked tail): the scale
// is folded into the converted weights, so no horizontal sum is needed until the end of the row.
inline __m512 group_i8(__m512 acc, const float* __restrict x, const int8_t* __restrict q, int64_t n, float s) {
  const __m512 vs = _mm512_set1_ps(s);
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_mul_ps(w, vs), acc);
  }
  if (k < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1u);
    __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + k)));
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), _mm512_mul_ps(w, vs), acc);
  }
  return acc;
}

// Four weight rows at once against the same activations: four independent FMA chains (hides the FMA
// latency) and one load of x per 16 columns instead of four.
inline void group_i8_x4(__m512* acc, const float* __restrict x, const int8_t* const* q, int64_t k0, int64_t n,
                        const float* s) {
  const __m512 sv[4] = {_mm512_set1_ps(s[0]), _mm512_set1_ps(s[1]), _mm512_set1_ps(s[2]), _mm512_set1_ps(s[3])};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {  // full chunks: plain loads
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < 4; ++r) {
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[r] + k0 + k))));
      acc[r] = _mm512_fmadd_ps(xv, _mm512_mul_ps(w, sv[r]), acc[r]);
    }
  }
  if (k < n) {  // the group's masked tail
    const __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1u);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
    for (int r = 0; r < 4; ++r) {
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q[r] + k0 + k)));
      acc[r] = _mm512_fmadd_ps(xv, _mm512_mul_ps(w, sv[r]), acc[r]);
    }
  }
}

inline void group_i4_x4(__m512* acc, const float* __restrict xe, const float* __restrict xo, const uint8_t* const* p,
                        int64_t j0, int64_t n, const float* s) {
  const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
  const __m512 sv[4] = {_mm512_set1_ps(s[0]), _mm512_set1_ps(s[1]), _mm512_set1_ps(s[2]), _mm512_set1_ps(s[3])};
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 ev = _mm512_maskz_loadu_ps(m, xe + j), ov = _mm512_maskz_loadu_ps(m, xo + j);
    for (int r = 0; r < 4; ++r) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p[r] + j0 + j));
      const __m512 we = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, low), eight));
      const __m512 wo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight));
      acc[r] = _mm512_fmadd_ps(ev, _mm512_mul_ps(we, sv[r]), acc[r]);
      acc[r] = _mm512_fmadd_ps(ov, _mm512_mul_ps(wo, sv[r]), acc[r]);
    }
  }
}

// Same for packed int4 over n bytes (2n columns): even columns against xe, odd ones against xo.
inline __m512 group_i4(__m512 acc, const float* __restrict xe, const float* __restrict xo,
                       const uint8_t* __restrict p, int64_t n, float s) {
  const __m512 vs = _mm512_set1_ps(s);
  const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
  int64_t j = 0;
  for (; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1u);
    __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p + j));
    __m512 we = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, low), eight));
    __m512 wo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight));
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xe + j), _mm512_mul_ps(we, vs), acc);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xo + j), _mm512_mul_ps(wo, vs), acc);
  }
  return acc;
}
#define HF_FASTINFER_AVX512 1
#endif

// Portable fallbacks (the compiler vectorises what it can).
inline float dot_i8(const float* __restrict a, const int8_t* __restrict b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += a[k] * static_cast<float>(b[k]);
  return acc;
}

inline float dot_i4(const float* __restrict even, const float* __restrict odd, const uint8_t* __restrict p, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    acc += even[j] * static_cast<float>(static_cast<int>(p[j] & 15) - 8) +
           odd[j] * static_cast<float>(static_cast<int>(p[j] >> 4) - 8);
  }
  return acc;
}

}  // namespace

template <typename ST>
inline float to_f32(ST v) { return static_cast<float>(v); }

// The row loop, for scales / zeros stored as ST (float or c10::Half: converted once per group).
template <typename ST>
void gemv_rows(const float* xp, const uint8_t* wp, const ST* sp, const ST* zp, const float* bp, float* yp,
               const std::vector<float>& xsum, const std::vector<float>& xe, const std::vector<float>& xo,
               int64_t M, int64_t N, int64_t K, int64_t groups, int64_t group_size, int64_t bits) {
  const bool has_zeros = zp != nullptr;
  const int64_t half = (K + 1) / 2;
  const int64_t row_bytes = bits == 8 ? K : half;
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    int64_t n = begin;
#ifdef HF_FASTINFER_AVX512
    for (; n + 4 <= end; n += 4) {
      const uint8_t* rows4[4] = {wp + n * row_bytes, wp + (n + 1) * row_bytes, wp + (n + 2) * row_bytes,
                                 wp + (n + 3) * row_bytes};
      for (int64_t m = 0; m < M; ++m) {
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        float zero_terms[4] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t k0 = g * group_size;
          const int64_t len = std::min(group_size, K - k0);
          const float s4[4] = {to_f32(sp[n * groups + g]), to_f32(sp[(n + 1) * groups + g]), to_f32(sp[(n + 2) * groups + g]),
                               to_f32(sp[(n + 3) * groups + g])};
          if (bits == 8) {
            const int8_t* q4[4] = {reinterpret_cast<const int8_t*>(rows4[0]), reinterpret_cast<const int8_t*>(rows4[1]),
                                   reinterpret_cast<const int8_t*>(rows4[2]), reinterpret_cast<const int8_t*>(rows4[3])};
            group_i8_x4(acc, xp + m * K + k0, q4, k0, len, s4);
          } else {
            group_i4_x4(acc, xe.data() + m * half + k0 / 2, xo.data() + m * half + k0 / 2, rows4, k0 / 2,
                        (len + 1) / 2, s4);
          }
          if (has_zeros)
            for (int r = 0; r < 4; ++r) zero_terms[r] += to_f32(zp[(n + r) * groups + g]) * xsum[m * groups + g] * s4[r];
        }
        for (int r = 0; r < 4; ++r)
          yp[m * N + n + r] = _mm512_reduce_add_ps(acc[r]) - zero_terms[r] + (bp ? bp[n + r] : 0.f);
      }
    }
#endif
    for (; n < end; ++n) {
      const uint8_t* row = wp + n * row_bytes;
      for (int64_t m = 0; m < M; ++m) {
        float acc = 0.f;
#ifdef HF_FASTINFER_AVX512
        __m512 vacc = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t k0 = g * group_size;
          const int64_t len = std::min(group_size, K - k0);
          const float s = to_f32(sp[n * groups + g]);
          if (bits == 8) {
            vacc = group_i8(vacc, xp + m * K + k0, reinterpret_cast<const int8_t*>(row) + k0, len, s);
          } else {
            vacc = group_i4(vacc, xe.data() + m * half + k0 / 2, xo.data() + m * half + k0 / 2, row + k0 / 2,
                            (len + 1) / 2, s);
          }
          if (has_zeros) acc -= to_f32(zp[n * groups + g]) * xsum[m * groups + g] * s;
        }
        acc += _mm512_reduce_add_ps(vacc);
#else
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t k0 = g * group_size;
          const int64_t len = std::min(group_size, K - k0);
          float part;
          if (bits == 8) {
            part = dot_i8(xp + m * K + k0, reinterpret_cast<const int8_t*>(row) + k0, len);
          } else {
            // k0 is even (even group size); a short odd last group reads the padding nibble against x = 0
            part = dot_i4(xe.data() + m * half + k0 / 2, xo.data() + m * half + k0 / 2, row + k0 / 2, (len + 1) / 2);
          }
          if (has_zeros) part -= to_f32(zp[n * groups + g]) * xsum[m * groups + g];
          acc += part * to_f32(sp[n * groups + g]);
        }
#endif
        yp[m * N + n] = acc + (bp ? bp[n] : 0.f);
      }
    }
  });
}

// x: [M, K] float32 (callers convert bf16/fp16 first: K values, negligible next to the weight)
// qweight: int8 [N, K] (bits 8) or uint8 [N, ceil(K/2)] (bits 4); scales, zeros: float32 or float16 [N, G_count] (same dtype)
torch::Tensor quant_gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                         c10::optional<torch::Tensor> bias, int64_t bits, int64_t group_size, int64_t in_features) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 [M, K]");
  TORCH_CHECK((scales.scalar_type() == torch::kFloat32 || scales.scalar_type() == torch::kHalf) && scales.is_contiguous(),
              "scales must be contiguous float32 or float16");
  const int64_t M = x.size(0), K = in_features, N = qweight.size(0);
  const int64_t groups = (K + group_size - 1) / group_size;
  TORCH_CHECK(x.size(1) == K && scales.size(0) == N && scales.size(1) == groups, "shape mismatch");
  TORCH_CHECK(bits == 8 || (bits == 4 && group_size % 2 == 0), "bits 8, or bits 4 with an even group size");
  const bool has_zeros = zeros.has_value();
  if (has_zeros)
    TORCH_CHECK(zeros->scalar_type() == scales.scalar_type() && zeros->is_contiguous(), "zeros must be contiguous, in the scales' dtype");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous(), "bias must be contiguous float32");
    bp = bias->data_ptr<float>();
  }
  const float* xp = x.data_ptr<float>();
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();

  // Per-group sums of x (for zero points) and, for int4, x split into even / odd columns.
  std::vector<float> xsum(M * groups, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m * groups + k / group_size] += xp[m * K + k];
  const int64_t half = (K + 1) / 2;
  std::vector<float> xe, xo;
  if (bits == 4) {
    xe.assign(M * half, 0.f);
    xo.assign(M * half, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) (k % 2 ? xo : xe)[m * half + k / 2] = xp[m * K + k];
  }

  const uint8_t* wp = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  if (scales.scalar_type() == torch::kHalf) {
    const c10::Half* zh = has_zeros ? zeros->data_ptr<c10::Half>() : nullptr;
    gemv_rows<c10::Half>(xp, wp, scales.data_ptr<c10::Half>(), zh, bp, yp, xsum, xe, xo, M, N, K, groups, group_size, bits);
  } else {
    const float* zf = has_zeros ? zeros->data_ptr<float>() : nullptr;
    gemv_rows<float>(xp, wp, scales.data_ptr<float>(), zf, bp, yp, xsum, xe, xo, M, N, K, groups, group_size, bits);
  }
  return y;
}

// Rotary embedding of q and k in one call (hf_fastinfer.kernels.rotary): x, o: [B, H, S, D] with any strides
// and unit stride along D (o may be x: in place); cos, sin: float32 [P, R/2] contiguous; positions: int64
// [B, S] contiguous. Pairs (i, i + R/2), or (2i, 2i + 1) when interleaved; dims from R on are copied.
template <typename T>
void rotary_one(const torch::Tensor& x, torch::Tensor& o, const float* cs, const float* sn, const int64_t* pos,
                int64_t half, bool interleaved) {
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3);
  const int64_t xb = x.stride(0), xh = x.stride(1), xs = x.stride(2);
  const int64_t ob = o.stride(0), oh = o.stride(1), os = o.stride(2);
  const T* xp = x.data_ptr<T>();
  T* op = o.data_ptr<T>();
  const bool copy_rest = xp != op && 2 * half < D;
  at::parallel_for(0, B * H * S, 512, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * S), h = (r / S) % H, s = r % S;
      const T* xr = xp + b * xb + h * xh + s * xs;
      T* orow = op + b * ob + h * oh + s * os;
      const int64_t p = pos[b * S + s];
      const float* c = cs + p * half;
      const float* sv = sn + p * half;
      for (int64_t i = 0; i < half; ++i) {
        const int64_t i1 = interleaved ? 2 * i : i, i2 = interleaved ? 2 * i + 1 : i + half;
        const float a1 = static_cast<float>(xr[i1]), a2 = static_cast<float>(xr[i2]);
        orow[i1] = static_cast<T>(a1 * c[i] - a2 * sv[i]);
        orow[i2] = static_cast<T>(a2 * c[i] + a1 * sv[i]);
      }
      if (copy_rest)
        for (int64_t d = 2 * half; d < D; ++d) orow[d] = xr[d];
    }
  });
}

void rotary(torch::Tensor q, torch::Tensor k, torch::Tensor q_out, torch::Tensor k_out, torch::Tensor cos,
            torch::Tensor sin, torch::Tensor positions, bool interleaved) {
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && cos.is_contiguous() &&
              sin.is_contiguous(), "cos and sin must be contiguous float32");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.is_contiguous(), "positions must be contiguous int64");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && q_out.stride(3) == 1 && k_out.stride(3) == 1,
              "unit stride along the head dim");
  const int64_t half = cos.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rotary", [&] {
    rotary_one<scalar_t>(q, q_out, cos.data_ptr<float>(), sin.data_ptr<float>(), positions.data_ptr<int64_t>(), half,
                         interleaved);
    rotary_one<scalar_t>(k, k_out, cos.data_ptr<float>(), sin.data_ptr<float>(), positions.data_ptr<int64_t>(), half,
                         interleaved);
  });
}

// KV-cache quantize-and-append (hf_fastinfer.kernels.kv_quant): x [B, H, S, D] float (unit stride along D),
// cache int8 [B, H, L, D], scale float16 [B, H, L], slots int64 [B, S] contiguous. Per (b, h, token):
// scale = fp16(max|x| / 127) >= 2^-24, q = round-half-even(x / scale) clamped to [-127, 127].
template <typename T>
void kv_append_one(const torch::Tensor& x, torch::Tensor& cache, torch::Tensor& scale, const int64_t* slots) {
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3);
  const T* xp = x.data_ptr<T>();
  int8_t* cp = cache.data_ptr<int8_t>();
  c10::Half* sp = scale.data_ptr<c10::Half>();
  at::parallel_for(0, B * H * S, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * S), h = (r / S) % H, s = r % S;
      const T* row = xp + b * x.stride(0) + h * x.stride(1) + s * x.stride(2);
      const int64_t slot = slots[b * S + s];
      float absmax = 0.f;
      for (int64_t d = 0; d < D; ++d) absmax = std::max(absmax, std::abs(static_cast<float>(row[d])));
      const c10::Half stored = static_cast<c10::Half>(absmax / 127.0f);
      const float sc = std::max(static_cast<float>(stored), 5.960464477539063e-08f);
      int8_t* out = cp + b * cache.stride(0) + h * cache.stride(1) + slot * cache.stride(2);
      for (int64_t d = 0; d < D; ++d) {
        const float q = std::nearbyint(static_cast<float>(row[d]) / sc);  // default rounding: ties to even
        out[d] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, q)));
      }
      sp[b * scale.stride(0) + h * scale.stride(1) + slot * scale.stride(2)] = static_cast<c10::Half>(sc);
    }
  });
}

void kv_append(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k_scale,
               torch::Tensor v_scale, torch::Tensor slots) {
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous(), "slots must be contiguous int64");
  TORCH_CHECK(k_cache.scalar_type() == torch::kInt8 && v_cache.scalar_type() == torch::kInt8, "int8 caches");
  TORCH_CHECK(k_scale.scalar_type() == torch::kHalf && v_scale.scalar_type() == torch::kHalf, "float16 scales");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "unit stride along the head dim");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "kv_append", [&] {
    kv_append_one<scalar_t>(k, k_cache, k_scale, slots.data_ptr<int64_t>());
    kv_append_one<scalar_t>(v, v_cache, v_scale, slots.data_ptr<int64_t>());
  });
}

// RMSNorm with the fused residual add (hf_fastinfer.kernels.rms_norm), rows of a contiguous [N, hidden]:
// h = x + r rounded to T (written to res_out), n = h * rsqrt(mean(h^2) + eps) in fp32, then
// Llama: T(n) * w rounded to T (fp32 inputs: n * w); Gemma: n * (1 + w) in fp32, rounded to T.
template <typename T>
void rms_norm_rows(const T* x, const T* r, const float* w, T* out, T* res_out, int64_t rows, int64_t hidden, double eps,
                   bool gemma) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> h(hidden);
    for (int64_t row = begin; row < end; ++row) {
      const T* xr = x + row * hidden;
      float ss = 0.f;
      for (int64_t d = 0; d < hidden; ++d) {
        T v = r ? static_cast<T>(static_cast<float>(xr[d]) + static_cast<float>(r[row * hidden + d])) : xr[d];
        if (res_out) res_out[row * hidden + d] = v;
        h[d] = static_cast<float>(v);
        ss += h[d] * h[d];
      }
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(hidden) + static_cast<float>(eps));
      T* o = out + row * hidden;
      for (int64_t d = 0; d < hidden; ++d) {
        const float n = h[d] * inv;
        if (gemma)
          o[d] = static_cast<T>(n * (1.0f + w[d]));
        else  // the weight as the model holds it (dtype T) times the normalised value rounded to T
          o[d] = static_cast<T>(static_cast<float>(static_cast<T>(n)) * static_cast<float>(static_cast<T>(w[d])));
      }
    }
  });
}

std::vector<torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> residual,
                                    double eps, bool gemma) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "contiguous x and weight");
  const int64_t hidden = x.size(-1), rows = x.numel() / std::max<int64_t>(hidden, 1);
  auto w = weight.to(torch::kFloat32).contiguous();
  auto out = torch::empty_like(x);
  torch::Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(residual->is_contiguous() && residual->scalar_type() == x.scalar_type(), "contiguous residual of x's dtype");
    res = torch::empty_like(x);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr,
                            w.data_ptr<float>(), out.data_ptr<scalar_t>(),
                            residual.has_value() ? res.data_ptr<scalar_t>() : nullptr, rows, hidden, eps, gemma);
  });
  return {out, res};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_gemv", &quant_gemv, "weight-only quantized GEMV for a few activation rows");
  m.def("rms_norm", &rms_norm, "RMSNorm with an optional fused residual add");
  m.def("kv_append", &kv_append, "int8 KV-cache quantize-and-append at given slots");
  m.def("rotary", &rotary, "rotary embedding of q and k (in place when the outputs are the inputs)");
}
