import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from loravl.losses import (CaptionHash, FeatureQueue, hard_negative_weights, itc_loss, lm_loss, same_caption,
                           sample_hard_negatives)


def test_itc_equals_hand_computed_value():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    ids = torch.tensor([0, 1])
    t = torch.tensor(0.5)
    loss = itc_loss(image, text, image, text, ids, ids, t)
    # i2t rows: image0 . texts = [0.6, 0.0]/0.5, image1 . texts = [0.8, 1.0]/0.5; targets are the diagonal.
    def ce(logits, target):
        return -(logits[target] - math.log(sum(math.exp(x) for x in logits)))
    i2t = (ce([1.2, 0.0], 0) + ce([1.6, 2.0], 1)) / 2
    # t2i rows: text0 . images = [0.6, 0.8]/0.5, text1 . images = [0.0, 1.0]/0.5
    t2i = (ce([1.2, 1.6], 0) + ce([0.0, 2.0], 1)) / 2
    assert abs(loss.item() - (i2t + t2i) / 2) < 1e-6


def test_caption_hash_is_equal_exactly_for_the_same_tokens_at_any_padding():
    hasher = CaptionHash(max_length=8)
    ids = torch.tensor([[5, 9, 2, 0, 0, 0], [5, 9, 2, 0, 0, 0], [5, 2, 9, 0, 0, 0], [5, 9, 2, 7, 0, 0],
                        [5, 9, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 3 + [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    h = hasher(ids, mask)
    assert h[0] == h[1] and len(set(h[1:].tolist())) == 4 and bool((h >= 0).all())
    assert hasher(ids[:1, :3], mask[:1, :3]) == h[0]  # padded to another width: the same caption
    # Unknown ids (-1, queue slots of older checkpoints) match nothing, not even each other.
    assert same_caption(torch.tensor([-1, 4]), torch.tensor([-1, 4])).tolist() == [[False, False], [False, True]]
    # Distinct random captions: no collisions.
    g = torch.Generator().manual_seed(0)
    many = torch.randint(0, 50000, (20000, 8), generator=g)
    assert len(set(hasher(many, torch.ones_like(many)).tolist())) == len({tuple(r) for r in many.tolist()})


def test_itc_counts_a_word_for_word_caption_of_another_image_as_positive():
    """Images 0 and 1 are captioned alike, and the features say so. Scored as each other's negatives, the loss
    pulls the two identical texts apart, each towards its own image, which no features can satisfy; counted as
    positives, the features are at the loss's minimum: no gradient."""
    image = torch.eye(3)
    text = F.normalize(torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    ids, captions = torch.tensor([0, 1, 2]), torch.tensor([11, 11, 12])
    t = torch.tensor(0.01)
    grads = []
    for kwargs in ({}, {"caption_ids": captions, "caption_ids_all": captions}):
        image_feat, text_feat = image.clone().requires_grad_(), text.clone().requires_grad_()
        itc_loss(image_feat, text_feat, image, text, ids, ids, t, **kwargs).backward()
        grads.append(torch.cat([image_feat.grad, text_feat.grad]).norm())
    by_image, by_caption = grads
    assert by_image > 10 and by_caption < 1e-4, grads


def test_itc_counts_every_caption_of_an_image_as_positive():
    feats = F.normalize(torch.randn(3, 4), dim=1)
    ids = torch.tensor([7, 7, 9])  # two captions of image 7
    loss = itc_loss(feats, feats, feats, feats, ids, ids, torch.tensor(1.0))
    sim = feats @ feats.t()
    targets = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]])
    expected = -(F.log_softmax(sim, 1) * targets).sum(1).mean()
    assert torch.allclose(loss, expected)


def test_queue_wraps_around():
    q = FeatureQueue(size=5, embed_dim=2)
    assert not q.valid_mask().any()
    q.enqueue(torch.ones(3, 2), torch.ones(3, 2), torch.tensor([0, 1, 2]))
    assert int(q.ptr) == 3 and int(q.filled) == 3
    q.enqueue(torch.full((4, 2), 2.0), torch.full((4, 2), 2.0), torch.tensor([3, 4, 5, 6]))
    # slots 3,4 then wrap to 0,1; slot 2 keeps the first batch's last entry
    assert q.image_ids.tolist() == [5, 6, 2, 3, 4]
    assert q.image_feats[:, 0].tolist() == [2.0, 2.0, 1.0, 2.0, 2.0]
    assert int(q.ptr) == 2 and int(q.filled) == 5 and q.valid_mask().all()


def test_queue_keeps_the_newest_when_a_batch_exceeds_it():
    q = FeatureQueue(size=3, embed_dim=1)
    q.enqueue(torch.arange(5.0)[:, None], torch.arange(5.0)[:, None], torch.arange(5))
    assert sorted(q.image_ids.tolist()) == [2, 3, 4]


@settings(max_examples=200, deadline=None)
@given(
    image_ids=st.lists(st.integers(0, 3), min_size=1, max_size=8),
    candidate_ids=st.lists(st.integers(0, 3), min_size=1, max_size=8),
    raw=st.lists(st.sampled_from([0.0, 1e-30, 0.3, 1.0, 50.0, 1e4, float("inf"), float("-inf"), float("nan")]),
                 min_size=64, max_size=64),
    seed=st.integers(0, 2**16),
)
def test_hard_negative_sampler_never_picks_a_positive(image_ids, candidate_ids, raw, seed):
    rows, cols = len(image_ids), len(candidate_ids)
    similarity = torch.tensor(raw[: rows * cols] + [0.0] * max(0, rows * cols - 64))[: rows * cols].view(rows, cols)
    positive = torch.tensor(image_ids)[:, None] == torch.tensor(candidate_ids)[None, :]
    weights = hard_negative_weights(similarity.half(), positive)  # fp16 input must not break it
    index, has_negative = sample_hard_negatives(weights, positive, generator=torch.Generator().manual_seed(seed))
    assert has_negative.tolist() == (~positive).any(1).tolist()
    for r in range(rows):
        if has_negative[r]:
            assert not positive[r, index[r]], "sampled a positive"
        else:
            assert index[r] == -1


def test_hard_negatives_follow_similarity():
    similarity = torch.tensor([[0.0, 9.0, 0.0, 0.0]])
    positive = torch.tensor([[True, False, False, False]])
    index, _ = sample_hard_negatives(hard_negative_weights(similarity, positive), positive,
                                     generator=torch.Generator().manual_seed(0))
    assert index.item() == 1


def test_lm_loss_ignores_padding():
    ids = torch.tensor([[1, 5, 6, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    logits = torch.randn(1, 6, 10)
    loss = lm_loss(logits, ids, mask, label_smoothing=0.0)
    expected = F.cross_entropy(logits[0, :3], torch.tensor([5, 6, 2]))
    assert torch.allclose(loss, expected)
    logits[0, 3:] = 1e3  # positions predicting padding do not count
    assert torch.allclose(lm_loss(logits, ids, mask, 0.0), expected)


def test_queue_fill_level_survives_a_state_dict_round_trip():
    q = FeatureQueue(size=4, embed_dim=2)
    q.enqueue(torch.ones(3, 2), torch.ones(3, 2), torch.tensor([0, 1, 2]))
    restored = FeatureQueue(size=4, embed_dim=2)
    restored.load_state_dict(q.state_dict())
    assert restored.valid_mask().tolist() == [True, True, True, False]
    restored.enqueue(torch.ones(3, 2), torch.ones(3, 2), torch.tensor([3, 4, 5]))
    assert restored.valid_mask().all() and int(restored.filled) == 4 and int(restored.ptr) == 2


def test_itc_masked_candidates_equal_leaving_them_out():
    """Queue slots not yet written are masked, not sliced off (fixed shapes): the loss and its gradients must be
    exactly those of the filled candidates alone, distillation included."""
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)
    image.requires_grad_(True)
    image_m, text_m = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)
    image_all, text_all = F.normalize(torch.randn(7, 8), dim=1), F.normalize(torch.randn(7, 8), dim=1)
    ids, ids_all = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1, 5, 1, -1, -1])  # 5 filled, 2 empty slots
    mask = torch.tensor([True] * 5 + [False] * 2)
    t = torch.tensor(0.1)
    masked = itc_loss(image, text, image_all, text_all, ids, ids_all, t, 0.4, image_m, text_m, mask)
    grad_masked, = torch.autograd.grad(masked, image)
    sliced = itc_loss(image, text, image_all[:5], text_all[:5], ids, ids_all[:5], t, 0.4, image_m, text_m)
    grad_sliced, = torch.autograd.grad(sliced, image)
    unmasked = itc_loss(image, text, image_all, text_all, ids, ids_all, t, 0.4, image_m, text_m)
    assert torch.isfinite(masked) and torch.allclose(masked, sliced, atol=1e-6)
    assert torch.allclose(grad_masked, grad_sliced, atol=1e-6)
    assert not torch.allclose(masked, unmasked, atol=1e-3)  # the empty slots would have counted


def test_distillation_ramps_from_zero_over_its_steps():
    """ALBEF's alpha: 0 at the first step, linear to its value after ``ramp_steps``, then constant; and an alpha
    of 0 given as a tensor (the model's per-step buffer) is exactly no distillation."""
    from loravl.losses import distill_alpha_at

    assert [distill_alpha_at(s, 0.4, 4) for s in (0, 1, 2, 4, 100)] == [0.0, 0.1, 0.2, 0.4, 0.4]
    assert distill_alpha_at(0, 0.4, 0) == 0.4  # no ramp
    g = torch.Generator().manual_seed(0)
    feats = [F.normalize(torch.randn(6, 8, generator=g), dim=-1) for _ in range(6)]
    ids = torch.arange(6)
    temperature = torch.tensor(0.07)
    plain = itc_loss(feats[0], feats[1], feats[2], feats[3], ids, ids, temperature)
    zero = itc_loss(feats[0], feats[1], feats[2], feats[3], ids, ids, temperature, torch.tensor(0.0),
                    feats[4], feats[5])
    full = itc_loss(feats[0], feats[1], feats[2], feats[3], ids, ids, temperature, torch.tensor(0.4),
                    feats[4], feats[5])
    assert torch.equal(zero, plain) and not torch.allclose(full, plain)
