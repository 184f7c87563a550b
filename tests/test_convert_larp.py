"""Every distributed form of the LARP tokenizer loads as a LARPTokenizer with the same weights, safely."""

import copy
import json
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_larp_tokenizer import make_tokenizer

from nar_diffusers import LARPTokenizer
from nar_diffusers.conversion.checkpoint import UnsafeCheckpointError
from nar_diffusers.conversion.larp import load_larp_tokenizer, tokenizer_from_state_dict

# LARP's own init arguments for the TINY tokenizer, as its configs and trainer files hold them.
LARP_KWARGS = {
    "bottleneck": {"name": "bottleneck", "args": {"bottleneck_dim": 4, "norm": "none", "regularizer": {
        "name": "vq", "args": {"codebook_size": 16, "l2_normalized": True, "stochastic": True,
                               "stochastic_temperature": 0.05}}}},
    "prior_model": {"name": "gptc-S", "n_rounds": 2},
    "bottleneck_token_num": 8, "input_size": 8, "frame_num": 4, "temporal_patch_size": 2, "patch_size": 4,
    "decoder_temporal_patch_size": 2, "decoder_patch_size": 4, "in_channels": 3,
    "encoder_hidden_size": 32, "decoder_hidden_size": 32, "encoder_num_heads": 4, "decoder_num_heads": 4,
    "encoder_depth": 2, "decoder_depth": 2, "use_decoder_patch_query_token_type_embed": True,
}  # fmt: skip


@pytest.fixture(scope="module")
def source():
    model = make_tokenizer()
    published = {k: v.clone() for k, v in model.state_dict().items()}
    published["prior_model.pos_emb"] = torch.randn(1, 8, 6)  # the training-only prior is dropped
    published["prior_model.head.weight"] = torch.randn(4, 6)
    return model, published


def assert_same_model(loaded: LARPTokenizer, model: LARPTokenizer):
    assert loaded.config.stochastic_temperature in (0.05, model.config.stochastic_temperature)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    video = torch.rand(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.encode(video), model.encode(video))


@pytest.mark.parametrize("weights_name", ["model.safetensors", "pytorch_model.bin"])
def test_hub_style_folder(source, tmp_path, weights_name):
    model, published = source
    (tmp_path / "config.json").write_text(json.dumps(LARP_KWARGS))
    if weights_name.endswith(".safetensors"):
        save_file(published, tmp_path / weights_name)
    else:
        torch.save(published, tmp_path / weights_name)
    loaded = load_larp_tokenizer(tmp_path)
    assert_same_model(loaded, model)
    assert loaded.config.stochastic_temperature == 0.05


def test_nar_folder_of_one_state_dict_and_one_json(source, tmp_path):
    model, published = source
    torch.save({f"module.{k}": v for k, v in published.items()}, tmp_path / "larp.pth")
    (tmp_path / "larp.json").write_text(json.dumps(LARP_KWARGS))
    assert_same_model(load_larp_tokenizer(tmp_path), model)
    torch.save(published, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"exactly one \*\.pth file"):
        load_larp_tokenizer(tmp_path)


def _save_trainer_file(path, payload):
    """torch.save with an `easydict.EasyDict` class like the LARP trainer's, which the loader must not need."""
    module = types.ModuleType("easydict")

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "easydict", "EasyDict"
    module.EasyDict = EasyDict
    sys.modules["easydict"] = module
    try:
        torch.save(payload(EasyDict), path)
    finally:
        del sys.modules["easydict"]


def test_larp_trainer_file_with_easydict_config_rng_states_and_ema(source, tmp_path):
    model, published = source
    ema_model = make_tokenizer()
    with torch.no_grad():
        for p in ema_model.parameters():
            p.mul_(0.5)
    path = tmp_path / "larp_trainer.pth"
    _save_trainer_file(path, lambda EasyDict: {
        "model": {"name": "larp_tokenizer", "args": EasyDict(LARP_KWARGS), "sd": published,
                  "ema_sd": {0.9999: ema_model.state_dict()}},
        "cfg": EasyDict({"optimizer": EasyDict({"name": "adamw", "args": {"lr": 1e-4}})}),
        "epoch": 3, "rng_states_per_rank": {0: {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}},
    })  # fmt: skip
    assert "easydict" not in sys.modules
    assert_same_model(load_larp_tokenizer(path), model)
    assert_same_model(load_larp_tokenizer(path, ema=True), ema_model)
    assert_same_model(load_larp_tokenizer(path, ema=0.9999), ema_model)
    with pytest.raises(ValueError, match="not among the EMA decays"):
        load_larp_tokenizer(path, ema=0.99)


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_trainer_file_with_code_in_it_is_refused(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, published = source
    torch.save({"model": {"args": LARP_KWARGS, "sd": published}, "hook": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        load_larp_tokenizer(tmp_path / "evil.pth")
    assert not (tmp_path / "PWNED").exists()


def test_a_saved_larp_tokenizer_folder_loads_as_is(source, tmp_path):
    model, _ = source
    model.save_pretrained(tmp_path)
    assert_same_model(load_larp_tokenizer(tmp_path), model)


def test_weights_that_do_not_fit_the_published_layout_are_named(source):
    model, published = source
    with pytest.raises(ValueError, match=r"encoder_depth=3 \(weights: 2\)"):
        tokenizer_from_state_dict({**LARP_KWARGS, "encoder_depth": 3}, published)
    with pytest.raises(ValueError, match="unexpected.*encoder_h_embed"):
        tokenizer_from_state_dict(LARP_KWARGS, {**published, "encoder_h_embed": torch.zeros(1, 2, 32)})
    with pytest.raises(ValueError, match="3-D patch embedding"):
        tokenizer_from_state_dict(LARP_KWARGS, {**published, "x_embedder.proj.weight": torch.zeros(32, 3, 4, 4)})
    # Without the decoder's token-type embedding (use_decoder_patch_query_token_type_embed: false) it is zero.
    reduced = {k: v for k, v in published.items() if k != "decoder_patch_query_token_type_embed"}
    loaded = tokenizer_from_state_dict(LARP_KWARGS, reduced)
    assert loaded.decoder_patch_query_token_type_embed.abs().sum() == 0


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        load_larp_tokenizer(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(LARP_KWARGS))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_larp_tokenizer(tmp_path)


def test_the_published_larp_l_long_maps_completely():
    """Shape-only weights of LARP-L-long (published config) build the full-size tokenizer."""
    kwargs = {**copy.deepcopy(LARP_KWARGS), "bottleneck_token_num": 1024, "input_size": 128, "frame_num": 16,
              "temporal_patch_size": 4, "patch_size": 8, "decoder_temporal_patch_size": 4, "decoder_patch_size": 8,
              "encoder_hidden_size": 768, "decoder_hidden_size": 768, "encoder_num_heads": 12,
              "decoder_num_heads": 12, "encoder_depth": 12, "decoder_depth": 12}  # fmt: skip
    kwargs["bottleneck"]["args"]["regularizer"]["args"]["codebook_size"] = 8192
    with torch.device("meta"):
        shapes = LARPTokenizer(codebook_dim=16).state_dict()
    loaded = tokenizer_from_state_dict(kwargs, shapes)
    assert loaded.token_grid(16, 128, 128) == (4, 16, 16)
    assert sum(p.numel() for p in loaded.parameters()) == 172_179_984  # about 173M, as LARP-L-long is described
    with torch.device("meta"):
        published = LARPTokenizer(stochastic_temperature=0.05).config
    assert {k: loaded.config[k] for k in published if not k.startswith("_")} == {
        k: v for k, v in published.items() if not k.startswith("_")
    }


# --- sizes from the files are checked before anything is allocated -------------------------------------------------

from test_size_guard import refused_quickly  # noqa: E402


def test_a_saved_larp_tokenizer_config_with_an_absurd_hidden_size_is_refused_before_any_allocation(source, tmp_path):
    model, _ = source
    model.save_pretrained(tmp_path / "saved")
    config_file = tmp_path / "saved" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "hidden_size": 1e9}))
    refused_quickly(lambda: load_larp_tokenizer(tmp_path / "saved"), str(config_file), "`hidden_size` = 1000000000.0")


def test_larp_init_arguments_with_an_absurd_clip_size_are_refused_before_any_allocation(source, tmp_path):
    _, published = source
    torch.save(published, tmp_path / "larp.pth")
    (tmp_path / "larp.json").write_text(json.dumps({**LARP_KWARGS, "frame_num": 1e9}))
    refused_quickly(lambda: load_larp_tokenizer(tmp_path), "larp.json", "`num_frames` = 1000000000")


def test_a_pth_whose_codebook_is_a_stride_0_view_of_2e9_rows_is_refused_without_materialising_it(source, tmp_path):
    _, published = source
    hostile = {**published, "bottleneck.regularizer.embedding.weight": torch.zeros(1, 4).expand(2_000_000_000, 4)}
    torch.save(hostile, tmp_path / "larp.pth")  # stores the 4 floats only: 32 GB once materialised
    (tmp_path / "larp.json").write_text(json.dumps(LARP_KWARGS))
    assert (tmp_path / "larp.pth").stat().st_size < 1_000_000
    refused_quickly(lambda: load_larp_tokenizer(tmp_path), "larp.pth",
                    "`bottleneck.regularizer.embedding.weight` of shape [2000000000, 4]", "stride-0")  # fmt: skip
    # The same tensor inside a LARP trainer file (model.sd) is refused the same way.
    torch.save({"model": {"name": "larp", "args": LARP_KWARGS, "sd": hostile}}, tmp_path / "trainer.pth")
    refused_quickly(lambda: load_larp_tokenizer(tmp_path / "trainer.pth"), "model/sd/bottleneck.regularizer")
