"""Kernel injection: the fused decode path on the instances of one loaded model.

``FastInferConfig(...)`` injects at load time (``kernel_injection=True``, the default); :func:`inject` does it for
a model already loaded and :func:`uninject` undoes it. Nothing process-wide changes and no class is patched:

1. :func:`~hf_fastinfer.injection.detect.find_blocks` finds the pre-norm decoder blocks by structure;
2. a probe runs the model's own forward on a few tokens, records what each block receives for one decoded
   token and what it returns, and runs the fused step on the same inputs: a block is injected only when the two
   agree (so a block with another formula, e.g. extra norms, is recognised as such and left alone);
3. q/k/v and gate/up become one tensor each, the model's modules keeping views of it (:mod:`.fuse`);
4. each block's ``forward`` becomes a :class:`~hf_fastinfer.injection.layer.FusedDecoderLayer`; a float output
   projection and the final norm get the kernel library's forwards.

Blocks that are not recognised are left untouched and named in one log line; a mixture-of-experts block gets
its attention fused and keeps its experts as transformers' module (logged too). A model with nothing to inject
runs unchanged, with one warning.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import torch
from torch import nn

from .._compat import CACHE_KWARGS, cache_kwarg
from ..quant._pages import release_free_heap
from .detect import BlockPlan, find_blocks, norm_kind
from ..kernels.decoder_layer import LayerProjection
from .fuse import fuse_projections, unfuse_projections
from .hugepages import move_out_of_huge_pages, move_to_huge_pages
from .layer import FastLinearForward, FastNormForward, FusedDecoderLayer
from .step import FusedDecodeStep, find_rotary, probe_ids, probe_step

__all__ = ["InjectionReport", "inject", "uninject", "is_injected", "injection_report"]

logger = logging.getLogger("hf_fastinfer")

_STATE_ATTR = "_hf_fastinfer_injection"

#: how far the fused step may be from the block's own forward on the probe token, relative to the size of the
#: block's update (output - input): fp32 differs by summation order only; bf16 / fp16 round at the same places
#: with other summation orders. A block the fused step does not compute (a missing norm, another activation)
#: is off by order 1.
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@dataclasses.dataclass
class InjectionReport:
    """What :func:`inject` did: fused blocks, modules given a kernel-library forward, what it left alone."""

    fused_blocks: list[str]
    attention_only: dict[str, str]  # block -> why its MLP stays the model's module
    left_alone: dict[str, str]  # module -> why it is not injected
    forwards: list[str]  # other modules given a kernel-library forward (lm_head, final norm)
    fused_projections: int  # q/k/v and gate/up groups now sharing one tensor
    prefill_left: dict[str, str] = dataclasses.field(default_factory=dict)  # fused block -> why its prefill is not
    #: whether the whole decode step (embedding, blocks, norm, output projection) runs as one forward, else why not
    decode_step: bool = False
    decode_step_left: str | None = None
    #: whether the chain of fused blocks also runs the final norm and output projection (step.py)
    decode_head: bool = False
    #: whether a prompt call that keeps only its last positions' logits (generate()'s) computes the last block's
    #: queries, attention output and MLP for those positions alone (step.py: trim_prefill)
    prefill_trimmed: bool = False
    #: bytes of the weights a decode step reads that live in transparent huge pages (0: not moved)
    huge_page_bytes: int = 0

    def __str__(self) -> str:
        lines = [f"hf_fastinfer kernel injection: {len(self.fused_blocks)} decoder blocks fused"
                 + (f" ({len(self.attention_only)} attention only)" if self.attention_only else "")
                 + (f", {', '.join(self.forwards)} on kernel-library forwards" if self.forwards else "")
                 + (", whole decode step fused" if self.decode_step else "")
                 + (" (the output projection in the blocks' chain)" if self.decode_head else "")
                 + (f", {self.huge_page_bytes / 2**20:.0f} MiB of weights in huge pages" if self.huge_page_bytes else "")]
        if self.decode_step_left:
            lines.append(f"  decode step: per block, not whole ({self.decode_step_left})")
        for name, why in self.attention_only.items():
            lines.append(f"  {name}: attention fused, MLP left to transformers ({why})")
        for name, why in self.left_alone.items():
            lines.append(f"  {name}: left to transformers ({why})")
        for name, why in self.prefill_left.items():
            lines.append(f"  {name}: decode fused, prefill left to transformers ({why})")
        return "\n".join(lines)


@dataclasses.dataclass
class _State:
    report: InjectionReport
    layers: dict[str, FusedDecoderLayer]
    fused_groups: list[list[nn.Module]]
    forwards: list[nn.Module]
    step: FusedDecodeStep | None = None
    huge_pages: int | None = None  # the huge-page arena's address (hugepages.py)


def is_injected(model: nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def injection_report(model: nn.Module) -> InjectionReport | None:
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.report


def _rotary_dim(captured_kwargs: dict) -> int | None:
    pe = captured_kwargs.get("position_embeddings")
    if not isinstance(pe, tuple) or len(pe) != 2 or not isinstance(pe[0], torch.Tensor):
        return None
    return int(pe[0].shape[-1])


@torch.no_grad()
def _probe(model: nn.Module, plans: list[BlockPlan]) -> dict[str, dict]:
    """Run the model's own forward on 3 prompt tokens and 1 decoded token with a DynamicCache, recording each
    block's two calls: {block name: {"prefill": call, "decode": call}}, a call being {"args", "kwargs", "output"}.
    The cache is cropped back to the prompt afterwards and the prefill call gets an empty cache of its own, so
    each block's fused steps can be run on the same inputs."""
    from transformers.cache_utils import DynamicCache

    ids = probe_ids(model, 4)
    cache = DynamicCache(config=model.config)
    calls = {}

    def recorder(name):
        def hook(module, args, kwargs, output):
            calls.setdefault(name, []).append({"args": args, "kwargs": dict(kwargs), "output": output})
        return hook

    handles = [p.layer.register_forward_hook(recorder(p.name), with_kwargs=True) for p in plans]
    try:
        model(input_ids=ids[None, :3], use_cache=True, **{cache_kwarg(): cache})
        model(input_ids=ids[None, 3:], use_cache=True, **{cache_kwarg(): cache})
    finally:
        for h in handles:
            h.remove()
    cache.crop(-1)  # back to the 3 prompt tokens, for the decode calls
    for records in calls.values():
        # the prompt's call again on an empty cache of its own
        kwargs = records[0]["kwargs"]
        kwargs[next((n for n in CACHE_KWARGS if n in kwargs), cache_kwarg())] = DynamicCache(config=model.config)
    return {name: {"prefill": records[0], "decode": records[-1]} for name, records in calls.items()
            if len(records) == 2}


def _probe_error(fused_layer: FusedDecoderLayer, call: dict, step: str = "decode") -> str | None:
    """None when the fused ``step`` (decode / prefill) reproduces the recorded call, else why not."""
    args, kwargs, expected = call["args"], call["kwargs"], call["output"]
    hidden = args[0] if args else kwargs.get("hidden_states")
    rest = args[1:] if args else ()
    kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    if not isinstance(expected, torch.Tensor):
        return f"its forward returns {type(expected).__name__}, not a tensor"
    try:
        out = (fused_layer.decode if step == "decode" else fused_layer.prefill)(hidden, rest, kwargs)
    except Exception as exc:  # a shape or dtype the fused layer refuses
        return f"the fused {step} step failed on it ({type(exc).__name__}: {exc})"
    if out is None:
        return f"its {step} call is not one the fused step covers (positional arguments or no position embeddings)"
    update = (expected.float() - hidden.float()).abs().max().clamp_min(1e-6)
    error = float((out.float() - expected.float()).abs().max() / update)
    tolerance = PROBE_TOLERANCE.get(hidden.dtype, 6e-2)
    if not error <= tolerance:
        return f"the fused {step} step differs from its forward by {error:.2g} of the update (limit {tolerance:g})"
    return None


@torch.no_grad()
def inject(model: nn.Module, *, verbose: bool = False) -> InjectionReport:
    """Inject hf_fastinfer's fused decode path into ``model`` (in place; idempotent). Returns what was done.

    Decode calls (one new token per sequence, no gradient) of each recognised block run the fused layer;
    everything else runs the block's own forward. ``verbose`` prints the report.
    """
    tp_state = getattr(model, "_hf_fastinfer_tp", None)
    if tp_state is not None and tp_state.workers is not None and tp_state.loaded:
        # the probe runs collectives, and the ranks this process drives only follow forward calls
        raise RuntimeError("hf_fastinfer.inject: this model is split over ranks this process drives; injection runs "
                           "on every rank at load time. Load it again (kernel_injection=True) instead.")
    if is_injected(model):
        uninject(model)
    plans, skipped = find_blocks(model)
    report = InjectionReport([], {}, dict(skipped), [], 0, {})
    state = _State(report, {}, [], [])
    layers: dict[str, tuple[BlockPlan, int]] = {}  # block name -> (plan, rotary dims), probe passed
    if plans:
        was_training = model.training
        model.eval()
        try:
            calls = _probe(model, plans)
        except Exception as exc:
            calls = {}
            for p in plans:
                report.left_alone[p.name] = f"the probe forward of the model failed ({type(exc).__name__}: {exc})"
        finally:
            model.train(was_training)
        for plan in plans:
            call = calls.get(plan.name)
            if call is None:
                report.left_alone.setdefault(plan.name, "the model's forward did not call it")
                continue
            rotary_dim = _rotary_dim(call["decode"]["kwargs"])
            if rotary_dim is None or rotary_dim > plan.head_dim or rotary_dim % 2:
                report.left_alone[plan.name] = "it is not given rotary position embeddings (cos, sin)"
                continue
            layer = FusedDecoderLayer(plan.layer, plan.spec(rotary_dim), plan.layer_idx,
                                      None if plan.gate_up else plan.mlp, plan.attention)
            error = _probe_error(layer, call["decode"])
            if error is not None:
                report.left_alone[plan.name] = error
                continue
            prefill_error = None
            if call["prefill"]["args"] and call["prefill"]["args"][0].device.type == "cpu":
                layer.prefill_checked = True
                prefill_error = _probe_error(layer, call["prefill"], "prefill")
                if prefill_error is not None:
                    report.prefill_left[plan.name] = prefill_error
            layers[plan.name] = (plan, rotary_dim, prefill_error is None)
        del calls  # the probe's cache and activations
        layers = _agree_across_ranks(plans, layers, report)
    for name, (plan, rotary_dim, prefill) in layers.items():
        groups = [g for g in (plan.qkv, plan.gate_up) if len(g) > 1]
        fused = {}
        for group in groups:
            joined = fuse_projections(group)
            if joined is not None:
                fused[id(group)] = joined
                state.fused_groups.append(group)
        spec = plan.spec(rotary_dim, fused.get(id(plan.qkv)), fused.get(id(plan.gate_up)))
        fused_layer = FusedDecoderLayer(plan.layer, spec, plan.layer_idx, None if plan.gate_up else plan.mlp,
                                        plan.attention)
        fused_layer.prefill_checked = prefill and spec.input_norm.device.type == "cpu"
        plan.layer.forward = fused_layer
        state.layers[name] = fused_layer
        report.fused_blocks.append(name)
        if not plan.gate_up:
            report.attention_only[name] = plan.mlp_note
    # on CPU a block computes the next block's q/k/v at the end of its own compiled call (one call per block)
    ordered = list(state.layers.values())
    for this, following in zip(ordered, ordered[1:]):
        if this.mlp is None and following.layer_idx == this.layer_idx + 1:
            this.next = following
    report.fused_projections = len(state.fused_groups)
    release_free_heap()  # the replaced q/k/v and gate/up tensors and the probe's temporaries (quant/_pages.py)
    if report.fused_blocks:
        _inject_forwards(model, plans, state)
        _move_to_huge_pages(model, state)
        _inject_step(model, plans, state)
    setattr(model, _STATE_ATTR, state)
    _log(report)
    if verbose:
        print(report)
    return report


def _agree_across_ranks(plans: list[BlockPlan], layers: dict, report: InjectionReport) -> dict:
    """Tensor parallelism: a block is fused (and its prefill) only where every rank's probe passed, so all ranks
    run the same collectives in the same order."""
    from ..parallel.shard import TP_GROUP_ATTR

    if not plans or not hasattr(plans[0].o, TP_GROUP_ATTR):
        return layers
    import torch.distributed as dist

    flags = torch.tensor([[p.name in layers, p.name in layers and layers[p.name][2]] for p in plans], dtype=torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=getattr(plans[0].o, TP_GROUP_ATTR))
    for plan, (decode_ok, prefill_ok) in zip(plans, flags.tolist()):
        if plan.name not in layers:
            continue
        if not decode_ok:
            del layers[plan.name]
            report.left_alone[plan.name] = "the probe did not pass on another tensor-parallel rank"
        elif not prefill_ok and layers[plan.name][2]:
            layers[plan.name] = (*layers[plan.name][:2], False)
            report.prefill_left[plan.name] = "the prefill probe did not pass on another tensor-parallel rank"
    return layers


def _inject_forwards(model: nn.Module, plans: list[BlockPlan], state: _State) -> None:
    """Kernel-library forwards for the float projections of the fused blocks (their prefill), the output
    projection (float nn.Linear) and the norms beside the blocks (the final norm)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    fused = {id(layer._layer()) for layer in state.layers.values()}
    for plan in plans:
        if id(plan.layer) in fused:
            for module in plan.qkv + [plan.o] + plan.gate_up + ([plan.down] if plan.gate_up else []):
                if type(module) is nn.Linear:
                    module.forward = FastLinearForward(module)
                    state.forwards.append(module)
    if type(output) is nn.Linear and output.weight.dtype in (torch.float32, torch.bfloat16, torch.float16):
        output.forward = FastLinearForward(output)
        state.forwards.append(output)
        state.report.forwards.append(names.get(id(output), "output projection"))
    block_ids = {id(p.layer) for p in plans}
    for parent in model.modules():
        kids = list(parent.children())
        if not any(isinstance(k, nn.ModuleList) and any(id(b) in block_ids for b in k) for k in kids):
            continue
        for kid in kids:
            kind = norm_kind(kid)
            if kind is not None:
                eps = getattr(kid, "variance_epsilon", getattr(kid, "eps", None))
                kid.forward = FastNormForward(kid, eps, kind == "gemma")
                state.forwards.append(kid)
                state.report.forwards.append(names.get(id(kid), "norm"))


def _spec_tensors(spec) -> list[torch.Tensor]:
    """Every tensor a fused layer's spec reads (norms, each projection's weight, scales, zero points, bias)."""
    found = []
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, LayerProjection):
                found += [t for t in (item.weight, item.scales, item.zeros, item.bias) if t is not None]
            elif isinstance(item, torch.Tensor):
                found.append(item)
    return found


def _move_to_huge_pages(model: nn.Module, state: _State) -> None:
    """The weights a decode step streams (the fused blocks', the output projection's) into transparent huge
    pages on CPU (hugepages.py: fewer TLB misses while streaming them, and a warm TLB for the Python between
    the compiled calls)."""
    hot = [t for layer in state.layers.values() if layer.device.type == "cpu" for t in _spec_tensors(layer.spec)]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        hot += list(output.parameters()) + list(output.buffers())
    every = list(model.parameters()) + list(model.buffers()) + hot
    moved, state.huge_pages = move_to_huge_pages(hot, every)
    state.report.huge_page_bytes = moved
    if moved:
        for layer in state.layers.values():
            layer.spec._compiled = None  # compiled again on first use, on the moved tensors


def _inject_step(model: nn.Module, plans: list[BlockPlan], state: _State) -> None:
    """The whole decode step as the model's forward (:mod:`.step`), when every block of the model is fused, the
    model is the base model plus an output projection, and the probe token gives the same logits both ways."""
    report = state.report
    layers = list(state.layers.values())
    blocks = {id(layer._layer()) for layer in layers}
    base = next((m for m in model.modules() for kid in m.children()
                 if isinstance(kid, nn.ModuleList) and any(id(b) in blocks for b in kid)), None)
    stack = next((kid for kid in base.children() if isinstance(kid, nn.ModuleList)), None) if base else None
    norms = [kid for kid in base.children() if norm_kind(kid) is not None] if base is not None else []
    rotary = find_rotary(base) if base is not None else None
    why = None
    if any(layer.spec.all_reduce is not None for layer in layers) or hasattr(model, "_hf_fastinfer_tp"):
        why = "tensor parallelism: each block's collectives"
    elif stack is None or [id(b) for b in stack] != [id(layer._layer()) for layer in layers]:
        why = "not every block of the model is fused"
    elif model is base or not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        why = "the model has no output projection"
    elif len(norms) != 1 or rotary is None:
        why = "the base model has no single final norm and rotary module"
    elif layers[0].device.type != "cpu":
        why = "the model is not on the CPU (the GPU path captures the step in a graph instead)"
    if why is None:
        was_training = model.training
        model.eval()
        try:
            step = FusedDecodeStep(model, base, layers, rotary, norms[0])
            why = probe_step(model, step)
            if why is None:
                step.trim_prefill = _probe_trim(model, step)
        except Exception as exc:  # a model whose forward the probe cannot drive
            why = f"the probe failed ({type(exc).__name__}: {exc})"
        finally:
            model.train(was_training)
    if why is not None:
        report.decode_step_left = why
        return
    model.forward = step
    state.step = step
    report.decode_step = True
    report.decode_head = step.head is not None
    report.prefill_trimmed = step.trim_prefill


@torch.no_grad()
def _probe_trim(model: nn.Module, step: FusedDecodeStep) -> bool:
    """Whether a prompt call that keeps only its last position's logits gives the model's own logits with the last
    block computed for that position alone (FusedDecodeStep.trim_prefill, on in a new step): a 9-token prompt both
    ways, the same shape, and values within the probe's tolerance of the logits' range (the last query's attention
    and products run on one row: another summation order). The model is in eval mode (_inject_step)."""
    from ..cache import FastInferCache

    ids = probe_ids(model, 9)[None]
    config = model.config.get_text_config(decoder=True)
    name = cache_kwarg()
    try:
        expected = step._original(model, input_ids=ids, use_cache=True, logits_to_keep=1,
                                  **{name: FastInferCache(config=config, max_cache_len=16)}).logits
        got = step(input_ids=ids, use_cache=True, logits_to_keep=1,
                   **{name: FastInferCache(config=config, max_cache_len=16)}).logits
    except Exception:  # a forward the trimmed block cannot serve: the model's own, untrimmed
        return False
    if got.shape != expected.shape:
        return False
    scale = expected.float().abs().max().clamp_min(1e-6)
    error = float((got.float() - expected.float()).abs().max() / scale)
    return error <= PROBE_TOLERANCE.get(step.layers[0].dtype, 6e-2)


def _log(report: InjectionReport) -> None:
    if not report.fused_blocks:
        warnings.warn("hf_fastinfer kernel injection found no decoder block it can fuse in this model; it runs "
                      "unchanged" + (f" ({len(report.left_alone)} modules left alone: "
                                     f"{next(iter(report.left_alone.values()))})" if report.left_alone else ""),
                      stacklevel=3)
        return
    logger.info(str(report).splitlines()[0])
    if report.attention_only:
        logger.info("hf_fastinfer: attention fused, MLP left to transformers in %d blocks (%s): %s",
                    len(report.attention_only), next(iter(report.attention_only.values())),
                    ", ".join(report.attention_only))
    if report.left_alone:
        logger.warning("hf_fastinfer: not injected, left to transformers: %s",
                       "; ".join(f"{n} ({why})" for n, why in report.left_alone.items()))


@torch.no_grad()
def uninject(model: nn.Module) -> None:
    """Undo :func:`inject`: original forwards, and each projection its own tensors again (idempotent)."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"),
                      (FusedDecoderLayer, FastLinearForward, FastNormForward, FusedDecodeStep)):
            del module.forward
    for group in state.fused_groups:
        unfuse_projections(group)
    if state.huge_pages is not None:
        move_out_of_huge_pages(list(model.parameters()) + list(model.buffers()), state.huge_pages)
    delattr(model, _STATE_ATTR)
