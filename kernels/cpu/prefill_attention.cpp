// hf_fastinfer.kernels.prefill_attention, CPU path: attention for prompts (many query tokens); AVX-512 and
// AVX2 + FMA builds (the plain C++ build leaves prompts to SDPA).
//
// out[b, i, h, :] = sum_j p[i, j] v[j, :] / sum_j p[i, j],  p[i, j] = exp(s[i, j] - max_j s[i, j]) over the
// keys query i sees, s = (q k^T) * scale in fp32. A task is one query head and a block of 16 query positions;
// its scores for every key it can see stay in a row buffer (16 x the keys), so the softmax needs no running
// rescale, and the keys past the block's last visible one are never touched (a causal prompt does about half
// the products of a full square). For each batch row, the keys are first laid out transposed in fp32 blocks of
// 32 ([key block, D, 32]) and the values widened to fp32 ([key, D]): the score loop then broadcasts one query
// element against 32 keys per pair of FMAs (AVX-512: 8 query rows x 32 keys in 16 registers; AVX2: 4 rows x 16
// keys in 8), the value loop one probability against 64 (AVX2: 16) value columns. Reduced-precision inputs: p is rounded to the input dtype before its
// product with v and the sum stays fp32, as torch's flash attention for CPU does.
#include "ops.h"
#include "simd.h"

#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

namespace hf_fastinfer {

#if defined(HF_FASTINFER_AVX512) || defined(HF_FASTINFER_AVX2)

namespace {

constexpr int64_t kQueryBlock = 16;  // query positions per task
constexpr int64_t kKeyBlock = 32;    // keys per transposed block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#ifdef HF_FASTINFER_AVX512
// S[r, j] = scale * q_r . k_j for the 8 query rows of qf (rows of D floats) and the 32 keys of one transposed
// block kt ([D, 32]); rows of s are `ld` floats apart. 16 accumulators, 2 loads per 16 FMAs.
inline void scores_rows(const float* qf, int64_t D, const float* kt, float scale, float* s, int64_t ld) {
  __m512 acc[8][2];
  for (int r = 0; r < 8; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 k0 = _mm512_loadu_ps(kt + d * kKeyBlock), k1 = _mm512_loadu_ps(kt + d * kKeyBlock + 16);
    for (int r = 0; r < 8; ++r) {
      const __m512 x = _mm512_set1_ps(qf[r * D + d]);
      acc[r][0] = _mm512_fmadd_ps(x, k0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, k1, acc[r][1]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < 8; ++r) {
    _mm512_storeu_ps(s + r * ld, _mm512_mul_ps(acc[r][0], sc));
    _mm512_storeu_ps(s + r * ld + 16, _mm512_mul_ps(acc[r][1], sc));
  }
}
constexpr int kScoreRows = 8;

// o[r, c0 : c0 + 16 NV] = sum_{j < n} p[r, j] vf[j, c0 : ...] for 4 rows of p (rows `ld` apart); vf rows are D floats.
template <int NV>
inline void values_chunk(const float* p, int64_t ld, int64_t n, const float* vf, int64_t D, int64_t c0, float* o) {
  __m512 acc[4][NV];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m512 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(vf + j * D + c0 + 16 * c);
    for (int r = 0; r < 4; ++r) {
      const __m512 x = _mm512_set1_ps(p[r * ld + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(x, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * D + c0 + 16 * c, acc[r][c]);
}

// o[4 rows, D] = p . vf, in column chunks of up to 64
inline void values_rows(const float* p, int64_t ld, int64_t n, const float* vf, int64_t D, float* o) {
  for (int64_t c0 = 0; c0 < D; c0 += 64) {
    switch (std::min<int64_t>(4, (D - c0) / 16)) {
      case 4: values_chunk<4>(p, ld, n, vf, D, c0, o); break;
      case 3: values_chunk<3>(p, ld, n, vf, D, c0, o); break;
      case 2: values_chunk<2>(p, ld, n, vf, D, c0, o); break;
      default: values_chunk<1>(p, ld, n, vf, D, c0, o); break;
    }
  }
}

// x[j] <- -inf where the mask byte m[j] is 0 (a key the row does not see), n a multiple of 16
inline void apply_mask(float* x, const bool* m, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m + j));
    const __mmask16 seen = _mm_test_epi8_mask(bytes, bytes);
    _mm512_storeu_ps(x + j, _mm512_mask_blend_ps(seen, _mm512_set1_ps(kNegInf), _mm512_loadu_ps(x + j)));
  }
}

// the largest of n floats (n a multiple of 16; -inf where every one is); *nan: whether any is NaN
inline float row_max(const float* x, int64_t n, bool* nan) {
  __m512 mx = _mm512_set1_ps(kNegInf);
  __mmask16 unordered = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, v);
  }
  *nan = unordered != 0;
  return _mm512_reduce_max_ps(mx);
}

// x[j] <- e^(x[j] - shift) rounded to T (0 where x[j] is -inf: a key not seen); returns the fp32 sum
template <typename T>
inline float exp_row(float* x, int64_t n, float shift) {
  const __m512 sh = _mm512_set1_ps(shift), ninf = _mm512_set1_ps(kNegInf);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, ninf, _CMP_NEQ_OQ), exp16(_mm512_sub_ps(v, sh)));
    sum = _mm512_add_ps(sum, e);
    _mm512_storeu_ps(x + j, round16(e, static_cast<const T*>(nullptr)));
  }
  return _mm512_reduce_add_ps(sum);
}

// dst[:D] = src[:D] * f as T
template <typename T>
inline void store_scaled(T* dst, const float* src, int64_t D, float f) {
  const __m512 fv = _mm512_set1_ps(f);
  for (int64_t d = 0; d < D; d += 16) store16(dst + d, _mm512_mul_ps(_mm512_loadu_ps(src + d), fv), tail_mask(D - d));
}

#else  // AVX2 + FMA: the same loops in 8 lanes, with tiles that fit 16 registers
// S for 4 query rows and 16 keys (half `h` of a 32-key block): 8 accumulators, 2 loads per 8 FMAs
inline void scores_half(const float* qf, int64_t D, const float* kt, float scale, float* s, int64_t ld) {
  __m256 acc[4][2];
  for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 k0 = _mm256_loadu_ps(kt + d * kKeyBlock), k1 = _mm256_loadu_ps(kt + d * kKeyBlock + 8);
    for (int r = 0; r < 4; ++r) {
      const __m256 x = _mm256_broadcast_ss(qf + r * D + d);
      acc[r][0] = _mm256_fmadd_ps(x, k0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, k1, acc[r][1]);
    }
  }
  const __m256 sc = _mm256_set1_ps(scale);
  for (int r = 0; r < 4; ++r) {
    _mm256_storeu_ps(s + r * ld, _mm256_mul_ps(acc[r][0], sc));
    _mm256_storeu_ps(s + r * ld + 8, _mm256_mul_ps(acc[r][1], sc));
  }
}
inline void scores_rows(const float* qf, int64_t D, const float* kt, float scale, float* s, int64_t ld) {
  scores_half(qf, D, kt, scale, s, ld);
  scores_half(qf, D, kt + 16, scale, s + 16, ld);
}
constexpr int kScoreRows = 4;

// o[4 rows, D] = p . vf in chunks of 16 columns (8 accumulators)
inline void values_rows(const float* p, int64_t ld, int64_t n, const float* vf, int64_t D, float* o) {
  for (int64_t c0 = 0; c0 < D; c0 += 16) {
    __m256 acc[4][2];
    for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m256 v0 = _mm256_loadu_ps(vf + j * D + c0), v1 = _mm256_loadu_ps(vf + j * D + c0 + 8);
      for (int r = 0; r < 4; ++r) {
        const __m256 x = _mm256_broadcast_ss(p + r * ld + j);
        acc[r][0] = _mm256_fmadd_ps(x, v0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(x, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < 4; ++r) {
      _mm256_storeu_ps(o + r * D + c0, acc[r][0]);
      _mm256_storeu_ps(o + r * D + c0 + 8, acc[r][1]);
    }
  }
}

inline void apply_mask(float* x, const bool* m, int64_t n) {
  for (int64_t j = 0; j < n; j += 8) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m + j)));
    const __m256 unseen = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bytes, _mm256_setzero_si256()));
    _mm256_storeu_ps(x + j, _mm256_blendv_ps(_mm256_loadu_ps(x + j), _mm256_set1_ps(kNegInf), unseen));
  }
}

inline float row_max(const float* x, int64_t n, bool* nan) {
  __m256 mx = _mm256_set1_ps(kNegInf), unordered = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    mx = _mm256_max_ps(mx, v);
  }
  *nan = _mm256_movemask_ps(unordered) != 0;
  return hmax8(mx);
}

template <typename T>
inline float exp_row(float* x, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift), ninf = _mm256_set1_ps(kNegInf);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    const __m256 e = _mm256_and_ps(_mm256_cmp_ps(v, ninf, _CMP_NEQ_OQ), exp8(_mm256_sub_ps(v, sh)));
    sum = _mm256_add_ps(sum, e);
    _mm256_storeu_ps(x + j, round8(e, static_cast<const T*>(nullptr)));
  }
  return hsum8(sum);
}

template <typename T>
inline void store_scaled(T* dst, const float* src, int64_t D, float f) {
  const __m256 fv = _mm256_set1_ps(f);
  for (int64_t d = 0; d < D; d += 8) store8(dst + d, _mm256_mul_ps(_mm256_loadu_ps(src + d), fv));
}
#endif

template <typename T>
void attention_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mask,
                    int64_t mask_b, int64_t mask_i, float scale, bool causal, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), G = Hq / Hkv;
  const int64_t nkb = (Lk + kKeyBlock - 1) / kKeyBlock, ld = nkb * kKeyBlock;  // score row length
  const int64_t nqb = (Lq + kQueryBlock - 1) / kQueryBlock;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();  // [B, Lq, Hq, D] contiguous
  std::vector<float> kt(static_cast<size_t>(Hkv * nkb * D * kKeyBlock));
  std::vector<float> vf(static_cast<size_t>(Hkv * Lk * D));
  const int threads = team_size();
  for (int64_t b = 0; b < B; ++b) {
    // keys transposed per block of 32 (zeros past Lk), values as fp32 rows
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < Hkv * nkb; ++t) {
      const int64_t h = t / nkb, kb = t % nkb;
      float* dst = kt.data() + t * D * kKeyBlock;
      for (int64_t jj = 0; jj < kKeyBlock; ++jj) {
        const int64_t j = kb * kKeyBlock + jj;
        if (j >= Lk) {  // the last block's padding: zero keys, no values
          for (int64_t d = 0; d < D; ++d) dst[d * kKeyBlock + jj] = 0.f;
          continue;
        }
        const T* kr = kp + b * k.stride(0) + h * k.stride(1) + j * k.stride(2);
        const T* vr = vp + b * v.stride(0) + h * v.stride(1) + j * v.stride(2);
        float* vd = vf.data() + (h * Lk + j) * D;
        for (int64_t d = 0; d < D; ++d) {
          dst[d * kKeyBlock + jj] = static_cast<float>(kr[d]);
          vd[d] = static_cast<float>(vr[d]);
        }
      }
    }
    // the longest tasks (the last query blocks of a causal prompt) first, for the dynamic schedule
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> qf(static_cast<size_t>(kQueryBlock * D));
      std::vector<float> s(static_cast<size_t>(kQueryBlock * ld));
      std::vector<float> o(static_cast<size_t>(kQueryBlock * D));
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < nqb * Hq; ++t) {
        const int64_t qb = nqb - 1 - t / Hq, h = t % Hq, hk = h / G;
        const int64_t i0 = qb * kQueryBlock, nr = std::min(kQueryBlock, Lq - i0);
        const bool* mrow = mask != nullptr ? mask + b * mask_b : nullptr;
        // keys [0, kend) hold every key a row of this block sees
        int64_t kend = Lk;
        if (mrow != nullptr) {
          kend = 0;
          for (int64_t r = 0; r < nr; ++r)
            for (int64_t j = Lk - 1; j >= kend; --j)
              if (mrow[(i0 + r) * mask_i + j]) {
                kend = j + 1;
                break;
              }
        } else if (causal) {
          kend = std::min(Lk, i0 + nr);
        }
        for (int64_t r = 0; r < kQueryBlock; ++r) {
          const T* qr = qp + b * q.stride(0) + h * q.stride(1) + (i0 + std::min(r, nr - 1)) * q.stride(2);
          for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(qr[d]);
        }
        const int64_t nk = (kend + kKeyBlock - 1) / kKeyBlock;
        const float* kth = kt.data() + hk * nkb * D * kKeyBlock;
        for (int64_t kb = 0; kb < nk; ++kb)
          for (int64_t r0 = 0; r0 < kQueryBlock; r0 += kScoreRows)
            scores_rows(qf.data() + r0 * D, D, kth + kb * D * kKeyBlock, scale, s.data() + r0 * ld + kb * kKeyBlock, ld);
        // softmax numerators in place (zero where a key is not seen, rounded to T), their fp32 sums
        float sums[kQueryBlock];
        bool nan_row[kQueryBlock];
        const int64_t span = nk * kKeyBlock;
        for (int64_t r = 0; r < kQueryBlock; ++r) {
          float* sr = s.data() + r * ld;
          const int64_t i = i0 + std::min(r, nr - 1);
          const bool* mr = mrow != nullptr ? mrow + i * mask_i : nullptr;
          const int64_t seen = mr == nullptr && causal ? std::min(kend, i + 1) : kend;  // keys [0, seen) may be seen
          // keys not seen become -inf: a causal row's tail past its own position, or the mask's zeros
          std::fill(sr + seen, sr + span, kNegInf);
          if (mr != nullptr) {
            const int64_t whole = seen - seen % kKeyBlock;  // vector passes read whole blocks of the mask row
            apply_mask(sr, mr, whole);
            for (int64_t j = whole; j < seen; ++j)
              if (!mr[j]) sr[j] = kNegInf;
          }
          const float mx = row_max(sr, span, &nan_row[r]);
          if (mx == kNegInf || nan_row[r]) {  // sees no key (a padded row: zeros), or a NaN score (NaN)
            std::fill(sr, sr + span, 0.f);
            sums[r] = 0.f;
            continue;
          }
          sums[r] = exp_row<T>(sr, span, mx);
        }
        for (int64_t r0 = 0; r0 < kQueryBlock; r0 += 4)
          values_rows(s.data() + r0 * ld, ld, kend, vf.data() + hk * Lk * D, D, o.data() + r0 * D);
        for (int64_t r = 0; r < nr; ++r) {
          const float inv = sums[r] > 0.f ? 1.f / sums[r] : 0.f;
          store_scaled(op + ((b * Lq + i0 + r) * Hq + h) * D, o.data() + r * D, D,
                       nan_row[r] ? std::numeric_limits<float>::quiet_NaN() : inv);
        }
      }
    }
  }
}

}  // namespace

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const c10::optional<at::Tensor>& mask, double scaling, bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [B, H, L, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v of one dtype");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "unit stride along the head dim");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && v.sizes() == k.sizes() && k.size(3) == D, "k and v must be [B, Hkv, Lk, D]");
  TORCH_CHECK(Hq % k.size(1) == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(D % 16 == 0, "head dim must be a multiple of 16");
  const bool* mp = nullptr;
  int64_t mask_b = 0, mask_i = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && (m.size(0) == 1 || m.size(0) == B) &&
                m.size(1) == 1 && m.size(2) == Lq && m.size(3) >= k.size(2) && m.stride(3) == 1,
                "mask must be bool [B or 1, 1, Lq, >= Lk] with unit stride along the keys");
    mp = m.data_ptr<bool>();
    mask_b = m.size(0) == 1 ? 0 : m.stride(0);
    mask_i = m.stride(2);
  } else if (causal) {
    TORCH_CHECK(k.size(2) >= Lq, "a causal prompt needs at least as many keys as queries");
  }
  at::Tensor out = at::empty({B, Lq, Hq, D}, q.options());
  const float scale = static_cast<float>(scaling);
  const bool causal_only = causal && mp == nullptr;
  switch (q.scalar_type()) {
    case at::kFloat: attention_rows<float>(q, k, v, mp, mask_b, mask_i, scale, causal_only, out); break;
    case at::kBFloat16: attention_rows<c10::BFloat16>(q, k, v, mp, mask_b, mask_i, scale, causal_only, out); break;
    case at::kHalf: attention_rows<c10::Half>(q, k, v, mp, mask_b, mask_i, scale, causal_only, out); break;
    default: TORCH_CHECK(false, "prefill_attention takes float32, bfloat16 or float16");
  }
  return out;
}

#endif  // HF_FASTINFER_AVX512 || HF_FASTINFER_AVX2

}  // namespace hf_fastinfer
