"""The MDLM training objective (continuous time, Diffutron's reference normalisation).

For a batch of b sequences::

    loss = 1/b * sum_i  sum_{j masked in i}  w(t_i) * CE(logits_ij, x_ij) / N_i

with t_i ~ U(eps, 1), each maskable token masked with probability 1 - alpha(t_i), the ELBO
weight w(t) = -alpha'(t) / (1 - alpha(t)) (= 1/t for the linear schedule) and N_i the number of
maskable tokens of sequence i. Logits are computed only at masked positions.

``weighting="flat"`` replaces w(t_i) / N_i by 1 / N, N the masked tokens of the batch (of each
process's share of it in distributed training): every masked token weighs the same, as in BERT's
masked-LM loss. That is not a bound on the likelihood; it is a training option. On a synthetic
task that needs context, tiny models learned it far faster with it (benchmarks/loss_weighting.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbone import logits_at
from .errors import DiffutronError
from .schedules import get_schedule, sample_t

WEIGHTINGS = ("elbo", "flat")


def draw_noise(
    maskable: torch.Tensor,
    t: torch.Tensor,
    *,
    schedule: str = "linear",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bool [B, L]: each maskable token is masked independently with probability 1 - alpha(t_i)."""
    p_mask = get_schedule(schedule).mask_prob(t.float())  # [B]
    u = torch.rand(maskable.shape, generator=generator).to(maskable.device)
    return (u < p_mask[:, None].to(maskable.device)) & maskable


def token_weights(
    t: torch.Tensor,
    noise_mask: torch.Tensor,
    maskable: torch.Tensor,
    *,
    schedule: str = "linear",
    target_weight: torch.Tensor | None = None,
    weighting: str = "elbo",
) -> torch.Tensor:
    """Each masked token's share of the batch loss, w(t_i) / N_i / b (``elbo``) or 1 / N (``flat``,
    N masked tokens in the batch), times its target weight: [N] in the row-major order of
    ``noise_mask``. The loss is ``sum_j token_weights_j * CE_j``."""
    if weighting not in WEIGHTINGS:
        raise DiffutronError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    rows = noise_mask.nonzero()[:, 0]
    if weighting == "flat":
        weights = torch.ones(rows.shape[0], device=noise_mask.device) / max(rows.shape[0], 1)
    else:
        n_maskable = maskable.sum(dim=1).clamp(min=1).float()
        weights = get_schedule(schedule).weight(t.float())[rows] / n_maskable[rows] / noise_mask.shape[0]
    if target_weight is not None:
        weights = weights * target_weight.float()[noise_mask]
    return weights


def mdlm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    *,
    mask_token_id: int,
    attention_mask: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    noise_mask: torch.Tensor | None = None,
    schedule: str = "linear",
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
    t_sampling: str = "iid",
    target_weight: torch.Tensor | None = None,
    weighting: str = "elbo",
) -> torch.Tensor:
    """MDLM loss of a batch (scalar tensor).

    Args:
        model: a Hugging Face masked-LM module (also wrapped by peft, DDP or FSDP).
        input_ids: clean tokens, LongTensor [B, L].
        maskable: bool [B, L], the tokens the loss may mask (never prompt or excluded padding).
        mask_token_id: the tokenizer's mask id.
        attention_mask: 1 for real tokens, 0 for padding the model must not attend to.
        t: diffusion time per sequence [B]; drawn (``t_sampling``, ``eps``) when None.
        noise_mask: bool [B, L], the positions to mask; drawn with ``t`` when None.
        schedule: ``linear`` (default), ``loglinear`` or ``cosine``.
        generator: RNG for t and masks (the default RNG when None).
        target_weight: optional float [B, L] multiplying each token's term (e.g. a weight < 1 on
            padding targets).
        weighting: ``elbo`` (the MDLM bound, the paper) or ``flat`` (every masked token of the
            batch weighs the same; see the module docstring).

    Rows without a maskable token add 0 and still count in the batch mean. When nothing is
    masked the loss is an exact 0 that still depends on every parameter, so distributed
    gradient reduction sees the same graph on every rank.
    """
    if input_ids.shape != maskable.shape:
        raise DiffutronError(f"maskable has shape {tuple(maskable.shape)}, input_ids {tuple(input_ids.shape)}")
    maskable = maskable.bool()
    b = input_ids.shape[0]
    # 1. one time per sequence  [B]
    if t is None:
        t = sample_t(b, eps=eps, method=t_sampling, generator=generator, device=input_ids.device)
    t = t.to(input_ids.device).float()
    # 2. mask maskable tokens with probability 1 - alpha(t)  [B, L]
    if noise_mask is None:
        noise_mask = draw_noise(maskable, t, schedule=schedule, generator=generator)
    noise_mask = noise_mask.bool() & maskable
    noisy = torch.where(noise_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    # 3. logits only where a token was masked  [N, V]
    logits = logits_at(model, noisy, noise_mask, attention_mask)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    # 4. cross-entropy per masked token, weighted by w(t_i) / N_i / b: the per-sequence sum over
    #    its maskable length, averaged over the batch  [N] -> []
    ce = F.cross_entropy(logits.float(), input_ids[noise_mask], reduction="none")
    weights = token_weights(t, noise_mask, maskable, schedule=schedule, target_weight=target_weight,
                            weighting=weighting)
    return (weights.to(ce.device) * ce).sum()
