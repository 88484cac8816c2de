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
           "check_tp_size", "valid_tp_sizes", "tensor_parallel_state", "prepare", "finish", "shutdown",
           "DEFAULT_TIMEOUT_S"]

logger = logging.getLogger("hf_fastinfer")

_STATE_ATTR = "_hf_fastinfer_tp"


@dataclasses.dataclass
class TensorParallelState:
    """What a tensor-parallel model carries: its plan, this process's rank, how the ranks were started."""

    plan: TensorParallelPlan
    group: ProcessGroupInfo
    workers: Workers | None = None  # notebook mode, on rank 0

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def tp_size(self) -> int:
        return self.plan.tp_size


def tensor_parallel_state(model: nn.Module) -> TensorParallelState | None:
    return getattr(model, _STATE_ATTR, None)


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


def _check_distributed_config(model: nn.Module, tp_size: int) -> None:
    distributed = getattr(model.config, "distributed_config", None)
    if distributed is None:
        return
    other = getattr(distributed, "tp_size", None) or 1
    if other > 1 or getattr(distributed, "tp_plan", None):
        raise ValueError(
            f"FastInferConfig(tp_size={tp_size}) splits the model itself (AutoTP, quantized and fused shards); "
            f"from_pretrained also got distributed_config=DistributedConfig(tp_size={other}, ...), which would split "
            "it a second time. Pass one of them: drop distributed_config, or use FastInferConfig(tp_size=1) to let "
            "transformers' own tensor parallelism run.")


def prepare(quantizer, model: nn.Module, dtype=None, device_map=None) -> TensorParallelPlan:
    """Before loading: plan (errors for sizes that do not split), process group (or start the workers), meta
    modules of this rank's shape."""
    from . import runtime
    from .shard import shard_before_loading

    config = quantizer.quantization_config
    tp_size = config.tp_size
    _check_distributed_config(model, tp_size)
    plan = derive_plan(model, tp_size)
    device_type = "cuda" if isinstance(device_map, (str, torch.device)) and "cuda" in str(device_map) else "cpu"
    backend = runtime.check_backend(config.tp_backend, device_type)
    runtime.check_world(tp_size)
    group = runtime.join_process_group(tp_size, backend)
    workers = None
    if group is None:
        load = _load_arguments(model, config, dtype, device_map)
        logger.info("hf_fastinfer: starting %d tensor-parallel worker processes (this process is rank 0)", tp_size - 1)
        workers = Workers(tp_size, backend, load)
        group = ProcessGroupInfo(0, tp_size, backend, "notebook")
    quantizer._tp_state = TensorParallelState(plan, group, workers)
    try:
        shard_before_loading(model, plan, group.rank, quantizer.pre_quantized)
    except Exception:
        if workers is not None:
            workers.close()
        raise
    return plan


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
    if state is None or state.workers is None:
        return
    model.forward = MirroredForward(model, state.workers)
    weakref.finalize(model, state.workers.close)


def shutdown(model: nn.Module) -> None:
    """Stop a notebook-mode model's worker ranks now (they also stop when the model is deleted or at exit)."""
    state = tensor_parallel_state(model)
    if state is not None and state.workers is not None:
        state.workers.close()
