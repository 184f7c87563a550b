"""nar_diffusers.training.checkpointing: no pickled state, atomic saves, safe resumption, protected output folders."""

import importlib.util
import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import load as accelerate_load

from nar_diffusers.training.batches import TokenBatchCollator
from nar_diffusers.training.checkpointing import COMPLETE_MARKER
from nar_diffusers.training.factory import build_transformer
from nar_diffusers.training.nar_training import (
    NARTrainingConfig,
    create_accelerator,
    create_dataloader,
    create_ema,
    train_nar_transformer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _examples(count: int = 12, classes: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randint(0, 16, (classes, 4, 4), generator=generator)
    return [{"input_ids": prototypes[i % classes], "class_labels": i % classes} for i in range(count)]


def _run(output_dir: Path, steps: int, resume: str | None = None, accelerator=None, **config):
    """A tiny NAR run with dropout and an EMA, checkpointing every 2 steps (3 batches an epoch)."""
    model = build_transformer("tiny", "nar", (4, 4), 16, num_classes=3, dropout=0.1, seed=0)
    ema = create_ema(model, decay=0.9)
    dataloader = create_dataloader(_examples(), 5, TokenBatchCollator(), seed=0)
    config = NARTrainingConfig(
        max_train_steps=steps, learning_rate=1e-3, output_dir=str(output_dir), checkpointing_steps=2,
        resume_from_checkpoint=resume, **config,
    )  # fmt: skip
    accelerator = accelerator or create_accelerator(seed=0)
    return train_nar_transformer(model, dataloader, config, accelerator, ema=ema, progress=False)


def _folders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir())


class _Payload:
    """Unpickling this creates `flag`: proof that code from the checkpoint ran."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return os.mkdir, (str(self.flag),)


# ---------------------------------------------------------------------------------------------------------------
# 2. Nothing in a checkpoint is unpickled
# ---------------------------------------------------------------------------------------------------------------


def test_checkpoint_stores_data_position_and_ema_as_json_and_safetensors_not_pickle(tmp_path):
    _run(tmp_path, 2)
    checkpoint = tmp_path / "checkpoint-2"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert not [name for name in names if name.startswith("custom_checkpoint")]
    assert [name for name in names if name.endswith(".pkl")] == ["random_states_0.pkl"]  # accelerate's RNG states
    assert json.loads((checkpoint / "data_position.json").read_text()) == {"epoch": 0, "batches": 2}
    ema = json.loads((checkpoint / "ema.json").read_text())
    assert ema["optimization_step"] == 2 and ema["decay"] == 0.9
    assert (checkpoint / "ema.safetensors").is_file() and (checkpoint / "model.safetensors").is_file()
    # What accelerate still pickles loads with torch's weights_only unpickler (tensors, numbers, containers).
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        accelerate_load(checkpoint / name, weights_only=True)
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    assert marker["step"] == 2 and marker["num_processes"] == 1
    assert set(marker["files"]) == set(names) - {COMPLETE_MARKER}


def test_resume_never_unpickles_code_planted_in_a_checkpoint(tmp_path):
    _run(tmp_path, 2)
    checkpoint, flag = tmp_path / "checkpoint-2", tmp_path / "code-ran"
    payload = pickle.dumps(_Payload(flag), protocol=2)

    # accelerate unpickles custom_checkpoint_<i>.pkl with weights_only=False; nar-diffusers never loads one.
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(payload)
    with pytest.raises(ValueError, match=r"custom_checkpoint_0\.pkl.*never loaded"):
        _run(tmp_path, 4, resume="checkpoint-2")
    assert not flag.exists()
    (checkpoint / "custom_checkpoint_0.pkl").unlink()

    # A doctored RNG state (its size recorded in the marker too) is refused by the weights_only unpickler.
    (checkpoint / "random_states_0.pkl").write_bytes(payload)
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    marker["files"]["random_states_0.pkl"] = len(payload)
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps(marker))
    with pytest.raises(ValueError, match=r"random_states_0\.pkl is unreadable"):
        _run(tmp_path, 4, resume="checkpoint-2")
    assert not flag.exists()


# ---------------------------------------------------------------------------------------------------------------
# 4. Atomic saves: a killed save never costs the previous checkpoint
# ---------------------------------------------------------------------------------------------------------------


def test_killed_save_keeps_the_previous_checkpoint_and_latest_resumes_from_it_exactly(tmp_path, caplog):
    uninterrupted = _run(tmp_path / "a", 6)
    output_dir = tmp_path / "b"

    accelerator = create_accelerator(seed=0)
    real_save_state, calls = accelerator.save_state, []

    def killed_midway(folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:  # the save of step 4 dies after writing part of the state
            Path(folder, "model.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt("killed during the save")
        return real_save_state(folder, *args, **kwargs)

    accelerator.save_state = killed_midway
    with pytest.raises(KeyboardInterrupt):
        _run(output_dir, 6, accelerator=accelerator, checkpoints_total_limit=1)
    # The limit of 1 did not delete checkpoint-2 before its successor was complete.
    assert _folders(output_dir) == [".checkpoint-4.tmp", "checkpoint-2"]
    assert (output_dir / "checkpoint-2" / COMPLETE_MARKER).is_file()

    caplog.clear()
    resumed = _run(output_dir, 6, resume="latest", checkpoints_total_limit=1)
    assert "checkpoint-4.tmp: a checkpoint save that did not finish" in caplog.text  # `latest` warned about it
    assert (resumed.start_step, resumed.global_step) == (2, 6)
    assert resumed.losses == uninterrupted.losses[2:]
    assert _folders(output_dir) == ["checkpoint-6"]  # the leftover was removed, the limit applied after saving


def test_latest_skips_an_incomplete_checkpoint_and_a_named_one_is_refused(tmp_path, caplog):
    _run(tmp_path, 4)
    (tmp_path / "checkpoint-4" / COMPLETE_MARKER).unlink()  # e.g. a folder copied half-way
    with pytest.raises(ValueError, match=rf"--resume_from_checkpoint.*checkpoint-4.*no {COMPLETE_MARKER}"):
        _run(tmp_path, 4, resume="checkpoint-4")

    resumed = _run(tmp_path, 4, resume="latest")
    assert resumed.start_step == 2 and "`--resume_from_checkpoint latest` skips" in caplog.text
    # Saving step 4 again moved the incomplete folder aside instead of deleting or mixing into it.
    assert _folders(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-4.incomplete"]
    assert (tmp_path / "checkpoint-4" / COMPLETE_MARKER).is_file()

    for name in ("checkpoint-2", "checkpoint-4"):
        (tmp_path / name / "optimizer.bin").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"no complete checkpoint.*optimizer\.bin has 9 bytes"):
        _run(tmp_path, 4, resume="latest")


# ---------------------------------------------------------------------------------------------------------------
# 6. No silent inexact resume
# ---------------------------------------------------------------------------------------------------------------


def test_resume_without_random_states_fails_naming_the_file(tmp_path):
    _run(tmp_path, 2)
    (tmp_path / "checkpoint-2" / "random_states_0.pkl").unlink()
    for resume in ("checkpoint-2", "latest"):
        with pytest.raises(ValueError, match=r"random_states_0\.pkl is missing \(the RNG state"):
            _run(tmp_path, 4, resume=resume)


def test_resume_with_another_world_size_is_refused_unless_allowed_and_then_states_the_global_batch(tmp_path, caplog):
    _run(tmp_path, 2)
    marker_path = tmp_path / "checkpoint-2" / COMPLETE_MARKER
    marker = json.loads(marker_path.read_text())
    assert (marker["num_processes"], marker["per_device_batch_size"]) == (1, 5)
    marker["num_processes"] = 2  # as if 2 processes had saved it: a global batch of 10
    marker_path.write_text(json.dumps(marker))
    with pytest.raises(ValueError, match=r"saved by 2 processes \(global batch 10 = 2 x 5\); this run has 1 .*"
                                         r"--allow_world_size_change"):
        _run(tmp_path, 4, resume="latest")
    caplog.clear()
    resumed = _run(tmp_path, 4, resume="latest", allow_world_size_change=True)
    assert resumed.start_step == 2 and resumed.global_step == 4
    assert "global batch 10 = 2 x 5" in caplog.text and "global batch 5 = 1 x 5" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# 5. A new run never takes over another run's checkpoints
# ---------------------------------------------------------------------------------------------------------------


def test_new_run_refuses_an_output_dir_holding_another_runs_checkpoints(tmp_path):
    _run(tmp_path, 2)
    weights = (tmp_path / "checkpoint-2" / "model.safetensors").read_bytes()
    message = r"--output_dir.*checkpoint-2.*--resume_from_checkpoint latest.*--overwrite_output_dir"
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, 2)
    assert (tmp_path / "checkpoint-2" / "model.safetensors").read_bytes() == weights
    with pytest.raises(ValueError, match="either `--resume_from_checkpoint`.*or `--overwrite_output_dir`"):
        _run(tmp_path, 2, resume="latest", overwrite_output_dir=True)


def test_overwrite_output_dir_deletes_only_the_previous_runs_checkpoints(tmp_path):
    _run(tmp_path, 4)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "samples").mkdir()
    (tmp_path / ".checkpoint-6.tmp").mkdir()  # left by a killed save
    output = _run(tmp_path, 2, overwrite_output_dir=True)
    assert output.start_step == 0
    assert _folders(tmp_path) == ["checkpoint-2", "samples"] and (tmp_path / "notes.txt").read_text() == "mine"

    (tmp_path / "checkpoint-9").mkdir()  # not written by nar-diffusers: never deleted
    (tmp_path / "checkpoint-9" / "data.txt").write_text("mine")
    with pytest.raises(ValueError, match=rf"--overwrite_output_dir.*checkpoint-9.*no {COMPLETE_MARKER}"):
        _run(tmp_path, 2, overwrite_output_dir=True)
    assert (tmp_path / "checkpoint-9" / "data.txt").read_text() == "mine" and (tmp_path / "checkpoint-2").is_dir()


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"checkpointing_{name}", REPO_ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "script, flags",
    [
        ("train_nar", ["--codes_dir", "{missing}", "--report_to", "none"]),
        ("train_vq", ["--train_data_dir", "{missing}"]),
        ("train_lora_t2i", ["--pretrained_model_name_or_path", "{missing}", "--report_to", "none"]),
    ],
)
def test_every_training_script_refuses_another_runs_checkpoints_unless_told(script, flags, tmp_path):
    """Checked before anything is loaded; --overwrite_output_dir removes the old run's checkpoints, nothing else."""
    module = _load_script(script)
    output_dir = tmp_path / "out"
    _run(output_dir, 2)
    (output_dir / "notes.txt").write_text("mine")
    argv = [flag.format(missing=tmp_path / "missing") for flag in flags] + ["--output_dir", str(output_dir)]

    def main(*extra: str):
        args = [*argv, *extra]
        return module.main(args) if script == "train_lora_t2i" else module.main(module.parse_args(args))

    with pytest.raises(ValueError, match=r"--output_dir.*already holds checkpoints.*--overwrite_output_dir"):
        main()
    assert (output_dir / "checkpoint-2").is_dir()
    with pytest.raises(Exception) as error:  # past the check, the missing data / model stops the run
        main("--overwrite_output_dir")
    assert "already holds checkpoints" not in str(error.value)
    assert not (output_dir / "checkpoint-2").exists() and (output_dir / "notes.txt").read_text() == "mine"
