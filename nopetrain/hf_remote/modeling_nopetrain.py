"""SmolLM3 with nopetrain's attention prologue: per-head RMS QK-norm before RoPE and an attention logit scale.

Per layer and head, as nopetrain's `qk_norm_rope` computes it: RMS-normalise q (and k) over the head dimension in
fp32, cast back and multiply by the learned gain; rotate with RoPE on the layers that use it (`no_rope_layers`);
multiply q by `attn_logit_scale`, times DroPE's `1 + logit_scale_coef * ln(max(1, length / train_context))` for
inputs longer than the training context (length counts cached tokens too). Everything else, sliding windows on
`layer_types` included, is SmolLM3's. Load with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

import math
from collections.abc import Callable

import torch
import transformers
from transformers import SmolLM3ForCausalLM
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.smollm3.modeling_smollm3 import (
    SmolLM3Attention,
    SmolLM3RMSNorm,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_nopetrain import NopetrainConfig


def kv_cache(kwargs: dict) -> Cache | None:
    """Pops the KV cache from the attention's keyword arguments: transformers 5.24 renamed `past_key_values` to
    `cache`. A forward that asks for caching but finds neither fails loudly; ignoring the cache would decode each
    token without the ones before it."""
    cache, legacy = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    cache = legacy if cache is None else cache
    if cache is None and kwargs.get("use_cache"):
        raise RuntimeError(
            f"transformers {transformers.__version__} passed no KV cache to the attention (neither `cache` nor "
            "`past_key_values`); this modeling code knows transformers 5.23-5.24 (see requirements-lock.txt)"
        )
    return cache


class NopetrainAttention(SmolLM3Attention):
    def __init__(self, config: NopetrainConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if config.qkv_bias:
            for name in ("q_proj", "k_proj", "v_proj"):
                plain = getattr(self, name)
                setattr(self, name, torch.nn.Linear(plain.in_features, plain.out_features, bias=True))
        # SmolLM3RMSNorm computes in fp32 and applies the gain after casting back, like nopetrain's rms_norm.
        self.q_norm = SmolLM3RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm in ("qk", "q") else None
        self.k_norm = SmolLM3RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm == "qk" else None
        self.logit_scale = config.attn_logit_scale
        self.logit_scale_coef, self.train_context = config.logit_scale_coef, config.train_context

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = kv_cache(kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if self.q_norm is not None:
            query_states = self.q_norm(query_states)
        if self.k_norm is not None:
            key_states = self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)

        if self.use_rope:
            cos, sin = position_embeddings
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        logit_scale = self.logit_scale
        if self.logit_scale_coef:
            cached = int(cache.get_seq_length(self.layer_idx)) if cache is not None else 0
            length = cached + query_states.shape[-2]
            logit_scale *= 1.0 + self.logit_scale_coef * math.log(max(1.0, length / self.train_context))
        if logit_scale != 1.0:
            query_states = query_states * logit_scale

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class NopetrainForCausalLM(SmolLM3ForCausalLM):
    config_class = NopetrainConfig
    config: NopetrainConfig

    def __init__(self, config: NopetrainConfig):
        super().__init__(config)
        # SmolLM3's decoder layers build their own attention; swap ours in, then run post_init again so the
        # top-level model registers and initialises the new modules.
        for index, layer in enumerate(self.model.layers):
            layer.self_attn = NopetrainAttention(config, index)
        self.post_init()
