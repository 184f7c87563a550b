"""Class- and text-to-video generation with a NAR (or raster) transformer over a `(T, H, W)` token grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput, logging
from diffusers.video_processor import VideoProcessor

from ..loaders.lora_pipeline import NARLoraLoaderMixin
from ..models.transformer_nar import NARTransformer
from ..models.video_tokenizer import (
    VideoTokenizer,
    as_video_tokenizer,
    from_unit_range,
    to_unit_range,
    tokenizer_num_channels,
)
from ..schedulers.sampling import is_int
from ..schedulers.scheduling_autoregressive import AutoregressiveScheduler
from ..utils.video_utils import frames_to_tensor
from .guarded_loading import GuardedLoadingMixin
from .pipeline_hub import Id2Label, NARHubMixin, SamplingDefaults
from .autoregressive_generation import AutoregressiveGenerationMixin, with_common_arguments
from .condition import ConditionInputs

logger = logging.get_logger(__name__)


@dataclass
class NARVideoPipelineOutput(BaseOutput):
    r"""Output of [`NARVideoPipeline`].

    Args:
        frames (`list[list[PIL.Image.Image]]`, `np.ndarray`, `torch.Tensor` or `torch.LongTensor`):
            One list of frames per video ("pil"); floats in [0, 1] of shape `(batch, frames, height, width,
            channels)` ("np") or `(batch, frames, channels, height, width)` ("pt"); or the `(batch, T, h, w)` token
            grid ("latent").
    """

    frames: list[list[PIL.Image.Image]] | np.ndarray | torch.Tensor


class NARVideoPipeline(
    GuardedLoadingMixin, NARHubMixin, DiffusionPipeline, AutoregressiveGenerationMixin, NARLoraLoaderMixin
):
    r"""Generate videos token grid by token grid: prefill the condition, then one forward pass per scheduler step.

    With a `NeighborScheduler` and a three-head transformer (right, down, back) a `T x H x W` token grid takes
    `T + H + W - 2` passes (34 for 4x16x16); with a `RasterScheduler` and a one-head transformer it takes
    `T * H * W` (vanilla AR, the baseline).

    Args:
        transformer ([`NARTransformer`]): the token model over a 3-D `grid_size` (class- or text-conditional).
        vqvae ([`~diffusers.VQModel`] or a video tokenizer model): token grids <-> frames. A `VQModel` (with
            `lookup_from_codebook=True`) is applied frame by frame (a `T x h x w` grid is T frames); a model
            implementing the video tokenizer interface (`nar_diffusers.models.video_tokenizer`, e.g. LARP) is
            used as it is.
        scheduler ([`NeighborScheduler`] or [`RasterScheduler`]): the token order and the token draw.
        text_encoder ([`~transformers.T5EncoderModel`], *optional*): text models only.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*): text models only.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vqvae"
    _hub_module_name = "pipeline_nar_video"
    _optional_components = ["text_encoder", "tokenizer"]

    def __init__(
        self,
        transformer: NARTransformer,
        vqvae: ModelMixin,
        scheduler: AutoregressiveScheduler,
        text_encoder: Any = None,
        tokenizer: Any = None,
        sampling_defaults: SamplingDefaults | None = None,
        id2label: Id2Label | None = None,
        model_card_info: dict[str, Any] | None = None,
    ):
        super().__init__()
        video_tokenizer = as_video_tokenizer(vqvae, "vqvae")
        self.register_modules(
            transformer=transformer, vqvae=vqvae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )
        self._register_metadata(sampling_defaults, id2label, model_card_info)
        # Post-processing maps the tokenizer's `pixel_range` to [0, 1] itself, so no normalisation here.
        self.video_processor = VideoProcessor(vae_scale_factor=video_tokenizer.spatial_compression, do_normalize=False)

    @property
    def video_tokenizer(self) -> VideoTokenizer:
        """The `vqvae` component behind the video tokenizer interface (a `FrameVQTokenizer` for a `VQModel`)."""
        return as_video_tokenizer(self.vqvae, "vqvae")

    def default_video_size(self) -> tuple[int, int, int]:
        """`(num_frames, height, width)` of the scheduler's grid, the size generated when none is given (a tokenizer
        of one clip size, such as LARP, gives its `clip_size`: its token grid need not be its patch grid)."""
        tokenizer = self.video_tokenizer
        clip_size = getattr(tokenizer, "clip_size", None)
        if clip_size is not None:
            return tuple(int(size) for size in clip_size)
        steps, rows, columns = self.scheduler.grid_size
        spatial = tokenizer.spatial_compression
        return steps * tokenizer.temporal_compression, rows * spatial, columns * spatial

    # --- inputs --------------------------------------------------------------------------------------

    def check_video_grid(
        self, condition: ConditionInputs, num_frames: Any, height: Any, width: Any, video: Any = None, tokens: Any = None
    ) -> tuple[int, int, int]:
        """Check the model and the clip size; return the `(T, h, w)` token grid of the requested size. A ValueError
        names the argument and its allowed values.

        `video` is the given first frames as `__call__` converted them, a `(B, C, F, H, W)` tensor in [0, 1]; their
        height and width are the default size. `tokens` is a partial token grid, whose grid sets the size."""
        self._check_token_model(3, "videos (T, H, W)", "NARPipeline")
        tokenizer = self.video_tokenizer
        vocab_size = self.transformer.config.vocab_size
        if tokenizer.vocab_size != vocab_size:
            raise ValueError(
                f"`vqvae` has {tokenizer.vocab_size} token ids but the transformer's vocab_size is {vocab_size}: "
                "they must be the tokenizer and the transformer trained on its tokens."
            )
        sizes = {"num_frames": num_frames, "height": height, "width": width}
        for name, value in sizes.items():
            if value is not None and (not is_int(value) or value <= 0):
                raise ValueError(f"`{name}` must be a positive int or None (the model's default), got {value!r}.")
        if video is not None and tokens is not None:
            raise ValueError("Pass at most one of `video` (the first frames, to continue) and `tokens` (a partial grid).")
        defaults = self.default_video_size()
        if video is not None:
            defaults = self._check_video_prefix(video, sizes, defaults, condition.num_conditions,
                                                condition.num_per_prompt)  # fmt: skip
        units = (tokenizer.temporal_compression, tokenizer.spatial_compression, tokenizer.spatial_compression)
        if isinstance(tokens, (torch.Tensor, np.ndarray)) and tokens.ndim in (3, 4):
            # The partial grid sets the size; passed sizes must agree with it.
            clip_size = getattr(tokenizer, "clip_size", None)
            implied = list(clip_size) if clip_size is not None else [int(n) * u for n, u in zip(tokens.shape[-3:], units)]
            for (name, value), size in zip(sizes.items(), implied):
                if value is not None and int(value) != size:
                    raise ValueError(
                        f"`{name}` {value} does not match the grid of `tokens` {tuple(tokens.shape[-3:])}: it must be "
                        f"{size} or None."
                    )
            defaults = tuple(implied)
        sizes = {name: defaults[i] if value is None else int(value) for i, (name, value) in enumerate(sizes.items())}
        grid = tokenizer.token_grid(**sizes)  # a ValueError naming the size that does not fit the tokenizer
        model_grid = self.transformer.config.grid_size
        for (name, value), cells, limit, unit in zip(sizes.items(), grid, model_grid, units):
            if cells > limit:
                raise ValueError(
                    f"`{name}` {value} is larger than the model's grid allows: at most {limit * unit} ({limit} token "
                    f"steps x {unit}), the transformer's grid_size is {tuple(model_grid)}."
                )
        self.check_partial_grid(tokens, grid, condition)
        return grid

    def _check_video_prefix(
        self, video: torch.Tensor, sizes: dict, defaults: tuple[int, int, int], num_conditions: int, num_per_prompt: int
    ) -> tuple[int, int, int]:
        """Check the given first frames `(B, C, F, H, W)` against the tokenizer and the requested size; return the
        default `(num_frames, height, width)` with the frames' height and width."""
        tokenizer = self.video_tokenizer
        if not getattr(tokenizer, "supports_frame_prefix", False):
            raise ValueError(
                f"`video` continuation needs a tokenizer whose token time steps are frames (`supports_frame_prefix`), "
                f"such as a frame-wise VQModel; the `vqvae` {type(tokenizer).__name__} is holistic (each token reads "
                "the whole clip), so the first frames have no tokens of their own. Pass a partial grid as `tokens` "
                "instead if you have one."
            )
        batch, _, frames, height, width = video.shape
        total = num_conditions * num_per_prompt
        if batch not in (1, num_conditions, total):
            raise ValueError(
                f"`video` holds {batch} videos: give 1 (for every output), {num_conditions} (one per class label / "
                f"prompt) or {total} (one per output)."
            )
        for name, value, size in (("height", sizes["height"], height), ("width", sizes["width"], width)):
            if value is not None and int(value) != size:
                raise ValueError(
                    f"`{name}` {value} does not match the `video` frames' {name} {size}; pass {size} or None."
                )
        num_frames = defaults[0] if sizes["num_frames"] is None else int(sizes["num_frames"])
        step = tokenizer.temporal_compression
        if frames % step or frames > num_frames:
            raise ValueError(
                f"`video` has {frames} frames: the given frames must be a whole number of token time steps ({step} "
                f"frame(s) each) and at most `num_frames` {num_frames}."
            )
        factor = tokenizer.spatial_compression
        if height % factor or width % factor:
            raise ValueError(
                f"`video` frames are {height}x{width} pixels: height and width must be multiples of the tokenizer's "
                f"spatial compression {factor}."
            )
        return defaults[0], height, width

    def _video_prefix_tokens(self, video: torch.Tensor, grid: tuple[int, int, int], device) -> torch.LongTensor:
        """The partial grid of a video continuation: the given frames' tokens in the first time steps, -1 after;
        `(T, h, w)` for one given video (every output continues it), else `(B, T, h, w)`."""
        tokenizer = self.video_tokenizer
        pixels = from_unit_range(video, tokenizer.pixel_range).to(device=tokenizer.device, dtype=tokenizer.dtype)
        prefix = tokenizer.encode_video(pixels).to(device)
        known = torch.full((prefix.shape[0], *grid), -1, dtype=torch.long, device=device)
        known[:, : prefix.shape[1]] = prefix
        return known[0] if known.shape[0] == 1 else known

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device | None = None,
        num_videos_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        truncation: bool = True,
    ) -> tuple[torch.Tensor, torch.BoolTensor]:
        """Encode prompts with the T5 encoder into the transformer's left-padded condition layout.

        Returns `(prompt_embeds, prompt_attention_mask)` of shapes `(batch, num_condition_tokens, caption_dim)`
        and `(batch, num_condition_tokens)`: the valid tokens fill the LAST slots, padded rows are zero.
        """
        return self._encode_prompt(prompt, device, num_videos_per_prompt, max_sequence_length, truncation)

    # --- generation ----------------------------------------------------------------------------------

    @torch.no_grad()
    @with_common_arguments
    def __call__(
        self,
        class_labels: int | list[int] | torch.LongTensor | np.ndarray | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        cfg_interval: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        do_sample: bool = True,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        max_sequence_length: int | None = None,
        truncation: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["tokens"],
        attention_kwargs: dict[str, Any] | None = None,
        video: Any = None,
        tokens: torch.LongTensor | np.ndarray | None = None,
        kv_cache_dtype: torch.dtype | str | None = None,
    ) -> NARVideoPipelineOutput | tuple:
        r"""Generate videos, or continue given first frames (`video`).

        Args:
            {common_arguments}
            num_frames, height, width: the clip size; `num_frames` a multiple of the tokenizer's temporal
                compression (1 for a frame-wise VQModel), `height` and `width` multiples of its spatial
                compression. The token grid must fit the transformer's `grid_size`. Default: the scheduler's grid.
            num_videos_per_prompt: videos per class label / prompt.
            output_type: "pil" (a list of frame lists), "np" `(batch, frames, height, width, channels)` or "pt"
                `(batch, frames, channels, height, width)` floats in [0, 1], or "latent" (the `(batch, T, h, w)`
                token grid).
            video: the first frames of the clip(s) to continue (frame prediction): a list of PIL frames, a list of
                such lists, a NumPy array `(F, H, W, C)` / `(B, F, H, W, C)` or a torch tensor `(F, C, H, W)` /
                `(B, F, C, H, W)` in [0, 1]; one video (every output continues it), one per class label / prompt, or
                one per output. They are tokenized and kept; the remaining frames up to `num_frames` are generated.
                F must be a whole number of token time steps, and the frames' size sets `height` / `width`. Needs a
                tokenizer whose time steps are frames (`supports_frame_prefix`: a frame-wise VQModel, not LARP).
            tokens: a partial `(T, h, w)` token grid (advanced use), integer ids with -1 where a token is to be
                generated, of shape `(T, h, w)`, `(num_labels_or_prompts, T, h, w)` or `(num_videos, T, h, w)`; its
                grid sets the size. A known cell is written and fed when its step comes instead of a drawn token;
                the plane order is unchanged, so it only informs the cells generated after it (best when the known
                cells come first, e.g. the first frames).

        Raises:
            `ValueError` for invalid arguments (before any model runs); `NonFiniteLogitsError` when the transformer
            produced NaN/inf logits.

        Returns:
            [`NARVideoPipelineOutput`] (or a tuple with the frames when `return_dict=False`). The frames of one
            video (`output.frames[i]`) go to `diffusers.utils.export_to_video` / `export_to_gif` as they are.
        """
        # 1. Check every input once, before any model runs.
        arguments = locals()
        condition = self.check_condition(arguments, "num_videos_per_prompt")
        if video is not None:
            video = frames_to_tensor(video, tokenizer_num_channels(self.video_tokenizer), "video")
        grid = self.check_video_grid(condition, num_frames, height, width, video, tokens)
        settings = self.check_sampling(arguments, condition, "video")
        callback = self.check_output(output_type, callback_on_step_end, callback_on_step_end_tensor_inputs)
        kv_cache_dtype = self.check_kv_cache_dtype(kv_cache_dtype)

        # 2. The condition, one row per video; known tokens (the given frames' tokens, or a partial grid).
        device = self._execution_device
        encoded = self.encode_condition(condition, device)
        if video is not None:
            tokens = self._video_prefix_tokens(video, grid, device)
        known_tokens = self.prepare_partial_grid(tokens, grid, condition, device)

        # 3. Prefill, then one forward pass per group of tokens.
        with self.lora_scale(attention_kwargs):
            tokens = self.generate_tokens(encoded, settings, grid, known_tokens, callback,
                                          "grid of (num_frames, height, width)", kv_cache_dtype)  # fmt: skip

        # 4. Tokens -> frames.
        if output_type == "latent":
            frames = tokens
        else:
            video = to_unit_range(self.decode_tokens(tokens), self.video_tokenizer.pixel_range)
            frames = self.video_processor.postprocess_video(video, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return NARVideoPipelineOutput(frames=frames)

    def decode_tokens(self, tokens: torch.LongTensor) -> torch.Tensor:
        """Decode a `(batch, T, h, w)` token grid into float32 frames `(batch, channels, frames, height, width)`
        in the tokenizer's `pixel_range` (not clamped)."""
        return self.video_tokenizer.decode_video(tokens.clamp(min=0)).float()  # -1 only after an interrupt
