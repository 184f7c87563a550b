"""Generation from a partial token grid (`tokens=`): known cells are written and fed instead of drawn, on the eager
loop and the static path; video continuation from given first frames."""

import numpy as np
import pytest
import torch

from conftest import make_pipeline, make_video_pipeline
from nar_diffusers import LARPTokenizer, NARVideoPipeline, NeighborScheduler
from test_pipeline_video import UnitRangeTokenizer


def latent(pipe, seed=0, **kwargs):
    kwargs.setdefault("class_labels", [1, 7])
    out = pipe(generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs)
    return out.frames if hasattr(out, "frames") else out.images


def random_partial_grid(shape, vocab_size=48, fraction=0.5, seed=0):
    """Random ids where a random mask is set, -1 elsewhere; and the mask."""
    generator = torch.Generator().manual_seed(seed)
    known = torch.rand(shape, generator=generator) < fraction
    ids = torch.randint(0, vocab_size, shape, generator=generator)
    return torch.where(known, ids, -1), known


def forbid_drawing(pipe):
    """Make every model call and every token draw fail."""

    def fail(*args, **kwargs):
        raise AssertionError("no model call and no draw when every cell is known")

    pipe.transformer.prefill = pipe.transformer.decode = pipe.transformer.decode_static = fail
    pipe.scheduler.step = fail


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_with_every_cell_known_the_output_is_the_grid_and_no_token_is_drawn(video):
    pipe = make_video_pipeline() if video else make_pipeline()
    grid = torch.randint(0, 48, (2, *pipe.transformer.config.grid_size))
    forbid_drawing(pipe)
    steps = []
    out = latent(pipe, tokens=grid, callback_on_step_end=lambda *args: steps.append(args[1]) or {})
    assert torch.equal(out, grid) and pipe.num_timesteps == 0 and steps == []
    pipe.enable_static_decode()
    assert torch.equal(latent(pipe, tokens=grid), grid)
    decoded = pipe(class_labels=[1, 7], tokens=grid, output_type="pt")  # still decoded into pixels
    assert (decoded.frames if video else decoded.images).shape[0] == 2


SHAPES = {
    "one-grid-for-all": lambda grid: grid,
    "one-per-label": lambda grid: (2, *grid),
    "one-per-image": lambda grid: (4, *grid),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("settings", [dict(), dict(guidance_scale=3.0, top_k=5), dict(do_sample=False)],
                         ids=["sampled", "guided-top-k", "greedy"])  # fmt: skip
def test_known_cells_are_never_changed(shape, settings):
    pipe = make_pipeline()
    known, mask = random_partial_grid(shape((4, 4)))
    out = latent(pipe, tokens=known, num_images_per_prompt=2, **settings)
    assert out.shape == (4, 4, 4) and (out >= 0).all()
    expected = known.expand(4, 4, 4) if known.dim() == 2 else known.repeat_interleave(4 // known.shape[0], dim=0)
    assert torch.equal(out[expected >= 0], expected[expected >= 0])


def test_a_top_left_known_region_gives_the_unconstrained_greedy_result_when_it_holds_the_greedy_tokens():
    pipe = make_pipeline()
    free = latent(pipe, do_sample=False, guidance_scale=2.0)
    rows, columns = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    for top_left in (rows + columns <= 2, (rows < 2) & (columns < 3)):  # the first planes; a rectangle
        known = torch.where(top_left, free, -1)
        assert torch.equal(latent(pipe, tokens=known, do_sample=False, guidance_scale=2.0), free)


def test_any_mask_holding_the_sampled_tokens_gives_the_same_sample_with_the_same_seed():
    """The uniforms of every cell are drawn up front, so a known cell holding the token that would have been drawn
    changes nothing, wherever it is."""
    pipe = make_pipeline()
    free = latent(pipe, seed=3, guidance_scale=3.0, top_k=8)
    _, mask = random_partial_grid((2, 4, 4), seed=5)
    assert torch.equal(latent(pipe, seed=3, guidance_scale=3.0, top_k=8, tokens=torch.where(mask, free, -1)), free)


def test_known_tokens_are_what_the_model_reads():
    """Greedy completion of a random partial grid: every generated cell is the argmax of the teacher-forced logits of
    the final grid, which holds the known tokens, so the model was fed the known tokens and not its own draws."""
    pipe = make_pipeline()
    known, mask = random_partial_grid((2, 4, 4), seed=1)
    out = latent(pipe, tokens=known, do_sample=False, guidance_scale=1.0)
    with torch.no_grad():
        argmax = pipe.transformer(out, class_labels=torch.tensor([1, 7])).logits.argmax(-1)
    assert torch.equal(out[~mask], argmax[~mask])
    assert not torch.equal(out[mask], argmax[mask])  # the known (random) tokens are not the model's choice


STATIC_CASES = {
    "image-sampled": (lambda: make_pipeline(), dict(top_k=8)),
    "image-guided-greedy": (lambda: make_pipeline(), dict(guidance_scale=3.0, do_sample=False)),
    "raster": (lambda: make_pipeline(raster=True), dict(guidance_scale=2.0)),
    "video": (lambda: make_video_pipeline(), dict(guidance_scale=2.0)),
}


@pytest.mark.parametrize("case", STATIC_CASES.values(), ids=STATIC_CASES.keys())
def test_the_static_path_gives_the_eager_tokens_with_known_cells(case):
    make, settings = case
    pipe = make()
    known, _ = random_partial_grid((2, *pipe.transformer.config.grid_size), seed=2)
    eager = latent(pipe, tokens=known, **settings)
    pipe.enable_static_decode()
    static = latent(pipe, tokens=known, **settings)
    free = latent(pipe, **settings)  # the same buffers afterwards: nothing known is left behind
    pipe.disable_static_decode()
    assert torch.equal(eager, static) and torch.equal(free, latent(pipe, **settings))
    assert torch.equal(static[known >= 0], known[known >= 0])


def test_a_callback_sees_known_cells_appear_when_their_step_comes():
    pipe = make_pipeline()
    known, mask = random_partial_grid((4, 4), seed=4)
    grids = []
    latent(pipe, class_labels=[1], tokens=known, callback_on_step_end=lambda p, i, t, k: grids.append(k["tokens"]) or {})
    planes = torch.arange(4)[:, None] + torch.arange(4)[None, :]
    for step, grid in enumerate(grids):
        assert torch.equal(grid[0] >= 0, planes <= step)
        assert torch.equal(grid[0][mask & (planes <= step)], known[mask & (planes <= step)])


BAD_TOKENS = {
    "a-list": ([[0] * 4] * 4, "torch.Tensor or NumPy array"),
    "floats": (torch.zeros(4, 4), "integer token ids"),
    "bools": (torch.zeros(4, 4, dtype=torch.bool), "integer token ids"),
    "wrong-batch": (torch.zeros(3, 4, 4, dtype=torch.long), r"shape.*\(4, 4\).*\(2, 4, 4\)"),
    "rank-1": (torch.zeros(16, dtype=torch.long), "shape"),
    "id-too-large": (torch.full((4, 4), 48), r"\[-1, 47\]"),
    "below-minus-one": (torch.full((4, 4), -2), r"\[-1, 47\]"),
    "grid-larger-than-model": (torch.zeros(5, 4, dtype=torch.long), "larger than the model"),
}


@pytest.mark.parametrize("case", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
def test_bad_tokens_raise_a_value_error_naming_the_argument(case):
    tokens, message = case
    with pytest.raises(ValueError, match=message) as error:
        make_pipeline()(class_labels=[1, 7], tokens=tokens)
    assert "`tokens`" in str(error.value)


def test_tokens_set_the_size_and_a_contradicting_height_is_refused():
    pipe = make_pipeline()
    known = np.full((2, 3), -1, dtype=np.int64)  # a NumPy grid smaller than the model's
    known[0, 0] = 5
    out = latent(pipe, class_labels=[2], tokens=known)
    assert out.shape == (1, 2, 3) and out[0, 0, 0] == 5
    assert pipe(class_labels=[2], tokens=known).images[0].size == (6, 4)  # width x height, VQ factor 2
    with pytest.raises(ValueError, match="`height` 8 does not match the grid of `tokens`"):
        pipe(class_labels=[2], tokens=known, height=8)


# --- video continuation ------------------------------------------------------------------------------------------


def test_video_continuation_keeps_the_given_frames():
    pipe = make_video_pipeline(grid_size=(3, 4, 4))
    first = torch.rand(1, 3, 8, 8)  # (F, C, H, W) in [0, 1]: one frame
    tokens = latent(pipe, video=first)
    given = pipe.video_tokenizer.encode_video(first.permute(1, 0, 2, 3)[None] * 2 - 1)
    assert tokens.shape == (2, 3, 4, 4) and torch.equal(tokens[:, :1], given.expand(2, -1, -1, -1))
    frames = pipe(class_labels=[1, 7], video=first, output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    reconstruction = (pipe.video_tokenizer.decode_video(given)[:, :, 0].clamp(-1, 1) + 1) / 2  # (1, C, H, W)
    torch.testing.assert_close(frames[:, 0], reconstruction.expand(2, -1, -1, -1))
    assert not torch.equal(tokens[0, 1:], tokens[1, 1:])  # the later frames are generated per label


def test_video_continuation_takes_pil_frames_numpy_and_one_video_per_label():
    pipe = make_video_pipeline(grid_size=(3, 4, 4))
    clips = np.random.default_rng(0).random((2, 2, 8, 8, 3)).astype(np.float32)  # (B, F, H, W, C)
    tokens = latent(pipe, video=clips)
    given = pipe.video_tokenizer.encode_video(torch.from_numpy(clips).permute(0, 4, 1, 2, 3) * 2 - 1)
    assert torch.equal(tokens[:, :2], given)
    from PIL import Image

    frames = [Image.fromarray((clips[0, i] * 255).astype(np.uint8)) for i in range(2)]
    video = pipe(class_labels=[3], video=frames, output_type="pil", num_frames=3).frames[0]
    assert len(video) == 3 and video[0].size == (8, 8)


def test_video_continuation_frames_must_be_whole_token_steps():
    tokenizer = UnitRangeTokenizer()  # 2 frames per token step
    tokenizer.supports_frame_prefix = True
    pipe = NARVideoPipeline(transformer=make_video_pipeline().transformer, vqvae=tokenizer,
                            scheduler=NeighborScheduler(grid_size=(2, 4, 4)))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="`video` has 3 frames.*whole number of token time steps \\(2 frame"):
        pipe(class_labels=[1], video=torch.rand(3, 3, 8, 8))
    tokens = latent(pipe, class_labels=[1], video=torch.rand(2, 3, 8, 8))
    assert tokens.shape == (1, 2, 4, 4)


def test_a_holistic_tokenizer_cannot_continue_a_video():
    larp = LARPTokenizer(num_frames=4, sample_size=8, temporal_patch_size=2, patch_size=2, hidden_size=16,
                         num_attention_heads=2, num_encoder_layers=1, num_decoder_layers=1, num_latent_tokens=32,
                         codebook_size=48, codebook_dim=4)  # fmt: skip
    pipe = NARVideoPipeline(transformer=make_video_pipeline().transformer, vqvae=larp,
                            scheduler=NeighborScheduler(grid_size=(2, 4, 4)))  # fmt: skip
    with pytest.raises(ValueError, match="holistic.*supports_frame_prefix|supports_frame_prefix.*holistic"):
        pipe(class_labels=[1], video=torch.rand(2, 3, 8, 8))


BAD_VIDEOS = {
    "more-frames-than-generated": (dict(video=torch.rand(3, 3, 8, 8)), "at most `num_frames` 2"),
    "other-size-than-asked": (dict(video=torch.rand(1, 3, 8, 8), height=6), "`height` 6 does not match"),
    "size-not-a-multiple": (dict(video=torch.rand(1, 3, 7, 8)), "multiples of the tokenizer's spatial"),
    "three-videos-for-two-labels": (dict(video=torch.rand(3, 1, 3, 8, 8)), "`video` holds 3 videos"),
    "floats-outside-0-1": (dict(video=torch.rand(1, 3, 8, 8) * 2 - 1), r"floats must be in \[0, 1\]"),
    "video-and-tokens": (dict(video=torch.rand(1, 3, 8, 8), tokens=torch.zeros(2, 4, 4, dtype=torch.long)),
                         "at most one of `video`"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_VIDEOS.values(), ids=BAD_VIDEOS.keys())
def test_bad_video_inputs_raise_a_value_error(case):
    kwargs, message = case
    with pytest.raises(ValueError, match=message):
        make_video_pipeline()(class_labels=[1, 7], **kwargs)


@pytest.mark.parametrize("dtype", [np.uint64, np.uint8, np.int16], ids=["uint64", "uint8", "int16"])
def test_tokens_of_any_numpy_integer_dtype_are_checked_and_used_like_int64(dtype):
    pipe = make_pipeline()
    grid = np.full(tuple(pipe.transformer.config.grid_size), 3, dtype=dtype)
    assert torch.equal(latent(pipe, tokens=grid), torch.full((2, *grid.shape), 3))
    with pytest.raises(ValueError, match="`tokens` ids must be in"):
        latent(pipe, tokens=np.full(grid.shape, 2**40, dtype=np.uint64))


def test_an_empty_tokens_array_is_a_value_error_naming_tokens():
    pipe = make_pipeline()
    with pytest.raises(ValueError, match="`tokens`"):
        latent(pipe, tokens=np.zeros((0, 0), dtype=np.int64))
