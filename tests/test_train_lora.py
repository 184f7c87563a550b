import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import SENTENCES, make_text_pipeline, make_transformer
from nar_diffusers import NARPipeline
from nar_diffusers.training.lora import add_lora

SCRIPT = Path(__file__).parents[1] / "training" / "train_lora_t2i.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny text pipeline, a captioned imagefolder, and a 6-step LoRA run with validation at the end."""
    root = tmp_path_factory.mktemp("lora")
    base = root / "base"
    make_text_pipeline().save_pretrained(base)
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    with open(data / "metadata.jsonl", "w") as f:
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": SENTENCES[i % len(SENTENCES)]}) + "\n")
    out = root / "out"
    common = [
        "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir", str(out),
        "--resolution", "8", "--center_crop", "--rank", "4", "--lora_alpha", "8", "--learning_rate", "5e-2",
        "--train_batch_size", "3", "--checkpointing_steps", "3", "--report_to", "none", "--seed", "0",
        "--validation_prompt", "a red fox", "--validation_steps", "6", "--num_validation_images", "2",
        "--validation_guidance_scale", "2.0",
    ]
    log = run_script(*common, "--max_train_steps", "6").stderr
    return {"base": base, "out": out, "common": common, "log": log}


def fresh_pipeline(path) -> NARPipeline:
    pipe = NARPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def greedy(pipe):
    return pipe(prompt=["a red fox", "a photo of a cat"], do_sample=False, guidance_scale=1.0, output_type="latent").images


def test_training_writes_lora_weights_checkpoints_and_validation_images(trained):
    out = trained["out"]
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("transformer.") and "lora" in key for key in weights)
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-3", "checkpoint-6"}
    assert len(list((out / "validation" / "step-6").glob("*.png"))) == 2
    assert not any("qkv" not in k and "out_proj" not in k for k in weights)


def test_saved_lora_reproduces_the_trained_model_in_a_fresh_pipeline(trained):
    pipe = fresh_pipeline(trained["base"])
    pipe.load_lora_weights(trained["out"])
    images = pipe(
        prompt="a red fox", num_images_per_prompt=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0)
    ).images
    for number, image in enumerate(images):
        saved = Image.open(trained["out"] / "validation" / "step-6" / f"prompt0-{number}.png")
        np.testing.assert_array_equal(np.asarray(image), np.asarray(saved))


def test_lora_changes_the_output_and_scale_zero_unload_and_unfuse_restore_the_base(trained):
    pipe = fresh_pipeline(trained["base"])
    base_tokens = greedy(pipe)
    base_weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(trained["out"], adapter_name="trained")
    lora_tokens = greedy(pipe)
    assert not torch.equal(lora_tokens, base_tokens)
    pipe.set_adapters("trained", adapter_weights=0.0)
    assert torch.equal(greedy(pipe), base_tokens)
    pipe.set_adapters("trained", adapter_weights=1.0)
    pipe.fuse_lora()
    assert torch.equal(greedy(pipe), lora_tokens)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    for key, value in pipe.transformer.state_dict().items():
        torch.testing.assert_close(value, base_weights[key], atol=1e-6, rtol=0)
    assert torch.equal(greedy(pipe), base_tokens)


def test_resuming_restores_the_checkpointed_lora_and_continues_from_its_step(trained, tmp_path):
    final = load_file(trained["out"] / "pytorch_lora_weights.safetensors")
    log = run_script(*trained["common"], "--max_train_steps", "6", "--resume_from_checkpoint", "latest").stderr
    assert "at step 6" in log
    resumed = load_file(trained["out"] / "pytorch_lora_weights.safetensors")
    assert final.keys() == resumed.keys()
    for key in final:
        assert torch.equal(final[key], resumed[key])


def _load_script():
    spec = importlib.util.spec_from_file_location("train_lora_t2i", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resumed_run_sees_the_same_batches_and_loss_curve_as_an_uninterrupted_one(trained, tmp_path, fresh_accelerate_state):
    """6 captioned images in batches of 4: step 3 is the first batch of the second epoch, so resuming from
    checkpoint-3 must skip the batch already seen in that epoch, with random flips and caption dropout drawn alike."""
    from accelerate.state import AcceleratorState

    script = _load_script()
    flags = [flag for flag in trained["common"] if flag != "--center_crop"]
    flags[flags.index("--train_batch_size") + 1] = "4"
    flags[flags.index("--validation_steps") + 1] = "100"
    flags = [*flags[: flags.index("--validation_prompt")], *flags[flags.index("--validation_steps"):]]
    flags += ["--random_flip", "--logging_steps", "1", "--max_train_steps", "6"]

    def run(output_dir, *extra):
        flags[flags.index("--output_dir") + 1] = str(output_dir)
        result = script.main([*flags, *extra])
        AcceleratorState._reset_state(reset_partial_state=True)
        return result, load_file(output_dir / "pytorch_lora_weights.safetensors")

    uninterrupted, weights = run(tmp_path / "a")
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    resumed, resumed_weights = run(tmp_path / "b", "--resume_from_checkpoint", "latest")
    assert (resumed.start_step, resumed.global_step) == (3, 6)
    assert resumed.losses == uninterrupted.losses[3:]
    assert weights.keys() == resumed_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], resumed_weights[key]), key


def test_unknown_target_module_is_rejected_with_the_available_layers():
    with pytest.raises(ValueError, match="target_modules.*qkv"):
        add_lora(make_transformer(), target_modules=["to_q"])


def test_feed_forward_layers_can_be_targeted_and_only_lora_parameters_train():
    transformer = make_transformer()
    add_lora(transformer, rank=2, target_modules=["qkv", "w1", "w2", "w3"])
    trainable = [name for name, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("feed_forward.w2" in name for name in trainable)
    assert all(p.dtype == torch.float32 for n, p in transformer.named_parameters() if p.requires_grad)
