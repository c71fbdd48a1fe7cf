"""BERT encoder and the SQuAD span head.

Module and parameter names follow HuggingFace `modeling_bert.py`, which makes them the weight-key contract:
an HF `BertModel` / `BertForQuestionAnswering` state dict loads with no renaming. This file knows nothing of
devices, precision, DDP or files; those are applied from outside.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import BertConfig

ACTIVATIONS = {
    "gelu": F.gelu,  # erf form: Google's and HF's "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # tanh form: NVIDIA's bias_gelu
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class BitDropout(torch.autograd.Function):
    """Dropout whose mask comes from 16-bit slices of random 64-bit words: on a CPU, 3x faster than torch's
    `bernoulli_` mask (5.4 vs 16.4 ms on 32 x 180 x 384 bf16), which took a tenth of a training step. The drop
    probability is p rounded to a multiple of 2^-16 (0.1 -> 0.1000061); the mask is kept as bools."""

    @staticmethod
    def forward(ctx, x, p: float):
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        dropped = round(p * 65536)  # of 65,536 equally likely 16-bit values
        keep = words.view(torch.int16)[:n].view(x.shape) >= -32768 + dropped
        ctx.save_for_backward(keep)
        ctx.scale = 65536 / (65536 - dropped)  # 1 / P(keep), so the expected output is x
        return (x * keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None


def dropout(x, p: float, training: bool):
    """F.dropout, with BitDropout's mask when training on a CPU (other devices have fused dropout kernels)."""
    if training and 0 < p < 1 and x.device.type == "cpu":
        return BitDropout.apply(x, p)
    return F.dropout(x, p, training)


class Dropout(nn.Dropout):
    def forward(self, x):
        return dropout(x, self.p, self.training)


def sdpa_attention(q, k, v, mask, dropout_p):
    """q, k, v: (B, nh, T, hs); mask: (B, 1, 1, T) bool, True = attend, or None."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def eager_attention(q, k, v, mask, dropout_p):
    """The reference, softmax(q k^T / sqrt(hs)) v, written out. The scale is applied to q (T x hs values, not
    T x T) and padding enters as an additive bias, whose backward is free (a masked_fill's is not)."""
    scores = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)  # (B, nh, T, T)
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)  # (B, 1, 1, T)
        scores = scores + bias.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    probs = dropout(scores.softmax(dim=-1), dropout_p, dropout_p > 0)
    return probs @ v  # (B, nh, T, hs)


ATTENTION = {"sdpa": sdpa_attention, "eager": eager_attention}
# "auto": SDPA (fused kernels: flash on CUDA) except when training on a CPU, where SDPA's fused kernel has a
# slow backward and the written-out attention trained 11% faster (MiniLM, bf16, real SQuAD windows), up to
# EAGER_MAX_LEN tokens: beyond, the T x T probabilities it keeps for the backward pass dominate the memory of
# a step (a batch of 32 x 384 peaked 2.5 GB written out, 1.7 GB fused), so long batches go fused.
ATTENTION_CHOICES = ("auto", *ATTENTION)
EAGER_MAX_LEN = 256


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
        self.query = nn.Linear(C, C)
        self.key = nn.Linear(C, C)
        self.value = nn.Linear(C, C)
        self.dropout_p = config.attention_probs_dropout_prob
        self.attn_implementation = attn_implementation

    def forward(self, x, mask):
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = (lin(x).view(B, T, self.n_head, hs).transpose(1, 2) for lin in (self.query, self.key, self.value))
        dropout_p = self.dropout_p if self.training else 0.0
        impl = self.attn_implementation
        if impl == "auto":
            impl = "eager" if self.training and x.device.type == "cpu" and T <= EAGER_MAX_LEN else "sdpa"
        y = ATTENTION[impl](q, k, v, mask, dropout_p)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, C)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


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
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; choose from {sorted(ACTIVATIONS)}")
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))  # (B, T, 4C)


class BertOutput(BertSelfOutput):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, attn_implementation: str):
        super().__init__()
        self.attention = BertAttention(config, attn_implementation)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, mask):
        a = self.attention(x, mask)
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
    """The encoder without pooler (question answering does not use it)."""

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
        return self.encoder(self.embeddings(input_ids, token_type_ids), mask)


class BertForQuestionAnswering(nn.Module):
    def __init__(self, config: BertConfig, attn_implementation: str = "auto"):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, attn_implementation)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
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
