"""Previews of a partial grid (`nar_diffusers.utils.preview`): cells not generated yet are gray, the last preview is
the output, and the callback never changes what is generated."""

import numpy as np
import pytest
import torch

from conftest import make_pipeline, make_video_pipeline
from nar_diffusers.utils.preview import NEUTRAL_GRAY, TokenPreview, decode_partial_tokens, preview_images


def test_unknown_cells_are_gray_and_known_cells_decode_as_in_the_full_grid():
    pipe = make_pipeline()
    grid = torch.randint(0, 48, (1, 4, 4))
    partial = grid.clone()
    partial[0, 2:, :] = -1  # the bottom two token rows (pixels 4-7) unknown
    pixels = decode_partial_tokens(pipe, partial)
    assert pixels.shape == (1, 3, 8, 8)
    assert (pixels[:, :, 4:] == NEUTRAL_GRAY).all()
    assert not torch.allclose(pixels[:, :, :4], torch.full_like(pixels[:, :, :4], NEUTRAL_GRAY))
    assert torch.equal(decode_partial_tokens(pipe, grid), ((pipe.decode_tokens(grid) + 1) / 2).clamp(0, 1))
    empty = decode_partial_tokens(pipe, torch.full((2, 4, 4), -1))  # nothing known: no decoding, all gray
    assert empty.shape == (2, 3, 8, 8) and (empty == NEUTRAL_GRAY).all()


def test_token_preview_follows_every_step_and_ends_on_the_output():
    pipe = make_pipeline()
    seen = []
    preview = TokenPreview(on_preview=lambda step, images: seen.append((step, images)))
    kwargs = dict(class_labels=[1, 7], guidance_scale=2.0, output_type="np")
    out = pipe(generator=torch.Generator().manual_seed(0), callback_on_step_end=preview, **kwargs).images
    plain = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_array_equal(out, plain)  # the preview changes nothing
    assert [step for step, _ in seen] == list(range(len(pipe.scheduler))) == list(range(7))
    first = np.asarray(seen[0][1][0], dtype=np.float32) / 255
    assert first.shape == (8, 8, 3)
    assert np.allclose(first[2:], NEUTRAL_GRAY, atol=1 / 255) and np.allclose(first[:, 2:], NEUTRAL_GRAY, atol=1 / 255)
    last = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in preview.images])
    np.testing.assert_allclose(last, out, atol=1 / 255)
    assert preview.step == 6


def test_every_and_max_images():
    pipe = make_pipeline()
    preview = TokenPreview(every=3, max_images=1)
    steps = []
    preview.on_preview = lambda step, images: steps.append((step, len(images)))
    pipe(class_labels=[1, 7], callback_on_step_end=preview)
    assert steps == [(0, 1), (3, 1), (6, 1)]  # every third step and the last
    with pytest.raises(ValueError, match="`every`"):
        TokenPreview(every=0)


def test_video_previews_are_frame_lists():
    pipe = make_video_pipeline()
    preview = TokenPreview()
    pipe(class_labels=[1], callback_on_step_end=preview, num_frames=2)
    assert len(preview.images) == 1 and len(preview.images[0]) == 2 and preview.images[0][0].size == (8, 8)
    partial = torch.full((1, 2, 4, 4), -1)
    partial[0, 0] = 3  # the first frame known
    frames = preview_images(pipe, partial)[0]
    assert np.allclose(np.asarray(frames[1], dtype=np.float32) / 255, NEUTRAL_GRAY, atol=1 / 255)
