"""training/train_nar.py end to end: image and code sources, class and text models, checkpoints, resumption, export."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SENTENCES, make_text_encoder, make_tokenizer
from PIL import Image

from nar_diffusers import NARPipeline, NARTransformer, NeighborScheduler, RasterScheduler
from nar_diffusers.pipelines.text_encoding import encode_captions
from nar_diffusers.training.batches import TokenBatchCollator
from nar_diffusers.training.code_shards import load_code_dataset
from nar_diffusers.training.factory import build_transformer
from nar_diffusers.training.vq_training import build_vqmodel


REPO_ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 8  # 8 px with a 2x VQ -> 4x4 token grids
VOCAB = 32
CAPTION_DIM = 24
CAPTION_TOKENS = 8


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"nar_training_{name}", REPO_ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


train_nar = _load_script("train_nar")
extract_codes = _load_script("extract_codes")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")




@pytest.fixture(scope="module")
def class_images(tmp_path_factory) -> Path:
    """An imagefolder with two classes (sub-folders) of four tiny PNGs: dark-left vs dark-right halves."""
    root = tmp_path_factory.mktemp("class_images")
    rng = np.random.default_rng(0)
    for label, name in enumerate(("left", "right")):
        (root / name).mkdir()
        for i in range(4):
            image = rng.integers(0, 60, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
            image[:, (1 - label) * RESOLUTION // 2 : (2 - label) * RESOLUTION // 2] += 180
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def caption_images(tmp_path_factory) -> Path:
    """An imagefolder with captions in metadata.jsonl (words known to the offline test tokenizer)."""
    root = tmp_path_factory.mktemp("caption_images")
    with open(root / "metadata.jsonl", "w") as f:
        for i, sentence in enumerate(SENTENCES):
            Image.new("RGB", (RESOLUTION, RESOLUTION), (60 * i, 30, 200 - 40 * i)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": sentence}) + "\n")
    return root


@pytest.fixture(scope="module")
def string_label_images(tmp_path_factory) -> Path:
    """An imagefolder whose metadata.jsonl gives string labels ("cat", "dog")."""
    root = tmp_path_factory.mktemp("string_labels")
    with open(root / "metadata.jsonl", "w") as f:
        for i, label in enumerate(("cat", "dog")):
            Image.new("RGB", (RESOLUTION, RESOLUTION), (100 * i, 30, 60)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "label": label}) + "\n")
    return root


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vq")
    build_vqmodel((8, 16), 1, 8, 4, VOCAB, 4, 3, RESOLUTION, mid_block_add_attention=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("t5")
    tokenizer = make_tokenizer()
    make_text_encoder(len(tokenizer), CAPTION_DIM).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_cache")


def _optimizer_tensors(checkpoint: Path) -> dict:
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    return {(index, key): value for index, tensors in state.items() for key, value in tensors.items()}


def _train_args(output_dir, *extra: str) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--model_size", "tiny", "--train_batch_size", "3", "--learning_rate", "1e-3",
        "--max_train_steps", "2", "--checkpointing_steps", "100", "--validation_steps", "100",
        "--num_validation_images", "1", "--report_to", "none", *extra,
    ]  # fmt: skip


def _extract(image_dir, vq_dir, cache_dir, output_dir, *extra: str) -> dict:
    args = extract_codes.parse_args(
        [
            "--vq_model_path", str(vq_dir), "--train_data_dir", str(image_dir), "--cache_dir", str(cache_dir),
            "--resolution", str(RESOLUTION), "--device", "cpu", "--output_dir", str(output_dir), *extra,
        ]
    )  # fmt: skip
    return extract_codes.main(args)






# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------








# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------








# ---------------------------------------------------------------------------------------------------------------
# training/train_nar.py
# ---------------------------------------------------------------------------------------------------------------


def test_script_checkpoints_resumes_and_exports(class_images, vq_dir, cache_dir, tmp_path):
    """The real script in a subprocess: checkpoints, exact resumption from a copy, a loadable pipeline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    first, second = tmp_path / "run", tmp_path / "resumed"

    def run(output_dir: Path, *extra: str) -> dict:
        command = [
            sys.executable, str(REPO_ROOT / "training" / "train_nar.py"),
            *_train_args(output_dir, "--train_data_dir", str(class_images), "--vq_model_path", str(vq_dir),
                         "--cache_dir", str(cache_dir), "--resolution", str(RESOLUTION), "--max_train_steps", "4",
                         "--checkpointing_steps", "2", "--validation_steps", "2", "--dropout", "0.1",
                         "--report_to", "tensorboard", *extra),
        ]  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((output_dir / "train_summary.json").read_text())

    summary = run(first)
    assert (summary["start_step"], summary["global_step"], summary["grid"]) == (0, 4, [4, 4])
    assert (first / "checkpoint-2").is_dir() and (first / "checkpoint-4").is_dir()
    assert sorted(p.name for p in (first / "samples").iterdir()) == ["final.png", "step-0000002.png", "step-0000004.png"]
    assert any((first / "logs").rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(first / "logs" / "train_nar"), size_guidance={"images": 0})  # the project
    accumulator.Reload()
    assert [event.step for event in accumulator.Images("samples")] == [2, 4, 4]  # every sample grid, and the final one

    shutil.copytree(first, second)
    shutil.rmtree(second / "checkpoint-4")
    resumed = run(second, "--resume_from_checkpoint", "latest")
    assert (resumed["start_step"], resumed["global_step"]) == (2, 4)
    assert resumed["final_loss"] == summary["final_loss"]
    saved, continued = _optimizer_tensors(first / "checkpoint-4"), _optimizer_tensors(second / "checkpoint-4")
    assert saved.keys() == continued.keys() and saved
    assert all(torch.equal(saved[key], continued[key]) for key in saved)

    pipe = NARPipeline.from_pretrained(first)
    assert isinstance(pipe.scheduler, NeighborScheduler) and pipe.transformer.config.num_classes == 2
    assert pipe.transformer.config.class_dropout_prob == 0.1
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[0, 1], guidance_scale=2.0, output_type="np").images
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3)


def test_codes_from_extract_codes_train_a_raster_baseline(class_images, vq_dir, cache_dir, tmp_path):
    codes_dir, output_dir = tmp_path / "codes", tmp_path / "out"
    _extract(class_images, vq_dir, cache_dir, codes_dir, "--images_per_shard", "4")
    args = train_nar.parse_args(
        _train_args(output_dir, "--codes_dir", str(codes_dir), "--architecture", "raster", "--class_dropout_prob",
                    "0.25", "--validation_class_labels", "1", "--use_ema")
    )  # fmt: skip
    summary = train_nar.main(args)
    assert summary["global_step"] == 2 and summary["architecture"] == "raster"
    pipe = NARPipeline.from_pretrained(output_dir)
    assert isinstance(pipe.scheduler, RasterScheduler) and pipe.transformer.config.num_decoding_heads == 1
    assert pipe.transformer.config.class_dropout_prob == 0.25
    assert pipe.vqvae.config.num_vq_embeddings == VOCAB
    pipe.set_progress_bar_config(disable=True)
    assert pipe(class_labels=[1], output_type="latent").images.shape == (1, 4, 4)


def test_missing_or_corrupted_shard_is_named(class_images, vq_dir, cache_dir, tmp_path):
    codes_dir = tmp_path / "codes"
    _extract(class_images, vq_dir, cache_dir, codes_dir, "--images_per_shard", "4")
    shard = codes_dir / "codes-00001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    args = train_nar.parse_args(_train_args(tmp_path / "out", "--codes_dir", str(codes_dir)))
    with pytest.raises(ValueError, match=r"codes-00001\.parquet is corrupted or unreadable"):
        train_nar.main(args)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"codes-00001\.parquet is missing"):
        train_nar.main(args)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train_data_dir", "{images}"], "needs --vq_model_path"),
        (["--train_data_dir", "{images}", "--codes_dir", "{images}"], "exactly one data source"),
        (["--train_data_dir", "{captions}", "--vq_model_path", "{vq}", "--caption_column", "text"],
         "--caption_column 'text' needs --text_encoder_path"),
        (["--train_data_dir", "{images}", "--vq_model_path", "{vq}", "--resolution", "9"],
         "--resolution 9 must be a multiple of the VQ downsample factor 2"),
        (["--train_data_dir", "{images}", "--vq_model_path", "{vq}", "--resolution", "8", "--pretrained_model_path",
          "{small}"],
         r"token grid \(4, 4\).*larger than --pretrained_model_name_or_path allows"),
        (["--train_data_dir", "{images}", "--vq_model_path", "{vq}", "--validation_prompts", "a cat"],
         "--validation_prompt needs --text_encoder_path"),
        (["--train_data_dir", "{images}", "--vq_model_path", "{vq}", "--label_column", "klass"],
         "`--label_column` value 'klass'.*--caption_column"),
        (["--train_data_dir", "{strings}", "--vq_model_path", "{vq}"],
         r"`--label_column` 'label' holds string values \(e.g. 'cat'\).*--caption_column label.*ClassLabel"),
    ],
)  # fmt: skip
def test_bad_flag_combinations_name_the_flags(
    class_images, caption_images, string_label_images, vq_dir, cache_dir, tmp_path, extra, message
):
    small = tmp_path / "small"
    build_transformer("tiny", "nar", (2, 2), VOCAB, num_classes=2).save_pretrained(small)
    paths = {"images": class_images, "captions": caption_images, "strings": string_label_images, "vq": vq_dir,
             "small": small}  # fmt: skip
    extra = [value.format(**paths) for value in extra]
    args = train_nar.parse_args(_train_args(tmp_path / "out", "--cache_dir", str(cache_dir), *extra))
    with pytest.raises(ValueError, match=message):
        train_nar.main(args)


def test_script_names_a_corrupt_image_and_skips_it_with_the_flag(class_images, vq_dir, cache_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(class_images, images)
    broken = images / "right" / "2.png"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # PIL: "image file is truncated"
    flags = ["--train_data_dir", str(images), "--vq_model_path", str(vq_dir), "--cache_dir", str(cache_dir),
             "--resolution", str(RESOLUTION)]  # fmt: skip
    with pytest.raises(ValueError, match=r"Cannot read the image of row \d+ \(.*right/2\.png\).*--skip_corrupt_images"):
        train_nar.main(train_nar.parse_args(_train_args(tmp_path / "stopped", *flags, "--max_train_steps", "3")))
    args = _train_args(tmp_path / "skipped", *flags, "--max_train_steps", "3", "--skip_corrupt_images")
    summary = train_nar.main(train_nar.parse_args(args))
    assert summary["global_step"] == 3


# ---------------------------------------------------------------------------------------------------------------
# Text-to-image
# ---------------------------------------------------------------------------------------------------------------


def test_text_training_with_captions_encoded_on_the_fly(caption_images, vq_dir, t5_dir, cache_dir, tmp_path):
    output_dir = tmp_path / "out"
    args = train_nar.parse_args(
        _train_args(output_dir, "--train_data_dir", str(caption_images), "--caption_column", "text",
                    "--text_encoder_path", str(t5_dir), "--vq_model_path", str(vq_dir), "--cache_dir", str(cache_dir),
                    "--resolution", str(RESOLUTION), "--max_sequence_length", str(CAPTION_TOKENS),
                    "--validation_steps", "1", "--validation_prompts", "a red fox in the snow")
    )  # fmt: skip
    assert train_nar.main(args)["global_step"] == 2
    assert (output_dir / "text_encoder").is_dir() and (output_dir / "tokenizer").is_dir()
    assert (output_dir / "samples" / "step-0000001.png").is_file()
    pipe = NARPipeline.from_pretrained(output_dir)
    config = pipe.transformer.config
    assert (config.caption_dim, config.num_condition_tokens, config.num_classes) == (CAPTION_DIM, CAPTION_TOKENS, None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(prompt="a photo of a cat", output_type="latent").images.shape == (1, 4, 4)


def test_text_training_with_pre_extracted_embeddings(caption_images, vq_dir, t5_dir, cache_dir, tmp_path):
    codes_dir, output_dir = tmp_path / "codes", tmp_path / "out"
    _extract(
        caption_images, vq_dir, cache_dir, codes_dir, "--caption_column", "text", "--text_encoder_path", str(t5_dir),
        "--max_sequence_length", str(CAPTION_TOKENS), "--text_embedding_dtype", "float32", "--aug", "flip",
    )  # fmt: skip
    metadata = json.loads((codes_dir / "metadata.json").read_text())
    assert metadata["columns"][-2:] == ["caption_embeds", "caption_length"]
    assert metadata["text_encoder"]["caption_dim"] == CAPTION_DIM

    # Stored: the valid tokens only; collated: exactly the condition the pipeline computes from the caption.
    codes = load_code_dataset(str(codes_dir), progress=False)
    assert codes.has_caption_embeddings and len(codes) == 2 * len(SENTENCES)
    captions = [codes[i][1] for i in range(len(codes))]
    tokenizer = make_tokenizer()
    text_encoder = make_text_encoder(len(tokenizer), CAPTION_DIM)
    with torch.no_grad():
        expected, expected_mask = encode_captions(tokenizer, text_encoder, captions, CAPTION_TOKENS)
    lengths = [codes.caption_embedding(i).shape[0] for i in range(len(codes))]
    assert lengths == expected_mask.sum(1).tolist() and min(lengths) < max(lengths) == CAPTION_TOKENS
    examples = [{"input_ids": codes[i][0], "caption_embeds": codes.caption_embedding(i)} for i in range(len(codes))]
    batch = TokenBatchCollator(CAPTION_TOKENS)(examples)
    assert torch.equal(batch["encoder_attention_mask"], expected_mask)
    torch.testing.assert_close(batch["encoder_hidden_states"], expected, atol=1e-5, rtol=1e-5)

    # Training needs no text encoder; the exported pipeline then takes prompt embeddings.
    args = train_nar.parse_args(
        _train_args(output_dir, "--codes_dir", str(codes_dir), "--max_sequence_length", str(CAPTION_TOKENS),
                    "--class_dropout_prob", "0.5", "--validation_steps", "1")
    )  # fmt: skip
    assert train_nar.main(args)["global_step"] == 2
    assert not (output_dir / "text_encoder").exists()
    transformer = NARTransformer.from_pretrained(output_dir, subfolder="transformer")
    assert (transformer.config.caption_dim, transformer.config.class_dropout_prob) == (CAPTION_DIM, 0.5)
    pipe = NARPipeline.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        prompt_embeds=batch["encoder_hidden_states"][:1], prompt_attention_mask=batch["encoder_attention_mask"][:1],
        output_type="latent",
    ).images  # fmt: skip
    assert images.shape == (1, 4, 4)

    # A stored caption longer than the model's condition slots is refused up front.
    args = train_nar.parse_args(_train_args(tmp_path / "short", "--codes_dir", str(codes_dir), "--max_sequence_length", "4"))
    with pytest.raises(ValueError, match="hold up to 8 tokens, more than --max_sequence_length 4"):
        train_nar.main(args)
