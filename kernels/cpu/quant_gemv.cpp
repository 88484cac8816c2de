// Weight-only quantized matrix-vector products for a few activation rows (decode):
//
// y[m, n] = sum_g s[n, g] * (sum_{k in g} x[m, k] * q[n, k] - z[n, g] * sum_{k in g} x[m, k]) + bias[n]
//
// Each weight row is read once, as integers, and reused for every activation row while it sits in L1. With
// AVX-512, four rows go through FMA chains side by side and each group's scale is applied once to the group's
// partial sum; with AVX2 + FMA alone, the same blocks in 8 lanes (gemv_blocks_avx2); with neither, plain C++
// loops the compiler vectorises. Activations stay float32 throughout (except
// int4 and int8 against bf16 activations, held as int16: gemv_blocks_a16* with VNNI, and with AVX2
// alone gemv_blocks_a16_i8_avx2 and gemv_blocks_a16_u4_avx2, below): the result is the exact
// float dot product up to summation order, whatever the weight format. Formats: hf_fastinfer.kernels.quant_format (int8 [N, K]; int4 nibbles q + 8,
// low nibble = even column).
//
// quant_prepare / quant_rows (quant_gemv.h) are shared with the fused decoder layer; quant_gemv at the bottom
// is the standalone op, its rows split across torch's intra-op threads.
#include "quant_gemv.h"

#include <ATen/EmptyTensor.h>

#include <cstring>
#include <limits>
#include <type_traits>

#include "ops.h"
#include "simd.h"

namespace hf_fastinfer {
namespace {

// Rows are processed in blocks of 4; the hardware prefetcher alone keeps too few cache misses in flight
// while the core is busy converting integers (measured: lm_head int8 at 8.7 GB/s without, 11.3 GB/s with
// a software prefetch this far ahead, on a 19 GB/s machine).
constexpr int64_t kPrefetchBytes = 16384;
// The prefetch hint, chosen by measurement, not by a model of the caches: the two-level scheme below on every
// CPU measured. Non-temporal prefetches (a decode step reads each weight and its scales once; the hint asks the
// CPU not to keep them where the activations, the KV cache and the Python between the compiled calls live) were
// once the choice on AMD CPUs, where they measured 1.02-1.06x faster than prefetching into L1 alone. Against the
// two-level scheme they lose (BENCHMARKS.md): on an Intel Xeon they starve the stream (one thread over a 14 MB
// int8 weight 5.1 against 20.9 GB/s); on an AMD EPYC Zen 4 the int8 decode chain took 1.49x as long with them
// and whole decodes ran int8 0.82x, int4 0.92x. On a Zen 3 (the AVX2 roads, whose other hint is L1 alone) they
// tied (chain 0.98-1.01x). set_quant_prefetch_nta turns them on (benchmarks' A/B in one process).
bool g_prefetch_nta = false;

// Whether int8 weights meet bf16 activations as int16 (gemv_blocks_a16_i8) or as float (set_int8_int16_activations:
// benchmarks' A/B in one process).
bool g_int8_a16 = true;
// The same for int4 weights (gemv_blocks_a16* with VNNI, gemv_blocks_a16_u4_avx2 with AVX2 alone;
// set_int4_int16_activations).
bool g_int4_a16 = true;

// Whether int8 group-32 weights against int16 activations take two groups per product vector
// (gemv_blocks_a16_i8_pairs) or one (gemv_blocks_a16_i8) (set_int8_group_pairs: benchmarks' A/B in one process).
bool g_int8_pairs = true;

// Whether int4 group-32 weights against int16 activations on AVX-512 VNNI take byte products (vpdpbusd, x's int16
// values split into bytes: gemv_blocks_a16_g32<..., true>) or int16 products after widening the nibbles
// (vpdpwssd) (set_int4_byte_products: benchmarks' A/B in one process).
bool g_int4_bytes = true;

// Where the prefetches are not non-temporal, they go in two steps: each line into L2 (T1) kPrefetchBytes ahead,
// and into L1 (T0) kNearBytes ahead. Prefetching into L1 alone that far ahead holds one of the core's few
// line-fill buffers for each line for the whole of its trip from memory, and those buffers then cap the
// stream: one core converting int8 streamed about 10 GB/s that way, where a plain read reaches 15. A
// prefetch into L2 frees its buffer sooner, and the late one into L1 then finds its line in L2. Measured
// over 60 projections of 3072 x 576 read from memory, 2 threads, 6 interleaved rounds (Xeon with AMX,
// 2.6 GHz): int8 1.18-1.28x, int4 1.06-1.17x the L1-only stream; L2 only (T1) 1.03-1.15x. Near distances of
// 1-4 KB and far ones of 8-32 KB measured the same. Whole decode of the default model, 12 interleaved rounds
// (benchmarks/bench_decode_ab.py --factors twolevel): int8 1.23x, int4 1.03x, the same tokens.
// set_quant_prefetch_two_level(false) keeps the L1 prefetches alone (benchmarks' A/B in one process).
constexpr int64_t kNearBytes = 2048;
bool g_prefetch_two_level = true;

#if defined(HF_FASTINFER_AVX512) || defined(HF_FASTINFER_AVX2)
// One prefetch of p: non-temporal, or into L1 (the scales of a block ahead, the weight lines without the
// two-level scheme, and every weight line of the AVX2 roads)
__attribute__((always_inline)) inline void prefetch_weight(const char* p, bool nta) {
  if (nta)
    _mm_prefetch(p, _MM_HINT_NTA);
  else
    _mm_prefetch(p, _MM_HINT_T0);
}
#endif

#ifdef HF_FASTINFER_AVX512

// The prefetch of one line of the block `ahead` rows on (p), made once per kernel call by line_prefetch below.
struct LinePrefetch {
  int64_t back;  // two-level: bytes from the far line back to the near one (about kNearBytes ahead of the reads)
  bool nta, two_level;
  __attribute__((always_inline)) inline void operator()(const char* p) const {
    if (two_level && !nta) {
      _mm_prefetch(p, _MM_HINT_T1);
      _mm_prefetch(p - back, _MM_HINT_T0);
    } else {
      prefetch_weight(p, nta);
    }
  }
};
#endif

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
  // int4 group 32 with 16-bit activations, K a multiple of 64 (see gemv_blocks_a16_g32)
  const int16_t* x16;  // [M, blocks64, 128]
  const uint8_t* xg32b;  // or x16's values as bytes, [M, blocks64, 256] (gemv_blocks_a16_g32 with BYTES)
  const float* xs4;    // [M, blocks64, 16]
  const float* xq4;    // [M, blocks64, 16]
  int64_t blocks64;
  // int8 with 16-bit activations (see gemv_blocks_a16_i8): x as int16 per group, zero-padded to whole groups
  const int16_t* xk16;  // [M, kpad]
  int64_t kpad;
  // int8 group 32 with 16-bit activations, two groups per product vector (see gemv_blocks_a16_i8_pairs)
  const int16_t* xp16;   // [M, pblocks, 64]
  const int32_t* xcorr;  // [M, pblocks, 16]
  int64_t pblocks;
  // int4 with 16-bit activations on AVX2 (see gemv_blocks_a16_u4_avx2): x's int16 values split into bytes
  const uint8_t* xb4;  // [M, 4, K / 2]
  bool nta;        // the weight stream's software prefetches non-temporal (g_prefetch_nta, read once per call)
  bool two_level;  // otherwise into L2 far ahead and into L1 near (g_prefetch_two_level)
};

// Software prefetch: the block `ahead` rows on (about kPrefetchBytes), or with none left (the end of the
// weight) the current block, which is harmless.
inline int64_t prefetch_rows_ahead(int64_t row_bytes) {
  return std::max<int64_t>(4, (kPrefetchBytes / row_bytes) & ~int64_t(3));
}
inline const char* prefetch_target(const GemvArgs& a, int64_t n, int64_t ahead) {
  return reinterpret_cast<const char*>(a.w + (n + ahead + 4 <= a.N ? n + ahead : n) * a.row_bytes);
}

#if defined(HF_FASTINFER_AVX512) || defined(HF_FASTINFER_AVX2)

inline void to_f32_span(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void to_f32_span(const c10::Half* src, float* dst, int64_t n) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
#ifdef HF_FASTINFER_AVX512
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + i)));
  }
#else
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
#endif
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

// The block loops' scale buffers (this block's scales, (z + offset) * s, and for int8's group pairs the scales
// times x's int16 scales), kept with the calling thread: otherwise allocations per projection and thread, inside
// the decode step's parallel region. Every value a block reads is written for that block first.
inline float* block_buffer(int which, int64_t n) {
  static thread_local std::vector<float> buffers[3];
  if (static_cast<int64_t>(buffers[which].size()) < n) buffers[which].resize(n);
  return buffers[which].data();
}
#endif

#ifdef HF_FASTINFER_AVX512
// row_bytes: of the weight (K for int8)
inline LinePrefetch line_prefetch(const GemvArgs& a, int64_t ahead, int64_t row_bytes) {
  return LinePrefetch{std::max<int64_t>(0, ahead * row_bytes - kNearBytes), a.nta, a.two_level};
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
  float* const sf = block_buffer(0, 4 * groups);  // this block's scales
  float* const zs = block_buffer(1, 4 * groups);  // (z + offset) * s (read only with a zero point or int4's offset)
  // Software prefetch of the block `ahead` rows on, a few lines per group: the hardware prefetcher alone
  // keeps too few misses in flight while the core converts integers, and a burst of prefetches fills the
  // line-fill buffers and stalls the core (both measured).
  const int64_t ahead = prefetch_rows_ahead(rb);
  const LinePrefetch prefetch_line = line_prefetch(a, ahead, rb);
  const int64_t lines = (4 * rb + 63) / 64, per_group = (lines + groups - 1) / groups;
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) {
    block_scales(sp, zp, n, groups, a.offset, sf, zs);
    const char* pf0 = prefetch_target(a, n, ahead);
    for (int64_t m = 0; m < a.M; ++m) {
      // The group loop walks pointers forward (the loop body is short at group 32: no index arithmetic,
      // no branches), then the last, shorter group if there is one.
      const float* x = a.x + m * K;
      const float* xe = BITS == 4 ? a.xe + m * half : nullptr;
      const float* xo = BITS == 4 ? a.xo + m * half : nullptr;
      const uint8_t* p[4] = {a.w + n * rb, a.w + (n + 1) * rb, a.w + (n + 2) * rb, a.w + (n + 3) * rb};
      const float* s[4] = {sf, sf + groups, sf + 2 * groups, sf + 3 * groups};
      const int64_t step = BITS == 8 ? gs : gs / 2;  // bytes of a row per group (and floats of xe / xo)
      const char* pf = pf0;
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      // one group of CHUNKS chunks (0: `units` at run time): prefetch its share of the block ahead, the four
      // rows' partial sums, each scaled once, then every pointer one group on
      const auto one_group = [&](auto chunks, int64_t units) {
        for (int64_t l = 0; l < per_group; ++l) prefetch_line(pf + 64 * l);
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
        const float zero_term = has_offset ? dot16(zs + r * groups, a.xsum + m * groups, groups) : 0.f;
        a.y[m * a.N + n + r] = _mm512_reduce_add_ps(acc[r]) - zero_term + (a.bias ? a.bias[n + r] : 0.f);
      }
    }
  }
  return n;
}

#ifdef HF_FASTINFER_A16
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
  float* const sf = block_buffer(0, 4 * groups + 2);  // (+2: the odd last pair of group 32, zero)
  float* const zs = block_buffer(1, 4 * groups);
  sf[4 * groups] = sf[4 * groups + 1] = 0.f;
  const int64_t ahead = prefetch_rows_ahead(rb);
  const LinePrefetch prefetch_line = line_prefetch(a, ahead, rb);
  const int64_t chunks = (rb + 31) / 32;  // 32-byte chunks per row
  const __m512i low = _mm512_set1_epi16(15);
  const __m512i pair_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) {
    block_scales(sp, zp, n, groups, a.offset, sf, zs);  // (int4: offset 8, so zs is always set)
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
          prefetch_line(pf0 + 64 * c);  // 2 lines of the block ahead per chunk: all 4 rows' bytes
          prefetch_line(pf0 + 64 * (c + chunks));
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
            const __m128 s2 = _mm_mul_ps(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sf + r * groups + 2 * c))), xs2);
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
        const float zero_term = dot16(zs + r * groups, a.xsum16 + m * groups, groups);
        a.y[m * a.N + n + r] = _mm512_reduce_add_ps(acc[r]) - zero_term + (a.bias ? a.bias[n + r] : 0.f);
      }
    }
  }
  return n;
}

// int4 group 32 against 16-bit activations, for K a multiple of 64 (the common case: every decoder projection
// of the default model). The per-chunk scaling of gemv_blocks_a16<0> (each 32-byte chunk holds two groups, so
// every chunk's int32 sums were converted, multiplied by a two-valued scale vector and added) cost more than
// the integer products themselves. Here a row is read in 64-byte blocks of four whole groups: the nibbles are
// widened with in-lane unpacks (vpunpck{l,h}bw), so 128-bit lane k of every product vector holds columns of
// the block's group k only; the activations are laid out in that order by quant_prepare (x16). Four vpdpwssd
// then give one vector of int32 sums whose lanes 4k..4k+3 are group k's, scaled with one conversion and one
// fma per block against a lane-expanded scale. Measured on one core with the weight in L1: 3.5 against 5.3
// cycles per 64 weights of gemv_blocks_a16<0> (BENCHMARKS.md). The sums meet the same int16 values and
// integer products as gemv_blocks_a16; only the order of the float additions over groups differs.
template <typename ST>
inline __m128 four_scales(const ST* p, __mmask8 m) {
  if constexpr (std::is_same<ST, c10::Half>::value)
    return _mm_cvtph_ps(_mm_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(p)));
  else
    return _mm_maskz_loadu_ps(m, p);
}

// BYTES: the same integer sums from byte products. Each int16 x value is h * 256 + l, with l = x & 255 (unsigned)
// and h = x >> 8 (signed, -128..127), so a nibble u (0..15) times x is 256 * (u * h) + u * l. vpdpbusd multiplies
// unsigned bytes by signed bytes and adds four neighbours into an int32 lane, 64 products an instruction: the
// nibbles (and, shift, and: no widening) against l as the unsigned side and against h as the signed one. Byte i of
// the block's low nibbles is column 2 i, of its high nibbles column 2 i + 1, so int32 lane j sums columns 8 j ..
// 8 j + 7 and lanes 4k..4k+3 are group k's, as in the int16 order; quant_prepare lays x's bytes out that way
// (xg32b). Per 64-byte block of a row: four vpdpbusd, a shift and an add, where the int16 products take four
// unpacks and four vpdpwssd (no overflow: a lane adds 8 products of at most 255 * 15, or 128 * 15, a block).
// A group's integer sum is the same; its four lanes hold other columns than with int16 products, so the outputs
// differ in the order of the float additions. Measured on one AMD Zen 4 core with the weight in L2 (K 576, 512
// and 2048 rows): 50-51 against 54-55 billion weights a second (1.07-1.08x); the default model's int4 decode
// chain 1.039x (bench_chain_ab.py --switches i4bytes, 500 pairs, quartiles 1.002-1.075).
template <typename ST, bool ZP, bool SPLIT, bool BYTES>
int64_t gemv_blocks_a16_g32(const GemvArgs a, const ST* sp, const ST* zp, int64_t begin, int64_t end) {
  const int64_t groups = a.groups, rb = a.row_bytes, blocks = a.blocks64, full = rb / 64;
  const bool half_block = rb % 64 != 0;  // the last block is 32 bytes (two groups)
  const __m512i low = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
  // each of the four scales of a block on the four lanes of its group
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512 eight = _mm512_set1_ps(8.f);
  const int64_t ahead = prefetch_rows_ahead(rb);
  const LinePrefetch prefetch_line = line_prefetch(a, ahead, rb);
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) {
    const char* pf0 = prefetch_target(a, n, ahead);
    {  // the scales of the block ahead too: read a few at a time inside the block, their misses would stall it
      const char* ps = reinterpret_cast<const char*>(sp + (n + ahead + 4 <= a.N ? n + ahead : n) * groups);
      for (int64_t l = 0; l <= (4 * groups * static_cast<int64_t>(sizeof(ST)) + 63) / 64; ++l) prefetch_weight(ps + 64 * l, a.nta);
    }
    const uint8_t* rows[4] = {a.w + n * rb, a.w + (n + 1) * rb, a.w + (n + 2) * rb, a.w + (n + 3) * rb};
    for (int64_t m = 0; m < a.M; ++m) {
      // x's 256 bytes a block, either layout: 128 int16 values, or their low and high bytes
      const char* xm = reinterpret_cast<const char*>(BYTES ? static_cast<const void*>(a.xg32b) : a.x16) + m * blocks * 256;
      const float* xs4 = a.xs4 + m * blocks * 16;
      const float* xq4 = a.xq4 + m * blocks * 16;
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      const auto block = [&](int64_t b, bool half) {
        if (m == 0)  // four lines of the block `ahead` rows on per 64-byte block: all four rows' bytes
          for (int64_t k = 0; k < 4; ++k) prefetch_line(pf0 + 64 * (b + k * blocks));
        // int16 products: x's values for the nibbles' four unpacked runs; byte products: x's low bytes against the
        // even and odd columns, then its high bytes (the same four loads)
        const char* xv = xm + 256 * b;
        const __m512i xla = _mm512_loadu_si512(xv), xlb = _mm512_loadu_si512(xv + 64);
        const __m512i xha = _mm512_loadu_si512(xv + 128), xhb = _mm512_loadu_si512(xv + 192);
        const __m512 xsv = _mm512_loadu_ps(xs4 + 16 * b), xqv = _mm512_loadu_ps(xq4 + 16 * b);
        const __m512 xzv = _mm512_mul_ps(xqv, eight);  // the stored nibbles' offset 8 against the group sums
        const __mmask8 gm = static_cast<__mmask8>(groups - 4 * b >= 4 ? 0xF : (1u << (groups - 4 * b)) - 1);
        #pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          const uint8_t* p = rows[r] + 64 * b;
          // rows of 32 * odd bytes start every other one halfway into a cache line: two 32-byte loads, so that no
          // load spans two lines
          const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
          const __m512i wv = half ? _mm512_zextsi256_si512(w0)
                             : SPLIT ? _mm512_inserti64x4(_mm512_castsi256_si512(w0), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)), 1)
                                     : _mm512_loadu_si512(p);
          const __m512i lo = _mm512_and_si512(wv, low), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low);
          __m512i d;
          if constexpr (BYTES) {
            // xla / xlb: the even / odd columns' low bytes; xha / xhb: their high bytes
            const __m512i dl = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, xla, lo), xlb, hi);
            const __m512i dh = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, xha), hi, xhb);
            d = _mm512_add_epi32(dl, _mm512_slli_epi32(dh, 8));
          } else {
            d = _mm512_madd_epi16(xla, _mm512_unpacklo_epi8(lo, zero));
            d = _mm512_dpwssd_epi32(d, xlb, _mm512_unpackhi_epi8(lo, zero));
            d = _mm512_dpwssd_epi32(d, xha, _mm512_unpacklo_epi8(hi, zero));
            d = _mm512_dpwssd_epi32(d, xhb, _mm512_unpackhi_epi8(hi, zero));
          }
          const int64_t g0 = (n + r) * groups + 4 * b;
          const __m512 sv = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(four_scales(sp + g0, gm)));
          // s * (xs * sum(x16 * u) - (z + 8) * sum(x as held))
          __m512 zterm = xzv;
          if constexpr (ZP)
            zterm = _mm512_mul_ps(_mm512_add_ps(_mm512_permutexvar_ps(spread, _mm512_castps128_ps512(four_scales(zp + g0, gm))), eight), xqv);
          acc[r] = _mm512_fmadd_ps(sv, _mm512_fmsub_ps(_mm512_cvtepi32_ps(d), xsv, zterm), acc[r]);
        }
      };
      for (int64_t b = 0; b < full; ++b) block(b, false);
      if (half_block) block(full, true);
      #pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) a.y[m * a.N + n + r] = _mm512_reduce_add_ps(acc[r]) + (a.bias ? a.bias[n + r] : 0.f);
    }
  }
  return n;
}
// gemv_blocks_a16_g32 for this weight: with or without zero points, rows read whole or as two halves
template <typename ST, bool BYTES>
int64_t gemv_blocks_a16_g32_for(const GemvArgs& a, const ST* sp, const ST* zp, int64_t begin, int64_t end) {
  if (a.row_bytes % 64 != 0)
    return zp != nullptr ? gemv_blocks_a16_g32<ST, true, true, BYTES>(a, sp, zp, begin, end)
                         : gemv_blocks_a16_g32<ST, false, true, BYTES>(a, sp, zp, begin, end);
  return zp != nullptr ? gemv_blocks_a16_g32<ST, true, false, BYTES>(a, sp, zp, begin, end)
                       : gemv_blocks_a16_g32<ST, false, false, BYTES>(a, sp, zp, begin, end);
}

// int8 weights against bf16 activations, the VNNI way (as gemv_blocks_a16 for int4): x held as int16 per group
// (xs = max|x_g| / 32767), each weight byte widened to int16 (vpmovsxbw) and vpdpwssd multiplying and adding 32
// pairs per instruction into int32 (no overflow: a lane adds group_size / 16 products of at most 128 * 32767).
// Per 32 weights of a row: one widening and one product, and per group one conversion and one fma, where the
// float path converts twice (int8 -> int32 -> float) and multiplies twice per 32 weights: measured 1.9 cycles per
// 16 weights there on one core with the weight in L2, which capped int8 decode below the memory's rate.
// GC: 32-column chunks per group (group = 32 * GC columns), or 0 for any multiple of 32 at run time. A group
// that the end of K cuts short reads its last chunk masked (x is zero-padded there).
template <int GC, typename ST>
int64_t gemv_blocks_a16_i8(const GemvArgs a, const ST* sp, const ST* zp, int64_t begin, int64_t end) {
  const int64_t groups = a.groups, K = a.K, gc = GC > 0 ? GC : a.group_size / 32;
  const int64_t full_chunks = K / 32;  // chunks read without a mask
  float* const sf = block_buffer(0, 4 * groups);
  float* const zs = block_buffer(1, 4 * groups);  // z * s (read only with a zero point)
  const int64_t ahead = prefetch_rows_ahead(K);
  const LinePrefetch prefetch_line = line_prefetch(a, ahead, K);
  const int64_t lines = (4 * K + 63) / 64, per_group = (lines + groups - 1) / groups;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (K % 32)) - 1);
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) {
    block_scales(sp, zp, n, groups, 0.f, sf, zs);
    const char* pf0 = prefetch_target(a, n, ahead);
    for (int64_t m = 0; m < a.M; ++m) {
      const int16_t* x = a.xk16 + m * a.kpad;
      const float* xs = a.xs + m * (groups + 1);
      const int8_t* rows[4] = {reinterpret_cast<const int8_t*>(a.w + n * K), reinterpret_cast<const int8_t*>(a.w + (n + 1) * K),
                               reinterpret_cast<const int8_t*>(a.w + (n + 2) * K), reinterpret_cast<const int8_t*>(a.w + (n + 3) * K)};
      const char* pf = pf0;
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t l = 0; l < per_group; ++l) prefetch_line(pf + 64 * l);
        pf += 64 * per_group;
        __m512i d[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
        const int64_t c0 = g * gc, c1 = std::min(c0 + gc, full_chunks);
        for (int64_t c = c0; c < c1; ++c) {
          const __m512i xv = _mm512_loadu_si512(x + 32 * c);
          #pragma GCC unroll 4
          for (int r = 0; r < 4; ++r)
            d[r] = _mm512_dpwssd_epi32(d[r], xv, _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + 32 * c))));
        }
        if (tail != 0 && c1 == full_chunks && full_chunks < c0 + gc) {  // the last group: K ends inside this chunk
          const __m512i xv = _mm512_loadu_si512(x + 32 * full_chunks);
          #pragma GCC unroll 4
          for (int r = 0; r < 4; ++r)
            d[r] = _mm512_dpwssd_epi32(d[r], xv, _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(tail, rows[r] + 32 * full_chunks)));
        }
        #pragma GCC unroll 4
        for (int r = 0; r < 4; ++r)
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r]), _mm512_set1_ps(sf[r * groups + g] * xs[g]), acc[r]);
      }
      #pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const float zero_term = zp != nullptr ? dot16(zs + r * groups, a.xsum16 + m * groups, groups) : 0.f;
        a.y[m * a.N + n + r] = _mm512_reduce_add_ps(acc[r]) - zero_term + (a.bias ? a.bias[n + r] : 0.f);
      }
    }
  }
  return n;
}

// int8 group 32 against int16 activations, two groups per product vector. gemv_blocks_a16_i8 spends, per 32
// weights of a row, a widening, a product, and then for the group alone a conversion, a scale product and a
// broadcast and an fma: the group's share is as large as the products' own, and the core, not the memory,
// set the pace (one core, weight in L2: 21 GB/s, about twice what one core streams from memory, and the two
// overlap only in part). Here a row is read in 64-byte blocks of two groups. Each byte is made unsigned
// (q ^ 0x80 = q + 128) and widened with in-lane unpacks against zero (vpunpck{l,h}bw), so that 128-bit lanes 0-1
// of each product vector hold the block's first group and lanes 2-3 its second; quant_prepare lays x out in
// that order (xp16). The offset's products (128 * x) are subtracted in the integers by starting each sum at
// xcorr, -128 times the x values its lane meets, so the int32 sums are exactly those of q. One conversion and
// one fma per block then scale both groups, against the pair of scale products spread over their 8 lanes each.
// A block that the end of the row cuts to one group (K = 64 b + 32) reads 32 bytes; x is zero past K.
// Measured: one core, weight in L2, 26.2 against 22.6 GB/s (1.17x); two threads from memory, with the two-level
// prefetch, 1.08x; whole decode of the default model, 12 interleaved rounds (bench_decode_ab.py --factors pairs),
// median of the per-round ratios 1.06x (0.94-1.23x), the same tokens.
template <typename ST>
int64_t gemv_blocks_a16_i8_pairs(const GemvArgs a, const ST* sp, const ST* zp, int64_t begin, int64_t end) {
  const int64_t groups = a.groups, K = a.K, blocks = a.pblocks, full = K / 64;
  float* const sf = block_buffer(0, 4 * groups);
  float* const zs = block_buffer(1, 4 * groups);  // z * s (read only with a zero point)
  // the four rows' scales times the groups' int16 scales (+2: an odd last group's missing pair, zero)
  float* const sx = block_buffer(2, 4 * groups + 2);
  sx[4 * groups] = sx[4 * groups + 1] = 0.f;
  const int64_t ahead = prefetch_rows_ahead(K);
  const LinePrefetch prefetch_line = line_prefetch(a, ahead, K);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), zero = _mm512_setzero_si512();
  const __m512i pair_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) {
    block_scales(sp, zp, n, groups, 0.f, sf, zs);
    const char* pf0 = prefetch_target(a, n, ahead);
    const int8_t* rows[4] = {reinterpret_cast<const int8_t*>(a.w + n * K), reinterpret_cast<const int8_t*>(a.w + (n + 1) * K),
                             reinterpret_cast<const int8_t*>(a.w + (n + 2) * K), reinterpret_cast<const int8_t*>(a.w + (n + 3) * K)};
    for (int64_t m = 0; m < a.M; ++m) {
      const int16_t* x = a.xp16 + m * blocks * 64;
      const int32_t* corr = a.xcorr + m * blocks * 16;
      const float* xs = a.xs + m * (groups + 1);
      for (int r = 0; r < 4; ++r)
        for (int64_t g = 0; g < groups; ++g) sx[r * groups + g] = sf[r * groups + g] * xs[g];
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      const auto block = [&](int64_t b, bool half) {
        if (m == 0)  // the block `ahead` rows on: 4 K contiguous bytes, four lines per 64-byte block of a row
          for (int64_t k = 0; k < 4; ++k) prefetch_line(pf0 + 64 * (4 * b + k));
        const __m512i xlo = _mm512_loadu_si512(x + 64 * b), xhi = _mm512_loadu_si512(x + 64 * b + 32);
        const __m512i c = _mm512_loadu_si512(corr + 16 * b);
        #pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          const int8_t* p = rows[r] + 64 * b;
          const __m512i wv = half ? _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))
                                  : _mm512_loadu_si512(p);
          const __m512i u = _mm512_xor_si512(wv, flip);
          __m512i d = _mm512_dpwssd_epi32(c, xlo, _mm512_unpacklo_epi8(u, zero));
          d = _mm512_dpwssd_epi32(d, xhi, _mm512_unpackhi_epi8(u, zero));
          const __m512 sv = _mm512_permutexvar_ps(
              pair_idx, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sx + r * groups + 2 * b)))));
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, acc[r]);
        }
      };
      for (int64_t b = 0; b < full; ++b) block(b, false);
      if (full < blocks) block(full, true);
      #pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const float zero_term = zp != nullptr ? dot16(zs + r * groups, a.xsum16 + m * groups, groups) : 0.f;
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

#ifdef HF_FASTINFER_AVX2
// Without AVX-512, AVX2 + FMA: the blocks of four rows of gemv_blocks in 8 lanes, the same formula (each
// group's partial sums scaled once, the block's scales converted once, the zero-point terms one short dot over
// groups) and the same software
// prefetch of the block ahead. A group's columns past its last whole 8 (a group size that is not a multiple
// of 8 columns, or a short last group) are added one by one.

// a · b over n floats, 8 lanes at a time, the last values one by one (dot16's form)
inline float dot8(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = hsum8(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

template <int BITS, typename ST>
int64_t gemv_blocks_avx2(const GemvArgs a, const ST* sp, const ST* zp, int64_t begin, int64_t end) {
  const int64_t K = a.K, groups = a.groups, gs = a.group_size, rb = a.row_bytes, half = a.half;
  const bool has_offset = zp != nullptr || BITS == 4;
  const int64_t step = BITS == 8 ? gs : gs / 2;  // bytes of a row per group (and floats of xe / xo)
  const int64_t ahead = prefetch_rows_ahead(rb);
  const int64_t lines = (4 * rb + 63) / 64, per_group = (lines + groups - 1) / groups;
  const __m256i low4 = _mm256_set1_epi32(15);
  float* const sf = block_buffer(0, 4 * groups);  // this block's scales
  float* const zs = block_buffer(1, 4 * groups);  // (z + offset) * s (read only with a zero point or int4's offset)
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) {
    block_scales(sp, zp, n, groups, a.offset, sf, zs);
    const char* pf = prefetch_target(a, n, ahead);
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x + m * K;
      const float* xe = BITS == 4 ? a.xe + m * half : nullptr;
      const float* xo = BITS == 4 ? a.xo + m * half : nullptr;
      const uint8_t* p[4] = {a.w + n * rb, a.w + (n + 1) * rb, a.w + (n + 2) * rb, a.w + (n + 3) * rb};
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      float tail[4] = {0.f, 0.f, 0.f, 0.f};  // the columns past the whole 8s, already scaled
      for (int64_t g = 0; g < groups; ++g) {
        if (m == 0) {  // the block ahead, a few lines per group (a burst of prefetches stalls the core)
          for (int64_t l = 0; l < per_group; ++l) prefetch_weight(pf + 64 * l, a.nta);
          pf += 64 * per_group;
        }
        const int64_t len = std::min(gs, K - g * gs);
        const int64_t units = BITS == 8 ? len : (len + 1) / 2;  // bytes of this group in each row
        const int64_t whole = units & ~int64_t(7);
        __m256 pa[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t j = 0; j < whole; j += 8) {
          if constexpr (BITS == 8) {
            const __m256 xv = _mm256_loadu_ps(x + j);
            #pragma GCC unroll 4
            for (int r = 0; r < 4; ++r) {
              const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p[r] + j)));
              pa[r] = _mm256_fmadd_ps(xv, _mm256_cvtepi32_ps(q), pa[r]);
            }
          } else {
            const __m256 ev = _mm256_loadu_ps(xe + j), ov = _mm256_loadu_ps(xo + j);
            #pragma GCC unroll 4
            for (int r = 0; r < 4; ++r) {
              const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p[r] + j)));
              pa[r] = _mm256_fmadd_ps(ev, _mm256_cvtepi32_ps(_mm256_and_si256(b, low4)), pa[r]);
              pa[r] = _mm256_fmadd_ps(ov, _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), pa[r]);
            }
          }
        }
        #pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          const float s = sf[r * groups + g];
          acc[r] = _mm256_fmadd_ps(pa[r], _mm256_set1_ps(s), acc[r]);
          if (whole < units)
            tail[r] += s * (BITS == 8 ? dot_i8(x + whole, reinterpret_cast<const int8_t*>(p[r]) + whole, units - whole)
                                      : dot_u4(xe + whole, xo + whole, p[r] + whole, units - whole));
          p[r] += step;
        }
        x += gs;
        if (BITS == 4) {
          xe += step;
          xo += step;
        }
      }
      for (int r = 0; r < 4; ++r) {
        const float zero_term = has_offset ? dot8(zs + r * groups, a.xsum + m * groups, groups) : 0.f;
        a.y[m * a.N + n + r] = hsum8(acc[r]) + tail[r] - zero_term + (a.bias ? a.bias[n + r] : 0.f);
      }
    }
  }
  return n;
}
#endif

#ifdef HF_FASTINFER_AVX2
// int8 weights against bf16 activations held as int16 per group, without AVX-512: the values of the VNNI road
// (x rounded to int16 per group, xs = max|x_g| / 32767, the same integer products), in 16-lane vectors. Each
// 16 weight bytes of a row are widened to int16 (vpmovsxbw) and vpmaddwd multiplies 16 pairs and adds
// neighbours into 8 int32 lanes (no overflow: a lane adds at most group_size / 8 products of at most
// 128 * 32767). Per 32 weights of a row: 2 widenings, 2 products and 2 integer adds, then per group one
// conversion and one fma against the group's scale product; the float road (gemv_blocks_avx2) converts every
// weight twice (int8 -> int32 -> float) and multiplies it once. Measured on one AMD Zen 3 core, weight in L2
// (the time of 512 rows less that of 128, K 576, group 32): 12.0 -> 17.7 billion weights a second; whole decode
// of the default model 1.27x (BENCHMARKS.md). (int4 takes its own road, gemv_blocks_a16_u4_avx2 below.)
// CPG: 16-byte chunks per group (group_size / 16), 0 for any at run time. A row's last chunk, when fewer than
// 16 bytes remain, is read through a zeroed copy (AVX2 has no masked byte loads, and a whole load there would
// read past the weight's end); x is zero past K.
inline __m128i chunk16(const uint8_t* p, int64_t avail) {
  if (avail >= 16) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  alignas(16) uint8_t buf[16] = {};
  std::memcpy(buf, p, static_cast<size_t>(avail));
  return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
}

// One pass over a block's scales for the int16 roads below, per row of x: the scale products sx[r][g] =
// s[r][g] * xs[g] ([4, groups], what the inner loops broadcast) and each of the four rows' zero term
// zero[r] = sum_g (z[r][g] + offset) * s[r][g] * xsum16[g] (offset: 8 for int4's stored nibbles; without a
// zero point and offset, 0). The same products, in the same order, as block_scales, the sx loop and dot8 gave
// before (the results are bit for bit the same), in one pass without their buffers. As three passes (block_scales,
// the sx loop, dot8) they took about a third of int4's time at K 576 on a Zen 3 core; one pass made the int4 road
// 1.14-1.42x faster there (weight in L2, group 32, interleaved) and int4 decode 1.11x (BENCHMARKS.md).
template <typename ST>
inline void block_scale_products(const ST* sp, const ST* zp, int64_t n, int64_t groups, float offset,
                                 const float* xs, const float* xsum16, float* sx, float* zero) {
  const bool zero_term = zp != nullptr || offset != 0.f;
  const __m256 off = _mm256_set1_ps(offset);
  for (int r = 0; r < 4; ++r) {
    const ST* s = sp + (n + r) * groups;
    const ST* z = zp != nullptr ? zp + (n + r) * groups : nullptr;
    float* sxr = sx + r * groups;
    __m256 zt = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
      const __m256 s8 = load8(s + g);
      _mm256_storeu_ps(sxr + g, _mm256_mul_ps(s8, _mm256_loadu_ps(xs + g)));
      if (zero_term) {
        const __m256 zo = z != nullptr ? _mm256_add_ps(load8(z + g), off) : off;
        zt = _mm256_fmadd_ps(_mm256_mul_ps(zo, s8), _mm256_loadu_ps(xsum16 + g), zt);
      }
    }
    float sum = zero_term ? hsum8(zt) : 0.f;
    for (; g < groups; ++g) {
      const float sv = to_f32(s[g]);
      sxr[g] = sv * xs[g];
      if (zero_term) sum += ((z != nullptr ? to_f32(z[g]) : 0.f) + offset) * sv * xsum16[g];
    }
    zero[r] = sum;
  }
}

template <int CPG, typename ST>
int64_t gemv_blocks_a16_i8_avx2(const GemvArgs a, const ST* sp, const ST* zp, int64_t begin, int64_t end) {
  const int64_t groups = a.groups, K = a.K, cpg = CPG > 0 ? CPG : a.group_size / 16;
  const int64_t chunks = (K + 15) / 16, full = K / 16;  // 16-byte chunks of a row; those read without a copy
  // groups of exactly CPG whole chunks (compile-time loops, pointers walking forward), then the rest
  const int64_t plain_groups = CPG > 0 ? std::min(groups, full / CPG) : 0;
  float* const sx = block_buffer(2, 4 * groups);  // the scales times x's int16 scales: one broadcast a group
  const int64_t ahead = prefetch_rows_ahead(K);
  const int64_t lines = (4 * K + 63) / 64, per_group = (lines + groups - 1) / groups;
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) {
    const char* pf = prefetch_target(a, n, ahead);
    for (int64_t m = 0; m < a.M; ++m) {
      const int16_t* x = a.xk16 + m * a.kpad;
      const float* xs = a.xs + m * (groups + 1);
      float zero[4];  // z * s against x's group sums (0 without a zero point)
      block_scale_products(sp, zp, n, groups, 0.f, xs, a.xsum16 + m * groups, sx, zero);
      const uint8_t* p[4] = {a.w + n * K, a.w + (n + 1) * K, a.w + (n + 2) * K, a.w + (n + 3) * K};
      const float* s[4] = {sx, sx + groups, sx + 2 * groups, sx + 3 * groups};
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      // one group: prefetch its share of the block ahead, the four rows' int32 sums of `count` chunks (a
      // compile-time CH > 0, or at run time with the row's short last chunk through a copy), each scaled once;
      // then every pointer one group on
      const auto one_group = [&](auto ch, int64_t count) {
        constexpr int CH = decltype(ch)::value;
        if (m == 0) {  // a few lines per group (a burst of prefetches stalls the core)
          for (int64_t l = 0; l < per_group; ++l) prefetch_weight(pf + 64 * l, a.nta);
          pf += 64 * per_group;
        }
        __m256i d[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        const int64_t n_chunks = CH > 0 ? CH : count;
        #pragma GCC unroll 8
        for (int64_t c = 0; c < n_chunks; ++c) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * c));
          const int64_t left = K - (p[0] - (a.w + n * K)) - 16 * c;  // bytes of each row from this chunk on
          #pragma GCC unroll 4
          for (int r = 0; r < 4; ++r) {
            // (CH > 0: whole chunks only, the copy folded away)
            const __m128i wb = CH > 0 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[r] + 16 * c)) : chunk16(p[r] + 16 * c, left);
            d[r] = _mm256_add_epi32(d[r], _mm256_madd_epi16(xv, _mm256_cvtepi8_epi16(wb)));
          }
        }
        #pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[r]), _mm256_broadcast_ss(s[r]), acc[r]);
          p[r] += 16 * n_chunks;
          ++s[r];
        }
        x += 16 * n_chunks;
      };
      int64_t g = 0;
      for (; g < plain_groups; ++g) one_group(std::integral_constant<int, CPG>{}, 0);
      for (; g < groups; ++g) one_group(std::integral_constant<int, 0>{}, std::min(cpg, chunks - g * cpg));
      #pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) a.y[m * a.N + n + r] = hsum8(acc[r]) - zero[r] + (a.bias ? a.bias[n + r] : 0.f);
    }
  }
  return n;
}
#endif

#ifdef HF_FASTINFER_AVX2
// int4 weights against bf16 activations held as int16 per group, without AVX-512: the int16 values of the VNNI
// road (xs = max|x_g| / 32767), multiplied 32 weights an instruction by vpmaddubsw (unsigned bytes times signed
// bytes, adjacent pairs added into int16). An int16 x value is h * 256 + l, with l = x & 255 (unsigned) and h =
// x >> 8 (signed, -128..127), so a stored nibble u (0..15) times x is 256 * (u * h) + u * l: two byte products,
// each exact. quant_prepare splits x into those bytes (xb4: [M, 4, K / 2], the low and high bytes of the even
// columns, then of the odd ones, byte j of each against byte j of the weight row's 64-column chunk). Per 32
// weight bytes (64 columns) of a row: an and, a shift and an and unpack the nibbles, four vpmaddubsw (even and
// odd columns against l and h), two int16 adds (no overflow: pairs of u * l add to at most 2 * 2 * 15 * 255 =
// 15300, of u * h to at most 7680 in magnitude), two vpmaddwd (by 256 and by 1) and one int32 add; per group one
// conversion and one fma against the group's scale product. The sums are the VNNI road's exact integer sums.
// The float road (gemv_blocks_avx2) converts every nibble to float and multiplies it: about twice the
// instructions a weight. K a multiple of 64 (quant_prepare); CPG: 64-column chunks per group (group_size / 64),
// 0 for group 32, where each 128-bit lane of a chunk is its own group.
template <int CPG, typename ST>
int64_t gemv_blocks_a16_u4_avx2(const GemvArgs a, const ST* sp, const ST* zp, int64_t begin, int64_t end) {
  const int64_t groups = a.groups, K = a.K, half = K / 2, rb = half, chunks = K / 64;
  float* const sx = block_buffer(2, 4 * groups);  // the scales times x's int16 scales
  // group 32: a chunk's two groups' scale products, broadcast as a pair (s0 s1 s0 s1 ...), onto the int32 lanes
  // that hold their sums (0-3 and 4-7)
  const __m256i pair_lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const int64_t ahead = prefetch_rows_ahead(rb);
  const int64_t lines = (4 * rb + 63) / 64, per_chunk = (lines + chunks - 1) / chunks;
  const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), by256 = _mm256_set1_epi16(256);
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) {
    const char* pf = prefetch_target(a, n, ahead);
    for (int64_t m = 0; m < a.M; ++m) {
      const uint8_t* xb = a.xb4 + m * 4 * half;  // even low, even high, odd low, odd high: half bytes each
      const float* xs = a.xs + m * (groups + 1);
      float zero[4];  // (z + 8) * s (the stored nibbles' offset, and z) against x's group sums
      block_scale_products(sp, zp, n, groups, a.offset, xs, a.xsum16 + m * groups, sx, zero);
      const uint8_t* p[4] = {a.w + n * rb, a.w + (n + 1) * rb, a.w + (n + 2) * rb, a.w + (n + 3) * rb};
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      __m256i d[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
      for (int64_t c = 0; c < chunks; ++c) {
        if (m == 0) {  // the block ahead, a few lines per chunk (a burst of prefetches stalls the core)
          for (int64_t l = 0; l < per_chunk; ++l) prefetch_weight(pf + 64 * l, a.nta);
          pf += 64 * per_chunk;
        }
        const int64_t j = 32 * c;
        const __m256i el = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + j));
        const __m256i eh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + half + j));
        const __m256i ol = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 2 * half + j));
        const __m256i oh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 3 * half + j));
        const bool first = CPG <= 1 || c % CPG == 0;  // the chunk opens a group
        #pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p[r] + j));
          const __m256i lo = _mm256_and_si256(w, low4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
          const __m256i sl = _mm256_add_epi16(_mm256_maddubs_epi16(el, lo), _mm256_maddubs_epi16(ol, hi));
          const __m256i sh = _mm256_add_epi16(_mm256_maddubs_epi16(lo, eh), _mm256_maddubs_epi16(hi, oh));
          const __m256i v = _mm256_add_epi32(_mm256_madd_epi16(sh, by256), _mm256_madd_epi16(sl, ones));
          d[r] = first ? v : _mm256_add_epi32(d[r], v);
        }
        if (CPG == 0) {  // two groups: lanes 0-3 of group 2c, 4-7 of 2c + 1
          #pragma GCC unroll 4
          for (int r = 0; r < 4; ++r) {
            const __m256 pair = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(sx + r * groups + 2 * c)));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[r]), _mm256_permutevar8x32_ps(pair, pair_lanes), acc[r]);
          }
        } else if ((c + 1) % CPG == 0 || c + 1 == chunks) {  // a group's last chunk (the last group may be short)
          const int64_t g = c / CPG;
          #pragma GCC unroll 4
          for (int r = 0; r < 4; ++r)
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[r]), _mm256_broadcast_ss(sx + r * groups + g), acc[r]);
        }
      }
      #pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) a.y[m * a.N + n + r] = hsum8(acc[r]) - zero[r] + (a.bias ? a.bias[n + r] : 0.f);
    }
  }
  return n;
}
#endif

// One group's weight values (int8, or int4's stored nibbles q + 8; columns k0 .. k0 + len - 1 of a row) against x
// as int16 (x16: the row of x from column 0): their exact integer sum (int64: int8 groups of any size).
inline int64_t dot_q_int16(const uint8_t* row, const int16_t* x16, int64_t k0, int64_t len, bool int4) {
  int64_t dot = 0;
  for (int64_t k = k0; k < k0 + len; ++k)
    dot += static_cast<int64_t>(int4 ? (row[k / 2] >> (4 * (k % 2))) & 15 : static_cast<int8_t>(row[k])) * x16[k];
  return dot;
}

// Rows [begin, end) one at a time: the last rows of a thread's range, or every row without AVX-512. Against
// float x; or, where the preparation built no float copies of x (the AVX2 int16 roads: xsum null), against its
// int16 values: per group the integer sum times x's int16 scale, less (z + offset) times the group's sum as held
// in int16, the block kernels' terms summed one group at a time.
template <typename ST>
void gemv_single_rows(const GemvArgs a, const ST* sp, const ST* zp, int64_t begin, int64_t end) {
  const bool int4 = a.offset != 0.f, has_offset = zp != nullptr || int4, a16 = a.xsum == nullptr;
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* row = a.w + n * a.row_bytes;
    for (int64_t m = 0; m < a.M; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < a.groups; ++g) {
        const int64_t k0 = g * a.group_size;
        const int64_t len = std::min(a.group_size, a.K - k0);
        float part = a16 ? static_cast<float>(dot_q_int16(row, a.xk16 + m * a.kpad, k0, len, int4)) * a.xs[m * (a.groups + 1) + g]
                   : int4 ? dot_u4(a.xe + m * a.half + k0 / 2, a.xo + m * a.half + k0 / 2, row + k0 / 2, (len + 1) / 2)
                          : dot_i8(a.x + m * a.K + k0, reinterpret_cast<const int8_t*>(row) + k0, len);
        if (has_offset)
          part -= ((zp ? to_f32(zp[n * a.groups + g]) : 0.f) + a.offset) * (a16 ? a.xsum16 : a.xsum)[m * a.groups + g];
        acc += part * to_f32(sp[n * a.groups + g]);
      }
      a.y[m * a.N + n] = acc + (a.bias ? a.bias[n] : 0.f);
    }
  }
}

// Rows [begin, end) on the calling thread: blocks of four with AVX-512 (or AVX2), then single rows.
template <typename ST>
void rows_range(const GemvArgs& a, const ST* sp, const ST* zp, int64_t begin, int64_t end) {
  int64_t n = begin;
#ifdef HF_FASTINFER_AVX512
#ifdef HF_FASTINFER_A16
  if (a.xp16 != nullptr) {
    n = gemv_blocks_a16_i8_pairs<ST>(a, sp, zp, begin, end);
  } else if (a.xk16 != nullptr && a.offset == 0.f) {  // (int4's g32 road sets xk16 for its single rows)
    switch (a.group_size) {
      case 32: n = gemv_blocks_a16_i8<1, ST>(a, sp, zp, begin, end); break;
      case 64: n = gemv_blocks_a16_i8<2, ST>(a, sp, zp, begin, end); break;
      case 128: n = gemv_blocks_a16_i8<4, ST>(a, sp, zp, begin, end); break;
      default: n = gemv_blocks_a16_i8<0, ST>(a, sp, zp, begin, end); break;  // a multiple of 32 (quant_prepare)
    }
  } else if (a.xe16 != nullptr || a.x16 != nullptr || a.xg32b != nullptr) {
    switch (a.group_size) {
      case 32:
        if (a.xg32b != nullptr)
          n = gemv_blocks_a16_g32_for<ST, true>(a, sp, zp, begin, end);
        else if (a.x16 != nullptr)
          n = gemv_blocks_a16_g32_for<ST, false>(a, sp, zp, begin, end);
        else
          n = gemv_blocks_a16<0, ST>(a, sp, zp, begin, end);
        break;
      case 64: n = gemv_blocks_a16<1, ST>(a, sp, zp, begin, end); break;
      case 128: n = gemv_blocks_a16<2, ST>(a, sp, zp, begin, end); break;
      default: n = gemv_blocks_a16<4, ST>(a, sp, zp, begin, end); break;  // 256 (quant_prepare admits no other)
    }
  } else
#endif
  n = a.offset != 0.f ? gemv_blocks_dispatch<4, ST>(a, sp, zp, begin, end) : gemv_blocks_dispatch<8, ST>(a, sp, zp, begin, end);
#elif defined(HF_FASTINFER_AVX2)
  if (a.xb4 != nullptr) {  // int4 x int16 (K a multiple of 64; group 32, 64, 128 or 256)
    switch (a.group_size) {
      case 32: n = gemv_blocks_a16_u4_avx2<0, ST>(a, sp, zp, begin, end); break;
      case 64: n = gemv_blocks_a16_u4_avx2<1, ST>(a, sp, zp, begin, end); break;
      case 128: n = gemv_blocks_a16_u4_avx2<2, ST>(a, sp, zp, begin, end); break;
      default: n = gemv_blocks_a16_u4_avx2<4, ST>(a, sp, zp, begin, end); break;  // 256 (quant_prepare)
    }
  } else if (a.xk16 != nullptr) {  // int8 x int16 (group: a multiple of 32 columns)
    switch (a.group_size) {
      case 32: n = gemv_blocks_a16_i8_avx2<2, ST>(a, sp, zp, begin, end); break;
      case 64: n = gemv_blocks_a16_i8_avx2<4, ST>(a, sp, zp, begin, end); break;
      case 128: n = gemv_blocks_a16_i8_avx2<8, ST>(a, sp, zp, begin, end); break;
      default: n = gemv_blocks_a16_i8_avx2<0, ST>(a, sp, zp, begin, end); break;
    }
  } else {
    n = a.offset != 0.f ? gemv_blocks_avx2<4, ST>(a, sp, zp, begin, end) : gemv_blocks_avx2<8, ST>(a, sp, zp, begin, end);
  }
#endif
  gemv_single_rows<ST>(a, sp, zp, n, end);
}

#if defined(HF_FASTINFER_AVX512) && defined(HF_FASTINFER_A16)
// Whether x [n] holds no inf / NaN: 16 values a compare and no early exit (std::all_of over std::isfinite tests
// one value a step)
inline bool all_finite(const float* x, int64_t n) {
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __mmask16 bad = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    // |x| not below inf: inf, or NaN (unordered)
    bad |= _mm512_mask_cmp_ps_mask(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + i)), inf, _CMP_NLT_UQ);
  }
  return bad == 0;
}

// 16 activations as int16 values in int32 lanes: nearest-even of v * inv (inv = 32767 / max|x_g|), clamped to
// +-32767, the roundings of the scalar loop in quant_prepare
inline __m512i to_int16_lanes(__m512 v, __m512 inv) {
  return _mm512_max_epi32(_mm512_set1_epi32(-32767), _mm512_min_epi32(_mm512_set1_epi32(32767),
                                                                       _mm512_cvtps_epi32(_mm512_mul_ps(v, inv))));
}
#endif

#ifdef HF_FASTINFER_AVX2
// x as int16 per group for gemv_blocks_a16_i8_avx2, in xk16 [M, kpad] (column order): the values of the VNNI
// road's preparation (nearest-even of x * 32767 / max|x_g|, clamped to +-32767; the group's scale and its sum as
// held in int16), 16 at a time. A group's last values (fewer than 16) go through a zeroed copy, so the padding
// past K holds zeros. The decode step prepares every projection's input on every team thread, so this is
// vectorised like the projections. Returns false, with nothing else to read, where x holds inf or NaN (found in the
// max pass, not by a pass of its own): that x takes the float road, which propagates them as float arithmetic does.
bool int16_groups_avx2(const float* xp, int64_t M, int64_t K, int64_t group_size, QuantActivations& out) {
  const int64_t groups = out.groups, kpad = groups * group_size;
  out.kpad = kpad;
  out.xk16.assign(M * kpad, 0);
  out.xs.assign(M * (groups + 1), 0.f);
  out.xsum16.assign(M * groups, 0.f);
  const __m256 sign = _mm256_set1_ps(-0.f), inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256i lim = _mm256_set1_epi32(32767), neg_lim = _mm256_set1_epi32(-32767);
  alignas(32) float tail[16];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * group_size, len = std::min(group_size, K - k0);
      const float* xg = xp + m * K + k0;
      const auto load16 = [&](int64_t j, __m256& v0, __m256& v1) {  // values j .. j + 15 of the group, 0 past it
        const float* src = xg + j;
        if (len - j < 16) {
          std::fill(tail, tail + 16, 0.f);
          std::copy(src, src + (len - j), tail);
          src = tail;
        }
        v0 = _mm256_loadu_ps(src);
        v1 = _mm256_loadu_ps(src + 8);
      };
      __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps(), v0, v1;
      for (int64_t j = 0; j < len; j += 16) {
        load16(j, v0, v1);
        const __m256 a0 = _mm256_andnot_ps(sign, v0), a1 = _mm256_andnot_ps(sign, v1);
        vmax = _mm256_max_ps(vmax, _mm256_max_ps(a0, a1));
        // |v| not below inf, or unordered: inf or NaN
        bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(a0, inf, _CMP_NLT_UQ), _mm256_cmp_ps(a1, inf, _CMP_NLT_UQ)));
      }
      if (_mm256_movemask_ps(bad) != 0) return false;
      const float amax = hmax8(vmax);
      if (amax == 0.f) continue;  // all zero: int16 values and scale stay 0
      const __m256 inv = _mm256_set1_ps(32767.f / amax);
      const float xs = amax / 32767.f;
      __m256i qsum = _mm256_setzero_si256();
      for (int64_t j = 0; j < len; j += 16) {
        load16(j, v0, v1);
        const __m256i q0 = _mm256_max_epi32(neg_lim, _mm256_min_epi32(lim, _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv))));
        const __m256i q1 = _mm256_max_epi32(neg_lim, _mm256_min_epi32(lim, _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv))));
        qsum = _mm256_add_epi32(qsum, _mm256_add_epi32(q0, q1));
        // vpackssdw packs within 128-bit lanes (q0 0-3, q1 0-3, q0 4-7, q1 4-7): the 64-bit quarters put back
        const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), _MM_SHUFFLE(3, 1, 2, 0));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.xk16.data() + m * kpad + k0 + j), p);
      }
      const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(qsum), _mm256_extracti128_si256(qsum, 1));
      const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
      const int32_t total = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, _MM_SHUFFLE(2, 3, 0, 1))));
      out.xs[m * (groups + 1) + g] = xs;
      out.xsum16[m * groups + g] = static_cast<float>(total) * xs;
    }
  return true;
}
#endif

}  // namespace

bool quant_prefetch_nta() { return g_prefetch_nta; }
void set_quant_prefetch_nta(bool nta) { g_prefetch_nta = nta; }
bool quant_prefetch_two_level() { return g_prefetch_two_level; }
void set_quant_prefetch_two_level(bool on) { g_prefetch_two_level = on; }
bool int8_int16_activations() { return g_int8_a16; }
void set_int8_int16_activations(bool on) { g_int8_a16 = on; }
bool int4_int16_activations() { return g_int4_a16; }
void set_int4_int16_activations(bool on) { g_int4_a16 = on; }
bool int8_group_pairs() { return g_int8_pairs; }
void set_int8_group_pairs(bool on) { g_int8_pairs = on; }
bool int4_byte_products() { return g_int4_bytes; }
void set_int4_byte_products(bool on) { g_int4_bytes = on; }

void quant_prepare(const float* xp, int64_t M, int64_t K, int64_t bits, int64_t group_size, bool int16_activations,
                   QuantActivations& out) {
  const int64_t groups = (K + group_size - 1) / group_size;
  out.x = xp;
  out.M = M;
  out.K = K;
  out.groups = groups;
  out.group_size = group_size;
  const int64_t half = (K + 1) / 2;
  out.half = half;
  out.half16 = (half + 31) / 32 * 32;
  // every field a format sets is reset here: one thread's buffers serve every projection it prepares for, of
  // any model in the process (an int4 group-32 layout left over from one made an int8 projection read it)
  out.a16 = false;
  out.a16_i8 = false;
  out.a16_u4 = false;
  out.blocks64 = 0;
  out.kpad = 0;
  out.pblocks = 0;
  out.float_parts = true;  // (cleared below by the int16 roads whose single rows read x's int16 values)
#ifdef HF_FASTINFER_A16
  // int4 against 16-bit activations: x as int16 per group (gemv_blocks_a16), where the CPU has VNNI
  // (x with inf / NaN takes the float path, which propagates them as float arithmetic does)
  const bool int16_road = int16_activations && ((g_int4_a16 && bits == 4 && (group_size == 32 || group_size == 64 ||
                                                                             group_size == 128 || group_size == 256)) ||
                                                (g_int8_a16 && bits == 8 && group_size % 32 == 0));
  const bool finite = int16_road && all_finite(xp, M * K);
  const bool a16 = finite && bits == 4;
  // int8 against 16-bit activations: x as int16 per group (gemv_blocks_a16_i8), for groups of whole 32-column chunks
  const bool a16_i8 = finite && bits == 8;
  if (a16_i8) {
    // 16 values at a time, the same roundings as the scalar int4 loop below (nearest-even of x * 32767 / max|x_g|,
    // clamped to +-32767), the group's sum as held in int16
    const int64_t kpad = groups * group_size;
    out.a16_i8 = true;
    out.float_parts = false;  // (the single rows read xk16)
    out.kpad = kpad;
    out.xk16.assign(M * kpad, 0);
    out.xs.assign(M * (groups + 1), 0.f);
    out.xsum16.assign(M * groups, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * group_size, len = std::min(group_size, K - k0);
        const float* xg = xp + m * K + k0;
        __m512 vmax = _mm512_setzero_ps();
        for (int64_t j = 0; j < len; j += 16)
          vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(len - j), xg + j)));
        const float amax = _mm512_reduce_max_ps(vmax);
        if (amax == 0.f) continue;  // all zero: int16 values and scale stay 0
        const __m512 inv = _mm512_set1_ps(32767.f / amax);
        const float xs = amax / 32767.f;
        __m512i qsum = _mm512_setzero_si512();
        int16_t* dst = out.xk16.data() + m * kpad + k0;
        for (int64_t j = 0; j < len; j += 16) {
          const __mmask16 mk = tail_mask(len - j);
          const __m512i q = to_int16_lanes(_mm512_maskz_loadu_ps(mk, xg + j), inv);
          _mm256_mask_storeu_epi16(dst + j, mk, _mm512_cvtepi32_epi16(q));
          qsum = _mm512_add_epi32(qsum, q);  // (masked-off lanes loaded as 0)
        }
        out.xs[m * (groups + 1) + g] = xs;
        out.xsum16[m * groups + g] = static_cast<float>(_mm512_reduce_add_epi32(qsum)) * xs;
      }
    // group 32, K a multiple of 32 (every projection of the default model): the pairs layout of
    // gemv_blocks_a16_i8_pairs. In 64-column block b, 128-bit lane l of the weight holds columns 16 l .. 16 l + 15;
    // vpunpcklbw widens the first 8 of each lane, vpunpckhbw the last 8, so x goes in the same order: lo lane l =
    // x[64 b + 16 l + 0..7], hi lane l = x[64 b + 16 l + 8..15]. Int32 lane i = 4 l + t of a product sums the
    // values at 2 t, 2 t + 1 of lane l of both: its offset correction is -128 times those four x values.
    out.pblocks = (group_size == 32 && K % 32 == 0 && g_int8_pairs) ? (groups + 1) / 2 : 0;
    const int64_t pb = out.pblocks;
    out.xp16.assign(M * pb * 64, 0);
    out.xcorr.assign(M * pb * 16, 0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < pb; ++b) {
        const int16_t* src = out.xk16.data() + m * kpad + 64 * b;  // (kpad >= 64 b + 32; past it, zero)
        const int64_t avail = std::min<int64_t>(64, kpad - 64 * b);
        int16_t* lo = out.xp16.data() + (m * pb + b) * 64;
        int16_t* hi = lo + 32;
        int32_t* corr = out.xcorr.data() + (m * pb + b) * 16;
        for (int64_t l = 0; l < 4; ++l)
          for (int64_t j = 0; j < 8; ++j) {
            const int64_t c = 16 * l + j;
            lo[8 * l + j] = c < avail ? src[c] : 0;
            hi[8 * l + j] = c + 8 < avail ? src[c + 8] : 0;
          }
        for (int64_t i = 0; i < 16; ++i) {
          const int64_t l = i / 4, t = i % 4;
          corr[i] = -128 * (lo[8 * l + 2 * t] + lo[8 * l + 2 * t + 1] + hi[8 * l + 2 * t] + hi[8 * l + 2 * t + 1]);
        }
      }
  }
  if (a16) {
    const int64_t half16 = out.half16;
    out.a16 = true;
    // group 32 with whole 32-byte chunks: x16 in gemv_blocks_a16_g32's lane order instead of xe16 / xo16
    const bool g32 = group_size == 32 && K % 64 == 0;
    const int64_t blocks = (half + 63) / 64;
    out.blocks64 = g32 ? blocks : 0;
    out.xe16.assign(g32 ? 0 : M * half16, 0);
    out.xo16.assign(g32 ? 0 : M * half16, 0);
    const bool bytes = g32 && g_int4_bytes;
    out.x16.assign(g32 && !bytes ? M * blocks * 128 : 0, 0);
    out.xg32b.assign(bytes ? M * blocks * 256 : 0, 0);
    out.xs4.assign(g32 ? M * blocks * 16 : 0, 0.f);
    out.xq4.assign(g32 ? M * blocks * 16 : 0, 0.f);
    // per-group scales and sums for gemv_blocks_a16 and the single rows (g32's blocks read their own,
    // lane-expanded, in xs4 / xq4)
    out.xs.assign(M * (groups + 1), 0.f);
    out.xsum16.assign(M * groups, 0.f);
    if (g32) {
      // the single rows (a range's last rows) read x's int16 values in column order, as the int8 road's, and no
      // float parts are built: with the vectorised finiteness check, int4's decode chain 1.022x on an AMD Zen 4
      // host (a scratch switch against the float parts and std::all_of, 500 pairs; int8, whose float part is
      // only xsum, 1.002x)
      out.float_parts = false;
      out.kpad = K;
      out.xk16.assign(M * K, 0);
      // 32 values a group in two registers (the decode step prepares every projection's input on every team
      // thread: scalar, with a call of nearbyint per value, this cost about as much as a small projection).
      // The same values as the scalar loop below: nearest-even rounding of the same float products, clamped.
      const __m256i evens_odds = _mm256_setr_epi16(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
      // the group's 32 values: its 16 even columns, then its 16 odd ones
      const __m512i evens_odds32 = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
                                                    30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < groups; ++g) {
          const float* xg = xp + m * K + 32 * g;
          const __m512 v0 = _mm512_loadu_ps(xg), v1 = _mm512_loadu_ps(xg + 16);
          const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
          if (amax == 0.f) continue;  // all zero: int16 values and scale stay 0
          const __m512 inv = _mm512_set1_ps(32767.f / amax);
          const float xs = amax / 32767.f;
          const __m512i q0 = to_int16_lanes(v0, inv), q1 = to_int16_lanes(v1, inv);
          const __m256i h0 = _mm512_cvtepi32_epi16(q0), h1 = _mm512_cvtepi32_epi16(q1);  // columns 0-15, 16-31
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.xk16.data() + m * K + 32 * g), h0);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.xk16.data() + m * K + 32 * g + 16), h1);
          if (bytes) {
            // the group is bytes 16 (g % 4) .. + 15 of each of its block's four 64-byte runs: the even columns'
            // low bytes, the odd columns' low bytes, then their high bytes (arithmetic shift: the signed byte h)
            const __m512i v = _mm512_permutexvar_epi16(evens_odds32, _mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1));
            const __m256i lows = _mm512_cvtepi16_epi8(v), highs = _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8));
            uint8_t* dst = out.xg32b.data() + (m * blocks + g / 4) * 256 + (g % 4) * 16;
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(lows));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 64), _mm256_extracti128_si256(lows, 1));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 128), _mm256_castsi256_si128(highs));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 192), _mm256_extracti128_si256(highs, 1));
          } else {
            // Column c of the group is nibble c % 2 of its byte c / 2; the group is 128-bit lane g % 4 of its
            // 64-byte block, where vpunpcklbw widens bytes 0-7 ("A") and vpunpckhbw bytes 8-15 ("B") to int16
            // lanes 8 * (g % 4) + byte % 8. So columns 0-15 and 16-31, each split into even / odd, are the four
            // runs of 8 values the block kernel multiplies with: lo A, hi A, lo B, hi B.
            const __m256i p0 = _mm256_permutexvar_epi16(evens_odds, h0), p1 = _mm256_permutexvar_epi16(evens_odds, h1);
            int16_t* dst = out.x16.data() + (m * blocks + g / 4) * 128 + (g % 4) * 8;
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(p0));          // lo A
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 64), _mm256_extracti128_si256(p0, 1));  // hi A
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32), _mm256_castsi256_si128(p1));     // lo B
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 96), _mm256_extracti128_si256(p1, 1));  // hi B
          }
          const float xsum16 = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1))) * xs;
          out.xs[m * (groups + 1) + g] = xs;
          out.xsum16[m * groups + g] = xsum16;
          for (int64_t l = 0; l < 4; ++l) {  // the group's int16 scale and a quarter of its sum on its four lanes
            out.xs4[(m * blocks + g / 4) * 16 + 4 * (g % 4) + l] = xs;
            out.xq4[(m * blocks + g / 4) * 16 + 4 * (g % 4) + l] = xsum16 / 4.f;
          }
        }
    } else
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * group_size, k1 = std::min(K, k0 + group_size);
        float amax = 0.f;
        for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::abs(xp[m * K + k]));
        if (amax == 0.f) continue;  // all zero: int16 values and scale stay 0
        const float inv = 32767.f / amax;
        out.xs[m * (groups + 1) + g] = amax / 32767.f;
        int64_t qsum = 0;
        for (int64_t k = k0; k < k1; ++k) {
          const int16_t q = static_cast<int16_t>(std::min(32767.f, std::max(-32767.f, std::nearbyint(xp[m * K + k] * inv))));
          (k % 2 ? out.xo16 : out.xe16)[m * half16 + k / 2] = q;
          qsum += q;
        }
        out.xsum16[m * groups + g] = static_cast<float>(qsum) * out.xs[m * (groups + 1) + g];
      }
  }
#elif defined(HF_FASTINFER_AVX2)
  // int8 against 16-bit activations (gemv_blocks_a16_i8_avx2), for groups of whole 32-column chunks; int4
  // (gemv_blocks_a16_u4_avx2) with whole 64-column chunks and the VNNI road's group sizes. x with inf / NaN takes
  // the float road (int16_groups_avx2 finds them).
  const bool a16_i8 = int16_activations && g_int8_a16 && bits == 8 && group_size % 32 == 0 &&
                      int16_groups_avx2(xp, M, K, group_size, out);
  const bool a16_u4 = int16_activations && g_int4_a16 && bits == 4 && K % 64 == 0 &&
                      (group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256) &&
                      int16_groups_avx2(xp, M, K, group_size, out);
  out.float_parts = !(a16_i8 || a16_u4);  // (their single rows read xk16 too)
  if (a16_i8) {
    out.a16_i8 = true;
  } else if (a16_u4) {
    out.a16_u4 = true;
    // each value's low byte (unsigned) and high byte (signed), even and odd columns apart: [M, 4, half]
    // (as a byte transpose of 16 pairs a step, with shuffles, it measured no faster: chain A/B 0.998-1.001)
    out.xb4.resize(M * 4 * half);
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* src = out.xk16.data() + m * out.kpad;
      uint8_t* dst = out.xb4.data() + m * 4 * half;
      for (int64_t j = 0; j < half; ++j) {
        const int16_t e = src[2 * j], o = src[2 * j + 1];
        dst[j] = static_cast<uint8_t>(e & 255);
        dst[half + j] = static_cast<uint8_t>(static_cast<int8_t>(e >> 8));
        dst[2 * half + j] = static_cast<uint8_t>(o & 255);
        dst[3 * half + j] = static_cast<uint8_t>(static_cast<int8_t>(o >> 8));
      }
    }
  }
#endif
  // The float road's parts: per-group sums of x (for zero points and the int4 offset) and, for int4, x split into
  // even / odd columns. Not built for the AVX2 int16 roads, which read none of them: two scalar passes over x
  // that cost int4's decode chain about 2% on a Zen 3 core (BENCHMARKS.md).
  if (out.float_parts) {
    out.xsum.assign(M * groups, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < groups; ++g) {  // (no division per element: it once cost more than a small GEMV)
        float sum = 0.f;
        for (int64_t k = g * group_size; k < std::min(K, (g + 1) * group_size); ++k) sum += xp[m * K + k];
        out.xsum[m * groups + g] = sum;
      }
    if (bits == 4) {
      out.xe.assign(M * half, 0.f);
      out.xo.assign(M * half, 0.f);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; 2 * j < K; ++j) {
          out.xe[m * half + j] = xp[m * K + 2 * j];
          if (2 * j + 1 < K) out.xo[m * half + j] = xp[m * K + 2 * j + 1];
        }
    }
  }
  (void)int16_activations;
}

void quant_rows(const QuantWeight& w, const QuantActivations& x, float* y, int64_t begin, int64_t end) {
  const int64_t half = (w.K + 1) / 2;
  const bool g32 = x.a16 && x.blocks64 > 0;
  const bool a16 = x.a16 || x.a16_i8 || x.a16_u4;  // (xs and xsum16 serve all three)
  const bool fp = x.float_parts;
  const GemvArgs args{x.x, fp ? x.xe.data() : nullptr, fp ? x.xo.data() : nullptr, fp ? x.xsum.data() : nullptr, w.w, w.bias, y,
                      x.M, w.N, w.K, w.groups, w.group_size, half, w.bits == 8 ? w.K : half, w.bits == 4 ? 8.f : 0.f,
                      x.a16 && !g32 ? x.xe16.data() : nullptr, x.a16 && !g32 ? x.xo16.data() : nullptr,
                      a16 ? x.xs.data() : nullptr, a16 ? x.xsum16.data() : nullptr, x.half16,
                      g32 && !x.x16.empty() ? x.x16.data() : nullptr, g32 && !x.xg32b.empty() ? x.xg32b.data() : nullptr,
                      g32 ? x.xs4.data() : nullptr, g32 ? x.xq4.data() : nullptr,
                      x.blocks64, x.a16_i8 || x.a16_u4 || g32 ? x.xk16.data() : nullptr, x.kpad,
                      x.pblocks > 0 ? x.xp16.data() : nullptr, x.pblocks > 0 ? x.xcorr.data() : nullptr,
                      x.pblocks, x.a16_u4 ? x.xb4.data() : nullptr, g_prefetch_nta, g_prefetch_two_level};
  if (w.half_scales)
    rows_range<c10::Half>(args, static_cast<const c10::Half*>(w.scales), static_cast<const c10::Half*>(w.zeros), begin, end);
  else
    rows_range<float>(args, static_cast<const float*>(w.scales), static_cast<const float*>(w.zeros), begin, end);
}

// The standalone op (hf_fastinfer.kernels.quant_matmul's CPU path for a few rows).
// x: [..., K] float32 / bfloat16 / float16 (converted to float32 here: K values per row, negligible next to
// the weight); returns y [..., N] in x's dtype. The conversions live here rather than in Python because at
// decode sizes each Python-level tensor op costs about as much as the matrix-vector product itself.
// qweight: int8 [N, K] (bits 8) or uint8 [N, ceil(K/2)] (bits 4); scales, zeros: float [N, G_count].
// int16_activations: int4 against x held as int16 per group (gemv_blocks_a16); callers ask for it with bf16 x.
at::Tensor quant_gemv(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales_in,
                      const c10::optional<at::Tensor>& zeros_in, const c10::optional<at::Tensor>& bias_in, int64_t bits,
                      int64_t group_size, int64_t in_features, bool int16_activations) {
  const auto x_dtype = x_in.scalar_type();
  TORCH_CHECK((x_dtype == at::kFloat || x_dtype == at::kBFloat16 || x_dtype == at::kHalf) && x_in.dim() >= 1 &&
              x_in.size(-1) == in_features, "x must be float32 / bfloat16 / float16 [..., in_features]");
  TORCH_CHECK(scales_in.is_floating_point(), "scales must be float");
  TORCH_CHECK(qweight.is_contiguous() && qweight.element_size() == 1, "qweight must be contiguous int8 / uint8");
  TORCH_CHECK(group_size > 0, "group_size must be positive");
  // (each ATen call costs about a microsecond even when it changes nothing: skipped when nothing would change)
  const auto as = [](const at::Tensor& t, c10::ScalarType dtype) {
    return t.scalar_type() == dtype && t.is_contiguous() ? t : t.to(dtype).contiguous();
  };
  const auto x = as(x_in.dim() == 2 ? x_in : x_in.reshape({-1, in_features}), at::kFloat);
  // scales and zeros are read as stored when fp16 or fp32 (converted once per group inside the kernel)
  const auto sdtype = scales_in.scalar_type() == at::kHalf ? at::kHalf : at::kFloat;
  const auto scales = as(scales_in, sdtype);
  c10::optional<at::Tensor> zeros, bias;
  if (zeros_in.has_value()) zeros = as(*zeros_in, sdtype);
  if (bias_in.has_value()) bias = as(*bias_in, at::kFloat);
  const int64_t M = x.size(0), K = in_features, N = qweight.size(0);
  const int64_t groups = (K + group_size - 1) / group_size;
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == groups, "shape mismatch");
  TORCH_CHECK(bits == 8 || (bits == 4 && group_size % 2 == 0), "bits 8, or bits 4 with an even group size");
  TORCH_CHECK(qweight.size(1) == (bits == 8 ? K : (K + 1) / 2), "qweight's row length does not match in_features");
  if (zeros.has_value()) TORCH_CHECK(zeros->sizes() == scales.sizes(), "zeros must have the scales' shape");
  QuantWeight w;
  w.w = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  w.scales = scales.data_ptr();
  w.zeros = zeros.has_value() ? zeros->data_ptr() : nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "bias must be [N]");
    w.bias = bias->data_ptr<float>();
  }
  w.half_scales = sdtype == at::kHalf;
  w.N = N;
  w.K = K;
  w.bits = bits;
  w.group_size = group_size;
  w.groups = groups;
  QuantActivations xa;
  quant_prepare(x.data_ptr<float>(), M, K, bits, group_size, int16_activations, xa);
  at::Tensor y = at::detail::empty_cpu({M, N}, at::kFloat, false, c10::nullopt);  // (no dispatcher: ~1 us less)
  float* yp = y.data_ptr<float>();
  // one parallel region with 4-row-aligned shares, as dense_gemv and a decode chain's head split their rows: every
  // share starts on a multiple of four, so each row takes the same loop (blocks of four, or the single-row loop
  // for the last N % 4) whichever of the three computes it and with any thread count. Fewer than 64 rows stay on
  // the calling thread, as at::parallel_for's grain kept them.
  const int nt = N < 64 ? 1 : team_size();
#pragma omp parallel num_threads(nt)
  {
    int64_t begin, end;
    thread_share(N, 4, omp_get_thread_num(), omp_get_num_threads(), begin, end);
    quant_rows(w, xa, yp, begin, end);
  }
  if (x_dtype != at::kFloat) y = y.to(x_dtype);
  if (x_in.dim() == 2) return y;
  auto out_sizes = x_in.sizes().vec();
  out_sizes.back() = N;
  return y.view(out_sizes);
}

}  // namespace hf_fastinfer
