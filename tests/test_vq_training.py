import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import VQModel

from nar_diffusers.models.vq_codec import encode_images_to_tokens
from nar_diffusers.training.vq_training import build_vqmodel, reconstruction_grid, reconstruction_mse, train_vqmodel

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_reconstruction_loss_decreases_on_fixed_data(fresh_accelerate_state):
    torch.manual_seed(0)
    rows = torch.linspace(-1, 1, 16)
    images = torch.stack(
        [
            (rows[:, None] * a + rows[None, :] * b).clamp(-1, 1)
            for a, b in [(1, 0), (0, 1), (1, 1), (-1, 0.5), (0.5, -1), (-1, -1), (0.3, 0.8), (-0.7, 0.2)]
        ]
    )
    images = images[:, None].expand(-1, 3, -1, -1).contiguous()
    vqvae = build_vqmodel((8, 16), 1, 8, 4, 32, 4, 3, 16, mid_block_add_attention=False)
    before = reconstruction_mse(vqvae, images)
    output = train_vqmodel(vqvae, images, steps=60, learning_rate=3e-3, batch_size=8, progress=False)
    assert output.global_step == 60 and len(output.reconstruction_losses) == 60
    assert np.mean(output.reconstruction_losses[-5:]) < 0.5 * np.mean(output.reconstruction_losses[:5])
    assert reconstruction_mse(vqvae, images) < 0.5 * before
    # The quantizer's loss weighting is restored after training.
    assert vqvae.quantize.legacy is True and vqvae.quantize.beta == 0.25


def test_train_vq_script_checkpoints_saves_and_resumes(image_dir, cache_dir, tmp_path):
    output_dir = tmp_path / "vq-out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    command = [
        sys.executable, str(REPO_ROOT / "training" / "train_vq.py"),
        "--train_data_dir", str(image_dir), "--cache_dir", str(cache_dir),
        "--resolution", "16", "--block_out_channels", "8", "16", "--layers_per_block", "1",
        "--latent_channels", "8", "--vq_embed_dim", "4", "--num_vq_embeddings", "32", "--norm_num_groups", "4",
        "--train_batch_size", "3", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0",
        "--checkpointing_steps", "2", "--num_validation_images", "4", "--output_dir", str(output_dir),
    ]  # fmt: skip

    def run(*extra: str) -> dict:
        result = subprocess.run(command + list(extra), env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((output_dir / "train_summary.json").read_text())

    summary = run("--max_train_steps", "4")
    assert summary == {**summary, "global_step": 4, "start_step": 0}
    assert (output_dir / "checkpoint-2").is_dir() and (output_dir / "checkpoint-4").is_dir()
    assert (output_dir / "reconstructions.png").is_file()
    vqvae = VQModel.from_pretrained(output_dir)
    assert vqvae.config.lookup_from_codebook and vqvae.config.num_vq_embeddings == 32
    assert encode_images_to_tokens(vqvae, torch.zeros(1, 3, 16, 16)).shape == (1, 8, 8)

    summary = run("--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert summary["start_step"] == 4 and summary["global_step"] == 6
    assert (output_dir / "checkpoint-6").is_dir()


def test_reconstruction_grid_pairs_originals_with_their_round_trip():
    torch.manual_seed(0)
    vqvae = build_vqmodel((8, 16), 1, 8, 4, 32, 4, 3, 16, mid_block_add_attention=False).eval()
    pixels = torch.rand(5, 3, 16, 16) * 2 - 1
    grid = reconstruction_grid(vqvae, pixels, columns=3, scale=2)
    assert grid.size == (3 * 16 * 2, 4 * 16 * 2)  # 2 rows of pairs; the last row has 2 of 3 images
    array = np.asarray(grid)
    assert array[-32:, -32:].max() == 0  # the missing image is left black
