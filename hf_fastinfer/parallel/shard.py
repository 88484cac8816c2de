"""Sharding a model by its plan: before loading (meta modules of this rank's shape) and after (local tensors,
all-reduces, per-rank head counts).

Sharded loading goes through transformers' own loader: a split weight is given to it as a meta ``DTensor`` with a
``Shard`` placement, and transformers' shard-on-read (``DtensorShardOperation``) reads only this rank's slice of
the checkpoint tensor through safetensors' ``get_slice``. MoQ then quantizes that slice alone (its groups are
the slice's own: the last group of a shard may be shorter, none straddles two). A fused projection (Phi-3's
qkv / gate_up) is split part by part, which no single placement describes: its tensor is read whole, one
tensor at a time, and sliced at once (:func:`slice_packed`). After loading, every tensor is a plain local
tensor again; the kernels never see a DTensor.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from .plan import ShardRule, TensorParallelPlan

__all__ = ["shard_before_loading", "localize_after_loading", "finish_after_loading", "slice_packed", "all_reduce", "TP_GROUP_ATTR"]

#: set on a row-wise module (o, down): the process group its partial output is all-reduced over
TP_GROUP_ATTR = "_hf_fastinfer_tp_group"
#: set on a packed module: the rows of the full weight this rank keeps
ROWS_ATTR = "_hf_fastinfer_tp_rows"
#: set on every split module while loading: its weight passes through MoQQuantize (pages given back)
SHARD_ATTR = "_hf_fastinfer_tp_shard"


def all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over the tensor-parallel ranks, in place (torch.distributed; gloo or NCCL)."""
    dist.all_reduce(tensor, group=group)
    return tensor


def _all_reduce_hook(module, args, output):
    return all_reduce(output, getattr(module, TP_GROUP_ATTR, None))


def _mesh(device_type: str):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dist.get_world_size(),))


def _meta_dtensor(local: torch.Tensor, mesh, dim: int, tp_size: int):
    """A meta DTensor whose shard on this rank has ``local``'s shape, split along ``dim``."""
    from torch.distributed.tensor import DTensor, Shard

    shape = list(local.shape)
    shape[dim] *= tp_size
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def _local_module(module: nn.Module, rule: ShardRule, tp_size: int) -> nn.Module:
    from ..quant.moq_linear import MoQLinear

    out_l, in_l = rule.local_out(module.out_features, tp_size), rule.local_in(module.in_features, tp_size)
    bias = module.bias is not None
    if isinstance(module, MoQLinear):
        return MoQLinear(in_l, out_l, bias, bits=module.bits, group_size=module.group_size, symmetric=module.symmetric,
                         device="meta", dtype=module.bias.dtype if bias else None)
    return nn.Linear(in_l, out_l, bias, device="meta", dtype=module.weight.dtype)


def shard_before_loading(model: nn.Module, plan: TensorParallelPlan, rank: int, pre_quantized: bool,
                         device_type: str = "cpu") -> None:
    """Replace each planned module (on the meta device) by one of this rank's shape whose tensors transformers'
    loader fills with this rank's slices. ``device_type``: the process group's devices ("cuda" with NCCL)."""
    from ..quant.moq_linear import MoQLinear

    tp_size = plan.tp_size
    mesh = None
    for name, rule in plan.rules.items():
        module = model.get_submodule(name)
        if rule.style == "vocab":  # an embedding: its weight's rows, this rank's slice of the vocabulary
            mesh = mesh if mesh is not None else _mesh(device_type)
            local = torch.empty(module.weight.shape[0] // tp_size, module.weight.shape[1], dtype=module.weight.dtype,
                                device="meta")
            module._parameters["weight"] = nn.Parameter(_meta_dtensor(local, mesh, 0, tp_size), requires_grad=False)
            continue
        quantized = isinstance(module, MoQLinear)
        if pre_quantized and quantized:
            _check_prequantized(name, module, rule, tp_size)
        local = _local_module(module, rule, tp_size)
        setattr(local, SHARD_ATTR, True)
        if rule.style == "packed_colwise":
            setattr(local, ROWS_ATTR, rule.rows(rank, tp_size))
        else:
            mesh = mesh if mesh is not None else _mesh(device_type)
            dim = 1 if rule.style == "rowwise" else 0
            names = ["weight"] + (["bias"] if dim == 0 and local.bias is not None else [])
            if pre_quantized and quantized:
                names += [n for n in ("weight_scale", "weight_zero") if getattr(local, n, None) is not None]
            for tensor_name in names:
                holder = local._parameters if tensor_name in local._parameters else local._buffers
                value = holder[tensor_name]
                shard = _meta_dtensor(value.detach(), mesh, dim if value.dim() > 1 else 0, tp_size)
                holder[tensor_name] = nn.Parameter(shard, requires_grad=False) if holder is local._parameters else shard
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, local)


def _check_prequantized(name: str, module, rule: ShardRule, tp_size: int) -> None:
    """A saved quantized checkpoint splits only where its groups (and int4 byte pairs) do."""
    if rule.style == "packed_colwise":
        raise ValueError(f"tensor parallelism: {name} is a fused projection saved quantized; it cannot be split on "
                         "load. Load the float checkpoint with tp_size and bits instead (each rank then quantizes its "
                         "own shard).")
    if rule.style == "rowwise":
        local_in = module.in_features // tp_size
        if local_in % module.group_size or (module.bits == 4 and local_in % 2):
            raise ValueError(f"tensor parallelism: {name} was saved with group_size={module.group_size}; its "
                             f"{module.in_features} input features split into {tp_size} shards of {local_in}, which "
                             "cuts a group in two. Load the float checkpoint with tp_size and bits instead, or save "
                             "with a group size that divides the shard.")


def slice_packed(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a packed (fused) projection's full tensor: its part of each of q, k, v (gate, up)."""
    rows = getattr(module, ROWS_ATTR, None)
    if rows is None:
        return tensor
    return torch.cat([tensor[a:b] for a, b in rows], dim=0).contiguous()


def _localize(module: nn.Module, memo: dict) -> None:
    """DTensors -> plain local tensors (``memo``: a tied weight seen twice becomes one tensor again)."""
    from torch.distributed.tensor import DTensor

    for name, value in list(module._parameters.items()):
        if isinstance(value, DTensor) or isinstance(getattr(value, "data", None), DTensor):
            if id(value) not in memo:
                local = value.to_local() if isinstance(value, DTensor) else value.data.to_local()
                memo[id(value)] = local.detach()
            local = memo[id(value)]
            if name in ("weight_scale", "weight_zero"):  # a buffer the loader set as a parameter
                del module._parameters[name]
                module.register_buffer(name, local)
            else:
                if not isinstance(local, nn.Parameter):
                    memo[id(value)] = local = nn.Parameter(local, requires_grad=False)
                module._parameters[name] = local
    for name, value in list(module._buffers.items()):
        if isinstance(value, DTensor):
            module._buffers[name] = value.to_local()
    for attr in (ROWS_ATTR, SHARD_ATTR):
        if hasattr(module, attr):
            delattr(module, attr)


def _vocab_slice(module: nn.Module, args):
    """Embedding pre-hook: ids outside this rank's rows look up row 0 and are zeroed after (post-hook)."""
    ids = args[0]
    start, rows = module._hf_fastinfer_vocab
    inside = (ids >= start) & (ids < start + rows)
    module._hf_fastinfer_inside = inside
    return ((ids - start) * inside,) + tuple(args[1:])


def _vocab_sum(module: nn.Module, args, output):
    inside, module._hf_fastinfer_inside = module._hf_fastinfer_inside, None
    return all_reduce(output * inside.unsqueeze(-1).to(output.dtype), getattr(module, TP_GROUP_ATTR, None))


def _gather_logits(module: nn.Module, args, output):
    """Output projection post-hook: every rank's slice of the logits, in rank order, on every rank."""
    group = getattr(module, TP_GROUP_ATTR, None)
    parts = [torch.empty_like(output) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, output.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def localize_after_loading(model: nn.Module, plan: TensorParallelPlan) -> None:
    """Right after loading, before MoQ's own steps (the tied output projection is quantized from the embedding's
    shard): every split module's tensors become plain local tensors."""
    memo: dict = {}
    for name in plan.rules:
        _localize(model.get_submodule(name), memo)
    for module in model.modules():  # a tied output projection the plan names under the embedding's weight
        _localize(module, memo)


def finish_after_loading(model: nn.Module, plan: TensorParallelPlan, rank: int, group=None) -> None:
    """Local tensors again; an all-reduce after each row-wise module (its bias kept on rank 0 only, so the sum
    adds it once); each attention module sees this rank's heads."""
    tp_size = plan.tp_size
    for name, rule in plan.rules.items():
        module = model.get_submodule(name)
        if rule.style == "vocab":
            rows = module.weight.shape[0]
            module._hf_fastinfer_vocab = (rank * rows, rows)
            setattr(module, TP_GROUP_ATTR, group)
            module.register_forward_pre_hook(_vocab_slice)
            module.register_forward_hook(_vocab_sum)
        elif rule.style == "vocab_colwise":
            setattr(module, TP_GROUP_ATTR, group)
            module.register_forward_hook(_gather_logits)
        elif rule.style == "rowwise":
            if rank != 0 and module.bias is not None:
                module.bias = None
            setattr(module, TP_GROUP_ATTR, group)
            module.register_forward_hook(_all_reduce_hook)
    attentions = {name.rsplit(".", 1)[0] for name, rule in plan.rules.items() if rule.style != "rowwise"
                  and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "qkv_proj")}
    for name in attentions:
        attention = model.get_submodule(name)
        config = getattr(attention, "config", None)
        if config is not None:
            # the module's own config, with this rank's heads: forwards that read the head counts from the config
            # (Phi-3 splits its fused q/k/v by them) see the shard's; the model's config stays whole
            local = copy.copy(config)
            local.num_attention_heads = plan.num_heads // tp_size
            local.num_key_value_heads = plan.num_kv_heads // tp_size
            attention.config = local
        for attr, total in (("num_heads", plan.num_heads), ("num_attention_heads", plan.num_heads),
                            ("num_key_value_heads", plan.num_kv_heads)):
            if isinstance(getattr(attention, attr, None), int):
                setattr(attention, attr, total // tp_size)
