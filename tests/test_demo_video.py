"""`nar-diffusers demo --task video` at reduced size: moving-digit clips, the judge, every stage, repeatability."""

import json
import os
from dataclasses import replace

import pytest
import torch
from PIL import Image

from nar_diffusers import NARVideoPipeline, NeighborScheduler, RasterScheduler
from nar_diffusers.commands.cli import build_parser, main
from nar_diffusers.commands.demo import settings_from_args, split_digits
from nar_diffusers.commands.demo.video import (
    QUICK_VIDEO_SETTINGS,
    VideoDemoSettings,
    centre_of_mass_x,
    clip_scores,
    digit_crops,
    fit_frame_classifier,
    moving_digit_clips,
    run_video_demo,
)

# Smaller still than --quick: the stages are what is tested here, not the sample quality.
TEST_SETTINGS = replace(QUICK_VIDEO_SETTINGS, vq_steps=3, steps=3, warmup_steps=1, samples_per_class=1)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def digits():
    return split_digits(16, seed=0)


def test_moving_digit_clips_slide_one_digit_at_a_constant_speed(digits):
    settings = VideoDemoSettings()
    clips, labels = moving_digit_clips(digits["train_images"][:50], digits["train_labels"][:50], settings, 3, seed=0)
    assert clips.shape == (150, 1, 4, 16, 32) and torch.equal(labels, digits["train_labels"][:50].repeat_interleave(3))
    assert clips.min() == -1 and clips.max() <= 1
    shifts = centre_of_mass_x(clips[:, 0]).diff(dim=1)
    torch.testing.assert_close(shifts.abs(), torch.full_like(shifts, 4.0), atol=1e-4, rtol=0)
    assert (torch.sign(shifts) == torch.sign(shifts[:, :1])).all()  # one direction per clip
    assert {int(s) for s in torch.sign(shifts[:, 0]).tolist()} == {-1, 1}  # both directions occur
    # Every frame holds the whole digit (the same ink), moved; the crop around its centre of mass is 16 x 16.
    ink = ((clips[:, 0] + 1) / 2).sum(dim=(-1, -2))  # (N, F)
    digit_ink = ((digits["train_images"][:50, 0] + 1) / 2).sum(dim=(-1, -2)).repeat_interleave(3)
    torch.testing.assert_close(ink, digit_ink[:, None].expand_as(ink), atol=1e-3, rtol=1e-5)
    assert digit_crops(clips[:, :, 0]).shape == (150, 1, 16, 16)


def test_the_judge_reads_real_frames_and_real_clips_move_smoothly(digits):
    settings = VideoDemoSettings()
    train, train_labels = moving_digit_clips(digits["train_images"], digits["train_labels"], settings, 1, seed=2)
    classifier = fit_frame_classifier(train, train_labels, seed=0)
    test, test_labels = moving_digit_clips(digits["test_images"], digits["test_labels"], settings, 1, seed=1)
    real = clip_scores(classifier, test, test_labels, settings.speed)
    assert real["frame_accuracy"] > 0.9 and real["smooth"] == 1.0 and abs(real["mean_speed"] - 4.0) < 1e-3
    wrong = clip_scores(classifier, test, (test_labels + 1) % 10, settings.speed)
    assert wrong["frame_accuracy"] < 0.1
    still = test[:, :, :1].expand(-1, -1, 4, -1, -1)  # a digit that does not move is not smooth motion
    assert clip_scores(classifier, still, test_labels, settings.speed)["smooth"] == 0.0


def test_video_demo_writes_pipelines_clips_and_results_and_repeats_with_the_same_seed(tmp_path):
    first = run_video_demo(str(tmp_path / "a"), TEST_SETTINGS, seed=3, device="cpu")
    folder = tmp_path / "a"
    for name in ("samples_strip.png", "samples_strip_raster.png", "samples.gif", "reconstructions.png",
                 "results.json", "results.md"):  # fmt: skip
        assert (folder / name).is_file(), name
    for architecture in ("nar", "raster"):
        for digit in range(10):
            assert (folder / "samples" / architecture / f"digit_{digit}.gif").is_file()
    with Image.open(folder / "samples" / "nar" / "digit_3.gif") as gif:
        assert gif.n_frames == 4
    assert (first["nar"]["forward_passes"], first["raster"]["forward_passes"]) == (14, 128)  # 4x4x8 tokens
    assert first["grid"] == [4, 4, 8] and first["batch"] == 10
    assert first["real"]["frame_accuracy"] > 0.9 and first["real"]["smooth"] == 1.0
    assert json.loads((folder / "results.json").read_text())["nar"]["frame_accuracy"] == first["nar"]["frame_accuracy"]
    table = (folder / "results.md").read_text()
    assert "| NAR (neighbor scheduler) | 14 |" in table and "| raster AR baseline | 128 |" in table

    nar = NARVideoPipeline.from_pretrained(folder / "pipeline")
    raster = NARVideoPipeline.from_pretrained(folder / "pipeline_raster")
    assert isinstance(nar.scheduler, NeighborScheduler) and isinstance(raster.scheduler, RasterScheduler)
    assert nar.transformer.config.num_decoding_heads == 3 and nar.default_video_size() == (4, 16, 32)

    second = run_video_demo(str(tmp_path / "b"), TEST_SETTINGS, seed=3, device="cpu")
    for name in ("samples_strip.png", "samples_strip_raster.png", "samples.gif"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert second["nar"]["frame_accuracy"] == first["nar"]["frame_accuracy"]


def test_cli_task_video_flags(tmp_path, capsys):
    argv = ["demo", "--task", "video", "--quick", "--steps", "2", "--vq-steps", "2", "--samples-per-class", "1",
            "--output-dir", str(tmp_path / "demo"), "--device", "cpu"]  # fmt: skip
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args, defaults=VideoDemoSettings(), quick=QUICK_VIDEO_SETTINGS)
    assert settings == replace(QUICK_VIDEO_SETTINGS, steps=2, vq_steps=2, samples_per_class=1)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "forward passes / clip" in out and "samples_strip.png" in out and "NARVideoPipeline" in out
    assert build_parser().parse_args(["demo"]).task == "image"


@pytest.mark.skipif(not os.environ.get("NAR_FULL_DEMO"), reason="the full demo takes minutes; set NAR_FULL_DEMO=1")
def test_full_video_demo_clips_are_recognisable_moving_digits(tmp_path):
    results = run_video_demo(str(tmp_path), VideoDemoSettings(), seed=0, device="cpu")
    assert results["nar"]["frame_accuracy"] >= 0.85 and results["nar"]["smooth"] >= 0.8
    assert results["nar"]["latency_ms"] < results["raster"]["latency_ms"]
    assert results["total_seconds"] < 600
