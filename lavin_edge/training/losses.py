"""The training losses, summed in fp32 with their token counts (the loop divides by the global count): next-token
cross-entropy on answer tokens, and with ``text_loss = "kl"`` KL to the frozen base on text-only rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lavin_edge.model.lavin import IGNORE_INDEX, Batch, LaVIN


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token CE over answer tokens, their count), in fp32."""
    target = labels[:, 1:].flatten()
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target, ignore_index=IGNORE_INDEX,
                         reduction="sum")
    return ce, int((target != IGNORE_INDEX).sum())


def scored_positions(batch: Batch, text_kl: bool) -> torch.Tensor:
    """[B, T-1] bool: the positions whose next-token prediction is in the loss. Answer tokens; with ``text_kl``,
    every position of a text-only row up to its last answer token (right padding is never scored)."""
    mask = batch.labels[:, 1:] != IGNORE_INDEX
    text = batch.image_pos < 0
    if not text_kl or not bool(text.any()):
        return mask
    t = mask.shape[1]
    last = t - 1 - mask.flip(1).int().argmax(1)  # last answer position (rows without one score nothing)
    upto = (torch.arange(t, device=mask.device)[None] <= last[:, None]) & mask.any(1, keepdim=True)
    return torch.where(text[:, None], upto, mask)


def distill_loss_sum(logits: torch.Tensor, batch: Batch, model: LaVIN) -> tuple[torch.Tensor, int]:
    """``text_loss = "kl"``: CE on the answers of image rows plus KL(base || model) at every scored position of
    text-only rows (:func:`scored_positions`), summed in fp32, and the count of scored positions."""
    text = batch.image_pos < 0
    total, n = token_loss_sum(logits[~text], batch.labels[~text])
    if bool(text.any()):
        mask = scored_positions(batch, True)[text]
        target = F.log_softmax(model.base_logits(batch.input_ids[text])[:, :-1].float(), dim=-1)[mask]
        pred = F.log_softmax(logits[text][:, :-1].float(), dim=-1)[mask]
        total = total + F.kl_div(pred, target, reduction="sum", log_target=True)
        n += int(mask.sum())
    return total, n
