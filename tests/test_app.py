"""`nar-diffusers app`: the Gradio app starts on 127.0.0.1 and answers generation requests over HTTP (gradio_client),
streaming one preview per forward pass."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import make_pipeline, make_text_pipeline, make_video_pipeline
from nar_diffusers.commands import cli

TIMEOUT = 120  # seconds for one request; the tiny models answer in well under one


@pytest.fixture(scope="module")
def gradio_env(tmp_path_factory):
    """Gradio and its client (skipped when the `[app]` extra is missing), analytics off, files in a temp folder."""
    saved = {key: os.environ.get(key) for key in ("GRADIO_ANALYTICS_ENABLED", "GRADIO_TEMP_DIR")}
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_client")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def serve(pipe, tmp_path_factory, name, with_models=False):
    """Save `pipe`, load the folder as the app does, and start the app on 127.0.0.1 at a free port."""
    from nar_diffusers.commands.app import AppModels, build_app, launch_app, load_app_pipeline

    folder = tmp_path_factory.mktemp("models") / name
    pipe.save_pretrained(folder)
    models = AppModels(load_app_pipeline(str(folder), device="cpu"), name=name)
    demo = build_app(models)
    url = launch_app(demo, host="127.0.0.1", port=0, block=False)
    assert url.startswith("http://127.0.0.1:")
    return (demo, url, models) if with_models else (demo, url)


@pytest.fixture(scope="module")
def image_server(gradio_env, tmp_path_factory):
    """The tiny image model's app: its client and its `AppModels` (whose `limits` a test may replace)."""
    pipe = make_pipeline()
    pipe.set_sampling_defaults(guidance_scale=2.0, top_k=5)
    demo, url, models = serve(pipe, tmp_path_factory, "tiny-image", with_models=True)
    from gradio_client import Client

    yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads"))), models
    demo.close()


@pytest.fixture(scope="module")
def image_app(image_server):
    return image_server[0]


@pytest.fixture(scope="module")
def video_server(gradio_env, tmp_path_factory):
    demo, url, models = serve(make_video_pipeline(), tmp_path_factory, "tiny-video-limits", with_models=True)
    from gradio_client import Client

    yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads"))), models
    demo.close()


# class, guidance, cfg interval, temperature, top-k, top-p, seed, greedy
SETTINGS = (3, 2.0, -1, 1.0, 5, 1.0, 0, False)


def test_the_app_answers_a_generation_request_with_an_image_of_the_models_size(image_app):
    image, status = image_app.submit(*SETTINGS, 1, api_name="/generate").result(timeout=TIMEOUT)
    assert Image.open(image).size == (8, 8)  # 4x4 tokens x VQ factor 2
    assert "7 forward passes" in status
    grid, _ = image_app.submit(*SETTINGS, 3, api_name="/generate").result(timeout=TIMEOUT)
    assert Image.open(grid).size == (3 * 9 + 1, 8 + 2)  # three images in a row, 1 px apart


def test_the_app_streams_one_preview_per_forward_pass(image_app):
    job = image_app.submit(*SETTINGS, 1, api_name="/generate")
    job.result(timeout=TIMEOUT)
    outputs = job.outputs()
    assert len(outputs) == 7 + 1  # a preview after each of the 7 passes, then the result
    first = np.asarray(Image.open(outputs[0][0]).convert("L"))
    assert outputs[0][1].startswith("Forward pass 1 / 7")
    assert (first == 128).sum() == 8 * 8 - 2 * 2  # only the origin token (2x2 pixels) is drawn after the first pass


def test_the_inpaint_endpoint_keeps_tokens_and_regenerates_a_region(image_app, tmp_path):
    from gradio_client import handle_file

    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "source.png")
    editor = {"background": handle_file(str(tmp_path / "source.png")), "layers": [], "composite": None}
    before, after, status = image_app.submit(editor, "bottom half", *SETTINGS, api_name="/inpaint").result(
        timeout=TIMEOUT
    )
    assert Image.open(before).size == Image.open(after).size == (8, 8)
    assert "7 forward passes" in status
    kept = np.asarray(Image.open(before).convert("L"))
    assert (kept[4:] == 128).all() and not (kept[:4] == 128).all()  # the regenerated half is gray


def test_the_video_tab_streams_frames_and_returns_a_clip(gradio_env, tmp_path_factory):
    from gradio_client import Client

    demo, url = serve(make_video_pipeline(), tmp_path_factory, "tiny-video")
    try:
        client = Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
        assert list(client.view_api(return_format="dict")["named_endpoints"]) == ["/generate_video"]
        strip, gif, status = client.submit(*SETTINGS, None, 0, api_name="/generate_video").result(timeout=TIMEOUT)
    finally:
        demo.close()
    assert Image.open(strip).size == (2 * 9 + 1, 8 + 2)  # two frames side by side
    clip = Image.open(gif)
    assert clip.n_frames == 2 and clip.size == (8, 8)
    assert "8 forward passes" in status  # 2 + 4 + 4 - 2


def test_a_text_model_takes_a_prompt_and_an_empty_prompt_is_a_clear_error(gradio_env, tmp_path_factory):
    from gradio_client import Client

    demo, url = serve(make_text_pipeline(), tmp_path_factory, "tiny-text")
    try:
        client = Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
        image, _ = client.submit("a red fox in the snow", "", *SETTINGS[1:], 1, api_name="/generate").result(
            timeout=TIMEOUT
        )
        assert Image.open(image).size == (8, 8)
        with pytest.raises(Exception, match="Write a prompt"):
            client.submit("", "", *SETTINGS[1:], 1, api_name="/generate").result(timeout=TIMEOUT)
    finally:
        demo.close()


def test_the_app_command_is_registered_and_serves_on_localhost_by_default():
    args = cli.build_parser().parse_args(["app", "--model", "some-folder"])
    assert (args.host, args.port, args.preview_every) == ("127.0.0.1", 0, 1)


def test_the_app_command_names_the_extra_to_install_without_gradio(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    assert cli.main(["app", "--model", "some-folder"]) == 2
    assert 'pip install "nar-diffusers[app]"' in capsys.readouterr().err


def test_the_app_command_refuses_a_folder_without_a_pipeline(gradio_env, tmp_path, capsys):
    assert cli.main(["app", "--model", str(tmp_path)]) == 2
    assert "model_index.json" in capsys.readouterr().err


# --- request limits, uploads and errors (issue 20) ---------------------------------------------------------------


def png_header(path, width, height):
    """A PNG whose header says `width` x `height` but whose pixel data is garbage: opening it reads the size,
    decoding it fails. A check that answers with the pixel limit has read only the header."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b""))
    return path


def garbage_mp4(path):
    """An MP4 that has the boxes of one (`ftyp`, an empty `moov`) and no stream: PyAV opens it, with no video."""
    import struct

    def box(kind, payload=b""):
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    path.write_bytes(box(b"ftyp", b"isom\x00\x00\x02\x00isomiso2mp41") + box(b"moov"))
    return path


def tiny_mp4(path, frames=3):
    from nar_diffusers.utils.video_utils import write_video

    return write_video([np.full((16, 16, 3), 40 * i, np.uint8) for i in range(frames)], path, fps=4)


def uploads_named(name):
    """Files called `name` anywhere under Gradio's upload folder."""
    from pathlib import Path

    return list(Path(os.environ["GRADIO_TEMP_DIR"]).rglob(name))


def editor_of(path):
    from gradio_client import handle_file

    return {"background": handle_file(str(path)), "layers": [], "composite": None}


def test_a_video_request_over_the_frame_limit_is_refused_before_any_frame_is_decoded(
    video_server, tmp_path, monkeypatch
):
    from gradio_client import handle_file

    from nar_diffusers.commands.app import handlers
    from nar_diffusers.utils.request_limits import RequestLimits

    client, models = video_server
    decoded = []
    monkeypatch.setattr(handlers, "read_first_frames", lambda *args: decoded.append(args) or 1 / 0)
    video = tiny_mp4(tmp_path / "frames-limit.mp4")
    with pytest.raises(Exception, match=r"Frames to keep is 1000000; the model's frames per clip allows 1 to 2"):
        client.submit(*SETTINGS, handle_file(video), 10**6, api_name="/generate_video").result(timeout=TIMEOUT)
    monkeypatch.setattr(models, "limits", RequestLimits(max_frames=1))
    with pytest.raises(Exception, match=r"`max_frames` allows 1 to 1 \(--max-frames raises it\)"):
        client.submit(*SETTINGS, handle_file(video), 2, api_name="/generate_video").result(timeout=TIMEOUT)
    assert decoded == []
    assert uploads_named("frames-limit.mp4") == []


def test_a_video_continuation_within_the_limits_keeps_the_uploaded_frames(video_server, tmp_path):
    from gradio_client import handle_file

    client, _ = video_server
    video = tiny_mp4(tmp_path / "continue-me.mp4")
    strip, gif, status = client.submit(*SETTINGS, handle_file(video), 1, api_name="/generate_video").result(
        timeout=TIMEOUT
    )
    assert Image.open(gif).n_frames == 2 and "forward passes" in status
    assert uploads_named("continue-me.mp4") == []


def test_an_image_of_too_many_pixels_is_refused_from_its_header(image_app, tmp_path):
    from nar_diffusers.utils.request_limits import RequestLimits

    bomb = png_header(tmp_path / "bomb.png", 12000, 12000)  # 140 bytes that would decode to 432 MB
    with pytest.raises(ValueError, match=r"12000x12000 = 144000000 pixels; `max_pixels` allows 1 to 16777216"):
        RequestLimits().check_image_file(bomb)
    with pytest.raises(Exception, match=r"12000x12000 = 144000000 pixels; `max_pixels` allows 1 to 16777216"):
        image_app.submit(editor_of(bomb), "bottom half", *SETTINGS, api_name="/inpaint").result(timeout=TIMEOUT)
    assert uploads_named("bomb.png") == []


def test_an_upload_over_the_byte_limit_and_too_many_images_are_refused(image_server, tmp_path, monkeypatch):
    from nar_diffusers.utils.request_limits import RequestLimits

    client, models = image_server
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "heavy.png")
    monkeypatch.setattr(models, "limits", RequestLimits(max_upload_bytes=10))
    with pytest.raises(Exception, match=r"bytes; `max_upload_bytes` allows 0 to 10 \(--max-upload-bytes raises it\)"):
        client.submit(editor_of(tmp_path / "heavy.png"), "bottom half", *SETTINGS, api_name="/inpaint").result(
            timeout=TIMEOUT
        )
    monkeypatch.setattr(models, "limits", RequestLimits(max_images=2))
    with pytest.raises(Exception, match=r"Images is 3; `max_images` allows 1 to 2 \(--max-images raises it\)"):
        client.submit(*SETTINGS, 3, api_name="/generate").result(timeout=TIMEOUT)


def test_upload_temp_files_are_removed_after_a_request(image_app, tmp_path):
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "kept-upload.png")
    before, after, _ = image_app.submit(editor_of(tmp_path / "kept-upload.png"), "bottom half", *SETTINGS,
                                        api_name="/inpaint").result(timeout=TIMEOUT)  # fmt: skip
    assert Image.open(after).size == (8, 8)
    assert uploads_named("kept-upload.png") == []
    png_header(tmp_path / "refused-upload.png", 9000, 9000)
    with pytest.raises(Exception, match="max_pixels"):
        image_app.submit(editor_of(tmp_path / "refused-upload.png"), "bottom half", *SETTINGS,
                         api_name="/inpaint").result(timeout=TIMEOUT)  # fmt: skip
    assert uploads_named("refused-upload.png") == []


def test_uploads_outside_gradios_folder_are_never_removed(tmp_path):
    from nar_diffusers.commands.app.handlers import remove_uploads

    mine = tmp_path / "mine.png"
    mine.write_bytes(b"not an upload")
    remove_uploads([str(mine)])
    assert mine.exists()


def test_errors_shown_to_a_client_name_no_server_path(video_server, tmp_path):
    import tempfile

    from gradio_client import handle_file

    from nar_diffusers.commands.app.handlers import client_error, client_message

    client, _ = video_server
    with pytest.raises(Exception) as refused:
        client.submit(*SETTINGS, handle_file(garbage_mp4(tmp_path / "clip.mp4")), 1, api_name="/generate_video").result(
            timeout=TIMEOUT
        )
    message = str(refused.value)
    assert "clip.mp4" in message
    for folder in (os.getcwd(), tempfile.gettempdir(), os.environ["GRADIO_TEMP_DIR"], str(tmp_path)):
        assert folder not in message
    inside = os.path.join(os.getcwd(), "secret", "weights.safetensors")
    assert client_message(ValueError(f"cannot read {inside!r} nor {tmp_path}/a b.png")) == (
        "cannot read 'weights.safetensors' nor a b.png"
    )
    import gradio as gr

    shown = client_error(gr, RuntimeError(f"failed at {inside}"))
    assert isinstance(shown, gr.Error) and shown.message == "RuntimeError: failed at weights.safetensors"


def test_a_garbage_mp4_is_a_clear_error(video_server, tmp_path):
    from gradio_client import handle_file

    from nar_diffusers.utils.request_limits import RequestLimits

    garbage = garbage_mp4(tmp_path / "garbage.mp4")
    with pytest.raises(ValueError, match=r"'garbage.mp4' is not a readable video: it holds no video stream"):
        RequestLimits().check_video_file(garbage)
    (tmp_path / "noise.mp4").write_bytes(os.urandom(2048))
    with pytest.raises(ValueError, match=r"'noise.mp4' is not a readable video"):
        RequestLimits().check_video_file(tmp_path / "noise.mp4")
    client, _ = video_server
    with pytest.raises(Exception, match="is not a readable video"):
        client.submit(*SETTINGS, handle_file(garbage), 1, api_name="/generate_video").result(timeout=TIMEOUT)


def test_request_limits_refuse_bad_values_naming_the_field_and_are_flags_of_the_app(gradio_env, tmp_path, capsys):
    from nar_diffusers.utils.request_limits import RequestLimits

    with pytest.raises(ValueError, match=r"`max_frames` must be an int >= 1 \(--max-frames\), got 0"):
        RequestLimits(max_frames=0)
    args = cli.build_parser().parse_args(["app", "--model", "m", "--max-pixels", "100", "--max-images", "2"])
    assert RequestLimits.from_args(args) == RequestLimits(max_pixels=100, max_images=2)
    assert cli.main(["app", "--model", str(tmp_path), "--max-upload-bytes", "-1"]) == 2
    assert "`max_upload_bytes` must be an int >= 1" in capsys.readouterr().err


def test_a_port_in_use_is_one_line_and_exit_2(gradio_env, capsys):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["app", "--model", "some-folder", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--port {port} on 127.0.0.1 is already in use" in err
