"""The whole decode step of an injected causal LM: embedding, every fused block, final norm, output projection.

Once every block of a model is fused, what is left of a decoded token's cost on CPU is Python: the base model's
forward (position ids, the mask, the rotary module, a loop over 30 ``nn.Module.__call__`` with their keyword
dictionaries) and the causal LM's forward around it, about 1.5 ms a token for the default model against a
compiled chain of blocks of 10 ms (bf16). :class:`FusedDecodeStep` becomes the ``forward`` of the top-level
model instance and, for a decode call it covers, does only what the model's own forward does in that case::

    hidden = embed(input_ids)                         # the model's embedding module (a scaled one included)
    cos, sin = rotary(hidden, position_ids)           # the model's rotary module
    for block in blocks: hidden = block(hidden, mask, (cos, sin), cache)   # the fused layers, chained on CPU
    logits = lm_head(norm(hidden))                    # the model's modules (kernel-library forwards)

where, on CPU, the chain of fused layers also runs the final norm and the output projection in its parallel region
(:class:`~hf_fastinfer.kernels.decoder_layer.DecodeHeadSpec`, when both modules run the kernel library's
forwards), so that the output projection's stream starts right after the last layer's, on the same threads,
without a return to Python in between. The step calls only the first block of a chain and takes the outputs of
the blocks the chain ran from it (under the model's own forward each of them is called and hands back its
output; here those calls would do nothing else).

Every other call (prefill, inputs_embeds, hidden states or attentions asked for, labels, another cache, a
module with hooks) runs the model's own forward. It is installed only when, on a probe token, its logits equal
the model's own forward's bit for bit (same fused blocks, same modules: any difference means the model's forward
does something more, e.g. a final logit softcap, and the step is left out).
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn

from .._compat import cache_from, cache_kwarg
from ..cache import FastInferCache
from ..kernels.decoder_layer import DecodeHeadSpec, PreparedChain
from .detect import projection
from .layer import FastLinearForward, FastNormForward, FusedDecoderLayer

__all__ = ["FusedDecodeStep", "decode_head", "find_rotary", "probe_ids", "probe_step"]

#: keyword arguments a decode call may carry and the step still covers (generate() passes these)
_COVERED = frozenset({"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
                      "logits_to_keep", "cache_position", "return_dict"})


def probe_ids(model: nn.Module, n: int) -> torch.Tensor:
    """[n] token ids the injection probes feed a model: spread over its vocabulary, on its embedding's device."""
    embeddings = model.get_input_embeddings()
    return (torch.arange(n, device=embeddings.weight.device) * 7919 + 17) % embeddings.num_embeddings


def find_rotary(base: nn.Module) -> nn.Module | None:
    """The base model's one rotary-embedding module, by structure: a child with an ``inv_freq`` buffer (None when
    there is none or more than one, e.g. separate local and global rotaries)."""
    found = [m for m in base.children() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    return found[0] if len(found) == 1 else None


def decode_head(model: nn.Module, norm: nn.Module) -> DecodeHeadSpec | None:
    """The final norm and output projection as one head for the decode chain, when both run the kernel library's
    forwards that the head reproduces: the norm's :class:`FastNormForward`, and an output projection that is a
    float ``nn.Linear`` of the model's dtype with :class:`FastLinearForward` or a MoQ linear (else None)."""
    from ..quant.moq_linear import MoQLinear

    norm_forward = norm.__dict__.get("forward")
    output = model.get_output_embeddings()
    if not isinstance(norm_forward, FastNormForward) or output is None:
        return None  # (hooks on either module are checked at every call: FusedDecodeStep._head_for_call)
    dtype = norm.weight.dtype
    if type(output) is nn.Linear:
        if not isinstance(output.__dict__.get("forward"), FastLinearForward) or output.weight.dtype != dtype or \
                not output.weight.is_contiguous():
            return None
    elif not isinstance(output, MoQLinear) or "forward" in output.__dict__:
        return None
    return DecodeHeadSpec(norm.weight, norm_forward.eps, norm_forward.gemma, projection(output), dtype)


class FusedDecodeStep:
    """``forward`` of an injected causal LM (the instance's, no class is changed)."""

    def __init__(self, model: nn.Module, base: nn.Module, layers: list[FusedDecoderLayer], rotary: nn.Module,
                 norm: nn.Module):
        self._model = weakref.ref(model)
        self._base = weakref.ref(base)
        self._original = type(model).forward
        # generate() reads the forward's signature (logits_to_keep, attention_mask, position_ids, which model_kwargs
        # are valid): it must see the model's own
        self.__signature__ = inspect.signature(self._original.__get__(model))
        self.layers = layers
        self.blocks = [weakref.ref(layer._layer()) for layer in layers]
        self.rotary, self.norm = weakref.ref(rotary), weakref.ref(norm)
        #: the final norm and output projection run by the chain of layers (None: by their modules; probe_step
        #: drops it when the logits would differ)
        self.head = decode_head(model, norm) if layers and layers[0].device.type == "cpu" else None
        self._head_output = weakref.ref(model.get_output_embeddings()) if self.head is not None else None
        self.output_type = None  # the class of the model's own outputs, set by probe_step
        self.cache_name = cache_kwarg()
        self.decode_calls = 0  # how many calls took the whole step (tests read it)
        self.head_calls = 0  # how many of them took their logits from the chain's head
        #: the blocks a chain ran are not called again (off: each is called and hands back the chain's output, as
        #: under the model's own forward; benchmarks' A/B)
        self.consume_chain = True
        #: a decode call on hf_fastinfer's cache runs every block through one prepared chain (the blocks' compiled
        #: layers and the cache's buffers converted once, not per token); off: through the first block's call
        #: (benchmarks' A/B)
        self.use_prepared = True
        self.prepared_calls = 0  # how many calls took it (tests read it)
        #: (a weak reference to the cache it was built for, the plan); dropped with that cache
        self._prepared: tuple | None = None
        self._unpreparable = False  # the blocks are not one chain of fused layers: no plan for this model
        #: a prompt call that keeps the logits of its last positions only (generate()'s) runs the last block's
        #: queries, attention output and MLP for those positions alone (off: for every position; benchmarks' A/B;
        #: set at injection by a probe, off for a model whose logits it would change)
        self.trim_prefill = True

    def __call__(self, *args, **kwargs):
        if not torch.compiler.is_compiling() and (not args or (len(args) == 1 and "input_ids" not in kwargs)):
            # model(ids, ...): a causal LM's first positional argument is input_ids
            out = self.decode(dict(kwargs, input_ids=args[0]) if args else kwargs)
            if out is not None:
                return out
        keep = self._rows_kept(kwargs)
        if not keep:
            return self._original(self._model(), *args, **kwargs)
        last = self.layers[-1]
        last.keep_rows = keep
        try:
            return self._original(self._model(), *args, **kwargs)
        finally:
            last.keep_rows = 0

    def _rows_kept(self, kwargs: dict) -> int:
        """For a call whose output is only the logits of its last ``logits_to_keep`` positions (generate()'s prompt
        call asks for one): that count, which the last block's prefill then computes alone after its keys and
        values (the causal LM's forward slices the base model's output to those rows before the output projection,
        and nothing else reads it); 0 when the call may read more: hidden states, attentions or router logits asked
        for, labels (a loss over every position), hooks on the blocks, the base model or the final norm."""
        keep = kwargs.get("logits_to_keep")
        if not self.trim_prefill or type(keep) is not int or keep < 1 or torch.compiler.is_compiling():
            return 0
        config = self._model().config
        for name in ("output_hidden_states", "output_attentions", "output_router_logits"):
            if kwargs.get(name) or getattr(config, name, False):
                return 0
        if kwargs.get("labels") is not None or self._hooked():
            return 0
        norm = self.norm()
        if norm._forward_hooks or norm._forward_pre_hooks:
            return 0
        return keep

    def _hooked(self) -> bool:
        """Hooks on a module the step does not call through ``nn.Module.__call__`` (the base model, the blocks),
        other than transformers' own output-capturing hooks, which stay installed once a call asked for hidden
        states or attentions and do nothing unless a call asks again (the step never covers such a call)."""
        from torch.nn.modules import module as torch_module

        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return True
        for module in [self._base()] + [ref() for ref in self.blocks]:
            if module._forward_pre_hooks:
                return True
            hooks = module._forward_hooks
            if hooks and any(not getattr(hook, "__module__", "").startswith("transformers.") for hook in hooks.values()):
                return True
        return False

    def _head_for_call(self, model: nn.Module):
        """The head, unless the modules it stands for now do something it would skip: a hook on the final norm or
        the output projection, or another output projection or weight than it was built from (the embeddings
        resized or re-tied since injection)."""
        head, norm = self.head, self.norm()
        if head is None:
            return None
        output = model.get_output_embeddings()
        if output is not self._head_output() or output.weight is not head.proj.weight or \
                norm.weight is not head.norm_weight or output._forward_hooks or output._forward_pre_hooks or \
                norm._forward_hooks or norm._forward_pre_hooks:
            return None
        return head

    @torch.no_grad()
    def decode(self, kwargs: dict):
        """The model output for a one-token-per-sequence call on hf_fastinfer's cache, or None (not covered)."""
        if not kwargs.keys() <= _COVERED or kwargs.get("use_cache") is False or kwargs.get("return_dict") is False:
            return None
        config = self._model().config
        if getattr(config, "output_hidden_states", False) or getattr(config, "output_attentions", False):
            return None  # asked for by the config: the model's forward records them
        input_ids, cache = kwargs.get("input_ids"), cache_from(kwargs)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != 1:
            return None
        if not isinstance(cache, FastInferCache) or cache.static_shapes or len(cache.layers) != len(self.layers):
            return None
        if input_ids.device.type != "cpu" or torch.is_grad_enabled() or self._model().training:
            return None
        first = cache.layers[0]
        if not first.is_initialized or first.keys.shape[0] != input_ids.shape[0] or self._hooked():
            return None
        if any(layer.is_sliding for layer in cache.layers):
            return None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):
            # one mask per attention type (models with a layer_types list); every layer here is full attention
            if "full_attention" not in mask:
                return None
            mask = mask["full_attention"]
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            # a 2-D padding mask over past + new positions: the decode token sees every earlier position that is
            # not padding (no sliding layer here), as the model's mask function would say
            if mask.shape[1] != first.length + 1:
                return None
            mask = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        elif mask is not None and not isinstance(mask, torch.Tensor):
            return None  # a block mask (flex attention)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            cache_position = kwargs.get("cache_position")
            position_ids = cache_position[None] if cache_position is not None else \
                torch.full((1, 1), first.length, dtype=torch.long)
        model = self._model()
        hidden = model.get_input_embeddings()(input_ids)  # [B, 1, H]
        position_embeddings = self.rotary()(hidden, position_ids)
        ran = self._run_prepared(model, cache, hidden, mask, position_embeddings) \
            if self.use_prepared and self.consume_chain else None
        if ran is not None:
            hidden, head_logits = ran
            self.prepared_calls += 1
        else:
            hidden, head_logits = self._run_blocks(model, cache, hidden, mask, position_embeddings, position_ids)
        if head_logits is not None:  # the chain ran to the last block and on through the head
            logits = head_logits.view(hidden.shape[0], 1, -1)  # [B, 1, V]
            self.head_calls += 1
        else:
            logits = model.get_output_embeddings()(self.norm()(hidden))  # [B, 1, V]
        self.decode_calls += 1
        return self.output_type(logits=logits, **{self.cache_name: cache})

    def _run_blocks(self, model: nn.Module, cache: FastInferCache, hidden, mask, position_embeddings, position_ids):
        """(the last block's output [B, 1, H], the head's logits [B, V] or None) through the blocks' own calls: the
        first block's, which chains as many blocks as it can, then the rest."""
        layer_kwargs = {"attention_mask": mask, "position_embeddings": position_embeddings, self.cache_name: cache,
                        "use_cache": True, "position_ids": position_ids}
        first = self.layers[0]
        first.head = self._head_for_call(model)
        first.consume_chain = self.layers if self.consume_chain else None
        try:
            hidden = first(hidden, **layer_kwargs)
            outs = first.chain_outs  # (cleared below, with consume_chain)
            start = 1
            if outs is not None:  # the chain ran blocks [0, len(outs)): go on after them
                hidden, start = outs[-1], len(outs)
            for layer in self.layers[start:]:
                hidden = layer(hidden, **layer_kwargs)
        finally:
            first.head = None
            first.consume_chain = first.chain_outs = None
        chained, first.head_logits = first.head_logits, None
        return hidden, (chained[1] if chained is not None and chained[0] is hidden else None)

    def reset_prepared(self) -> None:
        """Forget the prepared chain (built again on the next decode call): after the blocks' compiled layers or
        the head were rebuilt on other tensors."""
        self._prepared = None

    def _run_prepared(self, model: nn.Module, cache: FastInferCache, hidden, mask, position_embeddings):
        """(the last block's output [B, 1, H], the head's logits [B, V] or None) for a decode call that every block
        would run in one chain from the first block's call (each fused, a full-attention layer of hf_fastinfer's
        cache with room for the token, no chained or stashed state left from another call), through the prepared
        chain: or None, and nothing changed (the caller takes the blocks' calls)."""
        layers = self.layers
        if not layers[0].covers(hidden, mask):
            return None  # (what the first block's call would leave to the block's own forward)
        cos, sin = position_embeddings
        head = self._head_for_call(model)
        prepared = self._prepared
        plan = prepared[1] if prepared is not None and prepared[0]() is cache and prepared[1].head is head else None
        for j, (layer, own) in enumerate(zip(layers, cache.layers)):
            if layer._chained is not None or layer._stash is not None:
                return None
            if plan is not None and not plan.holds(j, own.keys, own.values, own.key_scales, own.value_scales):
                plan = None
        if plan is None:
            if self._unpreparable:
                return None
            plan = self._prepare(cache, head)
            if plan is None:
                return None
        slot = cache.reserve_decode_slots(hidden.shape[0])
        if slot is None:
            return None
        for layer in layers:
            layer.decode_calls += 1
        return plan(hidden, cos, sin, mask, slot, slot + 1)

    def _prepare(self, cache: FastInferCache, head) -> PreparedChain | None:
        """The prepared chain of every block on ``cache``'s buffers (kept until that cache is gone or reallocates),
        or None when the blocks are not one chain of fused layers."""
        layers = self.layers
        self._prepared = None
        for j, layer in enumerate(layers):
            if layer.mlp is not None or layer.dtype != layers[0].dtype or layer.layer_idx != j or \
                    layer.next is not (layers[j + 1] if j + 1 < len(layers) else None):
                self._unpreparable = True  # (the blocks do not change after injection)
                return None
        if not all(own.is_initialized for own in cache.layers):
            return None  # (no buffers yet: reserve_decode_slots would refuse the token too)
        buffers = [(own.keys, own.values, own.key_scales, own.value_scales) for own in cache.layers]
        plan = PreparedChain.build([layer.spec for layer in layers], buffers, head)
        if plan is not None:
            this = weakref.ref(self)

            def forget(_, this=this):
                step = this()
                if step is not None and step._prepared is not None and step._prepared[0]() is None:
                    step._prepared = None

            self._prepared = (weakref.ref(cache, forget), plan)
        return plan


@torch.no_grad()
def probe_step(model: nn.Module, step: FusedDecodeStep) -> str | None:
    """None when the step's logits for a decoded token equal the model's own forward's bit for bit (two caches
    filled by the same 3-token prompt), else why not. A head run by the chain (``step.head``) that does not give
    those logits is dropped, and the step probed again without it."""
    why = _probe_once(model, step)
    if why is not None and step.head is not None:
        step.head = None
        why = _probe_once(model, step)
    return why


def _probe_once(model: nn.Module, step: FusedDecodeStep) -> str | None:
    ids = probe_ids(model, 4)
    config = model.config.get_text_config(decoder=True)
    caches = [FastInferCache(config=config, max_cache_len=8) for _ in range(2)]
    name = cache_kwarg()
    for cache in caches:
        model(input_ids=ids[None, :3], use_cache=True, **{name: cache})
    expected = model(input_ids=ids[None, 3:], use_cache=True, **{name: caches[0]})
    step.output_type = type(expected)
    got = step.decode({"input_ids": ids[None, 3:], "use_cache": True, name: caches[1]})
    if got is None:
        return "the model's decode call is not one the whole step covers"
    if not torch.equal(got.logits, expected.logits):
        return "its logits differ from the model's own forward (the model's forward does more than embed, blocks, " \
               "norm and output projection)"
    return None
