"""Config of a nopetrain model exported with its own modeling code: SmolLM3 plus QK-norm and a logit scale.

Written by `nopetrain-export` (nopetrain/export.py) into the export folder; transformers loads it through
`auto_map` in config.json when `trust_remote_code=True` is passed.
"""

from transformers import SmolLM3Config

QK_NORM_CHOICES = ("none", "qk", "q")


class NopetrainConfig(SmolLM3Config):
    # Its own model_type, so that plain transformers refuses the folder instead of loading it as SmolLM3 and
    # silently dropping the QK-norm gains.
    model_type = "nopetrain"

    # Per-head RMS norm with learned gains before RoPE: on queries and keys ("qk"), on queries only ("q"), or off.
    qk_norm: str = "none"
    # Multiplies the attention logits (folded into the queries after RoPE).
    attn_logit_scale: float = 1.0
    # DroPE's length scaling on top of it: 1 + logit_scale_coef * ln(max(1, length / train_context)), where length
    # is the number of tokens attended to (cached ones included).
    logit_scale_coef: float = 0.0
    train_context: int | None = None
    # Biases on the q, k and v projections only (Qwen2-style); SmolLM3's attention_bias would also bias o_proj.
    qkv_bias: bool = False

    def __post_init__(self, **kwargs):
        if self.qk_norm not in QK_NORM_CHOICES:
            raise ValueError(f"qk_norm={self.qk_norm!r} must be one of {QK_NORM_CHOICES}")
        super().__post_init__(**kwargs)
