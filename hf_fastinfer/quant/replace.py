"""Which ``nn.Linear`` layers MoQ converts, the swap itself, and the load-time quantize operation."""

from __future__ import annotations

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps

from .moq_linear import MoQLinear
from .search import quantize_linear_weight

__all__ = ["matches", "replace_linear_layers", "MoQQuantize", "dequantize_model"]


def matches(name: str, patterns: list[str]) -> bool:
    """True when the module name equals a pattern or ends with ``.pattern`` (``"lm_head"``, ``"mlp.down_proj"``)."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def replace_linear_layers(model: nn.Module, bits_for: dict[str, int], group_size: int, symmetric: bool) -> int:
    """Swap each ``nn.Linear`` named in ``bits_for`` for an empty MoQLinear of those bits (on the meta device
    while transformers builds the model; the weights arrive later). Returns the number swapped."""
    count = 0
    for name, module in list(model.named_modules()):
        if name in bits_for and type(module) is nn.Linear:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            replacement = MoQLinear(module.in_features, module.out_features, module.bias is not None,
                                    bits=bits_for[name], group_size=group_size, symmetric=symmetric,
                                    device=module.weight.device, dtype=module.weight.dtype)
            setattr(parent, child, replacement)
            count += 1
    return count


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every MoQLinear by an ``nn.Linear`` holding its dequantized weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MoQLinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.to_linear(dtype))
    return model


class MoQQuantize(ConversionOps):
    """transformers loading operation: one float Linear weight in, its quantized tensors out.

    It runs as each weight streams in from the checkpoint, so the float model never exists in memory at
    once: peak memory while loading is the quantized model plus about one float tensor.
    """

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        from ..parallel.shard import slice_packed

        (key, value), = input_dict.items()
        value = value[0] if isinstance(value, list) else value
        module_name, _, tensor_name = full_layer_name.rpartition(".")
        module = model.get_submodule(module_name)
        # tensor parallelism: a fused projection's full tensor arrives; this rank keeps its rows of each part
        value = slice_packed(module, value)
        if not isinstance(module, MoQLinear) or tensor_name != "weight":
            value = value.to(getattr(module, tensor_name).dtype)
            if tensor_name == "weight":
                self.hf_quantizer.record_quantized(module_name, value, count=False)
            return {full_layer_name: value}
        qw = quantize_linear_weight(value, module.bits, module.group_size, module.symmetric)
        if self.hf_quantizer.collect_alternatives:
            # bits="auto": also keep the int4 version until the sensitivity pass chooses
            module.alternative = quantize_linear_weight(value, 4, module.group_size, module.symmetric)
        # last use of the float tensor: its checkpoint pages can go (quant/_pages.py)
        self.hf_quantizer.record_quantized(module_name, value)
        out = {f"{module_name}.weight": qw.qweight, f"{module_name}.weight_scale": qw.scales}
        if qw.zeros is not None:
            out[f"{module_name}.weight_zero"] = qw.zeros
        return out
