"""The three stage-1 losses and the ITC feature queue.

- ITC: in-batch plus queued negatives (ALBEF/MoCo), positives by image id, momentum distillation.
- ITM: one hard negative per image and per text, sampled by similarity with every positive at probability 0.
- LM: captioning cross-entropy with label smoothing.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn


class CaptionHash(nn.Module):
    """One int64 id per caption, the same exactly when the token sequences are: two 31-bit polynomial hashes side
    by side (odds of a collision among a million distinct captions about 1e-7). Pure tensor arithmetic, so it
    runs inside a compiled step; ids are >= 0 (-1 marks "unknown" elsewhere)."""

    MODULI = (2_147_483_647, 2_147_483_629)
    BASES = (1_000_003, 998_244_353)

    def __init__(self, max_length: int):
        super().__init__()
        for k, (modulus, base) in enumerate(zip(self.MODULI, self.BASES)):
            powers = [1]
            for _ in range(max_length - 1):
                powers.append(powers[-1] * base % modulus)
            self.register_buffer(f"powers{k}", torch.tensor(powers, dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Token + 1 under the mask: padding adds nothing, every real token something (< 2^17 * 2^31 per term).
        tokens = (input_ids.long() + 1) * attention_mask.long()
        width = tokens.shape[1]
        h0 = (tokens * self.powers0[:width]).sum(dim=1) % self.MODULI[0]
        h1 = (tokens * self.powers1[:width]).sum(dim=1) % self.MODULI[1]
        return h0 * self.MODULI[1] + h1


def same_caption(caption_ids: torch.Tensor, caption_ids_all: torch.Tensor) -> torch.Tensor:
    """[B, N]: row i's caption is candidate j's (unknown ids, -1, match nothing)."""
    return (caption_ids[:, None] == caption_ids_all[None, :]) & (caption_ids_all[None, :] >= 0)


class FeatureQueue(nn.Module):
    """A ring buffer of momentum features (and their image ids) shared by all ranks.

    Every rank enqueues the same gathered batch, so the queues stay identical without broadcasting. Slots not yet
    written are tracked by ``filled`` (see ``valid_mask``) and never used as negatives. With ``keep_fusion_inputs``
    the queue also keeps what fusion needs of each entry (its online image tokens, text ids and mask) for ITM
    negatives drawn from the queue.
    """

    def __init__(self, size: int, embed_dim: int, keep_fusion_inputs: bool = False,
                 image_tokens_shape: Optional[tuple[int, int]] = None, text_length: Optional[int] = None):
        super().__init__()
        self.size = size
        self.register_buffer("image_feats", torch.zeros(size, embed_dim))
        self.register_buffer("text_feats", torch.zeros(size, embed_dim))
        self.register_buffer("image_ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("caption_ids", torch.full((size,), -1, dtype=torch.long))  # CaptionHash; -1: unknown
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.keep_fusion_inputs = keep_fusion_inputs
        if keep_fusion_inputs:
            assert image_tokens_shape is not None and text_length is not None
            self.register_buffer("image_tokens", torch.zeros(size, *image_tokens_shape))
            self.register_buffer("text_ids", torch.zeros(size, text_length, dtype=torch.long))
            self.register_buffer("text_mask", torch.zeros(size, text_length, dtype=torch.long))

    def valid_mask(self) -> torch.Tensor:
        """Which slots hold an entry, ``[size]`` bool (slots fill from 0 up). A mask over every slot rather than a
        slice of the filled ones: each step has the same shapes whatever the fill level, so a compiled step is
        traced once and the fill level is never read on the host."""
        return torch.arange(self.size, device=self.filled.device) < self.filled

    @torch.no_grad()
    def enqueue(self, image_feats: torch.Tensor, text_feats: torch.Tensor, image_ids: torch.Tensor,
                caption_ids: Optional[torch.Tensor] = None, image_tokens: Optional[torch.Tensor] = None,
                text_ids: Optional[torch.Tensor] = None, text_mask: Optional[torch.Tensor] = None) -> None:
        n = image_feats.shape[0]
        if n == 0 or self.size == 0:
            return
        if caption_ids is None:
            caption_ids = torch.full_like(image_ids, -1)
        if n > self.size:  # keep only the newest entries
            image_feats, text_feats, image_ids = image_feats[-self.size:], text_feats[-self.size:], image_ids[-self.size:]
            caption_ids = caption_ids[-self.size:]
            if self.keep_fusion_inputs:
                image_tokens, text_ids, text_mask = image_tokens[-self.size:], text_ids[-self.size:], text_mask[-self.size:]
            n = self.size
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size  # wraps around
        self.image_feats[slots] = image_feats.to(self.image_feats.dtype)
        self.text_feats[slots] = text_feats.to(self.text_feats.dtype)
        self.image_ids[slots] = image_ids
        self.caption_ids[slots] = caption_ids
        if self.keep_fusion_inputs:
            self.image_tokens[slots] = image_tokens.to(self.image_tokens.dtype)
            pad = self.text_ids.shape[1] - text_ids.shape[1]  # batches are padded only to their longest caption
            self.text_ids[slots] = F.pad(text_ids, (0, pad))
            self.text_mask[slots] = F.pad(text_mask, (0, pad))
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor,
             image_feat_all: torch.Tensor, text_feat_all: torch.Tensor,
             image_ids: torch.Tensor, image_ids_all: torch.Tensor, temperature: torch.Tensor,
             distill_alpha: Union[float, torch.Tensor] = 0.0,
             image_feat_m: Optional[torch.Tensor] = None, text_feat_m: Optional[torch.Tensor] = None,
             candidate_mask: Optional[torch.Tensor] = None, caption_ids: Optional[torch.Tensor] = None,
             caption_ids_all: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Image-text contrastive loss (ALBEF).

    ``image_feat``/``text_feat``: this rank's L2-normalised online features [B, E]. ``*_all``: the candidates, i.e.
    the momentum features of the global batch followed by the queue [N, E], with their image ids. Every candidate
    with the same image id is a positive (several captions of one image), and with ``caption_ids`` (CaptionHash)
    every candidate with the same caption too (one caption of several images: a word-for-word copy of the text
    scored as its negative is a target no model can meet). With ``distill_alpha`` > 0 the target mixes in the
    momentum model's own similarity distribution. ``candidate_mask`` [N]: False for candidates that do not exist
    (queue slots not yet written); they take no part, exactly as if left out.
    """
    positives = image_ids[:, None] == image_ids_all[None, :]
    if caption_ids is not None:
        positives = positives | same_caption(caption_ids, caption_ids_all)
    if candidate_mask is not None:
        positives = positives & candidate_mask[None, :]
    positives = positives.float()
    targets = positives / positives.sum(dim=1, keepdim=True).clamp(min=1)
    sim_i2t = _mask_candidates(image_feat @ text_feat_all.t() / temperature, candidate_mask)
    sim_t2i = _mask_candidates(text_feat @ image_feat_all.t() / temperature, candidate_mask)
    i2t_targets, t2i_targets = targets, targets
    if isinstance(distill_alpha, torch.Tensor) or distill_alpha > 0:  # a tensor: set each step (the ramp)
        with torch.no_grad():
            i2t_m = F.softmax(_mask_candidates(image_feat_m @ text_feat_all.t() / temperature, candidate_mask), dim=1)
            t2i_m = F.softmax(_mask_candidates(text_feat_m @ image_feat_all.t() / temperature, candidate_mask), dim=1)
            i2t_targets = distill_alpha * i2t_m + (1 - distill_alpha) * targets
            t2i_targets = distill_alpha * t2i_m + (1 - distill_alpha) * targets
    loss_i2t = -(_log_probs(sim_i2t, candidate_mask) * i2t_targets).sum(dim=1).mean()
    loss_t2i = -(_log_probs(sim_t2i, candidate_mask) * t2i_targets).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def distill_alpha_at(step: int, alpha: float, ramp_steps: int) -> float:
    """ALBEF's ramp: alpha grows linearly from 0 over the first ``ramp_steps`` optimizer steps (``step``: those
    already taken), then stays."""
    return alpha if ramp_steps <= 0 else alpha * min(1.0, step / ramp_steps)


def _mask_candidates(similarity: torch.Tensor, candidate_mask: Optional[torch.Tensor]) -> torch.Tensor:
    return similarity if candidate_mask is None else similarity.masked_fill(~candidate_mask[None, :], float("-inf"))


def _log_probs(similarity: torch.Tensor, candidate_mask: Optional[torch.Tensor]) -> torch.Tensor:
    log_probs = F.log_softmax(similarity.float(), dim=1)
    # Absent candidates have log-probability -inf and target 0; zero them so that 0 * -inf does not give NaN.
    return log_probs if candidate_mask is None else log_probs.masked_fill(~candidate_mask[None, :], 0.0)


@torch.no_grad()
def hard_negative_weights(similarity: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    """Sampling weights ∝ softmax(similarity), computed in fp32 (fp16 overflows), positives at exactly 0."""
    weights = F.softmax(similarity.float(), dim=1)
    weights = torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0)
    return weights.masked_fill(positive_mask, 0.0)


@torch.no_grad()
def sample_hard_negatives(weights: torch.Tensor, positive_mask: torch.Tensor,
                          generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One candidate index per row, drawn ∝ ``weights``; never a positive.

    ``torch.multinomial`` rejects rows whose weights are all zero or non-finite (every candidate a caption of the
    same image, a batch of one, overflow). A row whose weights vanish but which has non-positive candidates falls
    back to uniform over them; a row with no non-positive candidate at all gets no negative: ``has_negative`` is
    False there and its index is -1. No host synchronisation: every row is drawn, the invalid ones are masked after.
    """
    weights = torch.nan_to_num(weights.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0.0)
    weights = weights.masked_fill(positive_mask, 0.0)
    candidates = ~positive_mask
    has_negative = candidates.any(dim=1)
    degenerate = ~(weights.sum(dim=1) > 0)
    # Rows without any candidate draw from a dummy uniform row; their draw is discarded below.
    fallback = torch.where(has_negative[:, None], candidates.float(), torch.ones_like(weights))
    weights = torch.where(degenerate[:, None], fallback, weights)
    index = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return torch.where(has_negative, index, torch.full_like(index, -1)), has_negative


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            label_smoothing: float) -> torch.Tensor:
    """Next-token cross-entropy over the caption (after <bos>, through <eos>); padding ignored."""
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, label_smoothing=label_smoothing)
