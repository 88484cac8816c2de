"""AutoTP: a tensor-parallel plan derived from a model's structure (and checked against the model's own plan).

Per repeated block (a module with a self-attention child):

* the projections that read the residual stream (q, k, v, gate, up; Phi-3's fused qkv and gate_up) are split by
  output features ("colwise"); a fused projection is split part by part ("packed_colwise"), so each rank holds
  whole heads of q, k and v (or its slice of gate and of up) and the model's own split of the output still works;
* the ones that write back to it (o, down) are split by input features ("rowwise") and followed by an all-reduce;
* grouped-query attention keeps whole KV heads per rank: ``tp_size`` must divide the KV heads;
* the embedding and the output projection are split by vocabulary rows ("vocab": each rank looks up the ids of its
  slice and the partial lookups are summed; "vocab_colwise": each rank computes its slice of the logits and they
  are gathered, so every rank samples from all of them); a tied pair shares one slice;
* a mixture-of-experts MLP stays whole on every rank ("replicate").

The plan works on the model before any weight is read (meta tensors): shapes, names and the config only. Where
transformers ships a plan (``config.base_model_tp_plan``), each rule here says whether it agrees with it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math

from torch import nn

__all__ = ["ShardRule", "TensorParallelPlan", "derive_plan", "check_tp_size", "valid_tp_sizes"]


@dataclasses.dataclass
class ShardRule:
    """How one Linear module is split over the ranks."""

    style: str  # "colwise" | "packed_colwise" | "rowwise" | "vocab" (embedding) | "vocab_colwise" (output projection)
    parts: tuple[int, ...] = ()  # packed_colwise: output rows of each part (q, k, v) or (gate, up), in order
    source: str = "AutoTP"  # "AutoTP", or "model plan" when transformers' plan for the model says the same
    note: str = ""

    def local_out(self, out_features: int, tp_size: int) -> int:
        return out_features if self.style == "rowwise" else out_features // tp_size  # colwise, vocab_colwise

    def local_in(self, in_features: int, tp_size: int) -> int:
        return in_features // tp_size if self.style == "rowwise" else in_features

    def rows(self, rank: int, tp_size: int) -> list[tuple[int, int]]:
        """Output-feature intervals of the full weight this rank holds, in order (colwise / packed_colwise)."""
        parts = self.parts
        intervals, start = [], 0
        for size in parts:
            share = size // tp_size
            intervals.append((start + rank * share, start + (rank + 1) * share))
            start += size
        return intervals


@dataclasses.dataclass
class TensorParallelPlan:
    """The rules for one model: {module name: rule}, what stays whole, and the attention heads it splits."""

    tp_size: int
    rules: dict[str, ShardRule]
    replicated: dict[str, str]  # module name -> why it is not split
    num_heads: int
    num_kv_heads: int
    model_plan: dict[str, str]  # transformers' plan for the model (pattern -> style), {} when it has none

    def __str__(self) -> str:
        lines = [f"tensor-parallel plan, tp_size={self.tp_size}: {len(self.rules)} Linear modules split "
                 f"({self.num_heads} query / {self.num_kv_heads} KV heads -> {self.num_heads // self.tp_size} / "
                 f"{self.num_kv_heads // self.tp_size} per rank); all-reduces per block: "
                 f"{self.all_reduces_per_block}"]
        for pattern, (rule, count) in _grouped(self.rules).items():
            extra = f" parts {list(rule.parts)}" if rule.style == "packed_colwise" else ""
            note = f"; {rule.note}" if rule.note else ""
            what = {"vocab": "; partial lookups summed (one all-reduce)",
                    "vocab_colwise": "; logits gathered (one all-gather)"}.get(rule.style, "")
            lines.append(f"  {pattern:<40} {rule.style}{extra} x{count} ({rule.source}{note}{what})")
        for name, why in self.replicated.items():
            lines.append(f"  {name:<40} replicate ({why})")
        return "\n".join(lines)

    __repr__ = __str__

    @property
    def all_reduces_per_block(self) -> int:
        """Row-wise modules per block (each ends in one all-reduce of [tokens, hidden])."""
        blocks = {name.rsplit(".", 2)[0] for name, r in self.rules.items() if not r.style.startswith("vocab")}
        rowwise = sum(r.style == "rowwise" for r in self.rules.values())
        return rowwise // max(len(blocks), 1)


def _grouped(rules: dict[str, ShardRule]) -> dict[str, tuple[ShardRule, int]]:
    """Rules with the layer numbers replaced by '*', counted (for printing)."""
    out: dict[str, tuple[ShardRule, int]] = {}
    for name, rule in rules.items():
        pattern = ".".join("*" if part.isdigit() else part for part in name.split("."))
        out[pattern] = (out[pattern][0], out[pattern][1] + 1) if pattern in out else (rule, 1)
    return out


def _is_linear(module) -> bool:
    from ..quant.moq_linear import MoQLinear

    return type(module) is nn.Linear or isinstance(module, MoQLinear)


def _attention_parts(attn: nn.Module):
    kids = dict(attn.named_children())
    if all(_is_linear(kids.get(n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return {"q_proj": "q", "k_proj": "k", "v_proj": "v"}, "o_proj"
    if _is_linear(kids.get("qkv_proj")) and _is_linear(kids.get("o_proj")):
        return {"qkv_proj": "qkv"}, "o_proj"
    return None


def _mlp_parts(mlp: nn.Module):
    kids = dict(mlp.named_children())
    if all(_is_linear(kids.get(n)) for n in ("gate_proj", "up_proj", "down_proj")):
        return ["gate_proj", "up_proj"], "down_proj"
    if _is_linear(kids.get("gate_up_proj")) and _is_linear(kids.get("down_proj")):
        return ["gate_up_proj"], "down_proj"
    return None


def _heads(attn: nn.Module, config) -> tuple[int, int, int]:
    config = getattr(attn, "config", None) or config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = int(getattr(text, "num_attention_heads"))
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = getattr(attn, "head_dim", None) or getattr(text, "head_dim", None) or text.hidden_size // heads
    return heads, kv_heads, int(head_dim)


def valid_tp_sizes(num_heads: int, num_kv_heads: int, widths: tuple[int, ...] = ()) -> list[int]:
    """The tensor-parallel sizes that keep whole query and KV heads per rank and divide every split width."""
    common = math.gcd(num_heads, num_kv_heads)
    for width in widths:
        common = math.gcd(common, width)
    return [n for n in range(1, common + 1) if common % n == 0]


def _model_plan(model: nn.Module) -> dict[str, str]:
    """transformers' plan for the model, as {module-name pattern: style} with the base model's prefix."""
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if config is not None and hasattr(config, "get_text_config") else config
    base = dict(getattr(text, "base_model_tp_plan", None) or {})
    prefix = getattr(model, "base_model_prefix", "")
    plan = {(f"{prefix}.{k}" if prefix and hasattr(model, prefix) else k): v for k, v in base.items()}
    plan.update(dict(getattr(type(model), "_tp_plan", None) or {}))
    return plan


def _model_style(model_plan: dict[str, str], name: str) -> str | None:
    for pattern, style in model_plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return style
    return None


def derive_plan(model: nn.Module, tp_size: int) -> TensorParallelPlan:
    """The plan for ``model`` (on the meta device or loaded); raises ValueError when ``tp_size`` cannot split it."""
    model_plan = _model_plan(model)
    rules: dict[str, ShardRule] = {}
    replicated: dict[str, str] = {}
    heads = None
    widths: set[int] = set()
    for block_name, block in model.named_modules():
        kids = dict(block.named_children())
        attention = [(n, m) for n, m in kids.items() if _attention_parts(m) is not None]
        if len(attention) != 1:
            continue
        attn_name, attn = attention[0]
        qkv, o_name = _attention_parts(attn)
        num_heads, num_kv_heads, head_dim = _heads(attn, getattr(model, "config", None))
        if heads is None:
            heads = (num_heads, num_kv_heads)
        elif heads != (num_heads, num_kv_heads):
            raise ValueError(f"tensor parallelism: {block_name} has {num_heads}/{num_kv_heads} heads, other blocks "
                             f"{heads[0]}/{heads[1]}; blocks with different head counts are not supported")
        prefix = f"{block_name}.{attn_name}." if block_name else f"{attn_name}."
        q_rows, kv_rows = num_heads * head_dim, num_kv_heads * head_dim
        for child, role in qkv.items():
            parts = {"q": (q_rows,), "k": (kv_rows,), "v": (kv_rows,), "qkv": (q_rows, kv_rows, kv_rows)}[role]
            rules[prefix + child] = ShardRule("packed_colwise" if role == "qkv" else "colwise", parts)
        rules[prefix + o_name] = ShardRule("rowwise")
        mlp = [(n, m) for n, m in kids.items() if n != attn_name and _mlp_parts(m) is not None]
        mlp_names = [n for n, m in kids.items() if n != attn_name and list(m.children()) and _attention_parts(m) is None]
        if len(mlp) == 1:
            mlp_name, mlp_module = mlp[0]
            gate_up, down = _mlp_parts(mlp_module)
            mlp_prefix = f"{block_name}.{mlp_name}." if block_name else f"{mlp_name}."
            for child in gate_up:
                out = getattr(mlp_module, child).out_features
                packed = child == "gate_up_proj"
                parts = (out // 2, out // 2) if packed else (out,)
                widths.update(parts)
                rules[mlp_prefix + child] = ShardRule("packed_colwise" if packed else "colwise", parts)
            widths.add(getattr(mlp_module, down).in_features)
            rules[mlp_prefix + down] = ShardRule("rowwise")
        else:
            for n in mlp_names:
                replicated[f"{block_name}.{n}" if block_name else n] = "not a gated MLP (experts): whole on every rank"
    if heads is None:
        raise ValueError("tensor parallelism: found no self-attention block (q/k/v/o projections) in "
                         f"{type(model).__name__} to split")
    check_tp_size(tp_size, heads[0], heads[1], tuple(sorted(widths)), type(model).__name__)
    for name, rule in rules.items():
        style = _model_style(model_plan, name)
        if style == rule.style.replace("packed_", ""):
            rule.source = "model plan"
        elif style is not None and rule.style == "packed_colwise":
            rule.note = (f"the model's plan says {style!r}: split part by part instead, each rank keeping whole heads, "
                         "so no output is gathered")
        elif style is not None:
            rule.note = (f"the model's plan says {style!r}: this rank's input is already its own heads' slice, so "
                         "nothing is split or gathered before it")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(embeddings, nn.Embedding) and id(embeddings) in names:
        vocab = embeddings.weight.shape[0]
        if vocab % tp_size == 0:
            # each rank looks up the ids in its slice of the vocabulary; the partial lookups are summed
            rules[names[id(embeddings)]] = ShardRule("vocab", (vocab,))
        else:
            replicated[names[id(embeddings)]] = f"input embedding: its {vocab} rows do not split into {tp_size}"
    if output is not None and id(output) in names and _is_linear(output):
        vocab = output.out_features
        if vocab % tp_size == 0:
            # each rank computes the logits of its slice of the vocabulary; they are gathered, so every rank has all
            style = _model_style(model_plan, names[id(output)])
            rules[names[id(output)]] = ShardRule("vocab_colwise", (vocab,),
                                                 "model plan" if style == "colwise_gather_output" else "AutoTP")
        else:
            replicated[names[id(output)]] = f"output projection: its {vocab} rows do not split into {tp_size}"
    return TensorParallelPlan(tp_size, rules, replicated, heads[0], heads[1], model_plan)


def check_tp_size(tp_size: int, num_heads: int, num_kv_heads: int, widths: tuple[int, ...] = (),
                  model_name: str = "the model") -> None:
    """A clear error when ``tp_size`` does not split the heads (and MLP widths) evenly."""
    valid = valid_tp_sizes(num_heads, num_kv_heads, widths)
    sizes = ", ".join(map(str, valid))
    if tp_size > num_heads:
        raise ValueError(f"FastInferConfig(tp_size={tp_size}) is larger than the {num_heads} attention heads of "
                         f"{model_name}: each rank needs at least one head. tp_size values that work: {sizes}")
    if num_kv_heads % tp_size or num_heads % tp_size:
        raise ValueError(f"FastInferConfig(tp_size={tp_size}) does not divide the {num_kv_heads} KV heads "
                         f"({num_heads} query heads) of {model_name}: each rank must hold whole KV heads. "
                         f"tp_size values that work: {sizes}")
    if tp_size not in valid:
        raise ValueError(f"FastInferConfig(tp_size={tp_size}) does not divide the MLP widths {list(widths)} of "
                         f"{model_name}. tp_size values that work: {sizes}")
