import importlib.util
import json
from pathlib import Path

import pytest
import torch

from loravl.finetune import (ADAPTERS, build_classifier, intended_trainable, load_classification_data,
                             write_synthetic_imagefolder)
from loravl.config import ConfigError
from loravl.finetune.cli import main as finetune_main
from loravl.finetune.loop import build_optimizer, train_step

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """An open_clip model config (2 blocks, width 32, patch 14 at 28 px) as --backbone clip:<file> takes it."""
    path = tmp_path_factory.mktemp("clip") / "tiny-clip-vit.json"
    path.write_text(json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 28, "layers": 2, "width": 32,
                                                                "head_width": 16, "patch_size": 14},
                                "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2,
                                             "layers": 1}}))
    return f"clip:{path}"


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory) -> str:
    return str(write_synthetic_imagefolder(tmp_path_factory.mktemp("synthetic"), per_class=20, image_size=28))


# Parameters that legitimately get no gradient: DINOv2's mask_token (only used with bool_masked_pos) and the key
# bias (adding a constant to every key shifts all of a query's logits equally: softmax removes it).
NO_GRADIENT = ("embeddings.mask_token", "k_proj.bias", "key.bias")


def _expected(name: str, adapter: str) -> bool:
    """The intended set written out independently of intended_trainable."""
    if name.startswith("head."):
        return True
    return {
        "lora": ".lora_A.default." in name or ".lora_B.default." in name,
        "lora_fa": ".lora_B.default." in name,
        "bitfit": name.endswith(".bias") and "lora_" not in name,
        "prompt": name == "prompt.tokens",
        "prefix": name in ("prefix.keys", "prefix.values", "prefix.gates"),
        "full": True,
        "linear": False,
    }[adapter]


@pytest.mark.parametrize("backbone", ["dinov2", "clip"])
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_exactly_the_intended_parameters_train(tiny_dinov2_path, tiny_clip, adapter, backbone):
    torch.manual_seed(0)
    spec = tiny_dinov2_path if backbone == "dinov2" else tiny_clip
    model = build_classifier(spec, num_classes=3, adapter=adapter, rank=4, alpha=8, num_prompts=3,
                             random_init=backbone == "clip")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if _expected(n, adapter)}
    assert trainable == {n for n, _ in model.named_parameters() if intended_trainable(n, adapter)}
    if adapter in ("lora", "lora_fa"):
        # DINOv2: q, k, v, o + fc1, fc2 per layer; CLIP: in_proj, out_proj + c_fc, c_proj per block
        expected = {"attention": 8, "mlp": 4} if backbone == "dinov2" else {"attention": 4, "mlp": 4}
        assert model.summary.lora.counts_by_kind == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, adapter_lr=1e-2, head_lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(2):  # LoRA's B is zero at init: A gets a gradient from the second step on
        g = torch.Generator().manual_seed(step)
        train_step(model, optimizer, torch.randn(4, 3, 28, 28, generator=g), torch.randint(0, 3, (4,), generator=g))
    for name, p in model.named_parameters():
        if name in trainable and not name.endswith(NO_GRADIENT):
            assert not torch.equal(p, before[name]), f"{adapter}: {name} did not train"
        elif name not in trainable and ".attn.base_layer." in name:
            # PEFT adds nn.MultiheadAttention's LoRA into its weights for each forward and takes it out after:
            # the frozen weights move by rounding alone.
            torch.testing.assert_close(p, before[name], atol=1e-6, rtol=1e-6)
        elif name not in trainable:
            assert torch.equal(p, before[name]), f"{adapter}: frozen {name} changed"
    text = model.summary.format()
    assert f"adapter {adapter}" in text and f"trainable: {model.summary.trainable_params:,} of" in text


def _features(model, pixels):
    with torch.no_grad():
        return model.eval().features(pixels)


@pytest.mark.parametrize("backbone", ["dinov2", "clip"])
@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_adapters_leave_the_output_unchanged_at_init(tiny_dinov2_path, tiny_clip, backbone, adapter):
    spec = tiny_dinov2_path if backbone == "dinov2" else tiny_clip
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = build_classifier(spec, num_classes=2, adapter="linear", random_init=backbone == "clip")
    torch.manual_seed(0)
    adapted = build_classifier(spec, num_classes=2, adapter=adapter, random_init=backbone == "clip")
    torch.testing.assert_close(_features(adapted, pixels), _features(plain, pixels))
    if adapter == "prefix":  # open gates: the prefixes are read, in every layer
        with torch.no_grad():
            adapted.prefix.gates.fill_(1.0)
        assert (_features(adapted, pixels) - _features(plain, pixels)).abs().max() > 1e-3


def test_clip_lora_on_the_notes_four_targets(tiny_clip):
    from peft import PeftModel

    torch.manual_seed(0)
    model = build_classifier(tiny_clip, num_classes=3, adapter="lora", random_init=True, rank=16, alpha=32)
    s = model.summary.lora
    assert "Total modules: 8, Attention modules: 4, MLP modules: 4, Rank: 16, Alpha: 32" in s.format()
    assert sorted(n.rsplit(".", 1)[-1] for n in s.adapted_modules) == ["c_fc", "c_fc", "c_proj", "c_proj",
                                                                       "in_proj", "in_proj", "out_proj", "out_proj"]
    assert isinstance(model.backbone, PeftModel)
    assert s.trainable_params == model.backbone.get_nb_trainable_parameters()[0]  # PEFT's own count
    rank = 16  # width 32: in_proj 32 -> 96, out_proj 32 -> 32, c_fc 32 -> 128, c_proj 128 -> 32, two blocks
    assert s.trainable_params == 2 * rank * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    # Trained a step, the merged backbone computes what the adapted one does.
    optimizer = build_optimizer(model, adapter_lr=1e-2, head_lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(2):
        train_step(model, optimizer, torch.randn(4, 3, 28, 28), torch.randint(0, 3, (4,)))
    pixels = torch.randn(2, 3, 28, 28)
    adapted = _features(model, pixels)
    model.backbone = model.backbone.merge_and_unload()
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_features(model, pixels), adapted, atol=1e-4, rtol=1e-4)


def test_clip_packed_attention_is_adapted_whole(tiny_clip):
    with pytest.raises(ConfigError, match="in_proj and out_proj together"):
        build_classifier(tiny_clip, num_classes=2, adapter="lora", random_init=True, lora_targets=["in_proj"])


def test_clip_weights_from_a_local_file(tiny_clip, tmp_path):
    import open_clip

    from loravl.finetune.clip import ClipVitTokens, create_clip_vit

    create_clip_vit(tiny_clip, random_init=True)  # registers the config file's model with open_clip
    torch.manual_seed(1)
    full = open_clip.create_model(Path(tiny_clip.removeprefix("clip:")).stem, pretrained=None)
    torch.save(full.state_dict(), tmp_path / "weights.pt")
    loaded = create_clip_vit(tiny_clip, weights=str(tmp_path / "weights.pt")).eval()
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).last_hidden_state,
                                   ClipVitTokens(full.visual).eval()(pixels).last_hidden_state)
    with pytest.raises(ConfigError, match="no such file"):
        create_clip_vit(tiny_clip, weights=str(tmp_path / "none.pt"))


def test_flowers102_from_a_folder_names_what_is_missing(tmp_path):
    (tmp_path / "flowers-102" / "jpg").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"flowers-102 does not hold Flowers102.*missing imagelabels.mat, "
                                                r"setid.mat"):
        load_classification_data(f"flowers102:{tmp_path}", image_size=28)


def test_summary_counts(tiny_dinov2_path):
    model = build_classifier(tiny_dinov2_path, num_classes=5, adapter="lora", rank=4, alpha=8)
    s = model.summary
    assert s.head_params == 2 * 32 * 5 + 5  # CLS and patch mean, 32 wide each
    assert s.adapter_params == s.lora.trainable_params == 2 * (4 * 4 * (32 + 32) + 2 * 4 * (32 + 128))
    assert s.total_params == sum(p.numel() for p in model.parameters())
    assert "rank=4, alpha=8" in s.format()


def test_prompt_tokens_go_after_cls(tiny_dinov2_path):
    model = build_classifier(tiny_dinov2_path, num_classes=2, adapter="prompt", num_prompts=3).eval()
    seen = {}
    model.backbone.encoder.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 28, 28))
    x = seen["x"]
    assert x.shape == (2, 1 + 3 + 4, 32)  # CLS, 3 prompts, 4 patches
    torch.testing.assert_close(x[0, 1:4], model.prompt.tokens)
    assert model.num_prefix_tokens == 4  # the patch mean skips CLS and the prompts


def test_lora_targets_follow_either_naming(tiny_dinov2_path):
    model = build_classifier(tiny_dinov2_path, num_classes=2, adapter="lora", lora_targets=["query", "v_proj"])
    adapted = model.summary.lora.adapted_modules
    assert len(adapted) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in adapted)


def test_fastvit_backbone_with_lora_fa():
    torch.manual_seed(0)
    model = build_classifier("fastvit_t8", num_classes=3, adapter="lora_fa", random_init=True, rank=4, alpha=8)
    assert model.summary.lora.counts_by_kind == {"conv": 3, "mlp": 20}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, adapter_lr=1e-2, head_lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(2):
        train_step(model, optimizer, torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in model.named_parameters() if ".lora_B." in n or n.startswith("head.")}


def test_hf_saved_dataset_folder(tmp_path, synthetic_data):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    files = sorted(Path(synthetic_data, "train").glob("*/*.png"))[::5]
    names = sorted({f.parent.name for f in files})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.open(f) for f in files], "label": [names.index(f.parent.name) for f in files]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}))
    ds.save_to_disk(str(tmp_path / "hf"))
    data = load_classification_data(str(tmp_path / "hf"), image_size=28, val_fraction=0.25, test_fraction=0.25)
    assert data.classes == names and len(data.train) + len(data.val) + len(data.test) == len(files)
    x, y = data.val[0]
    assert x.shape == (3, 28, 28) and 0 <= y < len(names)


def test_cli_writes_result(tmp_path, tiny_dinov2_path, synthetic_data, capsys):
    out = tmp_path / "result.json"
    finetune_main(["--adapter", "bitfit", "--data", synthetic_data, "--backbone", tiny_dinov2_path, "--image-size",
                   "28", "--epochs", "1", "--batch-size", "16", "--num-workers", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["adapter"] == "bitfit" and len(result["history"]) == 1 and 0 <= result["test_accuracy"] <= 1
    text = capsys.readouterr().out
    assert "adapter bitfit:" in text and "epoch 1/1: train loss" in text and "test accuracy" in text


def test_adapter_bench_beats_chance(tmp_path, tiny_dinov2_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_adapters", ROOT / "bench" / "adapters.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = tmp_path / "synthetic"
    rows = bench.main(["--make-synthetic", str(data), "--data", str(data), "--backbone", tiny_dinov2_path,
                       "--image-size", "28", "--epochs", "5", "--batch-size", "16", "--head-lr", "1e-2",
                       "--preset", "simple", "--num-workers", "0", "--out", str(tmp_path / "bench.json"),
                       "--methods", ",".join([*ADAPTERS, "lora_attn_r8"])])
    assert [r["method"] for r in rows] == [*ADAPTERS, "lora_attn_r8"]
    attention_only = rows[-1]
    assert attention_only["adapter"] == "lora" and 0 < attention_only["trainable_params"] < rows[0]["trainable_params"]
    assert all(r["step_ms"] > 0 for r in rows)
    for r in rows:  # 4 colour classes: chance is 0.25
        assert r["test_accuracy"] >= 0.7, (r["adapter"], r["test_accuracy"])
    assert json.loads((tmp_path / "bench.json").read_text())["results"] == rows
    table = capsys.readouterr().out
    assert "method" in table and "test acc" in table
