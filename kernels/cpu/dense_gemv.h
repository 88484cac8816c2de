// Matrix-vector products with a float weight (float32, bfloat16 or float16) for a few activation rows
// (hf_fastinfer.kernels.linear's CPU path for decode), shared by the standalone op and the fused decoder layer.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace hf_fastinfer {

// w: [N, K] contiguous, of dtype; bias: float32 [N] or null.
struct DenseWeight {
  const void* w = nullptr;
  const float* bias = nullptr;
  c10::ScalarType dtype = c10::ScalarType::Float;
  int64_t N = 0, K = 0;
};

// y[m, n] = x[m] . w[n] (+ bias[n]) for n in [begin, end), in fp32 (x: [M, K] float32, y: [M, N] float32), on the
// calling thread. Each weight row is read from memory once whatever M is.
void dense_rows(const DenseWeight& w, const float* x, int64_t M, float* y, int64_t begin, int64_t end);

// Whether bf16 weights go through AVX512-BF16 dot products (on where the CPU has them), and the switch for
// benchmarks' A/B in one process.
bool bf16_dot_products();
void set_bf16_dot_products(bool on);

}  // namespace hf_fastinfer
