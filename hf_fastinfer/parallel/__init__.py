"""Tensor parallelism: ``FastInferConfig(tp_size=N)``.

The quantizer calls :func:`prepare` before any weight is read (checks, the plan, the process group, meta modules
of this rank's shape) and :func:`finish` after loading (local tensors, all-reduces, per-rank heads; kernel
injection follows, and its fused layers all-reduce after their o and down projections). In a process torchrun did
not start, :func:`prepare` starts the other ranks (:mod:`.runtime`) and :func:`finish` mirrors rank 0's forward
calls to them.

* :mod:`.plan`: AutoTP, the plan derived from the model's structure;
* :mod:`.shard`: the sharding itself, on transformers' shard-on-read loader;
* :mod:`.runtime`: process groups, notebook-driven workers, failures.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref

import torch
from torch import nn

from .plan import ShardRule, TensorParallelPlan, check_tp_size, derive_plan, valid_tp_sizes
from .runtime import DEFAULT_TIMEOUT_S, ProcessGroupInfo, TensorParallelError, Workers

__all__ = ["TensorParallelPlan", "ShardRule", "TensorParallelError", "TensorParallelState", "derive_plan",
           "check_tp_size", "valid_tp_sizes", "tensor_parallel_state", "tensor_parallel_summary", "prepare", "finish", "shutdown",
           "DEFAULT_TIMEOUT_S"]

logger = logging.getLogger("hf_fastinfer")

_STATE_ATTR = "_hf_fastinfer_tp"


@dataclasses.dataclass
class TensorParallelState:
    """What a tensor-parallel model carries: its plan, this process's rank, how the ranks were started."""

    plan: TensorParallelPlan
    group: ProcessGroupInfo
    workers: Workers | None = None  # notebook mode, on rank 0
    model_id: int | None = None  # notebook mode: this model's id with the workers
    loaded: bool = False  # loading (and injection) finished on every rank

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def tp_size(self) -> int:
        return self.plan.tp_size


def tensor_parallel_state(model: nn.Module) -> TensorParallelState | None:
    return getattr(model, _STATE_ATTR, None)


def _device_type(device_map) -> str:
    """"cuda" when ``device_map`` places the model on a GPU ("cuda", "cuda:1", {"": 0}, ...), else "cpu"."""
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    gpu = any((isinstance(v, int) and not isinstance(v, bool)) or (v is not None and "cuda" in str(v)) for v in values)
    return "cuda" if gpu else "cpu"


def _load_arguments(model: nn.Module, config, dtype, device_map) -> dict:
    """What a worker passes to from_pretrained to load the same model (notebook mode)."""
    path = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not path or not os.path.exists(str(path)) and "/" not in str(path):
        raise ValueError("FastInferConfig(tp_size>1) outside torchrun starts the other ranks itself, and they load the "
                         f"model from where this one came from; {path!r} is not a folder or a Hub id they can load")
    if device_map not in (None, "cpu", {"": "cpu"}, {"": torch.device("cpu")}):
        raise ValueError("FastInferConfig(tp_size>1) places each rank's shard itself: leave device_map unset (CPU; on "
                         "GPUs run under torchrun, one process per GPU)")
    kwargs = {"quantization_config": config.to_dict(),
              "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return {"path": str(path), "class_name": type(model).__name__, "kwargs": kwargs}


#: the style name our plan's modules carry in transformers' tp_plan when a distributed_config is adopted
ALREADY_SHARDED = "fastinfer_sharded"


class _AlreadySharded:
    """transformers' tensor-parallel style for modules hf_fastinfer has already split: nothing more to do."""

    def should_use_local_tensors(self, module) -> bool:
        return True

    def validate_param(self, module, param, mesh, parameter_name=None) -> None:
        pass

    # (transformers >= 5.25 also passes the text config and its mesh manager, by keyword; nothing here needs them)
    def shard_param(self, module, param, mesh, **kwargs) -> None:
        pass

    def install_forward(self, module, mesh, **kwargs):
        return module


def _register_style() -> None:
    """Register the no-op style in transformers' ParallelInterface (once; on first use, not at import)."""
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    current = ALL_PARALLEL_STYLES._global_mapping.get(ALREADY_SHARDED)
    if current is None or type(current).__module__ != __name__:
        ALL_PARALLEL_STYLES.register(ALREADY_SHARDED, _AlreadySharded())


def _adopt_distributed_config(model: nn.Module, config) -> bool:
    """transformers' ``distributed_config=DistributedConfig(tp_size=N)`` with FastInferConfig: hf_fastinfer splits
    the model (same N, in the process group transformers started) and transformers' own pass is told the modules
    are already split. True when adopted; a clear error when the two disagree."""
    distributed = getattr(model.config, "distributed_config", None)
    if distributed is None:
        return False
    other = getattr(distributed, "tp_size", None) or 1
    others = {name: getattr(distributed, name, 1) or 1 for name in ("fsdp_size", "pp_size", "ep_size", "dp_replicate_size")}
    if other == 1 and all(v == 1 for v in others.values()):
        return False
    if config.tp_size not in (1, other):
        raise ValueError(
            f"FastInferConfig(tp_size={config.tp_size}) conflicts with distributed_config=DistributedConfig("
            f"tp_size={other}): pass the same size to both, or only one of them.")
    extra = {k: v for k, v in others.items() if v != 1}
    if extra or isinstance(getattr(distributed, "tp_plan", None), dict):
        raise ValueError(
            "FastInferConfig splits the model itself (AutoTP with quantized and fused shards); distributed_config "
            f"asks for {'a custom tp_plan' if not extra else extra}, which it does not combine with. Use "
            "DistributedConfig(tp_size=N) alone, or FastInferConfig(tp_size=N) without distributed_config.")
    config.tp_size = other
    return True


def prepare(quantizer, model: nn.Module, dtype=None, device_map=None) -> TensorParallelPlan | None:
    """Before loading: plan (errors for sizes that do not split), process group (or start the workers), meta
    modules of this rank's shape."""
    from . import runtime
    from .shard import shard_before_loading

    config = quantizer.quantization_config
    adopted = _adopt_distributed_config(model, config)
    tp_size = config.tp_size
    if tp_size == 1:
        return None
    plan = derive_plan(model, tp_size)
    if adopted:
        _register_style()
        from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

        model._tp_plan = {replace_layer_number_by_wildcard(name): ALREADY_SHARDED for name in plan.rules}
    device_type = _device_type(device_map)
    backend = runtime.check_backend(config.tp_backend, device_type)
    runtime.check_world(tp_size)
    workers = Workers._shared if Workers._shared is not None and not Workers._shared._closed else None
    group = None if workers is not None else runtime.join_process_group(tp_size, backend)
    model_id = None
    if group is None:
        load = _load_arguments(model, config, dtype, device_map)
        if workers is None or (workers.tp_size, workers.backend) != (tp_size, backend):
            logger.info("hf_fastinfer: starting %d tensor-parallel worker processes (this process is rank 0)",
                        tp_size - 1)
        workers = Workers.get(tp_size, backend)
        model_id = workers.load(load)
        group = ProcessGroupInfo(0, tp_size, backend, "notebook")
    quantizer._tp_state = TensorParallelState(plan, group, workers, model_id)
    try:
        shard_before_loading(model, plan, group.rank, quantizer.pre_quantized,
                             "cuda" if group.backend == "nccl" else "cpu")
    except Exception:
        abort(quantizer)
        raise
    return plan


def abort(quantizer) -> None:
    """This process failed while loading a tensor-parallel model: the ranks it started are ended (they were loading
    in step with it and cannot be told)."""
    state = getattr(quantizer, "_tp_state", None)
    if state is not None and state.workers is not None:
        state.workers.abort()


def localize(quantizer, model: nn.Module) -> None:
    """Right after loading: the shards become plain local tensors (before MoQ's own after-loading steps)."""
    from .shard import localize_after_loading

    localize_after_loading(model, quantizer._tp_state.plan)


def finish(quantizer, model: nn.Module) -> None:
    """After loading and quantizing, before kernel injection: local tensors, all-reduces, per-rank heads."""
    from .shard import finish_after_loading

    state: TensorParallelState = quantizer._tp_state
    finish_after_loading(model, state.plan, state.rank)
    setattr(model, _STATE_ATTR, state)


def start_mirroring(model: nn.Module) -> None:
    """Notebook mode, rank 0, after injection: forward calls go to the workers too; they stop with the model."""
    from .runtime import MirroredForward

    state = tensor_parallel_state(model)
    if state is None:
        return
    state.loaded = True
    if state.workers is None:
        return
    model.forward = MirroredForward(model, state.workers, state.model_id)
    weakref.finalize(model, state.workers.release, state.model_id)


def rank_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of every tensor this rank holds, bytes of those that are split), each storage once: a tied
    embedding / output projection pair, both split, counts once."""
    from ..bench import tensor_bytes

    state = tensor_parallel_state(model)
    split_modules = [model.get_submodule(name) for name in state.plan.rules]
    split = tensor_bytes([t for m in split_modules for t in list(m.parameters()) + list(m.buffers())])
    return tensor_bytes(list(model.parameters()) + list(model.buffers())), split


def tensor_parallel_summary(model: nn.Module) -> str | None:
    """The plan, the bytes each rank holds (split and whole), and what one decoded token all-reduces."""
    state = tensor_parallel_state(model)
    if state is None:
        return None
    plan = state.plan
    total, split = rank_bytes(model)
    hidden = model.config.get_text_config(decoder=True).hidden_size
    dtype_bytes = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    blocks = len({name.rsplit(".", 2)[0] for name, rule in plan.rules.items() if not rule.style.startswith("vocab")})
    vocab_split = any(rule.style == "vocab" for rule in plan.rules.values())
    reduces = blocks * plan.all_reduces_per_block + vocab_split  # the embedding's partial lookups: one more
    per_token = reduces * hidden * dtype_bytes
    gather = next((rule.parts[0] for rule in plan.rules.values() if rule.style == "vocab_colwise"), None)
    mode = {"notebook": "this process drives the other ranks", "torchrun": "under torchrun",
            "initialised": "in the caller's process group", "worker": "worker"}.get(state.group.mode, state.group.mode)
    return "\n".join([
        str(plan),
        f"rank {state.rank} of {state.tp_size} ({state.group.backend}, {mode}): {total / 2**20:.2f} MiB of weights "
        f"({split / 2**20:.2f} MiB of shards, {(total - split) / 2**20:.2f} MiB held whole); every rank holds the same "
        "(rank 0 also the row-wise biases)",
        f"per decoded token and sequence: {reduces} all-reduces of {hidden} x {dtype_bytes} bytes = "
        f"{per_token / 1024:.1f} KiB summed over the ranks"
        + (f", and one all-gather of the {gather} logits ({gather * dtype_bytes / 1024:.1f} KiB)" if gather else ""),
    ])


def shutdown(model: nn.Module) -> None:
    """Stop the worker ranks a notebook-mode model runs on, now (they also stop when the last model on them is
    deleted, or at exit). Every model on those ranks stops working."""
    state = tensor_parallel_state(model)
    if state is not None and state.workers is not None:
        state.workers.close()
