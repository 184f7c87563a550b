"""`nar-diffusers demo` at reduced size: every stage runs, results are written, the same seed repeats itself."""

import argparse
import json
import os
from dataclasses import replace

import pytest

from nar_diffusers import NARPipeline, NeighborScheduler, RasterScheduler
from nar_diffusers.commands.cli import build_parser, main
from nar_diffusers.commands.demo import (
    QUICK_SETTINGS,
    DemoSettings,
    add_arguments,
    classifier_accuracy,
    fit_digit_classifier,
    run_demo,
    settings_from_args,
    split_digits,
)

# Smaller still than --quick: the stages are what is tested here, not the sample quality.
TEST_SETTINGS = replace(QUICK_SETTINGS, vq_steps=4, steps=4, warmup_steps=1, samples_per_class=1)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_demo_writes_pipelines_samples_and_results_and_repeats_with_the_same_seed(tmp_path):
    first = run_demo(str(tmp_path / "a"), TEST_SETTINGS, seed=3, device="cpu")
    folder = tmp_path / "a"
    for name in ("samples.png", "samples_raster.png", "reconstructions.png", "results.json", "results.md"):
        assert (folder / name).is_file(), name
    assert (first["nar"]["forward_passes"], first["raster"]["forward_passes"]) == (15, 64)  # 8x8 tokens
    assert first["grid"] == [8, 8] and first["batch"] == 10
    assert first["real_heldout_accuracy"] > 0.9  # the judge itself recognises real digits
    assert json.loads((folder / "results.json").read_text())["nar"]["accuracy"] == first["nar"]["accuracy"]
    table = (folder / "results.md").read_text()
    assert "| NAR (neighbor scheduler) | 15 |" in table and "| raster AR baseline | 64 |" in table

    nar = NARPipeline.from_pretrained(folder / "pipeline")
    raster = NARPipeline.from_pretrained(folder / "pipeline_raster")
    assert isinstance(nar.scheduler, NeighborScheduler) and isinstance(raster.scheduler, RasterScheduler)
    assert nar.transformer.config.num_classes == 10 and nar.vqvae.config.in_channels == 1

    second = run_demo(str(tmp_path / "b"), TEST_SETTINGS, seed=3, device="cpu")
    for name in ("samples.png", "samples_raster.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert second["nar"]["accuracy"] == first["nar"]["accuracy"]
    assert second["vq_reconstruction_mse_heldout"] == first["vq_reconstruction_mse_heldout"]


def test_cli_demo_flags(tmp_path, capsys):
    args = build_parser().parse_args(["demo", "--quick", "--steps", "4", "--vq-steps", "3", "--samples-per-class", "1",
                                      "--output-dir", str(tmp_path / "demo"), "--device", "cpu"])  # fmt: skip
    assert settings_from_args(args) == replace(QUICK_SETTINGS, steps=4, vq_steps=3, samples_per_class=1)
    assert main(["demo", "--quick", "--steps", "4", "--vq-steps", "3", "--samples-per-class", "1",
                 "--output-dir", str(tmp_path / "demo"), "--device", "cpu"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "forward passes / image" in out and "samples.png" in out

    defaults = settings_from_args(add_arguments(argparse.ArgumentParser()).parse_args([]))
    assert defaults == DemoSettings() and defaults.model_size == "small"
    with pytest.raises(ValueError, match="--steps must be a positive integer"):
        settings_from_args(add_arguments(argparse.ArgumentParser()).parse_args(["--steps", "0"]))


def test_digit_classifier_judges_the_requested_class():
    data = split_digits(16, seed=0)
    assert data["train_images"].shape == (1500, 1, 16, 16) and data["test_images"].shape == (297, 1, 16, 16)
    classifier = fit_digit_classifier(data["train_images"], data["train_labels"], seed=0)
    assert classifier_accuracy(classifier, data["test_images"], data["test_labels"]) > 0.9
    wrong = (data["test_labels"] + 1) % 10
    assert classifier_accuracy(classifier, data["test_images"], wrong) < 0.1


@pytest.mark.skipif(not os.environ.get("NAR_FULL_DEMO"), reason="the full demo takes minutes; set NAR_FULL_DEMO=1")
def test_full_demo_samples_are_recognisable(tmp_path):
    results = run_demo(str(tmp_path), DemoSettings(), seed=0, device="cpu")
    assert results["nar"]["accuracy"] >= 0.9 and results["raster"]["accuracy"] >= 0.85
    assert results["nar"]["latency_ms"] < results["raster"]["latency_ms"]
    assert results["total_seconds"] < 600
