import numpy as np
import pytest
import torch

from nar_diffusers.training.batches import TokenBatchCollator


def test_collate_left_pads_stored_caption_embeddings():
    embeds = [torch.randn(2, 5), torch.randn(4, 5)]
    examples = [{"input_ids": torch.zeros(4, 4, dtype=torch.long), "caption_embeds": e} for e in embeds]
    batch = TokenBatchCollator(num_condition_tokens=6)(examples)
    assert batch["input_ids"].shape == (2, 4, 4)
    states, mask = batch["encoder_hidden_states"], batch["encoder_attention_mask"]
    assert states.shape == (2, 6, 5) and mask.tolist() == [[False] * 4 + [True] * 2, [False] * 2 + [True] * 4]
    torch.testing.assert_close(states[0, 4:], embeds[0])
    torch.testing.assert_close(states[1, 2:], embeds[1])
    assert states[0, :4].abs().sum() == 0
    with pytest.raises(ValueError, match="more than the model's 3 condition slots"):
        TokenBatchCollator(num_condition_tokens=3)(examples)


def test_image_examples_augment_from_their_index_and_epoch_not_the_global_rng():
    from datasets import Dataset
    from PIL import Image

    from nar_diffusers.training.batches import ImageExamples
    from nar_diffusers.training.image_transforms import ImageTransform

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)) for _ in range(2)]
    dataset = Dataset.from_dict({"image": images, "label": [0, 1]})
    examples = ImageExamples(dataset, ImageTransform(8, center_crop=False, random_flip=True), "image", "label", seed=3)
    torch.manual_seed(0)
    first = examples[1]["pixel_values"]
    torch.manual_seed(1)
    assert torch.equal(examples[1]["pixel_values"], first) and examples[1]["class_labels"] == 1
    views = set()
    for epoch in range(8):
        examples.set_epoch(epoch)
        views.add(examples[1]["pixel_values"].numpy().tobytes())
    assert len(views) > 1  # a new crop / flip each epoch


@pytest.fixture
def folder_with_a_corrupt_image(tmp_path):
    """An imagefolder of three PNGs; the middle one (1.png) is cut off half-way."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    data = (tmp_path / "1.png").read_bytes()
    (tmp_path / "1.png").write_bytes(data[: len(data) // 2])
    return tmp_path


def _image_examples(folder, cache_dir, **kwargs):
    from datasets import Image as ImageFeature

    from nar_diffusers.training.batches import ImageExamples
    from nar_diffusers.training.image_data import load_image_dataset
    from nar_diffusers.training.image_transforms import ImageTransform

    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(cache_dir))
    paths = dataset.cast_column("image", ImageFeature(decode=False))["image"]
    assert [p["path"].rsplit("/", 1)[-1] for p in paths] == ["0.png", "1.png", "2.png"]
    return ImageExamples(dataset, ImageTransform(8), "image", **kwargs)


def test_unreadable_image_error_names_the_file_and_the_flag(folder_with_a_corrupt_image, cache_dir):
    examples = _image_examples(folder_with_a_corrupt_image, cache_dir)
    assert examples[0]["pixel_values"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"Cannot read the image of row 1 \(.*1\.png\).*--skip_corrupt_images"):
        examples[1]


def test_skip_corrupt_images_trains_on_the_next_readable_image(folder_with_a_corrupt_image, cache_dir, caplog):
    examples = _image_examples(folder_with_a_corrupt_image, cache_dir, skip_corrupt_images=True)
    assert torch.equal(examples[1]["pixel_values"], examples[2]["pixel_values"])
    assert "1.png" in caplog.text and "--skip_corrupt_images" in caplog.text
    assert len([r for r in caplog.records if "1.png" in r.getMessage()]) == 1  # logged once, then remembered
    examples[1]
    assert len([r for r in caplog.records if "1.png" in r.getMessage()]) == 1
