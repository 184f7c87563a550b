"""The published NAR video model (LlamaGen blocks, learned absolute positions, heads R/D/B) converts to a
NARTransformer whose teacher-forced logits equal a reference forward pass written here from the published layout."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from nar_diffusers import LARPTokenizer, NARTransformer
from nar_diffusers.conversion.transformer import VIDEO_HEAD_KEYS, published_key_map, transformer_from_state_dict
from nar_diffusers.conversion.video import (
    build_nar_video_pipeline,
    load_nar_video_checkpoint,
    nar_video_config_from_state_dict,
)
from nar_diffusers.models.model_sizes import VIDEO_MODEL_SIZES

GRID = (2, 3, 4)  # non-cubic on purpose
DIM, N_LAYER, VOCAB, CLASSES = 128, 2, 32, 5  # head width 64 as in the published family -> 2 heads
FFN = 512  # int(2 * 4 * 128 / 3) = 341, rounded up to a multiple of 256


def published_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    sd = {
        "abs_pe": rnd(1, 1 + math.prod(GRID), DIM),
        "cls_embedding.embedding_table.weight": rnd(CLASSES + 1, DIM),
        "tok_embeddings.weight": rnd(VOCAB, DIM),
    }
    for i in range(N_LAYER + 2):
        sd[f"layers.{i}.attention.wqkv.weight"] = rnd(3 * DIM, DIM)
        sd[f"layers.{i}.attention.wo.weight"] = rnd(DIM, DIM)
        sd[f"layers.{i}.feed_forward.w1.weight"] = rnd(FFN, DIM)
        sd[f"layers.{i}.feed_forward.w3.weight"] = rnd(FFN, DIM)
        sd[f"layers.{i}.feed_forward.w2.weight"] = rnd(DIM, FFN)
        sd[f"layers.{i}.attention_norm.weight"] = 1 + rnd(DIM)
        sd[f"layers.{i}.ffn_norm.weight"] = 1 + rnd(DIM)
    for head in "RDB":
        sd[f"norm_{head}.weight"] = 1 + rnd(DIM)
        sd[f"output_{head}.weight"] = rnd(VOCAB, DIM)
    return sd


# --- the reference (published layout, raster order, 3-D proximity mask) -------------------------------------------


def rms(x, w):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w


def ref_block(sd, i, x, mask, heads):
    b, n, d = x.shape
    hd = d // heads
    qkv = rms(x, sd[f"layers.{i}.attention_norm.weight"]) @ sd[f"layers.{i}.attention.wqkv.weight"].T
    q, k, v = (t.view(b, n, heads, hd).transpose(1, 2) for t in qkv.split(d, dim=-1))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(~mask, float("-inf"))
    attn = torch.softmax(scores, dim=-1) @ v
    h = x + attn.transpose(1, 2).reshape(b, n, d) @ sd[f"layers.{i}.attention.wo.weight"].T
    y = rms(h, sd[f"layers.{i}.ffn_norm.weight"])
    ffn = (torch.nn.functional.silu(y @ sd[f"layers.{i}.feed_forward.w1.weight"].T) * (y @ sd[f"layers.{i}.feed_forward.w3.weight"].T))
    return h + ffn @ sd[f"layers.{i}.feed_forward.w2.weight"].T


def cells():
    T, H, W = GRID
    return [(t, h, w) for t in range(T) for h in range(H) for w in range(W)]


def ref_logits(sd, tokens, labels, heads=2):
    """Mixed logits [B, T*H*W, V] in raster order, as the published training computes them."""
    T, H, W = GRID
    n = 1 + T * H * W
    x = torch.cat([sd["cls_embedding.embedding_table.weight"][labels][:, None], sd["tok_embeddings.weight"][tokens.flatten(1)]], 1)
    x = x + sd["abs_pe"][:, :n]
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:, 0] = True
    for qi, (t, h, w) in enumerate(cells(), start=1):
        for ki, (t2, h2, w2) in enumerate(cells(), start=1):
            mask[qi, ki] = t2 + h2 + w2 <= t + h + w
    outs = {}
    for i in range(N_LAYER + 2):
        x = ref_block(sd, i, x, mask, heads)
        if i == N_LAYER - 1:
            outs["R"] = rms(x, sd["norm_R.weight"]) @ sd["output_R.weight"].T
        elif i == N_LAYER:
            outs["D"] = rms(x, sd["norm_D.weight"]) @ sd["output_D.weight"].T
        elif i == N_LAYER + 1:
            outs["B"] = rms(x, sd["norm_B.weight"]) @ sd["output_B.weight"].T
    raster = {cell: 1 + index for index, cell in enumerate(cells())}
    mixed = []
    for t, h, w in cells():
        if (t, h, w) == (0, 0, 0):
            parts = [outs["R"][:, 0], outs["B"][:, 0], outs["D"][:, 0]]
        else:
            parts = []
            if w > 0:
                parts.append(outs["R"][:, raster[(t, h, w - 1)]])
            if t > 0:
                parts.append(outs["B"][:, raster[(t - 1, h, w)]])
            if h > 0:
                parts.append(outs["D"][:, raster[(t, h - 1, w)]])
        mixed.append(torch.stack(parts).mean(0))
    return torch.stack(mixed, dim=1)


# --- tests --------------------------------------------------------------------------------------------------------


def converted(sd) -> NARTransformer:
    config = nar_video_config_from_state_dict(sd, grid_size=GRID)
    return transformer_from_state_dict(sd, config, head_keys=VIDEO_HEAD_KEYS)


def test_config_is_inferred_from_the_tensor_shapes():
    config = nar_video_config_from_state_dict(published_state_dict(), grid_size=GRID)
    assert (config["hidden_size"], config["num_layers"], config["num_attention_heads"]) == (DIM, N_LAYER, 2)
    assert (config["vocab_size"], config["num_classes"], config["num_decoding_heads"]) == (VOCAB, CLASSES, 3)
    assert config["position_embedding_type"] == "learned" and config["grid_size"] == list(GRID)


def test_teacher_forced_logits_equal_the_reference_forward_pass():
    sd = published_state_dict()
    model = converted(sd)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, *GRID), generator=g)
    labels = torch.tensor([0, 4, 2])
    with torch.no_grad():
        ours = model(tokens, class_labels=labels).logits.view(3, -1, VOCAB)
        ref = ref_logits(sd, tokens, labels)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_wrapped_prefixed_and_kv_cache_keys_and_ema_are_handled(tmp_path):
    sd = published_state_dict()
    noisy = {f"module._orig_mod.{k}": v for k, v in sd.items()}
    noisy["layers.0.attention.kv_cache.k_cache"] = torch.zeros(1)
    ema = published_state_dict(seed=5)
    torch.save({"model": {"name": "llama-abs-custom", "args": {"vocab_size": VOCAB}, "sd": noisy, "ema_sd": {0.9999: ema}},
                "epoch": 1}, tmp_path / "nar_video.pth")  # fmt: skip
    name, args, loaded = load_nar_video_checkpoint(tmp_path / "nar_video.pth")
    assert name is None and args == {"vocab_size": VOCAB} and loaded.keys() == sd.keys()
    _, _, loaded_ema = load_nar_video_checkpoint(tmp_path / "nar_video.pth", ema=True)
    assert torch.equal(loaded_ema["abs_pe"], ema["abs_pe"])
    torch.save(sd, tmp_path / "bare.pth")
    assert load_nar_video_checkpoint(tmp_path / "bare.pth")[2].keys() == sd.keys()
    # A hub-style folder: the model's own arguments in config.json, the weights in model.safetensors.
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(sd, hub / "model.safetensors")
    (hub / "config.json").write_text(json.dumps({"dim": DIM, "n_layer": N_LAYER, "n_head": 4, "vocab_size": VOCAB}))
    _, args, loaded = load_nar_video_checkpoint(hub)
    config = nar_video_config_from_state_dict(loaded, grid_size=GRID, published_args=args)
    assert config["num_attention_heads"] == 4  # from the config, not the head-width-64 default
    with pytest.raises(ValueError, match=r"n_layer=3 \(weights: 2\)"):
        nar_video_config_from_state_dict(loaded, grid_size=GRID, published_args={**args, "n_layer": 3})


def test_shapes_that_are_not_a_nar_video_model_are_named():
    sd = published_state_dict()
    with pytest.raises(ValueError, match="abs_pe holds 24 positions"):
        nar_video_config_from_state_dict({**sd, "abs_pe": sd["abs_pe"][:, 1:]}, grid_size=GRID)
    with pytest.raises(ValueError, match=r"missing \['norm_B.weight'\]"):
        nar_video_config_from_state_dict({k: v for k, v in sd.items() if k != "norm_B.weight"}, grid_size=GRID)
    with pytest.raises(ValueError, match="`--model-size` llama-abs-S has 12 layers"):
        nar_video_config_from_state_dict(sd, model_size="llama-abs-S", grid_size=GRID)


# Parameter counts of the published family with vocab 8192 and 101 classes (LARP_AR with two extra blocks).
PUBLISHED_COUNTS = {"llama-abs-S": 37.8, "llama-abs-B": 125.1, "llama-abs-L": 368.7, "llama-abs-LP": 693.6,
                    "llama-abs-XL": 815.5, "llama-abs-XXL": 1467.8, "llama-abs-XXXL": None}  # fmt: skip


@pytest.mark.parametrize("name", list(VIDEO_MODEL_SIZES))
def test_published_video_sizes_map_completely(name):
    size = VIDEO_MODEL_SIZES[name]
    config = dict(
        vocab_size=8192, hidden_size=size.hidden_size, num_layers=size.num_layers,
        num_attention_heads=size.num_attention_heads, position_embedding_type="learned", grid_size=(4, 16, 16),
        num_decoding_heads=3, num_classes=101,
    )  # fmt: skip
    with torch.device("meta"):
        ours = NARTransformer(**config).state_dict()
    inverse = {v: k for k, v in published_key_map({**config, "num_key_value_heads": None}, VIDEO_HEAD_KEYS).items()}
    published = {inverse[k]: v for k, v in ours.items()}
    for size_name in (name, None):
        inferred = nar_video_config_from_state_dict(published, model_size=size_name)
        model = transformer_from_state_dict(published, inferred, head_keys=VIDEO_HEAD_KEYS)
        assert inferred["num_attention_heads"] == size.num_attention_heads
    count = sum(p.numel() for p in model.parameters()) / 1e6
    if PUBLISHED_COUNTS[name] is not None:
        assert round(count, 1) == PUBLISHED_COUNTS[name]
    with torch.device("meta"):  # with LARP-L-long (published config) the whole pipeline assembles
        larp = LARPTokenizer()
    pipe = build_nar_video_pipeline(published, larp, model_size=name)
    assert len(pipe.scheduler) == 34 and pipe.default_video_size() == (16, 128, 128)


# --- the whole conversion: published files -> NARVideoPipeline folder ----------------------------------------------

from test_convert_larp import LARP_KWARGS  # noqa: E402
from test_larp_tokenizer import make_tokenizer  # noqa: E402

from nar_diffusers import NARVideoPipeline  # noqa: E402
from nar_diffusers.commands.cli import main as cli_main  # noqa: E402
from nar_diffusers.conversion.video import convert_nar_video_checkpoint  # noqa: E402

LARP_GRID = (2, 2, 2)


def video_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny published-layout AR model over LARP's 2x2x2 grid with its 16-code vocabulary."""
    global GRID, VOCAB
    saved = GRID, VOCAB
    GRID, VOCAB = LARP_GRID, 16
    try:
        return published_state_dict(seed)
    finally:
        GRID, VOCAB = saved


@pytest.fixture(scope="module")
def published_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    larp = make_tokenizer()
    (root / "larp").mkdir()
    torch.save(larp.state_dict(), root / "larp" / "larp_tokenizer.pth")
    (root / "larp" / "larp_tokenizer.json").write_text(json.dumps(LARP_KWARGS))
    sd = video_state_dict()
    torch.save({"model": {"name": "llama-abs-tiny", "args": {"num_classes": CLASSES}, "sd": sd}}, root / "ar.pth")
    return {"root": root, "larp": larp, "sd": sd}


def test_converted_folder_loads_and_greedy_guided_generation_follows_the_reference_sampler(published_files, tmp_path):
    files = published_files
    out = convert_nar_video_checkpoint(files["root"] / "ar.pth", files["root"] / "larp", tmp_path / "nar-video")
    pipe = NARVideoPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe.scheduler) == sum(LARP_GRID) - 2
    labels = [1, 3]
    tokens = pipe(class_labels=labels, guidance_scale=2.5, do_sample=False, output_type="latent").frames

    # The reference: plane by plane, a full forward pass over the grid so far (later planes are masked out),
    # conditional and null-class logits mixed by the parents rule, guided, argmax.
    global GRID, VOCAB
    saved = GRID, VOCAB
    GRID, VOCAB = LARP_GRID, 16
    try:
        grid = torch.zeros(len(labels), *LARP_GRID, dtype=torch.long)
        cond, null = torch.tensor(labels), torch.full((len(labels),), CLASSES)
        for plane in range(sum(LARP_GRID) - 2):
            with torch.no_grad():
                c, u = ref_logits(files["sd"], grid, cond), ref_logits(files["sd"], grid, null)
            guided = u + 2.5 * (c - u)
            for index, (t, h, w) in enumerate(cells()):
                if t + h + w == plane:
                    grid[:, t, h, w] = guided[:, index].argmax(-1)
    finally:
        GRID, VOCAB = saved
    assert torch.equal(tokens, grid)

    video = pipe(class_labels=[0], num_frames=4, height=8, width=8, output_type="pt").frames
    assert video.shape == (1, 4, 3, 8, 8) and 0 <= video.min() and video.max() <= 1
    expected = files["larp"].decode(grid[:1])  # LARP decodes to [0, 1]: no (x + 1) / 2 mapping
    greedy = pipe(class_labels=[1], guidance_scale=2.5, do_sample=False, output_type="pt").frames
    torch.testing.assert_close(greedy[0], expected[0].permute(1, 0, 2, 3), atol=1e-5, rtol=1e-5)
    index = json.loads((out / "model_index.json").read_text())
    assert index["sampling_defaults"] == {"guidance_scale": 2.5, "cfg_interval": -1, "temperature": 1.0, "top_k": 0,
                                          "top_p": 1.0}  # the published FVD sampling script's settings
    assert index["id2label"] is None  # not a 101-class model


def test_command_line_converts_and_bad_inputs_fail_cleanly(published_files, tmp_path, caplog):
    root = published_files["root"]
    out = tmp_path / "out"
    assert cli_main(["convert-video", "--ar-checkpoint", str(root / "ar.pth"), "--tokenizer", str(root / "larp"),
                     "--output-dir", str(out)]) == 0  # fmt: skip
    assert (out / "model_index.json").is_file() and (out / "vqvae" / "config.json").is_file()
    ucf = tmp_path / "ucf"
    torch.save({**published_files["sd"], "cls_embedding.embedding_table.weight": torch.randn(102, DIM)}, tmp_path / "ucf.pth")
    assert cli_main(["convert-video", "--ar-checkpoint", str(tmp_path / "ucf.pth"), "--tokenizer", str(root / "larp"),
                     "--output-dir", str(ucf)]) == 0  # fmt: skip
    id2label = json.loads((ucf / "model_index.json").read_text())["id2label"]
    assert len(id2label) == 101 and id2label["34"] == "HammerThrow" and id2label["35"] == "Hammering"
    bad = tmp_path / "bad"
    sd = published_files["sd"]
    torch.save({**sd, "tok_embeddings.weight": torch.zeros(32, DIM)}, tmp_path / "wrong_vocab.pth")
    assert cli_main(["convert-video", "--ar-checkpoint", str(tmp_path / "wrong_vocab.pth"), "--tokenizer", str(root / "larp"),
                     "--output-dir", str(bad)]) == 2  # fmt: skip
    assert "vocabulary mismatch" in caplog.text and not bad.exists()
    torch.save({**sd, "abs_pe": torch.zeros(1, 1 + 27, DIM)}, tmp_path / "wrong_grid.pth")
    assert cli_main(["convert-video", "--ar-checkpoint", str(tmp_path / "wrong_grid.pth"), "--tokenizer", str(root / "larp"),
                     "--output-dir", str(bad)]) == 2  # fmt: skip
    assert "abs_pe holds 28 positions" in caplog.text and not bad.exists()
    assert cli_main(["convert-video", "--ar-checkpoint", str(tmp_path / "missing.pth"), "--tokenizer", str(root / "larp"),
                     "--output-dir", str(bad)]) == 2  # fmt: skip
    assert not bad.exists()


# --- the AR's own grid, sizes from the files, full disks --------------------------------------------------------------

import errno  # noqa: E402

import safetensors.torch  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from test_size_guard import refused_quickly  # noqa: E402

from nar_diffusers.conversion.larp import load_larp_tokenizer  # noqa: E402


def ar_state_dict(grid: tuple[int, int, int], vocab: int = 16) -> dict[str, torch.Tensor]:
    global GRID, VOCAB
    saved = GRID, VOCAB
    GRID, VOCAB = grid, vocab
    try:
        return published_state_dict()
    finally:
        GRID, VOCAB = saved


def holistic_tokenizer_folder(root) -> tuple:
    """A LARP tokenizer of 24 holistic tokens over a 2x2x2 patch grid, in NAR's folder form."""
    larp = make_tokenizer(num_latent_tokens=24, latent_grid=(2, 3, 4))
    folder = root / "larp24"
    folder.mkdir()
    torch.save(larp.state_dict(), folder / "larp.pth")
    (folder / "larp.json").write_text(json.dumps({**LARP_KWARGS, "bottleneck_token_num": 24}))
    return larp, folder


def hub_ar_folder(root, name: str, latent_shape) -> object:
    folder = root / name
    folder.mkdir()
    save_file(ar_state_dict((2, 3, 4)), folder / "model.safetensors")
    config = {"dim": DIM, "n_layer": N_LAYER, "vocab_size": 16, "num_classes": CLASSES, "cls_token_num": 1}
    (folder / "config.json").write_text(json.dumps({**config, **({"latent_shape": latent_shape} if latent_shape else {})}))
    return folder


def test_a_holistic_tokenizer_with_24_tokens_converts_for_the_ar_models_2x3x4_latent_shape(tmp_path):
    larp, tokenizer = holistic_tokenizer_folder(tmp_path)
    out = convert_nar_video_checkpoint(hub_ar_folder(tmp_path, "ar", [2, 3, 4]), tokenizer, tmp_path / "out")
    pipe = NARVideoPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vqvae.grid == (2, 3, 4) and pipe.vqvae.patch_grid == (2, 2, 2)
    assert tuple(pipe.transformer.config.grid_size) == (2, 3, 4) and len(pipe.scheduler) == 2 + 3 + 4 - 2
    clip = dict(num_frames=4, height=8, width=8)  # LARP's one clip size (grid x patch size does not give it here)
    tokens = pipe(class_labels=[1], do_sample=False, output_type="latent", **clip).frames
    assert tokens.shape == (1, 2, 3, 4)
    video = pipe(class_labels=[1], do_sample=False, output_type="pt", **clip).frames
    torch.testing.assert_close(video[0], larp.decode(tokens)[0].permute(1, 0, 2, 3), atol=1e-5, rtol=1e-5)
    # Without sizes the call generates LARP's clip size; a partial grid of the AR's shape sets the same size.
    assert torch.equal(pipe(class_labels=[1], do_sample=False, output_type="latent").frames, tokens)
    assert torch.equal(pipe(class_labels=[1], tokens=tokens[0], output_type="latent").frames, tokens)
    # The same from a trainer file whose model args give latent_shape.
    sd = ar_state_dict((2, 3, 4))
    torch.save({"model": {"name": "llama-abs-tiny", "args": {"latent_shape": [2, 3, 4]}, "sd": sd}}, tmp_path / "ar.pth")
    assert convert_nar_video_checkpoint(tmp_path / "ar.pth", tokenizer, tmp_path / "out2").is_dir()


def test_only_the_token_counts_of_the_ar_grid_and_the_tokenizer_must_agree(tmp_path):
    _, tokenizer = holistic_tokenizer_folder(tmp_path)
    with pytest.raises(ValueError, match=r"latent_shape 2x3x5 has 30 cells, but the LARP tokenizer makes 24 tokens"):
        convert_nar_video_checkpoint(hub_ar_folder(tmp_path, "ar30", [2, 3, 5]), tokenizer, tmp_path / "out")
    with pytest.raises(ValueError, match=r"`latent_grid`"):  # no latent_shape: the 2x2x2 patch grid has 8 cells
        convert_nar_video_checkpoint(hub_ar_folder(tmp_path, "ar_plain", None), tokenizer, tmp_path / "out")
    with pytest.raises(ValueError, match=r"`latent_shape` \[2, 3\] in the model's config"):
        convert_nar_video_checkpoint(hub_ar_folder(tmp_path, "ar_bad", [2, 3]), tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_video_with_a_tokenizer_config_of_hidden_size_1e9_is_one_line_and_exit_2(published_files, tmp_path, caplog):
    saved = tmp_path / "larp_saved"
    published_files["larp"].save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "hidden_size": 1e9}))
    argv = ["convert-video", "--ar-checkpoint", str(published_files["root"] / "ar.pth"), "--tokenizer", str(saved),
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    refused_quickly(lambda: load_larp_tokenizer(saved), "`hidden_size` = 1000000000.0")
    caplog.clear()
    assert cli_main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and "`hidden_size` = 1000000000.0" in errors[0]
    assert not (tmp_path / "out").exists()


def test_an_ar_checkpoint_with_a_stride_0_tensor_is_refused_without_materialising_it(published_files, tmp_path):
    sd = {**published_files["sd"], "tok_embeddings.weight": torch.zeros(1, DIM).expand(2_000_000_000, DIM)}
    torch.save({"model": {"name": "llama-abs-tiny", "args": {}, "sd": sd}}, tmp_path / "ar.pth")
    refused_quickly(
        lambda: convert_nar_video_checkpoint(tmp_path / "ar.pth", published_files["root"] / "larp", tmp_path / "out"),
        "model/sd/tok_embeddings.weight", "[2000000000, 128]",
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EROFS, "Read-only file system"),
     SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")],
    ids=["full-disk", "read-only", "safetensors-full-disk"],
)  # fmt: skip
def test_convert_video_onto_a_full_or_read_only_disk_is_one_line_and_exit_2_writing_nothing(
    published_files, tmp_path, monkeypatch, caplog, failure
):
    def failing_write(*args, **kwargs):
        raise failure

    monkeypatch.setattr(safetensors.torch, "save_file", failing_write)
    root = published_files["root"]
    caplog.clear()
    code = cli_main(["convert-video", "--ar-checkpoint", str(root / "ar.pth"), "--tokenizer", str(root / "larp"),
                     "--output-dir", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and "Could not write `output_dir`" in errors[0]
    assert ("No space left" if failure.args[-1] != "Read-only file system" else "Read-only") in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary folder
