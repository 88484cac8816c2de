// hf_fastinfer.kernels.prefill_attention, CPU path: attention for prompts (many query tokens), AVX-512 only.
//
// out[b, i, h, :] = sum_j p[i, j] v[j, :] / sum_j p[i, j],  p[i, j] = exp(s[i, j] - max_j s[i, j]) over the
// keys query i sees, s = (q k^T) * scale in fp32. A task is one query head and a block of 16 query positions;
// its scores for every key it can see stay in a row buffer (16 x the keys), so the softmax needs no running
// rescale, and the keys past the block's last visible one are never touched (a causal prompt does about half
// the products of a full square). For each batch row, the keys are first laid out transposed in fp32 blocks of
// 32 ([key block, D, 32]) and the values widened to fp32 ([key, D]): the score loop then broadcasts one query
// element against 32 keys per pair of FMAs (8 query rows x 32 keys in 16 registers), the value loop one
// probability against 64 value columns. Reduced-precision inputs: p is rounded to the input dtype before its
// product with v and the sum stays fp32, as torch's flash attention for CPU does.
#include "ops.h"
#include "simd.h"

#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

namespace hf_fastinfer {

#ifdef HF_FASTINFER_AVX512

namespace {

constexpr int64_t kQueryBlock = 16;  // query positions per task
constexpr int64_t kKeyBlock = 32;    // keys per transposed block (two vectors)

// S[r, j] = scale * q_r . k_j for the 8 query rows of qf (rows of D floats) and the 32 keys of one transposed
// block kt ([D, 32]); rows of s are `ld` floats apart.
inline void scores_8x32(const float* qf, int64_t D, const float* kt, float scale, float* s, int64_t ld) {
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

// o[r, c0 : c0 + 16 NV] = sum_{j < n} p[r, j] vf[j, c0 : ...] for 4 rows of p (rows `ld` apart); vf rows are D floats.
template <int NV>
inline void values_4rows(const float* p, int64_t ld, int64_t n, const float* vf, int64_t D, int64_t c0, float* o) {
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

inline void values_4rows_any(int nv, const float* p, int64_t ld, int64_t n, const float* vf, int64_t D, int64_t c0,
                             float* o) {
  switch (nv) {
    case 4: values_4rows<4>(p, ld, n, vf, D, c0, o); break;
    case 3: values_4rows<3>(p, ld, n, vf, D, c0, o); break;
    case 2: values_4rows<2>(p, ld, n, vf, D, c0, o); break;
    default: values_4rows<1>(p, ld, n, vf, D, c0, o); break;
  }
}

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
        const T* kr = kp + b * k.stride(0) + h * k.stride(1) + j * k.stride(2);
        const T* vr = vp + b * v.stride(0) + h * v.stride(1) + j * v.stride(2);
        float* vd = vf.data() + (h * Lk + j) * D;
        for (int64_t d = 0; d < D; ++d) {
          dst[d * kKeyBlock + jj] = j < Lk ? static_cast<float>(kr[d]) : 0.f;
          if (j < Lk) vd[d] = static_cast<float>(vr[d]);
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
          for (int64_t r0 = 0; r0 < kQueryBlock; r0 += 8)
            scores_8x32(qf.data() + r0 * D, D, kth + kb * D * kKeyBlock, scale, s.data() + r0 * ld + kb * kKeyBlock, ld);
        // softmax numerators in place (zero where a key is not seen, rounded to T), their fp32 sums
        float sums[kQueryBlock];
        bool nan_row[kQueryBlock];
        const int64_t span = nk * kKeyBlock;
        for (int64_t r = 0; r < kQueryBlock; ++r) {
          float* sr = s.data() + r * ld;
          const int64_t i = i0 + std::min(r, nr - 1);
          const bool* mr = mrow != nullptr ? mrow + i * mask_i : nullptr;
          const int64_t seen = mr == nullptr && causal ? std::min(kend, i + 1) : kend;  // keys [0, seen) may be seen
          __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
          __mmask16 unordered = 0;
          for (int64_t j = 0; j < span; j += 16) {
            __mmask16 m = seen > j ? tail_mask(seen - j) : static_cast<__mmask16>(0);
            if (mr != nullptr && m) {
              const __m128i bytes = _mm_maskz_loadu_epi8(m, mr + j);
              m &= _mm_test_epi8_mask(bytes, bytes);
            }
            const __m512 x = _mm512_loadu_ps(sr + j);
            unordered |= _mm512_mask_cmp_ps_mask(m, x, x, _CMP_UNORD_Q);
            mx = _mm512_mask_max_ps(mx, m, mx, x);
            // the mask of seen keys, kept for the exp pass: unseen scores become -inf
            _mm512_storeu_ps(sr + j, _mm512_mask_blend_ps(m, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), x));
          }
          const float row_max = _mm512_reduce_max_ps(mx);
          nan_row[r] = unordered != 0;
          if (row_max == -std::numeric_limits<float>::infinity()) {  // sees no key (a padded row): output zeros
            std::fill(sr, sr + span, 0.f);
            sums[r] = 0.f;
            continue;
          }
          const __m512 shift = _mm512_set1_ps(row_max);
          __m512 sum = _mm512_setzero_ps();
          for (int64_t j = 0; j < span; j += 16) {
            const __m512 x = _mm512_loadu_ps(sr + j);
            const __mmask16 seen_m = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-std::numeric_limits<float>::infinity()),
                                                        _CMP_NEQ_OQ);
            const __m512 e = _mm512_maskz_mov_ps(seen_m, exp16(_mm512_sub_ps(x, shift)));
            sum = _mm512_add_ps(sum, e);
            _mm512_storeu_ps(sr + j, round16(e, static_cast<const T*>(nullptr)));
          }
          sums[r] = _mm512_reduce_add_ps(sum);
        }
        for (int64_t r0 = 0; r0 < kQueryBlock; r0 += 4)
          for (int64_t c0 = 0; c0 < D; c0 += 64)
            values_4rows_any(static_cast<int>(std::min<int64_t>(4, (D - c0) / 16)), s.data() + r0 * ld, ld, kend,
                             vf.data() + hk * Lk * D, D, c0, o.data() + r0 * D);
        for (int64_t r = 0; r < nr; ++r) {
          T* dst = op + ((b * Lq + i0 + r) * Hq + h) * D;
          const float inv = sums[r] > 0.f ? 1.f / sums[r] : 0.f;
          const __m512 scale_v = nan_row[r] ? _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()) : _mm512_set1_ps(inv);
          for (int64_t d = 0; d < D; d += 16)
            store16(dst + d, _mm512_mul_ps(_mm512_loadu_ps(o.data() + r * D + d), scale_v), tail_mask(D - d));
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

#endif  // HF_FASTINFER_AVX512

}  // namespace hf_fastinfer
