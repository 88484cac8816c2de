"""The transformers quantizer for ``quantization_config=FastInferConfig(...)``: lifecycle only.

transformers calls it while ``from_pretrained`` builds and loads a model. The work itself lives elsewhere
(weight quantization in ``quant/``, kernel injection in ``inject.py``, tensor parallelism in ``parallel.py``).

What this release does:

* ``bits=None``: the model loads unchanged in floating point and records the config; saving and reloading
  keep it. Nothing is replaced, so the output is transformers' own.
* ``bits`` of 8, 4 or ``"auto"`` and ``tp_size > 1``: not available in this release; asking for them raises
  :class:`NotImplementedError` before any weight is read, rather than loading an unquantized model silently.
"""

from __future__ import annotations

from transformers.quantizers.base import HfQuantizer

from .config import FastInferConfig

__all__ = ["FastInferQuantizer"]


class FastInferQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config: FastInferConfig, **kwargs):
        if not isinstance(quantization_config, FastInferConfig):
            raise TypeError(f"FastInferQuantizer needs a FastInferConfig, got {type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs) -> None:
        config = self.quantization_config
        if config.quantizes_weights:
            raise NotImplementedError(
                f"FastInferConfig(bits={config.bits!r}): weight quantization is not available in this release of "
                "hf_fastinfer. Load with FastInferConfig(bits=None), or without quantization_config."
            )
        if config.tp_size > 1:
            raise NotImplementedError(
                f"FastInferConfig(tp_size={config.tp_size}): tensor parallelism is not available in this release "
                "of hf_fastinfer. Use tp_size=1."
            )

    @property
    def is_compileable(self) -> bool:
        return True

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
