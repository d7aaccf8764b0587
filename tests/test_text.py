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


def test_image_cross_attention_is_traced_without_a_mask():
    """The text model's attention equals transformers' SDPA, and under torch.compile its cross-attention to the
    image tokens gets no mask (transformers 5.17 materialises one while tracing, which rules out fused kernels)
    while the padded self-attention keeps its mask."""
    import copy

    from loravl.config import TextConfig
    from loravl.text import build_text_model

    torch.manual_seed(0)
    model = build_text_model(TextConfig(num_layers=2, hidden_size=64, num_heads=4), 400, 1, 2, 0).eval()
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    ids = torch.randint(3, 400, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    image = torch.randn(2, 17, 64)
    traced = []

    def record_sdpa_masks(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target):
                attn_mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
                keys = node.args[1].meta["example_value"].shape[2]
                traced.append((keys, attn_mask is not None))
        return gm.forward

    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).logits
        eager = model(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).logits
        compiled = torch.compile(model, backend=record_sdpa_masks, fullgraph=True)(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=image).logits
        torch._dynamo.reset()
    assert torch.equal(eager, expected) and torch.allclose(compiled, expected, atol=1e-6)
    assert sorted(traced) == [(8, True), (8, True), (17, False), (17, False)]
