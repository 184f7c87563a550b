"""Tests of the LlamaGen VQ tokenizer -> diffusers VQModel converter.

The reference model below is written from the published architecture and checkpoint layout (not from the
converter's code, nor from LlamaGen's): its state dict *is* the published key layout, with random weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import VQModel
from safetensors.torch import load_file, save_file

from nar_diffusers.commands.cli import main as cli_main
from nar_diffusers.conversion.checkpoint import UnsafeCheckpointError, load_checkpoint_state_dict
from nar_diffusers.conversion.output import IN_PROGRESS_NAME, MANIFEST_NAME, read_manifest
from nar_diffusers.conversion.vq import (
    convert_vq_checkpoint,
    convert_vq_state_dict,
    vq_config_from_state_dict,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5  # float32 parity, relative to the magnitude of the compared tensor


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    """max |actual - expected| <= tol * max(1, max |expected|): ~1e-5 parity through a deep float32 network."""
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert err <= tol * scale, f"max abs error {err:.3g} exceeds {tol:g} * {scale:.3g}"

# Small tokenizers with the published topology: VQ-16 has ch_mult (1,1,2,2,4), VQ-8 one level fewer.
VQ16_SMALL = dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16, codebook_size=64, codebook_dim=8)
VQ8_SMALL = dict(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=2, z_channels=16, codebook_size=64, codebook_dim=8)


# ----------------------------------------------------------------------------------------------------------------------
# Independent reference implementation (GroupNorm 32 / eps 1e-6, SiLU, single-head attention, l2-normalised codebook)
# ----------------------------------------------------------------------------------------------------------------------


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class RefResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class RefAttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).flatten(2).transpose(1, 2)  # (b, hw, c)
        k = self.k(y).flatten(2)  # (b, c, hw)
        v = self.v(y).flatten(2).transpose(1, 2)  # (b, hw, c)
        weights = torch.softmax((q @ k) / c**0.5, dim=-1)  # (b, hw_query, hw_key)
        out = (weights @ v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class RefDownsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class RefUpsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class RefLevel(nn.Module):
    """One resolution level: res blocks, each optionally followed by attention, then an optional resampler."""

    def __init__(self, in_ch: int, out_ch: int, num_res: int, attention: bool, resample: str | None):
        super().__init__()
        self.res = nn.ModuleList(RefResBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(num_res))
        self.attn = nn.ModuleList(RefAttnBlock(out_ch) for _ in range(num_res if attention else 0))
        if resample == "down":
            self.downsample = RefDownsample(out_ch)
        elif resample == "up":
            self.upsample = RefUpsample(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            x = res(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


def mid_blocks(channels: int) -> nn.ModuleList:
    return nn.ModuleList([RefResBlock(channels, channels), RefAttnBlock(channels), RefResBlock(channels, channels)])


class RefEncoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        last = len(ch_mult) - 1
        self.conv_blocks = nn.ModuleList(
            RefLevel(ch * in_mult[i], ch * ch_mult[i], num_res_blocks, attention=i == last,
                     resample=None if i == last else "down")
            for i in range(len(ch_mult))
        )
        top = ch * ch_mult[-1]
        self.mid = mid_blocks(top)
        self.norm_out = group_norm(top)
        self.conv_out = nn.Conv2d(top, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.conv_blocks:
            x = level(x)
        for block in self.mid:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class RefDecoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        top = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, top, 3, padding=1)
        self.mid = mid_blocks(top)
        n = len(ch_mult)
        levels, in_ch = [], top
        for i in range(n):  # lowest resolution first
            out_ch = ch * ch_mult[n - 1 - i]
            levels.append(RefLevel(in_ch, out_ch, num_res_blocks + 1, attention=i == 0,
                                   resample=None if i == n - 1 else "up"))
            in_ch = out_ch
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = group_norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for block in self.mid:
            x = block(x)
        for level in self.conv_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class RefQuantizer(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(size, dim)


class RefVQ(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, codebook_size, codebook_dim):
        super().__init__()
        self.encoder = RefEncoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quant_conv = nn.Conv2d(z_channels, codebook_dim, 1)
        self.quantize = RefQuantizer(codebook_size, codebook_dim)
        self.post_quant_conv = nn.Conv2d(codebook_dim, z_channels, 1)
        self.decoder = RefDecoder(ch, ch_mult, num_res_blocks, z_channels)

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.quantize.embedding.weight, dim=1)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) -> (b, h, w) codebook indices, nearest unit codebook row to the l2-normalised latent."""
        z = F.normalize(self.latents(x), dim=1).permute(0, 2, 3, 1)
        e = self.codebook()
        dist = (z**2).sum(-1, keepdim=True) + (e**2).sum(-1) - 2 * z @ e.t()
        return dist.argmin(-1)

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        z_q = self.codebook()[idx].permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z_q))


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere (norm affines and biases included, so a swapped key cannot go unnoticed)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name == "quantize.embedding.weight":
                p.copy_(torch.randn(p.shape, generator=gen) * 3.0)  # deliberately not unit norm
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return model.eval()


def spec_keys(ch, ch_mult, num_res_blocks, z_channels, codebook_size, codebook_dim) -> set[str]:
    """The key layout spelled out in the published checkpoint layout, enumerated independently of the reference modules."""
    keys: set[str] = set()

    def wb(prefix: str) -> None:
        keys.update({f"{prefix}.weight", f"{prefix}.bias"})

    def res(prefix: str, cin: int, cout: int) -> None:
        for part in ("norm1", "conv1", "norm2", "conv2"):
            wb(f"{prefix}.{part}")
        if cin != cout:
            wb(f"{prefix}.nin_shortcut")

    def attn(prefix: str) -> None:
        for part in ("norm", "q", "k", "v", "proj_out"):
            wb(f"{prefix}.{part}")

    n = len(ch_mult)
    chans = [ch * m for m in ch_mult]
    for mod in ("encoder", "decoder"):
        wb(f"{mod}.conv_in")
        wb(f"{mod}.norm_out")
        wb(f"{mod}.conv_out")
        res(f"{mod}.mid.0", 1, 1)
        attn(f"{mod}.mid.1")
        res(f"{mod}.mid.2", 1, 1)
    cin = ch
    for lvl in range(n):
        for b in range(num_res_blocks):
            res(f"encoder.conv_blocks.{lvl}.res.{b}", cin if b == 0 else chans[lvl], chans[lvl])
            if lvl == n - 1:
                attn(f"encoder.conv_blocks.{lvl}.attn.{b}")
        if lvl != n - 1:
            wb(f"encoder.conv_blocks.{lvl}.downsample.conv")
        cin = chans[lvl]
    cin = chans[-1]
    for lvl in range(n):
        cout = chans[n - 1 - lvl]
        for b in range(num_res_blocks + 1):
            res(f"decoder.conv_blocks.{lvl}.res.{b}", cin if b == 0 else cout, cout)
            if lvl == 0:
                attn(f"decoder.conv_blocks.{lvl}.attn.{b}")
        if lvl != n - 1:
            wb(f"decoder.conv_blocks.{lvl}.upsample.conv")
        cin = cout
    wb("quant_conv")
    wb("post_quant_conv")
    keys.add("quantize.embedding.weight")
    return keys


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vq16() -> RefVQ:
    return randomize_(RefVQ(**VQ16_SMALL), seed=0)


@pytest.fixture(scope="module")
def vq8() -> RefVQ:
    return randomize_(RefVQ(**VQ8_SMALL), seed=1)


@pytest.fixture(scope="module")
def vq16_checkpoint(vq16: RefVQ, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "vq16.pt"
    torch.save({"model": vq16.state_dict(), "optimizer": {}, "steps": 10}, path)
    return path


def images(batch: int, size: int, seed: int = 123) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def stored_dtypes(folder: Path) -> set[torch.dtype]:
    return {t.dtype for t in load_file(str(folder / "diffusion_pytorch_model.safetensors")).values()}


def load_converted(state_dict: dict[str, torch.Tensor]) -> VQModel:
    config, converted = convert_vq_state_dict(state_dict)
    model = VQModel(**config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def assert_matches_reference(model: VQModel, ref: RefVQ, x: torch.Tensor) -> None:
    """Latents, indices (from z and from z/|z|), and pixels decoded from the indices agree with the reference."""
    with torch.no_grad():
        ref_latents = ref.latents(x)
        ref_idx = ref.encode_indices(x)
        ref_pixels = ref.decode_indices(ref_idx)

        latents = model.encode(x).latents
        assert_close_scaled(latents, ref_latents)
        b, _, h, w = latents.shape
        idx = model.quantize(latents)[2][2].view(b, h, w)
        idx_unit = model.quantize(F.normalize(latents, dim=1))[2][2].view(b, h, w)
        assert torch.equal(idx, ref_idx)
        assert torch.equal(idx_unit, ref_idx)
        assert len(ref_idx.unique()) > 1  # the check is not vacuous

        shape = (b, h, w, model.config.vq_embed_dim)
        pixels = model.decode(idx.flatten(), force_not_quantize=True, shape=shape).sample
        assert_close_scaled(pixels, ref_pixels)
        # The quantize-on-decode path (nearest entry of the raw latent) lands on the same pixels.
        assert_close_scaled(model.decode(latents).sample, ref_pixels)


# ----------------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [VQ16_SMALL, VQ8_SMALL], ids=["vq16", "vq8"])
def test_reference_follows_spec_layout(arch) -> None:
    assert set(RefVQ(**arch).state_dict()) == spec_keys(**arch)


def test_config_inference(vq16: RefVQ, vq8: RefVQ) -> None:
    cfg16 = vq_config_from_state_dict(vq16.state_dict())
    assert list(cfg16["block_out_channels"]) == [32, 32, 64, 64, 128]
    assert list(cfg16["down_block_types"]) == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    assert list(cfg16["up_block_types"]) == ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4
    assert cfg16["layers_per_block"] == 2
    assert (cfg16["latent_channels"], cfg16["vq_embed_dim"], cfg16["num_vq_embeddings"]) == (16, 8, 64)
    assert cfg16["lookup_from_codebook"] is True and cfg16["norm_num_groups"] == 32
    assert cfg16["scaling_factor"] == 1.0 and cfg16["sample_size"] == 256

    cfg8 = vq_config_from_state_dict(vq8.state_dict())
    assert list(cfg8["block_out_channels"]) == [32, 64, 64, 128]
    assert len(cfg8["down_block_types"]) == 4 and cfg8["down_block_types"][-1] == "AttnDownEncoderBlock2D"


@pytest.mark.parametrize("name,size", [("vq16", 64), ("vq8", 32)])
def test_numerical_parity(name: str, size: int, request) -> None:
    ref: RefVQ = request.getfixturevalue(name)
    model = load_converted(ref.state_dict())
    x = images(2, size)
    assert_matches_reference(model, ref, x)
    # codebook stored l2-normalised
    norms = model.quantize.embedding.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_every_key_consumed(vq16: RefVQ) -> None:
    sd = vq16.state_dict()
    _, converted = convert_vq_state_dict(sd)
    assert len(converted) == len(sd)
    assert set(converted) == set(VQModel(**vq_config_from_state_dict(sd)).state_dict())


def test_checkpoint_wrappers(vq16: RefVQ, tmp_path: Path) -> None:
    sd = vq16.state_dict()
    buffers = {
        "quantize.codebook_used": torch.zeros(64),
        "some.layers.0.attention.kv_cache.k_cache": torch.zeros(1),
        "some.layers.0.attention.kv_cache.v_cache": torch.zeros(1),
    }
    variants = {
        "model.pt": {"model": sd},
        "module.pt": {"module": {f"module.{k}": v for k, v in {**sd, **buffers}.items()}},
        "state_dict.pt": {"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}},
        "bare.pt": {**sd, "quantize.codebook_used": torch.zeros(64)},
    }
    for filename, obj in variants.items():
        torch.save(obj, tmp_path / filename)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "weights.safetensors"))
    for filename in [*variants, "weights.safetensors"]:
        loaded = load_checkpoint_state_dict(tmp_path / filename)
        assert set(loaded) == set(sd), filename
        assert all(torch.equal(loaded[k], sd[k]) for k in sd), filename


def test_training_args_namespace_loads_safely(vq16: RefVQ, tmp_path: Path, caplog) -> None:
    """LlamaGen / NAR trainer checkpoints store `args`: loaded with weights_only=True, no warning, no global state."""
    path = tmp_path / "with_args.pt"
    args = argparse.Namespace(vq_model="VQ-16", codebook_size=64, lr=1e-4, mults=[1, 1, 2], ema=None, tag=("a", 1))
    torch.save({"model": vq16.state_dict(), "args": args, "steps": 10}, path)
    with caplog.at_level(logging.WARNING):
        loaded = load_checkpoint_state_dict(path)
    assert set(loaded) == set(vq16.state_dict())
    assert caplog.text == ""
    # The allow-list is scoped to the load: torch's global allow-list is as it was.
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


class CodeOnLoad:
    """Unpickling runs `exec`: creates `marker`. Stands for any malicious payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def save_pickle_payload(state_dict: dict[str, torch.Tensor], tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    path = tmp_path / "payload.pt"
    torch.save({"model": state_dict, "args": argparse.Namespace(lr=1e-4), "extra": CodeOnLoad(marker)}, path)
    return path, marker


def test_pickled_code_is_refused_and_never_runs(vq16: RefVQ, tmp_path: Path, caplog) -> None:
    path, marker = save_pickle_payload(vq16.state_dict(), tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.exec.*--trust-pickle"):
        load_checkpoint_state_dict(path)
    assert not marker.exists()

    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert cli_main(["convert-vq", "--checkpoint", str(path), "--output-dir", str(out)]) == 2
    assert "builtins.exec" in caplog.text and "--trust-pickle" in caplog.text and str(path) in caplog.text
    assert not marker.exists() and not out.exists()


def test_trust_pickle_is_an_explicit_opt_in(vq16: RefVQ, tmp_path: Path, caplog) -> None:
    path, marker = save_pickle_payload(vq16.state_dict(), tmp_path)
    with caplog.at_level(logging.WARNING):
        convert_vq_checkpoint(path, tmp_path / "out", trust_pickle=True)
    assert marker.exists()  # what the flag allows: the file's code ran
    assert "builtins.exec" in caplog.text and "weights_only=False" in caplog.text
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").is_file()


def test_pickled_code_is_refused_by_the_script(vq16: RefVQ, tmp_path: Path) -> None:
    path, marker = save_pickle_payload(vq16.state_dict(), tmp_path)
    out = tmp_path / "out"
    proc = run_script("conversion/convert_vq_to_diffusers.py", "--checkpoint", str(path), "--output-dir", str(out))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "builtins.exec" in errors[0] and "--trust-pickle" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not marker.exists() and not out.exists()


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, script, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_end_to_end(vq16: RefVQ, tmp_path: Path) -> None:
    """Convert as a user would, from a DeepSpeed-style checkpoint with extra buffers, and load the folder."""
    sd = {f"module.{k}": v for k, v in vq16.state_dict().items()}
    sd["module.quantize.codebook_used"] = torch.arange(64.0)
    ckpt = tmp_path / "vq_ds16.pt"
    torch.save({"module": sd}, ckpt)
    out = tmp_path / "out" / "vq-16"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "conversion/convert_vq_to_diffusers.py", "--checkpoint", str(ckpt), "--output-dir", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["vq-16"]  # no temporary folders left behind

    model = VQModel.from_pretrained(out).eval()
    norms = model.quantize.embedding.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert_matches_reference(model, vq16, images(2, 32, seed=7))


def test_dtype_and_overwrite(vq16_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "vq"
    out.mkdir()  # an existing empty folder is fine
    convert_vq_checkpoint(vq16_checkpoint, out, dtype="bfloat16")
    assert stored_dtypes(out) == {torch.bfloat16}
    assert read_manifest(out) == {"README.md", "config.json", "diffusion_pytorch_model.safetensors"}

    with pytest.raises(FileExistsError, match="not empty"):
        convert_vq_checkpoint(vq16_checkpoint, out)
    convert_vq_checkpoint(vq16_checkpoint, out, overwrite=True)  # the converter's own folder: replaced
    assert stored_dtypes(out) == {torch.float32}
    expected = ["README.md", "config.json", "diffusion_pytorch_model.safetensors", MANIFEST_NAME]
    assert sorted(p.name for p in out.iterdir()) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vq"]


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_keeps_files_it_did_not_write(vq16_checkpoint: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "vq"
    convert_vq_checkpoint(vq16_checkpoint, out, dtype="bfloat16")
    (out / "notes.txt").write_text("mine")
    (out / "samples").mkdir()
    (out / "samples" / "cat.png").write_bytes(b"png")
    before = folder_state(out)
    with caplog.at_level(logging.ERROR):
        assert cli_main(["convert-vq",
                         "--checkpoint", str(vq16_checkpoint), "--output-dir", str(out), "--overwrite"]) == 2
    assert "notes.txt" in caplog.text and "samples/cat.png" in caplog.text and "did not write" in caplog.text
    assert folder_state(out) == before  # nothing touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vq"]


def test_overwrite_refuses_a_folder_without_manifest(vq16_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"jpg")
    with pytest.raises(FileExistsError, match=f"no {MANIFEST_NAME}.*holiday.jpg"):
        convert_vq_checkpoint(vq16_checkpoint, out, overwrite=True)
    assert folder_state(out) == {"holiday.jpg": b"jpg"}


def test_overwrite_refuses_when_the_checkpoint_is_inside_output_dir(vq16: RefVQ, tmp_path: Path) -> None:
    """The old `--overwrite` deleted the whole folder, the checkpoint being converted included."""
    out = tmp_path / "vq"
    ckpt = out / "vq_ds16.pt"
    out.mkdir()
    torch.save({"model": vq16.state_dict()}, ckpt)
    # Even a folder whose manifest claims the checkpoint: an input is never replaced.
    (out / MANIFEST_NAME).write_text(json.dumps({"files": ["vq_ds16.pt"]}))
    before = folder_state(out)
    with pytest.raises(ValueError, match=r"--checkpoint.*lies inside `output_dir`"):
        convert_vq_checkpoint(ckpt, out, overwrite=True)
    assert folder_state(out) == before


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_leftovers_of_a_killed_run_are_removed(vq16_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "vq"
    convert_vq_checkpoint(vq16_checkpoint, out)
    killed = json.dumps({"pid": dead_pid(), "host": socket.gethostname()})
    # A killed run's temporary folder (half written) and backup of the folder it replaced (its manifest's files).
    tmp = tmp_path / ".vq.tmp-0badc0de"
    tmp.mkdir()
    (tmp / IN_PROGRESS_NAME).write_text(killed)
    (tmp / "config.json").write_text("{")
    old = tmp_path / ".vq.old-0badc0de"
    old.mkdir()
    (old / IN_PROGRESS_NAME).write_text(killed)
    (old / "config.json").write_text("{}")
    (old / MANIFEST_NAME).write_text(json.dumps({"files": ["config.json"]}))
    # Not the converter's: no mark, or a running owner (this process). These stay.
    mine = tmp_path / ".vq.tmp-mine"
    mine.mkdir()
    (mine / "data.txt").write_text("mine")
    running = tmp_path / ".vq.tmp-running"
    running.mkdir()
    (running / IN_PROGRESS_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))

    convert_vq_checkpoint(vq16_checkpoint, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".vq.tmp-mine", ".vq.tmp-running", "vq"]
    assert (mine / "data.txt").read_text() == "mine"


def test_interrupted_replacement_restores_the_previous_output(vq16_checkpoint: Path, tmp_path: Path) -> None:
    """Killed between moving the old folder aside and moving the new one in: the next run puts the old one back."""
    out = tmp_path / "vq"
    convert_vq_checkpoint(vq16_checkpoint, out)
    before = folder_state(out)
    backup = tmp_path / ".vq.old-0badc0de"
    out.rename(backup)
    (backup / IN_PROGRESS_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))

    with pytest.raises(FileExistsError, match="not empty"):  # restored, and not overwritten without --overwrite
        convert_vq_checkpoint(vq16_checkpoint, out)
    assert folder_state(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vq"]


def _missing(sd):
    del sd["decoder.conv_blocks.1.res.2.norm2.bias"]
    return "decoder.conv_blocks.1.res.2.norm2.bias"


def _extra(sd):
    sd["encoder.conv_blocks.0.extra_proj.weight"] = torch.zeros(3)
    return "encoder.conv_blocks.0.extra_proj.weight"


def _wrong_shape(sd):
    sd["decoder.mid.1.q.weight"] = torch.zeros(128, 64, 1, 1)
    return "decoder.mid.1.q.weight"


@pytest.mark.parametrize("corrupt", [_missing, _extra, _wrong_shape], ids=["missing", "unexpected", "shape"])
def test_malformed_checkpoint(corrupt, vq16: RefVQ, tmp_path: Path) -> None:
    sd = dict(vq16.state_dict())
    bad_key = corrupt(sd)
    ckpt = tmp_path / "bad.pt"
    torch.save({"model": sd}, ckpt)
    out = tmp_path / "converted"
    with pytest.raises(ValueError, match=bad_key.replace(".", r"\.")):
        convert_vq_checkpoint(ckpt, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]

    # The command line reports the same error and exits with status 2.
    assert cli_main(["convert-vq", "--checkpoint", str(ckpt), "--output-dir", str(out)]) == 2
    assert not out.exists()


def test_failed_save_leaves_nothing(vq16_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    def broken_save(self, save_directory, **kwargs):
        Path(save_directory, "config.json").write_text("{}")  # half-written
        raise OSError("disk full")

    monkeypatch.setattr(VQModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_vq_checkpoint(vq16_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _truncated_pt(path: Path, sd) -> str:
    torch.save({"model": sd}, path)
    path.write_bytes(path.read_bytes()[:4096])
    return "not a readable torch checkpoint"


def _truncated_safetensors(path: Path, sd) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    path.write_bytes(path.read_bytes()[:4096])
    return "not a readable .safetensors file"


def _text(path: Path, sd) -> str:
    path.write_text("https://example.com/vq_ds16_c2i.pt\n")
    return "is a text file, not a"


def _empty(path: Path, sd) -> str:
    path.write_bytes(b"")
    return "is empty (0 bytes)"


def _folder(path: Path, sd) -> str:
    path.mkdir()
    return "is a folder, not a checkpoint file"


BAD_FILES = {
    "truncated-pt": ("vq.pt", _truncated_pt),
    "empty-pt": ("vq.pt", _empty),
    "text-as-pt": ("vq.pt", _text),
    "truncated-safetensors": ("vq.safetensors", _truncated_safetensors),
    "empty-safetensors": ("vq.safetensors", _empty),
    "text-as-safetensors": ("vq.safetensors", _text),
    "folder": ("vq.pt", _folder),
}


@pytest.mark.parametrize("name,make", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_unreadable_checkpoint_is_a_one_line_error(name, make, vq16: RefVQ, tmp_path: Path, caplog) -> None:
    ckpt = tmp_path / name
    problem = make(ckpt, vq16.state_dict())
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert cli_main(["convert-vq", "--checkpoint", str(ckpt), "--output-dir", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert f"`checkpoint_path` (--checkpoint) {ckpt}" in errors[0] and problem in errors[0]
    assert not out.exists()


def test_unwritable_output_dir_is_a_one_line_error(vq16_checkpoint: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    """Tests run as root, which ignores permission bits, so `chmod` cannot make a folder read-only here: the check
    is exercised with `os.access` answering "no" for the parent folder, and a write failure with a failing save."""
    parent = tmp_path / "readonly"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != parent and real_access(path, mode, **kw))
    with caplog.at_level(logging.ERROR):
        assert cli_main(["convert-vq",
                         "--checkpoint", str(vq16_checkpoint), "--output-dir", str(parent / "vq")]) == 2
    assert f"{parent / 'vq'} cannot be written: the folder {parent} is not writable" in caplog.text
    assert list(parent.iterdir()) == []
    monkeypatch.undo()

    def denied(self, save_directory, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(save_directory, "config.json")))

    monkeypatch.setattr(VQModel, "save_pretrained", denied)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert cli_main(["convert-vq",
                         "--checkpoint", str(vq16_checkpoint), "--output-dir", str(parent / "vq")]) == 2
    assert f"Could not write `output_dir` (--output-dir) {parent / 'vq'}" in caplog.text
    assert "Permission denied" in caplog.text and "\n" not in caplog.records[-1].getMessage()
    assert list(parent.iterdir()) == []


def test_output_dir_under_a_file_is_a_one_line_error(vq16_checkpoint: Path, tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with caplog.at_level(logging.ERROR):
        assert cli_main(["convert-vq",
                         "--checkpoint", str(vq16_checkpoint), "--output-dir", str(blocker / "sub" / "vq")]) == 2
    assert f"cannot be created: {blocker} is a file, not a folder" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]


# ----------------------------------------------------------------------------------------------------------------------
# Sizes from the files are checked before anything is allocated; a full disk is one line
# ----------------------------------------------------------------------------------------------------------------------


def test_a_vq_checkpoint_with_a_stride_0_codebook_is_refused_without_materialising_it(vq16, tmp_path, caplog):
    from test_size_guard import refused_quickly

    sd = vq16.state_dict()
    width = sd["quantize.embedding.weight"].shape[1]
    sd["quantize.embedding.weight"] = torch.zeros(1, width).expand(2_000_000_000, width)
    ckpt = tmp_path / "vq.pt"
    torch.save({"model": sd}, ckpt)
    refused_quickly(lambda: convert_vq_checkpoint(ckpt, tmp_path / "out"), str(ckpt),
                    "`model/quantize.embedding.weight` of shape [2000000000")  # fmt: skip
    with caplog.at_level(logging.ERROR):
        assert cli_main(["convert-vq", "--checkpoint", str(ckpt), "--output-dir", str(tmp_path / "out")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "quantize.embedding.weight" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vq.pt"]


def test_convert_vq_onto_a_full_disk_is_one_line_and_exit_2_writing_nothing(vq16_checkpoint, tmp_path, monkeypatch,
                                                                            caplog):  # fmt: skip
    import errno

    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with caplog.at_level(logging.ERROR):
        assert cli_main(["convert-vq", "--checkpoint", str(vq16_checkpoint), "--output-dir", str(tmp_path / "vq")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and "No space left on device" in errors[0]
    assert list(tmp_path.iterdir()) == []
