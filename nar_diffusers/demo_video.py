"""Deprecated: the video demo moved to `nar_diffusers.commands.demo.video` (`nar-diffusers demo --task video`)."""

from .commands import warn_moved
from .commands.demo.video import (  # noqa: F401
    QUICK_VIDEO_SETTINGS,
    VideoDemoSettings,
    centre_of_mass_x,
    clip_scores,
    digit_crops,
    fit_frame_classifier,
    moving_digit_clips,
    results_markdown,
    run_video_demo,
    train_frame_tokenizer,
    write_samples,
)
from .commands.demo.video import run_video_demo_command as run  # noqa: F401

warn_moved("nar_diffusers.demo_video", "nar_diffusers.commands.demo.video")
