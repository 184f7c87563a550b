"""The training loop of nar_diffusers.training.nar_training: learning and exact resumption."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nar_diffusers.training.batches import TokenBatchCollator
from nar_diffusers.training.factory import build_transformer
from nar_diffusers.training.nar_training import (
    NARTrainingConfig,
    create_accelerator,
    create_dataloader,
    create_ema,
    train_nar_transformer,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _optimizer_tensors(checkpoint: Path) -> dict:
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    return {(index, key): value for index, tensors in state.items() for key, value in tensors.items()}


def _fixed_token_examples(count: int = 12, classes: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randint(0, 16, (classes, 4, 4), generator=generator)
    return [{"input_ids": prototypes[i % classes], "class_labels": i % classes} for i in range(count)]


@pytest.mark.parametrize("architecture", ["nar", "raster"])
def test_loss_decreases_on_fixed_tokens(architecture):
    model = build_transformer("tiny", architecture, (4, 4), 16, num_classes=3, class_dropout_prob=0.0, seed=0)
    dataloader = create_dataloader(_fixed_token_examples(), 6, TokenBatchCollator(), seed=0)
    config = NARTrainingConfig(max_train_steps=40, learning_rate=3e-3, lr_scheduler="constant", weight_decay=0.0)
    output = train_nar_transformer(model, dataloader, config, create_accelerator(seed=0), progress=False)
    assert output.global_step == 40 and len(output.losses) == 40
    assert np.mean(output.losses[-5:]) < 0.5 * np.mean(output.losses[:5])


def _resumable_run(output_dir: Path, steps: int, resume: str | None = None):
    model = build_transformer("tiny", "nar", (4, 4), 16, num_classes=3, dropout=0.1, seed=0)
    ema = create_ema(model, decay=0.9)
    dataloader = create_dataloader(_fixed_token_examples(), 5, TokenBatchCollator(), seed=0)  # 3 batches / epoch
    config = NARTrainingConfig(
        max_train_steps=steps, learning_rate=1e-3, lr_warmup_steps=2, output_dir=str(output_dir),
        checkpointing_steps=2, resume_from_checkpoint=resume,
    )  # fmt: skip
    output = train_nar_transformer(model, dataloader, config, create_accelerator(seed=0), ema=ema, progress=False)
    return model, ema, output


def test_resume_continues_at_the_saved_step_with_identical_state(tmp_path):
    model_a, ema_a, run_a = _resumable_run(tmp_path, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for name in ("checkpoint-4", "checkpoint-6"):  # resume from the middle of an epoch
        shutil.rmtree(tmp_path / name)

    model_b, ema_b, run_b = _resumable_run(tmp_path, 7, resume="latest")
    assert (run_b.start_step, run_b.global_step) == (2, 7)
    assert run_b.losses == run_a.losses[2:]  # same batches, same dropout draws
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    state_a, state_b = run_a.optimizer.state_dict(), run_b.optimizer.state_dict()
    assert state_a["state"].keys() == state_b["state"].keys() and state_a["state"]
    for index, tensors in state_a["state"].items():
        for key, value in tensors.items():
            assert torch.equal(value, state_b["state"][index][key]), (index, key)
    for a, b in zip(ema_a.shadow_params, ema_b.shadow_params):
        assert torch.equal(a, b)

    # Right after loading, the optimizer holds exactly what the checkpoint saved.
    _, _, loaded = _resumable_run(tmp_path, 6, resume="checkpoint-6")
    assert loaded.start_step == loaded.global_step == 6 and loaded.losses == []
    saved = _optimizer_tensors(tmp_path / "checkpoint-6")
    assert saved and all(
        torch.equal(value, loaded.optimizer.state_dict()["state"][index][key]) for (index, key), value in saved.items()
    )
    with pytest.raises(ValueError, match="--resume_from_checkpoint.*checkpoint-99"):
        _resumable_run(tmp_path, 7, resume="checkpoint-99")
