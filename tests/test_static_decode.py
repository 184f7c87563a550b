"""The static decode path (`pipe.enable_static_decode()`) draws exactly the eager loop's tokens."""

import os

import pytest
import torch

from conftest import make_pipeline, make_text_pipeline, make_transformer, make_vqmodel
from nar_diffusers import NARVideoPipeline, NeighborScheduler, RasterScheduler
from nar_diffusers.pipelines.pipeline_nar import NonFiniteLogitsError


def eager_and_static(pipe, seeds=(0,), **kwargs):
    """The `output_type="latent"` grids of the eager loop and of the static path, same inputs and seeds."""
    kwargs.setdefault("output_type", "latent")

    def run():
        generator = [torch.Generator().manual_seed(s) for s in seeds] if len(seeds) > 1 else (
            torch.Generator().manual_seed(seeds[0]))
        out = pipe(generator=generator, **kwargs)
        return out.frames if hasattr(out, "frames") else out.images

    pipe.disable_static_decode()
    eager = run()
    pipe.enable_static_decode()
    try:
        static = run()
    finally:
        pipe.disable_static_decode()
    return eager, static


SETTINGS = {
    "greedy": dict(do_sample=False),
    "sampled": dict(),
    "top-k-top-p-temperature": dict(top_k=5, top_p=0.8, temperature=0.7),
    "top-p-only": dict(top_p=0.5),
    "guided": dict(guidance_scale=3.0),
    "guided-cfg-interval": dict(guidance_scale=3.0, cfg_interval=4),
    "guided-greedy-cfg-interval": dict(guidance_scale=8.0, cfg_interval=2, do_sample=False),
    "unguided": dict(guidance_scale=1.0),
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_static_path_draws_the_eager_tokens_for_class_images(settings):
    eager, static = eager_and_static(make_pipeline(), class_labels=[1, 7, 3], **settings)
    assert eager.shape == (3, 4, 4) and (eager >= 0).all()
    assert torch.equal(eager, static)


PIPELINES = {
    "raster": lambda: make_pipeline(raster=True),
    "non-square-grid": lambda: make_pipeline(grid_size=(3, 5)),
    "learned-positions": lambda: make_pipeline(position_embedding_type="learned"),
    "no-gqa": lambda: make_pipeline(num_key_value_heads=4),
}


@pytest.mark.parametrize("make", PIPELINES.values(), ids=PIPELINES.keys())
def test_static_path_draws_the_eager_tokens_for_other_models(make):
    eager, static = eager_and_static(make(), class_labels=[2, 5], guidance_scale=2.0, top_k=8)
    assert torch.equal(eager, static)


def test_static_path_with_one_generator_per_image_and_images_per_prompt():
    pipe = make_pipeline()
    eager, static = eager_and_static(
        pipe, seeds=(5, 6, 7, 8), class_labels=[1, 7], num_images_per_prompt=2, guidance_scale=2.0
    )
    assert torch.equal(eager, static)
    pipe.enable_static_decode()
    alone = pipe(class_labels=[7], generator=[torch.Generator().manual_seed(8)], guidance_scale=2.0,
                 output_type="latent").images  # fmt: skip
    assert torch.equal(alone[0], static[3])


def test_static_path_on_a_smaller_grid_than_the_model_and_then_the_full_grid():
    pipe = make_pipeline()
    eager, static = eager_and_static(pipe, class_labels=[1], height=6, width=8, guidance_scale=2.0)
    assert static.shape == (1, 3, 4) and torch.equal(eager, static)
    eager, static = eager_and_static(pipe, class_labels=[1], guidance_scale=2.0)
    assert static.shape == (1, 4, 4) and torch.equal(eager, static)


@pytest.mark.parametrize("padded", [False, True], ids=["full-prompts", "padded-prompts"])
def test_static_path_draws_the_eager_tokens_for_text_models(padded):
    pipe = make_text_pipeline()
    kwargs = dict(prompt=["a photo of a cat", "a red fox in the snow"], guidance_scale=3.0, cfg_interval=5)
    if not padded:
        embeds, mask = pipe.encode_prompt(kwargs.pop("prompt"))
        kwargs.update(prompt_embeds=embeds, prompt_attention_mask=torch.ones_like(mask))
    eager, static = eager_and_static(pipe, **kwargs)
    assert torch.equal(eager, static)


@pytest.mark.parametrize("raster", [False, True], ids=["nar", "raster"])
def test_static_path_draws_the_eager_tokens_for_videos(raster):
    transformer = make_transformer(grid_size=(2, 3, 3), num_decoding_heads=1 if raster else 3)
    scheduler = (RasterScheduler if raster else NeighborScheduler)(grid_size=(2, 3, 3))
    pipe = NARVideoPipeline(transformer=transformer, vqvae=make_vqmodel(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    for settings in (dict(do_sample=False), dict(guidance_scale=2.0, top_p=0.9)):
        eager, static = eager_and_static(pipe, seeds=(0, 1), class_labels=[4, 6], **settings)
        assert eager.shape == (2, 2, 3, 3) and torch.equal(eager, static)


def test_callbacks_see_the_same_grids_and_can_edit_them_on_the_static_path():
    pipe = make_pipeline()
    grids = {"eager": [], "static": []}

    def callback(name):
        def on_step(pipeline, step, timestep, kwargs):
            grids[name].append(kwargs["tokens"])
            if step == 2:
                tokens = kwargs["tokens"].clone()
                tokens[:, 1, 1] = 11  # fed at step 3
                return {"tokens": tokens}
            return {}

        return on_step

    kwargs = dict(class_labels=[1, 2], guidance_scale=2.0, output_type="latent")
    eager = pipe(generator=torch.Generator().manual_seed(0), callback_on_step_end=callback("eager"), **kwargs).images
    pipe.enable_static_decode()
    static = pipe(generator=torch.Generator().manual_seed(0), callback_on_step_end=callback("static"), **kwargs).images
    assert (static[:, 1, 1] == 11).all() and torch.equal(eager, static)
    assert len(grids["static"]) == len(pipe.scheduler)
    for eager_grid, static_grid in zip(grids["eager"], grids["static"]):
        assert torch.equal(eager_grid, static_grid)
    assert len({grid.data_ptr() for grid in grids["static"]}) == len(grids["static"])


def test_static_path_keeps_its_buffers_between_calls_of_the_same_shape():
    pipe = make_pipeline()
    pipe.enable_static_decode()
    first = pipe(class_labels=[1, 2], generator=torch.Generator().manual_seed(0), output_type="latent").images
    cache = pipe._static_runner.state.kv_cache
    again = pipe(class_labels=[1, 2], generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert pipe._static_runner.state.kv_cache is cache and torch.equal(first, again)
    pipe(class_labels=[1, 2, 3], output_type="latent")
    assert pipe._static_runner.state.kv_cache is not cache
    pipe.disable_static_decode()
    assert not pipe.static_decode_enabled


@pytest.mark.parametrize("kwargs", [dict(), dict(guidance_scale=1e300)], ids=["nan-weights", "overflowing-guidance"])
def test_nan_logits_raise_the_same_error_on_the_static_path(kwargs):
    pipe = make_pipeline()
    if not kwargs:
        with torch.no_grad():
            pipe.transformer.blocks[-1].feed_forward.w2.weight.fill_(float("nan"))  # head 1's block only
    messages = []
    for static in (False, True):
        if static:
            pipe.enable_static_decode()
        with pytest.raises(NonFiniteLogitsError) as info:
            pipe(class_labels=[1], output_type="latent", **kwargs)
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "NaN or inf logits at" in messages[1]


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(compile="yes"), "`compile`"), (dict(compile=True, mode="fast"), "`mode`"),
     (dict(mode="default"), "compile=True"), (dict(compile=True, backend=""), "`backend`")],
)
def test_enable_static_decode_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_pipeline().enable_static_decode(**kwargs)


def _compiled_matches_eager(backend: str):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe = make_pipeline()
    kwargs = dict(class_labels=[1, 7], guidance_scale=3.0, cfg_interval=4, top_k=5, output_type="latent")
    eager = [pipe(generator=torch.Generator().manual_seed(s), **kwargs).images for s in (0, 1)]
    pipe.enable_static_decode(compile=True, backend=backend)
    compiled = [pipe(generator=torch.Generator().manual_seed(s), **kwargs).images for s in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    # fullgraph=True already fails on any graph break (a host sync would be one); one graph serves every step of
    # both generations.
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_static_step_traces_into_one_graph_without_breaks():
    _compiled_matches_eager("eager")


@pytest.mark.skipif(
    os.environ.get("NAR_COMPILE_TESTS") != "1",
    reason="compiling with inductor takes 10-30 s on a CPU; set NAR_COMPILE_TESTS=1 to run it",
)
def test_inductor_compiled_static_path_draws_the_eager_tokens():
    _compiled_matches_eager("inductor")
