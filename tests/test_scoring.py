import torch
import torch.nn.functional as F

from conftest import tiny_batch
from loravl.model import VisionLanguageModel
from loravl.scoring import completion_logprobs, encode_completion, match_scores


def _model(cfg, tokenizer):
    torch.manual_seed(0)
    return VisionLanguageModel(cfg, tokenizer).eval()


def _reference(model, ids: list[int], first: int, image_tokens=None) -> float:
    """The sum over the completion's tokens, one sequence, no padding."""
    x = torch.tensor([ids])
    logits = model.text(input_ids=x[:, :-1]).logits if image_tokens is None else \
        model.caption_logits(image_tokens, x[:, :-1], torch.ones_like(x[:, :-1]))
    log_probs = F.log_softmax(logits[0], dim=-1)
    return sum(log_probs[i - 1, ids[i]].item() for i in range(first, len(ids)))


def test_completion_tokens_are_scored_after_the_prefix(tiny_model_config, tiny_tokenizer):
    model = _model(tiny_model_config, tiny_tokenizer)
    prefix, completion = "a red circle", " left of a blue square"
    row = encode_completion(model, prefix, completion)
    whole = encode_completion(model, "", prefix + completion)
    assert row.ids == whole.ids and row.ids[0] == tiny_tokenizer.bos_id and not row.truncated
    assert row.first_scored == 1 + len(tiny_tokenizer.tokenizer(prefix)["input_ids"]) > 1
    scores = completion_logprobs(model, [row, whole, encode_completion(model, "", prefix)])
    assert abs(scores[0].item() - _reference(model, row.ids, row.first_scored)) < 1e-4
    # The chain rule: log p(prefix completion) = log p(prefix) + log p(completion | prefix).
    assert abs(scores[1].item() - scores[2].item() - scores[0].item()) < 1e-4
    # Upper case reads as the lower case the tokenizer was trained on.
    upper = completion_logprobs(model, [encode_completion(model, "A Red Circle", " LEFT of a blue square")])
    assert abs(upper.item() - scores[0].item()) < 1e-5


def test_rows_batched_with_padding_score_as_alone(tiny_model_config, tiny_tokenizer):
    model = _model(tiny_model_config, tiny_tokenizer)
    rows = [encode_completion(model, "", "a red circle"), encode_completion(model, "a blue", " square above a red")]
    together = completion_logprobs(model, rows)
    alone = torch.cat([completion_logprobs(model, [r]) for r in rows])
    assert torch.allclose(together, alone, atol=1e-5)


def test_long_text_keeps_the_last_positions(tiny_model_config, tiny_tokenizer):
    model = _model(tiny_model_config, tiny_tokenizer)
    limit = tiny_model_config.text.max_length
    row = encode_completion(model, "a red circle left of a blue square " * 3, "above a green square")
    assert row.truncated and len(row.ids) == limit + 1  # max_length inputs, each predicting the next
    score = completion_logprobs(model, [row]).item()
    assert abs(score - _reference(model, row.ids, row.first_scored)) < 1e-4
    short = encode_completion(model, "", "a red circle")
    assert not short.truncated


def test_image_conditioned_scores_read_the_image(tiny_model_config, tiny_tokenizer):
    model = _model(tiny_model_config, tiny_tokenizer)
    pixels = tiny_batch(tiny_tokenizer, 2)["pixel_values"]
    tokens = model.encode_image(pixels)["image_tokens"]
    rows = [encode_completion(model, "a red circle", " left of a blue square")] * 2
    scores = completion_logprobs(model, rows, tokens)
    for i in range(2):
        assert abs(scores[i].item() - _reference(model, rows[i].ids, rows[i].first_scored, tokens[i:i + 1])) < 1e-4
    assert abs(scores[0] - scores[1]) > 0, "two images, two scores"


def test_match_scores_are_the_model_heads(tiny_model_config, tiny_tokenizer):
    model = _model(tiny_model_config, tiny_tokenizer)
    pixels = tiny_batch(tiny_tokenizer, 2)["pixel_values"]
    captions = ["a red circle left of a blue square", "a blue square left of a red circle"]
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1)]
    scores = match_scores(model, pixels, captions, pairs)
    image = model.encode_image(pixels)
    tokens = tiny_tokenizer(captions)
    text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    for k, (i, t) in enumerate(pairs):
        logits = model.itm_logits(image["image_tokens"][i:i + 1], text["text_states"][t:t + 1],
                                  tokens["attention_mask"][t:t + 1])[0]
        assert abs(scores["itm"][k] - (logits[1] - logits[0])) < 1e-4
        assert abs(scores["itc"][k] - image["image_feat"][i] @ text["text_feat"][t]) < 1e-5
        row = encode_completion(model, "", captions[t])
        assert abs(scores["lm"][k] - _reference(model, row.ids, 1, image["image_tokens"][i:i + 1])) < 1e-4
