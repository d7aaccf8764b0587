import torch

from loravl.text import CaptionTokenizer, gather_eos


def test_captions_become_bos_text_eos_padded_to_a_multiple_of_eight(tiny_tokenizer):
    out = tiny_tokenizer(["a red circle left of a yellow triangle", "a blue square"])
    ids, mask = out["input_ids"], out["attention_mask"]
    lengths = mask.sum(1)
    assert ids.shape[1] == min(tiny_tokenizer.max_length, -(-int(lengths.max()) // 8) * 8)
    short = tiny_tokenizer(["a blue square"])["input_ids"]
    assert short.shape[1] == 8, "a batch of short captions is padded only to 8"
    assert (ids[:, 0] == tiny_tokenizer.bos_id).all()
    assert (ids[torch.arange(2), lengths - 1] == tiny_tokenizer.eos_id).all()
    assert (ids[mask == 0] == tiny_tokenizer.pad_id).all()
    assert tiny_tokenizer.decode(ids) == ["a red circle left of a yellow triangle", "a blue square"]


def test_over_long_captions_are_cut_but_keep_eos(tiny_tokenizer):
    out = tiny_tokenizer(["a red circle left of a yellow triangle " * 5])
    assert out["input_ids"].shape == (1, tiny_tokenizer.max_length)
    assert out["input_ids"][0, -1] == tiny_tokenizer.eos_id and out["attention_mask"].all()


def test_tokenizer_round_trips_through_save_and_load(tiny_tokenizer, tmp_path):
    from loravl.text import load_tokenizer
    tiny_tokenizer.save(tmp_path)
    again = CaptionTokenizer(load_tokenizer(tmp_path), tiny_tokenizer.max_length)
    captions = ["a green square above a purple triangle"]
    assert torch.equal(again(captions)["input_ids"], tiny_tokenizer(captions)["input_ids"])


def test_eos_state_is_the_last_real_token():
    states = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert gather_eos(states, mask).flatten().tolist() == [1.0, 7.0]
