"""tools/make_dense_data.py: valid COCO and ADE20K-format sets whose labels match the pixels,
the same files for the same seed, and clear errors for bad arguments."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tool_helpers import load_tool

tool = load_tool("make_dense_data")
SIZE = ("97", "61")  # odd and non-square


def _generate(fmt: str, out: Path, *extra: str) -> None:
    tool.main([fmt, str(out), "--train", "3", "--val", "2", "--size", *SIZE, *extra])


def _own_colour_fraction(image: np.ndarray, mask: np.ndarray, label: int) -> float:
    """Fraction of the masked pixels whose colour is nearer to class ``label``'s hue than to any other."""
    pixels = image[mask].astype(np.int32)
    distances = ((pixels[:, None, :] - tool.CLASS_COLOURS[None].astype(np.int32)) ** 2).sum(-1)
    return float((distances.argmin(1) == label).mean())


def test_coco_set_is_valid_and_matches_the_pixels(tmp_path, capsys):
    from pycocotools.coco import COCO

    _generate("coco", tmp_path)
    assert "circle, square, triangle, bar" in capsys.readouterr().out
    for split, count in (("train", 3), ("val", 2)):
        coco = COCO(str(tmp_path / "annotations" / f"instances_{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(tool.CLASSES)
        assert len(coco.getImgIds()) == count
        for image_id in coco.getImgIds():
            info = coco.loadImgs(image_id)[0]
            image = np.asarray(Image.open(tmp_path / "images" / split / info["file_name"]).convert("RGB"))
            assert image.shape == (int(SIZE[1]), int(SIZE[0]), 3) == (info["height"], info["width"], 3)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert anns, "every image holds at least one shape"
            covered = np.zeros(image.shape[:2], dtype=int)
            for ann in anns:
                mask = coco.annToMask(ann).astype(bool)
                covered += mask
                assert mask.sum() == ann["area"] > 0
                ys, xs = np.nonzero(mask)
                x, y, w, h = ann["bbox"]
                assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())  # tight box
                assert _own_colour_fraction(image, mask, ann["category_id"] - 1) > 0.9
            assert covered.max() == 1, "visible masks of one image must not overlap"


def test_ade_set_has_valid_labels_aligned_with_the_images(tmp_path, capsys):
    _generate("ade", tmp_path)
    assert "background, circle, square, triangle, bar" in capsys.readouterr().out
    for split, count in (("training", 3), ("validation", 2)):
        images = sorted((tmp_path / "images" / split).glob("*.jpg"))
        labels = sorted((tmp_path / "annotations" / split).glob("*.png"))
        assert [p.stem for p in images] == [p.stem for p in labels] and len(images) == count
        for image_path, label_path in zip(images, labels):
            image = np.asarray(Image.open(image_path).convert("RGB"))
            label = np.asarray(Image.open(label_path))
            assert label.shape == image.shape[:2] == (int(SIZE[1]), int(SIZE[0]))
            values = set(np.unique(label).tolist())
            assert 1 in values and values <= set(range(1, len(tool.CLASSES) + 2)), values
            assert len(values) > 1, "every image holds at least one shape"
            for value in values - {1}:
                assert _own_colour_fraction(image, label == value, value - 2) > 0.9


@pytest.mark.parametrize("fmt", ["coco", "ade"])
def test_same_seed_same_files_other_seed_other_files(tmp_path, fmt):
    def files(out: Path) -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        _generate(fmt, tmp_path / name, "--seed", seed)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    other = files(tmp_path / "c")
    assert other.keys() == files(tmp_path / "a").keys() and other != files(tmp_path / "a")


def test_default_sizes_per_format(tmp_path):
    tool.main(["ade", str(tmp_path), "--train", "1", "--val", "1"])
    assert Image.open(tmp_path / "images" / "training" / "000000.jpg").size == (512, 512)
    assert tool._parser().parse_args(["coco", "x"]).size is None  # coco's 1333x800 is chosen in main


@pytest.mark.parametrize("args, message", [
    (["--size", "31", "64"], "at least 32"),
    (["--size", "64", "20"], "at least 32"),
    (["--train", "0"], "--train 0: need at least 1"),
    (["--val", "-1"], "--val -1: need at least 1"),
])
def test_bad_arguments_are_named(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        tool.main(["coco", str(tmp_path / "out"), *args])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_needs_force(tmp_path, capsys):
    _generate("coco", tmp_path)
    (tmp_path / "notes.txt").write_text("kept")
    stale = tmp_path / "images" / "train" / "stale.jpg"
    stale.write_bytes(b"x")
    with pytest.raises(SystemExit):
        _generate("coco", tmp_path)
    assert "--force" in capsys.readouterr().err
    _generate("coco", tmp_path, "--force")
    assert not stale.exists() and (tmp_path / "notes.txt").read_text() == "kept"
    assert len(json.loads((tmp_path / "annotations" / "instances_val.json").read_text())["images"]) == 2
