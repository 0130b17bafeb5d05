"""Tiny language models: a nanoGPT-style transformer and an LSTM, both (B, T) tokens → (B, T, V) logits.

They are deliberately small: the lab studies what bad networks do to training, so a model
must fit a CPU core and a parameter vector must fit a cellular link in seconds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dist_llm_train.config import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NGramLogits(nn.Module):
    """A learned logit vector for every n-gram of input tokens, added to the model's output logits.

    These are direct n-gram connections, the maximum-entropy n-gram model that Mikolov et al.
    (ASRU 2011, "Strategies for Training Large Scale Neural Network Language Models", RNNME)
    train jointly with the network, after Bengio et al.'s (JMLR 2003) direct input-to-output
    connections: position t looks up the row of (x_{t-n+1}, …, x_t). The parameters are cheap —
    a lookup and an add per position, no multiply — so a model can hold millions of them within
    a small FLOP budget, and each row is a plain table entry, which Adam learns much faster than
    a low-rank (embedding × head) product can express a sparse next-token distribution. Every
    n-gram has its own row (no hashing, so no collisions); positions before the start of the
    sequence read the padding token V, hence (V+1)^n rows of V logits (at n = 1 the padding row
    is never read). Rows start at zero, so the network's own predictions are unchanged at
    initialisation.
    """

    MAX_ENTRIES = 1 << 24

    def __init__(self, vocab_size: int, order: int) -> None:
        super().__init__()
        if order < 1:
            raise ValueError(f"n-gram logits need order >= 1, got {order}")
        rows = (vocab_size + 1) ** order
        if rows * vocab_size > self.MAX_ENTRIES:
            raise ValueError(
                f"order-{order} n-gram logits over {vocab_size} tokens need {rows:,} rows x {vocab_size} = "
                f"{rows * vocab_size:,} parameters; at most {self.MAX_ENTRIES:,} are allowed (lower ngram_order)"
            )
        self.order = order
        self.pad = vocab_size
        self.table = nn.Embedding(rows, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        padded = torch.cat([idx.new_full((b, self.order - 1), self.pad), idx], dim=1)
        code = torch.zeros_like(idx)
        for j in range(self.order):  # oldest token most significant, base V + 1
            code = code * (self.pad + 1) + padded[:, j : j + t]
        return self.table(code)


class GPT(nn.Module):
    """nanoGPT's model: token + learned position embeddings, pre-LN blocks, tied output head.

    `ngram_order` >= 1 adds `NGramLogits` to the output (registered last, and only then, so a
    model without them has exactly the layout it always had)."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        dropout: float = 0.0,
        ngram_order: int = 0,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        # Weight tying: one matrix embeds tokens and scores them. named_parameters() yields it
        # once, so the flat vector (and every byte on the wire) carries it once.
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        self.ngram = NGramLogits(vocab_size, ngram_order) if ngram_order else None
        if self.ngram is not None:
            nn.init.zeros_(self.ngram.table.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, t = idx.shape
        if t > self.block_size:
            raise ValueError(f"sequence of length {t} exceeds the model's block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits if self.ngram is None else logits + self.ngram(idx)


class LSTMLM(nn.Module):
    """Embedding → multi-layer LSTM → linear head. No length limit; a recurrent baseline to the GPT."""

    def __init__(self, vocab_size: int, n_layer: int, n_embd: int, hidden_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, n_embd)
        self.lstm = nn.LSTM(
            n_embd, hidden_size, num_layers=n_layer, batch_first=True, dropout=dropout if n_layer > 1 else 0.0
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.drop(self.embed(idx)))
        return self.head(self.drop(out))


def build_model(model_cfg: ModelConfig, vocab_size: int, block_size: int, seed: int) -> nn.Module:
    """The model `model_cfg` names, with weights that depend only on (config, vocab, block size, seed).

    Initialisation runs under a forked RNG so building a model neither reads nor disturbs
    the caller's global torch random state.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_cfg.family == "lstm":
            return LSTMLM(vocab_size, model_cfg.n_layer, model_cfg.n_embd, model_cfg.hidden_size, model_cfg.dropout)
        return GPT(
            vocab_size,
            block_size,
            model_cfg.n_layer,
            model_cfg.n_head,
            model_cfg.n_embd,
            model_cfg.dropout,
            model_cfg.ngram_order,
        )


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats over every position of the batch."""
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x and y must both be (B, T); got {tuple(x.shape)} and {tuple(y.shape)}")
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
