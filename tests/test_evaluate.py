"""Retrieval recall, captioning scores and the evaluation loop on a tiny model."""
from __future__ import annotations

import math

import pytest
import torch

from loravl.config import DataConfig, RunConfig, TrainConfig
from loravl.evaluate import (caption_scores, chance_recall, evaluate_model, exact_match_accuracy, itm_rerank,
                             retrieval_recall)
from loravl.model import VisionLanguageModel

# 3 images, 5 texts; texts 0-1 describe image 0, text 2 image 1, texts 3-4 image 2.
SIM_I2T = torch.tensor([
    [0.10, 0.90, 0.80, 0.30, 0.20],
    [0.70, 0.60, 0.50, 0.90, 0.10],
    [0.20, 0.95, 0.10, 0.05, 0.30],
])
TEXT_TO_IMAGE = [0, 0, 1, 2, 2]


def test_retrieval_recall_matches_hand_computed_ranks():
    # Image->text rank of the best own caption: image 0 -> 0 (0.9 is top), image 1 -> 3 (0.7, 0.6, 0.9 beat 0.5),
    # image 2 -> 1 (0.95 beats 0.3). Text->image rank of the own image, by column: text 0 -> 2, text 1 -> 1,
    # text 2 -> 1, text 3 -> 2, text 4 -> 0.
    recall = retrieval_recall(SIM_I2T, TEXT_TO_IMAGE, ks=(1, 2, 5))
    assert recall["i2t_r1"] == pytest.approx(1 / 3)
    assert recall["i2t_r2"] == pytest.approx(2 / 3)
    assert recall["i2t_r5"] == pytest.approx(1.0)
    assert recall["t2i_r1"] == pytest.approx(1 / 5)
    assert recall["t2i_r2"] == pytest.approx(3 / 5)
    assert recall["t2i_r5"] == pytest.approx(1.0)
    assert recall["r_mean"] == pytest.approx((1 / 3 + 2 / 3 + 1 + 1 / 5 + 3 / 5 + 1) / 6)


def test_retrieval_recall_agrees_with_a_sorting_reference():
    g = torch.Generator().manual_seed(0)
    num_images, per_image = 12, 3
    sim = torch.randn(num_images, num_images * per_image, generator=g)
    owner = torch.arange(num_images).repeat_interleave(per_image)
    recall = retrieval_recall(sim, owner)
    for k in (1, 5, 10):
        i2t_hits = [bool(set(sim[i].argsort(descending=True)[:k].tolist()) & set((owner == i).nonzero().flatten()
                                                                                  .tolist()))
                    for i in range(num_images)]
        t2i_hits = [int(owner[j]) in sim[:, j].argsort(descending=True)[:k].tolist() for j in range(len(owner))]
        assert recall[f"i2t_r{k}"] == pytest.approx(sum(i2t_hits) / num_images)
        assert recall[f"t2i_r{k}"] == pytest.approx(sum(t2i_hits) / len(owner))


def test_ties_count_against_the_query():
    recall = retrieval_recall(torch.zeros(4, 4), [0, 1, 2, 3], ks=(1,))
    assert recall["i2t_r1"] == 0.0 and recall["t2i_r1"] == 0.0


def test_separate_text_to_image_scores_are_used():
    sim_t2i = torch.eye(3)[TEXT_TO_IMAGE]  # every text scores its own image highest
    recall = retrieval_recall(SIM_I2T, TEXT_TO_IMAGE, sim_t2i=sim_t2i, ks=(1,))
    assert recall["t2i_r1"] == 1.0 and recall["i2t_r1"] == pytest.approx(1 / 3)


def test_chance_recall():
    chance = chance_recall(num_images=4, captions_per_image=2, ks=(1, 2))
    assert chance["i2t_r1"] == pytest.approx(2 / 8)
    assert chance["i2t_r2"] == pytest.approx(1 - math.comb(6, 2) / math.comb(8, 2))
    assert chance["t2i_r1"] == pytest.approx(1 / 4)


def test_exact_match_normalises_case_and_whitespace():
    refs = [["A red circle  left of a blue square"], ["a b", "c d"], ["x"]]
    assert exact_match_accuracy(["a red circle left of a BLUE square ", "c   d", "y"], refs) == pytest.approx(2 / 3)


def test_bleu_of_identical_captions_is_one():
    refs = [["a red circle left of a blue square"], ["a green triangle above a purple circle"]]
    scores = caption_scores([r[0] for r in refs], refs)
    assert scores["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["exact_match"] == 1.0


def test_bleu_matches_hand_computed_corpus_value():
    # Corpus n-gram precisions: image 1 matches all of 4/3/2/1 n-grams, image 2 ("red green blue pink gray" vs
    # "... pink white") 4/5, 3/4, 2/3, 1/2. Hypothesis and closest reference lengths are equal, so no brevity penalty.
    candidates = ["red green blue pink", "red green blue pink gray"]
    refs = [["red green blue pink"], ["red green blue pink white"]]
    expected = (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25
    assert caption_scores(candidates, refs)["bleu_4"] == pytest.approx(expected, rel=1e-6)


def test_cider_matches_hand_computed_value():
    # Two images, one reference each. idf = log(2) - log(df): "red" is in both references (idf 0), all else idf
    # log 2. Image 2's candidate equals its reference: 10. Image 1 ("red green blue" vs "red green blue pink"):
    # cosines 2/sqrt(6) (1- and 2-grams), 1/sqrt(2) (3-grams), 0 (no 4-gram); pycocoevalcap's length penalty
    # exp(-delta^2 / 72) counts bigrams, delta = 2 - 3.
    candidates = ["red green blue", "red cat dog fox"]
    refs = [["red green blue pink"], ["red cat dog fox"]]
    image_1 = 10 * math.exp(-1 / 72) * (2 * 2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4
    assert caption_scores(candidates, refs)["cider"] == pytest.approx((image_1 + 10) / 2, rel=1e-9)


def test_scores_with_several_references_and_punctuation():
    scores = caption_scores(["A red circle."], [["a red circle", "a blue square"]])
    assert scores["exact_match"] == 0.0  # exact match keeps punctuation
    assert scores["bleu_1"] == pytest.approx(1.0, abs=1e-6)


@pytest.fixture
def tiny_model(tiny_model_config, tiny_tokenizer) -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel(tiny_model_config, tiny_tokenizer).eval()


def _encode(model: VisionLanguageModel, tokenizer, captions: list[str], num_images: int):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        image = model.encode_image(torch.randn(num_images, 3, 28, 28, generator=g))
        tokens = tokenizer(captions)
        text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    return image, text, tokens["attention_mask"]


def test_itm_rerank_scores_the_top_k_by_itm(tiny_model, tiny_tokenizer):
    from conftest import TINY_CAPTIONS

    image, text, mask = _encode(tiny_model, tiny_tokenizer, TINY_CAPTIONS[:6], num_images=3)
    sim = image["image_feat"] @ text["text_feat"].t()
    k = 2
    score_i2t, score_t2i = itm_rerank(tiny_model, sim, image["image_tokens"], text["text_states"], mask, k_test=k,
                                      pair_batch_size=3)
    assert score_i2t.shape == (3, 6) and score_t2i.shape == (6, 3)
    with torch.no_grad():
        for i in range(3):
            top = sim[i].topk(k).indices
            logits = tiny_model.itm_logits(image["image_tokens"][i].expand(k, -1, -1), text["text_states"][top],
                                           mask[top])
            torch.testing.assert_close(score_i2t[i, top], logits[:, 1] - logits[:, 0], rtol=1e-4, atol=1e-5)
            rest = torch.ones(6, dtype=torch.bool)
            rest[top] = False
            assert score_i2t[i, rest].max() < score_i2t[i, top].min()
            # outside the top k the ITC order is kept
            assert torch.equal(score_i2t[i, rest].argsort(), sim[i, rest].argsort())
        top_images = sim[:, 0].topk(k).indices
        logits = tiny_model.itm_logits(image["image_tokens"][top_images], text["text_states"][[0, 0]], mask[[0, 0]])
        torch.testing.assert_close(score_t2i[0, top_images], logits[:, 1] - logits[:, 0], rtol=1e-4, atol=1e-5)


def test_evaluate_model_on_a_demo_split(tiny_model, tmp_path):
    cfg = RunConfig(data=DataConfig(format="demo", train_path=str(tmp_path / "demo"), demo_train_size=2,
                                    demo_val_size=7, demo_image_size=32, num_workers=0),
                    train=TrainConfig(batch_size=3))
    from loravl.data.loader import build_dataset

    dataset = build_dataset(cfg.data, "val", image_size=28)
    tiny_model.train()
    metrics = evaluate_model(tiny_model, dataset, cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                             k_test=3, max_new_tokens=6, return_captions=True)
    assert tiny_model.training  # mode restored
    assert metrics["num_images"] == 7 and metrics["num_texts"] == 7
    for key in ("i2t_r1", "i2t_r10", "t2i_r5", "itm_i2t_r1", "itm_t2i_r10", "exact_match", "bleu_4", "cider"):
        assert 0.0 <= metrics[key] <= (10.0 if key == "cider" else 1.0), key
    assert metrics["i2t_r10"] == 1.0  # 7 images, 1 caption each: every caption is in the top 10
    assert len(metrics["samples"]) == 7 and all(isinstance(s["caption"], str) for s in metrics["samples"])
    assert metrics["samples"][0]["references"][0].startswith("a ")
    assert metrics["samples"][0]["image"].endswith("000000.png")

    limited = evaluate_model(tiny_model, dataset, cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                             itm_rerank_enabled=False, caption=False, max_images=4)
    assert limited["num_images"] == 4 and "itm_i2t_r1" not in limited and "cider" not in limited


def test_evaluate_cli_writes_metrics_json(tiny_model, tiny_model_config, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from loravl.checkpoint import Checkpointer, RNGState, TrainState
    from loravl.weights import ModelWeights

    cfg = RunConfig(model=tiny_model_config,
                    data=DataConfig(format="demo", train_path=str(tmp_path / "demo"), demo_train_size=2,
                                    demo_val_size=5, demo_image_size=32, num_workers=0))
    Checkpointer(tmp_path / "ckpt", keep_last=1, rank=0, world_size=1).save(
        3, ModelWeights(tiny_model), shared={}, per_rank={"rng": RNGState()}, train_state=TrainState(step=3),
        run_config=cfg.to_dict(), tokenizer=tiny_model.tokenizer)
    root = Path(__file__).resolve().parents[1]
    output = tmp_path / "out" / "metrics.json"
    result = subprocess.run([sys.executable, str(root / "src" / "evaluate.py"), "--checkpoint", str(tmp_path / "ckpt"),
                             "--output", str(output), "--max_new_tokens", "4", "--k_test", "2",
                             "--data.demo_val_size", "4"],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(output.read_text())
    assert metrics["num_images"] == 4  # the override reached the data config (a fresh 4-image demo val split)
    assert {"i2t_r1", "t2i_r10", "itm_i2t_r1", "exact_match", "bleu_4", "cider"} <= set(metrics)
    assert "generated" in result.stdout and "i2t_r1=" in result.stdout


def test_an_identical_caption_of_another_image_is_not_a_miss():
    from loravl.evaluate import retrieval_recall, same_caption_mask
    references = [["a red circle left of a blue square"], ["a red circle left of a blue square"], ["a green square"]]
    texts = [r[0] for r in references]
    positive = same_caption_mask(references, texts)
    assert positive.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    # Images 0 and 1 have the same caption, so their text features tie: the strict rule counts both as misses.
    sim = torch.tensor([[0.9, 0.9, 0.1], [0.9, 0.9, 0.1], [0.1, 0.1, 0.8]])
    strict = retrieval_recall(sim, [0, 1, 2], ks=(1,))
    assert strict["i2t_r1"] == pytest.approx(1 / 3)
    widened = retrieval_recall(sim, [0, 1, 2], ks=(1,), positive=positive)
    assert widened["i2t_r1"] == 1.0 and widened["t2i_r1"] == 1.0
    # A real negative still counts: image 2's only caption is ranked below another text.
    sim[2] = torch.tensor([0.9, 0.1, 0.5])
    assert retrieval_recall(sim, [0, 1, 2], ks=(1,), positive=positive)["i2t_r1"] == pytest.approx(2 / 3)
