"""Saved pipelines travel like diffusers models: plain loading, sampling defaults, class names, model cards, push."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_pipeline
from huggingface_hub import ModelCard

from nar_diffusers import NARPipeline
from nar_diffusers.pipelines.pipeline_hub import BUILTIN_SAMPLING_DEFAULTS


def greedy_tokens(pipe, **kwargs):
    return pipe(class_labels=[1, 7], do_sample=False, output_type="latent", **kwargs).images


@pytest.fixture
def saved(tmp_path):
    pipe = make_pipeline()
    pipe.set_sampling_defaults(guidance_scale=3.0, top_k=5)
    pipe.register_to_config(id2label={0: "zero, nought", 1: "one", 7: "seven"})
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    return pipe, folder


def test_plain_diffusers_loads_the_folder_from_anywhere_without_importing_nar_diffusers(saved, tmp_path):
    pipe, folder = saved
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_nar", "NARPipeline"] and (folder / "pipeline_nar.py").is_file()
    # One source: the folder's module is the package's hub module, which the repository's pipelines/ links to.
    source = Path(__file__).parents[1] / "nar_diffusers" / "pipelines" / "hub_modules" / "pipeline_nar.py"
    assert (folder / "pipeline_nar.py").read_text() == source.read_text()
    assert (Path(__file__).parents[1] / "pipelines" / "pipeline_nar.py").resolve() == source.resolve()
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        tokens = pipe(class_labels=[1, 7], do_sample=False, output_type="latent").images
        print(type(pipe).__name__, tokens.flatten().tolist())
    """)
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    result = subprocess.run([sys.executable, "-c", script], cwd=other_dir, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    name, tokens = result.stdout.strip().splitlines()[-1].split(" ", 1)
    pipe.set_progress_bar_config(disable=True)
    assert name == "NARPipeline" and json.loads(tokens) == greedy_tokens(pipe).flatten().tolist()


def test_from_pretrained_of_the_class_never_runs_the_folders_module(saved, tmp_path):
    _, folder = saved
    marker = tmp_path / "ran"
    (folder / "pipeline_nar.py").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')\n")
    loaded = NARPipeline.from_pretrained(folder)
    assert type(loaded) is NARPipeline and not marker.exists()


def test_saved_sampling_defaults_are_used_when_omitted_and_explicit_arguments_win(saved):
    pipe, folder = saved
    loaded = NARPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.sampling_defaults == {**BUILTIN_SAMPLING_DEFAULTS, "guidance_scale": 3.0, "top_k": 5}

    def sampled(**kwargs):
        return loaded(class_labels=[1, 7], generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images

    assert torch.equal(sampled(), sampled(guidance_scale=3.0, top_k=5))
    assert not torch.equal(sampled(), sampled(guidance_scale=1.0, top_k=0))  # passed values win
    with pytest.raises(ValueError, match="Unknown `sampling_defaults`"):
        loaded.set_sampling_defaults(guidance=2.0)
    with pytest.raises(ValueError, match="top_k"):
        loaded.set_sampling_defaults(top_k=-1)


def test_loading_a_saved_pipeline_logs_no_type_warnings(saved):
    from diffusers.pipelines import pipeline_utils
    from diffusers.utils.testing_utils import CaptureLogger

    with CaptureLogger(pipeline_utils.logger) as captured:
        NARPipeline.from_pretrained(saved[1])
    assert "Expected types" not in captured.out


def test_class_names_travel_and_unknown_names_list_close_matches(saved):
    _, folder = saved
    loaded = NARPipeline.from_pretrained(folder)
    assert loaded.get_label_ids(["one", "nought", "zero"]) == [1, 0, 0]
    assert loaded.get_label_ids("seven") == [7]
    with pytest.raises(ValueError, match=r"'onee' is not a class name.*Close matches: \['one'"):
        loaded.get_label_ids("onee")
    with pytest.raises(ValueError, match="class ids up to 12"):
        NARPipeline(**{k: v for k, v in loaded.components.items()}, id2label={12: "twelve"})


def test_the_model_card_describes_the_model(saved):
    _, folder = saved
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "license: apache-2.0" in card and "library_name: diffusers" in card
    assert "arXiv:2503.10696" in card and "arXiv:2406.06525" in card  # NAR and LlamaGen
    assert "| `guidance_scale` | 3.0 |" in card and "| `top_k` | 5 |" in card
    assert 'DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)' in card
    assert "4 x 4" in card and "7 forward passes" in card


def test_push_to_hub_uploads_the_folder_with_its_card(saved, monkeypatch):
    pipe, _ = saved
    uploaded = {}

    def fake_upload_folder(repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        uploaded["card"] = (Path(folder_path) / "README.md").read_text()

    class Repo:
        repo_id = "me/tiny-nar"

    monkeypatch.setattr("diffusers.utils.hub_utils.upload_folder", fake_upload_folder)
    monkeypatch.setattr("diffusers.utils.hub_utils.create_repo", lambda *a, **k: Repo())
    monkeypatch.setattr("diffusers.utils.hub_utils.load_or_create_model_card", lambda *a, **k: ModelCard("generic"))
    pipe.push_to_hub("me/tiny-nar")
    assert uploaded["repo_id"] == "me/tiny-nar"
    assert {"model_index.json", "pipeline_nar.py", "README.md", "transformer/config.json"} <= set(uploaded["files"])
    assert "nar-diffusers" in uploaded["card"] and 'from_pretrained("me/tiny-nar", trust_remote_code=True)' in uploaded["card"]


def test_a_folder_whose_sampling_defaults_are_invalid_is_refused_when_it_loads(saved):
    _, folder = saved
    index = Path(folder) / "model_index.json"
    config = json.loads(index.read_text())
    config["sampling_defaults"] = {"guidance_scale": -5.0}
    index.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="guidance_scale"):
        NARPipeline.from_pretrained(folder)
