"""RoPE's math, owned by the model (nopetrain/model.py) and used by the evaluation: the base frequencies
w_m = theta^(-2m/d), the fp32 cos/sin tables, and the RoPE-scaling methods applied at evaluation time (DroPE paper,
appendix A), which give new frequencies w'_m = gamma_m w_m:

- `pi` (position interpolation): gamma_m = 1/s.
- `ntk` (NTK-aware): gamma_m = s^(-2m/(d-2)), m = 0..d/2-1, i.e. the base theta becomes theta * s^(d/(d-2)).
- `yarn`: gamma_m = (1 - kappa_m)/s + kappa_m, where kappa_m (1: frequency kept, 0: interpolated) ramps between
  the frequencies that make p (`alpha`) and q (`beta`) full rotations over the training context
  (r_m = C_train w_m / 2 pi). `yarn_ramp` says over what the ramp is linear:
  `dimension` (default): over the index m, between the correction dimensions of q and p rounded outwards (floor,
  ceil), as Hugging Face transformers (`rope_type: yarn`) and the YaRN authors' code do, i.e. what published YaRN
  numbers were measured with; `rotations`: over r_m itself, kappa_m = clamp((r_m - p) / (q - p), 0, 1), the
  paper's equation. Plus its attention temperature: the logits of the layers that rotate are multiplied by
  (temperature_coef ln s + 1)^2 (transformers scales cos and sin by 0.1 ln s + 1 each, so NoPE layers of a mixed
  model are untouched).
- `dynamic_ntk`: `ntk` with s = max(1, input length / C_train), recomputed on every forward.

s is `factor` for the static methods (the evaluator sets it to target length / C_train) and follows the input
length for dynamic NTK. At s = 1 every method is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("pi", "ntk", "yarn", "dynamic_ntk")
YARN_RAMPS = ("dimension", "rotations")


@dataclass(frozen=True)
class RopeScaling:
    method: str
    train_context: int
    # s for pi / ntk / yarn; ignored by dynamic_ntk.
    factor: float = 1.0
    # YaRN's ramp bounds p and q, in rotations over the training context, and its temperature coefficient.
    alpha: float = 1.0
    beta: float = 32.0
    temperature_coef: float = 0.1
    yarn_ramp: str = "dimension"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"rope scaling method {self.method!r} must be one of {METHODS}")
        if self.yarn_ramp not in YARN_RAMPS:
            raise ValueError(f"yarn_ramp {self.yarn_ramp!r} must be one of {YARN_RAMPS}")

    def scale(self, seq_len: int) -> float:
        """The extension factor s for an input of `seq_len` tokens."""
        if self.method == "dynamic_ntk":
            return max(1.0, seq_len / self.train_context)
        return self.factor


def base_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """w_m = theta^(-2m/d), m = 0..d/2-1, in fp32."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def frequency_factors(scaling: RopeScaling, head_dim: int, theta: float, seq_len: int) -> torch.Tensor:
    """gamma_m of the method for an input of `seq_len` tokens (fp32, d/2 entries)."""
    s = scaling.scale(seq_len)
    m = torch.arange(head_dim // 2, dtype=torch.float64)
    if scaling.method == "pi":
        gamma = torch.full_like(m, 1.0 / s)
    elif scaling.method in ("ntk", "dynamic_ntk"):
        gamma = s ** (-2.0 * m / (head_dim - 2))
    else:
        kappa = yarn_kept_fraction(scaling, head_dim, theta)
        gamma = (1.0 - kappa) / s + kappa
    return gamma.float()


def yarn_kept_fraction(scaling: RopeScaling, head_dim: int, theta: float) -> torch.Tensor:
    """YaRN's kappa_m (fp64): 1 for frequencies making at least q rotations over the training context, 0 for those
    making at most p, and linear in between over the dimension index or over the rotations (`yarn_ramp`)."""
    if scaling.yarn_ramp == "rotations":
        rotations = scaling.train_context * base_frequencies(head_dim, theta).double() / (2 * math.pi)
        return ((rotations - scaling.alpha) / (scaling.beta - scaling.alpha)).clamp(0.0, 1.0)

    def dimension_of(rotations: float) -> float:
        """The (fractional) index m whose frequency makes `rotations` full turns over the training context."""
        return head_dim * math.log(scaling.train_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    first = max(math.floor(dimension_of(scaling.beta)), 0)
    last = min(math.ceil(dimension_of(scaling.alpha)), head_dim - 1)
    # transformers widens an empty ramp by 0.001 rather than divide by zero; so do we, to stay equal to it.
    width = max(last - first, 0.001)
    m = torch.arange(head_dim // 2, dtype=torch.float64)
    return 1.0 - ((m - first) / width).clamp(0.0, 1.0)


def inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None, seq_len: int, device: torch.device | None = None
) -> torch.Tensor:
    """The RoPE frequencies the model rotates with: the base ones, scaled when `scaling` is set."""
    freqs = base_frequencies(head_dim, theta, device)
    if scaling is None:
        return freqs
    return freqs * frequency_factors(scaling, head_dim, theta, seq_len).to(device)


def logit_factor(scaling: RopeScaling | None, seq_len: int) -> float:
    """YaRN's attention temperature as a multiplier of the logits; 1 for the other methods."""
    if scaling is None or scaling.method != "yarn":
        return 1.0
    return (scaling.temperature_coef * math.log(scaling.scale(seq_len)) + 1.0) ** 2


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, scaling: RopeScaling | None = None, seq_len: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables (batch or 1, seq, head_dim) for integer positions (batch or 1, seq), with the
    frequencies of an evaluation-time RoPE-scaling method when `scaling` is set (dynamic methods follow `seq_len`,
    the input's whole length, by default the number of positions).

    Always fp32: bf16 tables lose the low-frequency angles and are known to diverge training."""
    inv_freq = inverse_frequencies(head_dim, theta, scaling, seq_len or positions.shape[-1], positions.device)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()
