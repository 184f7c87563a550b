"""Video files and grids of clips: reading clips with PyAV, writing MP4 (PyAV, H.264) and GIF (PIL), tiling clips.

PyAV's wheels carry FFmpeg's libraries, so `pip install av` is all a machine needs to read MP4, AVI, MKV, WebM, MOV
and the other containers FFmpeg knows, from a path or from bytes in memory (e.g. a 🤗 `datasets` video column
loaded with `Video(decode=False)`), and to write H.264 MP4. GIFs are written with PIL exactly like
`diffusers.utils.export_to_gif`.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from .image_utils import image_grid

VIDEO_EXTENSIONS = (".mp4", ".gif")
"""Extensions `write_video` writes: H.264 MP4 and animated GIF."""

ClipStart = str | int | Callable[[int, int], int]


def _open_source(source: Any):
    """A path or file object PyAV can open, from a path, bytes, a file object, or a `{"path", "bytes"}` dict."""
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"Video file {os.fspath(source)!r} does not exist.")
        return os.fspath(source)
    if hasattr(source, "read"):
        source.seek(0)
        return source
    raise TypeError(
        f"A video must be a file path, bytes, a file object or a {{'path', 'bytes'}} dict, got {type(source).__name__}."
    )


def describe_source(source: Any) -> str:
    """A short name of a video source for messages (its path, or its size in bytes)."""
    if isinstance(source, dict):
        return str(source.get("path") or f"<{len(source.get('bytes') or b'')} bytes>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(source)


def _video_stream(container, source: Any):
    """The first video stream of an opened container; a ValueError naming the source when it has none."""
    if not container.streams.video:
        raise ValueError(f"The file {describe_source(source)} holds no video stream (not a readable video).")
    return container.streams.video[0]


def count_frames(source: Any) -> int:
    """Number of frames of the first video stream (from the container's metadata, else by counting packets)."""
    import av

    with av.open(_open_source(source)) as container:
        stream = _video_stream(container, source)
        if stream.frames > 0:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def clip_indices(total_frames: int, num_frames: int, frame_stride: int, start: ClipStart = "center") -> list[int]:
    """Frame indices of a clip of `num_frames` frames taken every `frame_stride` frames.

    Args:
        total_frames: frames in the video.
        start: "start" (the first frame), "center" (the clip's middle at the video's middle), an int, or a callable
            `f(total_frames, span) -> int` (e.g. a random start). Indices past the end repeat the last frame.
    """
    if num_frames < 1 or frame_stride < 1:
        raise ValueError(f"`num_frames` and `frame_stride` must be positive, got {num_frames} and {frame_stride}.")
    span = (num_frames - 1) * frame_stride + 1
    room = max(total_frames - span, 0)
    if start == "start":
        first = 0
    elif start == "center":
        first = room // 2
    elif callable(start):
        first = int(start(total_frames, span))
    elif isinstance(start, int) and not isinstance(start, bool):
        first = start
    else:
        raise ValueError(f"`start` must be 'start', 'center', an int or a callable, got {start!r}.")
    first = min(max(first, 0), room)
    return [min(first + i * frame_stride, max(total_frames - 1, 0)) for i in range(num_frames)]


def read_frames(source: Any, indices: Sequence[int]) -> np.ndarray:
    """Decode the frames at `indices` (in presentation order, repeats allowed) as RGB `uint8` `(F, H, W, 3)`.

    Decoding stops after the last requested frame. A video that ends early (metadata promising more frames than
    it holds) repeats its last decoded frame.
    """
    import av

    wanted = set(int(i) for i in indices)
    if not wanted or min(wanted) < 0:
        raise ValueError(f"`indices` must be non-negative frame indices, got {list(indices)}.")
    stop = max(wanted)
    found: dict[int, np.ndarray] = {}
    last = None
    try:
        with av.open(_open_source(source)) as container:
            stream = _video_stream(container, source)
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                last = frame
                if index in wanted:
                    found[index] = frame.to_ndarray(format="rgb24")
                if index >= stop:
                    break
    except av.error.FFmpegError as error:
        raise ValueError(f"Could not decode the video {describe_source(source)}: {error}") from error
    if last is None:
        raise ValueError(f"The video {describe_source(source)} holds no decodable frame.")
    tail = found[stop] if stop in found else last.to_ndarray(format="rgb24")  # the video ended early
    return np.stack([found.get(int(i), tail) for i in indices])


def read_clip(source: Any, num_frames: int, frame_stride: int = 1, start: ClipStart = "center") -> np.ndarray:
    """`num_frames` RGB frames `uint8 (F, H, W, 3)` taken every `frame_stride` frames (see `clip_indices`)."""
    total = count_frames(source)
    return read_frames(source, clip_indices(total, num_frames, frame_stride, start))


def _to_pil(frame: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(frame, Image.Image):
        return frame
    array = np.asarray(frame)
    if array.dtype != np.uint8:  # floats in [0, 1], as diffusers' "np" output
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


FPS_RANGE = (0.1, 240.0)
"""Frame rates a written video may have: from one frame every 10 s to beyond any display. Outside it, an MP4's
time base cannot hold the rate (1e-9 rounds to 0, which the encoder replaces by 24) and a GIF's frame duration
(whole milliseconds, shown in steps of 10 ms) rounds to 0."""


def check_fps(fps: object, name: str = "`fps`") -> float:
    """Return `fps` as a float, or raise a ValueError naming `name` (e.g. "--fps") unless it is a number in
    `FPS_RANGE`."""
    low, high = FPS_RANGE
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) or not low <= fps <= high:
        raise ValueError(f"{name} must be a number from {low:g} to {high:g} frames per second, got {fps!r}.")
    return float(fps)


def write_video(frames: Sequence[Image.Image | np.ndarray], path: str | os.PathLike, fps: float = 8) -> str:
    """Write frames (PIL images, or `(H, W, C)` arrays: uint8, or floats in [0, 1]) as an MP4 (H.264) or a GIF,
    chosen by the extension; atomically (a temporary file in the same folder renamed into place). Returns `path`.
    """
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lower()
    if extension not in VIDEO_EXTENSIONS:
        raise ValueError(f"A video path must end with one of {', '.join(VIDEO_EXTENSIONS)}, got {path!r}.")
    if not frames:
        raise ValueError("`frames` is empty: a video needs at least one frame.")
    fps = check_fps(fps)
    images = [_to_pil(frame).convert("RGB") for frame in frames]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(suffix=extension, prefix=".tmp-", dir=folder)
    os.close(handle)
    try:
        if extension == ".gif":
            images[0].save(
                tmp_path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
            )
        else:
            _write_mp4(images, tmp_path, fps)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return path


def _write_mp4(images: list[Image.Image], path: str, fps: float) -> None:
    import fractions

    import av

    width, height = images[0].size
    # yuv420p needs even sides: pad with black instead of resampling.
    padded = (width + width % 2, height + height % 2)
    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = padded
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for image in images:
            if image.size != (width, height):
                raise ValueError(f"All frames must have the same size, got {image.size} and {(width, height)}.")
            if padded != (width, height):
                canvas = Image.new("RGB", padded)
                canvas.paste(image)
                image = canvas
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_grid(videos: Sequence[Sequence[Image.Image]], rows: int, scale: int = 1, padding: int = 0) -> list[Image.Image]:
    """Tile clips of equal length and size into one clip: frame t is the `image_grid` of every clip's frame t."""
    if not videos or len({len(video) for video in videos}) != 1:
        raise ValueError("`videos` must be a non-empty list of clips with the same number of frames.")
    return [
        image_grid([video[t] for video in videos], rows, scale=scale, padding=padding) for t in range(len(videos[0]))
    ]


def video_strip(videos: Sequence[Sequence[Image.Image]], rows: int, scale: int = 1, padding: int = 2) -> Image.Image:
    """One still image of clips: each clip's frames left to right, clips laid out in `rows` rows."""
    if not videos or len(videos) % rows:
        raise ValueError(f"{len(videos)} clips do not fill {rows} rows.")
    frames = [frame for video in videos for frame in video]
    return image_grid(frames, rows, scale=scale, padding=padding)


def frames_to_tensor(video, num_channels: int, name: str = "video"):
    """Pipeline video inputs as a float tensor `(B, num_channels, F, H, W)` in [0, 1], without resizing.

    Accepted (diffusers' video conventions): a list of PIL frames (one video) or a list of such lists (a batch); a
    NumPy array `(F, H, W, C)` or `(B, F, H, W, C)`; a torch tensor `(F, C, H, W)` or `(B, F, C, H, W)`. Values and
    channels as `images_to_tensor` takes them. Raises a ValueError naming `name` otherwise.
    """
    import torch

    from .image_utils import images_to_tensor

    if isinstance(video, (list, tuple)) and video and all(isinstance(v, (list, tuple)) for v in video):
        clips = [images_to_tensor(list(v), num_channels, name) for v in video]
        if len({tuple(c.shape) for c in clips}) > 1:
            raise ValueError(f"`{name}`: every video of the batch must have the same number of frames and size.")
        return torch.stack(clips).permute(0, 2, 1, 3, 4).contiguous()
    if isinstance(video, (list, tuple)):
        return images_to_tensor(list(video), num_channels, name).permute(1, 0, 2, 3)[None].contiguous()
    if isinstance(video, (np.ndarray, torch.Tensor)):
        if video.ndim not in (4, 5):
            layout = "(F, H, W, C) or (B, F, H, W, C)"
            if isinstance(video, torch.Tensor):
                layout = "(F, C, H, W) or (B, F, C, H, W)"
            raise ValueError(f"`{name}` must have the shape {layout}, got {tuple(video.shape)}.")
        clips = video[None] if video.ndim == 4 else video
        batch, frames = clips.shape[:2]
        flat = clips.reshape(batch * frames, *clips.shape[2:])
        pixels = images_to_tensor(flat, num_channels, name)
        return pixels.view(batch, frames, *pixels.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()
    raise ValueError(
        f"`{name}` must be a list of PIL frames, a list of such lists, a NumPy array (F, H, W, C) / (B, F, H, W, C) "
        f"or a torch tensor (F, C, H, W) / (B, F, C, H, W), got {type(video).__name__}."
    )
