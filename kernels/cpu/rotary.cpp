// hf_fastinfer.kernels.rotary, CPU path.
#include "ops.h"
#include "simd.h"

namespace hf_fastinfer {

// Rotary embedding of q and k in one call (hf_fastinfer.kernels.rotary): x, o: [B, H, S, D] with any strides
// and unit stride along D (o may be x: in place); cos, sin: float32 [P, R/2] contiguous; positions: int64
// [B, S] contiguous. Pairs (i, i + R/2), or (2i, 2i + 1) when interleaved; dims from R on are copied.
template <typename T>
void rotary_one(const at::Tensor& x, at::Tensor& o, const float* cs, const float* sn, const int64_t* pos,
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

void rotary(at::Tensor q, at::Tensor k, at::Tensor q_out, at::Tensor k_out, at::Tensor cos,
            at::Tensor sin, at::Tensor positions, bool interleaved) {
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin.is_contiguous(), "cos and sin must be contiguous float32");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "positions must be contiguous int64");
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

}  // namespace hf_fastinfer
