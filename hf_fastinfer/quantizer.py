"""The transformers quantizer for ``quantization_config=FastInferConfig(...)``: lifecycle only.

transformers calls it while ``from_pretrained`` builds and loads a model; the work lives in ``quant/``.

* ``bits=None``: no weight is converted; the config is recorded (and saved) so the model reloads the same way.
* ``kernel_injection=True`` (the default): after loading (and quantizing), the fused decode path is injected
  into the model's decoder blocks (:mod:`hf_fastinfer.injection`); ``False`` leaves the model's forwards as
  transformers wrote them.
* ``bits`` 8 / 4: before loading, every ``nn.Linear`` to convert becomes an empty :class:`MoQLinear` on
  the meta device; each float weight is quantized by :class:`MoQQuantize` as it streams in. A checkpoint
  saved from such a model already holds the quantized tensors and loads them as they are.
* ``bits="auto"``: weights stream in as int8 with their int4 version kept beside them; after loading, the
  sensitivity pass (``quant/sensitivity.py``) picks each layer's bits under ``target_bits`` and the choice is
  written to ``config.layer_bits``, which a reload applies directly.
* A tied output projection (``lm_head`` sharing the input embedding): the checkpoint has no separate weight
  for it, so it is quantized from the embedding after loading and untied (the embedding stays in float);
  the saved config says ``tie_word_embeddings=False`` and the quantized ``lm_head`` is saved with the rest.
* ``calibration=...``: the float weights load as they are, then GPTQ quantizes them block by block on the
  calibration token ids (``quant/gptq.py``); the record of how is written to ``config.calibration``.
* ``tp_size > 1``: after the Linear swap, the model is split by its tensor-parallel plan before any weight is
  read (``parallel/``): each rank's modules get its shard's shape, the loader reads only that shard, MoQ
  quantizes it alone; after loading the shards become plain local tensors with an all-reduce after each
  row-wise projection, and kernel injection runs on them.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers.quantizers.base import HfQuantizer
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from .config import FastInferConfig

__all__ = ["FastInferQuantizer"]

logger = logging.getLogger("hf_fastinfer")


class FastInferQuantizer(HfQuantizer):
    requires_calibration = False
    #: a Linear's weight becomes these tensors; transformers uses it to extend tensor-parallel plans
    serialized_names = {"weight": ["weight", "weight_scale", "weight_zero"]}

    def __init__(self, quantization_config: FastInferConfig, **kwargs):
        if not isinstance(quantization_config, FastInferConfig):
            raise TypeError(f"FastInferQuantizer needs a FastInferConfig, got {type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)
        self.collect_alternatives = False
        self._progress = None
        self._checkpoint_paths: set[str] = set()
        #: calibration=...: layer name -> bits, quantized after loading (quant/gptq.py); None otherwise
        self._calibrate_bits: dict[str, int] | None = None
        #: the token ids bits="auto"'s sensitivity pass reads when calibration gave some
        self._sensitivity_ids: torch.Tensor | None = None
        #: tp_size > 1: the plan, the process group and (in a notebook) the worker ranks (parallel/)
        self._tp_state = None

    # -- checks ---------------------------------------------------------------------------------------------

    def validate_environment(self, *args, **kwargs) -> None:
        config = self.quantization_config
        config.post_init()  # a config edited after construction is checked again before any weight is read
        if config.tp_size > 1:
            if config.calibration is not None and not self.pre_quantized:
                raise ValueError(
                    f"FastInferConfig(tp_size={config.tp_size}, calibration=...): calibration runs the whole model on "
                    "one process. Calibrate with tp_size=1 and save_pretrained, then load the saved checkpoint with "
                    "tp_size (each rank reads its shard of the calibrated weights).")
            if config.bits == "auto" and config.layer_bits is None:
                raise ValueError(
                    f"FastInferConfig(tp_size={config.tp_size}, bits='auto'): choosing the bits runs the whole model "
                    "on one process. Load with bits='auto' and tp_size=1, save_pretrained, then load the saved "
                    "checkpoint with tp_size.")
            from .parallel.runtime import check_world

            check_world(config.tp_size)

    @property
    def quantized_element_size(self) -> float | None:
        bits = self.quantization_config.bits
        return None if bits is None else (1.0 if bits == 8 else 0.5)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        from .parallel.shard import ROWS_ATTR, SHARD_ATTR
        from .quant.moq_linear import MoQLinear

        if self.pre_quantized:
            return False
        module_name, _, tensor_name = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        if getattr(module, ROWS_ATTR, None) is not None and tensor_name in ("weight", "bias"):
            return True  # a fused projection split part by part over the ranks: MoQQuantize takes this rank's rows
        if getattr(module, SHARD_ATTR, False) and tensor_name == "weight":
            return True  # a float shard: MoQQuantize passes it through and gives the checkpoint's pages back
        if not self.quantization_config.quantizes_weights:
            return False
        return isinstance(module, MoQLinear) and tensor_name == "weight"

    def get_quantize_ops(self):
        from .quant.replace import MoQQuantize

        return MoQQuantize(self)

    def get_new_dtype(self, converter, param, dtype):
        # scales and zero points load in the dtype they were saved in (fp16), whatever the model's dtype
        dtype_name = param.get_dtype() if hasattr(param, "get_dtype") else str(param.dtype)
        if self.quantization_config.quantizes_weights and dtype_name in ("F16", "torch.float16"):
            targets = getattr(converter, "target_patterns", None) or []
            if any(str(t).endswith(("weight_scale", "weight_zero")) for t in targets):
                return None
        return super().get_new_dtype(converter, param, dtype)

    # -- before loading: swap the Linear layers -------------------------------------------------------------

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self._checkpoint_paths = {os.path.realpath(str(f)) for f in (checkpoint_files or [])}
        model = self._swap_linear_layers(model, checkpoint_files)
        if self.quantization_config.tp_size > 1 or getattr(model.config, "distributed_config", None) is not None:
            from .parallel import prepare

            try:
                prepare(self, model, kwargs.get("dtype"), kwargs.get("device_map"))
            except BaseException:
                if self._progress is not None:  # refused before any weight was read: no bar left behind
                    self._progress.close()
                    self._progress = None
                raise
        return model

    def _swap_linear_layers(self, model, checkpoint_files):
        from .quant.replace import matches, replace_linear_layers

        config = self.quantization_config
        if not config.quantizes_weights:
            return model
        skip = list(config.modules_to_not_convert or [])
        unknown = [p for p in skip if not any(matches(n, [p]) for n, _ in model.named_modules())]
        if unknown:
            logger.warning("FastInferConfig.modules_to_not_convert: no module named %s in %s; nothing skipped for them",
                           unknown, type(model).__name__)
        skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
        output = model.get_output_embeddings()
        output_name = next((n for n, m in model.named_modules() if output is not None and m is output), None)
        self._tied_output = None
        if output_name is not None and not config.quantize_lm_head:
            skip.append(output_name)
        elif output_name is not None and f"{output_name}.weight" in (model.all_tied_weights_keys or {}):
            # no checkpoint tensor of its own: quantized from the embedding after loading
            self._tied_output = output_name
            skip.append(output_name)

        linear_names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and not matches(n, skip)]
        if config.bits == "auto" and config.layer_bits is None and self.pre_quantized:
            raise ValueError("this checkpoint says bits='auto' but has no layer_bits: it was not saved by hf_fastinfer")
        if config.bits == "auto" and config.layer_bits is not None:
            missing = [n for n in linear_names if n not in config.layer_bits]
            if missing and self.pre_quantized:
                raise ValueError(f"FastInferConfig.layer_bits has no entry for {missing[:5]}: the checkpoint's config "
                                 "does not match its model")
        else:
            self.collect_alternatives = config.bits == "auto" and not self.pre_quantized
        bits_for = {n: self._bits_of(n) for n in linear_names}
        if config.calibration is not None and not self.pre_quantized:
            # calibrated quantization needs the float weights and the model's activations: the Linear layers
            # load as they are and are quantized block by block after loading (quant/gptq.py)
            self._calibrate_bits = bits_for
            if self._tied_output is not None:
                self._calibrate_bits = {**bits_for, self._tied_output: self._bits_of(self._tied_output)}
            self._calibration_ids = None
            if config.calibration_ids is not None:
                from .quant.gptq import check_calibration_ids

                self._calibration_ids = check_calibration_ids(config.calibration_ids, model.config)
            elif config.calibration.get("source") not in (None, "builtin"):
                raise ValueError("FastInferConfig(calibration=...): this config records a calibration on the "
                                 "user's token ids, which are not saved; pass them again (calibration=ids) or use "
                                 "calibration='builtin'")
            return model
        replace_linear_layers(model, bits_for, config.group_size, config.symmetric)
        if self.pre_quantized:
            self._check_checkpoint(model, checkpoint_files or [])
        if not self.pre_quantized:
            label = "auto int8/int4" if config.bits == "auto" else f"int{config.bits}"
            total = len(bits_for) + (self._tied_output is not None)
            # shown or hidden with transformers' own loading bars (transformers.utils.logging.disable_progress_bar)
            self._progress = tqdm(total=total, desc=f"MoQ: quantizing to {label}", unit="layer",
                                  disable=not hf_logging.is_progress_bar_enabled())
        return model

    def _bits_of(self, name: str) -> int:
        """The bits a layer loads with: the config's, or for "auto" its entry in ``layer_bits`` (8 while the
        sensitivity pass has not chosen yet)."""
        config = self.quantization_config
        if config.bits != "auto":
            return config.bits
        return config.layer_bits.get(name, 8) if config.layer_bits is not None else 8

    def _check_checkpoint(self, model, checkpoint_files) -> None:
        """Before any tensor is read: every quantized layer's tensors are in the checkpoint with the shapes and
        dtypes its config implies (a clear error instead of a size-mismatch report or garbage scales)."""
        from safetensors import safe_open

        from .quant.moq_linear import MoQLinear

        headers = {}
        for file in checkpoint_files:
            if str(file).endswith(".safetensors"):
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():
                        piece = handle.get_slice(key)
                        headers[key] = (tuple(piece.get_shape()), piece.get_dtype())
        if not headers:
            return
        prefix = getattr(model, "base_model_prefix", "") + "."
        for name, module in model.named_modules():
            if not isinstance(module, MoQLinear):
                continue
            expected = {"weight": (tuple(module.weight.shape), "I8" if module.bits == 8 else "U8"),
                        "weight_scale": (tuple(module.weight_scale.shape), "F16")}
            if module.weight_zero is not None:
                expected["weight_zero"] = (tuple(module.weight_zero.shape), "F16")
            for tensor, (shape, dtype) in expected.items():
                key = f"{name}.{tensor}"
                found = headers.get(key) or headers.get(key.removeprefix(prefix))
                if found is None:
                    raise ValueError(f"this hf_fastinfer checkpoint has no tensor {key!r} (bits={module.bits}, "
                                     f"group_size={module.group_size}): the file does not match its config")
                if found != (shape, dtype):
                    raise ValueError(
                        f"checkpoint tensor {key!r} is {found[1]} {list(found[0])}, but its config "
                        f"(bits={module.bits}, group_size={module.group_size}, symmetric={module.symmetric}) "
                        f"needs {dtype} {list(shape)}: the checkpoint is corrupted or does not match its config"
                    )

    @staticmethod
    def _check_loaded_scales(model) -> None:
        from .quant.moq_linear import MoQLinear

        for name, module in model.named_modules():
            if isinstance(module, MoQLinear):
                scale = module.weight_scale
                if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
                    raise ValueError(f"{name}.weight_scale holds non-finite or non-positive values: the checkpoint "
                                     "is corrupted")
                if module.weight_zero is not None and not bool(torch.isfinite(module.weight_zero).all()):
                    raise ValueError(f"{name}.weight_zero holds non-finite values: the checkpoint is corrupted")

    def record_quantized(self, module_name: str, weight: torch.Tensor, count: bool = True) -> None:
        """Called by MoQQuantize after each weight: progress, and the checkpoint pages read so far go back."""
        from .quant._pages import release_free_heap, release_mapped_files, release_tensor_pages

        if self._tp_state is not None:
            # a shard read as a column slice touched every page of its tensor, which is not a view to advise
            release_mapped_files(self._checkpoint_paths)
        else:
            release_tensor_pages(weight, self._checkpoint_paths)
        release_free_heap()
        if self._progress is not None and count:
            self._progress.update(1)

    # -- after loading ----------------------------------------------------------------------------------------

    def _process_model_after_weight_loading(self, model, **kwargs):
        try:
            return self._after_loading(model)
        except BaseException:
            if self._tp_state is not None:
                from .parallel import abort

                abort(self)
            raise

    def _after_loading(self, model):
        config = self.quantization_config
        if self._tp_state is not None:
            from .parallel import localize

            localize(self, model)
        try:
            if self._calibrate_bits:
                self._calibrate(model)
            if config.quantizes_weights:
                self._finish_quantization(model)
        finally:
            if self._progress is not None:
                self._progress.close()
                self._progress = None
        if self._tp_state is not None:
            from .parallel import finish

            finish(self, model)
        if config.kernel_injection:
            from .injection import inject

            inject(model)
        if self._tp_state is not None:
            from .parallel import start_mirroring

            start_mirroring(model)
        return model

    def _calibrate(self, model) -> None:
        """GPTQ of every Linear to convert, block by block, on the calibration token ids (quant/gptq.py)."""
        from .quant.gptq import builtin_calibration_ids, calibrate_model, calibration_record
        from .quant.sensitivity import CALIBRATION_TOKENS

        config = self.quantization_config
        ids, source = self._calibration_ids, "token_ids"
        if ids is None:
            ids, source = builtin_calibration_ids(self._tokenizer_for(model, "calibration='builtin'")), "builtin"
        tied = calibrate_model(model, self._calibrate_bits, config.group_size, config.symmetric, ids,
                               alternative_bits=4 if config.bits == "auto" else None, tied_output=self._tied_output,
                               progress=hf_logging.is_progress_bar_enabled())
        if self._tied_output is not None:
            self._quantize_tied_output(model, tied[self._tied_output])
            self._tied_output = None
        config.calibration = calibration_record(ids, source)
        self._calibrate_bits = None
        # bits="auto": the sensitivity pass reads the calibration text too (no tokenizer needed for user ids)
        self._sensitivity_ids = ids.reshape(1, -1)[:, :CALIBRATION_TOKENS]

    def _finish_quantization(self, model) -> None:
        """Checks of a saved checkpoint's scales, the tied output projection, bits="auto"'s choice."""
        from .quant.moq_linear import MoQLinear

        if self.pre_quantized:
            self._check_loaded_scales(model)
        if self._tied_output is not None:
            self._quantize_tied_output(model)
        if self.collect_alternatives:
            self._choose_bits(model)
        for module in model.modules():
            if isinstance(module, MoQLinear):
                module.alternative = None
                module.weight.requires_grad_(False)
                if module.bias is not None:
                    module.bias.requires_grad_(False)

    def _quantize_tied_output(self, model, calibrated=None) -> None:
        """Quantize the tied output projection from the embedding and untie it. ``calibrated``: its (weight,
        bits="auto" alternative) from calibration, used instead of round-to-nearest."""
        from .quant.moq_linear import MoQLinear

        config = self.quantization_config
        name = self._tied_output
        linear = model.get_submodule(name)
        if calibrated is not None:
            weight, alternative = calibrated
            quantized = MoQLinear.from_linear(linear, weight.bits, config.group_size, config.symmetric, quantized=weight)
            quantized.alternative = alternative
        else:
            quantized = MoQLinear.from_linear(linear, self._bits_of(name), config.group_size, config.symmetric)
        if self.collect_alternatives and calibrated is None:
            from .quant.search import quantize_linear_weight

            quantized.alternative = quantize_linear_weight(linear.weight, 4, config.group_size, config.symmetric)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)
        # untie: the embedding keeps its float weight, the output projection is now its own (quantized) tensor
        for sub in model.modules():
            tied = getattr(sub, "all_tied_weights_keys", None)
            if tied:
                for key in [k for k in tied if k == f"{name}.weight" or k.endswith(f".{name}.weight") or
                            f"{name}.weight".endswith(k)]:
                    tied.pop(key)
            if hasattr(sub, "config") and hasattr(sub.config, "get_text_config"):
                sub.config.get_text_config(decoder=True).tie_word_embeddings = False
                sub.config.tie_word_embeddings = False
        from .quant._pages import release_free_heap

        release_free_heap()
        if self._progress is not None:
            self._progress.update(1)

    def _choose_bits(self, model) -> None:
        from .quant.moq_linear import MoQLinear
        from .quant.sensitivity import assign_bits, calibration_ids, layer_sensitivity

        config = self.quantization_config
        layers = {n: m for n, m in model.named_modules() if isinstance(m, MoQLinear) and m.alternative is not None}
        ids = self._sensitivity_ids
        if ids is None:
            ids = calibration_ids(self._tokenizer_for(model))
        scores = layer_sensitivity(model, layers, ids, progress=hf_logging.is_progress_bar_enabled())
        sizes = {n: m.in_features * m.out_features for n, m in layers.items()}
        chosen = assign_bits(sizes, scores, config.target_bits)
        for name, bits in chosen.items():
            module = layers[name]
            if bits != module.bits:
                module.load_quantized(module.alternative)
        config.layer_bits = dict(sorted(chosen.items()))
        average = sum(chosen[n] * sizes[n] for n in sizes) / max(sum(sizes.values()), 1)
        logger.info("bits='auto': %d int8 and %d int4 layers, %.2f average bits (target %.2f)",
                    sum(b == 8 for b in chosen.values()), sum(b == 4 for b in chosen.values()), average,
                    config.target_bits)

    def _tokenizer_for(self, model, what: str = "bits='auto'"):
        """The built-in text needs the model's tokenizer: from the folder the weights came from."""
        from transformers import AutoTokenizer

        source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        try:
            return AutoTokenizer.from_pretrained(source)
        except Exception as exc:
            fix = ("pass token ids (calibration=ids)" if what.startswith("calibration") else "use bits=8 / bits=4")
            raise ValueError(
                f"FastInferConfig({what}) runs the model on built-in text and needs the model's tokenizer, which "
                f"could not be loaded from {source!r} ({type(exc).__name__}). Save the tokenizer next to the "
                f"weights, or {fix}."
            ) from exc

    # -- the rest of the lifecycle -----------------------------------------------------------------------------

    def _dequantize(self, model, dtype=None):
        from .quant.replace import dequantize_model

        return dequantize_model(model, dtype or torch.float32)

    def update_parallel_plan(self, model, plan: dict[str, str]) -> None:
        """A Linear's scales (and zero points) are split with its weight: same style, same rows/columns."""
        additions = {}
        for key, style in plan.items():
            if key.endswith(".weight"):
                for suffix in ("weight_scale", "weight_zero"):
                    additions[key[: -len("weight")] + suffix] = style
        for key, style in additions.items():
            plan.setdefault(key, style)

    @property
    def is_compileable(self) -> bool:
        return True

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
