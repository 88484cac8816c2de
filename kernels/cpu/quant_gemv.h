// Weight-only quantized matrix-vector products for a few activation rows (hf_fastinfer.kernels.quant_matmul),
// as two steps that the standalone op and the fused decoder layer share: prepare the activation rows once for
// a weight format, then compute any range of output rows (each thread of a team takes its own range).
#pragma once

#include <cstdint>
#include <vector>

namespace hf_fastinfer {

// A group-quantized weight as the kernels read it. Formats: hf_fastinfer.kernels.quant_format (int8 [N, K];
// int4 nibbles q + 8, low nibble = even column, two columns per byte); scales and zeros [N, groups], float32 or
// float16 (half_scales); bias float32 [N] or null.
struct QuantWeight {
  const uint8_t* w = nullptr;
  const void* scales = nullptr;
  const void* zeros = nullptr;
  const float* bias = nullptr;
  bool half_scales = true;
  int64_t N = 0, K = 0, bits = 8, group_size = 32, groups = 0;
};

// Activation rows x [M, K] (float32) prepared for one weight format: per-group sums (zero points and the int4
// offset), int4's even / odd column split, and for int4 against 16-bit activations x held as int16 per group.
struct QuantActivations {
  const float* x = nullptr;         // [M, K], not owned
  int64_t M = 0, K = 0, groups = 0, group_size = 0, half = 0, half16 = 0;
  std::vector<float> xsum;          // [M, groups]
  std::vector<float> xe, xo;        // int4: [M, half] even / odd columns (zero-padded)
  std::vector<int16_t> xe16, xo16;  // int4 x int16 except g32 below: [M, half16]
  std::vector<float> xs, xsum16;    // int4 x int16: [M, groups + 1] scales, [M, groups] sums as held in int16
  // int4 group 32 x int16 with K a multiple of 64 (gemv_blocks_a16_g32): per 64-byte weight block b (4 groups),
  // x16 [M, blocks, 128] in the lane order of the block's unpacked nibbles, xs4 / xq4 [M, blocks, 16] each
  // group's int16 scale and quarter sum (as held in int16) on the four lanes that hold its products
  // (blocks64 > 0 marks this layout; 0 otherwise)
  std::vector<int16_t> x16;
  // or, with byte products (gemv_blocks_a16_g32 with vpdpbusd): the same int16 values split into bytes, per block
  // [4, 64]: the low bytes (unsigned) of the block's even columns, of its odd columns, then their high bytes
  // (signed); byte i of each against byte i of the weight block ([M, blocks, 256]; empty when x16 is used)
  std::vector<uint8_t> xg32b;
  std::vector<float> xs4, xq4;
  int64_t blocks64 = 0;
  bool a16 = false;                 // int4 x int16 (xe16 / xo16 or x16)
  // int8 x int16 (gemv_blocks_a16_i8): x as int16 [M, kpad], zero-padded to whole groups; xs, xsum16 as above
  std::vector<int16_t> xk16;
  int64_t kpad = 0;
  // int8 group 32 x int16, two groups per product vector (gemv_blocks_a16_i8_pairs): per 64-column block, x16 in
  // the lane order of the unpacked bytes and the int32 start of each lane's sum (-128 times the x values it
  // meets); pblocks > 0 marks this layout
  std::vector<int16_t> xp16;   // [M, pblocks, 64]
  std::vector<int32_t> xcorr;  // [M, pblocks, 16]
  int64_t pblocks = 0;
  bool a16_i8 = false;
  // int4 x int16 with AVX2 alone (gemv_blocks_a16_u4_avx2): the int16 values (xk16, xs, xsum16 as for int8) split
  // into bytes, [M, 4, half]: the even columns' low bytes (unsigned), their high bytes (signed), then the odd ones'
  std::vector<uint8_t> xb4;
  bool a16_u4 = false;
  // whether xsum, xe and xo are built (the AVX2 int16 roads read none of them, their single rows included)
  bool float_parts = true;
};

// Prepare x for weights of `bits` and `group_size`. int16_activations: x held as int16 per group (callers ask for
// it with bf16 activations only), used with AVX-512 VNNI for int4 with group sizes 32, 64, 128 and 256 and for
// int8 with group sizes that are multiples of 32; with AVX2 alone the same, int4 only where K is a multiple of 64;
// and with finite x.
void quant_prepare(const float* x, int64_t M, int64_t K, int64_t bits, int64_t group_size, bool int16_activations,
                   QuantActivations& out);

// y[m, n] for n in [begin, end) (y: [M, w.N], float32), on the calling thread.
void quant_rows(const QuantWeight& w, const QuantActivations& x, float* y, int64_t begin, int64_t end);

// Whether the GEMVs' software prefetches of the weight stream are non-temporal (off by default: on every CPU
// measured the two-level scheme streamed faster or as fast); settable for an A/B.
bool quant_prefetch_nta();
void set_quant_prefetch_nta(bool nta);
// Whether the prefetches that are not non-temporal go into L2 far ahead and into L1 near (on by default), or
// into L1 alone; settable for an A/B.
bool quant_prefetch_two_level();
void set_quant_prefetch_two_level(bool on);
// Whether int8 weights meet bf16 activations held as int16 (on by default); settable for an A/B.
bool int8_int16_activations();
void set_int8_int16_activations(bool on);
// The same for int4 weights (AVX-512 VNNI and AVX2 builds); settable for an A/B.
bool int4_int16_activations();
void set_int4_int16_activations(bool on);
// Whether int8 group-32 weights against int16 activations take two groups per product vector (on by default);
// settable for an A/B.
bool int8_group_pairs();
void set_int8_group_pairs(bool on);
// Whether int4 group-32 weights against int16 activations on AVX-512 VNNI multiply nibbles by x's bytes (vpdpbusd,
// on by default) or by x's int16 values after widening the nibbles (vpdpwssd); the same integer sums either
// way; settable for an A/B.
bool int4_byte_products();
void set_int4_byte_products(bool on);

}  // namespace hf_fastinfer
