"""Find the decoder blocks of a loaded model by their structure, not their class names.

A block is a module with, among its direct children, an attention module (q/k/v/o projections, or a fused
qkv projection and o, each an ``nn.Linear`` or a ``MoQLinear``), exactly two RMSNorm-like modules (a 1-D
weight and an ``eps``/``variance_epsilon``), and an MLP module. The MLP is fused when it is gated
(gate/up/down projections, or a fused gate_up and down) with an activation that measures as SiLU or GELU-tanh;
anything else (a mixture of experts, an unknown activation) stays the model's own module. What the pieces
compute is then checked numerically, not assumed: see :mod:`hf_fastinfer.injection.probe`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..kernels.decoder_layer import DecoderLayerSpec, LayerProjection
from ..kernels.rms_norm import rms_norm_ref

__all__ = ["BlockPlan", "find_blocks", "norm_kind", "projection", "is_linear"]


def is_linear(module) -> bool:
    from ..quant.moq_linear import MoQLinear

    return type(module) is nn.Linear or isinstance(module, MoQLinear)


def projection(module) -> LayerProjection:
    """The kernel library's view of a linear module's tensors (no copy)."""
    from ..quant.moq_linear import MoQLinear

    if isinstance(module, MoQLinear):
        return LayerProjection(module.weight, module.bias, module.bits, module.group_size, module.weight_scale,
                               module.weight_zero, module.in_features)
    return LayerProjection(module.weight, module.bias)


def projection_format(module) -> tuple:
    """Modules of one format can share one fused tensor: same dtype, device, bias presence and quantization."""
    from ..quant.moq_linear import MoQLinear

    quant = (module.bits, module.group_size, module.symmetric) if isinstance(module, MoQLinear) else None
    return (type(module), module.weight.dtype, module.weight.device, module.in_features, module.bias is not None, quant)


def _norm_parts(module) -> tuple[torch.Tensor, float] | None:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    params = list(module.parameters(recurse=False))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return None
    if len(params) != 1 or list(module.children()):
        return None
    return weight, eps


_PROBE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@torch.no_grad()
def norm_kind(module) -> str | None:
    """"llama" (T(n) * w), "gemma" (n * (1 + w) in fp32) or None: measured on a probe input, so a norm with
    another formula (LayerNorm, a centred norm) is never mistaken for one."""
    parts = _norm_parts(module)
    if parts is None:
        return None
    weight, eps = parts
    if weight.is_meta:
        return None
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(3, weight.shape[0], generator=gen) * 3).to(device=weight.device, dtype=weight.dtype)
    try:
        out = module(x)
    except Exception:
        return None
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return None
    tolerance = _PROBE_TOLERANCE.get(weight.dtype, 1e-2)
    for kind, gemma in (("llama", False), ("gemma", True)):
        expected = rms_norm_ref(x, weight, None, eps, gemma)[0]
        scale = expected.float().abs().max().clamp_min(1e-6)
        if ((out.float() - expected.float()).abs().max() / scale) <= tolerance:
            return kind
    return None


@torch.no_grad()
def activation_kind(fn) -> str | None:
    """"silu" or "gelu_tanh" when ``fn`` computes one of them (measured), else None."""
    if not callable(fn):
        return None
    x = torch.linspace(-8, 8, 257)
    try:
        y = fn(x)
    except Exception:
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    for name, ref in (("silu", torch.nn.functional.silu(x)),
                      ("gelu_tanh", torch.nn.functional.gelu(x, approximate="tanh"))):
        if torch.allclose(y.float(), ref, rtol=1e-5, atol=1e-6):
            return name
    return None


@dataclasses.dataclass
class BlockPlan:
    """One recognised block: its modules by role, what the fused layer needs to know, and what it leaves out."""

    name: str
    layer: nn.Module
    attention: nn.Module
    input_norm: nn.Module
    post_attention_norm: nn.Module
    gemma_norm: bool
    qkv: list[nn.Module]  # [q, k, v] or [qkv]
    o: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    mlp: nn.Module
    gate_up: list[nn.Module]  # [gate, up], [gate_up], or [] (the MLP stays the model's module)
    down: nn.Module | None
    activation: str | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    softcap: float | None
    layer_idx: int
    mlp_note: str = ""  # why the MLP stays the model's module (for the log)

    def spec(self, rotary_dim: int, fused_qkv: LayerProjection | None = None,
             fused_gate_up: LayerProjection | None = None) -> DecoderLayerSpec:
        eps = _norm_parts(self.input_norm)[1]
        qk_eps = _norm_parts(self.q_norm)[1] if self.q_norm is not None else eps
        return DecoderLayerSpec(
            input_norm=self.input_norm.weight, post_attention_norm=self.post_attention_norm.weight, eps=eps,
            qkv=[fused_qkv] if fused_qkv is not None else [projection(m) for m in self.qkv],
            o=projection(self.o), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            rotary_dim=rotary_dim, scaling=self.scaling,
            gate_up=[fused_gate_up] if fused_gate_up is not None else [projection(m) for m in self.gate_up],
            down=projection(self.down) if self.gate_up else None, activation=self.activation or "silu",
            gemma_norm=self.gemma_norm, q_norm=None if self.q_norm is None else self.q_norm.weight,
            k_norm=None if self.k_norm is None else self.k_norm.weight, qk_eps=qk_eps, softcap=self.softcap,
            all_reduce=tp_all_reduce(self.o))


def tp_all_reduce(o_proj: nn.Module):
    """The all-reduce after a row-wise projection under tensor parallelism (parallel/shard.py), else None."""
    from ..parallel.shard import TP_GROUP_ATTR, all_reduce

    if not hasattr(o_proj, TP_GROUP_ATTR):
        return None
    group = getattr(o_proj, TP_GROUP_ATTR)
    return lambda tensor: all_reduce(tensor, group)


def _children(module) -> dict[str, nn.Module]:
    return dict(module.named_children())


def _attention_parts(attn: nn.Module):
    """(qkv modules, o module) when ``attn`` has the projections of a self-attention module, else None."""
    kids = _children(attn)
    if all(is_linear(kids.get(n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return [kids["q_proj"], kids["k_proj"], kids["v_proj"]], kids["o_proj"]
    if is_linear(kids.get("qkv_proj")) and is_linear(kids.get("o_proj")):
        return [kids["qkv_proj"]], kids["o_proj"]
    return None


def _mlp_parts(mlp: nn.Module):
    """(gate_up modules, down, activation, note): the gated MLP's projections and measured activation, or
    ([], None, None, why not)."""
    kids = _children(mlp)
    if all(is_linear(kids.get(n)) for n in ("gate_proj", "up_proj", "down_proj")):
        gate_up, down = [kids["gate_proj"], kids["up_proj"]], kids["down_proj"]
    elif is_linear(kids.get("gate_up_proj")) and is_linear(kids.get("down_proj")):
        gate_up, down = [kids["gate_up_proj"]], kids["down_proj"]
    else:
        return [], None, None, f"{type(mlp).__name__} is not a gated MLP (experts or another form)"
    fn = getattr(mlp, "act_fn", getattr(mlp, "activation_fn", None))
    activation = activation_kind(fn)
    if activation is None:
        return [], None, None, f"its activation {type(fn).__name__} is not SiLU or GELU-tanh"
    return gate_up, down, activation, ""


def analyze_block(name: str, layer: nn.Module) -> BlockPlan | str:
    """A :class:`BlockPlan`, or a string saying why ``layer`` is not a block the fused layer computes."""
    kids = _children(layer)
    attention = [(n, m) for n, m in kids.items() if _attention_parts(m) is not None]
    if len(attention) != 1:
        return "no single self-attention module with q/k/v/o projections"
    attn_name, attn = attention[0]
    qkv, o = _attention_parts(attn)
    norms = [(n, m) for n, m in kids.items() if _norm_parts(m) is not None]
    if len(norms) != 2:
        return f"{len(norms)} norm modules (a pre-norm block has 2: before attention and before the MLP)"
    kinds = {norm_kind(m) for _, m in norms}
    if len(kinds) != 1 or None in kinds:
        return "its norms are not RMSNorm (Llama or Gemma form)"
    dropout = {n for n, m in kids.items() if isinstance(m, nn.Dropout)}
    others = [(n, m) for n, m in kids.items() if n != attn_name and n not in dict(norms) and n not in dropout]
    if len(others) != 1:
        return f"children other than attention, two norms and an MLP: {[n for n, _ in others]}"
    mlp = others[0][1]
    if getattr(attn, "is_causal", True) is False:
        return "its attention is not causal"
    if any(hasattr(attn, n) for n in ("sinks", "s_aux")):
        return "its attention has sink logits"
    head_dim = getattr(attn, "head_dim", None)
    scaling = getattr(attn, "scaling", None)
    layer_idx = getattr(attn, "layer_idx", None)
    if not isinstance(head_dim, int) or not isinstance(scaling, float) or not isinstance(layer_idx, int):
        return "its attention module has no head_dim / scaling / layer_idx"
    config = getattr(attn, "config", None)
    num_heads = getattr(config, "num_attention_heads", None)
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    width = sum(m.out_features for m in qkv)
    if not num_heads or width != (num_heads + 2 * num_kv_heads) * head_dim or num_heads % num_kv_heads:
        return "its q/k/v projections do not match the config's heads"
    if len(qkv) == 3 and (qkv[0].out_features != num_heads * head_dim or qkv[1].out_features != num_kv_heads * head_dim):
        return "its q/k/v projections do not match the config's heads"
    attn_kids = _children(attn)
    q_norm, k_norm = attn_kids.get("q_norm"), attn_kids.get("k_norm")
    if (q_norm is None) != (k_norm is None):
        return "only one of q_norm / k_norm"
    if q_norm is not None and (norm_kind(q_norm) not in kinds or norm_kind(k_norm) not in kinds or
                               q_norm.weight.shape[0] != head_dim):
        return "its q/k norms are not per-head RMSNorm"
    extra = [n for n in attn_kids if n not in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "q_norm", "k_norm")
             and not isinstance(attn_kids[n], (nn.Dropout, nn.Identity))]
    if extra:
        return f"its attention has modules the fused layer does not compute: {extra}"
    gate_up, down, activation, note = _mlp_parts(mlp)
    softcap = getattr(config, "attn_logit_softcapping", None)
    return BlockPlan(
        name=name, layer=layer, attention=attn, input_norm=norms[0][1], post_attention_norm=norms[1][1],
        gemma_norm=kinds == {"gemma"}, qkv=qkv, o=o, q_norm=q_norm, k_norm=k_norm, mlp=mlp, gate_up=gate_up,
        down=down, activation=activation, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        scaling=scaling, softcap=float(softcap) if softcap else None, layer_idx=layer_idx, mlp_note=note)


def find_blocks(model: nn.Module) -> tuple[list[BlockPlan], dict[str, str]]:
    """Every module with a self-attention child, analysed: (recognised blocks, {name: why not} for the rest)."""
    plans, skipped = [], {}
    for name, module in model.named_modules():
        kids = _children(module)
        if not any(_attention_parts(m) is not None for m in kids.values()):
            continue
        result = analyze_block(name, module)
        if isinstance(result, BlockPlan):
            plans.append(result)
        else:
            skipped[name] = result
    return plans, skipped
