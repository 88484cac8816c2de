// Float-weight matrix-vector products for a few activation rows: batch-1 decode reads every weight once per
// token, so the speed is the memory bandwidth the loop sustains. PyTorch's eager F.linear moves 10-20 GB/s on
// a decode-sized fp32 weight and about half that in bf16 (it converts and packs per call); this loop, four
// rows at a time with software prefetch, moves the machine's read bandwidth (BENCHMARKS.md).
#include "dense_gemv.h"

#include <ATen/EmptyTensor.h>

#include <type_traits>
#include <vector>

#include "ops.h"
#include "simd.h"

namespace hf_fastinfer {
namespace {

// How far ahead of the rows being read the software prefetch runs, into L2 (T1): the hardware prefetcher alone
// leaves the loop short of the bandwidth when it converts bf16 / fp16, and prefetching into L1 (T0) evicts lines
// before they are read (L1 is 48 KB). Measured on 2 cores over a decoder's projection shapes in sequence
// (bf16, against a 25-28 GB/s fp32 sum()): no prefetch 16-20 GB/s; T0 at 4-128 KB 21-24 GB/s; T1 at 8-32 KB
// 27-29 GB/s, best at 16 KB. fp32 reads at the bandwidth either way (26-31 GB/s).
constexpr int64_t kPrefetchBytes = 16 * 1024;

// Whether bf16 weights meet the activations through AVX512-BF16 dot products (block4_bf16, below) or as float
// (set_bf16_dot_products: benchmarks' A/B in one process).
bool g_bf16_dot = true;

#ifdef HF_FASTINFER_AVX512
// rows [n, n + 4) against every activation row: four chains of products side by side, one load of x per chunk
// of COLS columns, the prefetches of the block ahead spread over the first pass (a burst of them stalls the
// core). chunk(acc, xm, r, k) adds columns [k, k + COLS) of the four rows r[0..3] against x's row xm to acc[0..3].
template <int COLS, typename XT, typename WT, typename Chunk>
__attribute__((always_inline)) inline void block4(const WT* w, const XT* x, int64_t x_stride, int64_t M, int64_t K,
                                                  const float* bias, float* y, int64_t N, int64_t n,
                                                  const char* prefetch, int64_t prefetch_lines, Chunk chunk) {
  const WT* const r[4] = {w + n * K, w + (n + 1) * K, w + (n + 2) * K, w + (n + 3) * K};
  const int64_t chunks = (K + COLS - 1) / COLS;
  const int64_t per_chunk = (prefetch_lines + chunks - 1) / chunks;
  for (int64_t m = 0; m < M; ++m) {
    const XT* xm = x + m * x_stride;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const char* pf = prefetch;
    int64_t issued = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      if (m == 0)
        for (int64_t l = 0; l < per_chunk && issued < prefetch_lines; ++l, ++issued) _mm_prefetch(pf + 64 * issued, _MM_HINT_T1);
      chunk(acc, xm, r, COLS * c);
    }
    float* ym = y + m * N + n;
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) ym[i] = _mm512_reduce_add_ps(acc[i]) + (bias ? bias[n + i] : 0.f);
  }
}

// float weights (fp32, or bf16 / fp16 widened to fp32): 16 columns a chunk, one FMA per row
template <typename WT>
inline void block4_float(const WT* w, const float* x, int64_t M, int64_t K, const float* bias, float* y, int64_t N,
                         int64_t n, const char* prefetch, int64_t prefetch_lines) {
  block4<16>(w, x, K, M, K, bias, y, N, n, prefetch, prefetch_lines,
             [K](__m512* acc, const float* xm, const WT* const* r, int64_t k) {
               const __mmask16 mk = tail_mask(K - k);
               const __m512 xv = _mm512_maskz_loadu_ps(mk, xm + k);
#pragma GCC unroll 4
               for (int i = 0; i < 4; ++i) acc[i] = _mm512_fmadd_ps(xv, load16(r[i] + k, mk), acc[i]);
             });
}

#ifdef __AVX512BF16__
// bf16 weights, the AVX512-BF16 way: vdpbf16ps multiplies 32 bf16 pairs and adds each lane's two products into
// its fp32 sum, so one instruction takes 64 bytes of a row, where block4_float widens two halves to fp32 (two
// shifts) and runs two FMAs. The products are exact (8-bit mantissas) and the sums fp32, as there; only the
// order of the additions differs (and denormal inputs and sums count as zero). x must hold bf16 values (xb:
// x's bf16 bits, zero-padded to whole 32-column chunks): the decode layer and the standalone op give it values
// already rounded to bf16, as the model rounds a projection's input. Measured on 2 cores over a decoder's
// projection shapes in sequence, 212 MB of bf16 weights read cold (Xeon with AMX, 2.6 GHz): 24-30 GB/s against
// 21-27 for the float road, 12 interleaved rounds (BENCHMARKS.md). The prefetches go to L2 (T1), as the float
// road's: into L1 (T0) they measured 22-26 GB/s.
inline void block4_bf16(const uint16_t* w, const uint16_t* xb, int64_t M, int64_t K, int64_t kpad, const float* bias,
                        float* y, int64_t N, int64_t n, const char* prefetch, int64_t prefetch_lines) {
  block4<32>(w, xb, kpad, M, K, bias, y, N, n, prefetch, prefetch_lines,
             [K](__m512* acc, const uint16_t* xm, const uint16_t* const* r, int64_t k) {
               const __mmask32 mk = K - k >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu)
                                                : static_cast<__mmask32>((1ull << (K - k)) - 1);
               const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xm + k));  // (padding: zeros)
#pragma GCC unroll 4
               for (int i = 0; i < 4; ++i)
                 acc[i] = _mm512_dpbf16_ps(acc[i], xv, reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mk, r[i] + k)));
             });
}

// x [M, K] float (bf16 values) as bf16 bits [M, kpad], zero-padded, in the calling thread's buffer
inline const uint16_t* bf16_activations(const float* x, int64_t M, int64_t K, int64_t kpad) {
  static thread_local std::vector<uint16_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < M * kpad) buffer.resize(M * kpad);
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* dst = buffer.data() + m * kpad;
    for (int64_t k = 0; k < kpad; k += 16) {
      const __mmask16 mk = tail_mask(std::max<int64_t>(K - k, 0));  // (past K: zeros)
      const __m256bh b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, x + m * K + k));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), reinterpret_cast<__m256i>(b));
    }
  }
  return buffer.data();
}
#endif
#elif defined(HF_FASTINFER_AVX2)
// block4_float in 8 lanes (CPUs with AVX2 + FMA, no AVX-512): rows [n, n + 4) against every activation row, 8
// columns a step, the same spread-out prefetch of the block ahead; a row's columns past its last whole 8 one by
// one. Without it each row was one compiler-vectorised dot with no prefetch, and bf16 weights streamed at about
// 14 GB/s on a host whose fp32 sum() reads 20-25 (BENCHMARKS.md).
template <typename WT>
inline void block4_avx2(const WT* w, const float* x, int64_t M, int64_t K, const float* bias, float* y, int64_t N,
                        int64_t n, const char* prefetch, int64_t prefetch_lines) {
  const WT* const r[4] = {w + n * K, w + (n + 1) * K, w + (n + 2) * K, w + (n + 3) * K};
  const int64_t whole = K & ~int64_t(7), chunks = whole / 8;
  const int64_t per_chunk = chunks > 0 ? (prefetch_lines + chunks - 1) / chunks : 0;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const char* pf = prefetch;
    int64_t issued = 0;
    for (int64_t k = 0; k < whole; k += 8) {
      if (m == 0)
        for (int64_t l = 0; l < per_chunk && issued < prefetch_lines; ++l, ++issued) _mm_prefetch(pf + 64 * issued, _MM_HINT_T1);
      const __m256 xv = _mm256_loadu_ps(xm + k);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) acc[i] = _mm256_fmadd_ps(xv, load8(r[i] + k), acc[i]);
    }
    float* ym = y + m * N + n;
    for (int i = 0; i < 4; ++i) {
      float sum = hsum8(acc[i]);
      for (int64_t k = whole; k < K; ++k) sum += xm[k] * static_cast<float>(r[i][k]);
      ym[i] = sum + (bias ? bias[n + i] : 0.f);
    }
  }
}
#endif

template <typename WT>
void rows_typed(const DenseWeight& dw, const float* x, int64_t M, float* y, int64_t begin, int64_t end) {
  const WT* w = static_cast<const WT*>(dw.w);
  const int64_t N = dw.N, K = dw.K;
  int64_t n = begin;
#if defined(HF_FASTINFER_AVX512) || defined(HF_FASTINFER_AVX2)
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(WT));
  const int64_t ahead = std::max<int64_t>(4, (kPrefetchBytes / row_bytes) & ~int64_t(3));
  const int64_t lines = (4 * row_bytes + 63) / 64;
#ifdef __AVX512BF16__
  const bool bf16_dot = std::is_same<WT, c10::BFloat16>::value && g_bf16_dot && n + 4 <= end;
  const int64_t kpad = (K + 31) / 32 * 32;
  const uint16_t* xb = bf16_dot ? bf16_activations(x, M, K, kpad) : nullptr;
#endif
  for (; n + 4 <= end; n += 4) {
    // the block `ahead` rows on while it is inside this thread's range (past it, another thread reads it)
    const bool in_range = n + ahead + 4 <= end;
    const char* pf = reinterpret_cast<const char*>(w + (in_range ? n + ahead : n) * K);
#ifdef __AVX512BF16__
    if (bf16_dot) {
      block4_bf16(reinterpret_cast<const uint16_t*>(w), xb, M, K, kpad, dw.bias, y, N, n, pf, in_range ? lines : 0);
      continue;
    }
#endif
#ifdef HF_FASTINFER_AVX512
    block4_float<WT>(w, x, M, K, dw.bias, y, N, n, pf, in_range ? lines : 0);
#else
    block4_avx2<WT>(w, x, M, K, dw.bias, y, N, n, pf, in_range ? lines : 0);
#endif
  }
#endif
  for (; n < end; ++n) {
    const WT* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += xm[k] * static_cast<float>(row[k]);
      y[m * N + n] = acc + (dw.bias ? dw.bias[n] : 0.f);
    }
  }
}

}  // namespace

bool bf16_dot_products() {
#ifdef __AVX512BF16__
  return g_bf16_dot;
#else
  return false;
#endif
}
void set_bf16_dot_products(bool on) { g_bf16_dot = on; }

void dense_rows(const DenseWeight& w, const float* x, int64_t M, float* y, int64_t begin, int64_t end) {
  switch (w.dtype) {
    case at::kFloat: rows_typed<float>(w, x, M, y, begin, end); break;
    case at::kBFloat16: rows_typed<c10::BFloat16>(w, x, M, y, begin, end); break;
    case at::kHalf: rows_typed<c10::Half>(w, x, M, y, begin, end); break;
    default: TORCH_CHECK(false, "dense_rows: float32, bfloat16 or float16 weights");
  }
}

// The standalone op (hf_fastinfer.kernels.linear's CPU path for a few rows). x: [..., K] of the weight's dtype;
// weight: [N, K] contiguous; bias: [N] or None. Returns [..., N] in x's dtype, accumulated in fp32 and rounded
// once (as F.linear does).
at::Tensor dense_gemv(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_in) {
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "x must be float32 / bfloat16 / float16");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == dtype,
              "weight must be a contiguous [N, K] tensor of x's dtype");
  const int64_t K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K, "x must be [..., in_features]");
  const auto x = x_in.reshape({-1, K}).to(at::kFloat).contiguous();
  c10::optional<at::Tensor> bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->numel() == N, "bias must be [N]");
    bias = bias_in->to(at::kFloat).contiguous();
  }
  const int64_t M = x.size(0);
  DenseWeight w;
  w.w = weight.data_ptr();
  w.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  w.dtype = dtype;
  w.N = N;
  w.K = K;
  at::Tensor y = at::detail::empty_cpu({M, N}, at::kFloat, false, c10::nullopt);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int nt = team_size();
  // one parallel region with 4-row-aligned shares (at::parallel_for's grain would not align them)
#pragma omp parallel num_threads(nt)
  {
    int64_t begin, end;
    thread_share(N, 4, omp_get_thread_num(), omp_get_num_threads(), begin, end);
    dense_rows(w, xp, M, yp, begin, end);
  }
  if (dtype != at::kFloat) y = y.to(dtype);
  auto out_sizes = x_in.sizes().vec();
  out_sizes.back() = N;
  return y.view(out_sizes);
}

}  // namespace hf_fastinfer
