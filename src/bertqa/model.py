"""BERT encoder and the SQuAD span head.

Module and parameter names follow HuggingFace `modeling_bert.py`, which makes them the weight-key contract:
an HF `BertModel` / `BertForQuestionAnswering` state dict loads with no renaming. Devices, precision, DDP and
files are applied from outside; all this file knows of them is which kernels are fastest where (the CPU
dropout mask, the blocked attention, the fused bf16 linear layers of CPU inference, SDPA's backends on a GPU).
"""

from __future__ import annotations

import contextvars
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import ATTENTION_CHOICES, BertConfig
from .runtime import cpu_features, onednn_may_use


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _gelu_tanh_(x):
    return torch.ops.aten.gelu_(x, approximate="tanh")


# hidden_act -> (the function, the same activation as a post-op of oneDNN's fused linear: the attr and
# algorithm arguments of mkldnn._linear_pointwise, the function in place)
ACTIVATIONS = {
    "gelu": (F.gelu, ("gelu", "none"), torch.ops.aten.gelu_),  # erf form: Google's, HF's and NVIDIA's "gelu"
    "gelu_new": (_gelu_tanh, ("gelu", "tanh"), _gelu_tanh_),  # tanh form (GPT-2's)
    "gelu_pytorch_tanh": (_gelu_tanh, ("gelu", "tanh"), _gelu_tanh_),
    "relu": (F.relu, ("relu", None), torch.relu_),
}


@functools.cache
def _fused_linear_works() -> bool:
    """Whether this torch build runs oneDNN's fused bf16 linear on this CPU (x86 builds do; others may lack it
    or refuse bf16), probed once on a tiny case."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(3, 4, dtype=torch.bfloat16))
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4, dtype=torch.bfloat16), w, torch.zeros(3), "gelu",
                                               [], "none")  # fmt: skip
        return y.shape == (2, 3) and bool((y == 4).all())  # GELU(4) = 3.99987, 4 in bf16
    except RuntimeError:
        return False


def _plain_autograd() -> bool:
    """Whether kernels without functorch or forward-mode rules (BitDropout, ActivationLinear, BlockedAttention,
    oneDNN's fused linear) may run: not under a torch.func transform (grad, vmap, jacrev, ...) nor forward-mode
    AD, where they raise or (the fused linear) give no tangent; the plain forms run there."""
    return not torch._C._are_functorch_transforms_active() and forward_ad._current_level < 0


def _compiling() -> bool:
    """Under torch.compile or torch.export, which choose their own kernels and buffers (and trace no context
    variable)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


# What the layers of one BertModel pass share (Linear.into_scratch): a dict for the pass, in the context of the thread
# running it (two threads running one model each have their own). None outside a pass, and in a pass that a forward
# hook could see (BertModel._hooked): then no layer writes over a tensor it made (the residuals, the feed-forward's
# output), so what a hook keeps stays as it was. Not an argument: modules swapped in for a layer's, and hooks, see
# the arguments they saw before.
_SCRATCH: contextvars.ContextVar[dict | None] = contextvars.ContextVar("bertqa_scratch", default=None)


class Linear(nn.Linear):
    """nn.Linear with an optional activation. In bf16 inference on a CPU it runs as one oneDNN kernel: the bias
    and the activation are applied in the GEMM's epilogue to the fp32 accumulator, and the weight is a bf16 copy
    packed once, and again when model.eval() or load_state_dict() is called or the weight changes in place as
    autograd counts changes: not one made through `weight.data`, nor one under torch.inference_mode() to a weight
    made there, which only model.eval() then tells of. That saves the bias copy, the separate activation pass and
    the per-call weight cast (12% of an inference step on MiniLM).
    Everywhere else (autograd, torch.func and forward-mode AD, other devices and precisions, torch.compile,
    export) it is F.linear then the activation."""

    def __init__(self, in_features: int, out_features: int, activation: str | None = None):
        super().__init__(in_features, out_features)
        self.activation = activation  # a key of ACTIVATIONS (BertConfig checks hidden_act), or None
        self._packed = None  # ((weight version, data pointer), packed bf16 weight); not in the state dict

    def forward(self, x):
        if self.fused_bf16(x):
            attr, algorithm = ("none", None) if self.activation is None else ACTIVATIONS[self.activation][1]
            w = self._packed_weight()
            return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), w, self.bias, attr, [], algorithm)
        if self.into_scratch(x) and (scratch := _SCRATCH.get()) is not None:  # (set by BertModel for a pass)
            rows = x.numel() // x.size(-1)
            held = scratch.get(self.out_features)
            if held is None or held.numel() < rows * self.out_features:
                held = scratch[self.out_features] = x.new_empty(rows * self.out_features)
            y = held[: rows * self.out_features].view(rows, self.out_features)
            x2 = x.reshape(rows, x.size(-1))  # (not -1: a batch of no windows has rows == 0)
            torch.addmm(self.bias, x2, self.weight.t(), out=y)  # what F.linear runs, bit for bit
            return ACTIVATIONS[self.activation][2](y).view(*x.shape[:-1], self.out_features)
        y = F.linear(x, self.weight, self.bias)
        return y if self.activation is None else ACTIVATIONS[self.activation][0](y)

    def into_scratch(self, x) -> bool:
        """Whether forward(x), inside a BertModel pass without hooks, writes its output into the pass's scratch
        tensor (one for every layer; a view of it is returned), activated in place: an activation (the
        feed-forward's first layer), fp32 on a CPU without autograd, nor an input that needs a gradient (reentrant
        checkpointing runs a layer without autograd first, and the next layer would overwrite what its backward
        pass reads), eager mode. That 4C-wide output is the one tensor of inference past glibc's 32 MB mmap
        threshold (from 171 tokens at batch 32 on MiniLM), so each new one was fresh pages, faulted in on first
        touch: with one tensor for all layers and the activation in place (not a second such tensor), fp32
        inference took 4.4% less time on the bench's batches (6-12% at 180-384 tokens; README). Other precisions
        and devices keep their own kernels (bf16: fused_bf16)."""
        return (
            self.activation is not None
            and self.bias is not None
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not x.requires_grad
            and self._untracked(x)
        )

    def fused_bf16(self, x) -> bool:
        """Whether forward(x) takes the fused oneDNN kernel: bf16 compute (autocast or bf16 input) on a CPU,
        no autograd through it (nor torch.func, nor forward-mode AD: the kernel has no rules there, and a dual
        input's tangent was dropped), eager mode, and a torch build that runs the kernel."""
        bf16 = x.dtype == torch.bfloat16 or (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
        return (
            bf16
            and x.device.type == "cpu"
            and self.weight.dtype in (torch.float32, torch.bfloat16)  # (oneDNN's kernel takes no other)
            and self._untracked(x)
            and _fused_linear_works()
        )

    def _untracked(self, x) -> bool:
        """No autograd through forward(x) (nor torch.func, nor forward-mode AD) and eager mode: where the kernels
        that have no rules there (the fused linear, addmm into the shared tensor) may run."""
        return (
            not (
                torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias))
            )
            and not (_compiling() or torch.jit.is_tracing())
            and _plain_autograd()
        )

    def train(self, mode: bool = True):
        # Training changes the weight: no stale packed copy is held meanwhile. eval() repacks too: a weight changed
        # through .data (weight averaging, say) keeps its version counter, so only this tells of the change.
        self._packed = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        # load_state_dict copies into the weight in place, which a weight made under inference_mode has no version
        # counter to tell of.
        self._packed = None
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):  # copy.deepcopy, pickle: the packed weight is opaque to them, and rebuilt on use
        return {**self.__dict__, "_packed": None}

    def _packed_weight(self):
        # A weight made under torch.inference_mode() has no version counter (and cannot change outside it).
        key = (None if self.weight.is_inference() else self.weight._version, self.weight.data_ptr())
        if self._packed is None or self._packed[0] != key:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().to(torch.bfloat16))
            self._packed = (key, packed)
        return self._packed[1]


def keep_mask(shape, p: float, device) -> tuple[torch.Tensor, float]:
    """BitDropout's mask of `shape` (bytes: 1 keeps, 0 drops) and the scale of what it keeps, 1 / P(keep)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    dropped = round(p * 65536)  # of 65,536 equally likely 16-bit values
    keep = torch.empty(shape, dtype=torch.uint8, device=device)
    torch.ge(words.view(torch.int16)[:n].view(shape), -32768 + dropped, out=keep)
    return keep, 65536 / (65536 - dropped)


def bit_dropout_applies(x, p: float) -> bool:
    """Whether dropout(x, p, training=True) takes BitDropout's mask: p not rounded to 0 or 1 (a multiple of
    2^-16), on a CPU (other devices have fused dropout kernels), not under torch.compile (inductor fuses
    F.dropout's mask, and tracing `random_` breaks the graph), torch.func or forward-mode AD (F.dropout has rules
    there, BitDropout none)."""
    return (
        0 < round(p * 65536) < 65536
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and _plain_autograd()
    )


class BitDropout(torch.autograd.Function):
    """Dropout whose mask comes from 16-bit slices of random 64-bit words: on a CPU, 3x faster than torch's
    `bernoulli_` mask (5.4 vs 16.4 ms on 32 x 180 x 384 bf16), which took a tenth of a training step. The drop
    probability is p rounded to a multiple of 2^-16 (0.1 -> 0.1000061). The mask is kept as bytes (0 or 1), not
    bools: torch multiplies a bf16 tensor by a uint8 one 3x faster than by a bool one (0.44 vs 1.46 ms on
    32 x 175 x 384), which it converts element by element, and the comparison writes bytes 2x faster too."""

    @staticmethod
    def forward(ctx, x, p: float):
        keep, ctx.scale = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        return (x * keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None


def dropout(x, p: float, training: bool):
    """F.dropout, with BitDropout's mask where bit_dropout_applies."""
    if training and bit_dropout_applies(x, p):
        return BitDropout.apply(x, p)
    return F.dropout(x, p, training)


class Dropout(nn.Dropout):
    def forward(self, x):
        return dropout(x, self.p, self.training)


class ActivationLinear(torch.autograd.Function):
    """linear(act(pre), weight, bias), the feed-forward block's activation and second linear layer, keeping only
    `pre` for the backward pass, where act(pre) is computed again: for GELU autograd would keep both `pre` (for
    the activation's gradient) and act(pre) (for the weight's), two 4C-wide tensors per window position and layer.
    For fp32 MiniLM at batch 32 (an AVX2 CPU) that is 16-23% less kept at 256-384 tokens, the bench's training peak
    8-13% lower, and steps 3% faster: the recomputation costs less than the page faults of a larger resident
    set. The gradients are those autograd gives through the modules, bit for bit."""

    @staticmethod
    def forward(ctx, pre, weight, bias, act):  # (act: a function of ACTIVATIONS)
        h = act(pre)
        y = F.linear(h, weight, bias)  # under autocast: in its dtype, as the layer it replaces
        ctx.save_for_backward(pre, weight)
        ctx.act, ctx.h_dtype, ctx.dtype, ctx.bias_dtype = act, h.dtype, y.dtype, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        pre, weight = ctx.saved_tensors
        # With create_graph=True (a gradient penalty, say) this pass is differentiated in turn: it then runs on
        # `pre` itself, in the graph.
        graph = torch.is_grad_enabled()
        # (inference_mode(False): a backward called under inference mode, where enable_grad alone records nothing)
        with torch.inference_mode(False), torch.enable_grad():  # h's dtype as in forward, whatever autocast made
            p = pre if graph else pre.detach().requires_grad_(ctx.needs_input_grad[0])
            h = ctx.act(p.to(ctx.h_dtype))
        g = grad.reshape(-1, grad.size(-1))
        grad_w = grad_b = grad_pre = None
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ (h if graph else h.detach()).reshape(-1, h.size(-1)).to(ctx.dtype)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            (grad_pre,) = torch.autograd.grad(h, p, grad @ weight.to(ctx.dtype), create_graph=graph)
        return grad_pre, grad_w, grad_b, None


def _recompute_activation(layer, a) -> bool:
    """Whether `layer` trains with ActivationLinear: a GELU, autograd saving tensors for a backward pass, and the
    plain form running no more than the stock modules' forward: their own classes and forward methods, no hooks
    on them or on every module (pruning and weight norm set the weight in a pre-hook, Opacus records per-sample
    gradients in hooks), no tensor subclass among the weights, no torch.func transform or forward-mode AD (the
    Function has no rules for them), no compilation, export or tracing (inductor chooses what to recompute)."""
    if not torch.is_grad_enabled() or _compiling():
        return False
    modules = (layer.intermediate, layer.intermediate.dense, layer.output, layer.output.dense)
    if tuple(map(type, modules)) != (BertIntermediate, Linear, BertOutput, Linear) or any(
        "forward" in vars(m) or type(m).forward is not _STOCK_FORWARD[type(m)] for m in modules
    ):  # replaced or patched (accelerate's hooks replace an instance's forward)
        return False
    if modules[1].activation not in RECOMPUTED_ACTIVATIONS:
        return False
    hooks = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    tensors = [t for m in modules[1::2] for t in (m.weight, m.bias) if t is not None] + [a]
    return (
        not torch.overrides.has_torch_function(tensors)  # (per-sample gradients' ExpandedWeight, say)
        and any(t.requires_grad for t in tensors)
        and not any(getattr(m, name) for m in modules for name in hooks)
        and not any(getattr(nn.modules.module, "_global" + name) for name in hooks)
        and _plain_autograd()
        and not torch.jit.is_tracing()
    )


# SDPA's kernels, without cuDNN attention: torch's own choice (torch 2.11 on an H200 took it for every call,
# padded or not) builds a plan per sequence length, measured at 125-450 ms for a MiniLM training step at each new
# length, against 16 ms for the same step with the flash / memory-efficient kernels. Length-grouped batches and
# evaluation meet new lengths at almost every step. On a CPU this changes nothing (cuDNN is CUDA's). The
# "overrideable" backend stays on where torch has it (2.5 on): XPU's oneDNN attention and out-of-tree devices' are it.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] + (
    [SDPBackend.OVERRIDEABLE] if hasattr(SDPBackend, "OVERRIDEABLE") else []
)


def sdpa_attention(q, k, v, mask, dropout_p):
    """q, k, v: (B, nh, T, hs); mask: (B, 1, 1, T) bool, True = attend, or None. The mask goes in as the other forms'
    padding bias: SDPA turns a bool one into an additive one anyway (as fast: 0.73 s either way for a MiniLM pass of
    32 x 192 tokens in fp32 on a CPU), and a row whose keys are all masked then averages them all, as the written-out
    and blocked forms do (and transformers' eager attention), rather than depending on which form 'auto' chose. Its
    gradients would not: the fused kernels' log-sum-exp loses log(T) beside a bias that large (dv came out T times
    too large), so in training such a row attends to every key with equal scores instead (q zeroed: the same
    average and dv, and the exact gradients of that average, none for q and k, where the written-out forms give
    those of a softmax the bias swallowed; no host sync to find the rows). So too in fp16 (_dead_rows_zeroed)."""
    if mask is not None and (_fp16(q) or (torch.is_grad_enabled() and q.requires_grad)):
        mask, q = _dead_rows_zeroed(q, mask)
    with sdpa_kernel(SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=padding_bias(mask, q), dropout_p=dropout_p)


def _fp16(q) -> bool:
    """Whether attention on q computes in fp16 (q's own dtype, or autocast's)."""
    device = q.device.type
    return q.dtype == torch.float16 or (
        torch.amp.is_autocast_available(device)  # (not on "meta", say, where is_autocast_enabled raises)
        and torch.is_autocast_enabled(device)
        and torch.get_autocast_dtype(device) == torch.float16
    )


def _dead_rows_zeroed(q, mask):
    """(mask, q) where a row whose keys are all masked attends to all of them with q zeroed: equal scores, so the mean
    of its values, as a bias that swallows the scores gives. fp16's bias does not (half of -65504, where fp16 steps
    by 16: a score of magnitude 8 or more survives it, and in the fused kernels' fp32 arithmetic every score does),
    so every form applies this in fp16; SDPA in training too (sdpa_attention). No host sync to find the rows."""
    live = mask.any(-1, keepdim=True)  # (B, 1, 1, 1): the example attends to some key
    return mask | ~live, q * live


def padding_bias(mask, like):
    """The additive form of a (B, 1, 1, T) attention mask, in the dtype and on the device of `like`: 0 where it
    attends, half the dtype's lowest value where it does not (no weight, and finite: in fp16 a score below -16
    plus the lowest value would be -inf, and a row of masked keys alone then NaN); None without a mask. Not
    filled in place: under vmap over per-example masks the zeros are not batched, and torch.func refuses it."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
        ~mask, torch.finfo(like.dtype).min / 2
    )


def eager_attention(q, k, v, mask, dropout_p):
    """The reference, softmax(q k^T / sqrt(hs)) v, written out. The scale is applied to q (T x hs values, not
    T x T) and padding enters as an additive bias, whose backward is free (a masked_fill's is not)."""
    if mask is not None and _fp16(q):
        mask, q = _dead_rows_zeroed(q, mask)
    scores = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)  # (B, nh, T, T)
    if mask is not None:
        scores = scores + padding_bias(mask, scores)
    probs = dropout(scores.softmax(dim=-1), dropout_p, dropout_p > 0)
    return probs @ v  # (B, nh, T, hs)


# Beyond this many tokens, training does not keep the T x T attention probabilities for the backward pass:
# on the longest batches they would set a step's peak memory (one step of 32 x 384 kept 680 MB of them).
KEEP_PROBS_MAX_LEN = 256
BLOCK_BYTES = 2**20  # T x T scores per block of heads, per thread: small enough to stay in a CPU's caches


def _blocks(n: int, T: int, itemsize: int) -> list[slice]:
    step = max(1, BLOCK_BYTES * torch.get_num_threads() // (T * T * itemsize))
    return [slice(i, min(n, i + step)) for i in range(0, max(n, 1), step)]  # (one empty block for n == 0)


def _probs(qh, kt, bias, scale: float, b: slice, out, scratch=None):
    """softmax(q k^T * scale + bias) of the heads in block b, into `out`: (heads, T, T). With an fp32 `scratch`
    block (for bf16 / fp16 scores), the softmax runs in fp32 there: torch's CPU softmax is 2.4x faster on
    fp32 than on bf16 (2.4 vs 1.0 G elements/s), more than the two copies cost, and computes in fp32 either way."""
    if bias is None:
        torch.bmm(qh[b], kt[b], out=out).mul_(scale)
    else:
        torch.baddbmm(bias[b], qh[b], kt[b], alpha=scale, out=out)
    if scratch is None:
        return torch._softmax(out, -1, False, out=out)
    s = scratch[: out.size(0)].copy_(out)
    return out.copy_(torch._softmax(s, -1, False, out=s))


def _softmax_scratch(blocks: list[slice], T: int, like, keys: int | None = None):
    """An fp32 block for _probs' softmax (T x `keys` scores a head) where the scores are bf16 / fp16 on a CPU;
    else None."""
    if like.dtype not in (torch.bfloat16, torch.float16) or like.device.type != "cpu":
        return None
    return torch.empty(blocks[0].stop, T, keys or T, dtype=torch.float32, device=like.device)


def _padded(x, dim: int, size: int, value: float = 0.0):
    """x made contiguous, with `value` after it along `dim` up to `size`."""
    if x.size(dim) == size:
        return x.contiguous()
    out = x.new_empty(x.shape[:dim] + (size,) + x.shape[dim + 1 :])
    out.narrow(dim, 0, x.size(dim)).copy_(x)
    out.narrow(dim, x.size(dim), size - x.size(dim)).fill_(value)
    return out


class BlockedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v, written out but computed a few heads at a time, so that each block's
    scores are made, soft-maxed (bf16 ones in an fp32 scratch block, see _probs) and multiplied by v while
    still in cache; the scale and the padding bias ride on the first GEMM (baddbmm). The backward pass goes
    block by block too, from the kept probabilities or, beyond KEEP_PROBS_MAX_LEN tokens, from probabilities
    recomputed as the fused kernels do. On a CPU: 1.7-2x faster than the plain written-out form to train, and
    faster than SDPA's fused kernels but in fp32 inference and in bf16 inference on a CPU with AMX (auto_attention).

    With `dropout_p`, each block's probabilities are dropped before the product with v (and dP masked alike in the
    backward pass) by BitDropout's mask of all the (B, nh, T, T) probabilities, drawn as the written-out form's
    dropout() draws it and kept for the backward pass: the same seed, the same mask.

    Without a backward pass or dropout on a CPU, the keys are padded to a multiple of 16 (zero K^T columns and V
    rows, to which the bias gives a score of -inf, so a weight of exactly 0 even in a row whose real keys are all
    masked): torch's fp32 CPU softmax runs up to twice as fast per element on rows of such lengths. The sums are
    the same but for the GEMMs' order of summation (inference +1%)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float, dropout_p: float = 0.0):
        B, nh, T, hs = q.shape
        n = B * nh
        backward = any(ctx.needs_input_grad[:3])
        padded = not (backward or dropout_p) and q.device.type == "cpu"
        Tk = -(-T // 16) * 16 if padded else T  # the keys, padded in CPU inference
        qh = q.reshape(n, T, hs)  # (B*nh, T, hs)
        vh = _padded(v, 2, Tk).view(n, Tk, hs)
        kt = _padded(k.transpose(-2, -1), 3, Tk).view(n, hs, Tk)  # K^T: the faster GEMM operand
        if Tk > T:  # the padded keys get no weight
            bias = _padded(q.new_zeros(B, 1, 1, T) if bias is None else bias, 3, Tk, -math.inf)
        if bias is not None:
            bias = bias.expand(B, nh, 1, Tk).reshape(n, 1, Tk)
        out = torch.empty(n, T, hs, dtype=q.dtype, device=q.device)
        keep = backward and T <= KEEP_PROBS_MAX_LEN
        blocks = _blocks(n, T, q.element_size())
        probs = torch.empty(n if keep else blocks[0].stop, T, Tk, dtype=q.dtype, device=q.device)
        scratch = _softmax_scratch(blocks, T, q, Tk)
        # Dropout on the probabilities: BitDropout's mask of them all, drawn as dropout() draws it for the
        # written-out form's (B, nh, T, T), and kept for the backward pass (a byte a score).
        mask, ctx.keep_scale = keep_mask((n, T, T), dropout_p, q.device) if dropout_p else (None, 1.0)
        dropped = None if mask is None else torch.empty_like(probs[: blocks[0].stop])
        for b in blocks:
            p = _probs(qh, kt, bias, scale, b, probs[b] if keep else probs[: b.stop - b.start], scratch)
            torch.bmm(p if mask is None else _dropped(p, mask[b], ctx.keep_scale, dropped), vh[b], out=out[b])
        if backward:
            ctx.save_for_backward(qh, kt, vh, probs if keep else None, bias, mask)
            ctx.scale = scale
        return out.view(B, nh, T, hs)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # (else bmm's out= raises, naming neither the model nor a way out)
            raise RuntimeError(
                "bertqa's blocked attention (attn_implementation 'blocked', or 'auto' on a CPU where autograd records) "
                "has no second derivative (a backward with create_graph=True): build the "
                "model with attn_implementation='eager' (SDPA's fused CPU kernel has none either)"
            )
        qh, kt, vh, probs, bias, mask = ctx.saved_tensors
        B, nh, T, hs = grad.shape
        g = grad.reshape(B * nh, T, hs)
        dq, dk, dv = torch.empty_like(qh), torch.empty_like(qh), torch.empty_like(vh)
        blocks = _blocks(B * nh, T, qh.element_size())
        if probs is None:
            block = torch.empty(blocks[0].stop, T, T, dtype=qh.dtype, device=qh.device)
            scratch = _softmax_scratch(blocks, T, qh)
        dropped = None if mask is None else torch.empty(blocks[0].stop, T, T, dtype=qh.dtype, device=qh.device)
        for b in blocks:
            if probs is not None:
                p = probs[b]
            else:
                p = _probs(qh, kt, bias, ctx.scale, b, block[: b.stop - b.start], scratch)
            pd = p if mask is None else _dropped(p, mask[b], ctx.keep_scale, dropped)
            torch.bmm(pd.transpose(1, 2), g[b], out=dv[b])
            ds = torch.bmm(g[b], vh[b].transpose(1, 2))  # dP (of the dropped probabilities: dP of p, masked), then dS
            if mask is not None:
                ds.mul_(mask[b]).mul_(ctx.keep_scale)
            torch._softmax_backward_data(ds, p, -1, p.dtype, grad_input=ds)
            torch.bmm(ds, kt[b].transpose(1, 2), out=dq[b])
            torch.bmm(ds.transpose(1, 2), qh[b], out=dk[b])
        dq.mul_(ctx.scale)
        dk.mul_(ctx.scale)
        return dq.view(B, nh, T, hs), dk.view(B, nh, T, hs), dv.view(B, nh, T, hs), None, None, None


def _dropped(p, keep, scale: float, out):
    """BitDropout's forward on a block of probabilities, into `out` (a block's worth, or more)."""
    return torch.mul(p, keep, out=out[: p.size(0)]).mul_(scale)


def blocked_attention(q, k, v, mask, dropout_p):
    """BlockedAttention, its dropout BitDropout's; the written-out form under torch.func or forward-mode AD, and for
    dropout that BitDropout does not take (on other devices, under torch.compile, or a rate that rounds to 0 or 1)."""
    if not _plain_autograd() or (dropout_p > 0 and not bit_dropout_applies(q, dropout_p)):
        return eager_attention(q, k, v, mask, dropout_p)
    if mask is not None and q.dtype == torch.float16:  # (q carries the compute dtype)
        mask, q = _dead_rows_zeroed(q, mask)
    with torch.autocast(q.device.type, enabled=False):  # q, k, v already carry the compute dtype
        return BlockedAttention.apply(q, k, v, padding_bias(mask, q), 1.0 / math.sqrt(q.size(-1)), dropout_p)


ATTENTION = {"sdpa": sdpa_attention, "eager": eager_attention, "blocked": blocked_attention}


@functools.cache
def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tiles for bf16 (Intel Xeon from Sapphire Rapids on), as torch's cpuinfo reports it,
    and no ONEDNN_MAX_CPU_ISA keeps oneDNN from them. There SDPA's fused CPU kernel runs its bf16 GEMMs as AMX tile
    kernels and infers faster than the blocked attention, whose batched GEMMs per head do not gain as much."""
    return bool((cpu_features() or {}).get("amx_bf16")) and onednn_may_use("amx_bf16")


def auto_attention(device: torch.device, dropout_p: float, dtype: torch.dtype = torch.bfloat16,
                   backward: bool = True) -> str:  # fmt: skip
    """On a CPU, the blocked attention (the fastest there to train, with or without dropout on the attention
    probabilities, and to infer in bf16 but on a CPU with AMX; kept for fp16 everywhere), and SDPA's fused kernel to
    infer in fp32 (`dtype` of q, no `backward`: 3.7% less time over the bench's 16 batches on an AVX2-only EPYC) and
    in bf16 on a CPU with AMX (cpu_has_amx: 17-35% less time a bf16 pass of MiniLM at 64-384 tokens on an Intel Xeon
    with AMX; README, "Speed on a CPU with AMX"). fp16 stays blocked there (SDPA was faster in fp16 on that Xeon too,
    but the rule follows AMX for bf16, and AMX for fp16, amx_fp16, is a later CPU's, which no run here had). Other
    devices, and under torch.compile: SDPA (flash kernels). On a CPU under torch.func or forward-mode AD: the
    written-out form (SDPA's fused CPU kernel has no forward-mode rule, the blocked attention no functorch rules)."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return "sdpa"
    if not _plain_autograd():
        return "eager"
    if backward or dropout_p != 0:
        return "blocked"
    return "sdpa" if dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_amx()) else "blocked"


def auto_attention_in_words(device: torch.device, compiled: bool = False) -> str:
    """What auto_attention runs on `device` (the start-up line's words); `compiled`: the training forward is
    torch.compile'd (evaluation is not)."""
    if device.type != "cpu":
        return "sdpa: flash/memory-efficient kernels"
    train = "sdpa to train (torch.compile)" if compiled else "blocked to train"
    if cpu_has_amx():
        return f"{train}, sdpa to infer in fp32 and bf16, blocked in fp16: CPU has AMX"
    return f"{train}, sdpa to infer in fp32, blocked in bf16 / fp16"


class QAOutput(NamedTuple):
    start_logits: torch.Tensor  # (B, T), float32
    end_logits: torch.Tensor  # (B, T), float32
    loss: torch.Tensor | None


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        T = input_ids.size(1)
        positions = torch.arange(T, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))  # (B, T, C)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig, attn_implementation: str):
        super().__init__()
        C = config.hidden_size
        self.n_head = config.num_attention_heads
        self.query = Linear(C, C)
        self.key = Linear(C, C)
        self.value = Linear(C, C)
        self.dropout_p = config.attention_probs_dropout_prob
        self.attn_implementation = attn_implementation

    def forward(self, x, mask):
        B, T, C = x.shape
        hs = C // self.n_head
        if self.query.fused_bf16(x):
            x = x.to(torch.bfloat16)  # once for the three projections, not in each
        q, k, v = (lin(x).view(B, T, self.n_head, hs).transpose(1, 2) for lin in (self.query, self.key, self.value))
        dropout_p = self.dropout_p if self.training else 0.0
        impl = self.attn_implementation
        if impl == "auto":
            impl = auto_attention(x.device, dropout_p, q.dtype, torch.is_grad_enabled() and q.requires_grad)
        y = ATTENTION[impl](q, k, v, mask, dropout_p)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, C)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.add_norm(self.dense(h), residual)

    def add_norm(self, y, residual):
        y = self.dropout(y)
        if (
            torch.is_grad_enabled()
            or residual.requires_grad
            or not _plain_autograd()
            or _compiling()
            or _SCRATCH.get() is None
        ):
            return self.LayerNorm(y + residual)
        # Without autograd, in a BertModel pass without hooks, the residual (the layer's own input or its
        # attention's output, which nothing reads after this) takes the sum in place: the same fp32 sum, no new
        # tensor, and 1.3% faster inference. Not an input that needs a gradient: reentrant activation checkpointing
        # runs the layer without autograd first, then again from that same input. Nor under torch.func or
        # forward-mode AD: the tangent of a dual input would be overwritten too.
        return self.LayerNorm(residual.add_(y))


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, attn_implementation: str):
        super().__init__()
        self.self = BertSelfAttention(config, attn_implementation)
        self.output = BertSelfOutput(config)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size, activation=config.hidden_act)

    def forward(self, x):
        return self.dense(x)  # (B, T, 4C), activated


class BertOutput(BertSelfOutput):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.dense = Linear(config.intermediate_size, config.hidden_size)


# What _recompute_activation compares the feed-forward modules' methods with. ReLU is not recomputed: its backward
# keeps its output, which is the second linear layer's input, so autograd keeps one 4C-wide tensor already.
_STOCK_FORWARD = {cls: cls.forward for cls in (BertIntermediate, BertOutput, Linear)}
RECOMPUTED_ACTIVATIONS = {"gelu", "gelu_new", "gelu_pytorch_tanh"}


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, attn_implementation: str):
        super().__init__()
        self.attention = BertAttention(config, attn_implementation)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, mask):
        a = self.attention(x, mask)
        if _recompute_activation(self, a):  # training: the activation is computed again in the backward pass
            inner, outer = self.intermediate.dense, self.output.dense
            pre = F.linear(a, inner.weight, inner.bias)
            y = ActivationLinear.apply(pre, outer.weight, outer.bias, ACTIVATIONS[inner.activation][0])
            return self.output.add_norm(y, a)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig, attn_implementation: str):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, attn_implementation) for _ in range(config.num_hidden_layers))

    def forward(self, x, mask):
        for block in self.layer:
            x = block(x, mask)
        return x


class BertModel(nn.Module):
    """The encoder without pooler (question answering does not use it). Without autograd each layer adds its
    sublayers' outputs into their residuals in place (BertSelfOutput), and in CPU fp32 inference the layers'
    feed-forward activations share one tensor (Linear.into_scratch); not while a forward hook (or pre-hook) is
    registered on any of its modules, or on every module: what a hook keeps is then never written over."""

    def __init__(self, config: BertConfig, attn_implementation: str = "auto"):
        super().__init__()
        if attn_implementation not in ATTENTION_CHOICES:
            raise ValueError(f"unknown attention {attn_implementation!r}; choose from {', '.join(ATTENTION_CHOICES)}")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config, attn_implementation)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        """input_ids, token_type_ids, attention_mask: (B, T); returns the last hidden state (B, T, C)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # Callers pass None when nothing is padded: SDPA then picks its fastest (flash) kernel.
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        # (asked before the embeddings run: a hook there may remove itself as it runs, keeping their output)
        shared = not (_compiling() or self._hooked())
        x = self.embeddings(input_ids, token_type_ids)
        if not shared:  # (see _SCRATCH)
            return self.encoder(x, mask)
        held = _SCRATCH.set({})
        try:
            return self.encoder(x, mask)
        finally:
            _SCRATCH.reset(held)

    def _hooked(self) -> bool:
        """Whether a forward hook or pre-hook could keep a tensor of the pass: one on a module below this one, or a
        global one (torch.nn.modules.module.register_module_forward_hook)."""
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return True
        below = list(self._modules.values())  # (a walk of its own: modules() took 53 us on MiniLM, this 15)
        while below:
            m = below.pop()
            if m is not None and (m._forward_hooks or m._forward_pre_hooks or below.extend(m._modules.values())):
                return True
        return False


class BertForQuestionAnswering(nn.Module):
    def __init__(self, config: BertConfig, attn_implementation: str = "auto"):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, attn_implementation)
        self.qa_outputs = Linear(config.hidden_size, 2)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:  # as transformers: [PAD]'s row starts at zero (it gets no gradient)
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def set_attention_dropout(self, enabled: bool):
        """Apply the config's attention-probability dropout in training, or not (hidden dropout is unaffected)."""
        for m in self.modules():
            if isinstance(m, BertSelfAttention):
                m.dropout_p = self.config.attention_probs_dropout_prob if enabled else 0.0

    def set_attention(self, attn_implementation: str):
        if attn_implementation not in ATTENTION_CHOICES:
            raise ValueError(f"unknown attention {attn_implementation!r}; choose from {', '.join(ATTENTION_CHOICES)}")
        for m in self.modules():
            if isinstance(m, BertSelfAttention):
                m.attn_implementation = attn_implementation

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, start_positions=None, end_positions=None):
        h = self.bert(input_ids, token_type_ids, attention_mask)  # (B, T, C)
        logits = self.qa_outputs(h).float()  # (B, T, 2); fp32 so the loss and n-best are exact under autocast
        start_logits, end_logits = logits.unbind(dim=-1)  # (B, T) each
        loss = None
        if start_positions is not None and end_positions is not None:
            # As the NVIDIA recipe: positions outside the sequence are clamped to T and ignored.
            T = start_logits.size(1)
            s = start_positions.view(-1).clamp(0, T)
            e = end_positions.view(-1).clamp(0, T)
            loss = (
                F.cross_entropy(start_logits, s, ignore_index=T) + F.cross_entropy(end_logits, e, ignore_index=T)
            ) / 2
        return QAOutput(start_logits, end_logits, loss)
