"""training/train_nar.py on 2 CPU processes (DDP over gloo, started with `accelerate launch`): it trains on the
memory-mapped codes, checkpoints every process's state, resumes exactly, and exports a loadable pipeline; the
accelerate config files of training/configs/ are valid."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_launch import REPO_ROOT, accelerate_launch
from PIL import Image

from nar_diffusers import NARPipeline
from nar_diffusers.training.vq_training import build_vqmodel

RESOLUTION, VOCAB = 8, 32  # 8 px with a 2x VQ -> 4x4 token grids


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory) -> Path:
    """12 tiny two-class images, their VQ model and their codes (extract_codes.py, one process)."""
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    for label, name in enumerate(("left", "right")):
        (root / "images" / name).mkdir(parents=True)
        for i in range(6):
            image = rng.integers(0, 60, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
            image[:, (1 - label) * RESOLUTION // 2 : (2 - label) * RESOLUTION // 2] += 180
            Image.fromarray(image).save(root / "images" / name / f"{i}.png")
    torch.manual_seed(0)
    build_vqmodel((8, 16), 1, 8, 4, VOCAB, 4, 3, RESOLUTION, mid_block_add_attention=False).save_pretrained(root / "vq")
    spec = importlib.util.spec_from_file_location("nar_training_extract_codes", REPO_ROOT / "training" / "extract_codes.py")
    extract_codes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract_codes)
    extract_codes.main(extract_codes.parse_args([
        "--vq_model_path", str(root / "vq"), "--train_data_dir", str(root / "images"), "--cache_dir",
        str(root / "hf"), "--resolution", str(RESOLUTION), "--device", "cpu", "--output_dir", str(root / "codes"),
    ]))  # fmt: skip
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return root / "codes"


def _train(codes_dir: Path, output_dir: Path, *extra: str):
    result = accelerate_launch([
        str(REPO_ROOT / "training" / "train_nar.py"), "--codes_dir", str(codes_dir),
        "--cache_dir", str(codes_dir.parent / "hf"), "--output_dir", str(output_dir), "--model_size", "tiny",
        "--train_batch_size", "3", "--learning_rate", "1e-3", "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--validation_steps", "100", "--num_validation_images", "1", "--report_to", "none", "--use_ema", *extra,
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _optimizer_tensors(checkpoint: Path) -> dict:
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    return {(index, key): value for index, tensors in state.items() for key, value in tensors.items()}


def test_ddp_on_two_processes_checkpoints_resumes_and_exports(codes_dir, tmp_path):
    first, resumed = tmp_path / "run", tmp_path / "resumed"
    result = _train(codes_dir, first)
    assert "batch 3 x 2 processes" in result.stderr and "MULTI_CPU on cpu" in result.stderr
    assert result.stdout.count("Trained to step 4") == 1  # printed by the main process only
    for step in (2, 4):
        marker = json.loads((first / f"checkpoint-{step}" / "checkpoint_complete.json").read_text())
        assert marker["num_processes"] == 2
        assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "ema.safetensors"} <= set(marker["files"])
    summary = json.loads((first / "train_summary.json").read_text())
    assert (summary["start_step"], summary["global_step"]) == (0, 4)

    # Both processes resume from checkpoint-2 and end exactly where the uninterrupted run did.
    shutil.copytree(first, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    _train(codes_dir, resumed, "--resume_from_checkpoint", "latest")
    again = json.loads((resumed / "train_summary.json").read_text())
    assert (again["start_step"], again["global_step"], again["final_loss"]) == (2, 4, summary["final_loss"])
    saved, continued = _optimizer_tensors(first / "checkpoint-4"), _optimizer_tensors(resumed / "checkpoint-4")
    assert saved.keys() == continued.keys() and all(torch.equal(saved[k], continued[k]) for k in saved)

    pipe = NARPipeline.from_pretrained(first)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.num_classes == 2
    assert pipe(class_labels=[0, 1], output_type="np").images.shape == (2, RESOLUTION, RESOLUTION, 3)


@pytest.mark.parametrize(
    "name, distributed_type",
    [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"), ("deepspeed_zero3", "DEEPSPEED")],
)
def test_shipped_accelerate_configs_load(name, distributed_type):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO_ROOT / "training" / "configs" / f"{name}.yaml"))
    assert config.distributed_type.value == distributed_type and config.num_processes == 8
    if name == "fsdp":
        from nar_diffusers.models import attention_nar

        assert hasattr(attention_nar, config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
        assert config.deepspeed_config.get("zero3_save_16bit_model", False) == (name == "deepspeed_zero3")


