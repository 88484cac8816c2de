// Many-row products (prefill) with a float or group-quantized weight: the weight is converted to fp32 by the
// team of threads (vectorised loops; an fp32 weight is used as it is), then one multithreaded product runs
// against all activation rows: MKL's sgemm, or where the caller asks (onednn: AMD CPUs, where MKL's sgemm runs
// 2.0-2.3x slower, kernels/linear.py: onednn_linear) oneDNN's linear. The fp32 copy of a weight lives for the
// call only. On CPUs without native bf16 /
// fp16 arithmetic (AVX512-BF16, AMX) this is several times faster than F.linear in bf16, which converts inside
// oneDNN on every call, and for quantized weights it replaces a dequantization of several passes of torch ops
// (BENCHMARKS.md). Converting a tile at a time into an L2-resident buffer and multiplying each tile on one
// thread was measured too: 20-30% slower than this, as single-threaded BLAS calls on tiles lose to one
// threaded product. Accumulation is fp32 and the result is rounded once to x's dtype, as F.linear does.
//
// On a CPU that multiplies bf16 natively (AMX tiles, AVX512-BF16), bf16 activations take the other road: the
// weight is dequantized into a bf16 copy (each value computed in fp32, rounded once) and one bf16 GEMM runs
// (oneDNN, fp32 accumulation), which is what F.linear does with that bf16 weight. There fp32 BLAS is several
// times slower than the bf16 GEMM a float bf16 model's prefill gets (BENCHMARKS.md), and the caller asks for it
// (kernels/linear.py: native_half_gemm).
#include <ATen/EmptyTensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string_view>

#include "ops.h"
#include "simd.h"

namespace hf_fastinfer {

void Projection::dequantize_rows(int64_t n0, int64_t n1, float* out) const {
  const int64_t K = in_features_;
  if (bits_ == 0) {
    const auto convert = [&](const auto* w) {
      for (int64_t n = n0; n < n1; ++n) {
        const auto* row = w + n * K;
        float* o = out + (n - n0) * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) o[k] = static_cast<float>(row[k]);
      }
    };
    switch (weight_.scalar_type()) {
      case at::kFloat: convert(weight_.data_ptr<float>()); break;
      case at::kBFloat16: convert(weight_.data_ptr<c10::BFloat16>()); break;
      default: convert(weight_.data_ptr<c10::Half>()); break;
    }
    return;
  }
  const int64_t G = group_size_, groups = (K + G - 1) / G;
  const uint8_t* w = reinterpret_cast<const uint8_t*>(weight_.data_ptr());
  const int64_t row_bytes = bits_ == 8 ? K : (K + 1) / 2;
  const bool half_scales = scales_.scalar_type() == at::kHalf;
  const auto scale_at = [&](const at::Tensor& t, int64_t i) {
    return half_scales ? to_f32(t.data_ptr<c10::Half>()[i]) : t.data_ptr<float>()[i];
  };
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    float* o = out + (n - n0) * K;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scale_at(scales_, n * groups + g);
      // w = s * (q - z) with q the signed integer (int4: the stored nibble - 8): s * u - s * shift
      const float shift = (zeros_.defined() ? scale_at(zeros_, n * groups + g) : 0.f) + (bits_ == 4 ? 8.f : 0.f);
      const float offset = -s * shift;
      const int64_t k0 = g * G, k1 = std::min(K, k0 + G);
      if (bits_ == 8) {
        const int8_t* q = reinterpret_cast<const int8_t*>(row);
#pragma omp simd
        for (int64_t k = k0; k < k1; ++k) o[k] = s * static_cast<float>(q[k]) + offset;
      } else {
        // groups hold an even number of columns (int4 needs an even group size): whole bytes per group
        const int64_t b0 = k0 / 2, b1 = (k1 + 1) / 2;
        float* og = o + k0;
        const uint8_t* bytes = row + b0;
        const int64_t full = (k1 - k0) / 2;
#pragma omp simd
        for (int64_t j = 0; j < full; ++j) {
          og[2 * j] = s * static_cast<float>(bytes[j] & 15) + offset;
          og[2 * j + 1] = s * static_cast<float>(bytes[j] >> 4) + offset;
        }
        if (full < b1 - b0) og[2 * full] = s * static_cast<float>(bytes[full] & 15) + offset;  // odd K: last column
      }
    }
  }
}

namespace {

#if defined(__AVX512BF16__) && defined(HF_FASTINFER_AVX512)
// Rows [n0, n1) of a quantized weight straight to bf16, out [n1 - n0, K]: each value is s * u + offset in fp32
// (the rounding of dequantize_rows: a product, then a sum), rounded once to bf16 (nearest even), so the result
// equals dequantize_rows followed by to_bf16. Per group, the 16 possible int4 values are computed once as a
// bf16 table in one register, and each 32 columns are one vpermw of their nibbles (spread to 16-bit indices in
// column order: byte j holds column 2j in its low nibble, 2j + 1 in its high one); int8 converts 16 values at a
// time. About 10x the fp32 road's loops plus a conversion pass, which cost as much as the bf16 GEMM itself on a
// 256-token prefill (BENCHMARKS.md). Only for groups of whole vectors (int4: a multiple of 32 columns, int8:
// of 16) and K a multiple of the group size; the caller checks (bf16_dequantize_fast).
template <int BITS, typename ST>
void dequantize_rows_bf16_avx512(const uint8_t* w, const ST* sp, const ST* zp, int64_t K, int64_t G, int64_t n0,
                                 int64_t n1, c10::BFloat16* out) {
  const int64_t groups = K / G, row_bytes = BITS == 8 ? K : K / 2;
  const __m512 steps = _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f);
  const __m512i low4 = _mm512_set1_epi32(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    uint16_t* o = reinterpret_cast<uint16_t*>(out + (n - n0) * K);
    for (int64_t g = 0; g < groups; ++g) {
      const float s = to_f32(sp[n * groups + g]);
      const float shift = (zp != nullptr ? to_f32(zp[n * groups + g]) : 0.f) + (BITS == 4 ? 8.f : 0.f);
      const __m512 sv = _mm512_set1_ps(s), ov = _mm512_set1_ps(-s * shift);
      if constexpr (BITS == 4) {
        // the table: lane u holds bf16(s * u + offset), u = 0..15
        const __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_mul_ps(sv, steps), ov)));
        const uint8_t* bytes = row + g * G / 2;
        for (int64_t c = 0; c < G; c += 32) {
          // 16 bytes -> 32-bit lanes; lane j = low nibble | high nibble << 16: 32 16-bit indices in column order
          const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + c / 2)));
          const __m512i idx = _mm512_or_si512(_mm512_and_si512(b, low4), _mm512_slli_epi32(_mm512_srli_epi32(b, 4), 16));
          _mm512_storeu_si512(o + g * G + c, _mm512_permutexvar_epi16(idx, table));
        }
      } else {
        const int8_t* q = reinterpret_cast<const int8_t*>(row + g * G);
        for (int64_t c = 0; c < G; c += 16) {
          const __m512 u = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c))));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + g * G + c),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_mul_ps(sv, u), ov)));
        }
      }
    }
  }
}
#endif

// y [M, N] = x [M, K] @ w.T (+ bias), all fp32, by oneDNN's linear (``mkldnn::_linear_pointwise``, the op
// torch.compile's CPU backend uses): the weight as given, no packed copy, fp32 accumulation and one rounding.
// Through the dispatcher, as torch.ops.mkldnn._linear_pointwise is from Python. The caller asks for it only
// where the op exists (kernels/linear.py: onednn_linear).
at::Tensor onednn_fp32_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, std::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<std::string_view>)>();
  return op.call(x.contiguous(), w, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, "none",
                 c10::List<std::optional<at::Scalar>>(), std::optional<std::string_view>(""));
}

// fp32 values -> bf16, rounded to nearest even (c10::BFloat16's rounding)
inline void to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512BF16__) && defined(HF_FASTINFER_AVX512)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
#endif
  for (; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(src[i]);
}

}  // namespace

bool Projection::dequantize_rows_bf16(int64_t n0, int64_t n1, c10::BFloat16* out) const {
#if defined(__AVX512BF16__) && defined(HF_FASTINFER_AVX512)
  const int64_t K = in_features_, G = group_size_;
  if (bits_ == 0 || K % G != 0 || G % (bits_ == 4 ? 32 : 16) != 0) return false;
  const uint8_t* w = reinterpret_cast<const uint8_t*>(weight_.data_ptr());
  const auto run = [&](const auto* sp, const auto* zp) {
    if (bits_ == 4) dequantize_rows_bf16_avx512<4>(w, sp, zp, K, G, n0, n1, out);
    else dequantize_rows_bf16_avx512<8>(w, sp, zp, K, G, n0, n1, out);
  };
  if (scales_.scalar_type() == at::kHalf)
    run(scales_.data_ptr<c10::Half>(), zeros_.defined() ? zeros_.data_ptr<c10::Half>() : nullptr);
  else
    run(scales_.data_ptr<float>(), zeros_.defined() ? zeros_.data_ptr<float>() : nullptr);
  return true;
#else
  (void)n0, (void)n1, (void)out;
  return false;
#endif
}

at::Tensor Projection::dense(bool bf16) const {
  const int64_t K = in_features_, N = out_features_;
  const int nt = team_size();
  if (bf16) {
    if (bits_ == 0 && weight_.scalar_type() == at::kBFloat16) return weight_;
    // the bf16 weight, 16 rows at a time through an fp32 row buffer per thread (L1-resident)
    at::Tensor w = at::empty({N, K}, weight_.options().dtype(at::kBFloat16));
    auto* wp = w.data_ptr<c10::BFloat16>();
#pragma omp parallel num_threads(nt)
    {
      int64_t begin, end;
      thread_share(N, 16, omp_get_thread_num(), omp_get_num_threads(), begin, end);
      if (!dequantize_rows_bf16(begin, end, wp + begin * K)) {
        std::vector<float> rows(16 * K);
        for (int64_t n = begin; n < end; n += 16) {
          const int64_t n1 = std::min(end, n + 16);
          dequantize_rows(n, n1, rows.data());
          to_bf16(rows.data(), wp + n * K, (n1 - n) * K);
        }
      }
    }
    return w;
  }
  if (bits_ == 0 && weight_.scalar_type() == at::kFloat) return weight_;
  // the fp32 weight, rows split across the team (vectorised conversion: a few ms for a layer's largest
  // projection); the copy lives as long as the caller keeps it
  at::Tensor w = at::empty({N, K}, weight_.options().dtype(at::kFloat));
  float* wp = w.data_ptr<float>();
#pragma omp parallel num_threads(nt)
  {
    int64_t begin, end;
    thread_share(N, 16, omp_get_thread_num(), omp_get_num_threads(), begin, end);
    if (begin < end) dequantize_rows(begin, end, wp + begin * K);
  }
  return w;
}

at::Tensor Projection::matmul(const at::Tensor& x_in, bool native_bf16, bool onednn) const {
  const int64_t K = in_features_, N = out_features_;
  TORCH_CHECK(x_in.size(-1) == K, "Projection.matmul: x must be [..., in_features]");
  const auto dtype = x_in.scalar_type();
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  if (dtype == at::kBFloat16 && native_bf16) {
    const at::Tensor w = dense(true);
    const auto x = x_in.reshape({-1, K});
    at::Tensor y = bias_.defined() ? at::addmm(bias_.to(at::kBFloat16), x, w.t()) : at::mm(x, w.t());
    return y.view(sizes);
  }
  const auto x = x_in.reshape({-1, K}).to(at::kFloat);
  const at::Tensor w = dense(false);  // then one multithreaded product: oneDNN's, or BLAS (MKL's sgemm)
  at::Tensor y = onednn ? onednn_fp32_linear(x, w, bias_)
                        : (bias_.defined() ? at::addmm(bias_, x, w.t()) : at::mm(x, w.t()));
  if (dtype != at::kFloat) y = y.to(dtype);
  return y.view(sizes);
}

// The standalone op: x [..., K] against one weight (float bits=0, or quantized), bias [N] or None.
at::Tensor prefill_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scales,
                        const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                        int64_t group_size, int64_t in_features, bool native_bf16, bool onednn) {
  return Projection(weight, scales, zeros, bias, bits, group_size, in_features).matmul(x, native_bf16, onednn);
}

}  // namespace hf_fastinfer
