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

// The model's own rotary arithmetic in its dtype T (bf16 / fp16 prompts; transformers' apply_rotary_pos_emb):
// x * cos + rotate_half(x) * sin on the first R dims, with cos / sin the model's rotary module output in T, each
// product rounded to T, then their sum (rotate_half(x)[j] = -x[j + R/2] for j < R/2, x[j - R/2] after): three
// roundings, where the table kernel above rounds once from fp32. The same arithmetic as the decode layer's
// attn_in. x [B, H, S, D] (unit stride along D); cos, sin [Bc, S, >= R] (Bc = 1 or B, unit stride along the last
// dim); out [B, H, S, D] contiguous, dims from R on copied.
template <typename T>
void rotary_model_one(const at::Tensor& x, at::Tensor& o, const at::Tensor& cos, const at::Tensor& sin, int64_t R) {
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3), half = R / 2;
  const int64_t xb = x.stride(0), xh = x.stride(1), xs = x.stride(2);
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), cs = cos.stride(1);
  const int64_t sb = sin.size(0) == 1 ? 0 : sin.stride(0), ss = sin.stride(1);
  const T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* op = o.data_ptr<T>();
  at::parallel_for(0, B * H * S, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * S), h = (r / S) % H, t = r % S;
      const T* xr = xp + b * xb + h * xh + t * xs;
      const T* c = cp + b * cb + t * cs;
      const T* sn = sp + b * sb + t * ss;
      T* orow = op + r * D;
      int64_t j = 0;
#ifdef HF_FASTINFER_AVX512
      for (; j < half; j += 16) {
        const __mmask16 m = tail_mask(half - j);
        const __m512 a = load16(xr + j, m), bv = load16(xr + half + j, m);
        const __m512 first = _mm512_add_ps(round16(_mm512_mul_ps(a, load16(c + j, m)), xr),
                                           round16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), bv), load16(sn + j, m)), xr));
        const __m512 second = _mm512_add_ps(round16(_mm512_mul_ps(bv, load16(c + half + j, m)), xr),
                                            round16(_mm512_mul_ps(a, load16(sn + half + j, m)), xr));
        store16(orow + j, first, m);
        store16(orow + half + j, second, m);
      }
      j = R;
#endif
      for (; j < R; ++j) {
        const float rotated = j < half ? -static_cast<float>(xr[j + half]) : static_cast<float>(xr[j - half]);
        orow[j] = static_cast<T>(round_to<T>(static_cast<float>(xr[j]) * static_cast<float>(c[j])) +
                                 round_to<T>(rotated * static_cast<float>(sn[j])));
      }
      for (j = R; j < D; ++j) orow[j] = xr[j];
    }
  });
}

std::vector<at::Tensor> rotary_model(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                     const at::Tensor& sin, int64_t rotary_dim) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.stride(3) == 1 && k.stride(3) == 1,
              "rotary_model: q and k must be [B, H, S, D] with unit stride along D");
  TORCH_CHECK(cos.dim() == 3 && sin.dim() == 3 && cos.stride(2) == 1 && sin.stride(2) == 1,
              "rotary_model: cos and sin must be [B or 1, S, >= R] with unit stride along the last dim");
  TORCH_CHECK(cos.scalar_type() == q.scalar_type() && sin.scalar_type() == q.scalar_type() &&
              k.scalar_type() == q.scalar_type(), "rotary_model: q, k, cos and sin must share one dtype");
  TORCH_CHECK(rotary_dim % 2 == 0 && rotary_dim <= q.size(3) && rotary_dim <= k.size(3) && cos.size(2) >= rotary_dim &&
              sin.size(2) >= rotary_dim, "rotary_model: an even rotary_dim within the head dim and the tables");
  for (const auto* t : {&q, &k})
    TORCH_CHECK(cos.size(1) == t->size(2) && sin.size(1) == t->size(2) &&
                (cos.size(0) == 1 || cos.size(0) == t->size(0)) && (sin.size(0) == 1 || sin.size(0) == t->size(0)),
                "rotary_model: cos and sin must have one row per token of q and k");
  at::Tensor qo = at::empty(q.sizes(), q.options()), ko = at::empty(k.sizes(), k.options());
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    rotary_model_one<T>(q, qo, cos, sin, rotary_dim);
    rotary_model_one<T>(k, ko, cos, sin, rotary_dim);
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "rotary_model: float32, bfloat16 or float16");
  }
  return {qo, ko};
}

}  // namespace hf_fastinfer
