"""Validation metrics: image-text retrieval (ITC, optionally ITM re-ranked) and captioning (exact match, BLEU, CIDEr).

Retrieval follows ALBEF/BLIP: rank every text for every image (and every image for every text) by ITC cosine
similarity; with ITM re-ranking the top ``k_test`` candidates of each query are scored again by the fusion encoder's
ITM head and placed, in that order, ahead of the rest (which keep their ITC order). An image->text query is a hit at
k when any of the image's captions is among the first k; a text->image query when its image is.

Captioning compares one generated caption per image with all of the image's reference captions: BLEU-1..4 and
CIDEr(-D) through pycocoevalcap's scorers (pure Python; the Java PTB tokenizer is replaced by a lowercase
word split), and exact match after lowercasing and collapsing whitespace.

All rates are fractions in [0, 1]; CIDEr is on its usual scale (10 for a caption equal to its only reference).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union

import torch

from loravl.config import ConfigError, DataConfig, RunConfig, load_config, parse_overrides
from loravl.device import bf16_autocast
from loravl.generate import generate_captions, model_device

if TYPE_CHECKING:
    from loravl.model import VisionLanguageModel

logger = logging.getLogger(__name__)

RECALL_KS: tuple[int, ...] = (1, 5, 10)
# Candidates outside the re-ranked top k keep their ITC order but go below every ITM-scored candidate; cosine
# similarities lie in [-1, 1], so this offset is far past any of them.
_BELOW_CANDIDATES = 1.0e4


# -- retrieval ----------------------------------------------------------------------------------------------------


def retrieval_recall(sim_i2t: torch.Tensor, text_to_image: Union[torch.Tensor, Sequence[int]],
                     sim_t2i: Optional[torch.Tensor] = None, ks: Sequence[int] = RECALL_KS,
                     positive: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Recall@k both ways from score matrices.

    sim_i2t: [num_images, num_texts] scores for ranking texts per image; sim_t2i: [num_texts, num_images] for
    ranking images per text (default ``sim_i2t.T``; re-ranking makes the two differ). text_to_image[j]: the image
    index of text j. Ties count against the query (a candidate scored equal to the positive ranks ahead of it),
    so a constant scorer gets zero, not a perfect score.

    ``positive`` [num_images, num_texts] (default: text j is positive for image text_to_image[j] only) widens what
    counts as a hit: ``evaluate_model`` passes "the text is, word for word, one of the image's captions", so two
    images with the same caption (frequent in the demo's 420-caption world) do not count as each other's misses.

    Returns ``i2t_r{k}``, ``t2i_r{k}`` and ``r_mean`` (their mean, as ALBEF reports), as fractions.
    """
    sim_i2t = sim_i2t.detach().float().cpu()
    sim_t2i = sim_i2t.t() if sim_t2i is None else sim_t2i.detach().float().cpu()
    owner = torch.as_tensor(text_to_image, dtype=torch.long).cpu()
    num_images, num_texts = sim_i2t.shape
    if owner.shape != (num_texts,):
        raise ValueError(f"text_to_image has shape {tuple(owner.shape)}, expected ({num_texts},)")
    if sim_t2i.shape != (num_texts, num_images):
        raise ValueError(f"sim_t2i has shape {tuple(sim_t2i.shape)}, expected ({num_texts}, {num_images})")
    if num_texts and (owner.min() < 0 or owner.max() >= num_images):
        raise ValueError("text_to_image holds an index outside [0, num_images)")

    own = owner[None, :] == torch.arange(num_images)[:, None]  # [images, texts]
    positive = own if positive is None else (positive.cpu().bool() | own)
    has_text = positive.any(dim=1)
    # Image -> text: rank of the best-scored positive = how many negatives score at least as high.
    best_positive = sim_i2t.masked_fill(~positive, -math.inf).max(dim=1).values
    i2t_rank = ((sim_i2t >= best_positive[:, None]) & ~positive).sum(dim=1)[has_text]
    # Text -> image: how many non-positive images score at least as high as the text's best positive image.
    positive_t = positive.t()
    own_score = sim_t2i.masked_fill(~positive_t, -math.inf).max(dim=1, keepdim=True).values
    t2i_rank = ((sim_t2i >= own_score) & ~positive_t).sum(dim=1)

    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item() if len(i2t_rank) else 0.0
    for k in ks:
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item() if len(t2i_rank) else 0.0
    values = [out[f"i2t_r{k}"] for k in ks] + [out[f"t2i_r{k}"] for k in ks]
    out["r_mean"] = sum(values) / len(values)
    return out


def same_caption_mask(references: Sequence[Sequence[str]], texts: Sequence[str]) -> torch.Tensor:
    """[images, texts]: text j is word for word (after normalising) one of image i's reference captions."""
    index: dict[str, list[int]] = {}
    for j, text in enumerate(texts):
        index.setdefault(normalize_caption(text), []).append(j)
    mask = torch.zeros(len(references), len(texts), dtype=torch.bool)
    for i, refs in enumerate(references):
        for ref in refs:
            mask[i, index.get(normalize_caption(ref), [])] = True
    return mask


def chance_recall(num_images: int, captions_per_image: float, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Expected recall of a random ranking (as ``retrieval_recall`` keys), for a split where every image has
    ``captions_per_image`` captions: text->image k/N; image->text 1 - C(T-c, k)/C(T, k) with T texts, c positives."""
    c = captions_per_image
    num_texts = num_images * c
    out: dict[str, float] = {}
    for k in ks:
        miss = 1.0
        for i in range(min(k, int(num_texts))):
            miss *= max(0.0, (num_texts - c - i) / (num_texts - i))
        out[f"i2t_r{k}"] = 1.0 - miss
    for k in ks:
        out[f"t2i_r{k}"] = min(1.0, k / num_images)
    values = [out[f"i2t_r{k}"] for k in ks] + [out[f"t2i_r{k}"] for k in ks]
    out["r_mean"] = sum(values) / len(values)
    return out


@torch.no_grad()
def itm_rerank(model: "VisionLanguageModel", sim_i2t: torch.Tensor, image_tokens: torch.Tensor,
               text_states: torch.Tensor, text_mask: torch.Tensor, k_test: int,
               pair_batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF-style re-ranking: the top ``k_test`` candidates of each query get the ITM head's match score
    (log-odds of "match", monotone in its probability and without its saturation at 1.0).

    Returns (score_i2t [images, texts], score_t2i [texts, images]); non-candidates keep their ITC order below.
    """
    device = image_tokens.device
    sim_i2t = sim_i2t.to(device)

    def match_log_odds(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        scores = []
        for start in range(0, len(image_index), pair_batch_size):
            ii, tt = image_index[start:start + pair_batch_size], text_index[start:start + pair_batch_size]
            logits = model.itm_logits(image_tokens[ii], text_states[tt], text_mask[tt]).float()
            scores.append(logits[:, 1] - logits[:, 0])
        return torch.cat(scores) if scores else torch.empty(0, device=device)

    def rerank(sim: torch.Tensor, images_are_queries: bool) -> torch.Tensor:
        k = min(k_test, sim.shape[1])
        score = sim.float() - _BELOW_CANDIDATES
        if k == 0:
            return score
        top = sim.topk(k, dim=1).indices  # [queries, k]
        queries = torch.arange(sim.shape[0], device=device)[:, None].expand_as(top)
        if images_are_queries:
            itm = match_log_odds(queries.reshape(-1), top.reshape(-1))
        else:
            itm = match_log_odds(top.reshape(-1), queries.reshape(-1))
        score.scatter_(1, top, itm.view_as(top))
        return score

    return rerank(sim_i2t, True), rerank(sim_i2t.t(), False)


# -- captioning metrics -------------------------------------------------------------------------------------------


def normalize_caption(text: str) -> str:
    """For exact match: lowercase, whitespace collapsed."""
    return " ".join(text.lower().split())


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize_for_scoring(text: str) -> str:
    """A Java-free stand-in for COCO's PTB tokenizer: lowercase words, punctuation dropped."""
    return " ".join(_WORD.findall(text.lower()))


def exact_match_accuracy(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of candidates equal (normalised) to any of their references."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        return 0.0
    hits = sum(normalize_caption(c) in {normalize_caption(r) for r in refs} for c, refs in zip(candidates, references))
    return hits / len(candidates)


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """``exact_match``, ``bleu_1``..``bleu_4`` (corpus BLEU, pycocoevalcap's "closest" reference length) and
    ``cider`` (CIDEr-D, idf over this split's references) for one candidate per image."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    out: dict[str, float] = {"exact_match": exact_match_accuracy(candidates, references)}
    keep = [i for i, refs in enumerate(references) if refs]
    if not keep:
        return {**out, "bleu_1": 0.0, "bleu_2": 0.0, "bleu_3": 0.0, "bleu_4": 0.0, "cider": 0.0}
    gts = {i: [tokenize_for_scoring(r) for r in references[i]] for i in keep}
    res = {i: [tokenize_for_scoring(candidates[i])] for i in keep}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out.update({f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    out["cider"] = float(cider)
    return out


# -- running a model over a validation set ------------------------------------------------------------------------


@dataclass
class _Collected:
    image_ids: list[int]
    image_feats: torch.Tensor
    image_tokens: torch.Tensor
    references: list[list[str]]
    captions: list[str]


def _as_batches(data: Any, data_cfg: DataConfig, batch_size: int, seed: int,
                num_workers: Optional[int]) -> Iterable[dict]:
    """A loader (anything yielding batch dicts with ``all_captions``) is used as is; a dataset gets an eval loader
    from the data layer."""
    from torch.utils.data import Dataset

    if isinstance(data, Dataset):
        from loravl.data.loader import build_dataloader

        return build_dataloader(data, data_cfg, batch_size, train=False, seed=seed, num_workers=num_workers)
    return data


@torch.no_grad()
def _collect(model: "VisionLanguageModel", batches: Iterable[dict], *, caption: bool, max_images: Optional[int],
             generate_kwargs: dict[str, Any]) -> _Collected:
    device = model_device(model)
    ids: list[int] = []
    feats, tokens, references, captions = [], [], [], []
    seen: set[int] = set()
    for batch in batches:
        if "all_captions" not in batch:
            raise ValueError("evaluation batches need 'all_captions' (an eval loader: build_dataloader(train=False))")
        # Distributed samplers pad with repeated images; score each image once.
        keep = [i for i, image_id in enumerate(batch["image_ids"].tolist()) if image_id not in seen]
        if max_images is not None:
            keep = keep[: max(0, max_images - len(ids))]
        if not keep:
            if max_images is not None and len(ids) >= max_images:
                break
            continue
        pixel_values = batch["pixel_values"][keep].to(device, non_blocking=True)
        with bf16_autocast(device):
            image = model.encode_image(pixel_values)
        feats.append(image["image_feat"].float())
        tokens.append(image["image_tokens"])
        for i in keep:
            image_id = int(batch["image_ids"][i])
            seen.add(image_id)
            ids.append(image_id)
            references.append(list(batch["all_captions"][i]))
        if caption:
            captions.extend(generate_captions(model, pixel_values, **generate_kwargs))
    if not ids:
        raise ValueError("the validation data yielded no images")
    return _Collected(ids, torch.cat(feats), torch.cat(tokens), references, captions)


@torch.no_grad()
def _encode_texts(model: "VisionLanguageModel", texts: list[str], batch_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = model_device(model)
    feats, states, masks = [], [], []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenizer(texts[start:start + batch_size])
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        with bf16_autocast(device):
            text = model.encode_text(ids, mask)
        feats.append(text["text_feat"].float())
        states.append(text["text_states"])
        masks.append(mask)
    return torch.cat(feats), torch.cat(states), torch.cat(masks)


def image_paths_by_id(data: Any) -> dict[int, str]:
    """image id -> file path, where the dataset's record table lists them (map-style file formats); else empty."""
    table = getattr(data, "table", None)
    images, ids = getattr(table, "images", None), getattr(table, "image_ids", None)
    if images is None or ids is None:
        return {}
    return {int(i): str(p) for i, p in zip(ids, images) if isinstance(p, str)}


def evaluate_model(model: "VisionLanguageModel", data: Any, data_cfg: DataConfig, *, batch_size: int = 64,
                   seed: int = 0, k_test: int = 16, itm_rerank_enabled: bool = True, caption: bool = True,
                   max_new_tokens: int = 30, num_beams: int = 1, num_workers: Optional[int] = None,
                   max_images: Optional[int] = None, return_captions: bool = False,
                   log_samples: int = 3) -> dict[str, Any]:
    """Retrieval and captioning metrics of ``model`` on a validation dataset or eval loader (one process; call it on
    rank 0). ``data_cfg`` and ``seed`` build the loader where ``data`` is a dataset. Keys: ``i2t_r{1,5,10}``,
    ``t2i_r{1,5,10}``, ``r_mean`` (ITC), the same prefixed ``itm_`` when re-ranked, ``exact_match``,
    ``bleu_1..4``, ``cider``, ``num_images``, ``num_texts``, ``eval_seconds``; with ``return_captions`` also
    ``samples``: [{image_id, image (path, when known), caption, references}].
    The first ``log_samples`` generated captions are logged (INFO, logger ``loravl.evaluate``).
    The model's train/eval mode is restored afterwards."""
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        collected = _collect(model, _as_batches(data, data_cfg, batch_size, seed, num_workers), caption=caption,
                             max_images=max_images,
                             generate_kwargs={"max_new_tokens": max_new_tokens, "num_beams": num_beams})
        texts = [text for refs in collected.references for text in refs]
        text_to_image = torch.tensor([i for i, refs in enumerate(collected.references) for _ in refs],
                                     dtype=torch.long)
        text_feats, text_states, text_mask = _encode_texts(model, texts, batch_size)
        sim_i2t = collected.image_feats @ text_feats.t()
        positive = same_caption_mask(collected.references, texts)
        metrics: dict[str, Any] = dict(retrieval_recall(sim_i2t, text_to_image, positive=positive))
        if itm_rerank_enabled and k_test > 0:
            with bf16_autocast(model_device(model)):
                score_i2t, score_t2i = itm_rerank(model, sim_i2t, collected.image_tokens, text_states, text_mask,
                                                  k_test)
            metrics.update({f"itm_{k}": v for k, v in
                            retrieval_recall(score_i2t, text_to_image, score_t2i, positive=positive).items()})
        if caption:
            metrics.update(caption_scores(collected.captions, collected.references))
        metrics["num_images"] = len(collected.image_ids)
        metrics["num_texts"] = len(texts)
        if caption and (return_captions or log_samples > 0):
            paths = image_paths_by_id(data)
            samples = [{"image_id": image_id, "image": paths.get(image_id), "caption": c, "references": refs}
                       for image_id, c, refs in zip(collected.image_ids, collected.captions, collected.references)]
            for sample in samples[:log_samples]:
                logger.info("  %s: generated %r, reference %r", sample["image"] or f"image {sample['image_id']}",
                            sample["caption"], sample["references"][0])
            if return_captions:
                metrics["samples"] = samples
    finally:
        model.train(was_training)
    metrics["eval_seconds"] = time.perf_counter() - started
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line for logs: rates as percentages, CIDEr and BLEU as numbers."""
    parts = []
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or key in ("num_images", "num_texts"):
            continue
        if key.startswith(("i2t", "t2i", "itm_", "r_mean", "exact_match")):
            parts.append(f"{key}={100 * value:.1f}%")
        elif key == "eval_seconds":
            parts.append(f"{key}={value:.1f}")
        else:
            parts.append(f"{key}={value:.3f}")
    return " ".join(parts)


# -- command line -------------------------------------------------------------------------------------------------


def _merge_dicts(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Retrieval and captioning metrics of a trained loravl model on a validation split. Extra "
                    "--section.key value options override the data config (e.g. --data.val_path val.jsonl).")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, checkpoint dir or exported model")
    parser.add_argument("--config", default=None,
                        help="YAML whose data section replaces the checkpoint's (another validation set)")
    parser.add_argument("--output", default=None, help="write the metrics as JSON here")
    parser.add_argument("--device", default=None)
    parser.add_argument("--k_test", type=int, default=16, help="candidates re-ranked by ITM per query")
    parser.add_argument("--no_itm", action="store_true", help="ITC retrieval only")
    parser.add_argument("--no_caption", action="store_true", help="retrieval only")
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=None)
    parser.add_argument("--max_images", type=int, default=None)
    parser.add_argument("--show", type=int, default=5, help="print this many generated captions")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, overrides = build_arg_parser().parse_known_args(argv)
    from loravl.data.loader import build_dataset
    from loravl.generate import quiet_library_output
    from loravl.loading import load_model_for_command

    quiet_library_output()

    loaded = load_model_for_command(args.checkpoint, args.device)
    if loaded is None:
        return 2
    model, run_cfg = loaded
    try:
        if args.config is not None:
            run_cfg.data = load_config(args.config, overrides).data
        elif overrides:
            run_cfg = _apply_overrides(run_cfg, overrides)
        dataset = build_dataset(run_cfg.data, "val", model.cfg.vision.image_size)
    except ConfigError as e:  # DataFormatError (a missing val file) is one too
        print(f"config error: {e}", file=sys.stderr)
        return 2
    metrics = evaluate_model(model, dataset, run_cfg.data, batch_size=args.batch_size or run_cfg.train.batch_size,
                             seed=run_cfg.train.seed, k_test=args.k_test, itm_rerank_enabled=not args.no_itm,
                             caption=not args.no_caption, max_new_tokens=args.max_new_tokens,
                             num_beams=args.num_beams, num_workers=args.num_workers,
                             max_images=args.max_images, return_captions=args.show > 0, log_samples=0)
    samples = metrics.pop("samples", [])
    for sample in samples[: args.show]:
        name = sample["image"] or f"image {sample['image_id']}"
        print(f"{name}: generated {sample['caption']!r}, reference {sample['references'][0]!r}")
    print(format_metrics(metrics))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def _apply_overrides(run_cfg: RunConfig, overrides: list[str]) -> RunConfig:
    from loravl.config import config_from_dict

    return config_from_dict(_merge_dicts(run_cfg.to_dict(), parse_overrides(overrides)))
