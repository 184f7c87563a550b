# Copyright 2025 The nar-diffusers authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Tokenizer-side training: image transforms, VQ tokens, code shards (extract_codes.py) and VQ training."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import VQModel
from PIL import Image

from nar_diffusers.training.data import (
    ImageTransform,
    augment_views,
    decode_tokens,
    encode_to_tokens,
    load_code_dataset,
    load_image_dataset,
    pil_to_tensor,
    ten_crop_augment,
)
from nar_diffusers.training.vq_training import build_vqmodel, reconstruction_mse, train_vqmodel


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
def image_dir(tmp_path_factory) -> Path:
    """An imagefolder of small non-square RGB PNGs, one sub-folder per class."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("circle", "square"):
        (root / label).mkdir()
        for i in range(NUM_IMAGES // 2):
            image = rng.integers(0, 256, size=(18, 22, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised VQModel (16 px -> 8x8 tokens, 32 codes)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vq")
    build_vqmodel((8, 16), 1, 8, 4, 32, 4, 3, RESOLUTION, mid_block_add_attention=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_cache")


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


# ---------------------------------------------------------------------------------------------------------------
# transforms and tokens
# ---------------------------------------------------------------------------------------------------------------


def test_image_transform_outputs_square_tensor_in_range():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    transforms = [
        ImageTransform(16),
        ImageTransform(16, center_crop=False, random_flip=True),
        ImageTransform(16, num_channels=1),
    ]
    for transform in transforms:
        pixels = transform(image)
        assert pixels.shape == (transform.num_channels, 16, 16)
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    with pytest.raises(ValueError, match="num_channels"):
        ImageTransform(16, num_channels=2)


def test_ten_crop_is_five_crops_and_their_mirrors():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    views = ten_crop_augment(image, 16, crop_scale=1.25)  # 20 px -> corners differ from the center
    assert len(views) == 10 and all(v.size == (16, 16) for v in views)
    for crop, mirrored in zip(views[:5], views[5:], strict=True):
        assert torch.equal(pil_to_tensor(crop).flip(-1), pil_to_tensor(mirrored))
    assert not torch.equal(pil_to_tensor(views[0]), pil_to_tensor(views[3]))
    assert [len(augment_views(image, 16, aug)) for aug in ("none", "flip", "ten_crop")] == [1, 2, 10]
    with pytest.raises(ValueError, match="aug"):
        augment_views(image, 16, "rotate")


def test_encode_to_tokens_grid_shape_and_round_trip(vq_dir):
    vqvae = VQModel.from_pretrained(vq_dir)
    pixels = torch.rand(3, 3, RESOLUTION, RESOLUTION * 2) * 2 - 1
    tokens = encode_to_tokens(vqvae, pixels)
    assert tokens.shape == (3, RESOLUTION // 2, RESOLUTION) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < vqvae.config.num_vq_embeddings
    # Token ids decode to the same images as the model's own quantize -> decode path.
    expected = vqvae(pixels).sample
    torch.testing.assert_close(decode_tokens(vqvae, tokens), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of the VQ downsample factor 2"):
        encode_to_tokens(vqvae, torch.zeros(1, 3, 15, 16))


# ---------------------------------------------------------------------------------------------------------------
# extract_codes.py and load_code_dataset
# ---------------------------------------------------------------------------------------------------------------


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
    expected = encode_to_tokens(vqvae, pixels)
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


def test_changed_settings_need_overwrite(codes_dir, image_dir, vq_dir, cache_dir, tmp_path):
    output_dir = _copy(codes_dir, tmp_path / "codes")
    with pytest.raises(ValueError, match="different settings.*--overwrite"):
        _extract(image_dir, vq_dir, cache_dir, output_dir, "--aug", "flip")
    _extract(image_dir, vq_dir, cache_dir, output_dir, "--aug", "flip", "--overwrite")
    assert len(load_code_dataset(str(output_dir), progress=False)) == 2 * NUM_IMAGES


# ---------------------------------------------------------------------------------------------------------------
# VQ training
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    """`train_vqmodel` creates a default Accelerator; reset accelerate's process-wide state for later tests."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_reconstruction_loss_decreases_on_fixed_data(fresh_accelerate_state):
    torch.manual_seed(0)
    rows = torch.linspace(-1, 1, 16)
    images = torch.stack(
        [
            (rows[:, None] * a + rows[None, :] * b).clamp(-1, 1)
            for a, b in [(1, 0), (0, 1), (1, 1), (-1, 0.5), (0.5, -1), (-1, -1), (0.3, 0.8), (-0.7, 0.2)]
        ]
    )
    images = images[:, None].expand(-1, 3, -1, -1).contiguous()
    vqvae = build_vqmodel((8, 16), 1, 8, 4, 32, 4, 3, 16, mid_block_add_attention=False)
    before = reconstruction_mse(vqvae, images)
    output = train_vqmodel(vqvae, images, steps=60, learning_rate=3e-3, batch_size=8, progress=False)
    assert output.global_step == 60 and len(output.reconstruction_losses) == 60
    assert np.mean(output.reconstruction_losses[-5:]) < 0.5 * np.mean(output.reconstruction_losses[:5])
    assert reconstruction_mse(vqvae, images) < 0.5 * before
    # The quantizer's loss weighting is restored after training.
    assert vqvae.quantize.legacy is True and vqvae.quantize.beta == 0.25


def test_train_vq_script_checkpoints_saves_and_resumes(image_dir, cache_dir, tmp_path):
    output_dir = tmp_path / "vq-out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    command = [
        sys.executable, str(REPO_ROOT / "training" / "train_vq.py"),
        "--train_data_dir", str(image_dir), "--cache_dir", str(cache_dir),
        "--resolution", "16", "--block_out_channels", "8", "16", "--layers_per_block", "1",
        "--latent_channels", "8", "--vq_embed_dim", "4", "--num_vq_embeddings", "32", "--norm_num_groups", "4",
        "--train_batch_size", "3", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0",
        "--checkpointing_steps", "2", "--num_validation_images", "4", "--output_dir", str(output_dir),
    ]  # fmt: skip

    def run(*extra: str) -> dict:
        result = subprocess.run(command + list(extra), env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((output_dir / "train_summary.json").read_text())

    summary = run("--max_train_steps", "4")
    assert summary == {**summary, "global_step": 4, "start_step": 0}
    assert (output_dir / "checkpoint-2").is_dir() and (output_dir / "checkpoint-4").is_dir()
    assert (output_dir / "reconstructions.png").is_file()
    vqvae = VQModel.from_pretrained(output_dir)
    assert vqvae.config.lookup_from_codebook and vqvae.config.num_vq_embeddings == 32
    assert encode_to_tokens(vqvae, torch.zeros(1, 3, 16, 16)).shape == (1, 8, 8)

    summary = run("--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert summary["start_step"] == 4 and summary["global_step"] == 6
    assert (output_dir / "checkpoint-6").is_dir()
