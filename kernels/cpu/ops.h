// The entry points of hf_fastinfer's compiled CPU kernels, one op per .cpp file, bound to Python in module.cpp.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "dense_gemv.h"
#include "quant_gemv.h"

namespace hf_fastinfer {

// quant_gemv.cpp: weight-only quantized GEMV for a few activation rows (hf_fastinfer.kernels.quant_matmul)
at::Tensor quant_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                      int64_t group_size, int64_t in_features, bool int16_activations);

// dense_gemv.cpp: float-weight GEMV for a few activation rows (hf_fastinfer.kernels.linear)
at::Tensor dense_gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// prefill_linear.cpp: many-row products with a float or quantized weight: the weight in fp32, then one product
// (oneDNN's linear with onednn, else BLAS), or (bf16 activations on a CPU with native bf16 products,
// native_bf16) the weight in bf16 and one bf16 GEMM
at::Tensor prefill_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scales,
                        const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                        int64_t group_size, int64_t in_features, bool native_bf16, bool onednn);

// prefill_attention.cpp (AVX-512 and AVX2 builds): attention for many query tokens, q [B, Hq, Lq, D], k / v
// [B, Hkv, Lk, D] (unit stride along D), an optional bool mask [B or 1, 1, Lq, >= Lk] (True = attend), else causal
// (query i sees keys 0..i, as SDPA's is_causal) or full; returns [B, Lq, Hq, D]
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const c10::optional<at::Tensor>& mask, double scaling, bool causal);

// rms_norm.cpp: RMSNorm with an optional fused residual add (hf_fastinfer.kernels.rms_norm)
std::vector<at::Tensor> rms_norm(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> residual, double eps,
                                 bool gemma);

// kv_quant.cpp: int8 KV-cache quantize-and-append (hf_fastinfer.kernels.kv_quant)
void kv_append(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache, at::Tensor k_scale,
               at::Tensor v_scale, at::Tensor slots);

// rotary.cpp: rotary embedding of q and k (hf_fastinfer.kernels.rotary)
void rotary(at::Tensor q, at::Tensor k, at::Tensor q_out, at::Tensor k_out, at::Tensor cos, at::Tensor sin,
            at::Tensor positions, bool interleaved);
// the model's own rotary arithmetic in its dtype (each product rounded, then the sum): new q, k [B, H, S, D]
std::vector<at::Tensor> rotary_model(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                     const at::Tensor& sin, int64_t rotary_dim);

// gated_act.cpp: act(gate) * up (hf_fastinfer.kernels.gated_act); None for input it does not take
c10::optional<at::Tensor> gated_act(const at::Tensor& x, const std::string& activation);

// decoder_layer.cpp (hf_fastinfer.kernels.decoder_layer) -------------------------------------------------------

// One projection of a decoder layer: a float weight [N, K] (bits 0) or a group-quantized one (bits 8 / 4, the
// quant_format layout) with its scales and zero points, and an optional bias. Holds references to the model's
// own tensors (fused q/k/v and gate/up weights are views into one tensor each): no copy of a weight is made.
class Projection {
 public:
  Projection(at::Tensor weight, c10::optional<at::Tensor> scales, c10::optional<at::Tensor> zeros,
             c10::optional<at::Tensor> bias, int64_t bits, int64_t group_size, int64_t in_features);
  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  int64_t bits() const { return bits_; }
  int64_t nbytes() const;
  // activations x [M, K] prepared for this weight's format (nothing for float weights)
  void prepare(const float* x, int64_t M, bool bf16_activations, QuantActivations& qa) const;
  // y[m, n] (float32, [M, N]) for n in [begin, end), on the calling thread
  void rows(const float* x, const QuantActivations& qa, int64_t M, float* y, int64_t begin, int64_t end) const;
  // the fp32 weight rows [n0, n1) (dequantized, or converted from bf16 / fp16) into out [n1 - n0, K]
  void dequantize_rows(int64_t n0, int64_t n1, float* out) const;
  // rows [n0, n1) of a quantized weight as bf16, the values dequantize_rows gives rounded once (AVX512-BF16);
  // false when this CPU or this weight's group layout has no such path (nothing written)
  bool dequantize_rows_bf16(int64_t n0, int64_t n1, c10::BFloat16* out) const;
  // x [..., K] -> [..., N] in x's dtype for many rows (prefill): the weight in fp32, then oneDNN's linear
  // (onednn) or BLAS; with bf16 x and native_bf16, the weight in bf16, then one bf16 GEMM (prefill_linear.cpp)
  at::Tensor matmul(const at::Tensor& x, bool native_bf16 = false, bool onednn = false) const;
  // the whole weight [N, K] in bf16 (bf16: the bf16 GEMM's operand) or fp32 (the fp32 product's), a new tensor
  // unless the float weight already has that dtype
  at::Tensor dense(bool bf16) const;

 private:
  at::Tensor weight_, scales_, zeros_, bias_;
  int64_t bits_ = 0, in_features_ = 0, out_features_ = 0, group_size_ = 0;
};

class DecoderLayer;

// The final norm and output projection of a causal LM, run by a decode chain after the model's last layer in the
// same parallel region (decode_chain's `head`): logits = proj(rms_norm(hidden)) with the roundings of the
// standalone ops the model's own modules run (rms_norm, then dense_gemv / quant_gemv on the T-rounded norm,
// rounded to T once), each thread its 4-aligned share of the vocabulary as those ops split it.
struct DecodeHead {
  DecodeHead(at::Tensor norm_weight, double eps, bool gemma_norm, Projection proj, c10::ScalarType dtype);
  at::Tensor norm_weight;  // float32 [H]
  float eps;
  bool gemma_norm;
  Projection proj;         // [V, H]
  c10::ScalarType dtype;
};

// The arguments of one attn_out_mlp call, checked (decoder_layer.cpp).
struct AttnOutArgs {
  at::Tensor hidden, q, k, v, keys, values, k_scale, v_scale, mask, next_cos, next_sin;
  int64_t slot = -1, attend_len = 0;
  const DecoderLayer* next = nullptr;
};

// A prepared chain's first layer: its q / k / v computed inside the chain's parallel region, with these cos / sin.
struct FirstIn {
  at::Tensor cos, sin;
};

// A pre-norm decoder layer for decode tokens (one query token per sequence), in two calls around the KV-cache
// update (decoder_layer.cpp has the steps and the numerics).
class DecoderLayer {
 public:
  DecoderLayer(at::Tensor input_norm, c10::optional<at::Tensor> post_attention_norm, double eps, bool gemma_norm,
               std::vector<Projection> qkv, Projection o, std::vector<Projection> gate_up,
               c10::optional<Projection> down, c10::optional<at::Tensor> q_norm, c10::optional<at::Tensor> k_norm,
               double qk_eps, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t rotary_dim,
               double scaling, double softcap, const std::string& activation, c10::ScalarType dtype);

  // hidden [B, 1, H]; cos, sin [B or 1, 1, >= R] (the model's rotary module output). Returns q [B, Hq, 1, D],
  // k, v [B, Hkv, 1, D] in the layer's dtype.
  std::vector<at::Tensor> attn_in(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin);

  // hidden [B, 1, H] (the layer's input, the residual); q, k, v from attn_in. The cache, one of:
  //   slot < 0:  keys, values [B, Hkv, L, D] as the cache's update returned them (the new token included);
  //   slot >= 0: the cache's whole buffers [B, Hkv, capacity, D]; k, v are written at `slot` here and attention
  //              reads positions [0, attend_len).
  // Keys / values are of the layer's dtype, or int8 with float16 scales [B, Hkv, L]. mask [B or 1, 1, 1, >= L]
  // bool (True = attend) or additive float, or None. next: a following layer whose attn_in runs on this
  // layer's output in the same parallel region (with next_cos / next_sin). Returns {out [B, 1, H]} (+ the next
  // layer's {q, k, v}), or without a fused MLP {residual [B, 1, H], post-attention norm of it [B, 1, H]} for the
  // model's own MLP module.
  std::vector<at::Tensor> attn_out_mlp(const at::Tensor& hidden, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& keys, const at::Tensor& values,
                                       const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale,
                                       const c10::optional<at::Tensor>& mask, int64_t slot, int64_t attend_len,
                                       const DecoderLayer* next, const c10::optional<at::Tensor>& next_cos,
                                       const c10::optional<at::Tensor>& next_sin);

  // attn_out_mlp for a chain of layers in one parallel region: `chain` starts with this layer, whose inputs are
  // hidden, q, k, v; each later layer takes the one before's output and its q, k, v (computed by the one before),
  // and every layer writes its K/V into its cache's buffers at its slot (one entry per layer in keys ...
  // attend_lens). One mask and one cos / sin for all (layers of one attention type, one rotary table); next: a
  // layer after the chain whose q, k, v are computed at the end; head (the chain ending at the model's last layer,
  // no next): the model's final norm and output projection on the last output, in the same region. Returns every
  // layer's output [B, 1, H], then next's q, k, v, then head's logits [B, V] in the layer's dtype.
  std::vector<at::Tensor> decode_chain(const std::vector<const DecoderLayer*>& chain, const at::Tensor& hidden,
                                       const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                                       const std::vector<c10::optional<at::Tensor>>& k_scales,
                                       const std::vector<c10::optional<at::Tensor>>& v_scales,
                                       const std::vector<int64_t>& slots, const std::vector<int64_t>& attend_lens,
                                       const c10::optional<at::Tensor>& mask, const at::Tensor& cos,
                                       const at::Tensor& sin, const DecoderLayer* next,
                                       const DecodeHead* head = nullptr);

  // bytes of the projection weights (and their scales) one decode step reads
  int64_t weight_bytes() const;

  // the steps of attn_out_mlp (decoder_layer.cpp): checked arguments (`inputs`: hidden, q, k, v too), the
  // buffers of one call, and the part every thread of the team runs
  AttnOutArgs make_args(const at::Tensor& hidden, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& keys, const at::Tensor& values, const c10::optional<at::Tensor>& k_scale,
                        const c10::optional<at::Tensor>& v_scale, const c10::optional<at::Tensor>& mask, int64_t slot,
                        int64_t attend_len, const DecoderLayer* next, const c10::optional<at::Tensor>& next_cos,
                        const c10::optional<at::Tensor>& next_sin, bool inputs) const;
  // (returns_next: the next layer's q, k, v go out to the caller, else they stay inside the chain)
  template <typename T, typename KT>
  // (returns_out: the output goes out to the caller, else its buffer is kept for the next call)
  void prepare_out(const AttnOutArgs& a, void* work, bool returns_next, bool returns_out) const;
  template <typename T, typename KT>
  void run_out_team(void* work, int tid, int nt) const;
  template <typename T>
  void attn_in_team(const T* hidden, int64_t M, const T* cos, int64_t stride_c, const T* sin, int64_t stride_s, T* q,
                    T* k, T* v, std::vector<std::vector<float>>& ys, int tid, int nt) const;
  void qkv_buffers(int64_t M, std::vector<std::vector<float>>& ys) const;
  std::vector<at::Tensor> new_qkv(int64_t M) const;
  std::pair<const void*, int64_t> rotary_rows(const at::Tensor& t, int64_t M, const char* name) const;

 private:
  template <typename T>
  std::vector<at::Tensor> attn_in_impl(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin);
  std::vector<at::Tensor> run(const std::vector<const DecoderLayer*>& layers, std::vector<AttnOutArgs>& args,
                              const DecodeHead* head = nullptr, const FirstIn* first = nullptr,
                              bool last_only = false) const;
  friend class DecodePlan;

  std::vector<Projection> qkv_;
  Projection o_;
  std::vector<Projection> gate_up_;  // empty: the block's MLP stays the model's module; 1: fused [2I, H]; 2: gate, up
  c10::optional<Projection> down_;
  at::Tensor norm1_, norm2_, q_norm_, k_norm_;  // float32 copies of the norm weights (a few KB)
  float eps_, qk_eps_;
  bool gemma_norm_;
  int64_t hidden_ = 0, intermediate_ = 0, num_heads_, num_kv_heads_, head_dim_, rotary_dim_;
  float scaling_, softcap_;  // softcap 0: none
  bool gelu_;
  c10::ScalarType dtype_;
};

// A whole chain of decode layers (the model's, first to last, each MLP fused) with their caches' buffers and the
// head, converted once; each token's call passes only what changes. run: hidden [B, 1, H]; cos, sin [B or 1, 1,
// >= R]; mask as attn_out_mlp's; every layer writes its K/V at `slot` and attends [0, attend_len). The first layer's
// q / k / v are computed in the same parallel region. Returns {the last layer's output [B, 1, H]} (+ the head's
// logits [B, V]). The buffers are the tensors it was built with: a cache that reallocates needs a new plan (the
// caller checks identity); their sizes and strides are read at every call.
class DecodePlan {
 public:
  DecodePlan(std::vector<const DecoderLayer*> layers, std::vector<at::Tensor> keys, std::vector<at::Tensor> values,
             std::vector<c10::optional<at::Tensor>> k_scales, std::vector<c10::optional<at::Tensor>> v_scales,
             const DecodeHead* head);
  std::vector<at::Tensor> run(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                              const c10::optional<at::Tensor>& mask, int64_t slot, int64_t attend_len) const;

 private:
  std::vector<const DecoderLayer*> layers_;
  std::vector<at::Tensor> keys_, values_;
  std::vector<c10::optional<at::Tensor>> k_scales_, v_scales_;
  const DecodeHead* head_;
};

}  // namespace hf_fastinfer
