"""README.md and docs/: every code block runs as written, every feature has its page, every link resolves.

Python blocks of one file run in order in one fresh interpreter (a page reads top to bottom, as a notebook
does), in an empty working directory. A block preceded by ``<!-- not run: REASON -->`` is skipped, and the
reason must be given. Bash blocks: ``python -m hf_fastinfer ...`` lines run with this interpreter; the README's
set-up commands are checked against .ci/run, which runs them on a clean clone (see
test_readme_setup_commands_are_the_ones_ci_runs).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FEATURE_PAGES = ["attention", "caches", "quantization", "kernel_injection", "tensor_parallel", "kernels", "bench"]
_BLOCK = re.compile(r"(?:<!-- not run: (?P<reason>[^>]*?) -->\s*\n)?^```(?P<lang>[a-z]*)\n(?P<code>.*?)^```", re.S | re.M)


def blocks(page: Path, lang: str) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason) of the ``lang`` blocks of a page."""
    text = page.read_text()
    found = []
    for match in _BLOCK.finditer(text):
        if match["lang"] == lang:
            found.append((text[: match.start("code")].count("\n") + 1, match["code"], match["reason"]))
    return found


def _env():
    return dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")


_RUNNER = """
import json, sys, traceback
blocks = json.loads(sys.argv[1])
namespace = {"__name__": "__main__"}
for line, code in blocks:
    print(f"--- block at line {line}", flush=True)
    try:
        exec(compile(code, f"{sys.argv[2]}:{line}", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"the block at {sys.argv[2]}:{line} failed")
"""


def _python_pages():
    return [p for p in PAGES if blocks(p, "python")]


@pytest.mark.slow
@pytest.mark.parametrize("page", _python_pages(), ids=lambda p: p.name)
def test_python_blocks_run_as_written(page, tmp_path):
    from hf_fastinfer import models

    models.default_model_path()  # convert once, outside the timed run
    runnable = [(line, code) for line, code, reason in blocks(page, "python") if reason is None]
    for line, _, reason in blocks(page, "python"):
        assert reason is None or reason.strip(), f"{page.name}:{line}: a skipped block needs its reason"
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(runnable), page.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900, env=_env())
    assert proc.returncode == 0, (proc.stdout[-3000:] + proc.stderr[-5000:])


def _bash_commands(page: Path) -> list[tuple[int, str]]:
    commands = []
    for line, code, reason in blocks(page, "bash"):
        if reason is not None:
            continue
        for offset, command in enumerate(code.splitlines()):
            if command.strip() and not command.lstrip().startswith("#"):
                commands.append((line + offset, command.strip()))
    return commands


def _setup(command: str) -> bool:
    return command.startswith("python3 -m venv .venv")


def test_every_bash_command_is_of_a_kind_this_test_runs():
    for page in PAGES:
        for line, command in _bash_commands(page):
            assert _setup(command) or command.startswith("python -m hf_fastinfer "), (
                f"{page.name}:{line}: {command!r} is neither a set-up command nor `python -m hf_fastinfer ...`; "
                "add it to this test or mark the block <!-- not run: REASON -->")


def test_readme_setup_commands_are_the_ones_ci_runs():
    setup = [c for _, c in _bash_commands(ROOT / "README.md") if _setup(c)]
    assert len(setup) == 2, setup
    demo, tests = setup
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "README's test command must be the line .ci/run runs"
    assert tests.endswith("&& .venv/bin/pytest")
    # the demo command installs a subset of what CI installs, then runs the demo (test_cli runs it)
    assert demo.endswith("&& .venv/bin/python -m hf_fastinfer demo")
    install = demo.rsplit(" && ", 1)[0]
    assert install == tests.rsplit(" && ", 1)[0].replace('-e ".[test]"', "-e ."), (install, tests)


def _module_commands():
    found = []
    for page in PAGES:
        for line, command in _bash_commands(page):
            if command.startswith("python -m hf_fastinfer "):
                found.append(pytest.param(command, id=f"{page.name}:{line}"))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("command", _module_commands())
def test_module_commands_run_as_written(command, tmp_path):
    argv = [sys.executable] + shlex.split(command)[1:]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for option in ("--plot", "--json"):
        if option in argv:
            assert (tmp_path / argv[argv.index(option) + 1]).stat().st_size > 0


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m[1]) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


def test_every_feature_has_a_page_that_opens_with_its_flag_and_links_its_numbers():
    for name in FEATURE_PAGES:
        page = ROOT / "docs" / f"{name}.md"
        assert page.is_file(), f"docs/{name}.md is missing"
        text = page.read_text()
        title = text.splitlines()[0]
        assert title.startswith("# ") and "`" in title, f"{page.name}: the title names the flag: {title!r}"
        for section in ("## Limits", "## Numbers"):
            assert section in text, f"{page.name} has no {section!r} section"
        numbers = text.split("## Numbers", 1)[-1]
        assert "BENCHMARKS.md" in numbers, f"{page.name}: the numbers section links BENCHMARKS.md"


def test_relative_links_and_anchors_resolve():
    for page in PAGES + [ROOT / "docs" / "ARCHITECTURE.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.exists(), f"{page.name}: link to {target!r}: no such file"
            if anchor:
                assert anchor in _anchors(path), f"{page.name}: link to {target!r}: no such heading in {path.name}"


def test_readme_results_quote_the_latest_bench_tables():
    readme = (ROOT / "README.md").read_text()
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    section = benchmarks[benchmarks.index("<!-- bench:start -->"): benchmarks.index("<!-- bench:end -->")]
    assert "python -m hf_fastinfer bench" in section
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(rows) > 8
    results = readme[readme.index("## Results"):]
    results = results[: results.index("\n## ", 1)]
    assert [line for line in results.splitlines() if line.startswith("| ")] == rows, \
        "README's results section must quote BENCHMARKS.md's bench tables as they are"
    assert "BENCHMARKS.md#bench-transformers-and-hf_fastinfer-side-by-side" in results
