"""The published NAR video model (LlamaGen blocks, learned absolute positions, heads R/D/B) converts to a
NARTransformer whose teacher-forced logits equal a reference forward pass written here from the published layout."""

import math

import pytest
import torch

from nar_diffusers import NARTransformer
from nar_diffusers.conversion.transformer import VIDEO_HEAD_KEYS, published_key_map, transformer_from_state_dict
from nar_diffusers.conversion.video import load_nar_video_checkpoint, nar_video_config_from_state_dict
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
    name, loaded = load_nar_video_checkpoint(tmp_path / "nar_video.pth")
    assert name is None and loaded.keys() == sd.keys()
    _, loaded_ema = load_nar_video_checkpoint(tmp_path / "nar_video.pth", ema=True)
    assert torch.equal(loaded_ema["abs_pe"], ema["abs_pe"])
    torch.save(sd, tmp_path / "bare.pth")
    assert load_nar_video_checkpoint(tmp_path / "bare.pth")[1].keys() == sd.keys()


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
