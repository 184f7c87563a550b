"""Training on videos with the existing scripts: extract_codes.py (3-D code shards), train_nar.py (3-head NAR and
raster, from codes or a video folder on the fly, sample clips), train_lora_t2i.py (text-to-video)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import make_text_encoder, make_tokenizer
from nar_diffusers import NARVideoPipeline, NeighborScheduler, RasterScheduler
from nar_diffusers.models.video_tokenizer import FrameVQTokenizer
from nar_diffusers.training.code_shards import load_code_dataset
from nar_diffusers.training.factory import build_pipeline, build_transformer
from nar_diffusers.training.video_data import VideoClipTransform, load_video_dataset
from nar_diffusers.training.vq_training import build_vqmodel

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 32
CLIP = ["--num_frames", "3", "--frame_stride", "2", "--height", "8", "--width", "12"]  # -> (3, 4, 6) tokens


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"nar_video_{name}", REPO_ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


extract_codes = _load_script("extract_codes")
train_nar = _load_script("train_nar")
train_lora = _load_script("train_lora_t2i")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("video_vq")
    build_vqmodel((8, 16), 1, 8, 4, VOCAB, 4, 3, 8, mid_block_add_attention=False).save_pretrained(path)
    return path


def _extract(video_dir, vq_dir, cache_dir, output_dir, *extra):
    args = extract_codes.parse_args(
        ["--vq_model_path", str(vq_dir), "--train_data_dir", str(video_dir), "--video_column", "video",
         "--cache_dir", str(cache_dir), "--device", "cpu", "--batch_size", "3", "--images_per_shard", "3",
         "--output_dir", str(output_dir), *CLIP, *extra]
    )  # fmt: skip
    return extract_codes.main(args)


def _train_args(output_dir, *extra):
    return [
        "--output_dir", str(output_dir), "--model_size", "tiny", "--train_batch_size", "2", "--learning_rate", "1e-3",
        "--max_train_steps", "2", "--checkpointing_steps", "100", "--validation_steps", "1",
        "--num_validation_images", "2", "--report_to", "none", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def video_codes(video_dir, vq_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("video_codes")
    _extract(video_dir, vq_dir, tmp_path_factory.mktemp("cache"), output_dir)
    return output_dir


def test_extracted_video_codes_are_3d_grids_of_the_frame_wise_tokenizer(video_codes, video_dir, vq_dir, tmp_path):
    metadata = json.loads((video_codes / "metadata.json").read_text())
    assert metadata["grid"] == [3, 4, 6] and metadata["complete"] and metadata["num_shards"] == 2
    assert metadata["video"]["num_frames"] == 3 and metadata["video"]["frame_stride"] == 2
    assert "time" in metadata["columns"] and metadata["condition_column"] == "label"
    codes = load_code_dataset(str(video_codes))
    assert codes.grid == (3, 4, 6) and len(codes) == 4 and codes.labels.tolist() == [0, 1, 0, 1]
    grid, label = codes[1]
    assert grid.shape == (3, 4, 6) and label == 1
    dataset = load_video_dataset(train_data_dir=str(video_dir), cache_dir=str(tmp_path))
    clip = VideoClipTransform(3, 2, 8, 12)(dataset[1]["video"])
    from nar_diffusers.models.video_tokenizer import load_tokenizer_model

    tokenizer = FrameVQTokenizer(load_tokenizer_model(str(vq_dir)))
    assert torch.equal(tokenizer.encode_video(clip[None])[0], grid)


def test_flip_views_and_settings_checks(video_dir, vq_dir, tmp_path):
    metadata = _extract(video_dir, vq_dir, tmp_path / "cache", tmp_path / "flip", "--aug", "flip")
    assert metadata["num_samples"] == 8
    with pytest.raises(SystemExit):
        extract_codes.parse_args(["--vq_model_path", "x", "--train_data_dir", "y", "--output_dir", "z",
                                  "--video_column", "video", "--aug", "ten_crop"])  # fmt: skip
    with pytest.raises(ValueError, match="height"):
        _extract(video_dir, vq_dir, tmp_path / "cache", tmp_path / "bad", "--height", "7")


def test_train_nar_on_video_codes_trains_three_heads_and_writes_sample_clips(video_codes, tmp_path):
    output = tmp_path / "nar"
    summary = train_nar.main(train_nar.parse_args(_train_args(output, "--codes_dir", str(video_codes))))
    assert summary["grid"] == [3, 4, 6] and summary["architecture"] == "nar" and summary["global_step"] == 2
    pipe = NARVideoPipeline.from_pretrained(output)
    assert isinstance(pipe.scheduler, NeighborScheduler) and pipe.transformer.config.num_decoding_heads == 3
    assert tuple(pipe.transformer.config.grid_size) == (3, 4, 6) and len(pipe.scheduler) == 11
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(class_labels=[1], generator=torch.Generator().manual_seed(0)).frames
    assert len(frames[0]) == 3 and frames[0][0].size == (12, 8)
    samples = output / "samples"
    for name in ("step-0000001.gif", "step-0000001.png", "final.gif", "final.png"):
        assert (samples / name).is_file(), name
    with Image.open(samples / "final.gif") as gif:
        assert gif.n_frames == 3


def test_train_nar_raster_baseline_on_video_codes(video_codes, tmp_path):
    output = tmp_path / "raster"
    summary = train_nar.main(
        train_nar.parse_args(_train_args(output, "--codes_dir", str(video_codes), "--architecture", "raster"))
    )
    assert summary["architecture"] == "raster"
    pipe = NARVideoPipeline.from_pretrained(output)
    assert isinstance(pipe.scheduler, RasterScheduler) and len(pipe.scheduler) == 72


def test_train_nar_on_a_video_folder_on_the_fly(video_dir, vq_dir, tmp_path):
    output = tmp_path / "on_the_fly"
    summary = train_nar.main(train_nar.parse_args(_train_args(
        output, "--train_data_dir", str(video_dir), "--video_column", "video", "--vq_model_path", str(vq_dir),
        "--cache_dir", str(tmp_path / "cache"), "--random_flip", "--clip_position", "random", *CLIP,
    )))  # fmt: skip
    assert summary["grid"] == [3, 4, 6]
    assert NARVideoPipeline.from_pretrained(output).transformer.config.num_classes == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--video_column", "video"], "--video_column"),
        (["--resolution", "8"], "--resolution"),
    ],
)
def test_bad_video_flag_combinations_name_the_flags(video_codes, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train_nar.main(train_nar.parse_args(_train_args(tmp_path / "x", "--codes_dir", str(video_codes), *extra)))


def test_lora_script_fine_tunes_a_text_to_video_pipeline_on_a_captioned_video_folder(video_dir, vq_dir, tmp_path):
    tokenizer = make_tokenizer()
    text_encoder = make_text_encoder(len(tokenizer), 24)
    transformer = build_transformer(
        "tiny", "nar", (3, 4, 6), VOCAB, caption_dim=24, num_condition_tokens=8, seed=0
    )
    from nar_diffusers.models.video_tokenizer import load_tokenizer_model

    base = tmp_path / "t2v"
    pipe = build_pipeline(transformer, load_tokenizer_model(str(vq_dir)), text_encoder, tokenizer)
    assert isinstance(pipe, NARVideoPipeline)
    pipe.save_pretrained(base)
    output = tmp_path / "lora"
    train_lora.main([
        "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(video_dir), "--video_column", "video",
        "--cache_dir", str(tmp_path / "cache"), *CLIP, "--resolution", "8", "--train_batch_size", "2",
        "--max_train_steps", "2", "--rank", "2", "--checkpointing_steps", "1", "--validation_steps", "2",
        "--validation_prompt", "a cat", "--num_validation_images", "1", "--report_to", "none",
        "--output_dir", str(output),
    ])  # fmt: skip
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    assert (output / "validation" / "step-2" / "prompt0-0.gif").is_file()
    loaded = NARVideoPipeline.from_pretrained(base)
    loaded.load_lora_weights(output)
    loaded.set_progress_bar_config(disable=True)
    assert loaded(prompt="a cat", output_type="latent").frames.shape == (1, 3, 4, 6)


def test_larp_tokenized_codes_train_a_learned_position_nar_video_model(video_dir, tmp_path):
    """The published video recipe at tiny size: a LARP tokenizer folder encodes the clips (nearest codes), and
    train_nar.py trains a three-head NAR model with learned absolute positions on them."""
    from test_larp_tokenizer import make_tokenizer

    larp = make_tokenizer()  # clips of 4 frames, 8 x 8 px -> (2, 2, 2) tokens, 16 codes
    larp.save_pretrained(tmp_path / "larp")
    codes_dir = tmp_path / "codes"
    args = extract_codes.parse_args(
        ["--vq_model_path", str(tmp_path / "larp"), "--train_data_dir", str(video_dir), "--video_column", "video",
         "--cache_dir", str(tmp_path / "cache"), "--device", "cpu", "--output_dir", str(codes_dir),
         "--num_frames", "4", "--frame_stride", "2", "--height", "8", "--width", "8"]
    )  # fmt: skip
    extract_codes.main(args)
    codes = load_code_dataset(str(codes_dir))
    assert codes.grid == (2, 2, 2) and codes.vocab_size == 16 and len(codes) == 4

    output_dir = tmp_path / "nar-larp"
    train_nar.main(train_nar.parse_args(
        _train_args(output_dir, "--codes_dir", str(codes_dir), "--vq_model_path", str(tmp_path / "larp"),
                    "--position_embedding_type", "learned")
    ))  # fmt: skip
    pipe = NARVideoPipeline.from_pretrained(output_dir)
    assert pipe.transformer.config.position_embedding_type == "learned"
    assert pipe.transformer.config.num_decoding_heads == 3 and type(pipe.vqvae).__name__ == "LARPTokenizer"
    pipe.set_progress_bar_config(disable=True)
    clip = pipe(class_labels=[1], output_type="pt").frames
    assert clip.shape == (1, 4, 3, 8, 8) and 0 <= clip.min() and clip.max() <= 1
