"""The process group a tensor-parallel model runs in, and the ranks a notebook starts itself.

Three ways in, all on torch.distributed (gloo on CPU, NCCL on GPU):

* **torchrun** (``WORLD_SIZE`` set, one or several nodes): every rank runs the user's script; the first
  ``from_pretrained`` joins the group torchrun describes (``init_process_group(env://)``), or uses the one the
  script (or transformers' ``distributed_config``) already initialised.
* **A process torchrun did not start** (a notebook, a plain script): that process is rank 0. It starts the other
  ``tp_size - 1`` ranks with torch.multiprocessing (spawn); each loads the same model with the same arguments and
  then replays rank 0's forward calls (:class:`Workers`). ``model.generate(...)`` and ``model(...)`` run on rank 0
  as usual, every generation feature included, because only the model's forward is mirrored; the KV caches rank 0
  creates get a twin on each rank, and the cache operations generate calls between forwards (crop, beam reorder)
  are mirrored too.
* A process group the user initialised: used as it is when its size is ``tp_size``.

Failures end with an error, not a hang: a rank that fails exits its process, which closes its connections, so
the collective the others wait in fails at once; a rendezvous that never completes fails after ``timeout``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import itertools
import logging
import os
import pickle
import socket
import sys
import traceback
import weakref
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["TensorParallelError", "ProcessGroupInfo", "join_process_group", "Workers", "DEFAULT_TIMEOUT_S"]

logger = logging.getLogger("hf_fastinfer")

#: seconds a rendezvous (and any collective) may wait for a rank before it fails; HF_FASTINFER_TP_TIMEOUT overrides
DEFAULT_TIMEOUT_S = 300.0


class TensorParallelError(RuntimeError):
    """A rank of a tensor-parallel model failed, exited or never joined."""


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("HF_FASTINFER_TP_TIMEOUT", DEFAULT_TIMEOUT_S)))


@dataclasses.dataclass
class ProcessGroupInfo:
    rank: int
    world_size: int
    backend: str
    mode: str  # "torchrun", "notebook" (this process drives spawned workers), "worker", "initialised"


def check_backend(backend: str | None, device_type: str) -> str:
    """The backend to use; a clear error for NCCL without CUDA (before any process starts)."""
    backend = backend or ("nccl" if device_type == "cuda" else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"FastInferConfig(tp_backend={backend!r}): use 'gloo' (CPU) or 'nccl' (CUDA GPUs)")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("FastInferConfig(tp_backend='nccl') needs CUDA GPUs, and this machine has none (torch sees "
                         "no CUDA device). Use tp_backend='gloo' to run tensor parallelism on CPU.")
    return backend


def check_world(tp_size: int) -> None:
    """Before loading: the process group (or the one torchrun describes) must have exactly ``tp_size`` ranks."""
    shared = Workers._shared
    if shared is not None and not shared._closed:
        return  # this process's own ranks: Workers.get says whether they can serve this size
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    elif "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
    else:
        return  # this process will start the other ranks
    if world != tp_size:
        raise ValueError(f"FastInferConfig(tp_size={tp_size}) needs {tp_size} processes, but this one runs in a world "
                         f"of {world} (torchrun --nproc-per-node x --nnodes). Start {tp_size} ranks, or set "
                         f"tp_size={world}. Data parallelism around tensor parallelism is not supported.")


def join_process_group(tp_size: int, backend: str) -> ProcessGroupInfo | None:
    """Use or join the process group of ``tp_size`` ranks; None when this process must start the others first."""
    if dist.is_initialized():
        return ProcessGroupInfo(dist.get_rank(), dist.get_world_size(), dist.get_backend(), "initialised")
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=_timeout())
        # the group is ours to end: a gloo group still alive when the interpreter finalises can abort the process
        # ("terminate called without an active exception"; pytorch/pytorch#190489), so it is destroyed at exit
        # while Python is whole, unless the script destroyed it first
        atexit.register(_leave_process_group)
        rank = dist.get_rank()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        return ProcessGroupInfo(rank, dist.get_world_size(), backend, "torchrun")
    return None


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- notebook mode: rank 0 drives spawned workers -----------------------------------------------------------------

_MIRRORED_CACHE_METHODS = ("crop", "reorder_cache", "batch_repeat_interleave", "batch_select_indices", "reset")


@dataclasses.dataclass
class _CacheRef:
    """A KV cache in a mirrored call: its id, and the first time the (still empty) cache itself as a blueprint."""

    cache_id: int
    blueprint: Any = None


def _worker_main(rank: int, world_size: int, port: int, backend: str, timeout_s: float) -> None:
    """A spawned rank: join the group, then do what rank 0 says: load a model (rank 0 loads it at the same time),
    replay its forward calls and cache operations, release it, stop."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HF_FASTINFER_TP_WORKER": "1"})
    try:
        import transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        if backend == "nccl":
            torch.cuda.set_device(rank)
        elif "OMP_NUM_THREADS" not in os.environ:
            # the ranks share this machine's cores (rank 0 keeps the thread count its user chose)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        from .. import FastInferConfig  # registers hf_fastinfer with transformers in this process

        models: dict[int, Any] = {}
        caches: dict[int, Any] = {}
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0)
            kind, payload, dropped, released = message[0]
            for cache_id in dropped:
                caches.pop(cache_id, None)
            for model_id in released:
                models.pop(model_id, None)
            if kind == "stop":
                break
            if kind == "load":
                model_id, load = payload
                kwargs = dict(load["kwargs"])
                settings = kwargs.pop("quantization_config")
                config = transformers.AutoConfig.from_pretrained(load["path"])
                if getattr(config, "quantization_config", None) is not None:
                    # a saved hf_fastinfer checkpoint loads with its config's settings: rank 0's go there
                    config.quantization_config = settings
                    kwargs["config"] = config
                else:
                    kwargs["quantization_config"] = FastInferConfig.from_dict(settings)
                model_class = getattr(transformers, load["class_name"])
                models[model_id] = model_class.from_pretrained(load["path"], **kwargs).eval()
            elif kind == "forward":
                model_id, args, kwargs, grad = payload
                args = [_resolve(a, caches) for a in args]
                kwargs = {k: _resolve(v, caches) for k, v in kwargs.items()}
                with torch.set_grad_enabled(grad):
                    models[model_id](*args, **kwargs)
            elif kind == "cache":
                cache_id, name, args, kwargs = payload
                getattr(caches[cache_id], name)(*args, **kwargs)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - any failure ends this rank's process, which unblocks the others
        sys.stderr.write(f"hf_fastinfer tensor-parallel rank {rank} failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _resolve(value, caches: dict[int, Any]):
    if isinstance(value, _CacheRef):
        if value.blueprint is not None:
            caches[value.cache_id] = pickle.loads(value.blueprint)
        return caches[value.cache_id]
    return value


@contextlib.contextmanager
def _main_not_reimported():
    """Spawned workers run hf_fastinfer's worker function only: without this, spawn re-runs the parent's script in
    each child (a script without an ``if __name__ == "__main__"`` guard would load the model again there and fail).
    A notebook's ``__main__`` has no file, so this changes nothing there. Restored as soon as the processes start."""
    main = sys.modules.get("__main__")
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if main is not None and key in main.__dict__}
    if main is not None:
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
    try:
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


class Workers:
    """Ranks 1..N-1 started by this process (rank 0), shared by every tensor-parallel model this process loads
    (a notebook cell re-run loads the new model while the old one still exists), and the mirroring of rank 0's
    calls to them. They stop when the last of those models is deleted, or at exit."""

    _ids = itertools.count(1)
    _shared: "Workers | None" = None

    @classmethod
    def get(cls, tp_size: int, backend: str) -> "Workers":
        shared = cls._shared
        if shared is not None and not shared._closed and shared.dead():
            shared.abort()  # a worker is gone: the models on these ranks cannot run any more; start afresh
        shared = cls._shared
        if shared is not None and not shared._closed:
            if (shared.tp_size, shared.backend) == (tp_size, backend):
                return shared
            if shared.models:
                raise TensorParallelError(
                    f"hf_fastinfer tensor parallelism: this process already drives {shared.tp_size - 1} ranks "
                    f"(tp_size={shared.tp_size}, {shared.backend}) for {len(shared.models)} loaded model(s), and one "
                    f"process group can serve one size. Delete those models (or call "
                    f"hf_fastinfer.parallel.shutdown(model)) before loading with tp_size={tp_size}.")
            shared.close()
        if dist.is_initialized():
            raise TensorParallelError("hf_fastinfer tensor parallelism: this process is already in a torch.distributed "
                                      "process group that hf_fastinfer did not start; run it under torchrun instead")
        cls._shared = cls(tp_size, backend)
        return cls._shared

    def __init__(self, tp_size: int, backend: str):
        self.tp_size, self.backend = tp_size, backend
        self.port = _free_port()
        timeout_s = _timeout().total_seconds()
        context = torch.multiprocessing.get_context("spawn")
        self.processes = [context.Process(target=_worker_main, args=(rank, tp_size, self.port, backend, timeout_s),
                                          daemon=True, name=f"hf_fastinfer-tp-rank{rank}")
                          for rank in range(1, tp_size)]
        with _main_not_reimported():
            for process in self.processes:
                process.start()
        self.models: set[int] = set()
        self._dropped: list[int] = []
        self._released: list[int] = []
        self._sending = False
        self._closed = False
        try:
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{self.port}", rank=0,
                                    world_size=tp_size, timeout=_timeout())
        except Exception as exc:
            self.terminate()
            self._closed = True
            raise self.error(f"the {tp_size - 1} worker ranks did not join within {timeout_s:.0f} s") from exc
        atexit.register(self.close)

    def load(self, load: dict) -> int:
        """Tell the workers to load a model as this process is about to (they then load in step with it)."""
        model_id = next(self._ids)
        self.call("load", (model_id, load))
        self.models.add(model_id)
        return model_id

    def release(self, model_id: int) -> None:
        """A rank-0 model is gone: the workers drop their copy with the next message; the last one stops them."""
        if model_id not in self.models:
            return
        self.models.discard(model_id)
        if not self.models and not self._sending:
            self.close()
        else:
            self._released.append(model_id)

    # -- failures ------------------------------------------------------------------------------------------

    def dead(self) -> list[str]:
        out = []
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                code = process.exitcode
                how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
                out.append(f"rank {rank} (pid {process.pid}) {how}")
        return out

    def error(self, what: str) -> TensorParallelError:
        dead = self.dead()
        detail = ("; ".join(dead) + " (its error, if any, is on this process's stderr)") if dead else \
            "every worker is still running"
        return TensorParallelError(f"hf_fastinfer tensor parallelism: {what}: {detail}. This model can no longer run; "
                                   "load it again.")

    def call(self, kind: str, payload) -> None:
        if self._closed:
            raise TensorParallelError("hf_fastinfer tensor parallelism: the worker ranks of this model were shut "
                                      "down; load the model again")
        dead = self.dead()
        if dead:
            raise self.error("a worker rank is gone")
        dropped, self._dropped = self._dropped, []
        released, self._released = self._released, []
        self._sending = True  # a model freed while this message is pickled is released with the next one
        try:
            dist.broadcast_object_list([(kind, payload, dropped, released)], src=0)
        except Exception as exc:
            raise self.error(f"sending a {kind} call to the workers failed ({type(exc).__name__})") from exc
        finally:
            self._sending = False

    # -- mirroring -------------------------------------------------------------------------------------------

    def encode(self, value):
        """A KV cache becomes a reference (its twin on each worker); anything else is sent as it is."""
        from transformers.cache_utils import Cache

        if not isinstance(value, Cache):
            return value
        cache_id = getattr(value, "_hf_fastinfer_tp_id", None)
        if cache_id is not None:
            return _CacheRef(cache_id)
        if value.get_seq_length() != 0:
            raise TensorParallelError("hf_fastinfer tensor parallelism: a KV cache that already holds positions was "
                                      "passed to the model; pass a new, empty cache (or none)")
        cache_id = next(self._ids)
        blueprint = _CacheRef(cache_id, pickle.dumps(value))  # the empty cache, before its methods are mirrored
        value._hf_fastinfer_tp_id = cache_id
        for name in _MIRRORED_CACHE_METHODS:
            method = getattr(value, name, None)
            if method is not None:
                setattr(value, name, _MirroredCacheMethod(self, cache_id, name, method))
        weakref.finalize(value, self._dropped.append, cache_id)
        return blueprint

    def close(self) -> None:
        """Stop the workers and leave the process group (idempotent; also at interpreter exit)."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.dead():
                dist.broadcast_object_list([("stop", None, [], [])], src=0)
        except Exception:  # noqa: BLE001 - a worker already gone: terminate below
            pass
        for process in self.processes:
            process.join(timeout=10)
        self._end()

    def abort(self) -> None:
        """Rank 0 failed while the workers were in step with it (loading): end them without a message."""
        self._closed = True
        self.models.clear()
        self._end()

    def _end(self) -> None:
        """Terminate what is left of the workers, leave the process group, forget this group."""
        self.terminate()
        if dist.is_initialized():
            dist.destroy_process_group()
        atexit.unregister(self.close)
        if Workers._shared is self:
            Workers._shared = None

    def terminate(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)


class _MirroredCacheMethod:
    """A cache method generate calls between forwards (crop, beam reorder): run on every rank's twin too."""

    def __init__(self, workers: Workers, cache_id: int, name: str, method):
        self._workers = weakref.ref(workers)
        self.cache_id, self.name, self.method = cache_id, name, method

    def __call__(self, *args, **kwargs):
        workers = self._workers()
        if workers is not None and not workers._closed:
            workers.call("cache", (self.cache_id, self.name, args, kwargs))
        return self.method(*args, **kwargs)


class MirroredForward:
    """``model.forward`` on rank 0 in notebook mode: the call goes to every worker, then runs here."""

    def __init__(self, model: torch.nn.Module, workers: Workers, model_id: int):
        self._model = weakref.ref(model)
        self.workers = workers
        self.model_id = model_id
        self._original = type(model).forward

    def __call__(self, *args, **kwargs):
        workers = self.workers
        payload = (self.model_id, [workers.encode(a) for a in args], {k: workers.encode(v) for k, v in kwargs.items()},
                   torch.is_grad_enabled())
        workers.call("forward", payload)
        try:
            return self._original(self._model(), *args, **kwargs)
        except Exception as exc:
            if workers.dead():
                raise workers.error("a worker rank failed during the forward") from exc
            raise
