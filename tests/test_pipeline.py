import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline

from conftest import make_pipeline, make_transformer, make_vqmodel
from nar_diffusers import NARPipeline, NeighborScheduler, RasterScheduler
from nar_diffusers.pipelines.pipeline_nar import NonFiniteLogitsError


def generate(pipe, seed=0, **kwargs):
    kwargs.setdefault("class_labels", [1, 7])
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_output_types_have_the_documented_shapes_and_dtypes(pipe):
    latent = generate(pipe, output_type="latent")
    assert latent.shape == (2, 4, 4) and latent.dtype == torch.long
    assert ((latent >= 0) & (latent < 48)).all()
    pt = generate(pipe, output_type="pt")
    assert pt.shape == (2, 3, 8, 8) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    arr = generate(pipe, output_type="np")
    assert arr.shape == (2, 8, 8, 3) and arr.dtype == np.float32
    pil = generate(pipe, output_type="pil")
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8)
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_images_are_the_vq_decoding_of_the_generated_tokens(pipe):
    tokens = generate(pipe, output_type="latent")
    images = generate(pipe, output_type="pt")
    decoded = pipe.vqvae.decode(tokens.flatten(), force_not_quantize=True, shape=(2, 4, 4, 4)).sample
    torch.testing.assert_close(images, (decoded / 2 + 0.5).clamp(0, 1))


def test_same_seed_same_images_and_other_seed_other_images(pipe):
    first = generate(pipe, seed=3, output_type="latent")
    assert torch.equal(first, generate(pipe, seed=3, output_type="latent"))
    assert not torch.equal(first, generate(pipe, seed=4, output_type="latent"))


def test_one_generator_per_image_makes_each_image_independent_of_the_batch(pipe):
    pair = pipe(class_labels=[1, 7], generator=[torch.Generator().manual_seed(s) for s in (5, 6)], output_type="latent")
    alone = pipe(class_labels=[7], generator=[torch.Generator().manual_seed(6)], output_type="latent")
    assert torch.equal(pair.images[1], alone.images[0])


def test_one_step_per_plane_and_every_grid_position_generated_exactly_once(pipe):
    grids = []

    def on_step(pipeline, step, timestep, kwargs):
        grids.append(kwargs["tokens"].clone())
        return {}

    tokens = generate(pipe, output_type="latent", callback_on_step_end=on_step)
    assert len(grids) == len(pipe.scheduler) == 7 == pipe.num_timesteps
    filled_before = torch.zeros(2, 4, 4, dtype=torch.bool)
    for step, grid in enumerate(grids):
        filled = grid >= 0
        new = filled & ~filled_before
        assert (filled_before <= filled).all()
        rows, cols = torch.nonzero(new[0], as_tuple=True)
        assert ((rows + cols) == step).all() and len(rows) == min(step + 1, 7 - step)
        filled_before = filled
    assert filled_before.all() and torch.equal(grids[-1], tokens)


def test_each_step_hands_the_callback_its_own_grid_with_minus_one_where_not_generated(pipe):
    kept = []

    def keep(pipeline, step, timestep, kwargs):
        kept.append(kwargs["tokens"])  # no clone: later steps must not write into it
        return {}

    tokens = generate(pipe, output_type="latent", callback_on_step_end=keep)
    not_generated = [int((grid == -1).sum()) for grid in kept]
    assert not_generated == [2 * (16 - n) for n in (1, 3, 6, 10, 13, 15, 16)]
    assert len({grid.data_ptr() for grid in kept}) == len(kept)
    assert torch.equal(kept[-1], tokens)


def test_callback_can_edit_the_tokens_that_are_fed_next(pipe):
    def force_origin(pipeline, step, timestep, kwargs):
        tokens = kwargs["tokens"]
        if step == 0:
            tokens[:, 0, 0] = 11
        return {"tokens": tokens}

    tokens = generate(pipe, output_type="latent", callback_on_step_end=force_origin)
    assert (tokens[:, 0, 0] == 11).all()


def _replace_tokens(make):
    def callback(pipeline, step, timestep, kwargs):
        return {"tokens": make(kwargs["tokens"])} if step == 1 else {}

    return callback


def _set_origin(value):
    def make(tokens):
        tokens = tokens.clone()
        tokens[:, 0, 0] = value
        return tokens

    return make


BAD_CALLBACK_TOKENS = [
    (_replace_tokens(lambda t: t.float()), TypeError, "integer tensor"),
    (_replace_tokens(lambda t: t.tolist()), TypeError, "torch.Tensor"),
    (_replace_tokens(lambda t: t[:1]), ValueError, "shape"),
    (_replace_tokens(_set_origin(48)), ValueError, r"\[-1, 47\]"),
    (_replace_tokens(_set_origin(-2)), ValueError, r"\[-1, 47\]"),
    (_replace_tokens(_set_origin(-1)), ValueError, "generated so far"),
    (lambda pipeline, step, timestep, kwargs: None, TypeError, "must return a dict"),
]


@pytest.mark.parametrize("callback, error, message", BAD_CALLBACK_TOKENS)
def test_tokens_returned_by_a_callback_are_validated(pipe, callback, error, message):
    with pytest.raises(error, match=message) as info:
        generate(pipe, output_type="latent", callback_on_step_end=callback)
    assert "callback_on_step_end" in str(info.value)


def test_callback_may_return_any_integer_dtype_and_fill_cells_not_generated_yet(pipe):
    def edit(pipeline, step, timestep, kwargs):
        tokens = kwargs["tokens"].to(torch.int32)
        if step == 0:
            tokens[:, 3, 3] = 5  # a later step draws this cell: the edit is allowed and overwritten
        return {"tokens": tokens}

    tokens = generate(pipe, output_type="latent", callback_on_step_end=edit)
    assert tokens.dtype == torch.long and ((tokens >= 0) & (tokens < 48)).all()


def _poison_heads(pipe, value=float("nan")):
    with torch.no_grad():
        for head in pipe.transformer.heads:
            head.proj.weight.fill_(value)


@pytest.mark.parametrize("do_sample", [False, True])
def test_nan_weights_raise_a_clear_error_instead_of_a_blank_grid(pipe, do_sample):
    _poison_heads(pipe)
    with pytest.raises(NonFiniteLogitsError, match=r"NaN or inf logits at 7 of 7 steps.*float16.*LoRA.*prompt_embeds"):
        generate(pipe, output_type="latent", do_sample=do_sample)


def test_guided_logits_that_overflow_raise_a_clear_error(pipe):
    with pytest.raises(NonFiniteLogitsError, match="guidance_scale"):
        generate(pipe, output_type="latent", guidance_scale=1e300)


def test_guidance_changes_the_images_and_scale_one_equals_no_guidance(pipe):
    plain = generate(pipe, output_type="latent", guidance_scale=1.0, do_sample=False)
    zero = generate(pipe, output_type="latent", guidance_scale=0.0, do_sample=False)
    guided = generate(pipe, output_type="latent", guidance_scale=8.0, do_sample=False)
    assert torch.equal(plain, zero)
    assert not torch.equal(plain, guided)


def test_guidance_follows_uncond_plus_scale_times_difference():
    pipe = make_pipeline()
    transformer, scheduler = pipe.transformer, pipe.scheduler
    labels = torch.tensor([2])
    with torch.no_grad():
        cache = transformer.init_kv_cache(2, scheduler.coordinates[: scheduler.num_fed_tokens])
        both = scheduler.mix_head_logits(transformer.prefill(cache, class_labels=torch.tensor([2, 10])), 0)
    expected = (both[1] + 3.0 * (both[0] - both[1])).argmax(-1)
    seen = {}

    def capture(pipeline, step, timestep, kwargs):
        seen.setdefault("origin", kwargs["tokens"][0, 0, 0].item())
        return {}

    pipe(class_labels=labels, guidance_scale=3.0, do_sample=False, output_type="latent", callback_on_step_end=capture)
    assert seen["origin"] == expected.item()


def test_cfg_interval_stops_guidance_after_that_many_tokens(pipe):
    never = generate(pipe, output_type="latent", guidance_scale=8.0, cfg_interval=0, do_sample=False)
    guided = generate(pipe, output_type="latent", guidance_scale=8.0, do_sample=False)
    # cfg_interval=0: only the origin step (0 tokens before it) is guided.
    assert torch.equal(never[:, 0, 0], guided[:, 0, 0])
    assert not torch.equal(never, guided)


def test_num_images_per_prompt_repeats_each_class(pipe):
    images = generate(pipe, class_labels=[3, 4], num_images_per_prompt=3, output_type="latent", do_sample=False)
    assert images.shape == (6, 4, 4)
    assert torch.equal(images[0], images[2]) and torch.equal(images[3], images[5])


def test_non_square_images_within_the_model_grid(pipe):
    images = generate(pipe, height=6, width=8, output_type="pt")
    assert images.shape == (2, 3, 6, 8)
    assert generate(pipe, height=8, width=4, output_type="latent").shape == (2, 4, 2)


def test_raster_pipeline_takes_one_step_per_token():
    pipe = make_pipeline(raster=True)
    steps = []
    pipe(class_labels=[0], output_type="latent", callback_on_step_end=lambda p, i, t, k: steps.append(i) or {})
    assert len(steps) == 16 == len(pipe.scheduler)


def test_save_pretrained_then_from_pretrained_gives_the_same_tokens(tmp_path, pipe):
    pipe.save_pretrained(tmp_path)
    for name in ("transformer", "vqvae"):
        assert (tmp_path / name / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "scheduler" / "scheduler_config.json").exists()
    loaded = NARPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, NeighborScheduler) and loaded.text_encoder is None
    assert torch.equal(generate(loaded, seed=9, output_type="latent"), generate(pipe, seed=9, output_type="latent"))


def test_diffusion_pipeline_loads_the_folder_with_the_custom_pipeline_file(tmp_path, pipe):
    import pathlib

    pipe.save_pretrained(tmp_path)
    custom = pathlib.Path(__file__).parents[1] / "pipelines" / "pipeline_nar.py"
    loaded = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=str(custom), trust_remote_code=True)
    assert type(loaded).__name__ == "NARPipeline"
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(generate(loaded, output_type="latent"), generate(pipe, output_type="latent"))


def test_return_dict_false_returns_a_tuple(pipe):
    out = pipe(class_labels=2, output_type="latent", return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 4, 4)


def test_float16_vq_model_gets_its_dtype_back_when_decoding_fails():
    pipe = make_pipeline()
    pipe.vqvae.register_to_config(force_upcast=True)
    pipe.vqvae.to(torch.float16)

    def failing_decode(*args, **kwargs):
        assert pipe.vqvae.dtype == torch.float32
        raise RuntimeError("decoder failure")

    pipe.vqvae.decode = failing_decode
    with pytest.raises(RuntimeError, match="decoder failure"):
        pipe.decode_tokens(torch.randint(0, 48, (1, 4, 4)))
    assert pipe.vqvae.dtype == torch.float16


def test_numpy_numbers_are_accepted_wherever_python_numbers_are(pipe):
    as_python = dict(
        class_labels=[1, 7], num_images_per_prompt=2, top_k=5, top_p=0.9, temperature=0.8, guidance_scale=2.0,
        cfg_interval=3, height=8, width=4,
    )
    as_numpy = dict(
        class_labels=[np.int64(1), np.int32(7)], num_images_per_prompt=np.int64(2), top_k=np.int64(5),
        top_p=np.float32(0.9), temperature=np.float64(0.8), guidance_scale=np.float32(2.0),
        cfg_interval=np.int16(3), height=np.int64(8), width=np.uint8(4),
    )
    expected = generate(pipe, output_type="latent", **as_python)
    assert expected.shape == (4, 4, 2)
    assert torch.equal(generate(pipe, output_type="latent", **as_numpy), expected)
    for labels in (np.array([1, 7]), torch.tensor([1, 7], dtype=torch.int32)):
        assert torch.equal(generate(pipe, output_type="latent", **{**as_python, "class_labels": labels}), expected)
    assert generate(pipe, class_labels=np.int64(3), output_type="latent").shape == (1, 4, 4)


def test_float16_vq_decoding_is_upcast_when_the_config_asks():
    pipe = make_pipeline()
    pipe.vqvae.register_to_config(force_upcast=True)
    pipe.vqvae.to(torch.float16)
    tokens = torch.randint(0, 48, (1, 4, 4))
    images = pipe.decode_tokens(tokens)
    assert images.dtype == torch.float32 and pipe.vqvae.dtype == torch.float16


BAD_INPUTS = [
    (dict(class_labels=[10]), "class_labels"),
    (dict(class_labels=[-1]), "class_labels"),
    (dict(class_labels=[1.5]), "class_labels"),
    (dict(class_labels=None), "class_labels"),
    (dict(height=7), "height"),
    (dict(width=12), "width"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(guidance_scale="4"), "guidance_scale"),
    (dict(class_labels="3"), "class_labels"),
    (dict(class_labels=[1, None]), "class_labels"),
    (dict(class_labels=[]), "class_labels"),
    (dict(class_labels=True), "class_labels"),
    (dict(class_labels=np.array([1.0, 2.0])), "class_labels"),
    (dict(class_labels=torch.tensor([[1, 2]])), "class_labels"),
    (dict(generator=0), "generator"),
    (dict(generator=[0, 1]), "generator"),
    (dict(prompt_attention_mask=torch.ones(2, 6)), "prompt_attention_mask"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=2.0), "top_k"),
    (dict(height=8.0), "height"),
    (dict(num_images_per_prompt=1.0), "num_images_per_prompt"),
    (dict(callback_on_step_end="print"), "callback_on_step_end"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.2), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(temperature=-0.5), "temperature"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(cfg_interval=-3), "cfg_interval"),
    (dict(output_type="jpg"), "output_type"),
    (dict(prompt="a cat"), "prompt"),
    (dict(prompt_embeds=torch.zeros(1, 6, 24)), "prompt_embeds"),
    (dict(generator=[torch.Generator()]), "generator"),
    (dict(callback_on_step_end_tensor_inputs=["logits"]), "callback_on_step_end_tensor_inputs"),
]


@pytest.mark.parametrize("kwargs, name", BAD_INPUTS, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD_INPUTS)])
def test_bad_inputs_raise_a_value_error_naming_the_parameter(pipe, kwargs, name):
    kwargs = {"class_labels": [1, 2], **kwargs}
    with pytest.raises(ValueError, match=name):
        pipe(**kwargs)


def test_a_scheduler_that_does_not_match_the_heads_is_rejected():
    nar = NARPipeline(transformer=make_transformer(), vqvae=make_vqmodel(), scheduler=RasterScheduler(grid_size=(4, 4)))
    with pytest.raises(ValueError, match="scheduler"):
        nar(class_labels=[0])
    video_scheduler = NARPipeline(
        transformer=make_transformer(), vqvae=make_vqmodel(), scheduler=NeighborScheduler(grid_size=(2, 4, 4))
    )
    with pytest.raises(ValueError, match="scheduler"):
        video_scheduler(class_labels=[0])


def test_model_cpu_offload_hooks_run_for_prefill_and_every_decode_step():
    pipe = make_pipeline()
    expected = generate(pipe, output_type="latent", do_sample=False)
    pipe.enable_model_cpu_offload(device="cpu")
    hook = pipe.transformer._hf_hook
    calls = []
    original = hook.pre_forward
    hook.pre_forward = lambda module, *args, **kwargs: calls.append(1) or original(module, *args, **kwargs)
    assert torch.equal(generate(pipe, output_type="latent", do_sample=False), expected)
    assert len(calls) == len(pipe.scheduler)
