import pytest
import torch
from conftest import make_vqmodel

from nar_diffusers.models.vq_codec import (
    decode_tokens_to_images,
    encode_images_to_tokens,
    load_vq_model,
    vq_downsample_factor,
)
from nar_diffusers.training.vq_training import build_vqmodel

RESOLUTION = 16


def tiny_vq():
    """16 px -> 8x8 tokens, 32 codes."""
    torch.manual_seed(0)
    return build_vqmodel((8, 16), 1, 8, 4, 32, 4, 3, RESOLUTION, mid_block_add_attention=False).eval()


def test_encode_images_to_tokens_grid_shape_and_round_trip():
    vqvae = tiny_vq()
    pixels = torch.rand(3, 3, RESOLUTION, RESOLUTION * 2) * 2 - 1
    tokens = encode_images_to_tokens(vqvae, pixels)
    assert tokens.shape == (3, RESOLUTION // 2, RESOLUTION) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < vqvae.config.num_vq_embeddings
    # Token ids decode to the same images as the model's own quantize -> decode path.
    expected = vqvae(pixels).sample
    torch.testing.assert_close(decode_tokens_to_images(vqvae, tokens), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of the VQ downsample factor 2"):
        encode_images_to_tokens(vqvae, torch.zeros(1, 3, 15, 16))


def test_vq_model_loads_from_its_own_folder_or_a_pipeline_folder(tmp_path):
    vqvae = make_vqmodel()
    vqvae.save_pretrained(tmp_path / "vq")
    vqvae.save_pretrained(tmp_path / "pipe" / "vqvae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    for folder in ("vq", "pipe"):
        loaded = load_vq_model(tmp_path / folder)
        assert vq_downsample_factor(loaded) == 2 and not loaded.training
        assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match="`--vq_model_path` .* is not a folder"):
        load_vq_model(tmp_path / "missing", flag="--vq_model_path")


def test_decoding_needs_a_codebook_lookup_model(tmp_path):
    vqvae = make_vqmodel()
    vqvae.register_to_config(lookup_from_codebook=False)
    with pytest.raises(ValueError, match="lookup_from_codebook=True"):
        decode_tokens_to_images(vqvae, torch.zeros(1, 2, 2, dtype=torch.long))
    vqvae.save_pretrained(tmp_path / "vq")
    with pytest.raises(ValueError, match="lookup_from_codebook=True"):
        load_vq_model(tmp_path / "vq")
