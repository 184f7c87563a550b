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


def serve(pipe, tmp_path_factory, name):
    """Save `pipe`, load the folder as the app does, and start the app on 127.0.0.1 at a free port."""
    from nar_diffusers.commands.app import AppModels, build_app, launch_app, load_app_pipeline

    folder = tmp_path_factory.mktemp("models") / name
    pipe.save_pretrained(folder)
    models = AppModels(load_app_pipeline(str(folder), device="cpu"), name=name)
    demo = build_app(models)
    url = launch_app(demo, host="127.0.0.1", port=0, block=False)
    assert url.startswith("http://127.0.0.1:")
    return demo, url


@pytest.fixture(scope="module")
def image_app(gradio_env, tmp_path_factory):
    pipe = make_pipeline()
    pipe.set_sampling_defaults(guidance_scale=2.0, top_k=5)
    demo, url = serve(pipe, tmp_path_factory, "tiny-image")
    from gradio_client import Client

    yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
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
