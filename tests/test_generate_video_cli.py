"""`nar-diffusers generate` with a NARVideoPipeline folder: MP4 or GIF by extension, tiled clips, clear errors."""

import pytest
from conftest import make_pipeline, make_video_pipeline
from PIL import Image

from nar_diffusers.commands.cli import main
from nar_diffusers.utils.video_utils import count_frames, read_clip


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("video")
    make_video_pipeline(grid_size=(3, 4, 4)).save_pretrained(path)
    return path


def _generate(model, output, *extra: str) -> int:
    return main(["generate", "--model", str(model), "--output", str(output), "--device", "cpu", *extra])


def test_gif_and_mp4_are_written_tiled_one_row_per_label_and_seeded(video_model, tmp_path, capsys):
    gif = tmp_path / "clips.gif"
    extra = ["--class-labels", "1", "7", "--num-videos-per-prompt", "3", "--grid-scale", "2", "--fps", "4"]
    assert _generate(video_model, gif, *extra) == 0
    assert "Wrote 6 video(s) of 3 frames" in capsys.readouterr().out
    with Image.open(gif) as image:
        assert image.n_frames == 3 and image.size == (3 * 16, 2 * 16)  # 3 columns x 2 rows of 8 px x 2
    again = tmp_path / "again.gif"
    assert _generate(video_model, again, *extra) == 0 and again.read_bytes() == gif.read_bytes()

    mp4 = tmp_path / "nested" / "clip.mp4"
    assert _generate(video_model, mp4, "--class-labels", "2", "--num-frames", "2") == 0
    assert count_frames(mp4) == 2 and read_clip(mp4, 1).shape == (1, 8, 8, 3)
    assert not [p for p in mp4.parent.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize(
    "output, extra, message",
    [
        ("x.png", [], "must end with .mp4 or .gif"),
        ("x.gif", ["--num-frames", "4"], "`num_frames` 4 is larger than the model's grid"),
        ("x.gif", ["--height", "7"], "`height`"),
        ("x.gif", ["--fps", "0"], "--fps"),
    ],
)
def test_video_errors_are_one_line_naming_the_flag(video_model, tmp_path, capsys, output, extra, message):
    assert _generate(video_model, tmp_path / output, "--class-labels", "1", *extra) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err
    assert not (tmp_path / output).exists()


def test_image_pipelines_refuse_video_outputs_and_frames(tmp_path, capsys):
    folder = tmp_path / "image"
    make_pipeline().save_pretrained(folder)
    assert _generate(folder, tmp_path / "x.mp4", "--class-labels", "1") == 2
    assert "generates images" in capsys.readouterr().err
    assert _generate(folder, tmp_path / "x.png", "--class-labels", "1", "--num-frames", "2") == 2
    assert "--num-frames is for video pipelines" in capsys.readouterr().err
    assert _generate(folder, tmp_path / "still.gif", "--class-labels", "1") == 0  # a GIF is an image format too


@pytest.mark.parametrize("fps", ["inf", "1e-9", "nan", "241"])
def test_fps_out_of_range_is_refused(video_model, tmp_path, capsys, fps):
    assert _generate(video_model, tmp_path / "x.gif", "--class-labels", "1", "--fps", fps) == 2
    err = capsys.readouterr().err
    assert "--fps must be a number from 0.1 to 240" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.gif").exists()
