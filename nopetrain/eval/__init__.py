"""Long-context evaluation: perplexity by length and position, needle-in-a-haystack, RoPE-scaling baselines and
DroPE's fitted logit scale (`nopetrain-eval`, see docs/evaluation.md).
"""
