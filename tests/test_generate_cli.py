"""`nar-diffusers generate` on saved pipeline folders (class and text models, scheduler choice, errors)."""

import pytest
from conftest import make_pipeline, make_text_pipeline
from PIL import Image

from nar_diffusers.cli import main


@pytest.fixture(scope="module")
def nar_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("nar")
    make_pipeline().save_pretrained(path)
    return path


def _generate(model, output, *extra: str) -> int:
    return main(["generate", "--model", str(model), "--output", str(output), "--device", "cpu", *extra])


def test_class_grid_is_written_and_seeded(nar_dir, tmp_path):
    first, again, other = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    extra = ["--class-labels", "1", "7", "3", "--num-images-per-prompt", "2", "--guidance-scale", "2"]
    assert _generate(nar_dir, first, *extra, "--seed", "5") == 0
    assert Image.open(first).size == (2 * 8, 3 * 8)  # 4x4 tokens x 2 px; 2 columns, one row per label
    assert _generate(nar_dir, again, *extra, "--seed", "5") == 0
    assert _generate(nar_dir, other, *extra, "--seed", "6") == 0
    assert first.read_bytes() == again.read_bytes() and first.read_bytes() != other.read_bytes()

    single = tmp_path / "nested" / "one.png"
    assert _generate(nar_dir, single, "--class-labels", "4", "--grid-scale", "3", "--top-k", "5") == 0
    assert Image.open(single).size == (24, 24)


def test_scheduler_choice_must_fit_the_heads(nar_dir, tmp_path, capsys):
    assert _generate(nar_dir, tmp_path / "x.png", "--class-labels", "1", "--scheduler", "raster") == 2
    assert "use --scheduler neighbor" in capsys.readouterr().err
    raster_dir = tmp_path / "raster"
    make_pipeline(raster=True).save_pretrained(raster_dir)
    assert _generate(raster_dir, tmp_path / "r.png", "--class-labels", "1", "--scheduler", "raster") == 0
    assert _generate(raster_dir, tmp_path / "n.png", "--class-labels", "1", "--scheduler", "neighbor") == 2
    assert "use --scheduler raster" in capsys.readouterr().err


def test_bad_inputs_give_errors_not_tracebacks(nar_dir, tmp_path, capsys):
    assert _generate(nar_dir, tmp_path / "x.png", "--class-labels", "10") == 2
    assert "`class_labels` must be in [0, 9]" in capsys.readouterr().err
    assert _generate(nar_dir, tmp_path / "x.png", "--prompt", "a cat") == 2
    assert "class-conditional" in capsys.readouterr().err
    assert _generate(tmp_path, tmp_path / "x.png", "--class-labels", "1") == 2
    assert "not a pipeline folder" in capsys.readouterr().err


def test_text_model_from_prompts(tmp_path):
    folder = tmp_path / "t2i"
    make_text_pipeline().save_pretrained(folder)
    output = tmp_path / "fox.png"
    assert _generate(folder, output, "--prompt", "a red fox in the snow", "a photo of a cat") == 0
    assert Image.open(output).size == (8, 16)
