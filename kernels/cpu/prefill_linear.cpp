// Many-row products (prefill) with a bf16 / fp16 or group-quantized weight: the weight is converted to fp32 by
// the team of threads (vectorised loops), then one multithreaded BLAS product (MKL's sgemm) runs against all
// activation rows; the fp32 copy of that one weight lives for the call only. On CPUs without native bf16 /
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

at::Tensor Projection::matmul(const at::Tensor& x_in, bool native_bf16) const {
  const int64_t K = in_features_, N = out_features_;
  TORCH_CHECK(x_in.size(-1) == K, "Projection.matmul: x must be [..., in_features]");
  const auto dtype = x_in.scalar_type();
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  if (dtype == at::kBFloat16 && native_bf16) {
    at::Tensor w = weight_;
    if (bits_ != 0 || weight_.scalar_type() != at::kBFloat16) {
      // the bf16 weight, 16 rows at a time through an fp32 row buffer per thread (L1-resident)
      w = at::empty({N, K}, x_in.options());
      auto* wp = w.data_ptr<c10::BFloat16>();
      const int nt = team_size();
#pragma omp parallel num_threads(nt)
      {
        int64_t begin, end;
        thread_share(N, 16, omp_get_thread_num(), omp_get_num_threads(), begin, end);
        std::vector<float> rows(16 * K);
        for (int64_t n = begin; n < end; n += 16) {
          const int64_t n1 = std::min(end, n + 16);
          dequantize_rows(n, n1, rows.data());
          to_bf16(rows.data(), wp + n * K, (n1 - n) * K);
        }
      }
    }
    const auto x = x_in.reshape({-1, K});
    at::Tensor y = bias_.defined() ? at::addmm(bias_.to(at::kBFloat16), x, w.t()) : at::mm(x, w.t());
    return y.view(sizes);
  }
  const auto x = x_in.reshape({-1, K}).to(at::kFloat);
  // the fp32 weight, rows split across the team (vectorised conversion: a few ms for a layer's largest
  // projection), then one multithreaded BLAS product; the copy lives for this call only
  at::Tensor w = at::empty({N, K}, x.options());
  float* wp = w.data_ptr<float>();
  const int nt = team_size();
#pragma omp parallel num_threads(nt)
  {
    int64_t begin, end;
    thread_share(N, 16, omp_get_thread_num(), omp_get_num_threads(), begin, end);
    if (begin < end) dequantize_rows(begin, end, wp + begin * K);
  }
  at::Tensor y = bias_.defined() ? at::addmm(bias_, x, w.t()) : at::mm(x, w.t());
  if (dtype != at::kFloat) y = y.to(dtype);
  return y.view(sizes);
}

// The standalone op: x [..., K] against one weight (float bits=0, or quantized), bias [N] or None.
at::Tensor prefill_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scales,
                        const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                        int64_t group_size, int64_t in_features, bool native_bf16) {
  return Projection(weight, scales, zeros, bias, bits, group_size, in_features).matmul(x, native_bf16);
}

}  // namespace hf_fastinfer
