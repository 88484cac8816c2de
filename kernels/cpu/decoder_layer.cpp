// One pre-norm decoder layer for decode tokens (hf_fastinfer.kernels.decoder_layer's CPU path), in two calls
// around the KV-cache update, which stays the cache's own Python code so that every transformers cache works:
//
//   attn_in       x -> RMSNorm -> q/k/v projections (+ bias) -> q/k RMSNorm (Qwen3) -> rotary -> q, k, v
//   (cache)       keys, values = cache.update(k, v)
//   attn_out_mlp  attention(q, keys, values, mask) -> o_proj -> + x -> RMSNorm -> gate/up -> act * up -> down
//                 -> + residual   (or, for a block whose MLP stays the model's own: the residual and its norm)
//
// Why: at batch 1 the weights are read once per token, which takes a few hundred microseconds a layer on a
// small model, while transformers' layer costs about 0.15 ms of Python and ~60 small ops on top. Here each
// call is one parallel region (threads meet at barriers, not in a thread pool per op), the activations never
// leave fp32 buffers, and the weights are read by the GEMV loops of dense_gemv / quant_gemv.
//
// Numerics follow the model's own forward in its dtype T: every place the model rounds to T (each projection's
// output, the norm, the rotary products and sum, the attention output, each residual add, the activation and
// the gated product) rounds to T here, so that fp32 differs from transformers only by summation order and bf16
// by little more.
#include <ATen/EmptyTensor.h>

#include <limits>
#include <vector>

#include "dense_gemv.h"
#include "gated_act.h"
#include "kv_quant.h"
#include "ops.h"
#include "phases.h"
#include "quant_gemv.h"
#include "rms_norm.h"
#include "simd.h"

namespace hf_fastinfer {

namespace {
// The scratch a thread of a team uses inside one layer step (the normalised input, the residual, attention's
// scores, the activations prepared for a quantized projection), kept with the thread between steps: allocating
// them in every layer cost some 70 allocations a layer and thread, inside the parallel region.
struct TeamScratch {
  std::vector<float> xn, row, head, h, n2, scores, qf, kbuf;
  QuantActivations qkv, qa, qb;  // attn_in's projections; the layer's others (two at a time: gate, up)
};
TeamScratch& team_scratch() {
  static thread_local TeamScratch scratch;
  return scratch;
}
}  // namespace

Projection::Projection(at::Tensor weight, c10::optional<at::Tensor> scales, c10::optional<at::Tensor> zeros,
                       c10::optional<at::Tensor> bias, int64_t bits, int64_t group_size, int64_t in_features)
    : bits_(bits), in_features_(in_features), group_size_(group_size) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.is_contiguous(),
              "Projection: the weight must be a contiguous 2-D CPU tensor");
  weight_ = weight;
  out_features_ = weight.size(0);
  if (bits == 0) {
    TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16 ||
                weight.scalar_type() == at::kHalf, "Projection: a float weight must be float32, bfloat16 or float16");
    TORCH_CHECK(weight.size(1) == in_features, "Projection: weight [N, K] does not match in_features");
  } else {
    TORCH_CHECK(bits == 8 || (bits == 4 && group_size % 2 == 0), "Projection: bits 8, or 4 with an even group size");
    TORCH_CHECK(weight.element_size() == 1, "Projection: a quantized weight is int8 / uint8");
    TORCH_CHECK(weight.size(1) == (bits == 8 ? in_features : (in_features + 1) / 2),
                "Projection: the packed weight's row length does not match in_features");
    TORCH_CHECK(scales.has_value() && scales->is_contiguous() &&
                (scales->scalar_type() == at::kHalf || scales->scalar_type() == at::kFloat),
                "Projection: contiguous float16 / float32 scales");
    const int64_t groups = (in_features + group_size - 1) / group_size;
    TORCH_CHECK(scales->size(0) == out_features_ && scales->size(1) == groups, "Projection: scales must be [N, groups]");
    scales_ = *scales;
    if (zeros.has_value()) {
      TORCH_CHECK(zeros->sizes() == scales->sizes() && zeros->scalar_type() == scales->scalar_type() && zeros->is_contiguous(),
                  "Projection: zeros must match the scales");
      zeros_ = *zeros;
    }
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == out_features_, "Projection: bias must be [N]");
    bias_ = bias->to(at::kFloat).contiguous();
  }
}

void Projection::prepare(const float* x, int64_t M, bool bf16_activations, QuantActivations& qa) const {
  if (bits_ != 0) quant_prepare(x, M, in_features_, bits_, group_size_, bf16_activations, qa);
}

void Projection::rows(const float* x, const QuantActivations& qa, int64_t M, float* y, int64_t begin, int64_t end) const {
  const float* bias = bias_.defined() ? bias_.data_ptr<float>() : nullptr;
  if (bits_ == 0) {
    DenseWeight w;
    w.w = weight_.data_ptr();
    w.bias = bias;
    w.dtype = weight_.scalar_type();
    w.N = out_features_;
    w.K = in_features_;
    dense_rows(w, x, M, y, begin, end);
    return;
  }
  QuantWeight w;
  w.w = reinterpret_cast<const uint8_t*>(weight_.data_ptr());
  w.scales = scales_.data_ptr();
  w.zeros = zeros_.defined() ? zeros_.data_ptr() : nullptr;
  w.bias = bias;
  w.half_scales = scales_.scalar_type() == at::kHalf;
  w.N = out_features_;
  w.K = in_features_;
  w.bits = bits_;
  w.group_size = group_size_;
  w.groups = (in_features_ + group_size_ - 1) / group_size_;
  quant_rows(w, qa, y, begin, end);
}

int64_t Projection::nbytes() const {
  int64_t total = weight_.numel() * weight_.element_size();
  if (scales_.defined()) total += scales_.numel() * scales_.element_size();
  if (zeros_.defined()) total += zeros_.numel() * zeros_.element_size();
  return total;
}

namespace {

// a float32 copy of a 1-D weight, or an empty tensor for None
at::Tensor float_copy(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

#ifdef HF_FASTINFER_AVX512
// the 16 lanes of each of v[0..15] summed, as one vector (lane i: the sum of v[i]): a transposing tree of
// shuffles and adds, a quarter of the instructions of 16 horizontal reductions
inline __m512 reduce16(const __m512* v) {
  __m512 s1[8];
  for (int i = 0; i < 8; ++i)
    s1[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  __m512 s2[4];
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(s1[2 * i]), b = _mm512_castps_pd(s1[2 * i + 1]);
    s2[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[0], s2[1], 0x88), _mm512_shuffle_f32x4(s2[0], s2[1], 0xDD));
  const __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2], s2[3], 0x88), _mm512_shuffle_f32x4(s2[2], s2[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD));
}

template <typename KT>
inline __m512 load_key16(const KT* p, __mmask16 m) {
  if constexpr (std::is_same<KT, int8_t>::value)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
  else
    return load16(p, m);
}
#endif

#ifdef HF_FASTINFER_AVX2
// reduce16's 8-lane form: lane i of the result is the sum of v[i]'s 8 lanes (pairwise adds within each 128-bit
// half, then the two halves)
inline __m256 reduce8(const __m256* v) {
  const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

// pv_heads in 8 lanes: columns [d0, d0 + 8 NV) of NH heads (NH * NV accumulators, the V row's NV vectors and
// the probabilities fit AVX2's 16 registers for NH <= 2, NV <= 4), the positions in order, the same skips
template <typename KT, int NH, int NV>
void pv_heads8(const float* p, int64_t L, const KT* v, int64_t stride_vl, const c10::Half* vs, int64_t stride_vsl,
               int64_t D, int64_t d0, const bool* dead, float* o_out /* [NH, D] unscaled sums */) {
  constexpr bool quantized = std::is_same<KT, int8_t>::value;
  __m256 o[NH][NV];
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < NV; ++c) o[h][c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < L; ++j) {
    float ph[NH];
    bool any = false;
    for (int h = 0; h < NH; ++h) {
      ph[h] = dead[h] ? 0.f : p[h * L + j];  // already rounded to T by attend_heads' exp pass
      if constexpr (quantized) ph[h] *= to_f32(vs[j * stride_vsl]);
      any |= ph[h] != 0.f;
    }
    if (!any) continue;
    const KT* vr = v + j * stride_vl + d0;
    __m256 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = load8(vr + 8 * c);
    for (int h = 0; h < NH; ++h) {
      if (ph[h] == 0.f) continue;
      const __m256 pv = _mm256_set1_ps(ph[h]);
      for (int c = 0; c < NV; ++c) o[h][c] = _mm256_fmadd_ps(pv, vv[c], o[h][c]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < NV; ++c) _mm256_storeu_ps(o_out + h * D + d0 + 8 * c, o[h][c]);
}

template <typename KT, int NH>
void pv_pass8(int nv, const float* p, int64_t L, const KT* v, int64_t stride_vl, const c10::Half* vs,
              int64_t stride_vsl, int64_t D, int64_t d0, const bool* dead, float* o) {
  switch (nv) {
    case 1: pv_heads8<KT, NH, 1>(p, L, v, stride_vl, vs, stride_vsl, D, d0, dead, o); break;
    case 2: pv_heads8<KT, NH, 2>(p, L, v, stride_vl, vs, stride_vsl, D, d0, dead, o); break;
    case 3: pv_heads8<KT, NH, 3>(p, L, v, stride_vl, vs, stride_vsl, D, d0, dead, o); break;
    default: pv_heads8<KT, NH, 4>(p, L, v, stride_vl, vs, stride_vsl, D, d0, dead, o); break;
  }
}
#endif

#if defined(HF_FASTINFER_AVX512) || defined(HF_FASTINFER_AVX2)
// Software prefetch into L1 of rows [r0, r1) of a cache buffer (stride and row size in elements of KT). The
// cache's rows are cold at every decode step (a token's weights pass through the caches after them), and the
// hardware prefetcher alone keeps too few misses in flight: one core read a KV head's keys and values at
// about 5 GB/s without it, 2.5x slower than with it (BENCHMARKS.md, "Kernel library, CPU paths").
template <typename KT>
inline void prefetch_rows(const KT* base, int64_t stride, int64_t r0, int64_t r1, int64_t row) {
  const int64_t bytes = row * static_cast<int64_t>(sizeof(KT));
  for (int64_t r = r0; r < r1; ++r) {
    const char* p = reinterpret_cast<const char*>(base + r * stride);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
  }
}
// the keys ahead of the ones being read that attend_heads prefetches (one block of 16: further gained nothing)
constexpr int64_t kPrefetchKeys = 16;
#endif

// the most query heads one attend_heads call takes (a longer GQA group is split into runs)
constexpr int kMaxRunHeads = 32;

// The PV product of NH heads of one KV group: o_h = sum_j p_h[j] * v_j, each V row loaded (and converted)
// once for all NH heads, the positions in order (each head's sums are what a loop of its own would give).
// p: [NH rows of L] probabilities, rounded to T; vs: the int8 cache's value scales or null; dead[h]: a head with
// nothing to attend to (left at zero). CH: D's 16-lane chunks when known at compile time (0: at run time).
#ifdef HF_FASTINFER_AVX512
template <typename T, typename KT, int NH, int CH>
void pv_heads(const float* p, int64_t L, const KT* v, int64_t stride_vl, const c10::Half* vs, int64_t stride_vsl,
              int64_t D, const bool* dead, float* o_out /* [NH, D] unscaled sums */) {
  constexpr bool quantized = std::is_same<KT, int8_t>::value;
  const int64_t chunks = CH > 0 ? CH : (D + 15) / 16;
  __m512 o[NH][8];
  __mmask16 om[8];
  for (int64_t c = 0; c < chunks; ++c) {
    om[c] = tail_mask(D - 16 * c);
    for (int h = 0; h < NH; ++h) o[h][c] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < L; ++j) {
    float ph[NH];
    bool any = false;
    for (int h = 0; h < NH; ++h) {
      ph[h] = dead[h] ? 0.f : p[h * L + j];  // already rounded to T by attend_heads' exp pass
      if constexpr (quantized) ph[h] *= to_f32(vs[j * stride_vsl]);
      any |= ph[h] != 0.f;
    }
    if (!any) continue;  // masked (or underflowed) for every head: adds nothing
    const KT* vr = v + j * stride_vl;
    __m512 vv[8];
    for (int64_t c = 0; c < chunks; ++c) vv[c] = load_key16(vr + 16 * c, om[c]);
    for (int h = 0; h < NH; ++h) {
      if (ph[h] == 0.f) continue;  // as a head of its own would skip it
      const __m512 pv = _mm512_set1_ps(ph[h]);
      for (int64_t c = 0; c < chunks; ++c) o[h][c] = _mm512_fmadd_ps(pv, vv[c], o[h][c]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int64_t c = 0; c < chunks; ++c) _mm512_mask_storeu_ps(o_out + h * D + 16 * c, om[c], o[h][c]);
}
#endif

// Attention of nh query heads that share one KV head (consecutive heads of a GQA group) against its keys:
// scores in fp32, softmax, weighted values; each result rounded to T. Each key and value row is read and
// converted once for the nh heads (the group's heads used to read the cache once each); every head's
// arithmetic is the same as a pass of its own. K/V element type KT: T, or int8 with a float16 scale per
// position (the int8 cache). mask: bool (True = attend) or additive float, read through strides; None attends
// to every key. q: [nh, D]; scores: [nh, L] scratch; kbuf: [16, 16 * ceil(D / 16)] scratch; out: [nh, D].
// CH: D / 16 when the caller knows it at compile time (head dims 64 and 128), else 0. With the chunk count a
// run-time value the compiler keeps the per-chunk accumulators in memory, not in registers: a single-core
// harness (3 heads of dim 64, 320 cached positions) took 47 TSC ticks a position with it, 25 with CH = 4.
template <typename T, typename KT, int CH>
void attend_heads(int nh, const float* q, const KT* k, const KT* v, int64_t stride_kl, int64_t stride_vl,
                  const c10::Half* ks, const c10::Half* vs, int64_t stride_ksl, int64_t stride_vsl, int64_t L, int64_t D,
                  float scaling, float softcap, const bool* mask_b, const float* maskf, const T* maskt,
                  int64_t stride_ml, float* scores, float* kbuf, float* out) {
  constexpr bool quantized = std::is_same<KT, int8_t>::value;
  // raw dot products q . k_l (masked positions too: cheaper than branching on them)
  int64_t l = 0;
  const int64_t chunks = CH > 0 ? CH : (D + 15) / 16;
#ifdef HF_FASTINFER_AVX512
  if (chunks <= 8) {
    __mmask16 qm[8];
    for (int64_t c = 0; c < chunks; ++c) qm[c] = tail_mask(D - 16 * c);
    const int64_t row = 16 * chunks;  // floats per key in kbuf
    prefetch_rows(k, stride_kl, 0, std::min(kPrefetchKeys, L), D);
    for (; l + 16 <= L; l += 16) {  // 16 keys as float once, then each head's 16 sums reduced together
      // the keys of the block ahead, and this block's values (read after the softmax: they arrive meanwhile)
      prefetch_rows(k, stride_kl, l + 16, std::min(l + 16 + kPrefetchKeys, L), D);
      prefetch_rows(v, stride_vl, l, l + 16, D);
      if constexpr (quantized) {  // their float16 scales, 32 positions a line
        if (stride_ksl == 1 && stride_vsl == 1) {
          _mm_prefetch(reinterpret_cast<const char*>(ks + std::min(l + 16, L - 1)), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(vs + l), _MM_HINT_T0);
        }
      }
      for (int j = 0; j < 16; ++j) {
        const KT* kr = k + (l + j) * stride_kl;
        for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(kbuf + j * row + 16 * c, load_key16(kr + 16 * c, qm[c]));
      }
      for (int h = 0; h < nh; ++h) {
        __m512 qv[8];
        for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm512_maskz_loadu_ps(qm[c], q + h * D + 16 * c);
        __m512 acc[16];
        for (int j = 0; j < 16; ++j) {
          __m512 a = _mm512_setzero_ps();
          for (int64_t c = 0; c < chunks; ++c) a = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kbuf + j * row + 16 * c), a);
          acc[j] = a;
        }
        _mm512_storeu_ps(scores + h * L + l, reduce16(acc));
      }
    }
    prefetch_rows(v, stride_vl, l, L, D);  // the last values, whose keys the scalar loop below takes
  }
#elif defined(HF_FASTINFER_AVX2)
  if (D % 8 == 0) {  // the same in 8 lanes: 8 keys as float once, each head's 8 sums reduced together
    const int64_t c8 = CH > 0 ? 2 * CH : D / 8;  // kbuf holds 8 keys of D floats
    prefetch_rows(k, stride_kl, 0, std::min(kPrefetchKeys, L), D);
    for (; l + 8 <= L; l += 8) {
      prefetch_rows(k, stride_kl, l + 8, std::min(l + 8 + kPrefetchKeys, L), D);
      prefetch_rows(v, stride_vl, l, l + 8, D);
      if constexpr (quantized) {
        if (stride_ksl == 1 && stride_vsl == 1) {
          _mm_prefetch(reinterpret_cast<const char*>(ks + std::min(l + 8, L - 1)), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(vs + l), _MM_HINT_T0);
        }
      }
      for (int j = 0; j < 8; ++j) {
        const KT* kr = k + (l + j) * stride_kl;
        for (int64_t c = 0; c < c8; ++c) _mm256_storeu_ps(kbuf + j * D + 8 * c, load8(kr + 8 * c));
      }
      for (int h = 0; h < nh; ++h) {
        const float* qh = q + h * D;
        __m256 acc[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          __m256 a = _mm256_setzero_ps();
          for (int64_t c = 0; c < c8; ++c) a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * c), _mm256_loadu_ps(kbuf + j * D + 8 * c), a);
          acc[j] = a;
        }
        _mm256_storeu_ps(scores + h * L + l, reduce8(acc));
      }
    }
    prefetch_rows(v, stride_vl, l, L, D);
  }
#endif
  for (int h = 0; h < nh; ++h)
    for (int64_t i = l; i < L; ++i) {
      const KT* kr = k + i * stride_kl;
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += q[h * D + d] * static_cast<float>(kr[d]);
      scores[h * L + i] = s;
    }
  // per head: scaling, the int8 keys' scales, softcap, the mask; the maximum; the exponentials and their sum
  bool dead[kMaxRunHeads];
  float inv[kMaxRunHeads];
  for (int h = 0; h < nh; ++h) {
    float* sc = scores + h * L;
    float best = -std::numeric_limits<float>::infinity();
    l = 0;
#if defined(HF_FASTINFER_AVX512) || defined(HF_FASTINFER_AVX2)
    // 16 (8) positions at a time where the mask and the key scales are contiguous and there is no softcap (the
    // same operations in the same order as the loop below; the maximum ignores NaN scores as std::max does)
    const bool contiguous = (mask_b == nullptr && maskf == nullptr && maskt == nullptr) || stride_ml == 1;
    const bool vector_pass = softcap == 0.f && contiguous && (!quantized || stride_ksl == 1);
#endif
#ifdef HF_FASTINFER_AVX512
    if (vector_pass) {
      const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), sv = _mm512_set1_ps(scaling);
      __m512 bv = ninf;
      for (; l < L; l += 16) {
        const __mmask16 m = tail_mask(L - l);
        __m512 x = _mm512_maskz_loadu_ps(m, sc + l);
        if constexpr (quantized) x = _mm512_mul_ps(x, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, ks + l)));
        x = _mm512_mul_ps(x, sv);
        if (maskf != nullptr) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, maskf + l));
        if (maskt != nullptr) x = _mm512_add_ps(x, load16(maskt + l, m));
        __mmask16 keep = m;
        if (mask_b != nullptr)  // bool: one byte per position, nonzero = attend
          keep &= _mm_test_epi8_mask(_mm_maskz_loadu_epi8(m, mask_b + l), _mm_set1_epi8(static_cast<char>(0xFF)));
        x = _mm512_mask_blend_ps(keep, ninf, x);
        _mm512_mask_storeu_ps(sc + l, m, x);
        bv = _mm512_max_ps(x, bv);
      }
      best = _mm512_reduce_max_ps(bv);
    }
#elif defined(HF_FASTINFER_AVX2)
    if (vector_pass) {  // whole 8s; the loop below takes the rest, from the same running maximum
      const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), sv = _mm256_set1_ps(scaling);
      __m256 bv = ninf;
      for (; l + 8 <= L; l += 8) {
        __m256 x = _mm256_loadu_ps(sc + l);
        if constexpr (quantized)
          x = _mm256_mul_ps(x, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ks + l))));
        x = _mm256_mul_ps(x, sv);
        if (maskf != nullptr) x = _mm256_add_ps(x, _mm256_loadu_ps(maskf + l));
        if (maskt != nullptr) x = _mm256_add_ps(x, load8(maskt + l));
        if (mask_b != nullptr) {  // bool: one byte per position, zero = masked
          const __m256i mb = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask_b + l)));
          x = _mm256_blendv_ps(x, ninf, _mm256_castsi256_ps(_mm256_cmpeq_epi32(mb, _mm256_setzero_si256())));
        }
        _mm256_storeu_ps(sc + l, x);
        bv = _mm256_max_ps(x, bv);
      }
      best = hmax8(bv);
    }
#endif
    for (; l < L; ++l) {
      if (mask_b != nullptr && !mask_b[l * stride_ml]) {
        sc[l] = -std::numeric_limits<float>::infinity();
        continue;
      }
      float s = sc[l];
      if constexpr (quantized) s *= to_f32(ks[l * stride_ksl]);
      s *= scaling;
      if (softcap > 0.f) s = std::tanh(s / softcap) * softcap;
      if (maskf != nullptr) s += maskf[l * stride_ml];
      if (maskt != nullptr) s += static_cast<float>(maskt[l * stride_ml]);
      sc[l] = s;
      best = std::max(best, s);
    }
    dead[h] = best == -std::numeric_limits<float>::infinity();  // nothing to attend to: zeros, not NaN
    if (dead[h]) continue;
    float total = 0.f;
    l = 0;
#ifdef HF_FASTINFER_AVX512
    const __m512 shift = _mm512_set1_ps(best);
    __m512 sum = _mm512_setzero_ps();
    for (; l < L; l += 16) {
      const __mmask16 m = tail_mask(L - l);
      const __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + l), shift));
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, p));
      // stored rounded to T, the value that meets V (pv_heads reads it as is)
      _mm512_mask_storeu_ps(sc + l, m, round16(p, static_cast<const T*>(nullptr)));
    }
    total = _mm512_reduce_add_ps(sum);
#else
#ifdef HF_FASTINFER_AVX2
    const __m256 shift = _mm256_set1_ps(best);
    __m256 sum = _mm256_setzero_ps();
    for (; l + 8 <= L; l += 8) {
      const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + l), shift));
      sum = _mm256_add_ps(sum, p);
      _mm256_storeu_ps(sc + l, round8(p, static_cast<const T*>(nullptr)));  // as the AVX-512 pass stores them
    }
    total = hsum8(sum);
#endif
    for (; l < L; ++l) {  // stored rounded to T as well (the 8-lane PV reads them as is)
      const float e = std::exp(sc[l] - best);
      total += e;
      sc[l] = round_to<T>(e);
    }
#endif
    inv[h] = 1.f / total;
  }
  // the probabilities meet V rounded to T, as PyTorch's CPU SDPA kernels (transformers' path) round them before
  // their P·V product; the sums above are of the unrounded values, as there
  std::fill(out, out + nh * D, 0.f);
  int h0 = 0;
#ifdef HF_FASTINFER_AVX512
  if (chunks <= 8) {  // the output rows in registers: up to 4 heads of 64 dims (2 of 128) per pass
    const int per_pass = chunks <= 4 ? 4 : 2;
    for (; h0 < nh; h0 += per_pass) {
      const int count = std::min(per_pass, nh - h0);
      const float* p = scores + h0 * L;
      float* o = out + h0 * D;
      switch (count) {
        case 1: pv_heads<T, KT, 1, CH>(p, L, v, stride_vl, vs, stride_vsl, D, dead + h0, o); break;
        case 2: pv_heads<T, KT, 2, CH>(p, L, v, stride_vl, vs, stride_vsl, D, dead + h0, o); break;
        case 3: pv_heads<T, KT, 3, CH>(p, L, v, stride_vl, vs, stride_vsl, D, dead + h0, o); break;
        default: pv_heads<T, KT, 4, CH>(p, L, v, stride_vl, vs, stride_vsl, D, dead + h0, o); break;
      }
    }
  }
#elif defined(HF_FASTINFER_AVX2)
  if (D % 8 == 0) {  // two heads a pass, 32 columns at a time
    for (; h0 < nh; h0 += 2) {
      const float* p = scores + h0 * L;
      float* o = out + h0 * D;
      for (int64_t d0 = 0; d0 < D; d0 += 32) {
        const int nv = static_cast<int>(std::min<int64_t>(4, (D - d0) / 8));
        if (nh - h0 >= 2)
          pv_pass8<KT, 2>(nv, p, L, v, stride_vl, vs, stride_vsl, D, d0, dead + h0, o);
        else
          pv_pass8<KT, 1>(nv, p, L, v, stride_vl, vs, stride_vsl, D, d0, dead + h0, o);
      }
    }
    h0 = nh;
  }
#endif
  for (int h = h0; h < nh; ++h) {
    if (dead[h]) continue;
    for (int64_t j = 0; j < L; ++j) {
      float p = round_to<T>(scores[h * L + j]);
      if (p == 0.f) continue;
      if constexpr (quantized) p *= to_f32(vs[j * stride_vsl]);
      const KT* vr = v + j * stride_vl;
      for (int64_t d = 0; d < D; ++d) out[h * D + d] += p * static_cast<float>(vr[d]);
    }
  }
  for (int h = 0; h < nh; ++h) {
    if (dead[h]) continue;
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = round_to<T>(out[h * D + d] * inv[h]);
  }
}

}  // namespace

DecoderLayer::DecoderLayer(at::Tensor input_norm, c10::optional<at::Tensor> post_attention_norm, double eps,
                           bool gemma_norm, std::vector<Projection> qkv, Projection o, std::vector<Projection> gate_up,
                           c10::optional<Projection> down, c10::optional<at::Tensor> q_norm,
                           c10::optional<at::Tensor> k_norm, double qk_eps, int64_t num_heads, int64_t num_kv_heads,
                           int64_t head_dim, int64_t rotary_dim, double scaling, double softcap,
                           const std::string& activation, c10::ScalarType dtype)
    : qkv_(std::move(qkv)), o_(std::move(o)), gate_up_(std::move(gate_up)), down_(std::move(down)),
      eps_(static_cast<float>(eps)), qk_eps_(static_cast<float>(qk_eps)), gemma_norm_(gemma_norm),
      num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), rotary_dim_(rotary_dim),
      scaling_(static_cast<float>(scaling)), softcap_(static_cast<float>(softcap)), gelu_(activation == "gelu_tanh"),
      dtype_(dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "DecoderLayer: float32, bfloat16 or float16");
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "DecoderLayer: query heads must be a multiple of KV heads");
  TORCH_CHECK(rotary_dim % 2 == 0 && rotary_dim <= head_dim, "DecoderLayer: rotary_dim must be even and <= head_dim");
  TORCH_CHECK(activation == "silu" || activation == "gelu_tanh", "DecoderLayer: activation silu or gelu_tanh");
  hidden_ = input_norm.numel();
  norm1_ = input_norm.to(at::kFloat).contiguous();
  norm2_ = float_copy(post_attention_norm);
  q_norm_ = float_copy(q_norm);
  k_norm_ = float_copy(k_norm);
  int64_t total = 0;
  for (const auto& p : qkv_) {
    TORCH_CHECK(p.in_features() == hidden_, "DecoderLayer: q/k/v projections must read the hidden size");
    total += p.out_features();
  }
  TORCH_CHECK(total == (num_heads + 2 * num_kv_heads) * head_dim, "DecoderLayer: q/k/v projections give ", total,
              " features, the heads need ", (num_heads + 2 * num_kv_heads) * head_dim);
  TORCH_CHECK(o_.in_features() == num_heads * head_dim && o_.out_features() == hidden_, "DecoderLayer: o_proj shape");
  TORCH_CHECK(norm2_.defined(), "DecoderLayer: the post-attention norm is needed");
  if (!gate_up_.empty()) {
    TORCH_CHECK(down_.has_value(), "DecoderLayer: a gated MLP needs its down projection");
    intermediate_ = down_->in_features();
    const int64_t gu = gate_up_.size() == 1 ? gate_up_[0].out_features() / 2 : gate_up_[0].out_features();
    TORCH_CHECK(gate_up_.size() <= 2 && gu == intermediate_ && down_->out_features() == hidden_,
                "DecoderLayer: gate/up/down shapes do not match");
    if (gate_up_.size() == 2) TORCH_CHECK(gate_up_[1].out_features() == intermediate_, "DecoderLayer: up_proj shape");
  }
}

int64_t DecoderLayer::weight_bytes() const {
  int64_t total = o_.nbytes();
  for (const auto& p : qkv_) total += p.nbytes();
  for (const auto& p : gate_up_) total += p.nbytes();
  if (down_.has_value()) total += down_->nbytes();
  return total;
}


// ----------------------------------------------------------------------------------------------------------
// attn_in: norm, q/k/v projections, q/k norms, rotary
// ----------------------------------------------------------------------------------------------------------

// Run by every thread of a team (inside a parallel region): hidden [M, H] (T) -> q [M, Hq, D], k, v [M, Hkv, D]
// (T). cos / sin rows: cp + m * stride_c (T, >= R values). ys: one float buffer [M, N_i] per projection,
// allocated by the caller before the region. Ends without a barrier (each thread writes its own heads).
template <typename T>
void DecoderLayer::attn_in_team(const T* hp, int64_t M, const T* cp, int64_t stride_c, const T* sp, int64_t stride_s,
                                T* qp, T* kp, T* vp, std::vector<std::vector<float>>& ys, int tid, int nt) const {
  const int64_t H = hidden_, D = head_dim_, Hq = num_heads_, Hkv = num_kv_heads_;
  const bool bf16 = std::is_same<T, c10::BFloat16>::value;
  // 1. the normalised input (T values held as float): every thread its own copy, a few hundred values
  TeamScratch& scratch = team_scratch();
  std::vector<float>& xn = scratch.xn;
  std::vector<float>& row = scratch.row;
  xn.resize(M * H);
  row.resize(H);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t d = 0; d < H; ++d) row[d] = static_cast<float>(hp[m * H + d]);
    rms_norm_row<T>(row.data(), norm1_.data_ptr<float>(), xn.data() + m * H, H, eps_, gemma_norm_);
  }
  // 2. each projection's rows split across the team
  for (size_t i = 0; i < qkv_.size(); ++i) {
    QuantActivations& qa = scratch.qkv;
    qkv_[i].prepare(xn.data(), M, bf16, qa);
    int64_t begin, end;
    thread_share(qkv_[i].out_features(), 4, tid, nt, begin, end);
    qkv_[i].rows(xn.data(), qa, M, ys[i].data(), begin, end);
  }
  HF_PHASE(tid, kQkv);
#pragma omp barrier
  HF_PHASE(tid, kWaitQkv);
  // 3. per (sequence, head): the projection's output rounded to T, q/k norm, rotary; v copied
  const int64_t total = (Hq + 2 * Hkv) * D, R = rotary_dim_, half = R / 2;
  // column c of row m of the q | k | v output: one fused projection, or q, k, v apart
  const auto part = [&](int64_t m, int64_t c) -> const float* {
    if (ys.size() == 1) return ys[0].data() + m * total + c;
    const int64_t which = c < Hq * D ? 0 : (c < (Hq + Hkv) * D ? 1 : 2);
    const int64_t start = which == 0 ? 0 : (which == 1 ? Hq * D : (Hq + Hkv) * D);
    return ys[which].data() + m * qkv_[which].out_features() + (c - start);
  };
  std::vector<float>& head = scratch.head;
  head.resize(D);
  int64_t begin, end;
  thread_share(M * (Hq + 2 * Hkv), 1, tid, nt, begin, end);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t m = item / (Hq + 2 * Hkv), h = item % (Hq + 2 * Hkv);
    const float* src = part(m, h * D);
    for (int64_t d = 0; d < D; ++d) head[d] = round_to<T>(src[d]);
    if (h >= Hq + Hkv) {  // v
      T* dst = vp + (m * Hkv + h - Hq - Hkv) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(head[d]);
      continue;
    }
    const bool is_q = h < Hq;
    const at::Tensor& qk_norm = is_q ? q_norm_ : k_norm_;
    if (qk_norm.defined()) rms_norm_row<T>(head.data(), qk_norm.data_ptr<float>(), head.data(), D, qk_eps_, gemma_norm_);
    T* dst = is_q ? qp + (m * Hq + h) * D : kp + (m * Hkv + h - Hq) * D;
    // q * cos + rotate_half(q) * sin, elementwise in T as the model computes it: each product rounded to T,
    // then their sum (rotate_half(q)[j] = -q[j + R/2] for j < R/2, q[j - R/2] after)
    const T* c = cp + m * stride_c;
    const T* s = sp + m * stride_s;
    for (int64_t j = 0; j < R; ++j) {
      const float rotated = j < half ? -head[j + half] : head[j - half];
      dst[j] = static_cast<T>(round_to<T>(head[j] * static_cast<float>(c[j])) +
                              round_to<T>(rotated * static_cast<float>(s[j])));
    }
    for (int64_t j = R; j < D; ++j) dst[j] = static_cast<T>(head[j]);
  }
  HF_PHASE(tid, kRope);
}

// the per-projection output buffers attn_in_team writes, sized for M rows in place (a vector kept from an
// earlier call of the same size neither allocates nor fills)
void DecoderLayer::qkv_buffers(int64_t M, std::vector<std::vector<float>>& ys) const {
  ys.resize(qkv_.size());
  for (size_t i = 0; i < qkv_.size(); ++i) ys[i].resize(M * qkv_[i].out_features());
}

// cos / sin [B or 1, 1, >= R] of the layer's dtype as rows: (pointer, stride between sequences)
std::pair<const void*, int64_t> DecoderLayer::rotary_rows(const at::Tensor& t, int64_t M, const char* name) const {
  TORCH_CHECK(t.scalar_type() == dtype_ && t.size(-1) >= rotary_dim_ && t.stride(-1) == 1,
              name, " must be [B, 1, >= rotary_dim] of the layer's dtype, contiguous along the last dim");
  const int64_t rows = t.numel() / t.size(-1);
  TORCH_CHECK(rows == 1 || rows == M, name, " must have one row per sequence (or one for all)");
  TORCH_CHECK(t.dim() < 2 || rows == 1 || t.size(-2) == 1, name, " must have one token per sequence");
  return {t.data_ptr(), rows == 1 ? 0 : t.stride(0)};
}

std::vector<at::Tensor> DecoderLayer::new_qkv(int64_t M) const {
  return {at::detail::empty_cpu({M, num_heads_, 1, head_dim_}, dtype_, false, c10::nullopt),
          at::detail::empty_cpu({M, num_kv_heads_, 1, head_dim_}, dtype_, false, c10::nullopt),
          at::detail::empty_cpu({M, num_kv_heads_, 1, head_dim_}, dtype_, false, c10::nullopt)};
}

template <typename T>
std::vector<at::Tensor> DecoderLayer::attn_in_impl(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t M = hidden.size(0);
  const auto [cp, stride_c] = rotary_rows(cos, M, "cos");
  const auto [sp, stride_s] = rotary_rows(sin, M, "sin");
  auto qkv = new_qkv(M);
  std::vector<std::vector<float>> ys;
  qkv_buffers(M, ys);
  const int nt = team_size();
#pragma omp parallel num_threads(nt)
  attn_in_team<T>(hidden.data_ptr<T>(), M, static_cast<const T*>(cp), stride_c, static_cast<const T*>(sp), stride_s,
                  qkv[0].data_ptr<T>(), qkv[1].data_ptr<T>(), qkv[2].data_ptr<T>(), ys, omp_get_thread_num(),
                  omp_get_num_threads());
  return qkv;
}

std::vector<at::Tensor> DecoderLayer::attn_in(const at::Tensor& hidden_in, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(hidden_in.scalar_type() == dtype_ && hidden_in.size(-1) == hidden_,
              "attn_in: hidden states must be [B, 1, hidden] of the layer's dtype");
  const int64_t M = hidden_in.numel() / hidden_;
  const auto hidden = hidden_in.reshape({M, hidden_}).contiguous();
  switch (dtype_) {
    case at::kFloat: return attn_in_impl<float>(hidden, cos, sin);
    case at::kBFloat16: return attn_in_impl<c10::BFloat16>(hidden, cos, sin);
    default: return attn_in_impl<c10::Half>(hidden, cos, sin);
  }
}

// ----------------------------------------------------------------------------------------------------------
// attn_out_mlp: (cache write,) attention, o_proj, residual, norm, gated MLP, residual (, next layer's attn_in)
// ----------------------------------------------------------------------------------------------------------

// Everything one layer's attn_out_mlp step reads and writes, prepared before the parallel region (so that a
// chain of layers runs in one region: decode_chain).
template <typename T, typename KT>
struct OutWork {
  const DecoderLayer* layer = nullptr;
  int64_t M = 0, L = 0, slot = -1;
  const T* hp = nullptr;  // the layer's input [M, H]
  const T* qp = nullptr;  // q [M, Hq, D]
  const T* kn = nullptr;  // this token's k, v [M, Hkv, D] (written at `slot`)
  const T* vn = nullptr;
  KT* kp = nullptr;
  KT* vp = nullptr;
  int64_t k0 = 0, k1 = 0, k2 = 0, v0 = 0, v1 = 0, v2 = 0;  // keys / values strides
  c10::Half* ksp = nullptr;
  c10::Half* vsp = nullptr;
  int64_t ks0 = 0, ks1 = 0, ks2 = 0, vs0 = 0, vs1 = 0, vs2 = 0;  // scales' strides
  const bool* mb = nullptr;
  const float* mf = nullptr;
  const T* mt = nullptr;
  int64_t stride_mb = 0, stride_ml = 0;
  std::vector<float> attn, yo, act, yd, yg, yu;
  at::Tensor out, normed;
  // the next layer's attn_in on this layer's output
  const DecoderLayer* next = nullptr;
  std::vector<at::Tensor> next_qkv;
  std::vector<std::vector<float>> next_ys;
  bool returned = false;  // next_qkv went out to the caller: the next call must not write into it
  bool out_returned = true;  // out went out to the caller (or was never made): the next call makes a new one
  std::pair<const void*, int64_t> next_c{nullptr, 0}, next_s{nullptr, 0};
};

template <typename T, typename KT>
void DecoderLayer::prepare_out(const AttnOutArgs& a, void* work_ptr, bool returns_next, bool returns_out) const {
  auto& w = *static_cast<OutWork<T, KT>*>(work_ptr);
  constexpr bool quantized = std::is_same<KT, int8_t>::value;
  const int64_t M = a.hidden.size(0), H = hidden_, D = head_dim_, Hq = num_heads_, I = intermediate_;
  w.layer = this;
  w.M = M;
  w.L = a.attend_len;
  w.slot = a.slot;
  w.hp = a.hidden.data_ptr<T>();
  w.qp = a.q.data_ptr<T>();
  w.kn = a.slot >= 0 ? a.k.data_ptr<T>() : nullptr;
  w.vn = a.slot >= 0 ? a.v.data_ptr<T>() : nullptr;
  w.kp = a.keys.data_ptr<KT>();
  w.vp = a.values.data_ptr<KT>();
  w.k0 = a.keys.stride(0), w.k1 = a.keys.stride(1), w.k2 = a.keys.stride(2);
  w.v0 = a.values.stride(0), w.v1 = a.values.stride(1), w.v2 = a.values.stride(2);
  if constexpr (quantized) {
    w.ksp = a.k_scale.data_ptr<c10::Half>();
    w.vsp = a.v_scale.data_ptr<c10::Half>();
    w.ks0 = a.k_scale.stride(0), w.ks1 = a.k_scale.stride(1), w.ks2 = a.k_scale.stride(2);
    w.vs0 = a.v_scale.stride(0), w.vs1 = a.v_scale.stride(1), w.vs2 = a.v_scale.stride(2);
  }
  // mask [Bm, 1, 1, Lm] (Bm 1 or B, Lm >= L): bool, or additive float32 / T
  w.mb = nullptr;
  w.mf = nullptr;
  w.mt = nullptr;
  if (a.mask.defined()) {
    w.stride_mb = a.mask.size(0) == 1 ? 0 : a.mask.stride(0);
    w.stride_ml = a.mask.stride(3);
    if (a.mask.scalar_type() == at::kBool)
      w.mb = a.mask.data_ptr<bool>();
    else if (a.mask.scalar_type() == at::kFloat)
      w.mf = a.mask.data_ptr<float>();
    else
      w.mt = a.mask.data_ptr<T>();
  }
  const bool mlp = !gate_up_.empty();
  // (the buffers keep their size from the call before: resizing to it neither allocates nor fills)
  w.attn.resize(M * Hq * D);
  w.yo.resize(M * H);
  if (mlp) {
    w.act.resize(M * I);
    w.yd.resize(M * H);
    w.yg.resize(M * (gate_up_.size() == 1 ? 2 * I : I));
    if (gate_up_.size() == 2) w.yu.resize(M * I);
  }
  // an output that goes to the caller is a new tensor every call; one that only feeds the next layer of the chain
  // (a prepared chain returns the last layer's alone) keeps its buffer from the call before
  const bool reuse_out = !returns_out && !w.out_returned && w.out.defined() && w.out.size(0) == M &&
                         w.out.size(2) == H && w.out.scalar_type() == dtype_;
  if (!reuse_out) w.out = at::detail::empty_cpu({M, 1, H}, dtype_, false, c10::nullopt);
  w.out_returned = returns_out;
  w.normed = mlp ? at::Tensor() : at::detail::empty_cpu({M, 1, H}, dtype_, false, c10::nullopt);
  w.next = a.next;
  if (a.next != nullptr) {
    // q / k / v of the next layer: kept from the call before when the chain goes on to that layer in this
    // parallel region (nothing outside reads them), new when they are returned
    const auto& q0 = w.next_qkv.empty() ? at::Tensor() : w.next_qkv[0];
    const bool reuse = !returns_next && !w.returned && q0.defined() && q0.size(0) == M && q0.scalar_type() == dtype_ &&
                       q0.size(1) == a.next->num_heads_ && q0.size(3) == a.next->head_dim_ &&
                       w.next_qkv[1].size(1) == a.next->num_kv_heads_;
    if (!reuse) w.next_qkv = a.next->new_qkv(M);
    w.returned = returns_next;
    a.next->qkv_buffers(M, w.next_ys);
    w.next_c = a.next->rotary_rows(a.next_cos, M, "next_cos");
    w.next_s = a.next->rotary_rows(a.next_sin, M, "next_sin");
  }
}

// Run by every thread of a team. Ends without a barrier when there is a next layer's attn_in (each thread
// writes its own heads), else after the last thread's rows.
template <typename T, typename KT>
void DecoderLayer::run_out_team(void* work_ptr, int tid, int n) const {
  auto& w = *static_cast<OutWork<T, KT>*>(work_ptr);
  constexpr bool quantized = std::is_same<KT, int8_t>::value;
  const int64_t M = w.M, H = hidden_, D = head_dim_, Hq = num_heads_, Hkv = num_kv_heads_;
  const int64_t G = Hq / Hkv, L = w.L, I = intermediate_;
  const bool bf16 = std::is_same<T, c10::BFloat16>::value;
  const bool mlp = !gate_up_.empty();
  TeamScratch& scratch = team_scratch();
  T* op = w.out.template data_ptr<T>();
  // 0. the new token's K/V into the cache's own buffers at `slot` (int8: quantized as kv_append does)
  if (w.slot >= 0) {
    int64_t begin, end;
    thread_share(M * Hkv, 1, tid, n, begin, end);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t m = item / Hkv, h = item % Hkv;
      const T* ksrc = w.kn + (m * Hkv + h) * D;
      const T* vsrc = w.vn + (m * Hkv + h) * D;
      KT* kdst = w.kp + m * w.k0 + h * w.k1 + w.slot * w.k2;
      KT* vdst = w.vp + m * w.v0 + h * w.v1 + w.slot * w.v2;
      if constexpr (quantized) {
        quantize_kv_row<T>(ksrc, D, kdst, w.ksp + m * w.ks0 + h * w.ks1 + w.slot * w.ks2);
        quantize_kv_row<T>(vsrc, D, vdst, w.vsp + m * w.vs0 + h * w.vs1 + w.slot * w.vs2);
      } else {
        std::copy(ksrc, ksrc + D, kdst);
        std::copy(vsrc, vsrc + D, vdst);
      }
    }
    HF_PHASE(tid, kKvWrite);
#pragma omp barrier
    HF_PHASE(tid, kWaitKvWrite);
  }
  // 1. attention: this thread's share of the (sequence, query head) items, in runs of consecutive heads that
  // share a KV head (up to kMaxRunHeads), each run one attend_heads call
  {
    int64_t begin, end;
    thread_share(M * Hq, 1, tid, n, begin, end);
    std::vector<float>& scores = scratch.scores;
    std::vector<float>& qf = scratch.qf;
    std::vector<float>& kbuf = scratch.kbuf;
    scores.resize(std::min<int64_t>(kMaxRunHeads, G) * L);
    qf.resize(std::min<int64_t>(kMaxRunHeads, G) * D);
    kbuf.resize(16 * 16 * ((D + 15) / 16));
    // the chunk count fixed at compile time for the common head dims
    const auto attend = D == 64 ? &attend_heads<T, KT, 4> : D == 128 ? &attend_heads<T, KT, 8> : &attend_heads<T, KT, 0>;
    for (int64_t item = begin; item < end;) {
      const int64_t m = item / Hq, h = item % Hq, kvh = h / G;
      // the run: heads h.. of this sequence with the same KV head, within this thread's share
      const int64_t run = std::min<int64_t>({end - item, (kvh + 1) * G - h, static_cast<int64_t>(kMaxRunHeads)});
      for (int64_t r = 0; r < run; ++r)
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(w.qp[(m * Hq + h + r) * D + d]);
      attend(static_cast<int>(run), qf.data(), w.kp + m * w.k0 + kvh * w.k1, w.vp + m * w.v0 + kvh * w.v1, w.k2, w.v2,
             quantized ? w.ksp + m * w.ks0 + kvh * w.ks1 : nullptr, quantized ? w.vsp + m * w.vs0 + kvh * w.vs1 : nullptr,
             w.ks2, w.vs2, L, D, scaling_, softcap_, w.mb ? w.mb + m * w.stride_mb : nullptr,
             w.mf ? w.mf + m * w.stride_mb : nullptr, w.mt ? w.mt + m * w.stride_mb : nullptr, w.stride_ml,
             scores.data(), kbuf.data(), w.attn.data() + (m * Hq + h) * D);
      item += run;
    }
  }
  HF_PHASE(tid, kAttention);
#pragma omp barrier
  HF_PHASE(tid, kWaitAttention);
  // 2. o_proj, rows split across the team
  {
    QuantActivations& qa = scratch.qa;
    o_.prepare(w.attn.data(), M, bf16, qa);
    int64_t begin, end;
    thread_share(H, 4, tid, n, begin, end);
    o_.rows(w.attn.data(), qa, M, w.yo.data(), begin, end);
  }
  HF_PHASE(tid, kO);
#pragma omp barrier
  HF_PHASE(tid, kWaitO);
  // 3. residual add and post-attention norm; every thread computes them whole (a few hundred values: cheaper
  // than another barrier)
  std::vector<float>& h = scratch.h;
  std::vector<float>& n2 = scratch.n2;
  h.resize(M * H);
  n2.resize(M * H);
  for (int64_t i = 0; i < M * H; ++i) h[i] = round_to<T>(static_cast<float>(w.hp[i]) + round_to<T>(w.yo[i]));
  for (int64_t m = 0; m < M; ++m)
    rms_norm_row<T>(h.data() + m * H, norm2_.data_ptr<float>(), n2.data() + m * H, H, eps_, gemma_norm_);
  if (!mlp) {
    if (tid == 0) {
      T* np = w.normed.template data_ptr<T>();
      for (int64_t i = 0; i < M * H; ++i) {
        op[i] = static_cast<T>(h[i]);
        np[i] = static_cast<T>(n2[i]);
      }
    }
    return;
  }
  HF_PHASE(tid, kNorm);
  // 4. gate and up rows [begin, end) on this thread, then act(gate) * up for the same columns
  int64_t begin, end;
  thread_share(I, 16, tid, n, begin, end);
  const int64_t ldg = gate_up_.size() == 1 ? 2 * I : I;
  if (gate_up_.size() == 1) {  // fused [2I, H]: gate rows, then up rows
    QuantActivations& qa = scratch.qa;
    gate_up_[0].prepare(n2.data(), M, bf16, qa);
    gate_up_[0].rows(n2.data(), qa, M, w.yg.data(), begin, end);
    gate_up_[0].rows(n2.data(), qa, M, w.yg.data(), I + begin, I + end);
  } else {
    QuantActivations& qg = scratch.qa;
    QuantActivations& qu = scratch.qb;
    gate_up_[0].prepare(n2.data(), M, bf16, qg);
    gate_up_[1].prepare(n2.data(), M, bf16, qu);
    gate_up_[0].rows(n2.data(), qg, M, w.yg.data(), begin, end);
    gate_up_[1].rows(n2.data(), qu, M, w.yu.data(), begin, end);
  }
  for (int64_t m = 0; m < M; ++m) {
    const float* g = w.yg.data() + m * ldg;
    const float* u = gate_up_.size() == 1 ? g + I : w.yu.data() + m * I;
    float* av = w.act.data() + m * I;
#ifdef HF_FASTINFER_AVX512
    const T* tag = nullptr;
    for (int64_t i = begin; i < end; i += 16) {
      const __mmask16 mk = tail_mask(end - i);
      const __m512 gv = round16(_mm512_maskz_loadu_ps(mk, g + i), tag);
      const __m512 uv = round16(_mm512_maskz_loadu_ps(mk, u + i), tag);
      _mm512_mask_storeu_ps(av + i, mk, round16(gated16<T>(gv, uv, gelu_), tag));
    }
#else
    int64_t i = begin;
#ifdef HF_FASTINFER_AVX2
    const T* tag = nullptr;
    for (; i + 8 <= end; i += 8) {
      const __m256 gv = round8(_mm256_loadu_ps(g + i), tag), uv = round8(_mm256_loadu_ps(u + i), tag);
      _mm256_storeu_ps(av + i, round8(gated8<T>(gv, uv, gelu_), tag));
    }
#endif
    for (; i < end; ++i) {
      const float gv = round_to<T>(g[i]), uv = round_to<T>(u[i]);
      const float t = gelu_ ? 2.f * 0.7978845608028654f * (gv + 0.044715f * gv * gv * gv) : gv;
      av[i] = round_to<T>(round_to<T>(gv / (1.f + std::exp(-t))) * uv);
    }
#endif
  }
  HF_PHASE(tid, kGateUp);
#pragma omp barrier
  HF_PHASE(tid, kWaitGateUp);
  // 5. down projection and the second residual add, rows split across the team
  QuantActivations& qa = scratch.qa;
  down_->prepare(w.act.data(), M, bf16, qa);
  thread_share(H, 4, tid, n, begin, end);
  down_->rows(w.act.data(), qa, M, w.yd.data(), begin, end);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = begin; j < end; ++j) op[m * H + j] = static_cast<T>(h[m * H + j] + round_to<T>(w.yd[m * H + j]));
  // 6. the next layer's attn_in on the finished output
  HF_PHASE(tid, kDown);
  if (w.next != nullptr) {
#pragma omp barrier
    HF_PHASE(tid, kWaitDown);
    w.next->template attn_in_team<T>(op, M, static_cast<const T*>(w.next_c.first), w.next_c.second,
                            static_cast<const T*>(w.next_s.first), w.next_s.second, w.next_qkv[0].template data_ptr<T>(),
                            w.next_qkv[1].template data_ptr<T>(), w.next_qkv[2].template data_ptr<T>(), w.next_ys, tid, n);
  }
}

// The head's part of the region, on every thread once the last layer's output is complete: the norm of each row
// (every thread computes it, H values), the projection's input prepared for its format, the thread's 4-aligned
// share of the vocabulary (as dense_gemv and quant_gemv split it, so that each row is the same code's), rounded
// to T.
template <typename T>
void head_team(const DecodeHead& head, const T* hidden, int64_t M, float* y, T* logits, int tid, int n) {
  TeamScratch& s = team_scratch();
  const int64_t H = head.proj.in_features(), V = head.proj.out_features();
  if (static_cast<int64_t>(s.h.size()) < H) s.h.resize(H);
  if (static_cast<int64_t>(s.xn.size()) < M * H) s.xn.resize(M * H);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t d = 0; d < H; ++d) s.h[d] = static_cast<float>(hidden[m * H + d]);
    rms_norm_row<T>(s.h.data(), head.norm_weight.data_ptr<float>(), s.xn.data() + m * H, H, head.eps, head.gemma_norm);
  }
  head.proj.prepare(s.xn.data(), M, std::is_same<T, c10::BFloat16>::value, s.qa);
  int64_t begin, end;
  thread_share(V, 4, tid, n, begin, end);
  head.proj.rows(s.xn.data(), s.qa, M, y, begin, end);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = begin; j < end; ++j) logits[m * V + j] = static_cast<T>(y[m * V + j]);
}

// A chain of layers in one parallel region: layer j's input is layer j - 1's output and its q / k / v come from
// layer j - 1's step 6. args[0] holds the first layer's inputs; args[j > 0] its cache and mask (the rest is
// wired here). first (a prepared chain): the first layer's q / k / v are computed at the start of the region,
// from args[0].hidden into args[0].q / k / v, with first->cos / sin. Returns every layer's output, then (if the
// last step has a next layer) that layer's q, k, v, then (with a head) its logits; with `last_only`, the last
// layer's output alone, then the logits (the other outputs keep their buffers for the next call); a single layer
// without a fused MLP returns {residual, normed}.
template <typename T, typename KT>
std::vector<at::Tensor> run_chain(const std::vector<const DecoderLayer*>& layers, std::vector<AttnOutArgs>& args,
                                  const DecodeHead* head, const FirstIn* first, bool last_only) {
  // The layers' buffers stay with the calling thread between calls (their sizes rarely change): a chain's
  // setup allocated and zero-filled them for every layer and token, about 7 us a layer (0.2 ms of an int4
  // token of the default model, benchmarks/profile_decode.py).
  static thread_local std::vector<OutWork<T, KT>> kept;
  const size_t count = layers.size();
  if (kept.size() < count) kept.resize(count);
  OutWork<T, KT>* const works = kept.data();  // (a plain pointer: inside the parallel region `kept` would name
                                               // each thread's own, empty, vector)
  for (size_t j = 0; j < count; ++j) {
    if (j > 0) {
      args[j].hidden = works[j - 1].out;  // [M, 1, H]
      args[j].q = works[j - 1].next_qkv[0];
      args[j].k = works[j - 1].next_qkv[1];
      args[j].v = works[j - 1].next_qkv[2];
    }
    layers[j]->template prepare_out<T, KT>(args[j], &works[j], j + 1 == count, !last_only || j + 1 == count);
  }
  // the first layer's attn_in (a prepared chain): its cos / sin rows and its projections' float outputs
  static thread_local std::vector<std::vector<float>> first_ys_kept;
  std::vector<std::vector<float>>& first_ys = first_ys_kept;  // (bound here: the calling thread's, in the region)
  std::pair<const void*, int64_t> first_c{nullptr, 0}, first_s{nullptr, 0};
  if (first != nullptr) {
    const int64_t rows = args[0].hidden.size(0);
    layers[0]->qkv_buffers(rows, first_ys);
    first_c = layers[0]->rotary_rows(first->cos, rows, "cos");
    first_s = layers[0]->rotary_rows(first->sin, rows, "sin");
  }
  // the head's float products [M, V] (kept with the calling thread, as the layers' buffers) and its logits
  static thread_local std::vector<float> head_y;
  at::Tensor logits;
  float* head_yp = nullptr;
  T* logits_p = nullptr;
  const int64_t M = args[0].hidden.size(0);
  if (head != nullptr) {
    const int64_t V = head->proj.out_features();
    if (static_cast<int64_t>(head_y.size()) < M * V) head_y.resize(M * V);
    head_yp = head_y.data();
    logits = at::detail::empty_cpu({M, V}, c10::CppTypeToScalarType<T>::value, false, c10::nullopt);
    logits_p = logits.data_ptr<T>();
  }
  const int nt = team_size();
  HF_PHASE(0, kSetup);  // (the calling thread)
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), n = omp_get_num_threads();
    HF_PHASE_START();
    if (first != nullptr) {
      layers[0]->template attn_in_team<T>(args[0].hidden.template data_ptr<T>(), M, static_cast<const T*>(first_c.first),
                                          first_c.second, static_cast<const T*>(first_s.first), first_s.second,
                                          args[0].q.template data_ptr<T>(), args[0].k.template data_ptr<T>(),
                                          args[0].v.template data_ptr<T>(), first_ys, tid, n);
#pragma omp barrier
      HF_PHASE(tid, kWaitLayer);
    }
    for (size_t j = 0; j < count; ++j) {
      if (j > 0) {
#pragma omp barrier
        HF_PHASE(tid, kWaitLayer);
      }
      layers[j]->template run_out_team<T, KT>(&works[j], tid, n);
    }
    if (head != nullptr) {
#pragma omp barrier
      HF_PHASE(tid, kWaitHead);
      head_team<T>(*head, works[count - 1].out.template data_ptr<T>(), M, head_yp, logits_p, tid, n);
      HF_PHASE(tid, kHead);
    }
    HF_PHASE_STOP();
  }
  HF_PHASE_START();
  auto& last = works[count - 1];
  if (last.normed.defined()) return {last.out, last.normed};  // (a single layer)
  std::vector<at::Tensor> outs;
  for (size_t j = last_only ? count - 1 : 0; j < count; ++j) outs.push_back(works[j].out);
  if (last.next != nullptr)
    for (auto& t : last.next_qkv) outs.push_back(t);
  if (head != nullptr) outs.push_back(logits);
  HF_PHASE(0, kOutputs);
  HF_PHASE_STOP();
  return outs;
}

AttnOutArgs DecoderLayer::make_args(const at::Tensor& hidden_in, const at::Tensor& q_in, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& keys, const at::Tensor& values,
                                    const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale,
                                    const c10::optional<at::Tensor>& mask_in, int64_t slot, int64_t attend_len,
                                    const DecoderLayer* next, const c10::optional<at::Tensor>& next_cos,
                                    const c10::optional<at::Tensor>& next_sin, bool inputs) const {
  AttnOutArgs a;
  const int64_t M = keys.dim() == 4 ? keys.size(0) : 0;
  if (inputs) {
    TORCH_CHECK(hidden_in.scalar_type() == dtype_ && hidden_in.size(-1) == hidden_,
                "attn_out_mlp: hidden states must be [B, 1, hidden] of the layer's dtype");
    a.hidden = hidden_in.reshape({hidden_in.numel() / hidden_, hidden_}).contiguous();
    a.q = q_in.contiguous();
    TORCH_CHECK(a.hidden.size(0) == M, "attn_out_mlp: hidden states and keys disagree on the batch");
    TORCH_CHECK(a.q.scalar_type() == dtype_ && a.q.numel() == M * num_heads_ * head_dim_,
                "attn_out_mlp: q must be [B, Hq, 1, D]");
  }
  TORCH_CHECK(keys.dim() == 4 && values.dim() == 4 && keys.size(1) == num_kv_heads_ && keys.size(3) == head_dim_ &&
              values.sizes() == keys.sizes(), "attn_out_mlp: keys / values must be [B, Hkv, L, D]");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1, "attn_out_mlp: keys / values contiguous along D");
  const bool quantized = keys.scalar_type() == at::kChar;
  if (quantized) {
    TORCH_CHECK(values.scalar_type() == at::kChar && k_scale.has_value() && v_scale.has_value() &&
                k_scale->scalar_type() == at::kHalf && v_scale->scalar_type() == at::kHalf &&
                k_scale->dim() == 3 && v_scale->dim() == 3 && k_scale->size(2) >= keys.size(2) &&
                v_scale->size(2) >= keys.size(2),
                "attn_out_mlp: int8 keys / values need float16 scales [B, Hkv, L]");
    a.k_scale = *k_scale;
    a.v_scale = *v_scale;
  } else {
    TORCH_CHECK(keys.scalar_type() == dtype_ && values.scalar_type() == dtype_, "attn_out_mlp: keys / values of the layer's dtype");
  }
  a.keys = keys;
  a.values = values;
  a.slot = slot;
  if (slot >= 0) {
    // the cache's whole buffers: this token's K/V go to `slot`, attention reads [0, attend_len)
    TORCH_CHECK(slot < keys.size(2) && attend_len > slot && attend_len <= keys.size(2),
                "attn_out_mlp: slot / attend_len outside the cache buffers");
    if (inputs) {
      a.k = k.contiguous();
      a.v = v.contiguous();
      TORCH_CHECK(a.k.scalar_type() == dtype_ && a.v.scalar_type() == dtype_ &&
                  a.k.numel() == M * num_kv_heads_ * head_dim_ && a.v.numel() == a.k.numel(),
                  "attn_out_mlp: k / v must be [B, Hkv, 1, D] of the layer's dtype");
    }
    a.attend_len = attend_len;
  } else {
    TORCH_CHECK(inputs, "attn_out_mlp: a chained layer writes its K/V into the cache's buffers (slot >= 0)");
    a.attend_len = keys.size(2);
  }
  if (mask_in.has_value()) {
    a.mask = *mask_in;
    TORCH_CHECK(a.mask.dim() == 4 && (a.mask.size(0) == 1 || a.mask.size(0) == M) && a.mask.size(2) == 1 &&
                a.mask.size(3) >= a.attend_len, "attn_out_mlp: the mask must be [B or 1, 1, 1, >= L]");
    TORCH_CHECK(a.mask.scalar_type() == at::kBool || a.mask.scalar_type() == at::kFloat || a.mask.scalar_type() == dtype_,
                "attn_out_mlp: a bool or additive float mask");
  }
  if (next != nullptr) {
    TORCH_CHECK(!gate_up_.empty(), "attn_out_mlp: a next layer needs this layer's MLP fused (its output computed here)");
    TORCH_CHECK(next->dtype_ == dtype_ && next->hidden_ == hidden_ && next_cos.has_value() && next_sin.has_value(),
                "attn_out_mlp: the next layer must share dtype and hidden size, and needs cos / sin");
    a.next = next;
    a.next_cos = *next_cos;
    a.next_sin = *next_sin;
  }
  return a;
}

template <typename T>
std::vector<at::Tensor> dispatch_kv(const std::vector<const DecoderLayer*>& layers, std::vector<AttnOutArgs>& args,
                                    const DecodeHead* head, const FirstIn* first, bool last_only) {
  if (args[0].keys.scalar_type() == at::kChar) return run_chain<T, int8_t>(layers, args, head, first, last_only);
  return run_chain<T, T>(layers, args, head, first, last_only);
}

std::vector<at::Tensor> DecoderLayer::run(const std::vector<const DecoderLayer*>& layers, std::vector<AttnOutArgs>& args,
                                          const DecodeHead* head, const FirstIn* first, bool last_only) const {
  switch (dtype_) {
    case at::kFloat: return dispatch_kv<float>(layers, args, head, first, last_only);
    case at::kBFloat16: return dispatch_kv<c10::BFloat16>(layers, args, head, first, last_only);
    default: return dispatch_kv<c10::Half>(layers, args, head, first, last_only);
  }
}

DecodeHead::DecodeHead(at::Tensor norm_weight_in, double eps_in, bool gemma_norm_in, Projection proj_in,
                       c10::ScalarType dtype_in)
    : norm_weight(norm_weight_in.to(at::kFloat).contiguous()), eps(static_cast<float>(eps_in)),
      gemma_norm(gemma_norm_in), proj(std::move(proj_in)), dtype(dtype_in) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "DecodeHead: a float dtype");
  TORCH_CHECK(norm_weight.dim() == 1 && norm_weight.numel() == proj.in_features(),
              "DecodeHead: the norm weight must be [in_features] of the projection");
}

std::vector<at::Tensor> DecoderLayer::attn_out_mlp(const at::Tensor& hidden_in, const at::Tensor& q_in,
                                                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& keys,
                                                   const at::Tensor& values, const c10::optional<at::Tensor>& k_scale,
                                                   const c10::optional<at::Tensor>& v_scale,
                                                   const c10::optional<at::Tensor>& mask_in, int64_t slot,
                                                   int64_t attend_len, const DecoderLayer* next,
                                                   const c10::optional<at::Tensor>& next_cos,
                                                   const c10::optional<at::Tensor>& next_sin) {
  std::vector<AttnOutArgs> args{make_args(hidden_in, q_in, k, v, keys, values, k_scale, v_scale, mask_in, slot, attend_len,
                                          next, next_cos, next_sin, true)};
  return run({this}, args);
}

std::vector<at::Tensor> DecoderLayer::decode_chain(const std::vector<const DecoderLayer*>& chain,
                                                   const at::Tensor& hidden, const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, const std::vector<at::Tensor>& keys,
                                                   const std::vector<at::Tensor>& values,
                                                   const std::vector<c10::optional<at::Tensor>>& k_scales,
                                                   const std::vector<c10::optional<at::Tensor>>& v_scales,
                                                   const std::vector<int64_t>& slots,
                                                   const std::vector<int64_t>& attend_lens,
                                                   const c10::optional<at::Tensor>& mask, const at::Tensor& cos,
                                                   const at::Tensor& sin, const DecoderLayer* next,
                                                   const DecodeHead* head) {
  HF_PHASE_START();
  const size_t n = chain.size();
  TORCH_CHECK(n >= 1 && chain[0] == this && keys.size() == n && values.size() == n && k_scales.size() == n &&
              v_scales.size() == n && slots.size() == n && attend_lens.size() == n,
              "decode_chain: one cache entry per layer, starting with this layer");
  for (size_t j = 0; j < n; ++j) TORCH_CHECK(chain[j] != nullptr && slots[j] >= 0, "decode_chain: layers and slots");
  if (head != nullptr)
    TORCH_CHECK(next == nullptr && head->dtype == dtype_ && head->proj.in_features() == hidden_ &&
                !chain.back()->gate_up_.empty(),
                "decode_chain: a head follows the model's last layer (no next layer), of the layers' dtype and width");
  std::vector<AttnOutArgs> args;
  for (size_t j = 0; j < n; ++j) {
    const DecoderLayer* following = j + 1 < n ? chain[j + 1] : next;
    args.push_back(chain[j]->make_args(hidden, q, k, v, keys[j], values[j], k_scales[j], v_scales[j], mask, slots[j],
                                       attend_lens[j], following, cos, sin, j == 0));
  }
  HF_PHASE(0, kArgs);
  return run(chain, args, head);
}

// ----------------------------------------------------------------------------------------------------------
// A prepared chain: the layers, their caches' buffers and the head converted once, a token's call passing only
// what changes (hidden, cos / sin, mask, slot, length)
// ----------------------------------------------------------------------------------------------------------

DecodePlan::DecodePlan(std::vector<const DecoderLayer*> layers, std::vector<at::Tensor> keys,
                       std::vector<at::Tensor> values, std::vector<c10::optional<at::Tensor>> k_scales,
                       std::vector<c10::optional<at::Tensor>> v_scales, const DecodeHead* head)
    : layers_(std::move(layers)), keys_(std::move(keys)), values_(std::move(values)), k_scales_(std::move(k_scales)),
      v_scales_(std::move(v_scales)), head_(head) {
  const size_t n = layers_.size();
  TORCH_CHECK(n >= 1 && keys_.size() == n && values_.size() == n && k_scales_.size() == n && v_scales_.size() == n,
              "DecodePlan: one cache entry per layer");
  for (size_t j = 0; j < n; ++j) {
    TORCH_CHECK(layers_[j] != nullptr && !layers_[j]->gate_up_.empty(), "DecodePlan: every layer's MLP fused");
    TORCH_CHECK(layers_[j]->dtype_ == layers_[0]->dtype_ && layers_[j]->hidden_ == layers_[0]->hidden_,
                "DecodePlan: the layers share dtype and hidden size");
  }
  if (head_ != nullptr)
    TORCH_CHECK(head_->dtype == layers_[0]->dtype_ && head_->proj.in_features() == layers_[0]->hidden_,
                "DecodePlan: the head takes the layers' dtype and width");
}

std::vector<at::Tensor> DecodePlan::run(const at::Tensor& hidden_in, const at::Tensor& cos, const at::Tensor& sin,
                                        const c10::optional<at::Tensor>& mask, int64_t slot, int64_t attend_len) const {
  HF_PHASE_START();
  const DecoderLayer* first = layers_[0];
  TORCH_CHECK(hidden_in.scalar_type() == first->dtype_ && hidden_in.size(-1) == first->hidden_,
              "DecodePlan: hidden states must be [B, 1, hidden] of the layers' dtype");
  TORCH_CHECK(slot >= 0, "DecodePlan: the new token's cache slot");
  const int64_t M = hidden_in.numel() / first->hidden_;
  const at::Tensor hidden = hidden_in.reshape({M, first->hidden_}).contiguous();
  // the first layer's q / k / v: written in the region, read by its step (new tensors: a call on another thread
  // must not share them)
  const std::vector<at::Tensor> qkv = first->new_qkv(M);
  const size_t n = layers_.size();
  std::vector<AttnOutArgs> args;
  args.reserve(n);
  for (size_t j = 0; j < n; ++j) {
    const DecoderLayer* following = j + 1 < n ? layers_[j + 1] : nullptr;
    args.push_back(layers_[j]->make_args(hidden, qkv[0], qkv[1], qkv[2], keys_[j], values_[j], k_scales_[j],
                                         v_scales_[j], mask, slot, attend_len, following, cos, sin, j == 0));
  }
  HF_PHASE(0, kArgs);
  const FirstIn in{cos, sin};
  return first->run(layers_, args, head_, &in, true);
}

}  // namespace hf_fastinfer
