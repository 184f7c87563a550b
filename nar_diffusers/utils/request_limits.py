"""Bounds on what one request to a server (the app, an HTTP server) may make it read or allocate.

Every check reads sizes only: a file's size from the file system, an image's width and height from its header (PIL
opens lazily), a video's frame size from its container's metadata. So a request is refused before anything is
decoded, resized or generated. A refusal is a `ValueError` naming the limit and its allowed range, and never a server
path (uploads are named by their file name only).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

LIMIT_FLAGS = {
    "max_upload_bytes": "--max-upload-bytes",
    "max_pixels": "--max-pixels",
    "max_frames": "--max-frames",
    "max_images": "--max-images",
}
"""The command-line flag of each limit (`add_limit_arguments`), named in the messages of a refusal."""


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for.

    Args:
        max_upload_bytes: bytes of one uploaded file (an image, a layer, a video).
        max_pixels: width x height of one uploaded image or video frame (4096 x 4096 by default).
        max_frames: frames a video request may read from an uploaded video.
        max_images: images one request may generate, or upload (an image and its mask layers).
    """

    max_upload_bytes: int = 64 * 2**20
    max_pixels: int = 4096 * 4096
    max_frames: int = 256
    max_images: int = 8

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{field.name}` must be an int >= 1 ({_flag(field.name)}), got {value!r}.")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RequestLimits:
        """The limits given by the flags of `add_limit_arguments`."""
        return cls(**{name: getattr(args, name) for name in LIMIT_FLAGS})

    # --- counts -------------------------------------------------------------------------------------------------

    def check_images(self, count: int, what: str = "images") -> int:
        """`count` images in one request: 1 to `max_images`."""
        return _check_range(count, 1, self.max_images, what, "max_images")

    def check_frames(self, count: int, model_frames: int | None = None, what: str = "frames") -> int:
        """`count` frames read from an uploaded video: 1 to `max_frames` (and to the model's frames, when given)."""
        if model_frames is not None and self.max_frames > model_frames:
            return _check_range(count, 1, model_frames, what, "the model's frames per clip")
        return _check_range(count, 1, self.max_frames, what, "max_frames")

    def check_pixels(self, width: int, height: int, what: str = "the image") -> None:
        """An image or frame of `width` x `height` pixels: at most `max_pixels`."""
        pixels = int(width) * int(height)
        if pixels > self.max_pixels:
            raise ValueError(
                f"{what} is {width}x{height} = {pixels} pixels; `max_pixels` allows 1 to {self.max_pixels} "
                f"({_flag('max_pixels')} raises it)."
            )

    def check_bytes(self, size: int, what: str = "the upload") -> None:
        """An upload of `size` bytes: at most `max_upload_bytes`."""
        if size > self.max_upload_bytes:
            raise ValueError(
                f"{what} is {size} bytes; `max_upload_bytes` allows 0 to {self.max_upload_bytes} "
                f"({_flag('max_upload_bytes')} raises it)."
            )

    # --- files --------------------------------------------------------------------------------------------------

    def check_file(self, source: Any, what: str = "the upload") -> None:
        """The size of an uploaded file (a path, or bytes in memory), without reading it."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.check_bytes(len(source), what)
            return
        try:
            size = os.path.getsize(source)
        except OSError:
            raise ValueError(f"{what} is missing on the server (it may have been removed): upload it again.") from None
        self.check_bytes(size, what)

    def check_image_file(self, source: Any, what: str | None = None) -> tuple[int, int]:
        """Check an uploaded image's bytes, then its width x height from its header only; return `(width, height)`.
        A file PIL cannot identify is refused as "not a readable image"."""
        what = what or f"the uploaded image {upload_name(source)}"
        self.check_file(source, what)
        opened = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source
        try:
            with warnings.catch_warnings():
                # PIL's own bomb check warns or raises past `Image.MAX_IMAGE_PIXELS`; ours below names the limit.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(opened) as image:  # reads the header, decodes nothing
                    width, height = image.size
        except Image.DecompressionBombError:
            raise ValueError(
                f"{what} has more pixels than PIL opens; `max_pixels` allows 1 to {self.max_pixels}."
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"{what} is not a readable image ({type(error).__name__}).") from None
        self.check_pixels(width, height, what)
        return width, height

    def check_video_file(self, path: str | os.PathLike, what: str | None = None) -> tuple[int, int, int]:
        """Check an uploaded video's bytes, then its frame size from the container's metadata (no frame decoded);
        return `(frames, width, height)`, `frames` 0 when the container does not say. Needs PyAV."""
        what = what or f"the uploaded video {upload_name(path)}"
        self.check_file(path, what)
        import av

        try:
            with av.open(os.fspath(path)) as container:
                if not container.streams.video:
                    raise ValueError(f"{what} is not a readable video: it holds no video stream.")
                stream = container.streams.video[0]
                frames, width, height = int(stream.frames or 0), stream.codec_context.width, stream.codec_context.height
        except av.error.FFmpegError as error:
            reason = getattr(error, "strerror", None) or type(error).__name__
            raise ValueError(f"{what} is not a readable video ({reason}).") from None
        if not width or not height:
            raise ValueError(f"{what} is not a readable video: its stream gives no frame size.")
        self.check_pixels(width, height, f"{what}: each frame")
        return frames, width, height


def add_limit_arguments(parser: argparse.ArgumentParser, defaults: RequestLimits | None = None) -> None:
    """The flags of the request limits (`--max-upload-bytes`, `--max-pixels`, `--max-frames`, `--max-images`)."""
    defaults = defaults or RequestLimits()
    helps = {
        "max_upload_bytes": "Largest uploaded file, in bytes",
        "max_pixels": "Largest uploaded image or video frame, in pixels (width x height)",
        "max_frames": "Most frames a video request may read from an uploaded video",
        "max_images": "Most images one request may generate or upload",
    }
    for name, flag in LIMIT_FLAGS.items():
        default = getattr(defaults, name)
        parser.add_argument(flag, type=int, default=default, dest=name, help=f"{helps[name]} (default {default}).")


def upload_name(source: Any) -> str:
    """How a message names an upload: its file name, never its folder on the server."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return repr(os.path.basename(os.fspath(source)))


def _flag(name: str) -> str:
    return LIMIT_FLAGS.get(name, name)


def _check_range(value: Any, low: int, high: int, what: str, limit: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int from {low} to {high}, got {value!r}.")
    if not low <= value <= high:
        label, hint = (f"`{limit}`", f" ({_flag(limit)} raises it)") if limit in LIMIT_FLAGS else (limit, "")
        raise ValueError(f"{what} is {value}; {label} allows {low} to {high}{hint}.")
    return value
