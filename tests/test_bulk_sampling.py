"""`nar-diffusers sample` (nar_diffusers.evaluation): the same samples on 1 or 2 processes, resumption after a kill,
the ADM .npz layout, text and video models, and clear errors."""

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SENTENCES, make_pipeline, make_text_pipeline, make_video_pipeline
from PIL import Image

from nar_diffusers import NARPipeline
from nar_diffusers.commands.cli import main
from nar_diffusers.evaluation import bulk_sampling, npz_layout, read_prompts, sample_seed
from nar_diffusers.evaluation.bulk_sampling import to_uint8

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

NUM_SAMPLES, SHARD_SIZE = 23, 8  # shards of 8, 8 and 7 samples; labels cycle through the 10 classes
FLAGS = ["--num-samples", str(NUM_SAMPLES), "--shard-size", str(SHARD_SIZE), "--batch-size", "3",
         "--guidance-scale", "2", "--seed", "7"]  # fmt: skip


@pytest.fixture(scope="module")
def class_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("class_model")
    make_pipeline().save_pretrained(path)
    return path


def _sample(model: Path, output_dir: Path, *extra: str) -> int:
    return main(["sample", "--model", str(model), "--output-dir", str(output_dir), "--cpu", *extra])


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(class_model, tmp_path_factory) -> Path:
    """An uninterrupted single-process run."""
    from accelerate.state import AcceleratorState

    output_dir = tmp_path_factory.mktemp("reference")
    assert _sample(class_model, output_dir, *FLAGS) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    return output_dir


def test_two_processes_write_the_same_samples_as_one(class_model, reference, tmp_path):
    from distributed_launch import accelerate_launch

    output_dir = tmp_path / "two"
    result = accelerate_launch(
        ["-m", "nar_diffusers.commands.cli", "sample", "--model", str(class_model), "--output-dir", str(output_dir),
         *FLAGS]  # fmt: skip
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output_dir / "sample_summary.json").read_text())
    assert summary["num_processes"] == 2 and [s["samples"] for s in summary["processes"]] == [16, 7]
    assert "process 1 (cpu): 7 samples" in result.stdout and result.stdout.count("ADM evaluation batch") == 1
    images = _files(output_dir / "images")
    assert list(images) == [f"{i:06d}.png" for i in range(NUM_SAMPLES)]
    assert images == _files(reference / "images")
    name = f"samples_{NUM_SAMPLES}x8x8x3.npz"
    with zipfile.ZipFile(output_dir / name) as two, zipfile.ZipFile(reference / name) as one:
        assert all(two.read(member) == one.read(member) for member in ("arr_0.npy", "arr_1.npy"))


def test_sample_i_is_the_pipeline_call_with_its_own_generator(class_model, reference):
    """A sample does not depend on its batch: sample i alone, with `Generator().manual_seed(sample_seed(seed, i))`,
    is the file written for it."""
    pipe = NARPipeline.from_pretrained(class_model)
    pipe.set_progress_bar_config(disable=True)
    for index in (0, 13):
        generator = torch.Generator().manual_seed(sample_seed(7, index))
        tokens = pipe(class_labels=[index % 10], guidance_scale=2.0, generator=generator, output_type="latent").images
        expected = to_uint8(pipe.decode_tokens(tokens))[0].permute(1, 2, 0).numpy()
        assert np.array_equal(np.asarray(Image.open(reference / "images" / f"{index:06d}.png")), expected)


def test_npz_has_the_evaluator_layout(reference):
    path = reference / f"samples_{NUM_SAMPLES}x8x8x3.npz"
    assert npz_layout(str(path)) == {"arr_0": ((NUM_SAMPLES, 8, 8, 3), np.uint8), "arr_1": ((NUM_SAMPLES,), np.int64)}
    with np.load(path) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (NUM_SAMPLES, 8, 8, 3)
    pngs = np.stack([np.asarray(Image.open(reference / "images" / f"{i:06d}.png")) for i in range(NUM_SAMPLES)])
    assert np.array_equal(images, pngs)
    assert labels.tolist() == [i % 10 for i in range(NUM_SAMPLES)]  # class-balanced: labels cycle
    # Member for member what np.savez writes (uncompressed .npy files in a ZIP64 archive).
    expected = io.BytesIO()
    np.savez(expected, images, labels)
    with zipfile.ZipFile(path) as written, zipfile.ZipFile(expected) as saved:
        assert [(i.filename, i.compress_type) for i in written.infolist()] == [
            (i.filename, i.compress_type) for i in saved.infolist()
        ]
        assert all(written.read(name) == saved.read(name) for name in saved.namelist())


@pytest.mark.parametrize("kill_at", ["mid_shard", "before_marker"])
def test_killed_run_resumes_without_redoing_or_duplicating(class_model, reference, tmp_path, monkeypatch, kill_at):
    output_dir = tmp_path / "run"
    write_sample, commit_shard = bulk_sampling.write_sample, bulk_sampling.SampleFolder.commit_shard
    calls = {"samples": 0}

    def killed_write(sample, path, fps):  # killed while writing the 4th sample of shard 1 (index 11)
        if calls["samples"] == SHARD_SIZE + 3:
            raise KeyboardInterrupt
        calls["samples"] += 1
        write_sample(sample, path, fps)

    def killed_commit(self, shard, indices, details):  # killed after moving shard 1's files, before its marker
        if shard == 1:
            for index in indices:
                Path(self.temporary_dir(shard), self.file_name(index)).replace(self.file_path(index))
            Path(self.temporary_dir(shard)).rmdir()
            raise KeyboardInterrupt
        return commit_shard(self, shard, indices, details)

    with monkeypatch.context() as patch:
        if kill_at == "mid_shard":
            patch.setattr(bulk_sampling, "write_sample", killed_write)
        else:
            patch.setattr(bulk_sampling.SampleFolder, "commit_shard", killed_commit)
        with pytest.raises(KeyboardInterrupt):
            _sample(class_model, output_dir, *FLAGS)
    assert sorted(p.name for p in (output_dir / "shards").iterdir()) == ["shard-00000.json"]
    assert (output_dir / ".shard-00001.tmp").is_dir() == (kill_at == "mid_shard")
    first_shard = {p.name: p.stat().st_mtime_ns for p in (output_dir / "images").iterdir() if int(p.stem) < SHARD_SIZE}

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert _sample(class_model, output_dir, *FLAGS) == 0
    summary = json.loads((output_dir / "sample_summary.json").read_text())
    assert (summary["skipped_shards"], summary["generated"]) == (1, NUM_SAMPLES - SHARD_SIZE)  # shard 0 not redone
    assert {n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in (output_dir / "images").iterdir())
            if n in first_shard} == first_shard  # fmt: skip
    assert _files(output_dir / "images") == _files(reference / "images")  # every sample once, as uninterrupted
    assert not list(output_dir.glob(".shard-*"))


def test_resize_writes_evaluation_size(class_model, tmp_path):
    output_dir = tmp_path / "resized"
    assert _sample(class_model, output_dir, "--num-samples", "4", "--class-labels", "3", "--resize", "12") == 0
    assert npz_layout(str(output_dir / "samples_4x12x12x3.npz"))["arr_0"] == ((4, 12, 12, 3), np.uint8)
    pipe = NARPipeline.from_pretrained(class_model)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(sample_seed(0, 2))
    tokens = pipe(class_labels=[3], generator=generator, output_type="latent").images
    resized = F.interpolate(pipe.decode_tokens(tokens), size=(12, 12), mode="bicubic")  # before quantising
    expected = to_uint8(resized)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(output_dir / "images" / "000002.png")), expected)


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_text_model_reads_prompt_files(tmp_path, suffix):
    model = tmp_path / "t2i"
    make_text_pipeline().save_pretrained(model)
    prompts = tmp_path / f"prompts{suffix}"
    if suffix == ".txt":
        prompts.write_text("\n".join(SENTENCES) + "\n\n")
    elif suffix == ".csv":
        prompts.write_text("id,caption\n" + "".join(f'{i},"{s}"\n' for i, s in enumerate(SENTENCES)))
    else:
        prompts.write_text("".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(SENTENCES)))
    assert read_prompts(str(prompts)) == SENTENCES
    output_dir = tmp_path / "out"
    assert _sample(model, output_dir, "--prompts", str(prompts), "--shard-size", "3") == 0  # one per prompt
    marker = json.loads((output_dir / "shards" / "shard-00001.json").read_text())
    assert marker["conditions"] == [SENTENCES[3]] and len(list((output_dir / "images").iterdir())) == 4
    assert npz_layout(str(output_dir / "samples_4x8x8x3.npz")) == {"arr_0": ((4, 8, 8, 3), np.uint8)}


@pytest.mark.parametrize("video_format", ["npy", "mp4"])
def test_video_model_writes_one_file_per_clip(tmp_path, video_format):
    model = tmp_path / "video"
    make_video_pipeline().save_pretrained(model)
    output_dir = tmp_path / "clips"
    assert _sample(model, output_dir, "--num-samples", "3", "--video-format", video_format, "--batch-size", "2") == 0
    files = sorted(p.name for p in (output_dir / "videos").iterdir())
    assert files == [f"{i:06d}.{video_format}" for i in range(3)]
    assert not list(output_dir.glob("*.npz"))
    if video_format == "npy":
        clip = np.load(output_dir / "videos" / "000001.npy")
        assert clip.dtype == np.uint8 and clip.shape == (2, 8, 8, 3)  # (frames, height, width, RGB)


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--num-samples is required for class models, e.g. 500"),
        (["--num-samples", "2", "--prompts", "p.txt"], "is class-conditional: use --class-labels"),
        (["--num-samples", "2", "--class-labels", "10"], "--class-labels [10] are outside [0, 9]"),
        (["--num-samples", "0"], "--num-samples must be an integer >= 1"),
        (["--num-samples", "2", "--num-frames", "4"], "--num-frames applies to video models"),
    ],
)
def test_bad_arguments_are_named(class_model, tmp_path, capsys, extra, message):
    assert _sample(class_model, tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err


def test_other_settings_or_foreign_folders_are_refused(class_model, tmp_path, capsys):
    output_dir = tmp_path / "run"
    assert _sample(class_model, output_dir, "--num-samples", "2", "--seed", "1") == 0
    assert _sample(class_model, output_dir, "--num-samples", "2", "--seed", "2") == 2
    assert "other settings (seed: 1 -> 2)" in capsys.readouterr().err
    assert _sample(class_model, output_dir, "--num-samples", "3", "--seed", "1") == 0  # more samples extend the run
    assert json.loads((output_dir / "sample_summary.json").read_text())["generated"] == 3  # the last shard grew
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"")
    assert _sample(class_model, foreign, "--num-samples", "2") == 2
    assert "was not written by `nar-diffusers sample`" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]


# --- trust: arguments, weights, concurrent runs, disk errors, prompt files (issue 20) -------------------------------


def _reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_bad_flag_writes_nothing_and_a_corrected_rerun_works(class_model, tmp_path, capsys):
    output_dir = tmp_path / "run"
    for bad in (["--temperature", "-1"], ["--top-p", "0"], ["--guidance-scale", "nan"], ["--height", "7"]):
        assert _sample(class_model, output_dir, "--num-samples", "2", *bad) == 2
        assert bad[0] in capsys.readouterr().err
        assert not output_dir.exists()  # not even the folder (the --height check needs the model: after the lock)
    assert _sample(class_model, output_dir, "--num-samples", "2", "--temperature", "1") == 0
    # Settings left by an older version that wrote them before checking: no sample holds them, so they give way.
    settings = json.loads((output_dir / "sample_settings.json").read_text())
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "sample_settings.json").write_text(json.dumps({**settings, "temperature": -1.0}))
    assert _sample(class_model, fresh, "--num-samples", "2") == 0
    assert json.loads((fresh / "sample_settings.json").read_text())["temperature"] == 1.0


def test_resuming_with_other_weights_under_the_same_path_is_refused(tmp_path, capsys):
    model = tmp_path / "model"
    make_pipeline().save_pretrained(model)
    output_dir = tmp_path / "run"
    assert _sample(model, output_dir, "--num-samples", "2") == 0
    fingerprint = json.loads((output_dir / "sample_settings.json").read_text())["model_fingerprint"]
    assert "transformer/diffusion_pytorch_model.safetensors" in fingerprint["files"]
    before = _files(output_dir / "images")
    other = NARPipeline.from_pretrained(model)
    with torch.no_grad():
        next(other.transformer.parameters()).add_(1.0)
    other.save_pretrained(model)
    _reset_accelerate()
    capsys.readouterr()
    assert _sample(model, output_dir, "--num-samples", "3") == 2
    err = capsys.readouterr().err
    (line,) = [line for line in re.split(r"[\r\n]", err) if line.startswith("error:")]
    assert "Traceback" not in err and "other weights" in line and "transformer/" in line and "new --output-dir" in line
    assert _files(output_dir / "images") == before and not (output_dir / ".sample.lock").exists()
    _reset_accelerate()
    assert _sample(model, tmp_path / "new", "--num-samples", "3") == 0  # a new folder takes the new weights


def test_a_second_concurrent_run_into_the_same_folder_is_refused_naming_the_first(class_model, tmp_path, monkeypatch):
    import os
    import socket
    import subprocess
    import sys

    output_dir = tmp_path / "run"
    second = {}
    write_sample = bulk_sampling.write_sample

    def write_and_start_a_second_run(sample, path, fps):
        if not second:
            import contextlib

            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                second["code"] = _sample(class_model, output_dir, "--num-samples", "2")
            second["err"] = err.getvalue()
        write_sample(sample, path, fps)

    monkeypatch.setattr(bulk_sampling, "write_sample", write_and_start_a_second_run)
    assert _sample(class_model, output_dir, "--num-samples", "2") == 0
    assert second["code"] == 2 and second["err"].startswith("error:") and len(second["err"].strip().splitlines()) == 1
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started" in second["err"]
    assert not (output_dir / ".sample.lock").exists()  # released at the end, by the run that took it
    monkeypatch.undo()

    # A lock left by a process of this host that is gone is taken over; another host's is not.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = output_dir / ".sample.lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier"}))
    _reset_accelerate()
    assert _sample(class_model, output_dir, "--num-samples", "3") == 0 and not lock.exists()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "earlier"}))
    _reset_accelerate()
    assert _sample(class_model, output_dir, "--num-samples", "4") == 2 and lock.exists()


@pytest.mark.parametrize("code, message", [("ENOSPC", "the disk is full"), ("EROFS", "read-only")])
def test_a_full_disk_is_one_line_and_exit_2(class_model, tmp_path, monkeypatch, capsys, code, message):
    import errno
    import os

    number = getattr(errno, code)

    def no_space(sample, path, fps):
        raise OSError(number, os.strerror(number), path)

    def read_only(self):
        raise OSError(number, os.strerror(number), self.folder)

    if code == "ENOSPC":
        monkeypatch.setattr(bulk_sampling, "write_sample", no_space)
    else:
        monkeypatch.setattr(bulk_sampling.RunLock, "acquire", read_only)
    assert _sample(class_model, tmp_path / "run", "--num-samples", "2") == 2
    err = capsys.readouterr().err
    (line,) = [line for line in re.split(r"[\r\n]", err) if line.startswith("error:")]
    assert message in line and "Traceback" not in err and not (tmp_path / "run" / ".sample.lock").exists()


@pytest.mark.parametrize("fps", ["inf", "nan", "1e-9", "0", "1000"])
def test_fps_out_of_range_is_refused(class_model, tmp_path, capsys, fps):
    from nar_diffusers.utils.video_utils import write_video

    assert _sample(class_model, tmp_path / "run", "--num-samples", "2", "--fps", fps) == 2
    assert "--fps must be a number from 0.1 to 240" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="`fps` must be a number from 0.1 to 240"):
        write_video([np.zeros((8, 8, 3), np.uint8)], tmp_path / "clip.mp4", fps=float(fps))


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("t2i")
    make_text_pipeline().save_pretrained(path)
    return path


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_a_binary_prompts_file_is_named_in_the_error(text_model, tmp_path, capsys, suffix):
    prompts = tmp_path / f"weights{suffix}"
    for content in (b"caption\n\x89PNG\r\n\x1a\n\xff\xfe\x00\x01", b"caption\nabc\x00\x00def\n"):
        prompts.write_bytes(content)
        assert _sample(text_model, tmp_path / "out", "--prompts", str(prompts)) == 2
        err = capsys.readouterr().err
        assert str(prompts) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_a_huge_prompt_line_is_refused_at_once(text_model, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the prompts were checked")

    monkeypatch.setattr(bulk_sampling, "load_sampling_pipeline", no_loading)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n" + "x" * 2_000_000 + "\n")
    assert _sample(text_model, tmp_path / "out", "--prompts", str(prompts)) == 2
    err = capsys.readouterr().err
    assert "line 2 is longer than" in err and "--max-prompt-chars 8192" in err and not (tmp_path / "out").exists()
    prompts.write_text("a cat\n" + "x" * 9000 + "\n")  # a line read whole, then a prompt over the bound
    assert _sample(text_model, tmp_path / "out", "--prompts", str(prompts)) == 2
    assert "prompt 2 has 9000 characters, more than --max-prompt-chars 8192" in capsys.readouterr().err
    assert read_prompts(str(prompts), max_chars=9000)[1] == "x" * 9000  # the flag raises the bound


def test_a_foreign_file_in_a_temporary_shard_folder_is_kept(class_model, tmp_path, capsys):
    output_dir = tmp_path / "run"
    assert _sample(class_model, output_dir, "--num-samples", "2") == 0
    leftover = output_dir / ".shard-00000.tmp"
    leftover.mkdir()
    (leftover / "000000.png").write_bytes(b"partial")
    (leftover / "notes.txt").write_text("mine")
    _reset_accelerate()
    assert _sample(class_model, output_dir, "--num-samples", "2") == 2
    assert "notes.txt" in capsys.readouterr().err and (leftover / "notes.txt").read_text() == "mine"
    (leftover / "notes.txt").unlink()
    _reset_accelerate()
    assert _sample(class_model, output_dir, "--num-samples", "2") == 0 and not leftover.exists()
