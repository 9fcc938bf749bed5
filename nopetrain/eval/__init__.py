"""Long-context evaluation: perplexity by length and position, needle-in-a-haystack, RoPE-scaling baselines and
DroPE's fitted logit scale (`python -m nopetrain.eval`, see README "Long-context evaluation").

Kept free of imports so that nopetrain.model can import `rope_scaling` without pulling in the evaluation stack.
"""
