import numpy as np
import pytest
import torch
from PIL import Image

from nar_diffusers.training.image_transforms import ImageTransform, augment_views, ten_crop_augment
from nar_diffusers.utils.image_utils import pil_to_tensor


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


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_grayscale_is_scaled_to_8_bit_not_clipped_to_white(mode):
    values = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16)  # 0, 64, 128, 255 in 8 bits
    if mode == "I;16B":
        image = Image.frombytes(mode, (2, 2), values.astype(">u2").tobytes())
    else:
        image = Image.fromarray(values.astype(np.int32) if mode == "I" else values)
    assert image.mode == mode
    expected = torch.tensor([[0.0, 64.0], [128.0, 255.0]]) / 127.5 - 1
    for channels in (1, 3):
        torch.testing.assert_close(pil_to_tensor(image, channels), expected.expand(channels, 2, 2))
        torch.testing.assert_close(ImageTransform(2, num_channels=channels)(image), expected.expand(channels, 2, 2))
    (view,) = augment_views(image, 2)
    torch.testing.assert_close(pil_to_tensor(view, 1), expected[None])


def test_16_bit_png_file_keeps_its_gray_levels(tmp_path):
    gradient = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 ... 65535
    Image.fromarray(gradient).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode == "I;16"
        pixels = ImageTransform(4, num_channels=1)(image)
    levels = ((pixels + 1) * 127.5).round().flatten()
    torch.testing.assert_close(levels, torch.arange(16, dtype=torch.float32) * 17)  # 4369 / 257 = 17
