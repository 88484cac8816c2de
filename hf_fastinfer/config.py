"""FastInferConfig: the ``quantization_config=`` that turns hf_fastinfer on at load time.

It is a transformers ``QuantizationConfigMixin`` registered under the method name ``"fastinfer"``, so it
round-trips through ``config.json`` and ``from_pretrained`` finds its quantizer by that name.
"""

from __future__ import annotations

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

__all__ = ["FastInferConfig", "CONFIG_VERSION"]

#: bumped whenever the saved format changes; a checkpoint saved by a newer version is refused with a clear error
CONFIG_VERSION = 1

_VALID_BITS = (8, 4, "auto", None)
#: group size used when none is given: 32 for both. int4 needs small groups; for int8, group 32 keeps greedy answers
#: identical to fp32 far more often than 128 (BENCHMARKS.md) for 3% more bytes (fp16 scales: 0.266x of fp32)
DEFAULT_GROUP_SIZE = {8: 32, 4: 32, "auto": 32, None: None}


def _module_names(names: Any) -> list[str] | None:
    """``modules_to_not_convert`` as a list of names; a single name is accepted, anything else is refused."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            "FastInferConfig: modules_to_not_convert must be a list of module names or name suffixes "
            f"(e.g. ['lm_head', 'mlp.down_proj']), got {names!r}"
        )
    return list(names) or None


class FastInferConfig(QuantizationConfigMixin):
    """hf_fastinfer's load-time configuration.

    Args:
        bits: weight bits for ``nn.Linear`` layers: 8, 4, ``"auto"`` (mixed int8/int4 under ``target_bits``),
            or None (no weight quantization).
        group_size: input features per quantization group (default 32). Layers whose
            in_features it does not divide are handled, not refused.
        symmetric: symmetric (scale only) or asymmetric (scale and zero point) quantization; default
            symmetric for int8, asymmetric for int4 and ``"auto"``.
        modules_to_not_convert: module names (or name suffixes) left in floating point.
        quantize_lm_head: also quantize the output projection (tied to the embedding in many small models).
        target_bits: average weight bits for ``bits="auto"``.
        layer_bits: the per-layer bits chosen for ``bits="auto"``; written at quantization time, reapplied on reload.
        tp_size: tensor-parallel degree (1: no tensor parallelism). Under torchrun the world size must equal it; in
            a process torchrun did not start (a notebook) the other ``tp_size - 1`` ranks are started for you.
            See docs/tensor_parallel.md.
        tp_backend: torch.distributed backend for ``tp_size > 1``: ``"gloo"`` (CPU) or ``"nccl"`` (CUDA GPUs);
            default: NCCL on GPUs, gloo otherwise. Not saved.
        calibration: error-compensating (GPTQ) quantization on calibration text instead of round-to-nearest:
            ``"builtin"`` (built-in English text) or token ids (a 2-D integer tensor [sequences, length] or a list
            of equally long lists). Needs ``bits``. After loading it holds a record of how the weights were
            calibrated (saved in config.json); a saved checkpoint reloads without calibrating again.
        kernel_injection: inject the fused decode path after loading (default): each recognised decoder block's
            decode step runs as one fused layer (:mod:`hf_fastinfer.injection`), q/k/v and gate/up become one
            projection each. ``bits=None`` with injection: no weight quantization, fused kernels only.
        version: format version of a saved checkpoint (set automatically).
    """

    def __init__(
        self,
        bits: int | str | None = 8,
        group_size: int | None = None,
        symmetric: bool | None = None,
        modules_to_not_convert: list[str] | None = None,
        quantize_lm_head: bool = True,
        target_bits: float | None = None,
        layer_bits: dict[str, int] | None = None,
        tp_size: int = 1,
        tp_backend: str | None = None,
        calibration: Any = None,
        kernel_injection: bool = True,
        version: int = CONFIG_VERSION,
        **kwargs: Any,
    ):
        self.quant_method = "fastinfer"
        self.bits = bits
        self.group_size = DEFAULT_GROUP_SIZE.get(bits) if group_size is None and bits in DEFAULT_GROUP_SIZE else group_size
        # default: symmetric int8 (zero points buy little there), asymmetric int4 and "auto" (float zero points:
        # quant/search.py and BENCHMARKS.md have the measurements and their caveats)
        self.symmetric = (bits == 8) if symmetric is None else symmetric
        self.modules_to_not_convert = _module_names(modules_to_not_convert)
        self.quantize_lm_head = quantize_lm_head
        self.target_bits = target_bits
        self.layer_bits = dict(layer_bits) if layer_bits else None
        self.tp_size = tp_size
        self.tp_backend = tp_backend
        #: the user's calibration token ids (not saved: config.json keeps only the record below)
        self.calibration_ids = None
        if calibration is None or isinstance(calibration, dict):
            self.calibration = dict(calibration) if calibration else None
        elif calibration is True or (isinstance(calibration, str) and calibration == "builtin"):
            self.calibration = {"method": "gptq", "source": "builtin"}
        elif isinstance(calibration, str):
            raise ValueError(f"FastInferConfig: calibration must be 'builtin', token ids or None, got {calibration!r}")
        else:
            self.calibration_ids = calibration
            self.calibration = {"method": "gptq", "source": "token_ids"}
        self.kernel_injection = kernel_injection
        self.version = version
        # transformers passes quant_method back in from config.json; anything else unknown is an error
        kwargs.pop("quant_method", None)
        if kwargs:
            raise TypeError(f"FastInferConfig got unknown arguments: {sorted(kwargs)}")
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; called on construction and when loaded from config.json."""
        if self.bits not in _VALID_BITS:
            raise ValueError(f"FastInferConfig: bits must be one of 8, 4, 'auto' or None, got {self.bits!r}")
        if self.bits is not None:
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0:
                raise ValueError(
                    f"FastInferConfig: group_size must be a positive integer, got {self.group_size!r} "
                    "(e.g. 128 for int8, 32 for int4)"
                )
        if self.bits == "auto":
            if self.target_bits is None:
                raise ValueError("FastInferConfig: bits='auto' needs target_bits (average bits, between 4 and 8)")
            if not 4.0 <= float(self.target_bits) <= 8.0:
                raise ValueError(
                    f"FastInferConfig: target_bits={self.target_bits} is outside the achievable range [4, 8] "
                    "for a mix of int4 and int8 layers"
                )
        elif self.target_bits is not None:
            raise ValueError("FastInferConfig: target_bits is only used with bits='auto'")
        if self.calibration is not None:
            if self.bits is None:
                raise ValueError("FastInferConfig: calibration chooses quantized weights; set bits=8, 4 or 'auto' "
                                 "with it (bits=None keeps the float weights)")
            if self.calibration.get("method") != "gptq":
                raise ValueError(f"FastInferConfig: unknown calibration method {self.calibration.get('method')!r} "
                                 "(this version knows 'gptq')")
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"FastInferConfig: tp_size must be an integer >= 1, got {self.tp_size!r}")
        if self.tp_backend not in (None, "gloo", "nccl"):
            raise ValueError(f"FastInferConfig: tp_backend must be 'gloo' (CPU), 'nccl' (CUDA GPUs) or None, got "
                             f"{self.tp_backend!r}")
        if not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"FastInferConfig: version must be a positive integer, got {self.version!r}")
        if self.version > CONFIG_VERSION:
            raise ValueError(
                f"This checkpoint was saved by a newer hf_fastinfer (format version {self.version}; this one "
                f"reads up to {CONFIG_VERSION}). Fix: pip install --upgrade hf-fastinfer"
            )
        if self.layer_bits is not None:
            bad = {k: v for k, v in self.layer_bits.items() if v not in (4, 8)}
            if bad:
                raise ValueError(f"FastInferConfig: layer_bits values must be 4 or 8, got {bad}")

    @property
    def quantizes_weights(self) -> bool:
        return self.bits is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "modules_to_not_convert": self.modules_to_not_convert,
            "quantize_lm_head": self.quantize_lm_head,
            "target_bits": self.target_bits,
            "layer_bits": self.layer_bits,
            "tp_size": self.tp_size,
            "calibration": self.calibration,
            "kernel_injection": self.kernel_injection,
            "version": self.version,
        }

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "quant_method")
        return f"FastInferConfig({fields})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FastInferConfig) and self.to_dict() == other.to_dict()
