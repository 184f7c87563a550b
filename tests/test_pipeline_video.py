"""NARVideoPipeline: 3-D Manhattan planes through the pipeline path, outputs like diffusers' video pipelines."""

import pathlib

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import export_to_gif, export_to_video

from conftest import make_pipeline, make_transformer, make_video_pipeline, make_vqmodel
from nar_diffusers import NARPipeline, NARVideoPipeline, NeighborScheduler, RasterScheduler
from nar_diffusers.models.video_tokenizer import check_video_size


def generate(pipe, seed=0, **kwargs):
    if pipe.transformer.condition_type == "class":
        kwargs.setdefault("class_labels", [1, 7])
    else:
        kwargs.setdefault("prompt", ["a red fox in the snow", "a cat"])
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).frames


def record_step_logits(pipe) -> list[torch.Tensor]:
    """Wrap `pipe.scheduler.step` to keep the (mixed, guided) logits the pipeline hands it at every step."""
    recorded = []
    original = pipe.scheduler.step

    def step(logits, *args, **kwargs):
        recorded.append(logits.clone())
        return original(logits, *args, **kwargs)

    pipe.scheduler.step = step
    return recorded


def teacher_forced_logits(pipe, tokens, **condition) -> torch.Tensor:
    with torch.no_grad():
        return pipe.transformer(tokens, **condition).logits


def condition_of(pipe, labels_or_prompts):
    if pipe.transformer.condition_type == "class":
        return {"class_labels": torch.tensor(labels_or_prompts)}
    embeds, mask = pipe.encode_prompt(labels_or_prompts, device="cpu")
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


PIPELINES = {
    "nar-class": dict(),
    "nar-class-3x4x5": dict(grid_size=(3, 4, 5)),
    "nar-text": dict(text=True),
    "raster-class": dict(raster=True, grid_size=(2, 3, 3)),
    "nar-learned-positions": dict(position_embedding_type="learned"),
}


@pytest.mark.parametrize("overrides", PIPELINES.values(), ids=PIPELINES.keys())
def test_teacher_forced_logits_equal_the_pipelines_cached_step_by_step_logits(overrides):
    pipe = make_video_pipeline(**overrides)
    recorded = record_step_logits(pipe)
    conditions = [1, 7] if pipe.transformer.condition_type == "class" else ["a red fox in the snow", "a cat"]
    key = "class_labels" if pipe.transformer.condition_type == "class" else "prompt"
    tokens = generate(pipe, output_type="latent", guidance_scale=1.0, **{key: conditions})
    assert len(recorded) == len(pipe.scheduler)
    stepwise = torch.cat(recorded, dim=1)[:, pipe.scheduler.inverse_generation_order].view(*tokens.shape, -1)
    torch.testing.assert_close(
        stepwise, teacher_forced_logits(pipe, tokens, **condition_of(pipe, conditions)), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("overrides", PIPELINES.values(), ids=PIPELINES.keys())
def test_greedy_video_generation_equals_the_argmax_of_teacher_forcing(overrides):
    pipe = make_video_pipeline(**overrides)
    conditions = [3, 4] if pipe.transformer.condition_type == "class" else ["a small dog on the grass", "a cat"]
    key = "class_labels" if pipe.transformer.condition_type == "class" else "prompt"
    tokens = generate(pipe, output_type="latent", do_sample=False, guidance_scale=1.0, **{key: conditions})
    assert (tokens >= 0).all()
    argmax = teacher_forced_logits(pipe, tokens, **condition_of(pipe, conditions)).argmax(-1)
    assert torch.equal(argmax, tokens)


def test_every_cell_of_a_non_cubic_grid_is_generated_exactly_once_one_plane_per_step():
    pipe = make_video_pipeline(grid_size=(3, 4, 5))
    grids = []
    tokens = generate(pipe, output_type="latent", callback_on_step_end=lambda p, i, t, k: grids.append(k["tokens"]) or {})
    assert len(grids) == len(pipe.scheduler) == 3 + 4 + 5 - 2 == pipe.num_timesteps
    times_written = torch.zeros(3, 4, 5, dtype=torch.long)
    filled_before = torch.zeros(2, 3, 4, 5, dtype=torch.bool)
    t, y, x = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(5), indexing="ij")
    for step, grid in enumerate(grids):
        filled = grid >= 0
        assert (filled_before <= filled).all()
        new = filled & ~filled_before
        assert torch.equal(new[0], new[1]) and torch.equal(new[0], (t + y + x) == step)
        times_written += new[0].long()
        filled_before = filled
    assert (times_written == 1).all() and torch.equal(grids[-1], tokens)


def test_scheduler_length_is_t_plus_h_plus_w_minus_2():
    assert len(NeighborScheduler(grid_size=(4, 16, 16))) == 34
    assert len(RasterScheduler(grid_size=(4, 16, 16))) == 1024
    assert len(NeighborScheduler(grid_size=(3, 4, 5))) == 10


def test_raster_video_pipeline_takes_one_step_per_token():
    pipe = make_video_pipeline(raster=True, grid_size=(2, 3, 3))
    steps = []
    pipe(class_labels=[0], output_type="latent", callback_on_step_end=lambda p, i, t, k: steps.append(i) or {})
    assert len(steps) == 18 == len(pipe.scheduler)


def test_output_types_follow_diffusers_video_pipelines_and_export():
    pipe = make_video_pipeline()
    latent = generate(pipe, output_type="latent")
    assert latent.shape == (2, 2, 4, 4) and latent.dtype == torch.long and ((latent >= 0) & (latent < 48)).all()
    pt = generate(pipe, output_type="pt")
    assert pt.shape == (2, 2, 3, 8, 8) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    arr = generate(pipe, output_type="np")
    assert arr.shape == (2, 2, 8, 8, 3) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, pt.permute(0, 1, 3, 4, 2).numpy(), atol=1e-6)
    pil = generate(pipe, output_type="pil")
    assert len(pil) == 2 and all(len(video) == 2 for video in pil)
    assert isinstance(pil[0][0], PIL.Image.Image) and pil[0][0].size == (8, 8)
    # Frames are the frame-wise VQ decoding of the generated tokens, mapped from [-1, 1] to [0, 1].
    decoded = pipe.vqvae.decode(latent.flatten(), force_not_quantize=True, shape=(4, 4, 4, 4)).sample
    torch.testing.assert_close(pt, (decoded / 2 + 0.5).clamp(0, 1).view(2, 2, 3, 8, 8))


def test_frames_work_with_diffusers_export_to_video_and_export_to_gif(tmp_path):
    import av

    frames = generate(make_video_pipeline(), class_labels=[2])[0]
    gif = export_to_gif(frames, str(tmp_path / "clip.gif"))
    assert PIL.Image.open(gif).n_frames == 2
    mp4 = export_to_video(frames, str(tmp_path / "clip.mp4"), fps=4, macro_block_size=1)
    with av.open(mp4) as container:
        assert len(list(container.decode(video=0))) == 2
    arrays = generate(make_video_pipeline(), class_labels=[2], output_type="np")[0]
    export_to_video(list(arrays), str(tmp_path / "clip_np.mp4"), fps=4, macro_block_size=1)


def test_same_seed_same_video_and_one_generator_per_video():
    pipe = make_video_pipeline()
    assert torch.equal(generate(pipe, seed=3, output_type="latent"), generate(pipe, seed=3, output_type="latent"))
    assert not torch.equal(generate(pipe, seed=3, output_type="latent"), generate(pipe, seed=4, output_type="latent"))
    pair = pipe(class_labels=[1, 7], generator=[torch.Generator().manual_seed(s) for s in (5, 6)], output_type="latent")
    alone = pipe(class_labels=[7], generator=[torch.Generator().manual_seed(6)], output_type="latent")
    assert torch.equal(pair.frames[1], alone.frames[0])


def test_guidance_cfg_interval_and_num_videos_per_prompt():
    pipe = make_video_pipeline()
    plain = generate(pipe, output_type="latent", guidance_scale=1.0, do_sample=False)
    guided = generate(pipe, output_type="latent", guidance_scale=8.0, do_sample=False)
    assert not torch.equal(plain, guided)
    # cfg_interval=0: only the origin step (0 tokens before it) is guided; later steps use the conditional logits.
    recorded = record_step_logits(pipe)
    interval = generate(pipe, output_type="latent", guidance_scale=8.0, cfg_interval=0, do_sample=False)
    assert torch.equal(interval[:, 0, 0, 0], guided[:, 0, 0, 0]) and not torch.equal(interval, guided)
    with torch.no_grad():
        conditional = pipe.transformer(interval, class_labels=torch.tensor([1, 7])).logits
    later = torch.cat(recorded[1:], dim=1)
    order = pipe.scheduler.generation_order[1:]
    torch.testing.assert_close(later, conditional.flatten(1, 3)[:, order], atol=1e-5, rtol=1e-5)
    tokens = generate(pipe, class_labels=[2, 5], num_videos_per_prompt=3, output_type="latent", do_sample=False)
    assert tokens.shape == (6, 2, 4, 4) and torch.equal(tokens[0], tokens[2]) and torch.equal(tokens[3], tokens[5])
    assert len(generate(pipe, class_labels=[2], num_videos_per_prompt=2)) == 2


def test_text_to_video_with_prompts_and_negative_prompt():
    pipe = make_video_pipeline(text=True)
    tokens = generate(pipe, output_type="latent", num_videos_per_prompt=2)
    assert tokens.shape == (4, 2, 4, 4)
    negative = generate(pipe, output_type="latent", negative_prompt="a cat", do_sample=False)
    default = generate(pipe, output_type="latent", do_sample=False)
    assert negative.shape == default.shape and not torch.equal(negative, default)
    embeds, mask = pipe.encode_prompt(["a red fox in the snow"], num_videos_per_prompt=2)
    assert embeds.shape == (2, 6, 24) and mask.shape == (2, 6)


def test_smaller_clips_than_the_model_grid_and_the_default_size():
    pipe = make_video_pipeline(grid_size=(3, 4, 5))
    assert pipe.default_video_size() == (3, 8, 10)
    assert generate(pipe, num_frames=2, height=4, width=8, output_type="latent").shape == (2, 2, 2, 4)
    assert generate(pipe, num_frames=np.int64(1), output_type="pt").shape == (2, 1, 3, 8, 10)


def test_save_pretrained_then_from_pretrained_gives_the_same_video(tmp_path):
    pipe = make_video_pipeline()
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "vqvae" / "diffusion_pytorch_model.safetensors").exists()
    loaded = NARVideoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, NeighborScheduler) and loaded.transformer.config.num_decoding_heads == 3
    assert torch.equal(generate(loaded, seed=9, output_type="latent"), generate(pipe, seed=9, output_type="latent"))
    np.testing.assert_allclose(generate(loaded, output_type="np"), generate(pipe, output_type="np"))

    custom = pathlib.Path(__file__).parents[1] / "pipelines" / "pipeline_nar_video.py"
    plain = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=str(custom), trust_remote_code=True)
    assert type(plain).__name__ == "NARVideoPipeline"


def test_raster_pipeline_saves_and_loads_with_its_scheduler(tmp_path):
    pipe = make_video_pipeline(raster=True, grid_size=(2, 3, 3))
    pipe.save_pretrained(tmp_path)
    loaded = NARVideoPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, RasterScheduler)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(generate(loaded, output_type="latent"), generate(pipe, output_type="latent"))


BAD_INPUTS = [
    (dict(num_frames=3), "num_frames"),  # 3 frames = 3 token steps, the model serves 2
    (dict(num_frames=0), "num_frames"),
    (dict(num_frames=2.0), "num_frames"),
    (dict(height=7), "height"),  # not a multiple of the VQ factor 2
    (dict(height=10), "height"),  # 5 rows of tokens, the model serves 4
    (dict(width=9), "width"),
    (dict(width=-8), "width"),
    (dict(num_videos_per_prompt=0), "num_videos_per_prompt"),
    (dict(generator=[torch.Generator()]), "generator"),
    (dict(class_labels=[10]), "class_labels"),
    (dict(class_labels=None), "class_labels"),
    (dict(prompt="a cat"), "prompt"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(cfg_interval=-2), "cfg_interval"),
    (dict(top_p=0.0), "top_p"),
    (dict(output_type="gif"), "output_type"),
    (dict(callback_on_step_end_tensor_inputs=["logits"]), "callback_on_step_end_tensor_inputs"),
]


@pytest.mark.parametrize("kwargs, name", BAD_INPUTS, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD_INPUTS)])
def test_bad_inputs_raise_a_value_error_naming_the_argument(kwargs, name):
    pipe = make_video_pipeline()
    with pytest.raises(ValueError, match=name):
        pipe(**{"class_labels": [1, 2], **kwargs})


def test_a_2d_transformer_in_the_video_pipeline_and_a_3d_one_in_the_image_pipeline_are_rejected():
    image_model = make_transformer()
    video = NARVideoPipeline(transformer=image_model, vqvae=make_vqmodel(), scheduler=NeighborScheduler(grid_size=(4, 4)))
    with pytest.raises(ValueError, match="`transformer`.*3-D.*NARPipeline"):
        video(class_labels=[0])
    video_model = make_video_pipeline().transformer
    image = NARPipeline(transformer=video_model, vqvae=make_vqmodel(), scheduler=NeighborScheduler(grid_size=(2, 4, 4)))
    with pytest.raises(ValueError, match="`transformer`.*2-D.*NARVideoPipeline"):
        image(class_labels=[0])


def test_a_scheduler_that_does_not_drive_the_heads_is_rejected():
    pipe = make_video_pipeline()
    pipe.scheduler = RasterScheduler(grid_size=(2, 4, 4))
    with pytest.raises(ValueError, match="scheduler"):
        pipe(class_labels=[0])


def test_the_tokenizer_component_must_be_a_vq_model_or_implement_the_interface():
    with pytest.raises(TypeError, match="`vqvae`"):
        NARVideoPipeline(
            transformer=make_video_pipeline().transformer, vqvae=torch.nn.Linear(2, 2),
            scheduler=NeighborScheduler(grid_size=(2, 4, 4)),
        )  # fmt: skip
    pipe = make_video_pipeline()
    pipe.register_modules(vqvae=make_vqmodel(num_vq_embeddings=32))
    with pytest.raises(ValueError, match="vqvae.*vocab_size"):
        pipe(class_labels=[0])


class UnitRangeTokenizer(ModelMixin, ConfigMixin):
    """A stand-in for a [0, 1] video tokenizer (like LARP): 2 frames per token step, 2 pixels per token; token id
    `v` decodes to the grey level `v / (vocab_size - 1)` (values slightly outside [0, 1] for the clamp test)."""

    temporal_compression = 2
    spatial_compression = 2
    pixel_range = (0.0, 1.0)

    @register_to_config
    def __init__(self, vocab_size: int = 48):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def token_grid(self, num_frames, height, width):
        return check_video_size(num_frames, height, width, self.temporal_compression, self.spatial_compression)

    def encode_video(self, video):
        small = video[:, 0, :: self.temporal_compression, :: self.spatial_compression, :: self.spatial_compression]
        return (small * (self.vocab_size - 1)).round().long()

    def decode_video(self, tokens):
        values = tokens.float() / (self.vocab_size - 1) * 1.2 - 0.1
        frames = values.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)
        return frames[:, None].expand(-1, 3, -1, -1, -1) * self.scale


def test_a_unit_range_tokenizer_plugs_in_and_its_pixel_range_is_respected():
    transformer = make_video_pipeline().transformer
    tokenizer = UnitRangeTokenizer()
    pipe = NARVideoPipeline(transformer=transformer, vqvae=tokenizer, scheduler=NeighborScheduler(grid_size=(2, 4, 4)))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.video_tokenizer is tokenizer and pipe.default_video_size() == (4, 8, 8)
    tokens = generate(pipe, output_type="latent")
    frames = generate(pipe, output_type="pt")
    assert frames.shape == (2, 4, 3, 8, 8)
    expected = tokenizer.decode_video(tokens).clamp(0, 1).permute(0, 2, 1, 3, 4)  # no (x + 1) / 2 for [0, 1]
    torch.testing.assert_close(frames, expected)
    with pytest.raises(ValueError, match="num_frames"):
        pipe(class_labels=[0], num_frames=3)


def test_lora_loads_into_the_video_pipeline_and_unloads(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = make_video_pipeline()
    base = generate(pipe, output_type="latent", do_sample=False, guidance_scale=1.0)
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "out_proj"]), adapter_name="tmp")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    NARVideoPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name="tmp"))
    transformer.delete_adapters("tmp")
    pipe.load_lora_weights(tmp_path, adapter_name="motion")
    adapted = generate(pipe, output_type="latent", do_sample=False, guidance_scale=1.0)
    assert not torch.equal(adapted, base)
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe, output_type="latent", do_sample=False, guidance_scale=1.0), base)


def test_model_cpu_offload_runs_the_transformer_hooks_every_step():
    pipe = make_video_pipeline()
    expected = generate(pipe, output_type="np", do_sample=False)
    pipe.enable_model_cpu_offload(device="cpu")
    hook = pipe.transformer._hf_hook
    calls = []
    original = hook.pre_forward
    hook.pre_forward = lambda module, *args, **kwargs: calls.append(1) or original(module, *args, **kwargs)
    np.testing.assert_allclose(generate(pipe, output_type="np", do_sample=False), expected)
    assert len(calls) == len(pipe.scheduler)


def test_image_pipeline_is_unchanged_by_the_shared_machinery():
    pipe = make_pipeline()
    out = pipe(class_labels=[1], output_type="latent", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 4, 4) and pipe.num_timesteps == 7
