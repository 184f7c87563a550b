"""LARPTokenizer against a reference written here from the published description (LARP, arXiv 2410.21264, and its
public code): plain tensor operations on the state dict, explicit softmax attention, explicit unpatchify loops."""

import math

import pytest
import torch

from nar_diffusers import LARPTokenizer

TINY = dict(
    num_frames=4, sample_size=8, temporal_patch_size=2, patch_size=4, hidden_size=32, num_attention_heads=4,
    num_encoder_layers=2, num_decoder_layers=2, num_latent_tokens=8, codebook_size=16, codebook_dim=4,
)  # fmt: skip
GRID = (2, 2, 2)


def make_tokenizer(**overrides) -> LARPTokenizer:
    torch.manual_seed(0)
    model = LARPTokenizer(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # random weights everywhere (biases and norms included), so every term is exercised
        for name, param in model.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            param.normal_(1.0 if is_norm_weight else 0.0, 0.3)
    return model


# --- the reference ------------------------------------------------------------------------------------------------


def ref_sincos_1d(dim, positions):
    k = torch.arange(dim // 2, dtype=torch.float64)
    omega = 1.0 / 10000.0 ** (k / (dim / 2))
    angles = torch.as_tensor(positions, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def ref_sincos_3d(dim, frames, side):
    rows = []
    for t in range(frames):
        for h in range(side):
            for w in range(side):
                spatial = torch.cat([ref_sincos_1d(dim // 2, [w])[0], ref_sincos_1d(dim // 2, [h])[0]])
                rows.append(spatial + ref_sincos_1d(dim, [t])[0])
    return torch.stack(rows)


def ref_layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_block(sd, prefix, x, heads):
    dim = x.shape[-1]
    hd = dim // heads
    y = ref_layer_norm(x, sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"], 1e-5)
    qkv = y @ sd[prefix + "attn.qkv.weight"].T
    q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
    outs = []
    for head in range(heads):
        cols = slice(head * hd, (head + 1) * hd)
        scores = q[..., cols] @ k[..., cols].transpose(-1, -2) / math.sqrt(hd)
        outs.append(torch.softmax(scores, dim=-1) @ v[..., cols])
    x = x + torch.cat(outs, dim=-1) @ sd[prefix + "attn.proj.weight"].T + sd[prefix + "attn.proj.bias"]
    y = ref_layer_norm(x, sd[prefix + "norm2.weight"], sd[prefix + "norm2.bias"], 1e-5)
    y = y @ sd[prefix + "mlp.fc1.weight"].T + sd[prefix + "mlp.fc1.bias"]
    y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    return x + y @ sd[prefix + "mlp.fc2.weight"].T + sd[prefix + "mlp.fc2.bias"]


def ref_stack(sd, name, context, queries, depth, heads):
    x = torch.cat([context, queries], dim=1)
    for i in range(depth):
        x = ref_block(sd, f"{name}.blocks.{i}.", x, heads)
    return x[:, context.shape[1] :]


def ref_encode(sd, video):
    patches = torch.nn.functional.conv3d(video, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=(2, 4, 4))
    patches = patches.flatten(2).transpose(1, 2) + ref_sincos_3d(32, 2, 2).float()
    queries = sd["encoder_latent_query_embed"][None].expand(video.shape[0], -1, -1)
    z = ref_stack(sd, "encoder", patches, queries, 2, 4) @ sd["bottleneck.in_linear.weight"].T
    z = z + sd["bottleneck.in_linear.bias"]
    z = z / z.norm(dim=-1, keepdim=True)
    codebook = sd["bottleneck.regularizer.embedding.weight"]
    codebook = codebook / codebook.norm(dim=-1, keepdim=True)
    return (z @ codebook.T).argmax(-1)


def ref_decode(sd, ids):
    codebook = sd["bottleneck.regularizer.embedding.weight"]
    codes = codebook[ids] / codebook[ids].norm(dim=-1, keepdim=True)
    latents = codes @ sd["bottleneck.out_linear.weight"].T + sd["bottleneck.out_linear.bias"]
    latents = latents + ref_sincos_1d(32, list(range(8))).float()
    queries = ref_sincos_3d(32, 2, 2).float() + sd["decoder_patch_query_token_type_embed"][0]
    x = ref_stack(sd, "decoder", latents, queries[None].expand(ids.shape[0], -1, -1), 2, 4)
    x = ref_layer_norm(x, sd["final_layer.norm_final.weight"], sd["final_layer.norm_final.bias"], 1e-6)
    x = x @ sd["final_layer.linear.weight"].T + sd["final_layer.linear.bias"]
    video = torch.zeros(ids.shape[0], 3, 4, 8, 8)
    for b in range(ids.shape[0]):
        for t in range(2):
            for h in range(2):
                for w in range(2):
                    values = x[b, t * 4 + h * 2 + w]
                    for index, value in enumerate(values):
                        pt, rest = divmod(index, 4 * 4 * 3)
                        p1, rest = divmod(rest, 4 * 3)
                        p2, c = divmod(rest, 3)
                        video[b, c, t * 2 + pt, h * 4 + p1, w * 4 + p2] = value
    return video


# --- tests --------------------------------------------------------------------------------------------------------


def test_position_buffers_are_the_published_sine_cosine_tables():
    model = make_tokenizer()
    torch.testing.assert_close(model.encoder_patch_pe[0], ref_sincos_3d(32, 2, 2).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(model.decoder_patch_query_embed[0], ref_sincos_3d(32, 2, 2).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(model.decoder_latent_pe[0], ref_sincos_1d(32, list(range(8))).float(), atol=1e-6, rtol=0)


def test_encoded_ids_equal_the_reference_encoder():
    model = make_tokenizer()
    video = torch.rand(3, 3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ids = model.encode(video)
    assert ids.shape == (3, 8) and ids.dtype == torch.long
    assert torch.equal(ids, ref_encode(model.state_dict(), video))
    assert torch.equal(model.encode_video(video), ids.view(3, *GRID))


def test_decoded_video_matches_the_reference_decoder_within_1e_5():
    model = make_tokenizer()
    ids = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(2))
    expected = ref_decode(model.state_dict(), ids)
    torch.testing.assert_close(model.decode_video(ids), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.decode(ids.view(2, *GRID)), expected.clamp(0, 1), atol=1e-5, rtol=1e-5)
    assert expected.min() < 0 or expected.max() > 1  # the raw output leaves [0, 1]: `decode` clamps it


def test_stochastic_codes_are_seeded_and_sharpen_to_the_nearest_code():
    model = make_tokenizer()
    video = torch.rand(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    draws = [model.encode(video, deterministic=False, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    model.register_to_config(stochastic_temperature=1e-6)
    assert torch.equal(model.encode(video, deterministic=False, generator=torch.Generator()), model.encode(video))
    model.register_to_config(stochastic_temperature=100.0)  # near-uniform: the draws differ from the argmax
    assert not torch.equal(model.encode(video, deterministic=False, generator=torch.Generator().manual_seed(0)),
                           model.encode(video))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_decoding_stays_close_to_float32(dtype):
    model = make_tokenizer()
    ids = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(4))
    reference = model.decode(ids)
    decoded = model.to(dtype).decode(ids)
    assert decoded.dtype == dtype
    torch.testing.assert_close(decoded.float(), reference, atol=0.1, rtol=0.05)


def test_interface_token_grid_and_bad_inputs():
    model = make_tokenizer()
    assert model.token_grid(4, 8, 8) == GRID
    assert (model.temporal_compression, model.spatial_compression, model.vocab_size) == (2, 4, 16)
    assert model.pixel_range == (0.0, 1.0)
    assert model.encoder.blocks[0].norm1.eps == model.decoder.blocks[1].norm2.eps == 1e-5  # as LARP was trained
    assert model.final_layer.norm_final.eps == 1e-6
    with pytest.raises(ValueError, match="`num_frames` must be 4"):
        model.token_grid(8, 8, 8)
    with pytest.raises(ValueError, match="`width` must be 8"):
        model.token_grid(4, 8, 16)
    with pytest.raises(ValueError, match="`video` must have shape"):
        model.encode(torch.rand(1, 3, 4, 8, 16))
    with pytest.raises(ValueError, match=r"Token ids must have shape \(batch, 8\)"):
        model.decode(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        model.decode(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="num_latent_tokens"):
        LARPTokenizer(**{**TINY, "num_latent_tokens": 7})


def test_save_and_load_round_trip(tmp_path):
    model = make_tokenizer()
    model.save_pretrained(tmp_path)
    loaded = LARPTokenizer.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 16, (1, 8))
    assert torch.equal(loaded.decode(ids), model.decode(ids))
