"""nopetrain: LLM pretraining with selective NoPE and DroPE on DeepSpeed ZeRO."""

__version__ = "0.1.0"
