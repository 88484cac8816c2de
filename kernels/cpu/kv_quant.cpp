// hf_fastinfer.kernels.kv_quant, CPU path.
#include "kv_quant.h"
#include "ops.h"

namespace hf_fastinfer {

// KV-cache quantize-and-append (hf_fastinfer.kernels.kv_quant): x [B, H, S, D] float (unit stride along D),
// cache int8 [B, H, L, D], scale float16 [B, H, L], slots int64 [B, S] contiguous; each (b, h, token) row
// quantized by quantize_kv_row (kv_quant.h).
template <typename T>
void kv_append_one(const at::Tensor& x, at::Tensor& cache, at::Tensor& scale, const int64_t* slots) {
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3);
  const T* xp = x.data_ptr<T>();
  int8_t* cp = cache.data_ptr<int8_t>();
  c10::Half* sp = scale.data_ptr<c10::Half>();
  at::parallel_for(0, B * H * S, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * S), h = (r / S) % H, s = r % S;
      const T* row = xp + b * x.stride(0) + h * x.stride(1) + s * x.stride(2);
      const int64_t slot = slots[b * S + s];
      quantize_kv_row<T>(row, D, cp + b * cache.stride(0) + h * cache.stride(1) + slot * cache.stride(2),
                         sp + b * scale.stride(0) + h * scale.stride(1) + slot * scale.stride(2));
    }
  });
}

void kv_append(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache, at::Tensor k_scale,
               at::Tensor v_scale, at::Tensor slots) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "slots must be contiguous int64");
  TORCH_CHECK(k_cache.scalar_type() == at::kChar && v_cache.scalar_type() == at::kChar, "int8 caches");
  TORCH_CHECK(k_scale.scalar_type() == at::kHalf && v_scale.scalar_type() == at::kHalf, "float16 scales");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "unit stride along the head dim");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "kv_append", [&] {
    kv_append_one<scalar_t>(k, k_cache, k_scale, slots.data_ptr<int64_t>());
    kv_append_one<scalar_t>(v, v_cache, v_scale, slots.data_ptr<int64_t>());
  });
}

}  // namespace hf_fastinfer
