"""What every training script shares: diffusers' flag names (and the older aliases), `--report_to none`, the Hub
upload (mocked at the hub-client boundary: `huggingface_hub.create_repo` / `upload_folder`), the model card and the
saved sampling defaults and class names; images logged to trackers."""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SENTENCES, make_text_pipeline
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from nar_diffusers import NARPipeline
from nar_diffusers.training.tracking import log_images
from nar_diffusers.training.vq_training import build_vqmodel

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_nar", "train_vq", "train_lora_t2i")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO_ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


scripts = {name: _load_script(name) for name in SCRIPTS}


def parse(name: str, argv: list[str]):
    return scripts[name].parse_args(argv)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Two class folders of tiny images ("circle", "square"), a captioned folder, a VQ tokenizer (2x) and a tiny
    text pipeline."""
    root = tmp_path_factory.mktemp("scripts")
    rng = np.random.default_rng(0)
    for label in ("circle", "square"):
        (root / "classes" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "classes" / label / f"{i}.png")
    (root / "captions").mkdir()
    with open(root / "captions" / "metadata.jsonl", "w") as f:
        for i, sentence in enumerate(SENTENCES):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "captions" / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": sentence}) + "\n")
    torch.manual_seed(0)
    build_vqmodel((8, 16), 1, 8, 4, 32, 4, 3, 8, mid_block_add_attention=False).save_pretrained(root / "vq")
    make_text_pipeline().save_pretrained(root / "t2i")
    return {"classes": root / "classes", "captions": root / "captions", "vq": root / "vq", "t2i": root / "t2i",
            "cache": root / "cache"}  # fmt: skip


def tiny_job(name: str, data: dict[str, Path], output_dir: Path) -> list[str]:
    """A two-step run of the script with a checkpoint at step 1 (which the upload must leave out)."""
    common = ["--output_dir", str(output_dir), "--max_train_steps", "2", "--checkpointing_steps", "1",
              "--train_batch_size", "3", "--learning_rate", "1e-3", "--cache_dir", str(data["cache"])]  # fmt: skip
    if name == "train_nar":
        return [*common, "--train_data_dir", str(data["classes"]), "--vq_model_path", str(data["vq"]), "--resolution",
                "8", "--model_size", "tiny", "--validation_steps", "100", "--num_validation_images", "1",
                "--validation_guidance_scale", "2.5", "--validation_top_k", "7", "--validation_temperature", "0.9"]  # fmt: skip
    if name == "train_vq":
        return [*common, "--train_data_dir", str(data["classes"]), "--resolution", "8", "--block_out_channels", "8",
                "16", "--layers_per_block", "1", "--latent_channels", "8", "--vq_embed_dim", "4", "--num_vq_embeddings",
                "32", "--norm_num_groups", "4", "--num_validation_images", "2", "--no_mid_block_attention"]  # fmt: skip
    return [*common, "--pretrained_model_name_or_path", str(data["t2i"]), "--train_data_dir", str(data["captions"]),
            "--resolution", "8", "--rank", "2", "--validation_prompt", "a red fox", "--validation_steps", "2",
            "--num_validation_images", "1", "--validation_guidance_scale", "3.0"]  # fmt: skip


def run(name: str, argv: list[str]):
    if name == "train_lora_t2i":
        return scripts[name].main(argv)
    return scripts[name].main(parse(name, argv))


@pytest.fixture
def hub(monkeypatch):
    """`huggingface_hub.create_repo` / `upload_folder` replaced: record the calls and the files `upload_folder` would
    send (its own filtering of the folder by `ignore_patterns`)."""
    calls = {"create_repo": [], "upload_folder": []}

    def create_repo(repo_id, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})
        return SimpleNamespace(repo_id=f"me/{repo_id}" if "/" not in repo_id else repo_id)

    def upload_folder(*, repo_id, folder_path, ignore_patterns=None, **kwargs):
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        uploaded = list(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        card = (Path(folder_path) / "README.md").read_text()
        calls["upload_folder"].append({"repo_id": repo_id, "files": uploaded, "card": card, **kwargs})

    monkeypatch.setattr("huggingface_hub.create_repo", create_repo)
    monkeypatch.setattr("huggingface_hub.upload_folder", upload_folder)
    return calls


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_runs_with_report_to_none_and_pushes_its_folder_and_card(name, data, tmp_path, hub):
    output_dir = tmp_path / "out"
    run(name, [*tiny_job(name, data, output_dir), "--report_to", "none", "--push_to_hub", "--hub_model_id",
               "my-model", "--hub_token", "secret"])  # fmt: skip
    assert not (output_dir / "logs").exists()  # no tracker
    (created,) = hub["create_repo"]
    assert created["repo_id"] == "my-model" and created["token"] == "secret"
    (upload,) = hub["upload_folder"]
    assert upload["repo_id"] == "me/my-model" and upload["token"] == "secret"
    assert (output_dir / "checkpoint-1").is_dir()
    assert "README.md" in upload["files"] and not any("checkpoint-" in f for f in upload["files"])
    card = upload["card"]
    assert card == (output_dir / "README.md").read_text() and "me/my-model" in card and "2503.10696" in card
    if name == "train_nar":
        assert "model_index.json" in upload["files"] and "transformer/diffusion_pytorch_model.safetensors" in upload["files"]
        pipe = NARPipeline.from_pretrained(output_dir)
        # The validation settings became the sampling defaults, the folder names the class names.
        assert pipe.sampling_defaults == {"guidance_scale": 2.5, "cfg_interval": -1, "temperature": 0.9, "top_k": 7,
                                          "top_p": 1.0}  # fmt: skip
        assert pipe.get_label_ids(["square", "circle"]) == [1, 0]
        assert "train_nar.py" in card and "`classes`" in card and "| `top_k` | 7 |" in card
        assert "pipe.get_label_ids(['circle'])" in card
    elif name == "train_vq":
        assert {"config.json", "diffusion_pytorch_model.safetensors", "reconstructions.png"} <= set(upload["files"])
        assert "VQModel.from_pretrained(\"me/my-model\")" in card and "codebook of 32 entries" in card
    else:
        assert "pytorch_lora_weights.safetensors" in upload["files"]
        assert any(f.startswith("validation/") for f in upload["files"])
        assert f"base_model: {data['t2i']}" not in card  # a local folder is no Hub id: named in the text only
        assert f"Base model: `{data['t2i']}`" in card and 'pipe.load_lora_weights("me/my-model")' in card
        assert "guidance_scale=3.0" in card


def test_without_push_to_hub_nothing_is_uploaded_but_the_card_is_written(data, tmp_path, hub):
    output_dir = tmp_path / "out"
    run("train_vq", [*tiny_job("train_vq", data, output_dir), "--report_to", "none"])
    assert hub == {"create_repo": [], "upload_folder": []}
    card = (output_dir / "README.md").read_text()
    assert "path/to/this/folder" in card and "train_vq.py" in card and "license: apache-2.0" in card


def test_the_lora_card_names_a_hub_base_model_in_its_metadata():
    from nar_diffusers.utils.model_card import build_lora_model_card

    card = build_lora_model_card(base_model="someone/nar-xl-t2i", summary="s", rank=4, target_modules=["qkv"])
    assert card.data.base_model == "someone/nar-xl-t2i" and card.data.pipeline_tag == "text-to-image"


@pytest.mark.parametrize(
    "name, argv, expected",
    [
        ("train_nar", ["--pretrained_model_path", "base"], {"pretrained_model_name_or_path": "base"}),
        ("train_nar", ["--pretrained_model_name_or_path", "base", "--revision", "v1", "--variant", "fp16"],
         {"pretrained_model_name_or_path": "base", "revision": "v1", "variant": "fp16"}),
        ("train_nar", ["--validation_prompts", "a", "b"], {"validation_prompt": ["a", "b"]}),
        ("train_nar", ["--validation_prompt", "a", "--validation_prompt", "b"], {"validation_prompt": ["a", "b"]}),
        ("train_nar", [], {"center_crop": True}),
        ("train_nar", ["--random_crop"], {"center_crop": False}),
        ("train_nar", ["--weight_decay", "0.1", "--adam_epsilon", "1e-6"], {"adam_weight_decay": 0.1, "adam_epsilon": 1e-6}),
        ("train_vq", ["--vq_model_path", "vq"], {"pretrained_model_name_or_path": "vq"}),
        ("train_vq", ["--random_crop", "--num_train_epochs", "3", "--allow_tf32"],
         {"center_crop": False, "num_train_epochs": 3, "allow_tf32": True}),
        ("train_vq", ["--center_crop", "--tracker_project_name", "p"], {"center_crop": True, "tracker_project_name": "p"}),
        ("train_lora_t2i", [], {"center_crop": False, "tracker_project_name": "nar-lora-t2i"}),
        ("train_lora_t2i", ["--center_crop", "--validation_prompt", "a cat", "--num_train_epochs", "2"],
         {"center_crop": True, "validation_prompt": ["a cat"], "num_train_epochs": 2}),
        ("train_lora_t2i", ["--random_crop", "--allow_tf32", "--revision", "main"],
         {"center_crop": False, "allow_tf32": True, "revision": "main"}),
    ],
)  # fmt: skip
def test_diffusers_flag_names_and_their_aliases(name, argv, expected, tmp_path):
    required = {"train_nar": [], "train_vq": ["--train_data_dir", "x"],
                "train_lora_t2i": ["--pretrained_model_name_or_path", "p"]}[name]  # fmt: skip
    args = parse(name, [*required, "--output_dir", str(tmp_path), "--report_to", "none", *argv])
    assert {key: getattr(args, key) for key in expected} == expected


@pytest.mark.parametrize("name", SCRIPTS)
def test_flag_values_are_checked_up_front_naming_the_flag(name, tmp_path, capsys):
    required = {"train_nar": [], "train_vq": ["--train_data_dir", "x"],
                "train_lora_t2i": ["--pretrained_model_name_or_path", "p"]}[name]  # fmt: skip
    base = [*required, "--output_dir", str(tmp_path)]
    for bad, message in (
        (["--lr_scheduler", "cosine_typo"], "argument --lr_scheduler: invalid choice: 'cosine_typo' (choose from"),
        (["--report_to", "tensorbored"], "argument --report_to: invalid choice: 'tensorbored' (choose from 'none', "),
        (["--center_crop", "--random_crop"], "argument --random_crop: not allowed with argument --center_crop"),
    ):
        with pytest.raises(SystemExit):
            parse(name, [*base, *bad])
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="--num_train_epochs must be a positive integer"):
        parse(name, [*base, "--report_to", "none", "--num_train_epochs", "0"])


def test_the_tracker_must_be_installed_and_the_hub_token_never_goes_to_wandb(tmp_path, monkeypatch):
    import nar_diffusers.training.arguments as arguments

    base = ["--output_dir", str(tmp_path)]
    monkeypatch.setattr(arguments, "available_trackers", lambda: [])
    with pytest.raises(ValueError, match="--report_to tensorboard: the tensorboard package is not installed"):
        parse("train_nar", [*base, "--report_to", "tensorboard"])
    assert parse("train_nar", base).report_to == "none"  # the default falls back when tensorboard is missing
    monkeypatch.setattr(arguments, "available_trackers", lambda: ["tensorboard", "wandb"])
    for report_to in ("wandb", "all"):
        with pytest.raises(ValueError, match="--hub_token cannot be used with --report_to wandb"):
            parse("train_vq", [*base, "--train_data_dir", "x", "--report_to", report_to, "--hub_token", "t"])
    args = parse("train_lora_t2i", [*base, "--pretrained_model_name_or_path", "p", "--report_to", "wandb"])
    assert args.report_to == "wandb" and args.hub_token is None


def test_images_reach_every_tracker_that_takes_them(tmp_path):
    """TensorBoard gets an image summary; wandb-like trackers one key with all images; Aim-like one key per image;
    a tracker without `log_images` is skipped."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = [Image.new("RGB", (6, 4), (255, 0, 0)), Image.new("RGB", (6, 4), (0, 0, 255))]
    accelerator = Accelerator(log_with="tensorboard", project_config=ProjectConfiguration(tmp_path, tmp_path / "logs"))
    accelerator.init_trackers("run")
    log_images(accelerator, "samples", images, step=3)
    accelerator.end_training()
    (events,) = (tmp_path / "logs").rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent), size_guidance={"images": 0})
    accumulator.Reload()
    logged = accumulator.Images("samples")
    assert [(e.step, e.width, e.height) for e in logged] == [(3, 12, 4)]  # the two images side by side

    received = []

    class Tracker:
        def __init__(self, name, takes_images=True):
            self.name = name
            if takes_images:
                self.log_images = self.record

        def record(self, values, step):
            sizes = {key: len(value) if isinstance(value, list) else value.shape for key, value in values.items()}
            received.append((self.name, sizes, step))

    fake = SimpleNamespace(trackers=[Tracker("wandb"), Tracker("aim"), Tracker("mlflow", takes_images=False)])
    log_images(fake, "validation", images, step=5)
    assert received == [
        ("wandb", {"validation": 2}, 5), ("aim", {"validation/0": (4, 6, 3), "validation/1": (4, 6, 3)}, 5)
    ]


def test_num_train_epochs_sets_the_optimizer_steps():
    from nar_diffusers.training.arguments import steps_for_epochs

    args = SimpleNamespace(num_train_epochs=2, max_train_steps=99, gradient_accumulation_steps=2)
    assert steps_for_epochs(args, num_batches=5) == 6  # 3 optimizer steps per pass over 5 batches
    assert steps_for_epochs(args, num_batches=5, num_processes=2) == 4
    assert steps_for_epochs(SimpleNamespace(num_train_epochs=None, max_train_steps=99), num_batches=5) == 99
