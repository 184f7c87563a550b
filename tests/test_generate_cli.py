"""`nar-diffusers generate` on saved pipeline folders (class and text models, scheduler choice, errors)."""

import pytest
from conftest import make_pipeline, make_text_pipeline
from PIL import Image

from nar_diffusers.commands.cli import main


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


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the pipeline folder is loaded: these errors must come first."""
    from nar_diffusers.pipelines.pipeline_nar import NARPipeline

    def fail(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the arguments were checked")

    monkeypatch.setattr(NARPipeline, "from_pretrained", fail)


def test_output_must_be_a_writable_image_file_checked_before_loading(nar_dir, tmp_path, capsys, no_loading):
    (tmp_path / "a_file").write_text("user data")
    (tmp_path / "a_folder.png").mkdir()
    for output, expected in (
        (tmp_path / "out.txt", ".png"),
        (tmp_path / "out", ".jpg"),
        (tmp_path / "out.xbm", ".webp"),
        (tmp_path / "a_folder.png", "existing directory"),
        (tmp_path / "a_file" / "sub" / "out.png", "is a file"),
    ):
        assert _generate(nar_dir, output, "--class-labels", "1") == 2
        (line,) = _error_lines(capsys)
        assert "--output" in line and expected in line
    assert (tmp_path / "a_file").read_text() == "user data" and not (tmp_path / "out.txt").exists()


@pytest.mark.parametrize("device, expected", [("banana", "not a torch device"), ("cuda:99", "not available")])
def test_device_must_be_valid_and_available_checked_before_loading(nar_dir, tmp_path, capsys, no_loading, device,
                                                                  expected):
    argv = ["generate", "--model", str(nar_dir), "--output", str(tmp_path / "x.png"), "--device", device]
    assert main([*argv, "--class-labels", "1"]) == 2
    (line,) = _error_lines(capsys)
    assert f"--device {device!r}" in line and expected in line and "cpu" in line


@pytest.mark.parametrize("scale", ["0", "-2", "17", "100000"])
def test_grid_scale_is_bounded(nar_dir, tmp_path, capsys, no_loading, scale):
    assert _generate(nar_dir, tmp_path / "x.png", "--class-labels", "1", "--grid-scale", scale) == 2
    (line,) = _error_lines(capsys)
    assert "--grid-scale must be an integer from 1 to 16" in line


def _broken_copy(nar_dir, tmp_path, break_it):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(nar_dir, folder)
    break_it(folder)
    return folder


@pytest.mark.parametrize(
    "break_it, named",
    [
        (lambda f: (f / "model_index.json").write_text("{not json"), "model_index.json"),
        (lambda f: (f / "model_index.json").write_text("[1, 2]"), "model_index.json"),
        (lambda f: (f / "transformer" / "diffusion_pytorch_model.safetensors").unlink(),
         "diffusion_pytorch_model.safetensors"),
        (lambda f: (f / "vqvae" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage"),
         "diffusion_pytorch_model.safetensors"),
        (lambda f: (f / "transformer" / "config.json").write_text("{"), "config.json"),
        (lambda f: __import__("shutil").rmtree(f / "vqvae"), "vqvae"),
    ],
    ids=["corrupt-index", "index-not-an-object", "missing-weights", "corrupt-weights", "corrupt-config",
         "missing-component"],
)
def test_broken_pipeline_folder_gives_one_line_naming_the_file(nar_dir, tmp_path, capsys, break_it, named):
    folder = _broken_copy(nar_dir, tmp_path, break_it)
    assert _generate(folder, tmp_path / "x.png", "--class-labels", "1") == 2
    (line,) = _error_lines(capsys)
    assert named in line
    assert not (tmp_path / "x.png").exists()


def test_pickled_weights_are_never_loaded(nar_dir, tmp_path, capsys, monkeypatch):
    import torch

    def swap_for_pickle(folder):
        weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        from safetensors.torch import load_file

        torch.save(load_file(weights), folder / "transformer" / "diffusion_pytorch_model.bin")
        weights.unlink()

    folder = _broken_copy(nar_dir, tmp_path, swap_for_pickle)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle checkpoint was loaded"))
    assert _generate(folder, tmp_path / "x.png", "--class-labels", "1") == 2
    (line,) = _error_lines(capsys)
    assert "diffusion_pytorch_model.safetensors" in line


@pytest.fixture(scope="module")
def named_dir(tmp_path_factory):
    """A class model with saved class names and saved sampling defaults (top-k 1: every draw is the argmax)."""
    from nar_diffusers import NARPipeline

    base = make_pipeline()
    names = {0: "zero", 1: "one", 2: "two", 3: "three", 7: "seven, lucky"}
    pipe = NARPipeline(
        transformer=base.transformer, vqvae=base.vqvae, scheduler=base.scheduler, id2label=names,
        sampling_defaults={"guidance_scale": 2.0, "top_k": 1},
    )
    path = tmp_path_factory.mktemp("named")
    pipe.save_pretrained(path)
    return path


def test_class_labels_are_names_or_ids_and_unknown_names_list_close_matches(named_dir, tmp_path, capsys):
    by_name, by_id = tmp_path / "name.png", tmp_path / "id.png"
    assert _generate(named_dir, by_name, "--class-labels", "lucky", "one", "3") == 0
    assert _generate(named_dir, by_id, "--class-labels", "7", "1", "3") == 0
    assert by_name.read_bytes() == by_id.read_bytes()
    assert _generate(named_dir, tmp_path / "x.png", "--class-labels", "thre") == 2
    (line,) = _error_lines(capsys)
    assert "--class-labels 'thre'" in line and "Close matches: ['three'" in line
    unnamed = tmp_path / "no-names"
    make_pipeline().save_pretrained(unnamed)
    assert _generate(unnamed, tmp_path / "y.png", "--class-labels", "cat") == 2
    assert "no class names" in _error_lines(capsys)[0]


def test_omitted_sampling_flags_take_the_saved_defaults_and_passed_ones_win(named_dir, tmp_path):
    """The folder saves top-k 1 (deterministic draws): seeds do not matter until --top-k 0 is passed."""
    outputs = {}
    for name, extra in {"a": ["--seed", "1"], "b": ["--seed", "2"], "c": ["--seed", "1", "--top-k", "0"],
                        "d": ["--seed", "2", "--top-k", "0"]}.items():  # fmt: skip
        outputs[name] = tmp_path / f"{name}.png"
        assert _generate(named_dir, outputs[name], "--class-labels", "1", "2", "--num_images_per_prompt", "3", *extra) == 0
    read = {name: path.read_bytes() for name, path in outputs.items()}
    assert read["a"] == read["b"] and read["c"] != read["d"]


def test_underscore_spellings_of_every_sub_command_flag():
    from nar_diffusers.commands.cli import build_parser

    parser = build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and "-" in flag[2:]:
                    assert "--" + flag[2:].replace("-", "_") in action.option_strings, flag
    args = parser.parse_args(["generate", "--model", "m", "--output", "o.png", "--class_labels", "1", "--top_k", "3"])
    assert (args.class_labels, args.top_k) == (["1"], 3)
    args = parser.parse_args(["convert-vq", "--checkpoint", "c", "--output_dir", "o"])
    assert args.output_dir == "o"



@pytest.mark.parametrize(
    "old, new, name",
    [("nar_diffusers.cli", "nar_diffusers.commands.cli", "main"),
     ("nar_diffusers.generate", "nar_diffusers.commands.generate", "check_model_folder"),
     ("nar_diffusers.app", "nar_diffusers.commands.app", "build_app"),
     ("nar_diffusers.benchmark", "nar_diffusers.commands.benchmark", "run_benchmark"),
     ("nar_diffusers.demo", "nar_diffusers.commands.demo", "run_demo"),
     ("nar_diffusers.demo_video", "nar_diffusers.commands.demo.video", "run_video_demo")],
)  # fmt: skip
def test_the_old_command_modules_still_import_and_warn(old, new, name, monkeypatch):
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(FutureWarning, match=f"`{old}` moved to `{new}`"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_python_dash_m_of_the_old_and_the_new_cli_module():
    import subprocess
    import sys

    for module in ("nar_diffusers.cli", "nar_diffusers.commands.cli"):
        result = subprocess.run([sys.executable, "-m", module, "sample", "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "--num-samples" in result.stdout, result.stderr[-2000:]
        assert ("FutureWarning" in result.stderr) == (module == "nar_diffusers.cli")


def test_a_hub_id_goes_to_from_pretrained_and_local_paths_keep_the_folder_checks(tmp_path, capsys, monkeypatch):
    import torch

    from nar_diffusers.pipelines.pipeline_nar import NARPipeline

    calls = []

    def fake_from_pretrained(model, **kwargs):
        calls.append((model, kwargs))
        raise OSError("offline in this test")

    looked_up = []
    monkeypatch.setattr(NARPipeline, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(  # the pipeline class a Hub id names comes from its model_index.json (no network here)
        "nar_diffusers.commands.generate.nar_pipeline_class",
        lambda model, **kwargs: looked_up.append((model, kwargs)) or NARPipeline,
    )
    assert _generate("someone/nar-l-c2i", tmp_path / "x.png", "--class-labels", "1", "--revision", "v1") == 2
    assert looked_up == [("someone/nar-l-c2i", {"revision": "v1"})]
    ((model, kwargs),) = calls
    assert model == "someone/nar-l-c2i" and kwargs["revision"] == "v1" and kwargs["use_safetensors"] is True
    assert kwargs["dtype"] == torch.float32 and "torch_dtype" not in kwargs
    (line,) = _error_lines(capsys)
    assert "not a local folder, and loading it as a Hub model id failed: offline in this test" in line
    for local in (str(tmp_path / "missing"), "./missing", "a/b/c"):  # paths: checked locally, never sent to the Hub
        assert _generate(local, tmp_path / "x.png", "--class-labels", "1") == 2
        assert "not a pipeline folder" in _error_lines(capsys)[0]
    assert len(calls) == 1


def test_dtype_keyword_follows_the_installed_diffusers(monkeypatch):
    import diffusers
    import torch

    from nar_diffusers.utils.dtypes import dtype_kwargs

    assert dtype_kwargs(torch.bfloat16) == {"dtype": torch.bfloat16} and dtype_kwargs(None) == {}
    monkeypatch.setattr(diffusers, "__version__", "0.35.2")  # before `dtype=` existed
    assert dtype_kwargs(torch.bfloat16) == {"torch_dtype": torch.bfloat16}
