"""Tiny in-process models shared by the tests: random weights, nothing downloaded."""

import pytest
import torch
from diffusers import VQModel

from nar_diffusers import NARPipeline, NARTransformer, NARVideoPipeline, NeighborScheduler, RasterScheduler

# Tiny models run faster on one thread, and the tests stay fast when other processes share the cores.
torch.set_num_threads(1)


def make_transformer(**overrides) -> NARTransformer:
    config = dict(
        vocab_size=48,
        hidden_size=32,
        num_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        ffn_multiple_of=16,
        grid_size=(4, 4),
        num_decoding_heads=2,
        num_classes=10,
    )
    config.update(overrides)
    torch.manual_seed(0)
    return NARTransformer(**config).eval()


def make_text_transformer(**overrides) -> NARTransformer:
    config = dict(num_classes=None, caption_dim=24, num_condition_tokens=6)
    config.update(overrides)
    return make_transformer(**config)


def make_vqmodel(num_vq_embeddings: int = 48) -> VQModel:
    torch.manual_seed(0)
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        num_vq_embeddings=num_vq_embeddings,
        vq_embed_dim=4,
        lookup_from_codebook=True,
    ).eval()


def make_pipeline(raster: bool = False, **transformer_overrides) -> NARPipeline:
    if raster:
        transformer_overrides.setdefault("num_decoding_heads", 1)
    transformer = make_transformer(**transformer_overrides)
    scheduler_cls = RasterScheduler if raster else NeighborScheduler
    pipe = NARPipeline(
        transformer=transformer, vqvae=make_vqmodel(), scheduler=scheduler_cls(grid_size=transformer.config.grid_size)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe() -> NARPipeline:
    return make_pipeline()


VIDEO_TRANSFORMER = dict(grid_size=(2, 4, 4), num_decoding_heads=3, hidden_size=48, num_attention_heads=4)


def make_video_pipeline(raster: bool = False, text: bool = False, **transformer_overrides) -> NARVideoPipeline:
    """A tiny video pipeline: a 3-head (or 1-head raster) transformer over a (2, 4, 4) grid, a frame-wise VQModel
    (8 x 8 px frames), class- or text-conditional."""
    config = {**VIDEO_TRANSFORMER, **transformer_overrides}
    if raster:
        config["num_decoding_heads"] = 1
    if text:
        tokenizer = make_tokenizer()
        transformer = make_text_transformer(**config)
        text_encoder = make_text_encoder(len(tokenizer), transformer.config.caption_dim)
    else:
        transformer, text_encoder, tokenizer = make_transformer(**config), None, None
    scheduler = (RasterScheduler if raster else NeighborScheduler)(grid_size=transformer.config.grid_size)
    pipe = NARVideoPipeline(
        transformer=transformer, vqvae=make_vqmodel(), scheduler=scheduler, text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


SENTENCES = [
    "a photo of a cat",
    "a red fox in the snow",
    "a small dog on the grass",
    "an oil painting of a blue house by the sea",
]


def make_tokenizer():
    """A word-level T5-style tokenizer (pad 0, eos 1, unk 2) built offline from a few sentences."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for sentence in SENTENCES for word in sentence.split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def make_text_encoder(vocab_size: int, hidden_size: int = 24):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=vocab_size, d_model=hidden_size, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    return T5EncoderModel(config).eval()


def make_text_pipeline(with_text_encoder: bool = True, **transformer_overrides) -> NARPipeline:
    transformer = make_text_transformer(**transformer_overrides)
    tokenizer = make_tokenizer() if with_text_encoder else None
    text_encoder = make_text_encoder(len(tokenizer), transformer.config.caption_dim) if with_text_encoder else None
    pipe = NARPipeline(
        transformer=transformer,
        vqvae=make_vqmodel(),
        scheduler=NeighborScheduler(grid_size=transformer.config.grid_size),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session", autouse=True)
def datasets_cache(tmp_path_factory):
    """Keep 🤗 datasets' default cache inside the test session, for this process and the subprocesses it starts:
    the Arrow files `load_code_dataset` has datasets convert code shards into (its `parquet/` folder) land here."""
    import os

    import datasets.config

    path = tmp_path_factory.mktemp("hf_datasets_cache")
    previous = os.environ.get("HF_DATASETS_CACHE"), datasets.config.HF_DATASETS_CACHE
    os.environ["HF_DATASETS_CACHE"] = str(path)
    datasets.config.HF_DATASETS_CACHE = path
    yield path
    if previous[0] is None:
        os.environ.pop("HF_DATASETS_CACHE", None)
    else:
        os.environ["HF_DATASETS_CACHE"] = previous[0]
    datasets.config.HF_DATASETS_CACHE = previous[1]


@pytest.fixture
def fresh_accelerate_state():
    """Accelerators share process-wide state; reset it after a test that creates one."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    """An imagefolder of six small non-square RGB PNGs, three per class sub-folder ("circle", "square")."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("circle", "square"):
        (root / label).mkdir()
        for i in range(3):
            image = rng.integers(0, 256, size=(18, 22, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A 🤗 datasets cache folder for the test session."""
    return tmp_path_factory.mktemp("hf_cache")


VIDEO_FRAMES, VIDEO_SIZE = 12, (12, 16)  # frames, (height, width) of the videos `video_dir` writes


def video_frame(index: int, label: int):
    """Frame `index` of a test video: uniform grey 15 * index + 5, with a bright square whose column is the label
    (so frames tell their index by brightness)."""
    import numpy as np

    frame = np.full((*VIDEO_SIZE, 3), 15 * index + 5, dtype=np.uint8)
    frame[2:6, 2 + 8 * label : 6 + 8 * label] = 250
    return frame


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory):
    """A video folder as users keep it: four 12-frame MP4s (12 x 16 px) and a metadata.jsonl with a class label
    and a caption per file."""
    import json

    from nar_diffusers.utils.video_utils import write_video

    root = tmp_path_factory.mktemp("videos")
    captions = ["a cat", "a red fox in the snow", "a small dog on the grass", "a photo of a cat"]
    rows = []
    for i in range(4):
        label = i % 2
        write_video([video_frame(f, label) for f in range(VIDEO_FRAMES)], root / f"clip{i}.mp4", fps=8)
        rows.append({"file_name": f"clip{i}.mp4", "label": label, "text": captions[i]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root
