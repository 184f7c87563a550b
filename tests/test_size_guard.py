"""Sizes read from files are refused, in one line naming the file, the key and the value, before anything is
allocated from them: model configs (bounds and a meta-device size estimate) and checkpoint tensors whose stored
bytes cannot back their shape."""

import json
import resource
import time

import pytest
import torch
from conftest import make_pipeline, make_transformer, make_vqmodel
from diffusers import VQModel

from nar_diffusers import LARPTokenizer, NARPipeline, NARTransformer, NARVideoPipeline, NeighborScheduler
from nar_diffusers.utils import size_guard
from nar_diffusers.utils.size_guard import (
    MAX_MODEL_BYTES_ENV,
    SizeGuardError,
    check_config_bounds,
    check_model_config,
    check_state_dict_storage,
    check_stored_tensor,
    count_model_weights,
)

TINY_LARP = dict(
    num_frames=4, sample_size=8, temporal_patch_size=2, patch_size=4, hidden_size=32, num_attention_heads=4,
    num_encoder_layers=2, num_decoder_layers=2, num_latent_tokens=8, codebook_size=16, codebook_dim=4,
)  # fmt: skip


def edit_config(path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def peak_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def refused_quickly(call, *patterns: str, error: type[Exception] = SizeGuardError) -> str:
    """Run `call`, which must raise a one-line `error` containing every pattern, within a second and without
    raising the process's peak memory by more than 200 MB."""
    peak, start = peak_memory_bytes(), time.perf_counter()
    with pytest.raises(error) as info:
        call()
    assert time.perf_counter() - start < 1.0
    assert peak_memory_bytes() - peak < 200 * 2**20
    message = str(info.value)
    assert "\n" not in message
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    return message


@pytest.fixture
def saved_pipeline(tmp_path):
    make_pipeline().save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def test_a_transformer_config_with_an_absurd_hidden_size_is_refused_before_any_allocation(tmp_path):
    make_transformer().save_pretrained(tmp_path / "t")
    config = tmp_path / "t" / "config.json"
    edit_config(config, hidden_size=2**30)
    message = refused_quickly(lambda: NARTransformer.from_pretrained(tmp_path / "t"), "`hidden_size` = 1073741824",
                              str(config), "[1, 65536]")  # fmt: skip
    assert "an int" in message
    edit_config(config, hidden_size=1e9)  # JSON 1e9 is a float where an int is expected
    refused_quickly(lambda: NARTransformer.from_pretrained(tmp_path / "t"), "`hidden_size` = 1000000000.0")


@pytest.mark.parametrize(
    "key, value",
    [("num_layers", 10**6), ("vocab_size", 2**40), ("num_attention_heads", -1), ("grid_size", [4096, 4096]),
     ("grid_size", [4, "4"]), ("num_classes", True), ("num_condition_tokens", 2.5), ("caption_dim", 10**9)],
)  # fmt: skip
def test_each_transformer_size_key_is_bounded_and_must_be_an_int(key, value):
    with pytest.raises(SizeGuardError, match=f"config.json: `{key}`"):
        check_config_bounds(NARTransformer, {key: value}, "config.json")


def test_a_pipeline_folder_whose_transformer_is_absurd_is_refused_before_any_component_loads(saved_pipeline, monkeypatch):
    edit_config(saved_pipeline / "transformer" / "config.json", hidden_size=2**30)

    def no_loading(*args, **kwargs):
        raise AssertionError("a component was loaded before the folder was checked")

    monkeypatch.setattr(VQModel, "from_pretrained", no_loading)
    refused_quickly(lambda: NARPipeline.from_pretrained(saved_pipeline), "transformer", "`hidden_size` = 1073741824")


def test_a_pipeline_folder_whose_vq_model_is_absurd_is_refused(saved_pipeline):
    # VQModel is diffusers' own class: only the pipeline's check covers its config.
    edit_config(saved_pipeline / "vqvae" / "config.json", num_vq_embeddings=10**12)
    refused_quickly(lambda: NARPipeline.from_pretrained(saved_pipeline), "vqvae", "`num_vq_embeddings` = 1000000000000")
    # A component passed as an object is not read from the folder.
    loaded = NARPipeline.from_pretrained(saved_pipeline, vqvae=make_vqmodel())
    assert isinstance(loaded.vqvae, VQModel)


def test_a_video_pipeline_whose_larp_tokenizer_is_absurd_is_refused(tmp_path):
    larp = LARPTokenizer(**TINY_LARP)
    transformer = make_transformer(grid_size=(2, 2, 2), num_decoding_heads=3, vocab_size=16)
    pipe = NARVideoPipeline(transformer=transformer, vqvae=larp, scheduler=NeighborScheduler(grid_size=(2, 2, 2)))
    pipe.save_pretrained(tmp_path / "video")
    assert NARVideoPipeline.from_pretrained(tmp_path / "video").vqvae.grid == (2, 2, 2)
    edit_config(tmp_path / "video" / "vqvae" / "config.json", hidden_size=1e9)
    refused_quickly(lambda: NARVideoPipeline.from_pretrained(tmp_path / "video"), "vqvae", "`hidden_size` = 1000000000.0")


def test_a_model_bigger_than_the_memory_limit_is_refused_naming_its_sizes_and_the_override(tmp_path, monkeypatch):
    make_transformer().save_pretrained(tmp_path / "t")
    monkeypatch.setenv(MAX_MODEL_BYTES_ENV, "1000")
    message = refused_quickly(lambda: NARTransformer.from_pretrained(tmp_path / "t"), MAX_MODEL_BYTES_ENV,
                              "hidden_size=32", "GiB")  # fmt: skip
    assert "largest sizes" in message
    monkeypatch.setenv(MAX_MODEL_BYTES_ENV, "1e12")
    assert NARTransformer.from_pretrained(tmp_path / "t").config.hidden_size == 32
    monkeypatch.setenv(MAX_MODEL_BYTES_ENV, "lots")
    with pytest.raises(SizeGuardError, match=f"{MAX_MODEL_BYTES_ENV}='lots' must be a positive number"):
        NARTransformer.from_pretrained(tmp_path / "t")


def test_a_plausible_but_huge_config_is_refused_by_the_meta_device_estimate_without_allocating():
    # Every key within its bound, the product far beyond any machine: 1024 blocks of width 16384.
    config = dict(hidden_size=2**14, num_layers=1024, num_attention_heads=128, vocab_size=2**22, grid_size=[64, 64])
    message = refused_quickly(lambda: check_model_config(NARTransformer, config, "big/config.json"), "big/config.json",
                              "num_layers=1024", "hidden_size=16384")  # fmt: skip
    assert "3,512,263,720,960 weights" in message


def test_a_config_the_model_refuses_is_a_value_error_naming_the_file(tmp_path):
    make_transformer().save_pretrained(tmp_path / "t")
    edit_config(tmp_path / "t" / "config.json", hidden_size=30)  # not divisible by the 4 heads
    refused_quickly(lambda: NARTransformer.from_pretrained(tmp_path / "t"), "config.json", "valid NARTransformer",
                    "num_attention_heads")  # fmt: skip


@pytest.mark.parametrize(
    "model_class, config",
    [
        (NARTransformer, dict(vocab_size=40, hidden_size=32, num_layers=7, num_attention_heads=4, grid_size=[2, 3, 4],
                              num_decoding_heads=3, position_embedding_type="learned")),
        (LARPTokenizer, {**TINY_LARP, "num_encoder_layers": 5, "num_decoder_layers": 3}),
        (VQModel, dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                       up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D"], layers_per_block=4,
                       num_vq_embeddings=16, vq_embed_dim=4, latent_channels=4)),
    ],
)  # fmt: skip
def test_the_weight_count_extrapolated_over_depth_equals_building_every_block(model_class, config):
    with torch.device("meta"):
        model = model_class(**config)
    expected = sum(t.numel() for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values())
    assert count_model_weights(model_class, config, "config.json") == expected


def test_a_larp_tokenizer_built_on_the_meta_device_allocates_no_position_tables():
    config = {**TINY_LARP, "num_frames": 1024, "sample_size": 4096, "temporal_patch_size": 1, "patch_size": 4,
              "num_latent_tokens": 64, "latent_grid": [4, 4, 4], "hidden_size": 1024, "num_attention_heads": 16}
    start = time.perf_counter()
    with torch.device("meta"):  # 2**30 patches: real tables would take terabytes
        model = LARPTokenizer(**config)
    assert time.perf_counter() - start < 1.0
    assert model.encoder_patch_pe.is_meta and model.decoder_latent_pe.shape == (1, 64, 1024)


def test_tensors_whose_stored_bytes_cannot_back_their_shape_are_refused():
    expanded = torch.zeros(1, 16).expand(2_000_000_000, 16)  # 16 stored floats, 128 GB if materialised
    with pytest.raises(SizeGuardError, match=r"`embedding.weight` of shape \[2000000000, 16\]"):
        check_stored_tensor("embedding.weight", expanded, "ckpt.pth")
    check_stored_tensor("slice", torch.zeros(10, 4)[2:5])  # a view of a larger storage is fine
    check_stored_tensor("empty", torch.zeros(0, 4).expand(0, 4))
    nested = {"model": {"sd": {"ok": torch.zeros(3)}, "ema_sd": {0.999: {"w": torch.zeros(1).expand(10)}}}}
    with pytest.raises(SizeGuardError, match=r"ckpt.pth: tensor `model/ema_sd/0.999/w`"):
        check_state_dict_storage(nested, "ckpt.pth")


def test_the_bounds_are_far_above_every_published_model():
    from nar_diffusers.models.model_sizes import MODEL_SIZES, VIDEO_MODEL_SIZES

    for size in (*MODEL_SIZES.values(), *VIDEO_MODEL_SIZES.values()):
        config = dict(vocab_size=16384, hidden_size=size.hidden_size, num_layers=size.num_layers,
                      num_attention_heads=size.num_attention_heads, grid_size=[32, 32], num_classes=1000)  # fmt: skip
        check_config_bounds(NARTransformer, config, "published")
    with torch.device("meta"):
        larp_l_long = LARPTokenizer()
    check_config_bounds(LARPTokenizer, larp_l_long.config, "LARP-L-long")
    assert set(size_guard.SIZE_BOUNDS) == {"NARTransformer", "LARPTokenizer", "VQModel"}


def test_generate_on_a_folder_with_an_absurd_transformer_is_one_line_and_exit_2(saved_pipeline, tmp_path, capsys):
    from nar_diffusers.commands.cli import main

    edit_config(saved_pipeline / "transformer" / "config.json", hidden_size=2**30)
    start = time.perf_counter()
    code = main(["generate", "--model", str(saved_pipeline), "--output", str(tmp_path / "x.png"), "--device", "cpu",
                 "--class-labels", "1"])  # fmt: skip
    assert code == 2 and time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "`hidden_size` = 1073741824" in err and "Traceback" not in err and not (tmp_path / "x.png").exists()
