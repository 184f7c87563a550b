"""training/extract_codes.py writes code shards; `load_code_dataset` reads them back (nar_diffusers.training.code_shards)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from diffusers import VQModel
from PIL import Image

from nar_diffusers.models.vq_codec import encode_images_to_tokens
from nar_diffusers.training.code_shards import load_code_dataset
from nar_diffusers.training.image_data import load_image_dataset
from nar_diffusers.training.image_transforms import augment_views
from nar_diffusers.training.vq_training import build_vqmodel
from nar_diffusers.utils.image_utils import pil_to_tensor


REPO_ROOT = Path(__file__).resolve().parents[1]


RESOLUTION = 16


NUM_IMAGES = 6  # 2 classes x 3 images


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"nar_training_{name}", REPO_ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


extract_codes = _load_script("extract_codes")


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised VQModel (16 px -> 8x8 tokens, 32 codes)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vq")
    build_vqmodel((8, 16), 1, 8, 4, 32, 4, 3, RESOLUTION, mid_block_add_attention=False).save_pretrained(path)
    return path


def _extract(image_dir, vq_dir, cache_dir, output_dir, *extra: str) -> dict:
    args = extract_codes.parse_args(
        [
            "--vq_model_path", str(vq_dir),
            "--train_data_dir", str(image_dir),
            "--cache_dir", str(cache_dir),
            "--resolution", str(RESOLUTION),
            "--images_per_shard", "4",
            "--batch_size", "3",
            "--device", "cpu",
            "--output_dir", str(output_dir),
            *extra,
        ]
    )  # fmt: skip
    return extract_codes.main(args)


@pytest.fixture(scope="module")
def codes_dir(image_dir, vq_dir, cache_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("codes")
    _extract(image_dir, vq_dir, cache_dir, output_dir)
    return output_dir


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def test_extracted_codes_match_direct_encoding(codes_dir, image_dir, vq_dir, cache_dir):
    metadata = json.loads((codes_dir / "metadata.json").read_text())
    assert metadata["num_shards"] == 2 and metadata["complete"]
    assert metadata["grid"] == [8, 8] and metadata["vocab_size"] == 32
    assert metadata["columns"] == ["codes", "height", "width", "label"]
    assert metadata["label_names"] == ["circle", "square"]
    assert sorted(p.name for p in codes_dir.glob("*.parquet")) == ["codes-00000.parquet", "codes-00001.parquet"]

    dataset = load_code_dataset(str(codes_dir), progress=False)
    assert len(dataset) == NUM_IMAGES
    codes, label = dataset[0]
    assert codes.shape == (8, 8) and codes.dtype == torch.long and isinstance(label, int)

    images = load_image_dataset(train_data_dir=str(image_dir), cache_dir=str(cache_dir))
    assert dataset.labels.tolist() == images["label"]
    vqvae = VQModel.from_pretrained(vq_dir)
    pixels = torch.stack([pil_to_tensor(augment_views(row["image"], RESOLUTION)[0]) for row in images])
    expected = encode_images_to_tokens(vqvae, pixels)
    assert torch.equal(torch.stack([dataset[i][0] for i in range(len(dataset))]), expected)


def test_rerun_skips_valid_shards_and_rewrites_missing_ones(codes_dir, image_dir, vq_dir, cache_dir, tmp_path):
    output_dir = _copy(codes_dir, tmp_path / "codes")
    first, second = output_dir / "codes-00000.parquet", output_dir / "codes-00001.parquet"
    stamp = first.stat().st_mtime_ns
    second.unlink()
    _extract(image_dir, vq_dir, cache_dir, output_dir)
    assert first.stat().st_mtime_ns == stamp  # kept
    assert second.is_file()  # rewritten
    assert len(load_code_dataset(str(output_dir), progress=False)) == NUM_IMAGES


def test_missing_shard_raises_naming_the_file(codes_dir, tmp_path):
    output_dir = _copy(codes_dir, tmp_path / "codes")
    (output_dir / "codes-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"codes-00001\.parquet is missing.*2 shards"):
        load_code_dataset(str(output_dir), progress=False)


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes"])
def test_corrupted_shard_raises_naming_the_file(codes_dir, image_dir, vq_dir, cache_dir, tmp_path, damage):
    output_dir = _copy(codes_dir, tmp_path / "codes")
    shard = output_dir / "codes-00000.parquet"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # damage the data pages, keep the footer: caught by the page checksums
        start = len(data) // 4
        data[start : start + 32] = bytes(b ^ 0xFF for b in data[start : start + 32])
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"codes-00000\.parquet is corrupted or unreadable"):
        load_code_dataset(str(output_dir), progress=False)
    # A rerun detects the damaged shard and rewrites it.
    _extract(image_dir, vq_dir, cache_dir, output_dir)
    assert len(load_code_dataset(str(output_dir), progress=False)) == NUM_IMAGES


@pytest.mark.parametrize("aug, views", [("flip", 2), ("ten_crop", 10)])
def test_augmentation_multiplies_samples(codes_dir, image_dir, vq_dir, cache_dir, tmp_path, aug, views):
    metadata = _extract(image_dir, vq_dir, cache_dir, tmp_path / aug, "--aug", aug)
    assert metadata["num_samples"] == NUM_IMAGES * views
    dataset = load_code_dataset(str(tmp_path / aug), progress=False)
    base = load_code_dataset(str(codes_dir), progress=False)
    assert len(dataset) == NUM_IMAGES * views
    assert dataset.labels.tolist() == [label for label in base.labels.tolist() for _ in range(views)]
    if aug == "flip":  # the first view of each image is the plain center crop
        assert all(torch.equal(dataset[i * views][0], base[i][0]) for i in range(NUM_IMAGES))


def test_captions_and_clear_column_errors(image_dir, vq_dir, cache_dir, tmp_path):
    with pytest.raises(ValueError, match="`--label_column` value 'class'.*--caption_column"):
        _extract(image_dir, vq_dir, cache_dir, tmp_path / "a", "--label_column", "class")
    with pytest.raises(ValueError, match="`--image_column` value 'img'"):
        _extract(image_dir, vq_dir, cache_dir, tmp_path / "b", "--image_column", "img")

    caption_dir = tmp_path / "captioned"
    caption_dir.mkdir()
    with open(caption_dir / "metadata.jsonl", "w") as f:
        for i in range(2):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(caption_dir / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a red square {i}"}) + "\n")
    _extract(caption_dir, vq_dir, cache_dir, tmp_path / "c", "--caption_column", "text")
    dataset = load_code_dataset(str(tmp_path / "c"), progress=False)
    assert dataset.condition_column == "caption" and dataset.labels is None
    assert sorted(dataset[i][1] for i in range(2)) == ["a red square 0", "a red square 1"]


def test_an_unreadable_image_and_string_labels_are_named(vq_dir, cache_dir, tmp_path):
    folder = tmp_path / "images"
    for kind in ("cats", "dogs"):
        (folder / kind).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(folder / kind / "good.png")
    (folder / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"Cannot read the image of row \d \(.*broken\.png\)"):
        _extract(folder, vq_dir, cache_dir, tmp_path / "a")
    (folder / "cats" / "broken.png").unlink()
    named = tmp_path / "named"
    named.mkdir()
    with open(named / "metadata.jsonl", "w") as f:
        for i, kind in enumerate(["cat", "dog"]):
            Image.new("RGB", (16, 16), (90 * i, 0, 0)).save(named / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "kind": kind}) + "\n")
    with pytest.raises(ValueError, match="`--label_column` 'kind' holds string values.*--caption_column kind"):
        _extract(named, vq_dir, cache_dir, tmp_path / "b", "--label_column", "kind")


def test_changed_settings_need_overwrite(codes_dir, image_dir, vq_dir, cache_dir, tmp_path):
    output_dir = _copy(codes_dir, tmp_path / "codes")
    with pytest.raises(ValueError, match="different settings.*--overwrite"):
        _extract(image_dir, vq_dir, cache_dir, output_dir, "--aug", "flip")
    _extract(image_dir, vq_dir, cache_dir, output_dir, "--aug", "flip", "--overwrite")
    assert len(load_code_dataset(str(output_dir), progress=False)) == 2 * NUM_IMAGES


def test_two_processes_extract_disjoint_shards_equal_to_one_process(image_dir, vq_dir, cache_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes: process i encodes shards i, i + 2, ...; the shards and the one
    metadata.json are byte-for-byte those of a single-process extraction."""
    from distributed_launch import accelerate_launch

    single, double = tmp_path / "single", tmp_path / "double"
    flags = ["--images_per_shard", "2", "--batch_size", "1"]  # 3 shards: process 0 takes 0 and 2, process 1 takes 1
    _extract(image_dir, vq_dir, cache_dir, single, *flags)
    result = accelerate_launch(
        [str(REPO_ROOT / "training" / "extract_codes.py"), "--vq_model_path", str(vq_dir), "--train_data_dir",
         str(image_dir), "--cache_dir", str(cache_dir), "--resolution", str(RESOLUTION), "--device", "cpu",
         "--output_dir", str(double), *flags]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Process 0 of 2: shards [0, 2]" in result.stderr and "Process 1 of 2: shards [1]" in result.stderr
    assert result.stdout.count("Wrote 6 token grids") == 1  # the summary comes from the main process only
    files = sorted(p.name for p in single.iterdir())
    assert files == sorted(p.name for p in double.iterdir()) == [*(f"codes-0000{i}.parquet" for i in range(3)), "metadata.json"]
    assert all((single / name).read_bytes() == (double / name).read_bytes() for name in files)
    assert json.loads((double / "metadata.json").read_text())["complete"]
