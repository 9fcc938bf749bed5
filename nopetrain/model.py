"""Llama/SmolLM3-style decoder with a per-layer choice of RoPE or NoPE.

Embeddings -> N x [RMSNorm -> grouped-query attention -> residual, RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm ->
LM head. Which layers rotate q and k comes from the config (`ModelConfig.rope_layers`); DroPE flips them all off
later (nopetrain/drope.py). Weights are initialised inside each module's constructor so that DeepSpeed's
`zero.Init` can partition them as they are built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nopetrain.activation_checkpointing import checkpointed_blocks, run_checkpointed
from nopetrain.config import ActivationCheckpointingConfig, ModelConfig
from nopetrain.kernels import DocumentSegments, attention, qk_norm_rope, rms_norm
from nopetrain.kernels.linear_cross_entropy import linear_cross_entropy
from nopetrain.rope import RopeScaling, logit_factor, rope_tables


class Linear(nn.Linear):
    """Linear layer initialised N(0, std), bias-free unless asked (bias initialised to 0)."""

    def __init__(self, in_features: int, out_features: int, std: float, bias: bool = False) -> None:
        self.std = std
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    def __init__(self, num_embeddings: int, dim: int, std: float) -> None:
        self.std = std
        super().__init__(num_embeddings, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def qk_norm_union(first: str, second: str) -> str:
    """The QK-norm that covers both settings: "q" and "qk" -> "qk", "none" and "q" -> "q"."""
    if "qk" in (first, second):
        return "qk"
    return "q" if "q" in (first, second) else "none"


class KVCache:
    """Keys (after RoPE) and values of every layer for the tokens fed so far, for incremental decoding: each call of
    `Transformer.forward` with a cache feeds only the new tokens. Evaluation and generation only, never training."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[1]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends this layer's new keys and values; returns all of them."""
        if self.keys[layer] is not None:
            k, v = torch.cat((self.keys[layer], k), dim=1), torch.cat((self.values[layer], v), dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    """Grouped-query attention. `use_rope` and `qk_norm` are read on every forward, so DroPE can flip them.

    The QK-norm gains are direct parameters (not submodules): the fused prologue reads them without calling a norm
    module, and ZeRO-3 gathers a module's own parameters for its forward. `norm_gains` may create gains beyond
    `cfg.qk_norm` that stay unused (and so unchanged) until DroPE switches them on; creating them here lets
    ZeRO-3 partition them and the optimizer hold them from the first step."""

    def __init__(self, cfg: ModelConfig, use_rope: bool, norm_gains: str, index: int) -> None:
        super().__init__()
        self.index = index  # its slot in a KVCache
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        self.use_rope = use_rope
        self.qk_norm = cfg.qk_norm
        self.sliding_window = cfg.sliding_window
        self.norm_eps = cfg.norm_eps
        self.q_proj = Linear(cfg.hidden_size, self.num_heads * self.head_dim, cfg.init_std, cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, cfg.init_std, cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, cfg.init_std, cfg.qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, cfg.hidden_size, cfg.init_std)
        self.q_norm_weight = nn.Parameter(torch.ones(self.head_dim)) if norm_gains in ("qk", "q") else None
        self.k_norm_weight = nn.Parameter(torch.ones(self.head_dim)) if norm_gains == "qk" else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        qk_norm: str,
        logit_scale: float,
        segments: DocumentSegments | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """`rope`: the cos/sin tables, None on a NoPE layer; `qk_norm`: which of q and k are normed. Both are this
        module's `use_rope` and `qk_norm`, read by the caller: a block recomputed in backward (activation
        checkpointing) gets them again as arguments, the values of its forward."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        cos, sin = rope if rope is not None else (None, None)
        q, k = qk_norm_rope(
            q,
            k,
            self.q_norm_weight if qk_norm in ("qk", "q") else None,
            self.k_norm_weight if qk_norm == "qk" else None,
            cos,
            sin,
            logit_scale,
            self.norm_eps,
        )
        if cache is not None:
            k, v = cache.extend(self.index, k, v)
        # The window belongs to the RoPE layers (RNoPE-SWA); NoPE layers, and every layer after DroPE, are global.
        window = self.sliding_window if rope is not None else None
        out = attention(q, k, v, window, segments)
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.init_std)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.init_std)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, use_rope: bool, norm_gains: str, index: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, use_rope, norm_gains, index)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        qk_norm: str,
        logit_scale: float,
        segments: DocumentSegments | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, qk_norm, logit_scale, segments, cache)
        return x + self.mlp(self.mlp_norm(x))


class LMHead(Linear):
    """The output projection; given labels, it returns the mean cross-entropy instead of the logits, in chunks of
    `chunk_tokens` tokens when that is set (kernels.linear_cross_entropy). The loss is taken inside this module's
    forward so that ZeRO-3, which gathers a module's parameters for its forward, gathers the weight for it."""

    def __init__(self, in_features: int, out_features: int, std: float, chunk_tokens: int = 0) -> None:
        super().__init__(in_features, out_features, std)
        self.chunk_tokens = chunk_tokens

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, labels, self.chunk_tokens)


class Transformer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        extra_qk_norm: str = "none",
        activation_checkpointing: ActivationCheckpointingConfig | None = None,
        loss_chunk_tokens: int = 0,
    ) -> None:
        """`extra_qk_norm` creates QK-norm gains the config does not use yet (for a later DroPE switch);
        `activation_checkpointing` says which blocks recompute their activations in training's backward;
        `loss_chunk_tokens` makes the training loss in chunks of that many tokens (see LMHead)."""
        super().__init__()
        self.config = cfg
        # Per block: None, or how it recomputes its activations in backward.
        self.recompute = checkpointed_blocks(
            activation_checkpointing or ActivationCheckpointingConfig(), cfg.num_layers
        )
        norm_gains = qk_norm_union(cfg.qk_norm, extra_qk_norm)
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.init_std)
        self.layers = nn.ModuleList(
            Block(cfg, use_rope, norm_gains, index) for index, use_rope in enumerate(cfg.rope_layers())
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, cfg.init_std, loss_chunk_tokens)
        if cfg.tie_embeddings:
            # One Parameter owned by both modules, so ZeRO-3 gathers it for each of their forwards.
            self.lm_head.weight = self.embed.weight
        # Set only by evaluation (nopetrain/eval): a RoPE-scaling baseline for inputs beyond the training context.
        self.rope_scaling: RopeScaling | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segments: DocumentSegments | None = None,
        cache: KVCache | None = None,
        last: int | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab) for token ids (batch, seq), or with `labels` (batch, seq; -100 ignored) the
        mean next-token cross-entropy in fp32 (training). Positions default to 0..seq-1; with packed documents they
        restart at each document and `segments` keeps attention inside each one.

        With a `cache` the tokens continue the ones it holds (positions go on from there), and only the last
        position's logits are computed (batch, 1, vocab): what greedy decoding needs. `last` likewise keeps the
        logits of the last `last` positions only (teacher-forced scoring of an answer), sparing the vocabulary
        projection of the rest."""
        past = 0 if cache is None else cache.length
        seq_len = past + input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, seq_len, device=input_ids.device)[None]
        cfg = self.config
        rope = rope_tables(position_ids, cfg.resolved_head_dim, cfg.rope_theta, self.rope_scaling, seq_len)
        # DroPE's length-dependent scale (1 up to the training context); RoPE layers also take YaRN's temperature
        # when it is in use: it belongs to the scaled frequencies (transformers folds it into cos/sin), so the NoPE
        # layers of a mixed model keep their logits.
        logit_scale = cfg.logit_scale_at(seq_len)
        rope_logit_scale = logit_scale * logit_factor(self.rope_scaling, seq_len)
        x = self.embed(input_ids)
        for layer, recompute in zip(self.layers, self.recompute, strict=True):
            use_rope = layer.attn.use_rope
            args = (
                rope if use_rope else None,
                layer.attn.qk_norm,
                rope_logit_scale if use_rope else logit_scale,
                segments,
                cache,
            )
            if recompute is not None and torch.is_grad_enabled() and cache is None:
                x = run_checkpointed(recompute, layer, x, *args)
            else:
                x = layer(x, *args)
        if cache is not None or last is not None:
            x = x[:, -(1 if cache is not None else last) :]
        return self.lm_head(self.norm(x), labels)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once), also on meta-device and ZeRO-3-partitioned models."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
