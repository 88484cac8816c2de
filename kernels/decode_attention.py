"""Decode attention (flash-decoding): a few query tokens against a KV cache, split over the KV length.

q: [B, Hq, Lq, D] with Lq small (1 for plain decoding, a few for speculative verification);
k, v: [B, Hkv, S, D], float or int8 (then with per-(sequence, head, token) scales [B, Hkv, S]);
mask: bool [B|1, 1, Lq, S] (True = attend; covers padding, causality and sliding windows) or None (causal,
the queries being the last Lq of the S positions). Grouped-query heads are served without expanding K/V:
query head h reads KV head h // (Hq // Hkv). Optional logit softcap (Gemma 2).

Returns [B, Lq, Hq, D] in q's dtype (transformers' attention-output layout).

On GPU the Triton kernels run: each program takes one (sequence, KV head, KV split) and all the query rows
of that KV head's group at once (a [G*Lq, D] x [D, BLOCK_N] tile), keeping a running max and sum in fp32
(online softmax); a second kernel merges the splits by their log-sum-exp. On CPU the
path is one fused SDPA call with the group's query heads packed as rows (no K/V expansion); the
pure-PyTorch reference ``decode_attention_ref`` is the definition the others are tested against.
"""

from __future__ import annotations

import torch

from . import _backend

try:  # Triton is optional: without it (or without a GPU) the reference runs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    triton = None

__all__ = ["decode_attention", "decode_attention_cpu", "decode_attention_ref", "decode_attention_triton"]


# ---------------------------------------------------------------------------------------------------------
# 1. Triton kernels
# ---------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _decode_attention_split_kernel(
        q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, mask_ptr, o_ptr, lse_ptr,
        kv_len, q_len, groups, num_kv_heads, split_size, sm_scale, softcap,
        stride_qb, stride_qh, stride_ql, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ksb, stride_ksh, stride_kss,
        stride_vsb, stride_vsh, stride_vss,
        stride_mb, stride_ml, stride_ms,
        stride_ob, stride_oh, stride_ol, stride_osp, stride_od,
        stride_lb, stride_lh, stride_ll, stride_lsp,
        HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_MASK: tl.constexpr, QUANTIZED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // num_kv_heads
        kvh = pid_bh % num_kv_heads

        # Row r of the tile is query token (r % q_len) of query head kvh * groups + r // q_len.
        rows = tl.arange(0, BLOCK_R)
        grp = rows // q_len
        qi = rows % q_len
        row_ok = rows < groups * q_len
        qh = kvh * groups + grp
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM

        q = tl.load(
            q_ptr + b * stride_qb + qh[:, None] * stride_qh + qi[:, None] * stride_ql + d[None, :] * stride_qd,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(tl.float32)  # [BLOCK_R, BLOCK_D]

        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)

        start = split * split_size
        end = tl.minimum(start + split_size, kv_len)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < end
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + b * stride_kb + kvh * stride_kh + n[:, None] * stride_ks + d[None, :] * stride_kd,
                        mask=kv_mask, other=0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_ptr + b * stride_vb + kvh * stride_vh + n[:, None] * stride_vs + d[None, :] * stride_vd,
                        mask=kv_mask, other=0).to(tl.float32)
            if QUANTIZED:
                k_s = tl.load(k_scale_ptr + b * stride_ksb + kvh * stride_ksh + n * stride_kss, mask=n_ok, other=0.0)
                v_s = tl.load(v_scale_ptr + b * stride_vsb + kvh * stride_vsh + n * stride_vss, mask=n_ok, other=0.0)
                k = k * k_s.to(tl.float32)[:, None]
                v = v * v_s.to(tl.float32)[:, None]

            # ieee: fp32 tl.dot would otherwise round its inputs to tf32 on GPUs
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale  # [BLOCK_R, BLOCK_N]
            if HAS_SOFTCAP:
                # softcap * tanh(s / softcap), with tanh(x) = 2 * sigmoid(2x) - 1
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
            ok = row_ok[:, None] & n_ok[None, :]
            if HAS_MASK:
                allowed = tl.load(mask_ptr + b * stride_mb + qi[:, None] * stride_ml + n[None, :] * stride_ms,
                                  mask=ok, other=0)
                ok = ok & (allowed != 0)
            else:
                ok = ok & (n[None, :] <= (kv_len - q_len + qi)[:, None])
            s = tl.where(ok, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # Rows with nothing to attend to yet keep m = -inf; shift by 0 there so that exp() sees -inf, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new

        has_mass = l_i > 0
        out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
        lse = tl.where(has_mass, m_i + tl.log(tl.where(has_mass, l_i, 1.0)), float("-inf"))
        tl.store(o_ptr + b * stride_ob + qh[:, None] * stride_oh + qi[:, None] * stride_ol + split * stride_osp
                 + d[None, :] * stride_od, out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + b * stride_lb + qh * stride_lh + qi * stride_ll + split * stride_lsp, lse, mask=row_ok)

    @triton.jit
    def _decode_attention_merge_kernel(
        o_ptr, lse_ptr, out_ptr, num_q_heads, q_len, num_splits,
        stride_ob, stride_oh, stride_ol, stride_osp, stride_od,
        stride_lb, stride_lh, stride_ll, stride_lsp,
        stride_outb, stride_outl, stride_outh, stride_outd,
        HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)  # one (sequence, query head, query token)
        qi = pid % q_len
        h = (pid // q_len) % num_q_heads
        b = pid // (q_len * num_q_heads)
        sp = tl.arange(0, BLOCK_S)
        sp_ok = sp < num_splits
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + qi * stride_ll + sp * stride_lsp,
                      mask=sp_ok, other=float("-inf"))
        m = tl.max(lse, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp(lse - m_safe)  # splits with no attended position weigh 0
        o = tl.load(o_ptr + b * stride_ob + h * stride_oh + qi * stride_ol + sp[:, None] * stride_osp
                    + d[None, :] * stride_od, mask=sp_ok[:, None] & d_ok[None, :], other=0.0)
        total = tl.sum(w, axis=0)
        out = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + b * stride_outb + qi * stride_outl + h * stride_outh + d * stride_outd,
                 out.to(out_ptr.dtype.element_ty), mask=d_ok)


# ---------------------------------------------------------------------------------------------------------
# 2. Launcher
# ---------------------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, k_scale, v_scale, mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _backend.check_float("q", q)
    batch, num_q_heads, q_len, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B={batch}, Hkv, S, D={head_dim}]")
    if num_q_heads % k.shape[1]:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key/value heads ({k.shape[1]})")
    if q_len > k.shape[2]:
        raise ValueError(f"more query tokens ({q_len}) than cached positions ({k.shape[2]})")
    quantized = k.dtype == torch.int8
    if quantized:
        if v.dtype != torch.int8 or k_scale is None or v_scale is None:
            raise TypeError("int8 k needs int8 v and both k_scale and v_scale")
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s.shape != k.shape[:3]:
                raise ValueError(f"{name} must be [B, Hkv, S] = {tuple(k.shape[:3])}, got {tuple(s.shape)}")
    else:
        if k.dtype not in _backend.FLOAT_DTYPES or v.dtype != k.dtype:
            raise TypeError(f"k and v must share a float dtype or both be int8; got {k.dtype} and {v.dtype}")
        if k_scale is not None or v_scale is not None:
            raise ValueError("k_scale / v_scale are only for int8 k / v")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True = attend), got {mask.dtype}")
        if mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] != 1 or mask.shape[2] != q_len \
                or mask.shape[3] < k.shape[2]:
            raise ValueError(f"mask must be [B|1, 1, Lq={q_len}, >=S={k.shape[2]}], got {tuple(mask.shape)}")


def _split_plan(batch: int, num_kv_heads: int, kv_len: int, block_n: int) -> tuple[int, int]:
    """(number of splits, positions per split): enough programs to fill a GPU (~4 waves of 132 SMs) without
    splitting below a few blocks per program."""
    target_programs = 528
    splits = max(1, min(triton.cdiv(kv_len, 4 * block_n), triton.cdiv(target_programs, batch * num_kv_heads), 64))
    split_size = triton.cdiv(triton.cdiv(kv_len, splits), block_n) * block_n
    return triton.cdiv(kv_len, split_size), split_size


def decode_attention_triton(q, k, v, k_scale=None, v_scale=None, mask=None, scale=None, softcap=None):
    """Launch the Triton kernels (GPU tensors, or CPU tensors under TRITON_INTERPRET=1). See module docstring."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    _check_inputs(q, k, v, k_scale, v_scale, mask)
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    groups = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else float(scale)
    # 64-position K/V tiles spill registers at head_dim 128 (see benchmarks/aot_report.py); 32 do not.
    block_n = 64 if head_dim <= 64 else 32
    block_r = max(16, triton.next_power_of_2(groups * q_len))  # tl.dot needs >= 16 rows
    block_d = max(16, triton.next_power_of_2(head_dim))
    num_splits, split_size = _split_plan(batch, num_kv_heads, kv_len, block_n)

    o_part = torch.empty(batch, num_q_heads, q_len, num_splits, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, num_q_heads, q_len, num_splits, device=q.device, dtype=torch.float32)
    out = torch.empty(batch, q_len, num_q_heads, head_dim, device=q.device, dtype=q.dtype)
    quantized = k.dtype == torch.int8
    ks = k_scale if quantized else lse  # any tensor: not read when QUANTIZED is False
    vs = v_scale if quantized else lse
    if mask is not None:
        mask_i8 = mask.view(torch.int8)
        m_strides = (0 if mask.shape[0] == 1 else mask.stride(0), mask.stride(2), mask.stride(3))
    else:
        mask_i8, m_strides = lse, (0, 0, 0)
    ks_strides = (ks.stride(0), ks.stride(1), ks.stride(2)) if quantized else (0, 0, 0)
    vs_strides = (vs.stride(0), vs.stride(1), vs.stride(2)) if quantized else (0, 0, 0)

    _decode_attention_split_kernel[(batch * num_kv_heads, num_splits)](
        q, k, v, ks, vs, mask_i8, o_part, lse,
        kv_len, q_len, groups, num_kv_heads, split_size, scale, float(softcap or 0.0),
        *q.stride(), *k.stride(), *v.stride(), *ks_strides, *vs_strides, *m_strides,
        *o_part.stride(), *lse.stride(),
        HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_MASK=mask is not None, QUANTIZED=quantized, HAS_SOFTCAP=softcap is not None,
    )
    _decode_attention_merge_kernel[(batch * num_q_heads * q_len,)](
        o_part, lse, out, num_q_heads, q_len, num_splits,
        *o_part.stride(), *lse.stride(), *out.stride(),
        HEAD_DIM=head_dim, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
    )
    return out


# ---------------------------------------------------------------------------------------------------------
# 3. The op PyTorch sees (torch.compile traces through it)
# ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("hf_fastinfer::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
    mask: torch.Tensor | None, scale: float, softcap: float | None,
) -> torch.Tensor:
    if _backend.use_triton(q):
        return decode_attention_triton(q, k, v, k_scale, v_scale, mask, scale, softcap)
    return decode_attention_cpu(q, k, v, k_scale, v_scale, mask, scale, softcap)


@_decode_attention_op.register_fake
def _(q, k, v, k_scale, v_scale, mask, scale, softcap):
    batch, num_q_heads, q_len, head_dim = q.shape
    return q.new_empty(batch, q_len, num_q_heads, head_dim)


def decode_attention(q, k, v, k_scale=None, v_scale=None, mask=None, scale=None, softcap=None) -> torch.Tensor:
    """Attention of a few query tokens against a KV cache. See the module docstring for shapes."""
    _check_inputs(q, k, v, k_scale, v_scale, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    if _backend.eager_cpu(q):
        # Eager CPU: call the implementation directly; the custom-op dispatch costs more than the op itself.
        return decode_attention_cpu(q, k, v, k_scale, v_scale, mask, scale, softcap)
    return _decode_attention_op(q, k, v, k_scale, v_scale, mask, scale, softcap)


def decode_attention_cpu(q, k, v, k_scale=None, v_scale=None, mask=None, scale=None, softcap=None) -> torch.Tensor:
    """CPU path: one fused SDPA call per layer with the query heads of each KV group packed as rows
    ([B, Hkv, G*Lq, D] against [B, Hkv, S, D]: K/V are never expanded). int8 K/V are dequantized first;
    softcap, which SDPA cannot express, takes the reference."""
    if softcap is not None:
        return decode_attention_ref(q, k, v, k_scale, v_scale, mask, scale, softcap)
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    groups = num_q_heads // num_kv_heads
    if k.dtype == torch.int8:
        k = (k.float() * k_scale.float().unsqueeze(-1)).to(q.dtype)
        v = (v.float() * v_scale.float().unsqueeze(-1)).to(q.dtype)
    qg = q.reshape(batch, num_kv_heads, groups * q_len, head_dim)
    if mask is None:
        if q_len > 1:
            return decode_attention_ref(q, k, v, None, None, None, scale, None)
        attn_mask = None
    else:
        # [B|1, 1, Lq, S] -> [B|1, 1, G*Lq, S], matching the packed rows
        m = mask[:, :, :, :kv_len]
        attn_mask = m.unsqueeze(2).expand(m.shape[0], 1, groups, q_len, kv_len).reshape(m.shape[0], 1, groups * q_len, kv_len)
    out = torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=attn_mask, scale=scale)
    return out.view(batch, num_q_heads, q_len, head_dim).transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------------
# 4. Reference (and CPU implementation)
# ---------------------------------------------------------------------------------------------------------

def decode_attention_ref(q, k, v, k_scale=None, v_scale=None, mask=None, scale=None, softcap=None) -> torch.Tensor:
    """Pure-PyTorch decode attention, fp32 accumulation; same contract as :func:`decode_attention`."""
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    groups = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    if k.dtype == torch.int8:
        k = k.float() * k_scale.float().unsqueeze(-1)
        v = v.float() * v_scale.float().unsqueeze(-1)
    # [B, Hkv, G*Lq, D]: each KV head serves its group's query rows in one matmul, K/V never expanded
    qg = q.reshape(batch, num_kv_heads, groups * q_len, head_dim).float()
    s = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # [B, Hkv, G*Lq, S]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.view(batch, num_kv_heads, groups, q_len, kv_len)
    if mask is None:
        allowed = torch.arange(kv_len, device=q.device)[None, :] <= torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
        allowed = allowed.view(1, 1, 1, q_len, kv_len)
    else:
        allowed = mask[:, :, :, :kv_len].unsqueeze(2)  # [B|1, 1, 1, Lq, S]
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m))
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))  # fully masked rows give zeros, not NaN
    out = torch.matmul(p.view(batch, num_kv_heads, groups * q_len, kv_len), v.float())
    out = out.view(batch, num_q_heads, q_len, head_dim).transpose(1, 2)
    return out.to(q.dtype).contiguous()

