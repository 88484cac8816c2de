"""`import hf_fastinfer` must not initialise CUDA, change torch/compiler settings or the environment, and must
not install a top-level `kernels` module."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

SNAPSHOT = """
import json, os, torch, torch._dynamo.config, torch._inductor.config

def snapshot():
    return {
        "cuda_initialized": torch.cuda.is_initialized(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "default_dtype": str(torch.get_default_dtype()),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "grad_enabled": torch.is_grad_enabled(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "dynamo": repr(sorted(torch._dynamo.config.get_config_copy().items(), key=lambda kv: kv[0])),
        "inductor": repr(sorted(torch._inductor.config.get_config_copy().items(), key=lambda kv: kv[0])),
        "environ": dict(os.environ),
    }
"""


def test_import_changes_no_global_setting():
    code = SNAPSHOT + textwrap.dedent(
        """
        import transformers
        before = snapshot()
        import hf_fastinfer
        after = snapshot()
        changed = sorted(k for k in before if before[k] != after[k])
        print(json.dumps({"changed": changed, "cuda_initialized": after["cuda_initialized"]}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"changed": [], "cuda_initialized": False}


def test_kernels_installs_under_the_package_not_top_level():
    import importlib.util

    import hf_fastinfer.kernels

    repo_kernels = Path(__file__).resolve().parents[1] / "kernels"
    installed = Path(hf_fastinfer.kernels.__file__)
    assert installed.read_text() == (repo_kernels / "__init__.py").read_text()
    top_level = importlib.util.find_spec("kernels")
    # Either Hugging Face's `kernels` library or nothing: never our folder.
    if top_level is not None and top_level.origin:
        assert Path(top_level.origin).read_bytes() != installed.read_bytes()


def test_python_started_in_the_repository_root_still_gets_the_kernels_library():
    # There sys.path starts with the root, whose kernels/ folder comes before the installed packages. Imported
    # under the top-level name it hands over to Hugging Face's `kernels` library (which transformers >= 5.25
    # depends on and imports); with none installed it stays an empty module, which transformers reads as none.
    root = Path(__file__).resolve().parents[1]
    code = textwrap.dedent("""
        import importlib.metadata, json, os
        try:
            importlib.metadata.version("kernels")
            library = True
        except importlib.metadata.PackageNotFoundError:
            library = False
        import kernels
        where = os.path.abspath(kernels.__file__)
        import transformers.modeling_utils  # (transformers >= 5.25 imports the library here)
        import hf_fastinfer.kernels
        print(json.dumps({"library": library, "where": where, "ours": os.path.abspath(hf_fastinfer.kernels.__file__)}))
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    if got["library"]:
        assert got["where"] != got["ours"] and not got["where"].startswith(str(root / "kernels"))
    else:
        assert got["where"] == str(root / "kernels" / "__init__.py")


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    """A regular (non-editable) build puts kernels/ under hf_fastinfer/ and nothing at the top level but
    the package and its metadata."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(repo)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (wheel,) = tmp_path.glob("hf_fastinfer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_fastinfer/kernels/__init__.py" in names
    # the compiled CPU kernels' sources ship, every one the build reads (a missing header breaks the first use)
    sources = {f"hf_fastinfer/kernels/cpu/{p.name}" for p in (repo / "kernels" / "cpu").iterdir()
               if p.suffix in (".cpp", ".h")}
    assert sources and sources <= set(names), sorted(sources - set(names))
    assert "hf_fastinfer/__init__.py" in names
    top_levels = {name.split("/")[0] for name in names}
    assert all(t == "hf_fastinfer" or t.endswith(".dist-info") for t in top_levels), top_levels
