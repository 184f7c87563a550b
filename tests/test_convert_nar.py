"""Tests of the published NAR / LlamaGen transformer checkpoint -> NARPipeline folder converter.

The published key layout and the reference forward pass below are written from the published method and checkpoint
format (arXiv 2503.10696, github.com/ThisisBillhe/NAR), independently of the converter and of `NARTransformer`: the
reference reads the raw published state dict.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import make_text_encoder, make_tokenizer
from nar_diffusers import NARPipeline, NeighborScheduler, RasterScheduler
from nar_diffusers.commands.cli import main as cli_main
from nar_diffusers.conversion.output import MANIFEST_NAME, read_manifest
from nar_diffusers.conversion.transformer import (
    MODEL_SIZES,
    ModelSize,
    convert_nar_checkpoint,
    convert_nar_state_dict,
    nar_config_from_state_dict,
)
from test_convert_vq import VQ16_SMALL, RefVQ, assert_close_scaled, randomize_, run_script, save_pickle_payload

REPO_ROOT = Path(__file__).resolve().parent.parent

# A tiny model family member: 2 trunk layers, 4 query heads sharing 2 KV heads (GQA), width 32.
TINY = ModelSize(num_layers=2, num_attention_heads=4, hidden_size=32)
TINY_DICT = {"num_layers": 2, "num_attention_heads": 4, "hidden_size": 32}
NUM_KV_HEADS = 2
FFN = 256  # int(8 * 32 / 3) = 85, rounded up to a multiple of 256
VOCAB = VQ16_SMALL["codebook_size"]  # 64: the tiny VQ-16 codebook
NUM_CLASSES = 10
CAPTION_DIM = 24
NUM_COND = 8
IMAGE_SIZE = 64  # / 16 -> a 4x4 token grid
GRID = 4


# ----------------------------------------------------------------------------------------------------------------------
# Published checkpoints (the published checkpoint layout)
# ----------------------------------------------------------------------------------------------------------------------


def published_state_dict(
    text: bool = False, num_heads: int = 2, seed: int = 0, size: ModelSize = TINY, n_kv: int = NUM_KV_HEADS,
    vocab: int = VOCAB, num_classes: int = NUM_CLASSES, caption_dim: int = CAPTION_DIM, num_cond: int = NUM_COND,
    ffn: int = FFN, device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """A random state dict in the published layout: NAR (`num_heads=2`, n_layer + 1 blocks) or LlamaGen (1, n_layer)."""
    gen = torch.Generator().manual_seed(seed)
    dim, n_head = size.hidden_size, size.num_attention_heads
    hd = dim // n_head

    def rand(*shape: int, scale: float | None = None) -> torch.Tensor:
        if device == "meta":
            return torch.empty(*shape, device="meta")
        scale = shape[-1] ** -0.5 if scale is None else scale
        return torch.randn(*shape, generator=gen) * scale

    def norm() -> torch.Tensor:
        return torch.empty(dim, device="meta") if device == "meta" else 1.0 + 0.2 * torch.randn(dim, generator=gen)

    sd: dict[str, torch.Tensor] = {}
    if text:
        sd["cls_embedding.cap_proj.fc1.weight"] = rand(dim, caption_dim)
        sd["cls_embedding.cap_proj.fc2.weight"] = rand(dim, dim)
        sd["cls_embedding.uncond_embedding"] = rand(num_cond, caption_dim, scale=1.0)
    else:
        sd["cls_embedding.embedding_table.weight"] = rand(num_classes + 1, dim, scale=1.0)
    sd["tok_embeddings.weight"] = rand(vocab, dim, scale=1.0)
    for i in range(size.num_layers + num_heads - 1):
        sd[f"layers.{i}.attention.wqkv.weight"] = rand((n_head + 2 * n_kv) * hd, dim)
        sd[f"layers.{i}.attention.wo.weight"] = rand(dim, n_head * hd)
        sd[f"layers.{i}.feed_forward.w1.weight"] = rand(ffn, dim)
        sd[f"layers.{i}.feed_forward.w3.weight"] = rand(ffn, dim)
        sd[f"layers.{i}.feed_forward.w2.weight"] = rand(dim, ffn)
        sd[f"layers.{i}.attention_norm.weight"] = norm()
        sd[f"layers.{i}.ffn_norm.weight"] = norm()
    sd["norm.weight"] = norm()
    sd["output.weight"] = rand(vocab, dim)
    if num_heads == 2:
        sd["medusa_norm.weight"] = norm()
        sd["medusa_output.weight"] = rand(vocab, dim)
    return sd


def kv_cache_buffers(num_blocks: int) -> dict[str, torch.Tensor]:
    """The inference cache buffers published checkpoints may carry (no weights)."""
    out = {}
    for i in range(num_blocks):
        out[f"layers.{i}.attention.kv_cache.k_cache"] = torch.zeros(2, 4, 3, 8)
        out[f"layers.{i}.attention.kv_cache.v_cache"] = torch.zeros(2, 4, 3, 8)
    return out


def save_wrapped(sd: dict[str, torch.Tensor], path: Path, wrapper: str | None, prefix: str = "") -> Path:
    """torch.save the state dict as training scripts do: under a wrapper key, with a prefix and cache buffers."""
    num_blocks = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    flat = {f"{prefix}{k}": v for k, v in {**sd, **kv_cache_buffers(num_blocks)}.items()}
    torch.save(flat if wrapper is None else {wrapper: flat, "steps": 100}, path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Independent reference forward pass of the published model (the NAR paper and its published code)
# ----------------------------------------------------------------------------------------------------------------------


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x32 = x.to(torch.float32)
    return (x32 / torch.sqrt(x32.square().mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight


def ref_rotary(coords: list[tuple[int, int]], num_cond: int, hd: int, base: float = 10000.0):
    """cos, sin of shape (num_cond + len(coords), hd / 2): zero rows for the condition, then [r * f, c * f]."""
    quarter = hd // 4
    freqs = torch.tensor([base ** (-(2.0 * i) / (hd / 2)) for i in range(quarter)], dtype=torch.float32)
    rows = torch.tensor([r for r, _ in coords], dtype=torch.float32)[:, None] * freqs
    cols = torch.tensor([c for _, c in coords], dtype=torch.float32)[:, None] * freqs
    angles = torch.cat([rows, cols], dim=1)
    zeros = torch.zeros(num_cond, hd // 2)
    return torch.cat([zeros, angles.cos()]), torch.cat([zeros, angles.sin()])


def ref_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, heads, hd): rotate adjacent pairs (x[2j], x[2j+1]) by angle j, in float32."""
    x32 = x.float()
    even, odd = x32[..., 0::2], x32[..., 1::2]
    cos, sin = cos[None, :, None], sin[None, :, None]
    out = torch.empty_like(x32)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = odd * cos + even * sin
    return out.to(x.dtype)


def ref_mask(num_cond: int, coords: list[tuple[int, int]], cond_valid: torch.Tensor, proximity: bool) -> torch.Tensor:
    """(B, L, L) True = may attend. Condition causal; visual sees all conditions; visual-visual by plane (proximity,
    raster layout) or causal; padded condition keys hidden except from themselves."""
    n = len(coords)
    length = num_cond + n
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for q in range(length):
        for k in range(length):
            if q < num_cond:
                allowed[q, k] = k <= q
            elif k < num_cond:
                allowed[q, k] = True
            elif proximity:
                allowed[q, k] = sum(coords[k - num_cond]) <= sum(coords[q - num_cond])
            else:
                allowed[q, k] = k <= q
    valid_key = torch.cat([cond_valid.bool(), torch.ones(cond_valid.shape[0], n, dtype=torch.bool)], dim=1)
    eye = torch.eye(length, dtype=torch.bool)
    return allowed[None] & (valid_key[:, None, :] | eye[None])


def ref_block(sd, i: int, x, cos, sin, mask, n_head: int) -> torch.Tensor:
    p = f"layers.{i}."
    batch, length, dim = x.shape
    hd = dim // n_head
    n_kv = (sd[p + "attention.wqkv.weight"].shape[0] // hd - n_head) // 2
    y = ref_rms_norm(x, sd[p + "attention_norm.weight"])
    qkv = y @ sd[p + "attention.wqkv.weight"].T
    q = qkv[..., : n_head * hd].reshape(batch, length, n_head, hd)
    k = qkv[..., n_head * hd : (n_head + n_kv) * hd].reshape(batch, length, n_kv, hd)
    v = qkv[..., (n_head + n_kv) * hd :].reshape(batch, length, n_kv, hd)
    q, k = ref_rotate(q, cos, sin), ref_rotate(k, cos, sin)
    k = k.repeat_interleave(n_head // n_kv, dim=2)
    v = v.repeat_interleave(n_head // n_kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(hd))
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v).reshape(batch, length, dim)
    h = x + attn @ sd[p + "attention.wo.weight"].T
    z = ref_rms_norm(h, sd[p + "ffn_norm.weight"])
    ffn = (F.silu(z @ sd[p + "feed_forward.w1.weight"].T) * (z @ sd[p + "feed_forward.w3.weight"].T))
    return h + ffn @ sd[p + "feed_forward.w2.weight"].T


def ref_condition(sd, class_labels=None, captions=None) -> torch.Tensor:
    if class_labels is not None:
        return sd["cls_embedding.embedding_table.weight"][class_labels][:, None]
    hidden = F.gelu(captions @ sd["cls_embedding.cap_proj.fc1.weight"].T, approximate="tanh")
    return hidden @ sd["cls_embedding.cap_proj.fc2.weight"].T


def ref_hidden_states(sd, n_layer, n_head, cond, token_ids, coords, cond_valid, proximity, num_blocks):
    """Hidden states after every block of the sequence [cond, tokens]."""
    x = torch.cat([cond, sd["tok_embeddings.weight"][token_ids]], dim=1)
    num_cond = cond.shape[1]
    cos, sin = ref_rotary(coords, num_cond, x.shape[-1] // n_head)
    mask = ref_mask(num_cond, coords, cond_valid, proximity)
    outs = []
    for i in range(num_blocks):
        x = ref_block(sd, i, x, cos, sin, mask, n_head)
        outs.append(x)
    return outs


def ref_nar_logits(sd, size: ModelSize, tokens, cond, cond_valid) -> torch.Tensor:
    """(B, H, W, V) logits of a published NAR model: proximity mask in raster order, stacked heads, parents rule."""
    batch, height, width = tokens.shape
    num_cond = cond.shape[1]
    coords = [(r, c) for r in range(height) for c in range(width)]
    hidden = ref_hidden_states(
        sd, size.num_layers, size.num_attention_heads, cond, tokens.flatten(1), coords, cond_valid, True,
        size.num_layers + 1,
    )
    right = (ref_rms_norm(hidden[size.num_layers - 1], sd["norm.weight"]) @ sd["output.weight"].T).float()
    down = (ref_rms_norm(hidden[size.num_layers], sd["medusa_norm.weight"]) @ sd["medusa_output.weight"].T).float()
    logits = torch.empty(batch, height, width, right.shape[-1])
    for r in range(height):
        for c in range(width):
            if r == 0 and c == 0:
                parents = [right[:, num_cond - 1], down[:, num_cond - 1]]
            else:
                parents = []
                if c > 0:  # head 0 ("right") of the left neighbour
                    parents.append(right[:, num_cond + r * width + c - 1])
                if r > 0:  # head 1 ("down") of the token above
                    parents.append(down[:, num_cond + (r - 1) * width + c])
            logits[:, r, c] = torch.stack(parents).mean(0)
    return logits


def ref_llamagen_logits(sd, size: ModelSize, tokens, cond, cond_valid) -> torch.Tensor:
    """(B, H, W, V) logits of a published LlamaGen model: input [cond, tokens[:-1]], causal, one head."""
    batch, height, width = tokens.shape
    num_cond = cond.shape[1]
    coords = [(r, c) for r in range(height) for c in range(width)][:-1]
    hidden = ref_hidden_states(
        sd, size.num_layers, size.num_attention_heads, cond, tokens.flatten(1)[:, :-1], coords, cond_valid, False,
        size.num_layers,
    )
    logits = (ref_rms_norm(hidden[-1], sd["norm.weight"]) @ sd["output.weight"].T).float()
    return logits[:, num_cond - 1 :].reshape(batch, height, width, -1)


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: three converted pipelines, shared by the tests of this module
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nar_conversion")


@pytest.fixture(scope="module")
def ref_vq() -> RefVQ:
    return randomize_(RefVQ(**VQ16_SMALL), seed=0)


@pytest.fixture(scope="module")
def vq_checkpoint(ref_vq: RefVQ, workdir: Path) -> Path:
    sd = {**ref_vq.state_dict(), "quantize.codebook_used": torch.zeros(VOCAB)}
    path = workdir / "vq_ds16_tiny.pt"
    torch.save({"model": sd}, path)
    return path


@pytest.fixture(scope="module")
def class_sd() -> dict[str, torch.Tensor]:
    return published_state_dict(text=False, num_heads=2, seed=1)


@pytest.fixture(scope="module")
def text_sd() -> dict[str, torch.Tensor]:
    return published_state_dict(text=True, num_heads=2, seed=2)


@pytest.fixture(scope="module")
def raster_sd() -> dict[str, torch.Tensor]:
    return published_state_dict(text=False, num_heads=1, seed=3)


@pytest.fixture(scope="module")
def text_encoder_dir(workdir: Path) -> Path:
    folder = workdir / "tiny-t5"
    tokenizer = make_tokenizer()
    make_text_encoder(len(tokenizer), CAPTION_DIM).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_gpt_b(monkeypatch):
    """Let the published size name "GPT-B" stand for the tiny size (the command line only takes published names)."""
    monkeypatch.setitem(MODEL_SIZES, "GPT-B", TINY)


# The command line as a user runs it, in a fresh interpreter whose "GPT-B" entry is the tiny size.
SCRIPT_RUNNER = (
    "import runpy, sys; import nar_diffusers.conversion.transformer as t; "
    "t.MODEL_SIZES['GPT-B'] = t.ModelSize(2, 4, 32); sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.fixture(scope="module")
def class_dir(class_sd, vq_checkpoint, workdir) -> Path:
    """NAR class-to-image, DeepSpeed-style checkpoint ("module" + "module." + KV caches), via the script."""
    ckpt = save_wrapped(class_sd, workdir / "nar_tiny_c2i.pt", "module", prefix="module.")
    out = workdir / "converted" / "nar-c2i"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT_RUNNER, "conversion/convert_nar_to_diffusers.py",
         "--transformer-checkpoint", str(ckpt), "--model-size", "GPT-B", "--image-size", str(IMAGE_SIZE),
         "--vq-checkpoint", str(vq_checkpoint), "--output-dir", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def text_dir(text_sd, vq_checkpoint, text_encoder_dir, workdir) -> Path:
    """NAR text-to-image, "_orig_mod."-prefixed bare state dict, with a T5 encoder, via `main`."""
    ckpt = save_wrapped(text_sd, workdir / "nar_tiny_t2i.pt", None, prefix="_orig_mod.")
    out = workdir / "converted" / "nar-t2i"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(MODEL_SIZES, "GPT-B", TINY)
        code = cli_main(["convert",
            "--transformer-checkpoint", str(ckpt), "--model-size", "GPT-B", "--image-size", str(IMAGE_SIZE),
            "--vq-checkpoint", str(vq_checkpoint), "--output-dir", str(out), "--text-encoder-path",
            str(text_encoder_dir),
        ])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def raster_dir(raster_sd, class_dir, workdir) -> Path:
    """LlamaGen raster class-to-image under "state_dict", reusing the converted VQ folder (--vq-path), via `main`."""
    ckpt = save_wrapped(raster_sd, workdir / "llamagen_tiny_c2i.pt", "state_dict")
    out = workdir / "converted" / "llamagen-c2i"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(MODEL_SIZES, "GPT-B", TINY)
        code = cli_main(["convert",
            "--transformer-checkpoint", str(ckpt), "--model-size", "GPT-B", "--image-size", str(IMAGE_SIZE),
            "--architecture", "llamagen", "--vq-path", str(class_dir / "vqvae"), "--output-dir", str(out),
        ])
    assert code == 0
    return out


def load(folder: Path) -> NARPipeline:
    pipe = NARPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_tokens(batch: int, seed: int = 0) -> torch.LongTensor:
    return torch.randint(0, VOCAB, (batch, GRID, GRID), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# Size table and config inference
# ----------------------------------------------------------------------------------------------------------------------


def test_size_table_is_the_published_one():
    expected = {
        "GPT-B": (12, 12, 768), "GPT-M": (18, 16, 1024), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280),
        "GPT-XXL": (48, 24, 1536), "GPT-XXXL": (48, 40, 2560), "GPT-1B": (22, 32, 2048), "GPT-3B": (24, 32, 3200),
        "GPT-7B": (32, 32, 4096),
    }
    assert {name: (s.num_layers, s.num_attention_heads, s.hidden_size) for name, s in MODEL_SIZES.items()} == expected
    assert all(s.ffn_multiple_of == 256 for s in MODEL_SIZES.values())


@pytest.mark.parametrize("name", list(MODEL_SIZES))
def test_published_sizes_map_completely(name):
    """Shape-only (meta) checkpoints of every published size: config inference and a complete key mapping."""
    size = MODEL_SIZES[name]
    ffn = -(-int(8 * size.hidden_size / 3) // 256) * 256  # int(8 * dim / 3) rounded up to a multiple of 256
    sd = published_state_dict(size=size, n_kv=size.num_attention_heads, vocab=16384, num_classes=1000, ffn=ffn,
                              device="meta")
    config = nar_config_from_state_dict(sd, name, 384)
    assert (config["num_layers"], config["num_attention_heads"], config["hidden_size"]) == (
        size.num_layers, size.num_attention_heads, size.hidden_size)
    assert config["grid_size"] == [24, 24] and config["vocab_size"] == 16384 and config["num_classes"] == 1000
    assert config["num_key_value_heads"] == size.num_attention_heads and config["ffn_dim_multiplier"] is None
    assert len(convert_nar_state_dict(sd, config)) == len(sd)


def test_config_inference(class_sd, text_sd, raster_sd):
    c = nar_config_from_state_dict(class_sd, TINY, IMAGE_SIZE)
    assert (c["num_classes"], c["caption_dim"], c["num_condition_tokens"]) == (NUM_CLASSES, None, 1)
    assert (c["vocab_size"], c["num_layers"], c["num_key_value_heads"], c["num_decoding_heads"]) == (VOCAB, 2, 2, 2)
    assert c["grid_size"] == [GRID, GRID] and c["position_embedding_type"] == "rope" and c["ffn_multiple_of"] == 256
    t = nar_config_from_state_dict(text_sd, TINY_DICT, 512, vq_downsample=16)
    assert (t["num_classes"], t["caption_dim"], t["num_condition_tokens"], t["grid_size"]) == (
        None, CAPTION_DIM, NUM_COND, [32, 32])
    r = nar_config_from_state_dict(raster_sd, TINY, 256, architecture="raster")
    assert (r["num_decoding_heads"], r["num_layers"], r["grid_size"]) == (1, 2, [16, 16])
    # A text model with the published 120-token caption table.
    t120 = published_state_dict(text=True, num_cond=120, device="meta")
    assert nar_config_from_state_dict(t120, TINY, 256)["num_condition_tokens"] == 120


# ----------------------------------------------------------------------------------------------------------------------
# The converted folders
# ----------------------------------------------------------------------------------------------------------------------


def test_folder_layout(class_dir, text_dir, raster_dir, workdir):
    for folder in (class_dir, text_dir, raster_dir):
        assert (folder / "model_index.json").is_file()
        assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
        assert (folder / "vqvae" / "diffusion_pytorch_model.safetensors").is_file()
        assert (folder / "scheduler" / "scheduler_config.json").is_file()
    assert (text_dir / "text_encoder").is_dir() and (text_dir / "tokenizer").is_dir()
    assert not (class_dir / "text_encoder").exists()
    # Nothing but the three pipelines: no temporary folders left behind.
    assert sorted(p.name for p in (workdir / "converted").iterdir()) == ["llamagen-c2i", "nar-c2i", "nar-t2i"]


def assert_tensors_landed(transformer, sd: dict[str, torch.Tensor], num_heads: int) -> None:
    """Every published tensor sits where the published checkpoint layout puts it, unchanged."""
    ours = transformer.state_dict()
    n_layer = transformer.config.num_layers
    expected = {"token_embedding.weight": "tok_embeddings.weight",
                "heads.0.norm.weight": "norm.weight", "heads.0.proj.weight": "output.weight"}
    if num_heads == 2:
        expected.update({"heads.1.norm.weight": "medusa_norm.weight", "heads.1.proj.weight": "medusa_output.weight"})
    if "class_embedding.weight" in ours:
        expected["class_embedding.weight"] = "cls_embedding.embedding_table.weight"
    else:
        expected.update({"caption_projection.fc1.weight": "cls_embedding.cap_proj.fc1.weight",
                         "caption_projection.fc2.weight": "cls_embedding.cap_proj.fc2.weight",
                         "caption_projection.uncond_embedding": "cls_embedding.uncond_embedding"})
    for i in range(n_layer + num_heads - 1):
        for ours_name, theirs in (("attention.qkv", "attention.wqkv"), ("attention.out_proj", "attention.wo"),
                                  ("feed_forward.w1", "feed_forward.w1"), ("feed_forward.w2", "feed_forward.w2"),
                                  ("feed_forward.w3", "feed_forward.w3"), ("attention_norm", "attention_norm"),
                                  ("ffn_norm", "ffn_norm")):
            expected[f"blocks.{i}.{ours_name}.weight"] = f"layers.{i}.{theirs}.weight"
    assert set(expected) == set(ours)
    for ours_key, published_key in expected.items():
        assert torch.equal(ours[ours_key], sd[published_key]), ours_key
    assert len(transformer.blocks) == n_layer + num_heads - 1
    if num_heads == 2:  # the extra block for head 1 is the last block
        assert torch.equal(transformer.blocks[-1].attention.qkv.weight, sd[f"layers.{n_layer}.attention.wqkv.weight"])


def test_class_nar_folder(class_dir, class_sd, ref_vq):
    pipe = load(class_dir)
    assert isinstance(pipe.scheduler, NeighborScheduler) and pipe.scheduler.grid_size == (GRID, GRID)
    assert pipe.text_encoder is None and pipe.tokenizer is None
    assert_tensors_landed(pipe.transformer, class_sd, num_heads=2)
    assert pipe.transformer.dtype == torch.float32 and pipe.transformer.config.num_classes == NUM_CLASSES

    labels = torch.tensor([1, 7])
    tokens = random_tokens(2)
    with torch.no_grad():
        ours = pipe.transformer(tokens, class_labels=labels).logits
        ref = ref_nar_logits(class_sd, TINY, tokens, ref_condition(class_sd, class_labels=labels), torch.ones(2, 1))
    assert_close_scaled(ours, ref)

    out = pipe(class_labels=[1, 7], output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, GRID, GRID) and int(out.min()) >= 0 and int(out.max()) < VOCAB

    # The converted VQ model in the folder decodes tokens like the reference tokenizer.
    with torch.no_grad():
        pixels = pipe.decode_tokens(out)
        assert_close_scaled(pixels, ref_vq.decode_indices(out))
    assert pixels.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    images = pipe(class_labels=3, output_type="np", guidance_scale=1.0).images
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_text_nar_folder_with_left_padded_captions(text_dir, text_sd):
    pipe = load(text_dir)
    assert type(pipe.text_encoder).__name__ == "T5EncoderModel" and pipe.tokenizer is not None
    assert_tensors_landed(pipe.transformer, text_sd, num_heads=2)
    assert pipe.transformer.num_condition_tokens == NUM_COND

    gen = torch.Generator().manual_seed(5)
    valid = torch.tensor([3, NUM_COND, 1])
    mask = torch.arange(NUM_COND)[None] >= NUM_COND - valid[:, None]  # valid tokens at the END
    captions = torch.randn(3, NUM_COND, CAPTION_DIM, generator=gen) * mask[..., None]  # padded rows zeroed
    tokens = random_tokens(3, seed=1)
    with torch.no_grad():
        ours = pipe.transformer(tokens, encoder_hidden_states=captions, encoder_attention_mask=mask).logits
        ref = ref_nar_logits(text_sd, TINY, tokens, ref_condition(text_sd, captions=captions), mask)
        # The CFG branch of the published models: the learned table (not zeroed) with the prompt's mask.
        uncond = text_sd["cls_embedding.uncond_embedding"][None].expand(3, -1, -1)
        ours_uncond = pipe.transformer(tokens, encoder_hidden_states=uncond, encoder_attention_mask=mask).logits
        ref_uncond = ref_nar_logits(text_sd, TINY, tokens, ref_condition(text_sd, captions=uncond), mask)
    assert_close_scaled(ours, ref)
    assert_close_scaled(ours_uncond, ref_uncond)

    out = pipe(prompt="a cat", output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, GRID, GRID)


def test_llamagen_raster_folder(raster_dir, raster_sd):
    pipe = load(raster_dir)
    assert isinstance(pipe.scheduler, RasterScheduler) and pipe.transformer.config.num_decoding_heads == 1
    assert_tensors_landed(pipe.transformer, raster_sd, num_heads=1)

    labels = torch.tensor([0, 9, 4])
    tokens = random_tokens(3, seed=2)
    with torch.no_grad():
        ours = pipe.transformer(tokens, class_labels=labels).logits
        ref = ref_llamagen_logits(raster_sd, TINY, tokens, ref_condition(raster_sd, class_labels=labels),
                                  torch.ones(3, 1))
    assert_close_scaled(ours, ref)
    out = pipe(class_labels=[2], output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, GRID, GRID)


def test_converted_folders_carry_the_published_sampling_settings_and_a_model_card(class_dir, text_dir, raster_dir):
    """Each family gets the settings of its published sampling script (NAR c2i: guidance 4.0, top-k 2000; NAR t2i:
    7.5, top-k off; LlamaGen c2i: 4.0, 2000), and a card naming the checkpoint, the FID settings and the license."""
    expected = {
        class_dir: {"guidance_scale": 4.0, "cfg_interval": -1, "temperature": 1.0, "top_k": 2000, "top_p": 1.0},
        text_dir: {"guidance_scale": 7.5, "cfg_interval": -1, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
        raster_dir: {"guidance_scale": 4.0, "cfg_interval": -1, "temperature": 1.0, "top_k": 2000, "top_p": 1.0},
    }
    for folder, defaults in expected.items():
        index = json.loads((folder / "model_index.json").read_text())
        assert index["sampling_defaults"] == defaults and index["id2label"] is None  # 10 classes: not ImageNet
        card = (folder / "README.md").read_text()
        assert "license: other" in card and "2503.10696" in card and "README.md" in read_manifest(folder)
    assert load(class_dir).sampling_defaults["top_k"] == 2000
    class_card = (class_dir / "README.md").read_text()
    assert "published NAR GPT-B class-to-image model" in class_card and "`nar_tiny_c2i.pt`" in class_card
    assert "guidance 2.0 and top-k 0" in class_card  # the FID runs
    assert "published NAR GPT-B text-to-image model" in (text_dir / "README.md").read_text()
    assert "published LlamaGen GPT-B class-to-image" in (raster_dir / "README.md").read_text()


def test_imagenet_models_carry_the_1000_class_names(vq_checkpoint, tmp_path, tiny_gpt_b):
    from nar_diffusers.conversion.published import imagenet_class_names

    names = imagenet_class_names()
    assert len(names) == 1000 and names[207] == "golden retriever" and names[360] == "otter"
    assert names[0].startswith("tench") and names[999].startswith("toilet tissue")
    sd = published_state_dict(num_classes=1000, seed=4)
    ckpt = save_wrapped(sd, tmp_path / "c2i_imagenet.pt", "model")
    out = convert_nar_checkpoint(ckpt, "GPT-B", IMAGE_SIZE, tmp_path / "pipe", vq_checkpoint=vq_checkpoint)
    pipe = load(out)
    assert pipe.get_label_ids(["golden retriever", "otter", "tabby"]) == [207, 360, 281]
    assert "ImageNet class-to-image" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match="golden retriever"):
        pipe.get_label_ids("golden retreiver")


# ----------------------------------------------------------------------------------------------------------------------
# Options and failures
# ----------------------------------------------------------------------------------------------------------------------


def test_bfloat16_and_overwrite(class_sd, vq_checkpoint, tmp_path):
    ckpt = save_wrapped(class_sd, tmp_path / "nar.pt", "model")
    out = tmp_path / "out" / "pipe"
    convert_nar_checkpoint(ckpt, TINY_DICT, IMAGE_SIZE, out, vq_checkpoint=vq_checkpoint, dtype="bfloat16")
    for component in ("transformer", "vqvae"):
        stored = load_file(str(out / component / "diffusion_pytorch_model.safetensors"))
        assert {t.dtype for t in stored.values()} == {torch.bfloat16}, component
    assert NARPipeline.from_pretrained(out, dtype=torch.bfloat16).transformer.dtype == torch.bfloat16

    with pytest.raises(FileExistsError, match="not empty"):
        convert_nar_checkpoint(ckpt, TINY_DICT, IMAGE_SIZE, out, vq_checkpoint=vq_checkpoint)
    convert_nar_checkpoint(ckpt, TINY_DICT, IMAGE_SIZE, out, vq_checkpoint=vq_checkpoint, overwrite=True)
    assert {t.dtype for t in load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors")).values()} == {
        torch.float32}
    assert sorted(p.name for p in out.parent.iterdir()) == ["pipe"]
    assert "model_index.json" in read_manifest(out) and "transformer/config.json" in read_manifest(out)

    # A file the converter did not write blocks --overwrite, and stays.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"did not write.*notes\.txt"):
        convert_nar_checkpoint(ckpt, TINY_DICT, IMAGE_SIZE, out, vq_checkpoint=vq_checkpoint, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model_index.json").is_file()


def _drop_key(sd):
    del sd["layers.1.feed_forward.w3.weight"]
    return r"missing: \[[^\]]*layers\.1\.feed_forward\.w3\.weight"


def _extra_key(sd):
    sd["layers.0.attention.wq_extra.weight"] = torch.zeros(4, 4)
    return r"unexpected: \[[^\]]*layers\.0\.attention\.wq_extra\.weight"


def _wrong_shape(sd):
    sd["medusa_output.weight"] = torch.zeros(VOCAB, 16)
    return r"shape mismatch: \[[^\]]*medusa_output\.weight"


def _drop_block(sd):
    for key in [k for k in sd if k.startswith("layers.2.")]:
        del sd[key]
    return "layer count"


CORRUPTIONS = {"missing-key": _drop_key, "unexpected-key": _extra_key, "wrong-shape": _wrong_shape,
               "layer-count": _drop_block}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_malformed_checkpoint_fails_and_writes_nothing(corrupt, class_sd, vq_checkpoint, tmp_path):
    sd = dict(class_sd)
    pattern = corrupt(sd)
    ckpt = save_wrapped(sd, tmp_path / "bad.pt", "model")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=pattern):
        convert_nar_checkpoint(ckpt, TINY, IMAGE_SIZE, out, vq_checkpoint=vq_checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


BAD_CALLS = {
    "size-name-does-not-fit": (dict(model_size={**TINY_DICT, "num_layers": 3}), "layer count"),
    "size-width-does-not-fit": (dict(model_size="GPT-B"), "hidden size 32"),
    "unknown-size": (dict(model_size="GPT-Huge"), "Unknown `model_size`"),
    "image-size-not-divisible": (dict(image_size=72), "not divisible by the VQ downsample factor 16"),
    "both-vq": (dict(vq_path="somewhere"), "exactly one of `vq_checkpoint`"),
    "neither-vq": (dict(vq_checkpoint=None), "exactly one of `vq_checkpoint`"),
    "text-encoder-for-class-model": (dict(text_encoder_path="t5"), "only for text-to-image"),
    "wrong-architecture": (dict(architecture="raster"), "NAR checkpoint; use architecture 'nar'"),
    "unknown-architecture": (dict(architecture="var"), "Unknown `architecture`"),
}


@pytest.mark.parametrize("overrides,message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_arguments_fail_and_write_nothing(overrides, message, class_sd, vq_checkpoint, tmp_path):
    ckpt = save_wrapped(class_sd, tmp_path / "nar.pt", "model")
    kwargs = dict(model_size=TINY, image_size=IMAGE_SIZE, vq_checkpoint=vq_checkpoint)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        convert_nar_checkpoint(ckpt, output_dir=tmp_path / "out", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nar.pt"]


def test_vocabulary_must_match_the_vq_codebook(vq_checkpoint, tmp_path):
    ckpt = save_wrapped(published_state_dict(vocab=48), tmp_path / "nar.pt", "model")
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        convert_nar_checkpoint(ckpt, TINY, IMAGE_SIZE, tmp_path / "out", vq_checkpoint=vq_checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nar.pt"]


def test_llamagen_checkpoint_needs_llamagen_architecture(raster_sd, vq_checkpoint, tmp_path):
    ckpt = save_wrapped(raster_sd, tmp_path / "llamagen.pt", "model")
    with pytest.raises(ValueError, match="architecture .raster."):
        convert_nar_checkpoint(ckpt, TINY, IMAGE_SIZE, tmp_path / "out", vq_checkpoint=vq_checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llamagen.pt"]


def test_command_line_errors(class_sd, vq_checkpoint, tmp_path, tiny_gpt_b, capsys):
    ckpt = save_wrapped(class_sd, tmp_path / "nar.pt", "model")
    out = str(tmp_path / "out")
    base = ["--transformer-checkpoint", str(ckpt), "--image-size", str(IMAGE_SIZE), "--output-dir", out]
    vq = ["--vq-checkpoint", str(vq_checkpoint)]
    # argparse rejects unknown size names and both / neither VQ source (exit status 2).
    for argv in (base + vq + ["--model-size", "GPT-Huge"],
                 base + vq + ["--model-size", "GPT-B", "--vq-path", str(tmp_path)],
                 base + ["--model-size", "GPT-B"],
                 base + vq + ["--model-size", "GPT-B", "--dtype", "int8"]):
        with pytest.raises(SystemExit) as exc:
            cli_main(["convert", *argv])
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'GPT-Huge'" in err and "not allowed with argument" in err and "one of the arguments" in err
    # Conversion errors are reported and give exit status 2.
    assert cli_main(["convert", *base, *vq, "--model-size", "GPT-B", "--image-size", "72"]) == 2
    assert cli_main(["convert", *base, *vq, "--model-size", "GPT-B", "--text-encoder-path", str(tmp_path)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nar.pt"]


def test_text_encoder_width_must_match_the_caption_width(vq_checkpoint, text_encoder_dir, tmp_path):
    sd = published_state_dict(text=True, caption_dim=16)
    ckpt = save_wrapped(sd, tmp_path / "t2i.pt", "model")
    with pytest.raises(ValueError, match="width 24"):
        convert_nar_checkpoint(ckpt, TINY, IMAGE_SIZE, tmp_path / "out", vq_checkpoint=vq_checkpoint,
                               text_encoder_path=text_encoder_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t2i.pt"]


def test_failed_save_leaves_nothing(class_sd, vq_checkpoint, tmp_path, monkeypatch):
    ckpt = save_wrapped(class_sd, tmp_path / "nar.pt", "model")

    def broken_save(self, save_directory, **kwargs):
        Path(save_directory, "model_index.json").write_text("{}")  # half-written
        raise OSError("disk full")

    monkeypatch.setattr(NARPipeline, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_nar_checkpoint(ckpt, TINY, IMAGE_SIZE, tmp_path / "out" / "pipe", vq_checkpoint=vq_checkpoint)
    assert list((tmp_path / "out").iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------------
# Trust: no code from checkpoints, no deleted user data, one-line errors
# ----------------------------------------------------------------------------------------------------------------------


def convert_argv(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", "--transformer-checkpoint", str(ckpt), "--model-size", "GPT-B", "--image-size",
            str(IMAGE_SIZE), "--output-dir", str(out), *extra]


def error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_trainer_checkpoint_with_args_converts(class_sd, vq_checkpoint, tmp_path, tiny_gpt_b):
    ckpt = tmp_path / "nar.pt"
    torch.save({"model": class_sd, "args": argparse.Namespace(gpt_model="GPT-B", image_size=IMAGE_SIZE)}, ckpt)
    assert cli_main(convert_argv(ckpt, tmp_path / "out", "--vq-checkpoint", str(vq_checkpoint))) == 0
    assert (tmp_path / "out" / "model_index.json").is_file()


@pytest.mark.parametrize("payload_in", ["transformer", "vq"])
def test_pickled_code_is_refused_and_never_runs(payload_in, class_sd, ref_vq, vq_checkpoint, tmp_path, tiny_gpt_b,
                                                 caplog):
    sd = class_sd if payload_in == "transformer" else ref_vq.state_dict()
    payload, marker = save_pickle_payload(sd, tmp_path)
    ckpt = payload if payload_in == "transformer" else save_wrapped(class_sd, tmp_path / "nar.pt", "model")
    vq = payload if payload_in == "vq" else vq_checkpoint
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert cli_main(convert_argv(ckpt, out, "--vq-checkpoint", str(vq))) == 2
    (message,) = error_lines(caplog)
    flag = "--transformer-checkpoint" if payload_in == "transformer" else "--vq-checkpoint"
    assert f"({flag}) {payload}" in message and "builtins.exec" in message and "--trust-pickle" in message
    assert not marker.exists() and not out.exists()


def test_overwrite_refuses_when_an_input_is_inside_output_dir(class_sd, vq_checkpoint, tmp_path, tiny_gpt_b, caplog):
    """The old `--overwrite` deleted the whole output folder, the checkpoint being converted included."""
    out = tmp_path / "pipe"
    ckpt = save_wrapped(class_sd, tmp_path / "nar.pt", "model")
    assert cli_main(convert_argv(ckpt, out, "--vq-checkpoint", str(vq_checkpoint))) == 0

    def assert_refused(argv: list[str]) -> None:
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert cli_main(argv) == 2
        (message,) = error_lines(caplog)
        assert "lies inside `output_dir` (--output-dir)" in message
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # The checkpoint moved into the folder, even listed in its manifest.
    inside = ckpt.rename(out / "nar.pt")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    (out / MANIFEST_NAME).write_text(json.dumps({**manifest, "files": manifest["files"] + ["nar.pt"]}))
    assert_refused(convert_argv(inside, out, "--vq-checkpoint", str(vq_checkpoint), "--overwrite"))
    # Reusing the folder's own tokenizer.
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    ckpt = inside.rename(ckpt)
    assert_refused(convert_argv(ckpt, out, "--vq-path", str(out / "vqvae"), "--overwrite"))


def _checkpoint_is_a_folder(tmp_path, ckpt, vq_checkpoint):
    ckpt.unlink()
    ckpt.mkdir()
    return ["--vq-checkpoint", str(vq_checkpoint)], f"(--transformer-checkpoint) {ckpt} is a folder"


def _truncated_checkpoint(tmp_path, ckpt, vq_checkpoint):
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    return ["--vq-checkpoint", str(vq_checkpoint)], f"(--transformer-checkpoint) {ckpt} is not a readable torch"


def _text_vq_checkpoint(tmp_path, ckpt, vq_checkpoint):
    vq = tmp_path / "vq.safetensors"
    vq.write_text("<html>404 Not Found</html>")
    return ["--vq-checkpoint", str(vq)], f"(--vq-checkpoint) {vq} is a text file, not a .safetensors file"


def _vq_path_without_config(tmp_path, ckpt, vq_checkpoint):
    (tmp_path / "vq").mkdir()
    return ["--vq-path", str(tmp_path / "vq")], f"(--vq-path) {tmp_path / 'vq'} has no config.json"


def _vq_path_is_a_pipeline(tmp_path, ckpt, vq_checkpoint):
    (tmp_path / "pipe" / "vqvae").mkdir(parents=True)
    (tmp_path / "pipe" / "vqvae" / "config.json").write_text("{}")
    return ["--vq-path", str(tmp_path / "pipe")], f"did you mean {tmp_path / 'pipe' / 'vqvae'}?"


def _vq_path_without_weights(tmp_path, ckpt, vq_checkpoint):
    (tmp_path / "vq").mkdir()
    (tmp_path / "vq" / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    return ["--vq-path", str(tmp_path / "vq")], f"(--vq-path) {tmp_path / 'vq'} could not be loaded as a VQModel"


BAD_INPUTS = {
    "checkpoint-is-a-folder": _checkpoint_is_a_folder,
    "truncated-checkpoint": _truncated_checkpoint,
    "text-vq-checkpoint": _text_vq_checkpoint,
    "vq-path-without-config": _vq_path_without_config,
    "vq-path-is-a-pipeline": _vq_path_is_a_pipeline,
    "vq-path-without-weights": _vq_path_without_weights,
}


@pytest.mark.parametrize("make", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_are_one_line_errors(make, class_sd, vq_checkpoint, tmp_path, tiny_gpt_b, caplog):
    ckpt = save_wrapped(class_sd, tmp_path / "nar.pt", "model")
    vq_args, expected = make(tmp_path, ckpt, vq_checkpoint)
    before = sorted(p.name for p in tmp_path.iterdir())
    with caplog.at_level(logging.ERROR):
        assert cli_main(convert_argv(ckpt, tmp_path / "out", *vq_args)) == 2
    (message,) = error_lines(caplog)
    assert expected in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output folder, no temporary folder


def test_unwritable_output_dir_is_a_one_line_error(class_sd, vq_checkpoint, tmp_path, tiny_gpt_b, monkeypatch,
                                                   caplog):
    """Tests run as root, which ignores permission bits: the read-only folder is simulated with `os.access`."""
    ckpt = save_wrapped(class_sd, tmp_path / "nar.pt", "model")
    parent = tmp_path / "readonly"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != parent and real_access(path, mode, **kw))
    with caplog.at_level(logging.ERROR):
        assert cli_main(convert_argv(ckpt, parent / "pipe", "--vq-checkpoint", str(vq_checkpoint))) == 2
    (message,) = error_lines(caplog)
    assert f"`output_dir` (--output-dir) {parent / 'pipe'} cannot be written: the folder {parent} is not" in message
    assert list(parent.iterdir()) == []

    blocker = tmp_path / "file"
    blocker.write_text("x")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert cli_main(convert_argv(ckpt, blocker / "pipe", "--vq-checkpoint", str(vq_checkpoint))) == 2
    (message,) = error_lines(caplog)
    assert f"cannot be created: {blocker} is a file, not a folder" in message


def test_script_reports_bad_input_in_one_line(class_sd, tmp_path):
    ckpt = save_wrapped(class_sd, tmp_path / "nar.pt", "model")
    (tmp_path / "vq").mkdir()
    out = tmp_path / "out"
    proc = run_script("conversion/convert_nar_to_diffusers.py", "--transformer-checkpoint", str(ckpt), "--model-size",
                      "GPT-B", "--image-size", "256", "--vq-path", str(tmp_path / "vq"), "--output-dir", str(out))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and f"(--vq-path) {tmp_path / 'vq'} has no config.json" in errors[0]
    assert "Traceback" not in proc.stderr and not out.exists()


# ----------------------------------------------------------------------------------------------------------------------
# Sizes from the files are checked before anything is allocated; a full disk is one line
# ----------------------------------------------------------------------------------------------------------------------


def test_a_transformer_checkpoint_with_a_stride_0_tensor_is_refused_without_materialising_it(
    class_sd, vq_checkpoint, tmp_path, tiny_gpt_b, caplog
):
    from test_size_guard import refused_quickly

    hostile = {**class_sd, "tok_embeddings.weight": torch.zeros(1, 32).expand(2_000_000_000, 32)}
    ckpt = save_wrapped(hostile, tmp_path / "nar.pt", "model")  # a few KB on disk, 256 GB once materialised
    assert ckpt.stat().st_size < 5_000_000
    call = lambda: convert_nar_checkpoint(ckpt, TINY, IMAGE_SIZE, tmp_path / "out", vq_checkpoint=vq_checkpoint)  # noqa: E731
    refused_quickly(call, str(ckpt), "`model/tok_embeddings.weight` of shape [2000000000, 32]")
    with caplog.at_level(logging.ERROR):
        assert cli_main(convert_argv(ckpt, tmp_path / "out", "--vq-checkpoint", str(vq_checkpoint))) == 2
    (message,) = error_lines(caplog)
    assert "tok_embeddings.weight" in message and "stride-0" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nar.pt"]


def test_convert_onto_a_full_disk_is_one_line_and_exit_2_writing_nothing(
    class_sd, vq_checkpoint, tmp_path, tiny_gpt_b, monkeypatch, caplog
):
    import errno

    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    ckpt = save_wrapped(class_sd, tmp_path / "nar.pt", "model")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with caplog.at_level(logging.ERROR):
        assert cli_main(convert_argv(ckpt, tmp_path / "out", "--vq-checkpoint", str(vq_checkpoint))) == 2
    (message,) = error_lines(caplog)
    assert "Could not write `output_dir`" in message and "No space left on device" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nar.pt"]  # no output, no temporary folder
