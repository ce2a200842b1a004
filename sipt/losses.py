"""Losses of the train stage as small pure functions of log-probabilities (nanoGPT style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t = 1..T-1 (batch × T-1), computed in float32."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the masked tokens of each sequence (the continuation, not the prefix).

    `loss_mask[b, t]` is 1 where token t is a continuation token; it is aligned with `input_ids`.
    """
    return (token_logps(logits, input_ids) * loss_mask[:, 1:]).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss (Rafailov et al.) and the implicit rewards of chosen and rejected."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    return loss, chosen_reward.detach(), rejected_reward.detach()


def nll_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per masked token (RF-NLL on the chosen continuation; NTP)."""
    logp = token_logps(logits, input_ids)
    mask = loss_mask[:, 1:].to(logp.dtype)
    return -(logp * mask).sum() / mask.sum().clamp(min=1)
