"""``python -m hf_fastinfer bench``: transformers' own path and hf_fastinfer, side by side in one process.

What it measures, for every path (a model loaded one way) and batch size:

* prefill tokens/s: prompt tokens of the whole batch over the time from the ``generate()`` call to the first new
  token (the prompt's forward pass and the first sampling step);
* decode tokens/s: new tokens of the whole batch after the first, over the time from the first new token to the
  last. Generation always runs to exactly ``--new-tokens`` (no end-of-sequence stop), greedy;
* the read roofline of decoding: the machine's read bandwidth (a 1 GiB fp32 ``sum()``, measured before every
  round) times the batch, over the bytes a decode step reads: the weights (tensors of two or more dimensions, each
  storage once) less an input embedding table that no output projection shares (a step reads one row of it).
  Reading the KV cache is left out, so the share is slightly flattering at long contexts;
* memory: the weights' bytes, the KV cache's bytes after the largest batch (as allocated, capacity included),
  and the peak memory while the path loaded and ran its untimed warm-up generations (on CPU the
  growth of the process's peak resident set over the resident set before loading; on a GPU the growth of
  ``torch.cuda.max_memory_allocated``);
* perplexity on the built-in text (pydoc topics, :mod:`hf_fastinfer.evaluation`), in windows of up to 512 tokens,
  through the path's KV cache (so ``--cache fastinfer_int8`` shows what the int8 cache costs);
* whether the path's greedy batch-1 tokens equal those of transformers' path of the same dtype.

Every round runs every path at every batch size one after the other, so drifting machine load hits all alike;
the tables give the median over rounds and the range. ``--peers`` adds what a user would pick instead inside
transformers: torchao int8 weight-only through ``TorchAoConfig`` (when torchao is installed) and transformers'
static cache with ``torch.compile``.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ._compat import output_cache

__all__ = ["BenchPath", "PathResult", "BenchReport", "plan_paths", "run_bench", "format_tables", "plot_report",
           "read_bandwidth_gbs", "weight_bytes", "decode_read_bytes", "cache_bytes", "PeakMemory", "load_measured",
           "timed_generate", "main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ---------------------------------------------------------------------------------------------------------------
# measurements


def _huge_page_ones(nbytes: int) -> torch.Tensor | None:
    """An fp32 tensor of ones in transparent huge pages (Linux, THP not off), or None."""
    import mmap

    from .injection.hugepages import thp_mode

    if thp_mode() not in ("always", "madvise"):
        return None
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=torch.float32).fill_(1.0)


def read_bandwidth_gbs(device: str = "cpu", repeats: int = 7, nbytes: int = 1 << 30) -> tuple[float, float, float]:
    """Memory read bandwidth from a large fp32 ``sum()`` on ``device``: (median, min, max) GB/s.

    On CPU the buffer is read in ordinary 4 KiB pages and, where the kernel has transparent huge pages, in huge
    pages too, and the faster of the two counts: kernel injection streams its weights from huge pages
    (``injection/hugepages.py``), which reads faster on machines whose TLB misses are dear (a VM: 21 vs 29 GB/s
    measured), so a roofline from 4 KiB pages alone would flatter it."""
    buffers = [torch.ones(nbytes // 4, dtype=torch.float32, device=device)]
    if device == "cpu":
        huge = _huge_page_ones(nbytes)
        if huge is not None:
            buffers.append(huge)
    best = None
    for x in buffers:
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        x.sum()
        sync()
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            x.sum()
            sync()
            rates.append(nbytes / (time.perf_counter() - start) / 1e9)
        result = (statistics.median(rates), min(rates), max(rates))
        best = result if best is None or result[0] > best[0] else best
    del buffers
    return best


def _storages(t: torch.Tensor):
    """The plain tensors holding ``t``'s data: ``t`` itself, or the inner tensors of a tensor subclass (torchao)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _storages(getattr(t, name))
    else:
        yield t


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors of two or more dimensions, each storage once (a tied lm_head counts once)."""
    return tensor_bytes(list(model.parameters()) + list(model.buffers()), min_dim=2)


def tensor_bytes(tensors, min_dim: int = 0) -> int:
    """Bytes of ``tensors`` with at least ``min_dim`` dimensions, each piece of storage once (tied or shared
    tensors, given several times, count once)."""
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None or tensor.dim() < min_dim:
            continue
        for inner in _storages(tensor):
            key = (inner.untyped_storage().data_ptr(), inner.storage_offset(), inner.numel())
            if key not in seen:
                seen.add(key)
                total += inner.numel() * inner.element_size()
    return total


def decode_read_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step must read: :func:`weight_bytes` less the input embedding table, of which a step reads
    one row per token, unless the output projection shares its storage (tied) and reads it all."""
    total = weight_bytes(model)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    table = getattr(embedding, "weight", None)
    if table is None or table.dim() < 2:
        return total
    out_weight = getattr(output, "weight", None)
    if out_weight is not None and out_weight.untyped_storage().data_ptr() == table.untyped_storage().data_ptr():
        return total
    return total - sum(t.numel() * t.element_size() for t in _storages(table))


def cache_bytes(cache: Any) -> int:
    """Bytes a KV cache has allocated (capacity included): every tensor its layers hold, each storage once."""
    seen, total = set(), 0
    for layer in getattr(cache, "layers", None) or []:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.numel():
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def _rss_bytes(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory growth inside a ``with`` block, in bytes (``.peak``).

    CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident set at
    entry; where that reset is not allowed, a thread samples the resident set every 2 ms. Freed heap is handed
    back to the system first, so memory an earlier path released is not reused unseen. GPU:
    ``torch.cuda.max_memory_allocated`` minus the allocated bytes at entry.
    """

    def __init__(self, device: str = "cpu"):
        self.cuda = str(device).startswith("cuda")
        self.peak = 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        from .quant._pages import release_free_heap

        release_free_heap()
        self._base = _rss_bytes("VmRSS") or 0
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self._hwm = True
        except OSError:
            self._hwm = False
            self._sampled = self._base
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, _rss_bytes("VmRSS") or 0)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        elif self._hwm:
            self.peak = (_rss_bytes("VmHWM") or 0) - self._base
        else:
            self._stop.set()
            self._sampler.join()
            self.peak = self._sampled - self._base
        self.peak = max(self.peak, 0)


# ---------------------------------------------------------------------------------------------------------------
# paths


@dataclass
class BenchPath:
    """One way of loading and running the model."""

    label: str  # e.g. "transformers fp32", "hf_fastinfer fp32 int8"
    family: str  # "transformers", "hf_fastinfer" or "peer"
    dtype: torch.dtype
    baseline: str  # the transformers path (same dtype) its speed and tokens are compared with
    load_kwargs: Callable[[], dict]  # from_pretrained keywords, built when loading (peers import optional packages)
    generate_kwargs: dict = field(default_factory=dict)
    needs: str | None = None  # the package a peer needs, named when it is missing


def _bits_label(bits) -> str:
    return "kernels" if bits is None else f"int{bits}"


def plan_paths(dtypes: list[str], bits: list, cache: str | list[str] = "fastinfer", tp_size: int = 1,
               peers: bool = False, device: str = "cpu", baseline: bool = True) -> list[BenchPath]:
    """The paths to run: per dtype, transformers' own path, hf_fastinfer at each of ``bits`` with each of
    ``cache`` (the int8 KV cache is labelled "kv-int8"), and the peers.

    Every FastInferConfig is built here, before anything loads, so a bad combination fails at once.
    """
    from . import CACHE_IMPLEMENTATIONS, FastInferConfig

    caches = [cache] if isinstance(cache, str) else list(cache)
    for cache_name in caches:
        if cache_name not in CACHE_IMPLEMENTATIONS:
            raise ValueError(f"--cache must be one of {CACHE_IMPLEMENTATIONS}, got {cache_name!r}")
    paths = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        short = SHORT_DTYPE[dtype]
        base = f"transformers {short}"
        if baseline:
            paths.append(BenchPath(base, "transformers", dtype, base,
                                   lambda dtype=dtype: dict(dtype=dtype, attn_implementation="sdpa")))
        for b in bits:
            config = FastInferConfig(bits=b, tp_size=tp_size)  # validates bits (and tp) now
            for cache_name in caches:
                label = (f"hf_fastinfer {short}" + ("" if b is None else f" {_bits_label(b)}")
                         + (" kv-int8" if cache_name == "fastinfer_int8" else "")
                         + (f" tp={tp_size}" if tp_size > 1 else ""))
                paths.append(BenchPath(
                    label, "hf_fastinfer", dtype, base,
                    lambda dtype=dtype, config=config: dict(dtype=dtype, attn_implementation="fastinfer",
                                                            quantization_config=config),
                    dict(cache_implementation=cache_name)))
        if peers:
            def torchao_kwargs(dtype=dtype):
                from torchao.quantization import Int8WeightOnlyConfig
                from transformers import TorchAoConfig

                return dict(dtype=dtype, attn_implementation="sdpa",
                            quantization_config=TorchAoConfig(quant_type=Int8WeightOnlyConfig()))

            paths.append(BenchPath(f"torchao int8 {short}", "peer", dtype, base, torchao_kwargs, needs="torchao"))
            from transformers.generation.configuration_utils import CompileConfig

            compile_config = CompileConfig()
            if not str(device).startswith("cuda"):
                # transformers compiles generate() with a static cache on GPUs only unless told otherwise
                compile_config._compile_all_devices = True
            paths.append(BenchPath(
                f"transformers {short} static+compile", "peer", dtype, base,
                lambda dtype=dtype: dict(dtype=dtype, attn_implementation="sdpa"),
                dict(cache_implementation="static", compile_config=compile_config)))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# running


class _Clock:
    """A streamer that records when each new token arrives (generate() first hands over the prompt)."""

    def __init__(self, forward=None):
        self.times: list[float] = []
        self._prompt_seen = False
        self.forward = forward

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True
        if self.forward is not None:
            self.forward.put(value)

    def end(self) -> None:
        if self.forward is not None:
            self.forward.end()


def timed_generate(model, inputs: dict, new_tokens: int, generate_kwargs: dict, streamer=None,
                   return_cache: bool = False, stop_at_eos: bool = False):
    """One greedy generation of exactly ``new_tokens`` tokens per row (at most, with ``stop_at_eos``).

    Returns ``(prefill tok/s, decode tok/s, new tokens [B, n], the cache or None)``.
    """
    if new_tokens < 2:
        raise ValueError("timing decode needs at least 2 new tokens")
    clock = _Clock(streamer)
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, streamer=clock,
                  return_dict_in_generate=return_cache, **generate_kwargs)
    if not stop_at_eos:
        kwargs["eos_token_id"] = None
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)
    sequences = out.sequences if return_cache else out
    batch, prompt = inputs["input_ids"].shape
    tokens = sequences[:, prompt:]
    steps = len(clock.times)
    if steps < 2 or (not stop_at_eos and steps != new_tokens):
        raise RuntimeError(f"generate() returned {steps} new tokens, not {new_tokens}: decoding cannot be timed "
                           "(with a chat prompt: raise the token limit or change the prompt)")
    prefill = batch * prompt / (clock.times[0] - start)
    decode = batch * (steps - 1) / (clock.times[-1] - clock.times[0])
    return prefill, decode, tokens.cpu(), (output_cache(out) if return_cache else None)


@dataclass
class PathResult:
    label: str
    family: str
    dtype: str
    baseline: str
    load_s: float = 0.0
    peak_bytes: int = 0
    weight_bytes: int = 0
    read_bytes: int = 0  # what one decode step reads (the roofline's denominator)
    kv_bytes: int = 0  # after the largest batch
    prefill: dict[int, list[float]] = field(default_factory=dict)  # batch -> tokens/s per round
    decode: dict[int, list[float]] = field(default_factory=dict)
    perplexity: float | None = None
    same_tokens: bool | None = None  # batch-1 greedy tokens equal to the baseline's (None for the baseline)
    skipped: str | None = None  # why a peer did not run

    def median(self, what: str, batch: int) -> float:
        return statistics.median(getattr(self, what)[batch])

    def spread(self, what: str, batch: int) -> tuple[float, float]:
        values = getattr(self, what)[batch]
        return min(values), max(values)


@dataclass
class BenchReport:
    model: str
    device: str
    machine: str
    threads: int
    prompt_tokens: int
    new_tokens: int
    batches: list[int]
    repeats: int
    bandwidth_gbs: list[float]  # one per round
    results: list[PathResult]
    command: str = ""

    @property
    def bandwidth(self) -> float:
        return statistics.median(self.bandwidth_gbs)

    def result(self, label: str) -> PathResult | None:
        return next((r for r in self.results if r.label == label), None)

    def roofline(self, result: PathResult, batch: int) -> float:
        """Decode tokens/s if every step only read the weights once at the measured bandwidth."""
        return batch * self.bandwidth * 1e9 / result.read_bytes

    def to_json(self) -> dict:
        data = asdict(self)
        data["bandwidth_median_gbs"] = self.bandwidth
        for entry, result in zip(data["results"], self.results):
            if result.skipped:
                continue
            entry["summary"] = {
                str(b): {
                    "prefill_tps_median": result.median("prefill", b),
                    "decode_tps_median": result.median("decode", b),
                    "decode_roofline_tps": self.roofline(result, b),
                    "decode_share_of_roofline": result.median("decode", b) / self.roofline(result, b),
                }
                for b in self.batches
            }
        return data


def machine_description(device: str) -> str:
    import transformers

    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        fields: dict[str, str] = {}
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
        except OSError:
            pass
        name = fields.get("model name", name)
        if "cpu family" in fields:  # "AMD EPYC" alone names several generations
            name += f", family {fields['cpu family']} model {fields.get('model', '?')}"
        from .kernels._cpu_ext import cpu_extension

        ext = cpu_extension()
        road = f", {ext.simd_road()} kernels" if ext is not None else ", portable PyTorch kernels"
        name = f"CPU ({name}), {torch.get_num_threads()} threads{road}"
    return f"{name}; torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"


def _prompts(ids: torch.Tensor, batch: int, length: int, device: str) -> dict:
    """``batch`` different prompts of ``length`` tokens: consecutive slices of the built-in text."""
    rows = ids[0, : batch * length].view(batch, length).to(device)
    return {"input_ids": rows, "attention_mask": torch.ones_like(rows)}


def _cache_factory(model, path: BenchPath, window: int):
    """Perplexity runs through the path's own hf_fastinfer cache (the int8 one changes the numbers)."""
    from . import CACHE_IMPLEMENTATIONS, build_cache

    name = path.generate_kwargs.get("cache_implementation")
    if name not in CACHE_IMPLEMENTATIONS:
        return None
    return lambda: build_cache(name, config=model.config, max_cache_len=window)


def load_measured(model_path: str | Path, load_kwargs: dict, device: str,
                  warm_up: Callable[[torch.nn.Module], None]) -> tuple[torch.nn.Module, float, int]:
    """``from_pretrained`` then ``warm_up(model)``, with transformers' loading bars and warnings silenced (they
    would break the caller's own output) and peak memory measured around both (:class:`PeakMemory`).

    Returns (the model in eval mode, loading seconds, peak memory growth in bytes)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(str(model_path), device_map=device, **load_kwargs).eval()
            seconds = time.perf_counter() - start
            warm_up(model)
    finally:
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
    return model, seconds, memory.peak


def run_bench(
    paths: list[BenchPath],
    model_path: str | Path,
    *,
    device: str = "cpu",
    batches: list[int] = (1, 8),
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    perplexity_tokens: int = 1024,
    progress: bool = True,
    command: str = "",
) -> BenchReport:
    """Load every path, then time them round by round; see the module docstring for what is measured."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from . import evaluation

    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    if prompt_tokens < 1:
        raise ValueError("the prompt needs at least one token")
    batches = sorted(set(batches))
    if not batches or batches[0] < 1:
        raise ValueError(f"batch sizes must be positive, got {batches}")
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    text_ids = evaluation.reference_tokens(tokenizer, max(perplexity_tokens, prompt_tokens * batches[-1]))

    steps = len(paths) * (1 + (perplexity_tokens > 0)) + repeats * len(paths) * len(batches)
    bar = tqdm(total=steps, desc="bench", unit="step", disable=not progress, file=sys.stderr)
    models: dict[str, torch.nn.Module] = {}
    results: list[PathResult] = []

    def warm_up(model):
        # one untimed generation per batch size, of the timed length: compilation (shapes and cache sizes are
        # those of the timed runs), allocator growth, lazy set-up
        for batch in reversed(batches):
            timed_generate(model, _prompts(text_ids, batch, prompt_tokens, device), new_tokens, path.generate_kwargs)

    try:
        for path in paths:
            result = PathResult(path.label, path.family, SHORT_DTYPE[path.dtype], path.baseline)
            results.append(result)
            bar.set_postfix_str(f"loading and warming up {path.label}")
            if path.needs:
                try:
                    __import__(path.needs)
                except ImportError:
                    result.skipped = f"{path.needs} is not installed (pip install {path.needs})"
                    bar.update(1 + (perplexity_tokens > 0))
                    continue
            model, result.load_s, result.peak_bytes = load_measured(model_path, path.load_kwargs(), device, warm_up)
            bar.update()
            result.weight_bytes = weight_bytes(model)
            result.read_bytes = decode_read_bytes(model)
            models[path.label] = model
            if perplexity_tokens > 0:
                bar.set_postfix_str(f"perplexity {path.label}")
                ids = text_ids[:, :perplexity_tokens].to(device)
                window = min(512, perplexity_tokens)
                result.perplexity = evaluation.perplexity(model, ids, window=window, progress=False,
                                                          cache_factory=_cache_factory(model, path, window))
                bar.update()

        bandwidths = []
        tokens: dict[str, torch.Tensor] = {}
        for round_index in range(repeats):
            bar.set_postfix_str(f"round {round_index + 1}: read bandwidth")
            bandwidths.append(read_bandwidth_gbs(device)[0])
            for batch in batches:
                inputs = _prompts(text_ids, batch, prompt_tokens, device)
                last = round_index == repeats - 1 and batch == batches[-1]
                for path, result in zip(paths, results):
                    if result.skipped:
                        continue
                    bar.set_postfix_str(f"round {round_index + 1}: {path.label}, batch {batch}")
                    prefill, decode, new, cache = timed_generate(models[path.label], inputs, new_tokens,
                                                                 path.generate_kwargs, return_cache=last)
                    result.prefill.setdefault(batch, []).append(prefill)
                    result.decode.setdefault(batch, []).append(decode)
                    if batch == 1:
                        tokens[path.label] = new
                    if last:
                        result.kv_bytes = cache_bytes(cache)
                    del cache
                    bar.update()
    finally:
        bar.close()
    for result in results:
        base = tokens.get(result.baseline)
        if result.label != result.baseline and base is not None and result.label in tokens:
            result.same_tokens = bool(torch.equal(tokens[result.label], base))
    return BenchReport(
        model=str(model_path), device=str(device), machine=machine_description(device),
        threads=torch.get_num_threads(), prompt_tokens=prompt_tokens, new_tokens=new_tokens, batches=batches,
        repeats=repeats, bandwidth_gbs=bandwidths, results=results, command=command,
    )


# ---------------------------------------------------------------------------------------------------------------
# output


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f}"


def format_tables(report: BenchReport) -> str:
    """The report as two markdown tables (speed per batch; memory and quality per path) with a header line."""
    lo, hi = min(report.bandwidth_gbs), max(report.bandwidth_gbs)
    lines = [
        f"Model: {report.model}. Machine: {report.machine}.",
        f"Read bandwidth {report.bandwidth:.1f} GB/s (rounds {lo:.1f}-{hi:.1f}); {report.prompt_tokens}-token "
        f"prompts, {report.new_tokens} new tokens, greedy; {report.repeats} rounds, median (min-max).",
        "",
        "| path | batch | prefill tok/s | decode tok/s | decode roofline tok/s | share of roofline | "
        "decode vs transformers |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for batch in report.batches:
        for r in report.results:
            if r.skipped:
                continue
            base = report.result(r.baseline)
            p, d = r.median("prefill", batch), r.median("decode", batch)
            roof = report.roofline(r, batch)
            versus = "" if r.label == r.baseline or base is None or base.skipped else \
                f"{d / base.median('decode', batch):.2f}x"
            lines.append(
                f"| {r.label} | {batch} | {p:.0f} ({r.spread('prefill', batch)[0]:.0f}-"
                f"{r.spread('prefill', batch)[1]:.0f}) | {d:.1f} ({r.spread('decode', batch)[0]:.1f}-"
                f"{r.spread('decode', batch)[1]:.1f}) | {roof:.0f} | {d / roof:.0%} | {versus} |")
    lines += [
        "",
        f"| path | weights MB | KV cache MB (batch {report.batches[-1]}) | peak memory MB | load s | perplexity | "
        "same tokens as transformers |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in report.results:
        if r.skipped:
            lines.append(f"| {r.label} | skipped: {r.skipped} | | | | | |")
            continue
        ppl = "" if r.perplexity is None else f"{r.perplexity:.3f}"
        same = "" if r.same_tokens is None else ("yes" if r.same_tokens else "no")
        lines.append(f"| {r.label} | {_mb(r.weight_bytes)} | {_mb(r.kv_bytes)} | {_mb(r.peak_bytes)} | "
                     f"{r.load_s:.1f} | {ppl} | {same} |")
    return "\n".join(lines)


#: colours per family, light to dark: transformers grey, hf_fastinfer blue, peers green
_PALETTE = {
    "transformers": ["#969696", "#636363", "#bdbdbd"],
    "hf_fastinfer": ["#6baed6", "#3182bd", "#08519c", "#9ecae1", "#c6dbef"],
    "peer": ["#74c476", "#31a354", "#006d2c", "#a1d99b"],
}


def _colors(results: list[PathResult]) -> list[str]:
    seen: dict[str, int] = {}
    colors = []
    for r in results:
        index = seen.get(r.family, 0)
        seen[r.family] = index + 1
        palette = _PALETTE[r.family]
        colors.append(palette[index % len(palette)])
    return colors


def plot_report(report: BenchReport, filename: str | Path) -> Path:
    """A PNG: decode and prefill tokens/s per path and batch (median bars, min-max whiskers, the decode read
    roofline as a red tick), and weights / KV cache / peak memory per path. Needs matplotlib."""
    try:
        # the Figure API draws off-screen without pyplot: no backend is chosen or changed (notebooks keep theirs)
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as error:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from error

    done = [r for r in report.results if not r.skipped]
    colors = _colors(done)
    fig = Figure(figsize=(max(11.0, 1.3 * len(done) * len(report.batches) + 3), 9.5), layout="constrained")
    axes = fig.subplot_mosaic([["decode", "prefill"], ["memory", "memory"]], height_ratios=[1.25, 1])
    width = 0.8 / len(done)
    for what, title in (("decode", "Decode"), ("prefill", "Prefill")):
        ax = axes[what]
        # the y range fits the bars; a roofline far above them (int4 at batch 8) is drawn as an arrow at the top
        # with its value, so it does not flatten every bar
        top = 1.3 * max(r.spread(what, b)[1] for r in done for b in report.batches)
        for i, (r, color) in enumerate(zip(done, colors)):
            xs = [b + (i - (len(done) - 1) / 2) * width for b in range(len(report.batches))]
            med = [r.median(what, b) for b in report.batches]
            low = [m - r.spread(what, b)[0] for m, b in zip(med, report.batches)]
            high = [r.spread(what, b)[1] - m for m, b in zip(med, report.batches)]
            ax.bar(xs, med, width * 0.92, yerr=[low, high], capsize=2, color=color, edgecolor="black",
                   linewidth=0.5, hatch="//" if r.family == "peer" else None, label=r.label)
            if what == "decode":
                roofs = [report.roofline(r, b) for b in report.batches]
                inside = [(x, roof) for x, roof in zip(xs, roofs) if roof <= top]
                if inside:
                    ax.scatter(*zip(*inside), marker="_", s=260, linewidths=2, color="red", zorder=3)
                for x, roof in zip(xs, roofs):
                    if roof > top:
                        ax.scatter([x], [top * 0.97], marker="^", s=40, color="red", zorder=3)
                        ax.annotate(f"{roof:.0f}", (x, top * 0.97), ha="center", va="top", fontsize=7,
                                    color="red", xytext=(0, -5), textcoords="offset points")
            for x, m, h in zip(xs, med, high):
                ax.annotate(f"{m:.0f}", (x, m + h), ha="center", va="bottom", fontsize=7, xytext=(0, 1),
                            textcoords="offset points")
        ax.set_ylim(0, top)
        ax.set_xticks(range(len(report.batches)), [f"batch {b}" for b in report.batches])
        ax.set_ylabel(f"{what} tokens/s (all rows of the batch)")
        ax.set_title(f"{title}: median of {report.repeats} rounds, whiskers min-max"
                     + ("\nred tick: read roofline (arrow: off the scale, value below it)" if what == "decode" else ""),
                     fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    ax = axes["memory"]
    xs = list(range(len(done)))
    weights = [r.weight_bytes / 2**20 for r in done]
    ax.bar([x - 0.2 for x in xs], weights, 0.4, color=colors, edgecolor="black", linewidth=0.5)
    ax.bar([x - 0.2 for x in xs], [r.kv_bytes / 2**20 for r in done], 0.4, bottom=weights, color="#fd8d3c",
           edgecolor="black", linewidth=0.5)
    ax.bar([x + 0.2 for x in xs], [r.peak_bytes / 2**20 for r in done], 0.4, color="white", edgecolor="black",
           hatch="..", linewidth=0.5)
    for x, r in zip(xs, done):
        ax.annotate(f"{(r.weight_bytes + r.kv_bytes) / 2**20:.0f}", (x - 0.2, (r.weight_bytes + r.kv_bytes) / 2**20),
                    ha="center", va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
        ax.annotate(f"{r.peak_bytes / 2**20:.0f}", (x + 0.2, r.peak_bytes / 2**20), ha="center", va="bottom",
                    fontsize=7, xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(xs, [r.label for r in done], fontsize=8)
    ax.set_ylabel("memory (MiB)")
    ax.set_title(f"Memory: weights + KV cache at batch {report.batches[-1]} (left bar), peak while loading and "
                 "running (right bar)", fontsize=10)
    ax.add_artist(ax.legend(handles=[  # kept as an artist: the paths' legend below is the axes' own
        Line2D([], [], color="#fd8d3c", lw=8, label=f"KV cache (batch {report.batches[-1]})"),
        Line2D([], [], color="white", marker="s", markersize=10, markeredgecolor="black", lw=0,
               label="peak (growth of the process)")], fontsize=8, loc="upper right"))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    # the paths' legend goes above the memory bars (headroom made for it), clear of every speed bar and arrow
    handles, labels = axes["decode"].get_legend_handles_labels()
    ax.set_ylim(0, 1.45 * max(max(r.peak_bytes, r.weight_bytes + r.kv_bytes) for r in done) / 2**20)
    ax.legend(handles, labels, fontsize=8, loc="upper left", ncols=min(3, len(done)))
    fig.suptitle(f"hf_fastinfer bench: {Path(report.model).name} on {report.device}, {report.prompt_tokens}-token "
                 f"prompts, {report.new_tokens} new tokens\n{report.machine}; read bandwidth "
                 f"{report.bandwidth:.1f} GB/s", fontsize=10)
    filename = Path(filename)
    fig.savefig(filename, dpi=110)
    return filename


# ---------------------------------------------------------------------------------------------------------------
# command line


def _list(kind: Callable[[str], Any], choices: tuple | None = None):
    def parse(text: str):
        values = []
        for item in text.split(","):
            item = item.strip()
            try:
                value = kind(item)
            except ValueError as error:
                raise ValueError(f"{item!r}: {error}") from None
            if choices is not None and value not in choices:
                raise ValueError(f"{item!r} is not one of {', '.join(map(str, choices))}")
            values.append(value)
        return values
    return parse


def _bits(item: str):
    if item.lower() in ("none", "float", "kernels"):
        return None
    return int(item)


def add_arguments(parser) -> None:
    import argparse

    def checked(parse):
        def wrapper(text):
            try:
                return parse(text)
            except ValueError as error:
                raise argparse.ArgumentTypeError(str(error)) from None
        return wrapper

    parser.add_argument("--model", default=None,
                        help="a local model folder (config, weights, tokenizer); default: SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", type=checked(_list(str, tuple(DTYPES))), default=None,
                        help="comma-separated activation dtypes: float32, bfloat16, float16 "
                             "(default: float32 on CPU, bfloat16 on a GPU)")
    parser.add_argument("--bits", type=checked(_list(_bits, (None, 8, 4))), default=[None, 8, 4],
                        help="comma-separated hf_fastinfer weight bits: none (kernel injection only), 8, 4 "
                             "(default: none,8,4)")
    parser.add_argument("--cache", type=checked(_list(str, ("fastinfer", "fastinfer_int8"))), default=["fastinfer"],
                        help="comma-separated hf_fastinfer KV caches: fastinfer, fastinfer_int8 (default: fastinfer)")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel degree of the hf_fastinfer paths: this process drives N-1 more ranks "
                             "(default: 1)")
    parser.add_argument("--batch", type=checked(_list(int)), default=[1, 8],
                        help="comma-separated batch sizes (default: 1,8)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; tables give medians (default: %(default)s)")
    parser.add_argument("--perplexity-tokens", type=int, default=1024,
                        help="tokens of built-in text for perplexity (default: %(default)s)")
    parser.add_argument("--no-perplexity", action="store_true", help="skip perplexity")
    parser.add_argument("--peers", action="store_true",
                        help="also time torchao int8 weight-only (TorchAoConfig) and transformers' static cache "
                             "with torch.compile")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write every measurement as JSON")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="draw the results as a PNG (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _tp_error(model_path: Path, tp_size: int) -> str | None:
    """Why ``tp_size`` cannot split the model (from its config, before anything loads), or None."""
    from transformers import AutoConfig

    from .parallel import check_tp_size

    config = AutoConfig.from_pretrained(model_path).get_text_config(decoder=True)
    heads = config.num_attention_heads
    widths = (config.intermediate_size,) if getattr(config, "intermediate_size", None) else ()
    try:
        check_tp_size(tp_size, heads, getattr(config, "num_key_value_heads", None) or heads, widths,
                      model_path.name)
    except ValueError as error:
        return str(error)
    return None


def main(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {device}: this machine has no CUDA device torch can use", file=sys.stderr)
        return 2
    for name, value, least in (("--new-tokens", args.new_tokens, 2), ("--repeats", args.repeats, 1),
                               ("--prompt-tokens", args.prompt_tokens, 1), ("--tp", args.tp, 1)):
        if value < least:
            print(f"{name} must be at least {least}", file=sys.stderr)
            return 2
    if any(b < 1 for b in args.batch):
        print("--batch sizes must be positive", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtype or (["bfloat16"] if device.startswith("cuda") else ["float32"])
    try:
        paths = plan_paths(dtypes, args.bits, args.cache, args.tp, args.peers, device)
    except (NotImplementedError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("--plot needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 2
    from . import models

    model_path = Path(args.model) if args.model else models.default_model_path(progress=not args.no_progress)
    if not (model_path / "config.json").is_file():
        print(f"--model {model_path}: not a model folder (no config.json there)", file=sys.stderr)
        return 2
    if args.tp > 1:
        error = _tp_error(model_path, args.tp)
        if error:
            print(f"error: --tp {args.tp}: {error}", file=sys.stderr)
            return 2
    report = run_bench(
        paths, model_path, device=device, batches=args.batch, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, repeats=args.repeats,
        perplexity_tokens=0 if args.no_perplexity else args.perplexity_tokens, progress=not args.no_progress,
        command="python -m hf_fastinfer bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else []),
    )
    print(format_tables(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1))
        print(f"\nwrote {args.json}")
    if args.plot:
        print(f"wrote {plot_report(report, args.plot)}")
    return 0

