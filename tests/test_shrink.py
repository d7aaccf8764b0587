"""loravl.data.shrink: a dataset's copy with its images shrunk to the size training decodes."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from loravl.config import DataConfig, load_config
from loravl.data import Skip, build_dataset, load_rgb_image, skips
from loravl.data.formats import open_source
from loravl.data.images import decode_target_size, resize_uint8
from loravl.data.shrink import (ALREADY_THERE, GIF, OTHER_FILE, SHRUNK, SMALL_ENOUGH, ShrinkSettings, main,
                                shrink_target, shrink_tree)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients with a few hard edges: photo-like content JPEG codes as it codes photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(2 * np.pi * (f * x + g * y) + p) for f, g, p in rng.uniform(0.5, 3, size=(3, 3))]
    array = (127.5 + 100 * np.stack(channels, axis=-1)).astype(np.uint8)
    array[height // 4: height // 2, width // 3: width // 2] = (200, 30, 40)  # a red block: chroma edges
    return Image.fromarray(array)


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95, **options)
    return out.getvalue()


def decoded(source) -> torch.Tensor:
    pixels = load_rgb_image(source, max_pixels=10**8, min_size=1, as_tensor=True)
    assert not isinstance(pixels, Skip), pixels
    return pixels


@pytest.fixture
def dataset_folder(tmp_path):
    """A jsonl dataset as users have them: photos in a sub-folder, one rotated by EXIF, a PNG with transparency,
    a small image, a corrupt file, a GIF (not in the manifest) and the manifest."""
    root = tmp_path / "source"
    (root / "images").mkdir(parents=True)
    (root / "images" / "large.jpg").write_bytes(jpeg_bytes(photo(400, 300)))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 400x200, shown 200x400
    (root / "images" / "rotated.jpg").write_bytes(jpeg_bytes(photo(400, 200, seed=1), exif=exif))
    rgba = photo(300, 240, seed=2).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(np.arange(300)[None, :] < 100, 0, 255).repeat(240, 0).astype(np.uint8)))
    rgba.save(root / "images" / "clear.png")
    (root / "images" / "small.jpg").write_bytes(jpeg_bytes(photo(90, 60, seed=3)))
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    photo(300, 200, seed=6).save(root / "images" / "anim.gif")
    names = ["large", "rotated", "small", "broken"]
    lines = [json.dumps({"image": f"images/{n}.jpg", "caption": f"a {n} photo"}) for n in names]
    lines.append(json.dumps({"image": "images/clear.png", "caption": "a clear photo"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_images_over_the_short_side_are_shrunk_everything_else_copied_byte_for_byte(dataset_folder, tmp_path):
    target = tmp_path / "shrunk"
    report = shrink_tree(dataset_folder, target, ShrinkSettings(short_side=100), workers=0)

    assert report.outcomes == {SHRUNK: 3, SMALL_ENOUGH: 1, GIF: 1, OTHER_FILE: 1, skips.CORRUPT_IMAGE: 1}
    for same in ("manifest.jsonl", "images/small.jpg", "images/broken.jpg", "images/anim.gif"):
        assert (target / same).read_bytes() == (dataset_folder / same).read_bytes()
    large = decoded(target / "images" / "large.jpg")
    assert large.shape == (3, 100, 133)
    # Upright: EXIF orientation applied before shrinking, none left in the file.
    with Image.open(target / "images" / "rotated.jpg") as rotated:
        assert rotated.size == (100, 200) and rotated.getexif().get(0x0112) is None
    # The PNG stays a PNG, its transparency on white as the loader composites it.
    with Image.open(target / "images" / "clear.png") as clear:
        assert clear.format == "PNG" and clear.mode == "RGB" and clear.size == (125, 100)
        assert np.asarray(clear)[:, :35].min() == 255
    assert report.bytes_out < report.bytes_in

    # The manifest reads the copy as it read the source: the same records, the broken image still skipped.
    before = build_dataset(DataConfig(format="jsonl", train_path=str(dataset_folder / "manifest.jsonl")), "train", 56)
    after = build_dataset(DataConfig(format="jsonl", train_path=str(target / "manifest.jsonl")), "train", 56)
    assert len(after) == len(before) == 5
    for i in range(len(after)):
        a, b = after[i], before[i]
        assert isinstance(a, Skip) == isinstance(b, Skip)
        if isinstance(a, Skip):
            assert a.reason == b.reason == skips.CORRUPT_IMAGE
        else:
            assert a["pixel_values"].shape == b["pixel_values"].shape and a["captions"] == b["captions"]


def test_the_shrunk_image_is_close_to_the_original_and_4_4_4_chroma_closer(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    original = photo(640, 480, seed=4)
    (source / "photo.jpg").write_bytes(jpeg_bytes(original))
    reference = resize_uint8(decoded(source / "photo.jpg"), (224, 224)).float()
    errors = {}
    for chroma_444 in (False, True):
        target = tmp_path / f"shrunk_{chroma_444}"
        shrink_tree(source, target, ShrinkSettings(short_side=317, chroma_444=chroma_444), workers=0)
        with Image.open(target / "photo.jpg") as written:
            assert written.size == (423, 317)
            assert JpegImagePlugin.get_sampling(written) == (0 if chroma_444 else 2)
        errors[chroma_444] = (resize_uint8(decoded(target / "photo.jpg"), (224, 224)).float() - reference).abs().mean()
    # What the encoder sees at 224 px moves by under a grey level on this smooth image (0.44 and 0.61 here; 0.9 and
    # 3.3 on the bench's noisier JPEGs, BENCHMARKS.md).
    assert errors[True] < errors[False] < 1.0


def test_a_second_run_keeps_what_is_there_and_redoes_what_changed(dataset_folder, tmp_path):
    target = tmp_path / "shrunk"
    shrink_tree(dataset_folder, target, ShrinkSettings(short_side=100), workers=0)
    again = shrink_tree(dataset_folder, target, ShrinkSettings(short_side=100), workers=0)
    assert again.outcomes == {ALREADY_THERE: 7}

    newer = dataset_folder / "images" / "large.jpg"
    newer.write_bytes(jpeg_bytes(photo(300, 400, seed=5)))
    later = (target / "images" / "large.jpg").stat().st_mtime + 10
    os.utime(newer, (later, later))
    third = shrink_tree(dataset_folder, target, ShrinkSettings(short_side=100), workers=2)
    assert third.outcomes == {ALREADY_THERE: 6, SHRUNK: 1}
    assert decoded(target / "images" / "large.jpg").shape == (3, 133, 100)
    assert not [p for p in target.rglob("*") if p.name.endswith(".tmp")]


def _add(shard: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    shard.addfile(info, io.BytesIO(data))


def test_webdataset_shards_are_rewritten_member_by_member(tmp_path):
    source = tmp_path / "shards"
    source.mkdir()
    with tarfile.open(source / "000000.tar", "w") as shard:
        _add(shard, "a.jpg", jpeg_bytes(photo(400, 300)))
        _add(shard, "a.txt", b"a large photo")
        _add(shard, "b.png", (lambda out: (photo(50, 40).save(out, "PNG"), out.getvalue())[1])(io.BytesIO()))
        _add(shard, "b.json", json.dumps({"caption": "a small photo"}).encode())
    (source / "000001.tar").write_bytes(b"not a tar at all" * 40)

    target = tmp_path / "shrunk"
    report = shrink_tree(source, target, ShrinkSettings(short_side=100), workers=0)

    assert report.outcomes == {SHRUNK: 1, SMALL_ENOUGH: 1, OTHER_FILE: 2, skips.UNREADABLE_SHARD: 1}
    assert (target / "000001.tar").read_bytes() == (source / "000001.tar").read_bytes()
    with tarfile.open(source / "000000.tar") as before, tarfile.open(target / "000000.tar") as after:
        assert before.getnames() == after.getnames()
        for name in ("a.txt", "b.png", "b.json"):
            assert after.extractfile(name).read() == before.extractfile(name).read()
        assert decoded(after.extractfile("a.jpg").read()).shape == (3, 100, 133)
    # The loader's webdataset reader takes the rewritten shard.
    shards = open_source(DataConfig(format="webdataset", train_path=str(target / "000000.tar")), "train")
    records = list(shards.iter_shard(0, 0))
    assert [r.captions for r in records] == [("a large photo",), ("a small photo",)]


def test_the_command_takes_the_short_side_from_a_run_config(dataset_folder, tmp_path, capsys):
    cfg = load_config(None, ["--data.crop_scale_min", "0.25", "--model.vision.image_size", "56"])
    assert shrink_target(cfg) == decode_target_size(56, True, 0.25) == 112
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  crop_scale_min: 0.25\nmodel:\n  vision:\n    image_size: 56\n")
    target = tmp_path / "shrunk"
    assert main([str(dataset_folder), str(target), "--config", str(config), "--workers", "0"]) == 0
    assert "short side of 112 px" in capsys.readouterr().out
    assert decoded(target / "images" / "large.jpg").shape == (3, 112, 149)


@pytest.mark.parametrize("arguments, message", [
    (["{missing}", "{tmp}/out", "--short_side", "100"], "not a folder"),
    (["{source}", "{source}/inside", "--short_side", "100"], "must not be inside the source folder"),
    (["{source}", "{tmp}/out", "--short_side", "100", "--quality", "0"], "quality must be in [1, 100]"),
    (["{source}", "{tmp}/out", "--config", "{tmp}/none.yaml"], "config file not found"),
    (["{source}", "{tmp}/out", "--short_side", "100", "--data.crop_scale_min", "1"], "need --config"),
])
def test_the_command_names_what_is_wrong(dataset_folder, tmp_path, capsys, arguments, message):
    values = {"missing": tmp_path / "missing", "tmp": tmp_path, "source": dataset_folder}
    assert main([a.format(**values) for a in arguments]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "out").exists()
