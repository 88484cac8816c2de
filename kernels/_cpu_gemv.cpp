// hf_fastinfer's compiled CPU kernels. First: weight-only quantized matrix-vector products for a few
// activation rows (decode); then rotary embedding, KV-cache quantize-and-append and RMSNorm (bottom of the file):
// decode-sized ops whose cost in eager torch is mostly per-op dispatch.
//
// y[m, n] = sum_g s[n, g] * (sum_{k in g} x[m, k] * q[n, k] - z[n, g] * sum_{k in g} x[m, k]) + bias[n]
//
// Each weight row is read once, as integers, and reused for every activation row while it sits in L1. With
// AVX-512, four rows go through FMA chains side by side and each group's scale is applied once to the group's
// partial sum; without it, plain C++ loops the compiler vectorises. Rows of the weight are split across
// torch's intra-op threads (at::parallel_for). Activations stay float32 throughout: the result is the exact
// float dot product up to summation order, whatever the weight format.
// Formats: hf_fastinfer.kernels.quant_format (int8 [N, K]; int4 nibbles q + 8, low nibble = even column).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/EmptyTensor.h>
#include <cstdint>
#include <type_traits>
#include <algorithm>
#include <vector>
#include <cmath>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

// Scales and zeros (float32 or float16) as float32. F16C converts fp16 in one instruction where the CPU has
// it (c10::Half's portable conversion is a dozen integer operations, paid once per group and row).
inline float to_f32(float v) { return v; }
inline float to_f32(c10::Half v) {
#if defined(__F16C__)
  return _cvtsh_ss(v.x);
#else
  return static_cast<float>(v);
#endif
}

// Rows are processed in blocks of 4; the hardware prefetcher alone keeps too few cache misses in flight
// while the core is busy converting integers (measured: lm_head int8 at 8.7 GB/s without, 11.3 GB/s with
// a software prefetch this far ahead, on a 19 GB/s machine).
constexpr int64_t kPrefetchBytes = 16384;

// Everything one call needs, copied by value into each thread's loop (so the compiler keeps it in
// registers instead of re-reading it through the lambda's references after every store).
struct GemvArgs {
  const float* x;     // [M, K]
  const float* xe;    // int4: [M, half] even columns of x (zero-padded)
  const float* xo;    // int4: [M, half] odd columns
  const float* xsum;  // [M, groups] per-group sums of x
  const uint8_t* w;   // [N, row_bytes]
  const float* bias;  // [N] or null
  float* y;           // [M, N]
  int64_t M, N, K, groups, group_size, half, row_bytes;
  float offset;       // 8 for int4 (stored nibbles are q + 8), else 0
  // int4 with 16-bit activations (see gemv_blocks_a16): x as int16 per group, even / odd columns
  const int16_t* xe16;  // [M, half16] (zero-padded to whole 32-byte chunks)
  const int16_t* xo16;  // [M, half16]
  const float* xs;      // [M, groups + 1] the groups' int16 scales (one padding entry)
  const float* xsum16;  // [M, groups] sums of x as held in int16 (xs * sum of the int16 values)
  int64_t half16;
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HF_FASTINFER_AVX512 1

// the lanes of a 16-wide chunk that hold one of the n values left (all 16 when n >= 16)
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u); }

inline void to_f32_span(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void to_f32_span(const c10::Half* src, float* dst, int64_t n) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + i)));
  }
}

// The four rows' scales from row n on as float (sf, [4, groups]: contiguous in the [N, groups] scales), and
// zs = (z + offset) * s for the zero-point term (left alone when there is no zero point and no offset).
template <typename ST>
inline void block_scales(const ST* sp, const ST* zp, int64_t n, int64_t groups, float offset, float* sf, float* zs) {
  to_f32_span(sp + n * groups, sf, 4 * groups);
  if (zp == nullptr && offset == 0.f) return;
  if (zp != nullptr) to_f32_span(zp + n * groups, zs, 4 * groups);
  for (int64_t i = 0; i < 4 * groups; ++i) zs[i] = ((zp != nullptr ? zs[i] : 0.f) + offset) * sf[i];
}

// Software prefetch: the block `ahead` rows on (about kPrefetchBytes), or with none left (the end of the
// weight) the current block, which is harmless.
inline int64_t prefetch_rows_ahead(int64_t row_bytes) {
  return std::max<int64_t>(4, (kPrefetchBytes / row_bytes) & ~int64_t(3));
}
inline const char* prefetch_target(const GemvArgs& a, int64_t n, int64_t ahead) {
  return reinterpret_cast<const char*>(a.w + (n + ahead + 4 <= a.N ? n + ahead : n) * a.row_bytes);
}

// a · b over n floats, 16 lanes at a time (a scalar loop here is a chain of dependent FMAs: at group 32 it
// cost about as much as the int4 row itself)
inline float dot16(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// pa[r] += x · u_r over one group, for four weight rows at once: four independent FMA chains, one load of
// x per 16 columns instead of four. int8: n columns of q; int4: n bytes (2n columns) of stored nibbles,
// even columns against xe and odd ones against xo. CH > 0: the group is exactly CH full chunks of 16 (known
// at compile time, no masks); CH == 0: n at run time, the last chunk masked.
template <int BITS, int CH>
__attribute__((always_inline)) inline void group_x4(__m512* pa, const float* __restrict x, const float* __restrict xe, const float* __restrict xo,
                     const uint8_t* const* p, int64_t n) {
  const int64_t chunks = CH > 0 ? CH : (n + 15) / 16;
#pragma GCC unroll 8
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t j = 16 * c;
    const __mmask16 m = CH > 0 ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - j);
    if constexpr (BITS == 8) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + j);
      #pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const __m512i q = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p[r] + j));
        pa[r] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(q), pa[r]);
      }
    } else {
      const __m512 ev = _mm512_maskz_loadu_ps(m, xe + j), ov = _mm512_maskz_loadu_ps(m, xo + j);
      // nibble -> float through a 16-entry table in one register: vpermps reads only the low 4 bits of each
      // index, so the low nibble needs no mask, and the shuffle port takes work off the port that the
      // int -> float conversions would share (measured 4-6% faster than and/shift + vcvtdq2ps on int4 g32)
      const __m512 lut = _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f);
      #pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p[r] + j));
        pa[r] = _mm512_fmadd_ps(ev, _mm512_permutexvar_ps(b, lut), pa[r]);
        pa[r] = _mm512_fmadd_ps(ov, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut), pa[r]);
      }
    }
  }
}

// Rows [begin, end) in blocks of four; returns the first row it left (fewer than four remain).
// Per group g of row n with scale s, zero z (0 when symmetric) and stored integers u (int8: q; int4: q + 8):
//   y[m, n] = sum_g s * (x_g · u_g) - sum_g (z + offset) * s * sum(x_g)   (+ bias)
// so the inner loop is integer conversion and FMA, each scale is applied once per group, and the zero-point
// terms are one short dot product over groups.
template <int BITS, int CH, typename ST>
int64_t gemv_blocks(const GemvArgs a, const ST* sp, const ST* zp, int64_t begin, int64_t end) {
  const int64_t K = a.K, groups = a.groups, gs = a.group_size, rb = a.row_bytes, half = a.half;
  const bool has_offset = zp != nullptr || BITS == 4;
  // groups of exactly CH chunks, then the last, shorter group (K not a multiple of the group size)
  const int64_t full_groups = CH > 0 ? K / gs : 0;
  std::vector<float> sf(4 * groups), zs(4 * groups, 0.f);  // this block's scales, (z + offset) * s
  // Software prefetch of the block `ahead` rows on, a few lines per group: the hardware prefetcher alone
  // keeps too few misses in flight while the core converts integers, and a burst of prefetches fills the
  // line-fill buffers and stalls the core (both measured).
  const int64_t ahead = prefetch_rows_ahead(rb);
  const int64_t lines = (4 * rb + 63) / 64, per_group = (lines + groups - 1) / groups;
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) {
    block_scales(sp, zp, n, groups, a.offset, sf.data(), zs.data());
    const char* pf0 = prefetch_target(a, n, ahead);
    for (int64_t m = 0; m < a.M; ++m) {
      // The group loop walks pointers forward (the loop body is short at group 32: no index arithmetic,
      // no branches), then the last, shorter group if there is one.
      const float* x = a.x + m * K;
      const float* xe = BITS == 4 ? a.xe + m * half : nullptr;
      const float* xo = BITS == 4 ? a.xo + m * half : nullptr;
      const uint8_t* p[4] = {a.w + n * rb, a.w + (n + 1) * rb, a.w + (n + 2) * rb, a.w + (n + 3) * rb};
      const float* s[4] = {sf.data(), sf.data() + groups, sf.data() + 2 * groups, sf.data() + 3 * groups};
      const int64_t step = BITS == 8 ? gs : gs / 2;  // bytes of a row per group (and floats of xe / xo)
      const char* pf = pf0;
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      // one group of CHUNKS chunks (0: `units` at run time): prefetch its share of the block ahead, the four
      // rows' partial sums, each scaled once, then every pointer one group on
      const auto one_group = [&](auto chunks, int64_t units) {
        for (int64_t l = 0; l < per_group; ++l) _mm_prefetch(pf + 64 * l, _MM_HINT_T0);
        pf += 64 * per_group;
        __m512 pa[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        group_x4<BITS, decltype(chunks)::value>(pa, x, xe, xo, p, units);
        #pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          acc[r] = _mm512_fmadd_ps(pa[r], _mm512_set1_ps(*s[r]), acc[r]);
          p[r] += step;
          ++s[r];
        }
        x += gs;
        if (BITS == 4) {
          xe += step;
          xo += step;
        }
      };
      int64_t g = 0;
      for (; g < full_groups; ++g) one_group(std::integral_constant<int, CH>{}, 0);
      for (; g < groups; ++g) {  // run-time group size, or K not a multiple of it
        // a short odd last int4 group reads the padding nibble against x = 0
        const int64_t len = std::min(gs, K - g * gs);
        one_group(std::integral_constant<int, 0>{}, BITS == 8 ? len : (len + 1) / 2);
      }
      #pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const float zero_term = has_offset ? dot16(zs.data() + r * groups, a.xsum + m * groups, groups) : 0.f;
        a.y[m * a.N + n + r] = _mm512_reduce_add_ps(acc[r]) - zero_term + (a.bias ? a.bias[n + r] : 0.f);
      }
    }
  }
  return n;
}

#if defined(__AVX512VNNI__)
#define HF_FASTINFER_A16 1
// int4 weights against bf16 activations, the VNNI way: x is held as int16 with one scale per group
// (xs = max|x_g| / 32767), nibbles are widened to int16, and vpdpwssd multiplies and adds 32 pairs per
// instruction into int32 (no overflow: 15 * 32767 * 256 < 2^31). Fewer instructions per weight than the float
// path, which is what this core is short of (measured +15-30% on int4 g32, BENCHMARKS.md). The int16
// rounding of x adds an error of at most max|x_g| / 65534 per element: measured at about a tenth of a bf16
// output's own rounding, but close to an fp16 output's, so callers ask for it with bf16 x only; fp16 and
// fp32 keep the float path (exact up to summation order).
// CPG: 32-byte chunks per group (group = 64 * CPG columns), or 0 for group 32 (two groups per chunk: lanes
// 0-7 hold the first group's sums, lanes 8-15 the second's, scaled by a two-valued vector).
template <int CPG, typename ST>
int64_t gemv_blocks_a16(const GemvArgs a, const ST* sp, const ST* zp, int64_t begin, int64_t end) {
  const int64_t groups = a.groups, rb = a.row_bytes, h16 = a.half16;
  std::vector<float> sf(4 * groups + 2, 0.f), zs(4 * groups, 0.f);  // (+2: the odd last pair of group 32)
  const int64_t ahead = prefetch_rows_ahead(rb);
  const int64_t chunks = (rb + 31) / 32;  // 32-byte chunks per row
  const __m512i low = _mm512_set1_epi16(15);
  const __m512i pair_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) {
    block_scales(sp, zp, n, groups, a.offset, sf.data(), zs.data());  // (int4: offset 8, so zs is always set)
    const char* pf0 = prefetch_target(a, n, ahead);
    for (int64_t m = 0; m < a.M; ++m) {
      const int16_t* xe = a.xe16 + m * h16;
      const int16_t* xo = a.xo16 + m * h16;
      const float* xs = a.xs + m * (groups + 1);
      const uint8_t* rows[4] = {a.w + n * rb, a.w + (n + 1) * rb, a.w + (n + 2) * rb, a.w + (n + 3) * rb};
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      // one group's (or, at group 32, one pair's) int32 sums of chunks [c0, c1)
      auto dot_chunks = [&](__m512i* d, int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          _mm_prefetch(pf0 + 64 * c, _MM_HINT_T0);  // 2 lines of the block ahead per chunk: all 4 rows' bytes
          _mm_prefetch(pf0 + 64 * (c + chunks), _MM_HINT_T0);
          const __mmask32 mk = rb - 32 * c >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu)
                                                  : static_cast<__mmask32>((1ull << (rb - 32 * c)) - 1);
          const __m512i ev = _mm512_loadu_si512(xe + 32 * c), ov = _mm512_loadu_si512(xo + 32 * c);
          #pragma GCC unroll 4
          for (int r = 0; r < 4; ++r) {
            const __m512i b = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mk, rows[r] + 32 * c));
            d[r] = _mm512_dpwssd_epi32(d[r], ev, _mm512_and_si512(b, low));
            d[r] = _mm512_dpwssd_epi32(d[r], ov, _mm512_srli_epi16(b, 4));
          }
        }
      };
      if constexpr (CPG == 0) {
        for (int64_t c = 0; c < chunks; ++c) {  // groups 2c and 2c + 1
          __m512i d[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
          dot_chunks(d, c, c + 1);
          const __m128 xs2 = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(xs + 2 * c)));
          #pragma GCC unroll 4
          for (int r = 0; r < 4; ++r) {
            const __m128 s2 = _mm_mul_ps(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sf.data() + r * groups + 2 * c))), xs2);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r]), _mm512_permutexvar_ps(pair_idx, _mm512_castps128_ps512(s2)), acc[r]);
          }
        }
      } else {
        for (int64_t g = 0; g < groups; ++g) {
          __m512i d[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
          dot_chunks(d, g * CPG, std::min(chunks, (g + 1) * CPG));
          #pragma GCC unroll 4
          for (int r = 0; r < 4; ++r)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r]), _mm512_set1_ps(sf[r * groups + g] * xs[g]), acc[r]);
        }
      }
      #pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        // with the sums of x as held in int16, so the int16 rounding meets the centred weights (q - z), not
        // the stored nibbles (about twice the size): measured 2-3x smaller error
        const float zero_term = dot16(zs.data() + r * groups, a.xsum16 + m * groups, groups);
        a.y[m * a.N + n + r] = _mm512_reduce_add_ps(acc[r]) - zero_term + (a.bias ? a.bias[n + r] : 0.f);
      }
    }
  }
  return n;
}
#endif

// The chunk count per group known at compile time for the common group sizes (int8: 16..128 columns,
// int4: 32..256 columns), run-time otherwise.
template <int BITS, typename ST>
int64_t gemv_blocks_dispatch(const GemvArgs& a, const ST* sp, const ST* zp, int64_t begin, int64_t end) {
  const int64_t unit = BITS == 8 ? 16 : 32;  // columns per chunk of 16 lanes
  if (a.group_size % unit == 0) {
    switch (a.group_size / unit) {
      case 1: return gemv_blocks<BITS, 1, ST>(a, sp, zp, begin, end);
      case 2: return gemv_blocks<BITS, 2, ST>(a, sp, zp, begin, end);
      case 4: return gemv_blocks<BITS, 4, ST>(a, sp, zp, begin, end);
      case 8: return gemv_blocks<BITS, 8, ST>(a, sp, zp, begin, end);
      default: break;
    }
  }
  return gemv_blocks<BITS, 0, ST>(a, sp, zp, begin, end);
}
#endif

// Portable dot products of one group (the compiler vectorises what it can); int4 on the stored nibbles.
inline float dot_i8(const float* __restrict a, const int8_t* __restrict b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += a[k] * static_cast<float>(b[k]);
  return acc;
}

inline float dot_u4(const float* __restrict even, const float* __restrict odd, const uint8_t* __restrict p, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j)
    acc += even[j] * static_cast<float>(p[j] & 15) + odd[j] * static_cast<float>(p[j] >> 4);
  return acc;
}

// Rows [begin, end) one at a time: the last rows of a thread's range, or every row without AVX-512.
template <typename ST>
void gemv_single_rows(const GemvArgs a, const ST* sp, const ST* zp, int64_t begin, int64_t end) {
  const bool int4 = a.offset != 0.f, has_offset = zp != nullptr || int4;
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* row = a.w + n * a.row_bytes;
    for (int64_t m = 0; m < a.M; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < a.groups; ++g) {
        const int64_t k0 = g * a.group_size;
        const int64_t len = std::min(a.group_size, a.K - k0);
        float part = int4 ? dot_u4(a.xe + m * a.half + k0 / 2, a.xo + m * a.half + k0 / 2, row + k0 / 2, (len + 1) / 2)
                          : dot_i8(a.x + m * a.K + k0, reinterpret_cast<const int8_t*>(row) + k0, len);
        if (has_offset) part -= ((zp ? to_f32(zp[n * a.groups + g]) : 0.f) + a.offset) * a.xsum[m * a.groups + g];
        acc += part * to_f32(sp[n * a.groups + g]);
      }
      a.y[m * a.N + n] = acc + (a.bias ? a.bias[n] : 0.f);
    }
  }
}

}  // namespace

// Rows of the weight split across torch's intra-op threads.
template <typename ST>
void gemv_rows(const GemvArgs& a, const ST* sp, const ST* zp) {
  at::parallel_for(0, a.N, 64, [&](int64_t begin, int64_t end) {
    int64_t n = begin;
#ifdef HF_FASTINFER_AVX512
#ifdef HF_FASTINFER_A16
    if (a.xe16 != nullptr) {
      switch (a.group_size) {
        case 32: n = gemv_blocks_a16<0, ST>(a, sp, zp, begin, end); break;
        case 64: n = gemv_blocks_a16<1, ST>(a, sp, zp, begin, end); break;
        case 128: n = gemv_blocks_a16<2, ST>(a, sp, zp, begin, end); break;
        default: n = gemv_blocks_a16<4, ST>(a, sp, zp, begin, end); break;  // 256 (the caller admits no other)
      }
    } else
#endif
    n = a.offset != 0.f ? gemv_blocks_dispatch<4, ST>(a, sp, zp, begin, end) : gemv_blocks_dispatch<8, ST>(a, sp, zp, begin, end);
#endif
    gemv_single_rows<ST>(a, sp, zp, n, end);
  });
}

// x: [..., K] float32 / bfloat16 / float16 (converted to float32 here: K values per row, negligible next to
// the weight); returns y [..., N] in x's dtype. The conversions live here rather than in Python because at
// decode sizes each Python-level tensor op costs about as much as the matrix-vector product itself.
// qweight: int8 [N, K] (bits 8) or uint8 [N, ceil(K/2)] (bits 4); scales, zeros: float [N, G_count].
// int16_activations: int4 against x held as int16 per group (gemv_blocks_a16); callers ask for it with bf16 x.
torch::Tensor quant_gemv(torch::Tensor x_in, torch::Tensor qweight, torch::Tensor scales_in, c10::optional<torch::Tensor> zeros_in,
                         c10::optional<torch::Tensor> bias_in, int64_t bits, int64_t group_size, int64_t in_features,
                         bool int16_activations) {
  const auto x_dtype = x_in.scalar_type();
  TORCH_CHECK((x_dtype == torch::kFloat32 || x_dtype == torch::kBFloat16 || x_dtype == torch::kHalf) && x_in.dim() >= 1 &&
              x_in.size(-1) == in_features, "x must be float32 / bfloat16 / float16 [..., in_features]");
  TORCH_CHECK(scales_in.is_floating_point(), "scales must be float");
  TORCH_CHECK(qweight.is_contiguous() && qweight.element_size() == 1, "qweight must be contiguous int8 / uint8");
  TORCH_CHECK(group_size > 0, "group_size must be positive");
  // (each ATen call costs about a microsecond even when it changes nothing: skipped when nothing would change)
  const auto as = [](const torch::Tensor& t, c10::ScalarType dtype) {
    return t.scalar_type() == dtype && t.is_contiguous() ? t : t.to(dtype).contiguous();
  };
  const auto x = as(x_in.dim() == 2 ? x_in : x_in.reshape({-1, in_features}), torch::kFloat32);
  // scales and zeros are read as stored when fp16 or fp32 (converted once per group inside the kernel)
  const auto sdtype = scales_in.scalar_type() == torch::kHalf ? torch::kHalf : torch::kFloat32;
  const auto scales = as(scales_in, sdtype);
  c10::optional<torch::Tensor> zeros, bias;
  if (zeros_in.has_value()) zeros = as(*zeros_in, sdtype);
  if (bias_in.has_value()) bias = as(*bias_in, torch::kFloat32);
  const int64_t M = x.size(0), K = in_features, N = qweight.size(0);
  const int64_t groups = (K + group_size - 1) / group_size;
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == groups, "shape mismatch");
  TORCH_CHECK(bits == 8 || (bits == 4 && group_size % 2 == 0), "bits 8, or bits 4 with an even group size");
  TORCH_CHECK(qweight.size(1) == (bits == 8 ? K : (K + 1) / 2), "qweight's row length does not match in_features");
  const bool has_zeros = zeros.has_value();
  if (has_zeros) TORCH_CHECK(zeros->sizes() == scales.sizes(), "zeros must have the scales' shape");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "bias must be [N]");
    bp = bias->data_ptr<float>();
  }
  const float* xp = x.data_ptr<float>();
  torch::Tensor y = at::detail::empty_cpu({M, N}, torch::kFloat32, false, c10::nullopt);  // (no dispatcher: ~1 us less)
  float* yp = y.data_ptr<float>();

  // Per-group sums of x (for zero points and the int4 offset) and, for int4, x split into even / odd columns.
  std::vector<float> xsum(M * groups, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {  // (no division per element: it once cost more than a small GEMV)
      float sum = 0.f;
      for (int64_t k = g * group_size; k < std::min(K, (g + 1) * group_size); ++k) sum += xp[m * K + k];
      xsum[m * groups + g] = sum;
    }
  const int64_t half = (K + 1) / 2;
  std::vector<float> xe, xo;
  if (bits == 4) {
    xe.assign(M * half, 0.f);
    xo.assign(M * half, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; 2 * j < K; ++j) {
        xe[m * half + j] = xp[m * K + 2 * j];
        if (2 * j + 1 < K) xo[m * half + j] = xp[m * K + 2 * j + 1];
      }
  }

  // int4 against 16-bit activations: x as int16 per group (gemv_blocks_a16), where the CPU has VNNI
  std::vector<int16_t> xe16, xo16;
  std::vector<float> xs, xsum16;
  const int64_t half16 = (half + 31) / 32 * 32;
#ifdef HF_FASTINFER_A16
  // (x with inf / NaN takes the float path, which propagates them as float arithmetic does)
  const bool a16 = int16_activations && bits == 4 &&
                   (group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256) &&
                   std::all_of(xp, xp + M * K, [](float v) { return std::isfinite(v); });
  if (a16) {
    xe16.assign(M * half16, 0);
    xo16.assign(M * half16, 0);
    xs.assign(M * (groups + 1), 0.f);
    xsum16.assign(M * groups, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * group_size, k1 = std::min(K, k0 + group_size);
        float amax = 0.f;
        for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::abs(xp[m * K + k]));
        if (amax == 0.f) continue;  // all zero: int16 values and scale stay 0
        const float inv = 32767.f / amax;
        xs[m * (groups + 1) + g] = amax / 32767.f;
        int64_t qsum = 0;
        for (int64_t k = k0; k < k1; ++k) {
          const int16_t q = static_cast<int16_t>(std::min(32767.f, std::max(-32767.f, std::nearbyint(xp[m * K + k] * inv))));
          (k % 2 ? xo16 : xe16)[m * half16 + k / 2] = q;
          qsum += q;
        }
        xsum16[m * groups + g] = static_cast<float>(qsum) * xs[m * (groups + 1) + g];
      }
  }
#endif
  (void)int16_activations;
  const GemvArgs args{xp, xe.data(), xo.data(), xsum.data(), reinterpret_cast<const uint8_t*>(qweight.data_ptr()), bp, yp,
                      M, N, K, groups, group_size, half, bits == 8 ? K : half, bits == 4 ? 8.f : 0.f,
                      xe16.empty() ? nullptr : xe16.data(), xo16.empty() ? nullptr : xo16.data(),
                      xs.empty() ? nullptr : xs.data(), xsum16.empty() ? nullptr : xsum16.data(), half16};
  if (scales.scalar_type() == torch::kHalf)
    gemv_rows<c10::Half>(args, scales.data_ptr<c10::Half>(), has_zeros ? zeros->data_ptr<c10::Half>() : nullptr);
  else
    gemv_rows<float>(args, scales.data_ptr<float>(), has_zeros ? zeros->data_ptr<float>() : nullptr);
  if (x_dtype != torch::kFloat32) y = y.to(x_dtype);
  if (x_in.dim() == 2) return y;
  auto out_sizes = x_in.sizes().vec();
  out_sizes.back() = N;
  return y.view(out_sizes);
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

// Gated activation of a fused gate/up tensor (hf_fastinfer.kernels.gated_act): rows of a contiguous
// [rows, 2I] tensor, out[r, i] = T(T(act(gate[r, i])) * up[r, i]) with act computed in fp32 (transformers'
// MLP numerics: the activation rounded to T, then the product). SiLU: g / (1 + e^-g); GELU (tanh): the same
// form with 2z for g, since 0.5 * (1 + tanh(z)) = 1 / (1 + e^-2z), z = sqrt(2/pi) * (g + 0.044715 g^3) (no
// cancellation for negative g). One pass, 16 lanes at a time, with a vectorised exp.
#ifdef HF_FASTINFER_AVX512
namespace {

// e^x for 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r (the classic single-
// precision minimax coefficients, about 1 ulp), then 2^n by vscalefps, which overflows to inf and underflows
// to 0 as e^x does. x is clamped to +-100 (e^x is inf / 0 there already) so that r stays small and
// +-inf gives no NaN; NaN x gives a finite value, and the caller's NaN gate propagates.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(100.f)), _mm512_set1_ps(-100.f));
  // n = round(x log2 e): adding 1.5 * 2^23 leaves no fraction bits, so the FMA itself rounds to nearest
  const __m512 shifter = _mm512_set1_ps(12582912.f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shifter), shifter);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n * hi
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// Loads and stores of 16 values of T as float32 (bf16 and fp16 rounded to nearest even, as torch does).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
// float -> bf16 bits in the high half of each lane, rounded to nearest even. NaN needs no special case here:
// the only NaNs in this kernel carry a bf16 input's payload (low 16 bits zero) or are the default NaN, and
// adding 0x7FFF to those leaves them NaN.
inline __m512i bf16_round(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                          _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
}
inline __m256i bf16_bits(__m512 v) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_round(v), 16)); }
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(c10::Half* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, bf16_bits(v)); }
// v rounded to T and back (the model rounds the activation to its dtype before the product)
inline __m512 round_to(__m512 v, const float*) { return v; }
inline __m512 round_to(__m512 v, const c10::Half*) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline __m512 round_to(__m512 v, const c10::BFloat16*) { return _mm512_castsi512_ps(bf16_round(v)); }

template <typename T>
void gated_act_rows(const T* x, T* out, int64_t rows, int64_t inner, bool gelu) {
  const auto run = [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* gate = x + row * 2 * inner;
      const T* up = gate + inner;
      T* o = out + row * inner;
      for (int64_t i = 0; i < inner; i += 16) {
        const __mmask16 m = tail_mask(inner - i);
        const __m512 g = load16(gate + i, m);
        __m512 t = g;  // the argument of the logistic function
        if (gelu) {
          const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
          t = _mm512_mul_ps(_mm512_set1_ps(2.f * 0.7978845608028654f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), g3, g));
        }
        // g / d as g * (1 / d), the reciprocal from the 14-bit estimate and one Newton step (relative error
        // about 2^-27, below fp32 rounding; a division is several times slower); d = inf gives 0, as g / d
        const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), t)));
        __m512 rcp = _mm512_rcp14_ps(d);
        rcp = _mm512_mask_mul_ps(rcp, _mm512_cmp_ps_mask(d, _mm512_set1_ps(1e30f), _CMP_LT_OQ), rcp,
                                 _mm512_fnmadd_ps(d, rcp, _mm512_set1_ps(2.f)));
        const __m512 a = _mm512_mul_ps(g, rcp);
        store16(o + i, _mm512_mul_ps(round_to(a, gate), load16(up + i, m)), m);
      }
    }
  };
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(inner, 1));
  if (rows <= grain)
    run(0, rows);  // one token: no thread-pool round trip
  else
    at::parallel_for(0, rows, grain, run);
}

}  // namespace

// Returns None, before any work, unless x is a contiguous float [..., 2I] with I > 0 and the activation is
// "silu" or "gelu_tanh": the Python caller then raises its error (or takes its path for a strided x). The
// checks live here because at one token each Python-level check costs about as much as the kernel.
pybind11::object gated_act(const torch::Tensor& x, const std::string& activation) {
  const auto dtype = x.scalar_type();
  const bool gelu = activation == "gelu_tanh";
  if ((!gelu && activation != "silu") || !(dtype == torch::kFloat32 || dtype == torch::kBFloat16 || dtype == torch::kHalf) ||
      x.dim() < 1 || x.size(-1) == 0 || x.size(-1) % 2 != 0 || !x.is_contiguous())
    return pybind11::none();
  const int64_t inner = x.size(-1) / 2, rows = x.numel() / (2 * inner);
  c10::SmallVector<int64_t, 6> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = inner;
  // straight to the CPU allocator: the dispatcher's torch::empty costs about a microsecond more
  torch::Tensor out = at::detail::empty_cpu(out_sizes, dtype, false, c10::nullopt);
  if (dtype == torch::kFloat32)
    gated_act_rows<float>(x.data_ptr<float>(), out.data_ptr<float>(), rows, inner, gelu);
  else if (dtype == torch::kBFloat16)
    gated_act_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, inner, gelu);
  else
    gated_act_rows<c10::Half>(x.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), rows, inner, gelu);
  return pybind11::cast(out);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_gemv", &quant_gemv, "weight-only quantized GEMV for a few activation rows");
  m.def("rms_norm", &rms_norm, "RMSNorm with an optional fused residual add");
  m.def("kv_append", &kv_append, "int8 KV-cache quantize-and-append at given slots");
  m.def("rotary", &rotary, "rotary embedding of q and k (in place when the outputs are the inputs)");
#ifdef HF_FASTINFER_AVX512
  m.def("gated_act", &gated_act, "act(gate) * up of a fused gate/up tensor (SiLU or GELU-tanh)");
#endif
}
