"""Noise schedules for masked diffusion: alpha(t), alpha'(t) and the ELBO weight.

alpha(t) is the probability that a token is still clean at time t in [0, 1]; a maskable token
is replaced by the mask token with probability 1 - alpha(t). The continuous-time MDLM ELBO
weights the cross-entropy of masked tokens by w(t) = -alpha'(t) / (1 - alpha(t)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import DiffutronError


@dataclass(frozen=True)
class Schedule:
    """A named noise schedule: ``alpha`` and its derivative ``dalpha`` (tensors in, tensors out)."""

    name: str
    alpha: Callable[[torch.Tensor], torch.Tensor]
    dalpha: Callable[[torch.Tensor], torch.Tensor]
    # Closed forms of 1 - alpha and of the weight where they exist: 1 - (1 - t) loses digits at small t.
    closed_mask_prob: Callable[[torch.Tensor], torch.Tensor] | None = None
    closed_weight: Callable[[torch.Tensor], torch.Tensor] | None = None

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a maskable token is masked at time t."""
        return self.closed_mask_prob(t) if self.closed_mask_prob else 1.0 - self.alpha(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """ELBO weight -alpha'(t) / (1 - alpha(t)); 1/t for the linear schedule."""
        if self.closed_weight:
            return self.closed_weight(t)
        return -self.dalpha(t) / self.mask_prob(t)


def _loglinear_eps() -> float:
    return 1e-3


SCHEDULES: dict[str, Schedule] = {
    # alpha = 1 - t: Diffutron's (and MDLM's default) schedule; w(t) = 1/t.
    "linear": Schedule("linear", lambda t: 1.0 - t, lambda t: -torch.ones_like(t), lambda t: t, lambda t: 1.0 / t),
    # MDLM's log-linear noise: sigma(t) = -log(1 - (1 - e) t), alpha = exp(-sigma), e = 1e-3.
    "loglinear": Schedule(
        "loglinear",
        lambda t: 1.0 - (1.0 - _loglinear_eps()) * t,
        lambda t: torch.full_like(t, -(1.0 - _loglinear_eps())),
        lambda t: (1.0 - _loglinear_eps()) * t,
        lambda t: 1.0 / t,
    ),
    # alpha = cos(pi t / 2): masks fewer tokens early, more late.
    "cosine": Schedule(
        "cosine",
        lambda t: torch.cos(0.5 * math.pi * t),
        lambda t: -0.5 * math.pi * torch.sin(0.5 * math.pi * t),
    ),
}

T_SAMPLING = ("iid", "antithetic", "stratified")


def get_schedule(name: str | Schedule) -> Schedule:
    """Look a schedule up by name (``linear``, ``loglinear``, ``cosine``)."""
    if isinstance(name, Schedule):
        return name
    try:
        return SCHEDULES[name]
    except KeyError:
        raise DiffutronError(
            f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}"
        ) from None


def sample_t(
    batch: int,
    *,
    eps: float = 1e-3,
    method: str = "iid",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw one diffusion time per sequence, t = eps + (1 - eps) * u with u in [0, 1).

    ``method``: ``iid`` (independent uniforms, the reference), ``antithetic`` (pairs u, 1 - u)
    or ``stratified`` (one u per stratum [i/b, (i+1)/b), shuffled): both lower the variance of
    the batch loss without changing its expectation.
    """
    if method not in T_SAMPLING:
        raise DiffutronError(f"unknown t sampling {method!r}; choose one of {', '.join(T_SAMPLING)}")
    if not 0.0 <= eps < 1.0:
        raise DiffutronError(f"eps must be in [0, 1), got {eps}")
    if method == "iid":
        u = torch.rand(batch, generator=generator)
    elif method == "antithetic":
        half = torch.rand((batch + 1) // 2, generator=generator)
        u = torch.cat([half, 1.0 - half])[:batch]
    else:
        u = (torch.arange(batch) + torch.rand(batch, generator=generator)) / batch
        u = u[torch.randperm(batch, generator=generator)]
    u = u.clamp(max=1.0 - 1e-7)
    return (eps + (1.0 - eps) * u).to(device)
