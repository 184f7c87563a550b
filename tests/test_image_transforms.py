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
