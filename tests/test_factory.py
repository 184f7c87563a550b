import pytest

from nar_diffusers import NeighborScheduler, RasterScheduler
from nar_diffusers.models.model_sizes import MODEL_SIZES, resolve_model_size
from nar_diffusers.training.factory import build_pipeline, build_transformer, default_dropout
from nar_diffusers.training.vq_training import build_vqmodel

RESOLUTION = 8
CAPTION_DIM = 24
CAPTION_TOKENS = 8


def test_presets_architectures_and_pipeline_schedulers():
    assert resolve_model_size("B") == ("GPT-B", MODEL_SIZES["GPT-B"])
    assert (MODEL_SIZES["GPT-XL"].num_layers, MODEL_SIZES["GPT-XL"].num_attention_heads) == (36, 20)
    assert MODEL_SIZES["GPT-XL"].hidden_size == 1280 and MODEL_SIZES["GPT-7B"].hidden_size == 4096
    assert default_dropout("GPT-L") == 0.1 and default_dropout("tiny") == 0.0
    with pytest.raises(ValueError, match="`--model_size`"):
        resolve_model_size("GPT-Q", flag="--model_size")

    nar = build_transformer("tiny", "nar", (4, 4), 16, num_classes=3, dropout=0.1)
    raster = build_transformer("tiny", "raster", (4, 4), 16, num_classes=3)
    assert nar.config.num_decoding_heads == 2 and len(nar.blocks) == 3  # one extra block for the second head
    assert raster.config.num_decoding_heads == 1 and len(raster.blocks) == 2
    assert nar.config.residual_dropout == nar.config.token_dropout == nar.config.ffn_dropout == 0.1
    text = build_transformer("tiny", "nar", (4, 4), 16, caption_dim=CAPTION_DIM, num_condition_tokens=CAPTION_TOKENS)
    assert text.condition_type == "text" and text.config.num_condition_tokens == CAPTION_TOKENS
    vqvae = build_vqmodel((8, 16), 1, 8, 4, 16, 4, 3, RESOLUTION, mid_block_add_attention=False)
    assert isinstance(build_pipeline(nar, vqvae).scheduler, NeighborScheduler)
    assert isinstance(build_pipeline(raster, vqvae).scheduler, RasterScheduler)
    with pytest.raises(ValueError, match="--architecture"):
        build_transformer("tiny", "parallel", (4, 4), 16, num_classes=3)
