"""NARInpaintPipeline: an image's tokens kept outside the mask (white = regenerate), the mask snapped to tokens,
outpainting canvases, saving and loading like the other pipelines."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from conftest import make_pipeline
from nar_diffusers import NARInpaintPipeline, NARPipeline
from nar_diffusers.models.vq_codec import encode_images_to_tokens
from nar_diffusers.pipelines.pipeline_loading import nar_pipeline_class


@pytest.fixture
def pipe() -> NARInpaintPipeline:
    base = make_pipeline()
    pipe = NARInpaintPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def photo(seed=0, size=(8, 8)) -> Image.Image:
    """A random RGB image, `size` = (height, width); the test VQ model maps 2x2 pixels to a token."""
    array = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(array)


def image_tokens(pipe, image: Image.Image) -> torch.LongTensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    return encode_images_to_tokens(pipe.vqvae, pixels)[0]


def bottom_mask(rows_from: int, size=(8, 8)) -> Image.Image:
    mask = np.zeros(size, dtype=np.uint8)
    mask[rows_from:] = 255
    return Image.fromarray(mask)


def test_the_tokens_outside_the_mask_are_the_images_tokens(pipe):
    image = photo()
    out = pipe(image=image, mask_image=bottom_mask(4), class_labels=[1, 7], output_type="latent",
               generator=torch.Generator().manual_seed(0), guidance_scale=2.0).images  # fmt: skip
    tokens = image_tokens(pipe, image)
    assert out.shape == (2, 4, 4)
    assert torch.equal(out[:, :2], tokens[:2].expand(2, -1, -1))  # kept: the top two token rows
    assert not torch.equal(out[0, 2:], out[1, 2:])  # regenerated per label
    images = pipe(image=image, mask_image=bottom_mask(4), class_labels=[1]).images
    assert images[0].size == (8, 8)


def test_a_pixel_mask_regenerates_every_token_that_has_a_white_pixel(pipe):
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[5, 1] = 255  # one pixel in token (2, 0)
    mask[0, 7] = 200  # >= 128: white, token (0, 3)
    mask[3, 3] = 100  # < 128: black
    known, token_mask = pipe.prepare_known_tokens(photo(), Image.fromarray(mask))
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, 2, 0] = expected[0, 0, 3] = True
    assert torch.equal(token_mask, expected) and torch.equal(known < 0, expected)
    # The same mask given at the token grid's size (one value per token), as a bool array.
    known_grid, token_mask_grid = pipe.prepare_known_tokens(photo(), expected[0].numpy())
    assert torch.equal(token_mask_grid, expected) and torch.equal(known_grid, known)


def test_every_token_kept_returns_the_images_tokens_without_running_the_model(pipe):
    image = photo(1)
    pipe.transformer.prefill = pipe.transformer.decode = None  # would fail if called
    out = pipe(image=image, mask_image=Image.new("L", (8, 8), 0), class_labels=[3], output_type="latent").images
    assert torch.equal(out[0], image_tokens(pipe, image))


def test_the_whole_image_masked_is_plain_generation(pipe):
    kwargs = dict(class_labels=[2], output_type="latent", guidance_scale=2.0)
    generated = pipe(image=photo(), mask_image=Image.new("L", (8, 8), 255),
                     generator=torch.Generator().manual_seed(4), **kwargs).images  # fmt: skip
    plain = NARPipeline(**pipe.components)(generator=torch.Generator().manual_seed(4), **kwargs).images
    assert torch.equal(generated, plain)


def test_images_as_arrays_tensors_and_batches(pipe):
    array = np.asarray(photo(), dtype=np.float32) / 255  # (H, W, C) in [0, 1]
    tensor = torch.from_numpy(array).permute(2, 0, 1)  # (C, H, W)
    kwargs = dict(class_labels=[1, 7], output_type="latent", generator=torch.Generator().manual_seed(0))
    from_array = pipe(image=array, mask_image=bottom_mask(4), **kwargs).images
    kwargs["generator"] = torch.Generator().manual_seed(0)
    from_tensor = pipe(image=tensor, mask_image=np.asarray(bottom_mask(4)) > 0, **kwargs).images
    assert torch.equal(from_array, from_tensor)
    two = pipe(image=[photo(0), photo(1)], mask_image=bottom_mask(4), class_labels=[1, 7], output_type="latent").images
    assert torch.equal(two[1, :2], image_tokens(pipe, photo(1))[:2])


def test_outpaint_canvas_places_the_image_and_masks_the_rest(pipe):
    source = photo(size=(4, 6))
    canvas, mask = NARInpaintPipeline.outpaint_canvas(source, canvas_size=(8, 8), position=(2, 0))
    assert canvas.size == mask.size == (8, 8) and canvas.mode == "RGB" and mask.mode == "L"
    assert np.array_equal(np.asarray(canvas)[2:6, :6], np.asarray(source))
    expected = np.full((8, 8), 255, dtype=np.uint8)
    expected[2:6, :6] = 0
    assert np.array_equal(np.asarray(mask), expected)
    # Outpainting right and below a source at the top-left keeps the source's tokens.
    corner = photo(2, size=(4, 4))
    canvas, mask = NARInpaintPipeline.outpaint_canvas(corner, (8, 8))
    out = pipe(image=canvas, mask_image=mask, class_labels=[5], output_type="latent").images
    assert torch.equal(out[0, :2, :2], image_tokens(pipe, canvas)[:2, :2])
    with pytest.raises(ValueError, match="does not fit inside"):
        NARInpaintPipeline.outpaint_canvas(corner, (8, 8), position=(6, 0))
    with pytest.raises(ValueError, match="`canvas_size` must be a pair"):
        NARInpaintPipeline.outpaint_canvas(corner, 8)


BAD = {
    "image-not-a-multiple-of-the-vq-factor": (dict(image=photo(size=(7, 8)), mask_image=bottom_mask(4, (7, 8))),
                                              "`image` is 7x8 pixels.*multiples of the VQ factor 2"),
    "mask-of-another-size": (dict(image=photo(), mask_image=bottom_mask(2, (6, 6))),
                             "`mask_image` is 6x6.*image's size 8x8.*token grid's 4x4"),
    "image-larger-than-the-model": (dict(image=photo(size=(10, 8)), mask_image=bottom_mask(4, (10, 8))),
                                    "larger than the model generates"),
    "no-mask": (dict(image=photo()), "missing: mask_image"),
    "no-image": (dict(mask_image=bottom_mask(4)), "missing: image"),
    "image-and-tokens": (dict(image=photo(), mask_image=bottom_mask(4), tokens=torch.zeros(4, 4, dtype=torch.long)),
                         "not both"),
    "three-images-for-two-labels": (dict(image=[photo(0), photo(1), photo(2)], mask_image=bottom_mask(4)),
                                    "`image` / `mask_image` hold 3"),
    "two-masks-for-three-images": (dict(image=[photo(0), photo(1), photo(2)], mask_image=[bottom_mask(4)] * 2),
                                   "2 masks for 3 images"),
    "mask-floats-outside-0-1": (dict(image=photo(), mask_image=np.full((8, 8), 2.0)), r"floats in \[0, 1\]"),
    "image-of-another-type": (dict(image="photo.png", mask_image=bottom_mask(4)), "`image` must be a PIL image"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_images_and_masks_raise_a_value_error_naming_the_argument(pipe, case):
    kwargs, message = case
    pipe.vqvae.encode = None  # every check comes before the VQ encoder runs
    with pytest.raises(ValueError, match=message):
        pipe(class_labels=[1, 7], **kwargs)


def test_condition_errors_come_before_the_vq_encoder_runs(pipe):
    pipe.vqvae.encode = None
    with pytest.raises(ValueError, match="class_labels"):
        pipe(image=photo(), mask_image=bottom_mask(4), class_labels=[99])
    with pytest.raises(ValueError, match="top_k"):
        pipe(image=photo(), mask_image=bottom_mask(4), class_labels=[1], top_k=-1)


def test_it_saves_loads_and_loads_from_an_image_pipeline_folder(pipe, tmp_path):
    image_pipe = make_pipeline()
    image_pipe.set_sampling_defaults(guidance_scale=2.5)
    image_pipe.save_pretrained(tmp_path / "image")
    loaded = NARInpaintPipeline.from_pretrained(tmp_path / "image")  # a NARPipeline folder
    assert type(loaded) is NARInpaintPipeline and loaded.sampling_defaults["guidance_scale"] == 2.5
    loaded.save_pretrained(tmp_path / "inpaint")
    index = json.loads((tmp_path / "inpaint" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_nar_inpaint", "NARInpaintPipeline"]
    assert (tmp_path / "inpaint" / "pipeline_nar_inpaint.py").exists()
    assert nar_pipeline_class(tmp_path / "inpaint") is NARInpaintPipeline
    plain = DiffusionPipeline.from_pretrained(tmp_path / "inpaint", trust_remote_code=True)
    assert type(plain).__name__ == "NARInpaintPipeline"
    assert type(NARPipeline.from_pretrained(tmp_path / "inpaint")) is NARPipeline
    kwargs = dict(image=photo(), mask_image=bottom_mask(4), class_labels=[1], output_type="latent")
    first = loaded(generator=torch.Generator().manual_seed(0), **kwargs).images
    second = plain(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(first, second)


def test_an_inpainting_folder_samples_as_an_image_pipeline_and_its_card_shows_the_mask(pipe, tmp_path):
    from nar_diffusers.evaluation.bulk_sampling import load_sampling_pipeline

    pipe.save_pretrained(tmp_path / "inpaint")
    assert "mask_image=mask_image" in (tmp_path / "inpaint" / "README.md").read_text()
    sampler = load_sampling_pipeline(str(tmp_path / "inpaint"), torch.device("cpu"), torch.float32)
    assert type(sampler) is NARPipeline  # bulk sampling draws images from scratch, with no image to edit


@pytest.mark.parametrize("image", [np.zeros((0, 0, 3)), np.zeros((1, 0, 8, 3)), torch.zeros(3, 0, 0)],
                         ids=["numpy-0x0", "numpy-batch-0-high", "torch-0x0"])  # fmt: skip
def test_an_empty_image_is_a_value_error_naming_image(pipe, image):
    with pytest.raises(ValueError, match="`image` is empty"):
        pipe(image=image, mask_image=np.ones((8, 8)), class_labels=[1], output_type="latent")
