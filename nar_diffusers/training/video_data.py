"""Video datasets for training: a folder of videos with a `metadata.jsonl`, or a 🤗 dataset with a video column,
decoded to clips of `num_frames` frames taken every `frame_stride` frames, resized and cropped.

A video folder is what 🤗 `datasets` calls a `videofolder`: video files plus a `metadata.jsonl` with one line per
file, `{"file_name": "clip.mp4", "label": 3}` (or a class name, `"label": "ApplyEyeMakeup"`) or
`{"file_name": "clip.mp4", "text": "a caption"}`; class sub-folders give labels too. Videos are decoded with PyAV
(`nar_diffusers.utils.video_utils`), never with `datasets`' own video decoding (which needs FFmpeg installed on the
system): the video column is read as `{"path", "bytes"}` (`Video(decode=False)`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..models.video_tokenizer import from_unit_range
from ..utils.image_utils import check_num_channels
from ..utils.video_utils import describe_source, read_clip
from .batches import ImageExamples
from .image_data import load_image_dataset

CLIP_POSITIONS = ("start", "center", "random")
"""Where a clip is taken in a longer video: its first frames, its middle, or a random place (seeded)."""

_LUMA = (0.299, 0.587, 0.114)


def load_video_dataset(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    max_samples: int | None = None,
    video_column: str = "video",
):
    """Load a video dataset with 🤗 `datasets`, its video column left undecoded (`{"path", "bytes"}` per row).

    Args:
        dataset_name: A Hub dataset id or any `datasets.load_dataset` source with a video column.
        train_data_dir: A local video folder (`videofolder` layout: a `metadata.jsonl` with `file_name` and a label
            or caption per video, or class sub-folders); its video column is "video".
        dataset_config_name, split, cache_dir: As for `datasets.load_dataset`.
        max_samples: Keep only the first `max_samples` rows.
        video_column: The column holding the videos (Video features, paths, or bytes).

    Returns:
        A `datasets.Dataset`.
    """
    from datasets import Video

    dataset = load_image_dataset(
        dataset_name, train_data_dir, dataset_config_name, split, cache_dir, max_samples, folder_kind="video"
    )
    if video_column not in dataset.column_names:
        raise ValueError(
            f"`--video_column` value {video_column!r} is not a column of the dataset; available columns: "
            f"{list(dataset.column_names)}."
        )
    if isinstance(dataset.features[video_column], Video):
        dataset = dataset.cast_column(video_column, Video(decode=False))
    return dataset


def encode_label_column(dataset, column: str):
    """Turn a label column of class names (strings) into integer class ids (a `ClassLabel`, names sorted); integer
    and `ClassLabel` columns are returned unchanged."""
    feature = dataset.features[column]
    if getattr(feature, "dtype", None) == "string":
        return dataset.class_encode_column(column)
    return dataset


def add_video_arguments(parser) -> None:
    """Add the flags that turn an image-dataset script into a video one: `--video_column` (set it to train on
    videos), `--num_frames`, `--frame_stride`, `--height`, `--width`, `--clip_position`."""
    parser.add_argument(
        "--video_column", type=str, default=None,
        help='Column holding the videos; setting it trains on videos ("video" for a --train_data_dir video folder).',
    )  # fmt: skip
    parser.add_argument("--num_frames", type=int, default=16, help="Frames per training clip (videos).")
    parser.add_argument("--frame_stride", type=int, default=1, help="Take every N-th frame of the video (videos).")
    parser.add_argument("--height", type=int, default=None, help="Clip height in pixels (videos; default --resolution).")
    parser.add_argument("--width", type=int, default=None, help="Clip width in pixels (videos; default --resolution).")
    parser.add_argument(
        "--clip_position", type=str, default="center", choices=list(CLIP_POSITIONS),
        help="Where the clip is taken in a longer video (videos; random is seeded).",
    )  # fmt: skip


def check_video_arguments(args, resolution_flag: str = "resolution") -> None:
    """Check the flags of `add_video_arguments` and fill `--height` / `--width` from the resolution flag."""
    for name in ("num_frames", "frame_stride", "height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}.")
    resolution = getattr(args, resolution_flag, None)
    if args.height is None:
        args.height = resolution
    if args.width is None:
        args.width = resolution


class VideoClipTransform:
    """A video -> a clip tensor `(C, num_frames, height, width)` in the tokenizer's `pixel_range`.

    Reads `num_frames` frames every `frame_stride` frames at `clip_position`, resizes them (bilinear, antialiased)
    so that they cover `height x width` with the aspect ratio kept, crops (centre, or random with `random_crop`),
    optionally mirrors the whole clip, and converts to grayscale for 1-channel tokenizers.

    Args:
        num_frames, frame_stride, height, width: the clip.
        clip_position: "start", "center" or "random".
        random_crop, random_flip: augmentation, drawn from the call's generator.
        num_channels: 3 (RGB) or 1 (grayscale).
        pixel_range: the value range of the tokenizer's input ((-1, 1) for a VQModel).
    """

    def __init__(
        self,
        num_frames: int,
        frame_stride: int,
        height: int,
        width: int,
        clip_position: str = "center",
        random_crop: bool = False,
        random_flip: bool = False,
        num_channels: int = 3,
        pixel_range: tuple[float, float] = (-1.0, 1.0),
    ):
        for name, value in (("num_frames", num_frames), ("frame_stride", frame_stride), ("height", height),
                            ("width", width)):  # fmt: skip
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if clip_position not in CLIP_POSITIONS:
            raise ValueError(f"`clip_position` must be one of {list(CLIP_POSITIONS)}, got {clip_position!r}.")
        check_num_channels(num_channels)
        self.num_frames, self.frame_stride, self.height, self.width = num_frames, frame_stride, height, width
        self.clip_position = clip_position
        self.random_crop, self.random_flip = random_crop, random_flip
        self.num_channels = num_channels
        self.pixel_range = tuple(float(v) for v in pixel_range)

    def __call__(self, video: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        def randint(high: int) -> int:
            return int(torch.randint(high, (1,), generator=generator).item()) if high > 1 else 0

        start = self.clip_position
        if start == "random":
            start = lambda total, span: randint(total - span + 1)  # noqa: E731
        try:
            frames = read_clip(video, self.num_frames, self.frame_stride, start)
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"Could not read a clip from the video {describe_source(video)}: {error}") from error
        clip = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)  # (F, 3, H, W) in [0, 1]
        clip = self.resize_and_crop(clip, randint)
        if self.random_flip and randint(2) == 1:
            clip = clip.flip(-1)
        if self.num_channels == 1:
            clip = (clip * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        return from_unit_range(clip.clamp(0, 1), self.pixel_range).permute(1, 0, 2, 3).contiguous()

    def resize_and_crop(self, clip: torch.Tensor, randint) -> torch.Tensor:
        """Resize `(F, C, H, W)` frames to cover `height x width` (aspect kept), then crop to exactly that."""
        height, width = clip.shape[-2:]
        scale = max(self.height / height, self.width / width)
        size = (max(self.height, round(height * scale)), max(self.width, round(width * scale)))
        if size != (height, width):
            clip = F.interpolate(clip, size=size, mode="bilinear", antialias=True, align_corners=False)
        spare_h, spare_w = size[0] - self.height, size[1] - self.width
        if self.random_crop:
            top, left = randint(spare_h + 1), randint(spare_w + 1)
        else:
            top, left = spare_h // 2, spare_w // 2
        return clip[..., top : top + self.height, left : left + self.width]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_frames={self.num_frames}, frame_stride={self.frame_stride}, height="
            f"{self.height}, width={self.width}, clip_position={self.clip_position!r}, random_crop={self.random_crop}, "
            f"random_flip={self.random_flip}, num_channels={self.num_channels}, pixel_range={self.pixel_range})"
        )


class VideoExamples(ImageExamples):
    """Dict examples ("pixel_values" `(C, F, H, W)` + "class_labels" or "caption") over a video dataset.

    The same seeded, resumable augmentation as `ImageExamples` (random clip positions, crops and flips are drawn
    from a generator seeded by `(seed, epoch, index)`).

    Args:
        dataset: From `load_video_dataset`.
        transform: A `VideoClipTransform`.
        video_column: Column of the videos.
        label_column / caption_column: At most one condition column.
        seed: Seeds the augmentation.
    """

    def __init__(self, dataset, transform: VideoClipTransform, video_column: str, label_column: str | None = None,
                 caption_column: str | None = None, seed: int = 0):  # fmt: skip
        super().__init__(dataset, transform, video_column, label_column, caption_column, seed)
        self.video_column = video_column
