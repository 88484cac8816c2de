"""hf_fastinfer.kernels: one op per module, each a Triton kernel, its launcher, a ``torch.library`` op with a
fake implementation, and a pure-PyTorch reference (which is also the CPU path unless a faster one exists).

This folder sits at the repository root but installs as ``hf_fastinfer.kernels``: a top-level ``kernels``
module would shadow Hugging Face's ``kernels`` library, which transformers probes for.
"""

__all__: list[str] = []

if __name__ == "kernels":
    # Imported under the top-level name: Python was started in the repository root, whose folder `kernels/`
    # then comes before the installed packages on sys.path. transformers >= 5.25 depends on Hugging Face's
    # `kernels` library and imports it, and would get this folder instead. Where that library is installed, it
    # is loaded from the rest of sys.path in this module's place (the import statement returns what sys.modules
    # holds once this file has run). Where it is not, this stays an empty module, which transformers' probe
    # reads as no usable library (no version).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root])
    if _spec is not None:
        _library = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _library
        try:
            _spec.loader.exec_module(_library)
        except BaseException:
            del _sys.modules["kernels"]
            raise
    del _machinery, _util, _os, _sys, _root, _spec
