"""Calibrated MoQ (``FastInferConfig(calibration=...)``): error-compensating quantization in the manner of GPTQ.

Round-to-nearest (RTN) quantizes every weight on its own. GPTQ quantizes a Linear's input columns one at a
time and, after each, moves the rounding error it made onto the columns not yet quantized, in the direction
the layer's inputs make cheapest: with H = 2/T * sum_t x_t x_t^T (the Hessian of the layer's squared output
error over T calibration inputs x_t) and U the upper Cholesky factor of H^-1, column i's error
e = (w_i - q_i) / U_ii is subtracted as ``W[:, j] -= e * U_ij`` for every later column j. The output error
on inputs like the calibration ones is then far below RTN's, at the same format and bytes.

What this module does (the quantizer calls :func:`calibrate_model` after the float weights have loaded):

1. the calibration token ids (built-in English text, or the user's) run through the model up to its first
   repeated block (a decoder layer, an encoder layer); its inputs are kept, [T, hidden];
2. block by block, in order: the block runs on those inputs with hooks that accumulate each Linear's
   Hessian; every Linear of the block is quantized with :func:`gptq_quantize` and replaced by a
   :class:`~hf_fastinfer.quant.MoQLinear`; the float weight's checkpoint pages go back; the now quantized
   block runs again, and its outputs are the next block's inputs. So each block sees the activations of the
   already-quantized blocks before it, and memory holds one float block and its Hessians beside the
   quantized model;
3. the Linears outside the blocks (an output projection, a pooler) get their Hessians from one more pass of
   the quantized model and are quantized the same way.

Within a block the Linears are quantized stage by stage in the order the forward calls them ([q, k, v], [o],
[gate, up], [down]): each later stage's Hessians are taken again with the stages before it already quantized
(SEQUENTIAL). Group parameters (a scale, and a float zero point for asymmetric int4) are chosen on each
group's columns as the updates have left them when its first column is reached, as in GPTQ's paper, by the
range search of quant/search.py weighted by the inputs' energy (GROUP_SEARCH); RTN's on the original weight
("static groups") measured slightly worse on both models (STATIC_GROUPS).
The saved checkpoint is an ordinary MoQ checkpoint; the config records how it was calibrated.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_fastinfer.kernels.linear import gram
from hf_fastinfer.kernels.quant_format import QuantizedWeight, pack_int4

from ._pages import mapped_checkpoints, release_free_heap, release_tensor_pages
from .search import SCALE_DTYPE, _search_chunk, quantize_linear_weight

__all__ = [
    "CALIBRATION_SEQUENCES",
    "CALIBRATION_LENGTH",
    "DAMPING",
    "HessianAccumulator",
    "gptq_quantize",
    "builtin_calibration_ids",
    "check_calibration_ids",
    "calibrate_model",
]

#: built-in calibration: this many sequences of CALIBRATION_LENGTH tokens of English (16,384 tokens). Many
#: short rows measured better than few long ones (BENCHMARKS.md, groups recomputed: all-MiniLM int4 error
#: 0.51x RTN's with 32 x 256 rows, 0.34x with 256 x 64; default model int4 +0.89% perplexity at 256 x 64)
CALIBRATION_SEQUENCES = 256
CALIBRATION_LENGTH = 64
#: where the built-in sequences start in the reference text's tokens: after the 16,384 that perplexity reads
_CALIBRATION_OFFSET = 32768
#: added to H's diagonal, as a fraction of its mean: keeps the inverse well conditioned
DAMPING = 0.01
#: columns updated together; the error of a block's columns reaches later blocks in one matrix product
BLOCK_COLUMNS = 128
#: group parameters from the original weight (True) or from the compensated columns (False): gptq_quantize.
#: False measured better on both models (BENCHMARKS.md)
STATIC_GROUPS = False
#: quantize columns in order of decreasing input energy (H_ii) rather than left to right (static groups only)
ACT_ORDER = False
#: within a block, quantize the Linears stage by stage in call order ([q, k, v], [o], [gate, up], [down]), each
#: stage's Hessians taken with the stages before it already quantized, rather than all from one float pass
#: ("true sequential"). Together with GROUP_SEARCH it measured best on all-MiniLM-L6-v2 (int4 error 0.315x /
#: 0.301x RTN's on two held-out sets, against 0.339x / 0.324x with neither; alone 0.349x / 0.338x) and left
#: the default model unchanged (its weights sit on a 4-bit grid); it costs three more partial block passes
#: (default model: calibration 92 -> 137 s)
SEQUENTIAL = True
#: dynamic groups: pick each group's range by the search of quant/search.py, its squared error weighted by the
#: group's input energy H_ii, instead of the group's min / max (alone: 0.336x / 0.325x; +4 s)
GROUP_SEARCH = True
#: sequences run through a block at once (bounds the activation memory of one block call)
_BATCH = 8


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once it has recorded what it needs."""


def _stop_forward(module, args):
    raise _StopForward


# -- the algorithm -------------------------------------------------------------------------------------------


class HessianAccumulator:
    """H = 2/T * sum_t x_t x_t^T over every input row x_t [in_features] a Linear receives (float32 sums)."""

    def __init__(self, in_features: int, device=None):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [T, K]
        self.add_product(gram(x), x.shape[0])

    def add_product(self, product: torch.Tensor, rows: int) -> None:
        """Add x^T x [K, K] of ``rows`` input rows computed elsewhere (shared by Linears fed the same x)."""
        self.sum.add_(product)
        self.rows += rows

    @property
    def hessian(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.rows, 1))


def _group_params(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  importance: torch.Tensor | None = None):
    """RTN's scales and zero points for ``weight`` [N, K] (fp16, [N, groups]), and the integer range; with
    ``importance`` [K], those of the range search weighted by it."""
    qmax = 127 if bits == 8 else 7
    qmin = (-127 if bits == 8 else -7) if symmetric else (-128 if bits == 8 else -8)
    if importance is not None:
        scales, zeros = _search_chunk(weight.float(), bits, group_size, symmetric, importance)
        return scales.to(SCALE_DTYPE), None if zeros is None else zeros.to(SCALE_DTYPE), qmin, qmax
    rtn = quantize_linear_weight(weight, bits, group_size, symmetric)
    return rtn.scales, rtn.zeros, qmin, qmax


def _cholesky_of_inverse(hessian: torch.Tensor, damping: float, order: torch.Tensor | None) -> torch.Tensor:
    """U: the upper Cholesky factor of the damped H^-1 (H^-1 = U^T U), columns in ``order``. Row i of U,
    scaled by 1 / U_ii, is where column i's rounding error goes among the columns after it."""
    h = hessian.detach().float().clone()
    dead = torch.diagonal(h) == 0  # an input that was always zero: nothing to compensate through it
    h[dead, dead] = 1.0
    if order is not None:
        h = h[order][:, order]
    h.diagonal().add_(damping * float(torch.diagonal(h).mean()))
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        # numerically indefinite (e.g. a handful of calibration rows for a wide layer): more damping
        h.diagonal().add_(float(torch.diagonal(h).mean()))
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def _gptq_rows(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, u: torch.Tensor, qmin: int, qmax: int,
               block_columns: int, regroup=None) -> torch.Tensor:
    """GPTQ of a block of rows w [n, K] (float32, updated in place) with per-column scales / zeros s, z
    [n, K]; returns the integer codes int8 [n, K]. ``regroup(col, w)`` (dynamic groups) refreshes s and z
    for the group starting at ``col`` from the columns as they are then."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    for b0 in range(0, k, block_columns):
        b1 = min(b0 + block_columns, k)
        wb = w[:, b0:b1]  # a view: updated in place
        ub = u[b0:b1, b0:b1]
        err = torch.empty(n, b1 - b0, dtype=torch.float32, device=w.device)
        for i in range(b1 - b0):
            col = b0 + i
            if regroup is not None:
                regroup(col, w)
            sc, zc = s[:, col], z[:, col]
            qi = torch.round(wb[:, i] / sc + zc).clamp_(qmin, qmax)
            q[:, col] = qi.to(torch.int8)
            e = (wb[:, i] - (qi - zc) * sc) / ub[i, i]
            wb[:, i + 1 :].sub_(e[:, None] * ub[i, i + 1 :][None, :])
            err[:, i] = e
        if b1 < k:
            w[:, b1:].sub_(err @ u[b0:b1, b1:])
    return q


#: rows quantized at a time: GPTQ treats rows independently (they share H), so the float copies of a large
#: layer (a 49,152-row output projection: 113 MiB each) are never made whole
_GPTQ_ROWS = 4096


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  damping: float = DAMPING, block_columns: int = BLOCK_COLUMNS,
                  static_groups: bool = True, group_search: bool = False) -> QuantizedWeight:
    """GPTQ of one Linear weight [N, K] given its Hessian [K, K]; the result is MoQ's format (module docstring).

    static_groups: each group's scale and zero point are RTN's on the original weight (True), or RTN's on
    the group's columns as the updates have left them when its first column is reached (False).
    group_search (with static_groups=False): the range search's instead of RTN's, its squared error weighted
    by the inputs' energy H_ii.
    Columns whose input was always zero (H_ii = 0) carry no information: they are quantized as they are."""
    n, k = weight.shape
    scales, zeros, qmin, qmax = _group_params(weight, bits, group_size, symmetric)
    column_group = torch.arange(k, device=weight.device) // group_size
    order = None
    if ACT_ORDER and static_groups:
        # columns with the largest inputs first, while most columns are left to take their error
        order = torch.argsort(torch.diagonal(hessian.float()), descending=True)
        column_group = column_group[order]
    u = _cholesky_of_inverse(hessian, damping, order)
    energy = torch.diagonal(hessian).float()
    packed = k if bits == 8 else -(-k // 2)
    qweight = torch.empty(n, packed, dtype=torch.int8 if bits == 8 else torch.uint8, device=weight.device)
    for r0 in range(0, n, _GPTQ_ROWS):
        r1 = min(r0 + _GPTQ_ROWS, n)
        w = weight.detach()[r0:r1].float().clone()  # [n, K], updated in place
        sr, zr = scales[r0:r1], None if zeros is None else zeros[r0:r1]
        s = sr.float()[:, column_group]
        z = zr.float()[:, column_group] if zr is not None else torch.zeros_like(s)
        regroup = None
        if order is not None:
            w = w[:, order]
        elif not static_groups:
            def regroup(col, w_now, sr=sr, zr=zr, s=s, z=z):
                if col % group_size:
                    return
                g, stop = col // group_size, min(col + group_size, k)
                gs, gz, _, _ = _group_params(w_now[:, col:stop], bits, stop - col, symmetric,
                                             energy[col:stop] if group_search else None)
                sr[:, g] = gs[:, 0]
                s[:, col:stop] = gs.float()
                if gz is not None:
                    zr[:, g] = gz[:, 0]
                    z[:, col:stop] = gz.float()
        q = _gptq_rows(w, s, z, u, qmin, qmax, block_columns, regroup)
        if order is not None:
            q = torch.empty_like(q).index_copy_(1, order, q)  # back to the weight's column order
        qweight[r0:r1] = q if bits == 8 else pack_int4(q)
        del w, s, z, q
    return QuantizedWeight(qweight, scales.to(SCALE_DTYPE).contiguous(),
                           None if zeros is None else zeros.to(SCALE_DTYPE).contiguous(), bits, group_size, k)


# -- calibration data ----------------------------------------------------------------------------------------


def builtin_calibration_ids(tokenizer, sequences: int = CALIBRATION_SEQUENCES,
                            length: int = CALIBRATION_LENGTH) -> torch.Tensor:
    """[sequences, length] token ids of built-in English text (CPython's pydoc topics), taken after the part
    that :func:`hf_fastinfer.evaluation.reference_tokens` (perplexity) reads. Each row is framed by the
    tokenizer's own special tokens (an encoder's [CLS] ... [SEP], a decoder's BOS where it adds one), as the
    model's real inputs are: an encoder's activations at [CLS] differ from those at any word."""
    from hf_fastinfer.evaluation import reference_text

    ids = tokenizer(reference_text(), add_special_tokens=False)["input_ids"]
    # the tokens the tokenizer puts around a text of its own accord: found by framing a short word
    bare = tokenizer("word", add_special_tokens=False)["input_ids"]
    framed = tokenizer("word", add_special_tokens=True)["input_ids"]
    at = next((i for i in range(len(framed) - len(bare) + 1) if framed[i : i + len(bare)] == bare), None)
    prefix, suffix = ([], []) if at is None else (framed[:at], framed[at + len(bare):])
    special = len(prefix) + len(suffix)
    body = length - special
    if body < 1:
        raise ValueError(f"calibration sequences of {length} tokens leave no room beside {special} special tokens")
    need = sequences * body
    start = min(_CALIBRATION_OFFSET, max(0, len(ids) - need))
    if len(ids) - start < need:
        raise ValueError(f"the built-in calibration text has {len(ids)} tokens for this tokenizer, fewer than "
                         f"the {need} asked for")
    rows = [prefix + ids[start + i * body : start + (i + 1) * body] + suffix for i in range(sequences)]
    return torch.tensor(rows, dtype=torch.long)


def check_calibration_ids(ids, config) -> torch.Tensor:
    """The user's calibration token ids as a [sequences, length] int64 tensor, or a ValueError saying what is
    wrong with them: empty, not integers, sequences of different lengths, ids outside the vocabulary, or
    longer than the model's context."""
    if isinstance(ids, (list, tuple)):
        if not ids:
            raise ValueError("FastInferConfig(calibration=...): the calibration token ids are empty")
        rows = [list(r) if isinstance(r, (list, tuple)) else r for r in ids]
        if all(isinstance(r, int) for r in rows):
            rows = [rows]
        if any(not isinstance(r, list) for r in rows) or len({len(r) for r in rows}) != 1:
            raise ValueError("FastInferConfig(calibration=...): token ids must be a list of equally long lists of "
                             "ints (or a 2-D integer tensor [sequences, length])")
        if any(not isinstance(t, int) or isinstance(t, bool) for r in rows for t in r):
            raise ValueError("FastInferConfig(calibration=...): token ids must be integers")
        ids = torch.tensor(rows, dtype=torch.long)
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"FastInferConfig(calibration=...) takes 'builtin' or token ids (a 2-D integer tensor or "
                         f"a list of lists of ints), got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"FastInferConfig(calibration=...): token ids must be integers, got a {ids.dtype} tensor "
                         "(pass tokenizer(...)['input_ids'], not embeddings or floats)")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"FastInferConfig(calibration=...): token ids must be [sequences, length], got shape "
                         f"{tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("FastInferConfig(calibration=...): the calibration token ids are empty")
    ids = ids.long()
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text_config, "vocab_size", None)
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"FastInferConfig(calibration=...): token ids must lie in [0, {vocab}) for this model, got "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    context = getattr(text_config, "max_position_embeddings", None)
    if context is not None and ids.shape[1] > context:
        raise ValueError(f"FastInferConfig(calibration=...): calibration sequences of {ids.shape[1]} tokens are "
                         f"longer than this model's context ({context} tokens); cut them into shorter rows")
    return ids


# -- the model-level driver ----------------------------------------------------------------------------------


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the ModuleList holding the most Linear layers (decoder / encoder layers)."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(isinstance(m, nn.Linear) for m in module.modules())
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise ValueError(f"calibration needs a model made of repeated blocks with Linear layers; "
                         f"{type(model).__name__} has none")
    return best


def _forward_model(model: nn.Module, ids: torch.Tensor) -> None:
    kwargs = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
    model(input_ids=ids, **kwargs)


def _block_call(model: nn.Module, blocks: nn.ModuleList, index: int, ids: torch.Tensor):
    """Run the model on ``ids`` up to block ``index`` and return what that block is called with: (hidden
    states, the other positional arguments, keyword arguments)."""
    captured = {}

    def hook(module, args, kwargs):
        if args:
            captured["hidden"], captured["args"] = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            captured["hidden"], captured["args"] = kwargs.pop("hidden_states"), ()
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = blocks[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _forward_model(model, ids)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise RuntimeError(f"calibration: the model's forward did not call block {index}")
    return captured["hidden"], captured["args"], captured["kwargs"]


def _run_block(block: nn.Module, hidden: torch.Tensor, args, kwargs) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _hessian_hooks(linears: dict[str, nn.Linear],
                   stages: list[list[str]] | None = None) -> tuple[dict[str, HessianAccumulator], list]:
    """Forward pre-hooks that add each Linear's input to its Hessian; Linears fed the same tensor one after
    the other (q/k/v, gate/up) share one product x^T x. ``stages``, when given, receives the Linears in the
    order the forward first calls them, those sharing an input in one list: [[q, k, v], [o], [gate, up], [down]]."""
    accumulators = {name: HessianAccumulator(m.in_features, m.weight.device) for name, m in linears.items()}
    last: dict = {}
    staged: set[str] = set()

    def hook_for(name):
        def hook(module, args):
            # the same tensor object (held here, so its memory cannot be reused by another input meanwhile)
            new_input = last.get("input") is not args[0]
            if new_input:
                xf = args[0].reshape(-1, args[0].shape[-1]).float()  # [T, K]
                last.update(input=args[0], product=gram(xf), rows=xf.shape[0])
            accumulators[name].add_product(last["product"], last["rows"])
            if stages is not None and name not in staged:
                if new_input or not stages:
                    stages.append([])
                stages[-1].append(name)
                staged.add(name)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in linears.items()]
    return accumulators, handles


@torch.no_grad()
def calibrate_model(model: nn.Module, bits_for: dict[str, int], group_size: int, symmetric: bool,
                    ids: torch.Tensor, *, alternative_bits: int | None = None,
                    tied_output: str | None = None, damping: float = DAMPING,
                    progress: bool = True) -> dict[str, QuantizedWeight]:
    """Quantize, with GPTQ, every ``nn.Linear`` named in ``bits_for`` (name -> 8 or 4) in place: each becomes a
    :class:`~hf_fastinfer.quant.MoQLinear` (module docstring for the order). ``alternative_bits``: also keep a
    GPTQ version at these bits in ``module.alternative`` (``bits="auto"``). ``tied_output``: the name of an
    output projection that shares the input embedding's weight; it is quantized here too, but left for the
    caller to swap in (it has to be untied), and returned as {name: quantized weight}."""
    from .moq_linear import MoQLinear

    model.eval()
    blocks_name, blocks = find_blocks(model)
    device = next(model.parameters()).device
    ids = ids.to(device)
    batches = [ids[i : i + _BATCH] for i in range(0, ids.shape[0], _BATCH)]
    checkpoints = mapped_checkpoints()

    def quantize(name: str, linear: nn.Linear, hessian: torch.Tensor):
        """(its weight at its bits, the bits="auto" alternative or None), both GPTQ on one Hessian."""
        def at(bits):
            return gptq_quantize(linear.weight, hessian, bits, group_size, symmetric, damping,
                                 static_groups=STATIC_GROUPS, group_search=GROUP_SEARCH)
        bits = bits_for[name]
        return at(bits), None if alternative_bits in (None, bits) else at(alternative_bits)

    def quantize_into(name: str, linear: nn.Linear, hessian: torch.Tensor) -> MoQLinear:
        weight, alternative = quantize(name, linear, hessian)
        module = MoQLinear.from_linear(linear, weight.bits, group_size, symmetric, quantized=weight)
        module.alternative = alternative
        return module

    # 1. the first block's inputs, and the arguments each block type is called with
    calls = {}  # (attention type, batch rows) -> (args, kwargs)
    hidden = []
    for batch in batches:
        h, args, kwargs = _block_call(model, blocks, 0, batch)
        hidden.append(h)
        calls[(getattr(blocks[0], "attention_type", None), batch.shape[0])] = (args, kwargs)

    names = {id(m): n for n, m in model.named_modules()}
    bar = tqdm(total=len(blocks) + 1, desc=f"MoQ: calibrating ({_label(bits_for)}, GPTQ)", unit="block",
               disable=not progress)
    try:
        for index, block in enumerate(blocks):
            kind = getattr(block, "attention_type", None)
            for batch in batches:
                if (kind, batch.shape[0]) not in calls:  # e.g. a sliding-window layer after full-attention ones
                    _, args, kwargs = _block_call(model, blocks, index, batch)
                    calls[(kind, batch.shape[0])] = (args, kwargs)
            linears = {names[id(m)]: m for m in block.modules()
                       if type(m) is nn.Linear and names.get(id(m)) in bits_for}
            # 2. Hessians of this block's float Linears, on the outputs of the quantized blocks before it; with
            # SEQUENTIAL, each later stage's Hessians again once the stages before it in the block are quantized
            def hessians(subset, stages=None):
                accumulators, handles = _hessian_hooks(subset, stages)
                if stages is None:
                    # a later stage: the rest of the block is not needed once its last Linear has its input
                    handles.append(subset[list(subset)[-1]].register_forward_pre_hook(_stop_forward))
                try:
                    for h, batch in zip(hidden, batches):
                        args, kwargs = calls[(kind, batch.shape[0])]
                        try:
                            _run_block(block, h, args, kwargs)
                        except _StopForward:
                            pass
                finally:
                    for handle in handles:
                        handle.remove()
                return accumulators

            stages: list[list[str]] = []
            accumulators = hessians(linears, stages)
            uncalled = [n for n in linears if not any(n in stage for stage in stages)]  # e.g. unrouted experts
            if not SEQUENTIAL:
                stages = [[n for stage in stages for n in stage]]
            for number, stage in enumerate(stages + [uncalled]):
                if number and stage is not uncalled:
                    accumulators.update(hessians({n: linears[n] for n in stage}))
                for name in stage:
                    _replace(model, name, quantize_into(name, linears[name], accumulators[name].hessian))
                    release_tensor_pages(linears[name].weight, checkpoints)
            del accumulators, linears
            release_free_heap()
            # 3. the quantized block's outputs feed the next block
            for i, batch in enumerate(batches):
                args, kwargs = calls[(kind, batch.shape[0])]
                hidden[i] = _run_block(block, hidden[i], args, kwargs)
            bar.update(1)
        del hidden, calls

        # 4. the Linears outside the blocks (an output projection, a pooler): one pass of the quantized model
        block_ids = {id(m) for m in blocks.modules()}
        rest = {n: m for n, m in model.named_modules()
                if type(m) is nn.Linear and id(m) not in block_ids and (n in bits_for or n == tied_output)}
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied = {}
        if rest:
            accumulators, handles = _hessian_hooks(rest)
            stop = None
            if output is not None and names.get(id(output)) in rest:
                # after its Hessian is taken, the logits are not needed: end the pass there
                stop = output.register_forward_pre_hook(_stop_forward)
            try:
                for batch in batches:
                    try:
                        _forward_model(model, batch)
                    except _StopForward:
                        pass
            finally:
                for handle in handles + ([stop] if stop is not None else []):
                    handle.remove()
            for name, linear in rest.items():
                if accumulators[name].rows == 0:
                    raise RuntimeError(f"calibration: the model's forward did not reach {name}")
                if name == tied_output:
                    tied[name] = quantize(name, linear, accumulators[name].hessian)
                else:
                    _replace(model, name, quantize_into(name, linear, accumulators[name].hessian))
                    release_tensor_pages(linear.weight, checkpoints)
            release_free_heap()
        bar.update(1)
    finally:
        bar.close()
    return tied


def _label(bits_for: dict[str, int]) -> str:
    kinds = sorted(set(bits_for.values()))
    return "/".join(f"int{b}" for b in kinds) if kinds else "nothing"


def calibration_record(ids: torch.Tensor, source: str, damping: float = DAMPING) -> dict:
    """What a saved config says about how its weights were calibrated."""
    return {"method": "gptq", "source": source, "sequences": int(ids.shape[0]), "sequence_length": int(ids.shape[1]),
            "damping": damping, "block_columns": BLOCK_COLUMNS,
            "group_params": "rtn_static" if STATIC_GROUPS else (
                "search_at_group_start" if GROUP_SEARCH else "rtn_at_group_start"),
            "sequential": SEQUENTIAL}
