"""Scores of text under a trained model, for zero-shot evaluation: log-probabilities of completions and image-text
match scores. Single-device code; the callers (``loravl.babylm``) batch and report.

Log-probabilities follow the BabyLM pipeline (and lm-evaluation-harness): the sum of log-softmax over the
completion's tokens, each predicted from everything before it, the sequence starting at <bos>; no <eos> is scored.
Text alone is read by the text model without its cross-attention layers (the unimodal pass ITC uses, trained as a
language model with ``loss.text_lm_weight``), exactly the network the exported causal LM holds; with an image, by
the captioner cross-attending to the image's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from loravl.model import VisionLanguageModel


@dataclass
class EncodedCompletion:
    ids: list[int]  # <bos> prefix completion, cut from the left to one more than the model's positions
    first_scored: int  # index in ids of the completion's first token still in the window
    truncated: bool


def encode_completion(model: "VisionLanguageModel", prefix: str, completion: str) -> EncodedCompletion:
    """Tokens of ``<bos> prefix completion``, lower-cased as the captions were in training. The completion's
    tokens are those the whole text has beyond the prefix's own tokens (lm-evaluation-harness's split), so a
    completion that starts with a space keeps it. Longer than the model's positions: the oldest tokens are cut, as
    lm-evaluation-harness cuts them (the model reads the last ``max_length`` tokens before each predicted one),
    and only the completion's tokens left in the window are scored."""
    tokenizer = model.tokenizer.tokenizer
    whole = tokenizer((prefix + completion).lower(), add_special_tokens=False)["input_ids"]
    context = tokenizer(prefix.lower(), add_special_tokens=False)["input_ids"] if prefix else []
    ids = [model.tokenizer.bos_id, *whole]
    first = 1 + len(context)
    limit = model.cfg.text.max_length + 1  # inputs are ids[:-1]
    if len(ids) <= limit:
        return EncodedCompletion(ids, first, False)
    cut = len(ids) - limit
    return EncodedCompletion(ids[cut:], max(1, first - cut), True)


def _pad(rows: Sequence[EncodedCompletion], pad_id: int, device: torch.device
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row.ids)] = torch.tensor(row.ids)
        mask[i, :len(row.ids)] = 1
        scored[i, row.first_scored:len(row.ids)] = True
    return ids.to(device), mask.to(device), scored.to(device)


@torch.no_grad()
def completion_logprobs(model: "VisionLanguageModel", rows: Sequence[EncodedCompletion],
                        image_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of the completion tokens' log-probabilities, one float per row: text alone, or each row read with its
    image (``image_tokens`` [rows, T, D] from ``model.encode_image``)."""
    device = model.temperature.device
    ids, mask, scored = _pad(rows, model.tokenizer.pad_id, device)
    inputs, input_mask = ids[:, :-1], mask[:, :-1]
    if image_tokens is None:
        logits = model.text(input_ids=inputs, attention_mask=input_mask).logits
    else:
        logits = model.caption_logits(image_tokens, inputs, input_mask)
    token_log_probs = F.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_log_probs * scored[:, 1:]).sum(dim=1)


@torch.no_grad()
def match_scores(model: "VisionLanguageModel", pixel_values: torch.Tensor, captions: Sequence[str],
                 pairs: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Image-text scores of ``pairs`` (image index, caption index): the ITM head's log-odds of "match", the ITC
    cosine similarity, and the captioner's log-probability of the whole caption given the image."""
    image = model.encode_image(pixel_values)
    tokens = model.tokenizer(list(captions))
    ids = tokens["input_ids"].to(pixel_values.device)
    mask = tokens["attention_mask"].to(pixel_values.device)
    text = model.encode_text(ids, mask)
    ii = torch.tensor([p[0] for p in pairs], device=pixel_values.device)
    tt = torch.tensor([p[1] for p in pairs], device=pixel_values.device)
    itm = model.itm_logits(image["image_tokens"][ii], text["text_states"][tt], mask[tt]).float()
    itc = (image["image_feat"][ii].float() * text["text_feat"][tt].float()).sum(-1)
    encoded = [encode_completion(model, "", captions[t]) for t in tt.tolist()]
    lm = completion_logprobs(model, encoded, image["image_tokens"][ii])
    return {"itm": itm[:, 1] - itm[:, 0], "itc": itc, "lm": lm}
