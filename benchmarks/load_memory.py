"""Peak resident memory of ``from_pretrained`` with MoQ, in a fresh process (run this file directly).

    python benchmarks/load_memory.py --bits 4 [--injection off] [--path FOLDER]

Prints one JSON line: RSS just before ``from_pretrained``, the peak during it (VmHWM, the kernel's own
high-water mark, which also catches spikes between samples, and a 2 ms sampler for the anonymous part),
the loaded model's bytes (parameters and buffers) and the largest float tensor it holds.
"""

from __future__ import annotations

import argparse
import json
import threading
import time


def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="4", help="8, 4 or none (float)")
    parser.add_argument("--injection", default="on", choices=("on", "off", "none"),
                        help="kernel injection at load (FastInferConfig(kernel_injection=...)); none: no "
                             "quantization_config at all (transformers' own loading, float only)")
    parser.add_argument("--path", default=None, help="model folder (default: the default model's safetensors)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    import hf_fastinfer
    from hf_fastinfer import FastInferConfig, models
    from hf_fastinfer.injection import is_injected

    path = args.path or str(models.default_model_path(progress=False))
    bits = None if args.bits == "none" else int(args.bits)
    kwargs = {} if args.injection == "none" else {
        "quantization_config": FastInferConfig(bits=bits, kernel_injection=args.injection == "on")}


    peak_anon = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status()["RssAnon"])
            time.sleep(0.002)

    before = _status()
    # VmHWM is the process's peak so far: the growth below is only meaningful if loading sets a new peak
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    after = _status()
    tensors = list(model.parameters()) + list(model.buffers())
    print(json.dumps({
        "bits": args.bits,
        "injection": args.injection,
        "seconds": seconds,
        "rss_before": before["VmRSS"],
        "hwm_before": before["VmHWM"],
        "peak_rss": after["VmHWM"],
        "peak_growth": after["VmHWM"] - before["VmRSS"],
        "anon_growth": peak_anon[0] - before["RssAnon"],
        "model_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "largest_float_tensor": max(t.numel() * t.element_size() for t in tensors if t.is_floating_point()),
        "injected": is_injected(model),
        "report": hf_fastinfer.report(model).summary() if bits is not None else "",
    }))


if __name__ == "__main__":
    main()
