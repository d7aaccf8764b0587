import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from loravl.babylm import TASK_FOLDERS, main, read_task
from loravl.config import (CompressorConfig, FusionConfig, LoraConfig, LossConfig, ModelConfig, RunConfig,
                           TextConfig, VisionConfig)
from loravl.data.demo import COLOURS, RELATIONS, SHAPES, demo_caption
from loravl.generate import ImagePreparer
from loravl.loading import TEXT_LM_DIR, export_model
from loravl.losses import lm_loss
from loravl.model import VisionLanguageModel
from loravl.scoring import completion_logprobs, encode_completion
from loravl.text import CaptionTokenizer, train_tokenizer

FIXTURES = ROOT / "tests" / "fixtures" / "babylm"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fixtures_read_in_the_challenge_schemas():
    counts = {task: len(read_task(FIXTURES, task)[0]) for task in TASK_FOLDERS}
    assert counts == {"blimp": 34, "blimp_supplement": 7, "ewok": 6, "winoground": 8, "vqa": 12}
    blimp, _ = read_task(FIXTURES, "blimp")
    assert {i.uid for i in blimp} >= {"determiner_noun_agreement_1", "demo_word_order"}
    assert {i.field for i in blimp} == {"morphology", "syntax", "demo"}
    supplement, _ = read_task(FIXTURES, "blimp_supplement")
    assert {i.uid for i in supplement} == {"qa_congruence_easy", "turn_taking"}  # no UID key: the file's name
    ewok, _ = read_task(FIXTURES, "ewok")
    assert ewok[0].prefix == "The cup is on the table." and ewok[0].completions[0] == " The cup is above the table."
    vqa, _ = read_task(FIXTURES, "vqa")
    assert len(vqa[0].completions) == 8 and vqa[0].images[0].is_file()
    winoground, _ = read_task(FIXTURES, "winoground")
    assert all(p.suffix == ".png" for p in winoground[0].images)  # "ex_0_img_0" resolved with its extension


def test_bad_rows_are_skipped_counted_and_named(tmp_path):
    folder = tmp_path / "vqa"
    shutil.copytree(FIXTURES / "vqa_filtered", folder)
    good = _rows(folder / "vqa.jsonl")
    bad = [{**good[0], "image": "nowhere.png"}, {k: v for k, v in good[1].items() if k != "question"}]
    (folder / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good + bad) + "{not json\n")
    (folder / "images" / "vqa_2.png").write_bytes(b"not a png")
    items, skipped = read_task(tmp_path, "vqa")
    assert len(items) == 12 and skipped.counts == {"missing image 'nowhere.png'": 1, "missing key 'question'": 1,
                                                    "not JSON": 1}
    assert skipped.examples[0] == f"{folder / 'vqa.jsonl'}:13: missing image 'nowhere.png'"
    with pytest.raises(FileNotFoundError, match="no folder for ewok"):
        read_task(tmp_path, "ewok")


def _scene_captions() -> list[str]:
    return [demo_caption((c1, s1), r, (c2, s2)) for c1 in COLOURS for s1 in SHAPES for r in RELATIONS
            for c2 in COLOURS for s2 in SHAPES if (c1, s1) != (c2, s2)]


@pytest.fixture(scope="module")
def trained_export(tiny_dinov2_path, tmp_path_factory):
    """A tiny model whose preferences are known: its text model trained as a language model on demo captions,
    its captioner on the fixture's Winoground and VQA scenes with their captions; then exported."""
    torch.manual_seed(0)
    captions = _scene_captions()
    tokenizer = CaptionTokenizer(train_tokenizer(captions, vocab_size=400), max_length=64)
    cfg = ModelConfig(
        vision=VisionConfig(pretrained=tiny_dinov2_path, image_size=28, lora=LoraConfig(rank=4, alpha=8)),
        compressor=CompressorConfig(hidden_dim=24, embed_dim=16),
        text=TextConfig(vocab_size=400, max_length=64, num_layers=2, hidden_size=48, num_heads=2, dropout=0.0),
        fusion=FusionConfig(num_layers=1, num_heads=2), loss=LossConfig(embed_dim=16, queue_size=32))
    model = VisionLanguageModel(cfg, tokenizer)
    prepare = ImagePreparer(28, 10**8, 1)
    scenes = [(p, c) for row in _rows(FIXTURES / "winoground_filtered" / "winoground.jsonl")
              for p, c in ((row["image_0"], row["caption_0"]), (row["image_1"], row["caption_1"]))]
    images = [prepare(FIXTURES / "winoground_filtered" / "images" / f"{p}.png") for p, _ in scenes]
    texts = [c for _, c in scenes]
    for row in _rows(FIXTURES / "vqa_filtered" / "vqa.jsonl"):
        images.append(prepare(FIXTURES / "vqa_filtered" / "images" / row["image"]))
        texts.append(f"{row['question']} {row['target_ans']}")
    pixels, caption_tokens = torch.stack(images), tokenizer(texts)
    optimizer = torch.optim.Adam([p for _, p in model.trainable_parameters()], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is faster, and leaves the other core to the other worker
    for _ in range(250):
        batch = tokenizer([captions[i] for i in torch.randint(len(captions), (64,), generator=generator)])
        text_logits = model.text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        image_tokens = model.encode_image(pixels)["image_tokens"]
        caption_logits = model.caption_logits(image_tokens, caption_tokens["input_ids"],
                                              caption_tokens["attention_mask"])
        loss = lm_loss(text_logits, batch["input_ids"], batch["attention_mask"], 0.0) + \
            lm_loss(caption_logits, caption_tokens["input_ids"], caption_tokens["attention_mask"], 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    model.eval()
    folder = tmp_path_factory.mktemp("babylm") / "export"
    export_model(model, RunConfig(model=cfg), folder)
    return model, folder


def test_a_model_with_known_preferences_scores_as_predicted(trained_export, tmp_path, capsys):
    _, export = trained_export
    out = tmp_path / "results.json"
    assert main(["--checkpoint", str(export), "--data", str(FIXTURES), "--out", str(out), "--device", "cpu",
                 "--batch_size", "16"]) == 0
    results = json.loads(out.read_text())["tasks"]
    assert set(results) == set(TASK_FOLDERS)
    # Its text model has read demo captions only: each beats its own words shuffled.
    assert results["blimp"]["by_uid"]["demo_word_order"]["accuracy"] == 1.0
    assert results["blimp"]["by_field"]["demo"]["items"] == 12 and results["blimp"]["chance"] == 0.5
    # With the image, the captioner picks the object the picture holds, of eight (chance 12.5%) ...
    assert results["vqa"]["accuracy"] >= 0.9 and results["vqa"]["chance"] == 0.125
    # ... and, in each Winoground pair, the caption of each image over the same words in another order.
    assert results["winoground"]["lm"]["text"] >= 0.75 and results["winoground"]["items"] == 8
    assert set(results["winoground"]) >= {"itm", "itc", "lm", "chance"}
    assert results["ewok"]["items"] == 6 and results["blimp_supplement"]["bad_rows"] == {}
    table = capsys.readouterr().out
    assert "demo_word_order" not in table and "winoground" in table and "itm group" in table


def test_cli_names_what_it_cannot_read(trained_export, tmp_path, capsys):
    _, export = trained_export
    assert main(["--checkpoint", str(export), "--data", str(tmp_path), "--tasks", "blimp"]) == 2
    assert f"--data {tmp_path}: no folder for blimp" in capsys.readouterr().err
    assert main(["--checkpoint", str(export), "--data", str(FIXTURES), "--tasks", "blimp,glue"]) == 2
    assert "choose from" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "none"), "--data", str(FIXTURES), "--tasks", "ewok"]) == 2
    assert "cannot load" in capsys.readouterr().err


def test_exported_causal_lm_loads_without_loravl_and_scores_the_same(trained_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, export = trained_export
    lm = AutoModelForCausalLM.from_pretrained(str(export / TEXT_LM_DIR)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(export / TEXT_LM_DIR))
    assert type(lm).__name__ == "GPT2LMHeadModel" and not lm.config.add_cross_attention
    for prefix, completion in [("", "a red circle left of a blue square"), ("", "The Cat sat."),
                               ("a green square", " above a purple triangle")]:
        ours = completion_logprobs(model, [encode_completion(model, prefix, completion)]).item()
        whole = tokenizer(prefix + completion, return_tensors="pt")["input_ids"]
        context = len(tokenizer(prefix)["input_ids"]) if prefix else 1
        with torch.no_grad():
            log_probs = torch.log_softmax(lm(whole).logits[0, :-1], dim=-1)
        theirs = sum(log_probs[i - 1, whole[0, i]].item() for i in range(context, whole.shape[1]))
        assert abs(ours - theirs) < 1e-4, (prefix, completion)


LM_EVAL_TASK = """
task: loravl_fixture_blimp
dataset_path: json
dataset_kwargs:
  data_files:
    test: {files}
test_split: test
output_type: multiple_choice
doc_to_text: ""
doc_to_target: 0
doc_to_choice: "{{{{[sentence_good, sentence_bad]}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def test_lm_evaluation_harness_scores_the_export_as_loravl_does(trained_export, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    _, export = trained_export
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "loravl_fixture_blimp.yaml").write_text(textwrap.dedent(LM_EVAL_TASK).format(
        files=str(FIXTURES / "blimp_filtered" / "*.jsonl")))
    out = tmp_path / "ours.json"
    assert main(["--checkpoint", str(export), "--data", str(FIXTURES), "--tasks", "blimp", "--out", str(out),
                 "--device", "cpu"]) == 0
    ours = json.loads(out.read_text())["tasks"]["blimp"]
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export / TEXT_LM_DIR},dtype=float32",
                                     tasks=["loravl_fixture_blimp"], task_manager=TaskManager(include_path=str(tasks)),
                                     device="cpu", batch_size=8)
    assert theirs["results"]["loravl_fixture_blimp"]["acc,none"] == pytest.approx(ours["accuracy"])
    assert ours["items"] == 34 and 0.0 < ours["accuracy"] < 1.0
