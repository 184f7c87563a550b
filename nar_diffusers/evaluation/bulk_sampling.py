"""Bulk sampling behind `nar-diffusers sample` (`nar_diffusers/commands/sample.py`, which holds the flags and
checks them): thousands of samples from a saved pipeline, split over processes, for FID / FVD.

Sample `i` gets condition `i mod (number of conditions)` (class labels, by default every class: balanced) and its
own generator seeded from `(--seed, i)` (`sample_plan.py`), so a sample does not depend on the number of processes.
The samples are generated in fixed shards of `--shard-size` indices, each in the same batches of `--batch-size`,
so with the same batch size even the floating-point work is the same on 1 or 8 processes; a finished shard is
skipped by a rerun (`sample_folder.py`). Images are written as PNGs, then gathered into the `.npz` of the ADM
evaluation suite (`arr_0`, uint8 N x H x W x 3; `arr_1` the labels); videos as MP4, GIF or `.npy` frame arrays.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils import logging
from PIL import Image

from ..pipelines.pipeline_loading import nar_pipeline_class
from ..pipelines.pipeline_nar import NARPipeline
from ..pipelines.pipeline_nar_video import NARVideoPipeline
from ..utils.atomic_files import write_json_atomically
from ..utils.distributed import distributed_state
from ..utils.dtypes import DTYPES
from .adm_npz import npz_layout, write_adm_npz
from .model_fingerprint import model_fingerprint
from .run_lock import RunLock
from .sample_folder import FINGERPRINT_KEY, SampleFolder
from .sample_plan import MAX_PROMPT_CHARS, SamplePlan, read_prompts, sample_generators

logger = logging.get_logger(__name__)

VIDEO_FORMATS = ("mp4", "gif", "npy")
SUMMARY_NAME = "sample_summary.json"


# ---------------------------------------------------------------------------------------------------------------
# Loading and the plan
# ---------------------------------------------------------------------------------------------------------------


def load_sampling_pipeline(model: str, device: torch.device, dtype: torch.dtype):
    """Load a `NARPipeline` or `NARVideoPipeline` folder (safetensors weights only) onto `device`."""
    pipeline_class = nar_pipeline_class(model)
    if issubclass(pipeline_class, NARPipeline):
        pipeline_class = NARPipeline  # an inpainting folder samples like the image pipeline it extends
    try:
        pipeline = pipeline_class.from_pretrained(model, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"could not load the pipeline in {model}: {' '.join(str(error).split())}") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def build_plan(args: argparse.Namespace, pipeline) -> SamplePlan:
    """The samples to draw: class labels (every class by default) or the prompts of --prompts, cycled."""
    transformer = pipeline.transformer
    if transformer.condition_type == "class":
        if args.prompts is not None or args.negative_prompt is not None:
            raise ValueError(f"--model {args.model!r} is class-conditional: use --class-labels, not --prompts.")
        num_classes = transformer.config.num_classes
        labels = args.class_labels if args.class_labels is not None else list(range(num_classes))
        bad = [label for label in labels if not 0 <= label < num_classes]
        if bad:
            raise ValueError(f"--class-labels {bad} are outside [0, {num_classes - 1}], the classes of --model.")
        if args.num_samples is None:
            raise ValueError(
                f"--num-samples is required for class models, e.g. {50 * len(labels)} for 50 per class."
            )
        if args.num_samples % len(labels):
            logger.warning(
                f"--num-samples {args.num_samples} is not a multiple of the {len(labels)} classes: the first "
                f"{args.num_samples % len(labels)} get one sample more."
            )
        return SamplePlan(args.num_samples, args.shard_size, args.seed, class_labels=tuple(labels))
    if args.class_labels is not None:
        raise ValueError(f"--model {args.model!r} is text-conditional: use --prompts, not --class-labels.")
    if args.prompts is None:
        raise ValueError(f"--model {args.model!r} is text-conditional: --prompts (a .txt, .csv or .jsonl file) is required.")
    if pipeline.text_encoder is None or pipeline.tokenizer is None:
        raise ValueError(f"--model {args.model!r} has no text_encoder / tokenizer to encode --prompts.")
    prompts = read_prompts(args.prompts, args.prompt_column, getattr(args, "max_prompt_chars", MAX_PROMPT_CHARS))
    num_samples = args.num_samples if args.num_samples is not None else len(prompts)
    return SamplePlan(num_samples, args.shard_size, args.seed, prompts=tuple(prompts))


def output_size(args: argparse.Namespace, pipeline) -> dict[str, int]:
    """The generated size (`height`, `width`; videos also `num_frames`) and the saved one (`saved_height`,
    `saved_width`), checking the flags that do not apply to this kind of model."""
    if isinstance(pipeline, NARVideoPipeline):
        for flag, value in (("--resize", args.resize), ("--no-npz", args.no_npz or None)):
            if value is not None:
                raise ValueError(f"{flag} applies to image models; --model {args.model!r} is a video model.")
        defaults = pipeline.default_video_size()
        num_frames, height, width = (given or default for given, default in zip(
            (args.num_frames, args.height, args.width), defaults))  # fmt: skip
        return {"num_frames": num_frames, "height": height, "width": width, "saved_height": height,
                "saved_width": width}  # fmt: skip
    for flag, value in (("--num-frames", args.num_frames), ("--video-format", args.video_format)):
        if value is not None:
            raise ValueError(f"{flag} applies to video models; --model {args.model!r} is an image model.")
    factor = pipeline.vq_scale_factor
    for flag, value, tokens in (("--height", args.height, pipeline.transformer.config.grid_size[0]),
                                ("--width", args.width, pipeline.transformer.config.grid_size[1])):  # fmt: skip
        if value is not None and (value % factor or value // factor > tokens):
            raise ValueError(
                f"{flag} must be a multiple of {factor} (the VQ downsample factor) up to {tokens * factor} (the "
                f"model's grid), got {value}."
            )
    height = args.height or pipeline.scheduler.grid_size[0] * factor
    width = args.width or pipeline.scheduler.grid_size[1] * factor
    saved = (args.resize, args.resize) if args.resize else (height, width)
    return {"height": height, "width": width, "saved_height": saved[0], "saved_width": saved[1]}


def sampling_settings(args: argparse.Namespace, plan: SamplePlan, sizes: dict[str, int], kind: str, device) -> dict:
    """What determines the samples: a rerun into the same folder must give the same (`SampleFolder`).

    Not included: --num-samples (more samples extend a run), --batch-size (it changes floating-point rounding
    only), --no-npz."""
    import hashlib

    conditions = {"class_labels": list(plan.class_labels)} if plan.class_labels is not None else {
        "prompts_sha256": hashlib.sha256("\n".join(plan.prompts).encode()).hexdigest(),
        "num_prompts": len(plan.prompts), "negative_prompt": args.negative_prompt,
    }  # fmt: skip
    return {
        "format_version": 1, "model": os.path.abspath(args.model), "kind": kind, **conditions, "seed": args.seed,
        "shard_size": args.shard_size, "guidance_scale": args.guidance_scale, "cfg_interval": args.cfg_interval,
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, **sizes,
        "video_format": (args.video_format or "mp4") if kind == "video" else None,
        "fps": args.fps if kind == "video" else None, "dtype": args.dtype, "device_type": device.type,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 as LlamaGen's sampling script does: `clamp(127.5 x + 128, 0, 255)`, truncated
    (round half up of `255 (x + 1) / 2`)."""
    return torch.clamp(127.5 * pixels.float() + 128.0, 0, 255).to(torch.uint8)


def generate_batch(pipeline, plan: SamplePlan, indices: range, sizes: dict[str, int], args, device) -> np.ndarray:
    """uint8 samples `(B, H, W, 3)` (videos `(B, F, H, W, 3)`) of `indices`, one generator per sample."""
    conditions = [plan.condition(i) for i in indices]
    kwargs: dict[str, Any] = dict(
        guidance_scale=args.guidance_scale, cfg_interval=args.cfg_interval, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, generator=sample_generators(plan.seed, indices, device),
        height=sizes["height"], width=sizes["width"],
    )  # fmt: skip
    if plan.class_labels is not None:
        kwargs["class_labels"] = conditions
    else:
        kwargs["prompt"], kwargs["negative_prompt"] = conditions, args.negative_prompt
    if isinstance(pipeline, NARVideoPipeline):
        frames = pipeline(num_frames=sizes["num_frames"], output_type="np", **kwargs).frames  # (B, F, H, W, C) in [0, 1]
        return to_uint8(torch.from_numpy(np.asarray(frames)) * 2 - 1).numpy()
    tokens = pipeline(output_type="latent", **kwargs).images
    pixels = pipeline.decode_tokens(tokens)  # (B, C, H, W) in [-1, 1], not clamped
    if (sizes["saved_height"], sizes["saved_width"]) != (sizes["height"], sizes["width"]):
        pixels = F.interpolate(pixels, size=(sizes["saved_height"], sizes["saved_width"]), mode="bicubic")
    return to_uint8(pixels).permute(0, 2, 3, 1).cpu().numpy()


def write_sample(sample: np.ndarray, path: str, fps: float) -> None:
    """One sample file: a PNG for an image; MP4 / GIF / .npy (uint8 `(F, H, W, 3)`) for a video."""
    from ..utils.video_utils import write_video

    extension = os.path.splitext(path)[1]
    if extension == ".png":
        Image.fromarray(sample).save(path, format="PNG")
    elif extension == ".npy":
        np.save(path, sample)
    else:
        write_video(list(sample), path, fps=fps)


def generate_shard(pipeline, plan: SamplePlan, folder: SampleFolder, shard: int, sizes, args, device, on_batch) -> int:
    """Generate shard `shard` in batches of --batch-size into its temporary folder and commit it."""
    indices = plan.shard(shard)
    tmp_dir = folder.begin_shard(shard)
    started = time.perf_counter()
    for start in range(indices.start, indices.stop, args.batch_size):
        batch = range(start, min(start + args.batch_size, indices.stop))
        for index, sample in zip(batch, generate_batch(pipeline, plan, batch, sizes, args, device)):
            write_sample(sample, os.path.join(tmp_dir, folder.file_name(index)), args.fps)
        on_batch(len(batch))
    details = {"batch_size": args.batch_size, "seconds": round(time.perf_counter() - started, 3),
               "conditions": [plan.condition(i) for i in indices]}  # fmt: skip
    folder.commit_shard(shard, indices, details)
    return len(indices)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def npz_path(root: str, plan: SamplePlan, sizes: dict[str, int]) -> str:
    return os.path.join(root, f"samples_{plan.num_samples}x{sizes['saved_height']}x{sizes['saved_width']}x3.npz")


def write_npz(folder: SampleFolder, plan: SamplePlan, sizes: dict[str, int], path: str, progress: bool) -> str:
    """Gather the PNGs of samples 0..N-1 into the ADM `.npz` (with the labels of class models), streaming."""
    from tqdm.auto import tqdm

    height, width = sizes["saved_height"], sizes["saved_width"]

    def images():
        for index in tqdm(range(plan.num_samples), desc="Writing the .npz", disable=not progress):
            with Image.open(folder.file_path(index)) as image:
                yield np.asarray(image.convert("RGB"))

    labels = None if plan.class_labels is None else np.array([plan.condition(i) for i in range(plan.num_samples)])
    return write_adm_npz(path, images(), plan.num_samples, height, width, labels)


def on_main_process(state, function, *args):
    """`function(*args)` run on the main process only, its result given to every process; a ValueError or
    OSError it raises is raised on every process (as a ValueError on the others), so none waits for the others."""
    result, error = None, None
    if state.is_main_process:
        try:
            result = function(*args)
        except (ValueError, OSError) as raised:
            error = raised
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = broadcast_object_list([result, None if error is None else str(error)], from_process=0)
        if not state.is_main_process:
            result, error = shared[0], (None if shared[1] is None else ValueError(shared[1]))
    if error is not None:
        raise error
    return result


def run_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the sampling of `args` (the `sample` command's flags, checked by
    `nar_diffusers.commands.sample.check_arguments`) in this process; returns the summary (on every process).

    The main process holds the folder's lock (`RunLock`) for the whole run, so a second run into the same folder
    is refused at once, before its model loads."""
    state = distributed_state(cpu=args.cpu)
    lock = RunLock(args.output_dir)
    try:
        on_main_process(state, lock.acquire)
        summary = _run_locked(args, state)
        state.wait_for_everyone()  # no process still writes when the lock goes
    finally:
        if state.is_main_process:
            lock.release()
    return summary


def _prepare_folder(args, state, plan: SamplePlan, sizes: dict[str, int], kind: str, device) -> SampleFolder:
    """Check the folder against this run (settings and the model's fingerprint) on every process, then set it up
    on the main process (settings, leftovers of a killed run)."""
    extension = f".{args.video_format or 'mp4'}" if kind == "video" else ".png"
    digits = max(6, len(str(plan.num_samples - 1)))
    folder = SampleFolder(args.output_dir, "videos" if kind == "video" else "images", extension, digits)
    fingerprint = on_main_process(state, model_fingerprint, args.model)
    settings = {**sampling_settings(args, plan, sizes, kind, device), "file_name_digits": digits,
                FINGERPRINT_KEY: fingerprint}  # fmt: skip
    replace = folder.check_settings(settings)
    state.wait_for_everyone()
    on_main_process(state, _set_up, folder, settings, replace)
    return folder


def _set_up(folder: SampleFolder, settings: dict, replace: bool) -> None:
    folder.write_settings(settings, replace=replace)
    for name in folder.remove_temporary_dirs():
        logger.info(f"Removed {name}, the unfinished shard of an interrupted run.")


def _run_locked(args: argparse.Namespace, state) -> dict[str, Any]:
    from tqdm.auto import tqdm

    device = torch.device("cpu") if state.device.type == "cpu" else state.device
    pipeline = load_sampling_pipeline(args.model, device, DTYPES[args.dtype])
    kind = "video" if isinstance(pipeline, NARVideoPipeline) else "image"
    plan = build_plan(args, pipeline)
    sizes = output_size(args, pipeline)
    folder = _prepare_folder(args, state, plan, sizes, kind, device)

    # The shards not done yet, decided before anyone writes, split between the processes.
    pending = [shard for shard in range(plan.num_shards) if not folder.is_done(shard, plan.shard(shard))]
    state.wait_for_everyone()
    with state.split_between_processes(pending) as mine:
        mine = list(mine)
    share = sum(len(plan.shard(shard)) for shard in mine)
    where = f" (process 0 of {state.num_processes})" if state.num_processes > 1 else ""
    started = time.perf_counter()
    generated = 0
    with tqdm(total=share, desc=f"Sampling{where}", unit="img" if kind == "image" else "video",
              disable=not state.is_main_process) as progress:  # closed on an error too: its message starts a line
        for shard in mine:
            generated += generate_shard(pipeline, plan, folder, shard, sizes, args, device, progress.update)
    seconds = time.perf_counter() - started

    # Throughput of every process, then the .npz and the summary on the main process.
    mine_stats = {"process": state.process_index, "device": str(device), "shards": len(mine), "samples": generated,
                  "seconds": round(seconds, 3), "samples_per_second": round(generated / seconds, 3) if generated else None}  # fmt: skip
    stats = _gather(state, mine_stats)
    summary = {
        "num_samples": plan.num_samples, "num_shards": plan.num_shards, "skipped_shards": plan.num_shards - len(pending),
        "generated": sum(s["samples"] for s in stats), "num_processes": state.num_processes, "processes": stats,
        "output_dir": os.path.abspath(args.output_dir), "npz": None,
    }  # fmt: skip
    if state.is_main_process:
        _finish(args, folder, plan, sizes, kind, summary)
    return summary


def _finish(args, folder: SampleFolder, plan: SamplePlan, sizes: dict[str, int], kind: str, summary: dict) -> None:
    """Main process: check every shard is done, write the `.npz` (images) and the summary."""
    unfinished = [shard for shard in range(plan.num_shards) if not folder.is_done(shard, plan.shard(shard))]
    if unfinished:
        raise RuntimeError(f"Shards {unfinished[:5]} are not complete; rerun the same command to resume.")
    if kind == "image" and not args.no_npz:
        path = npz_path(args.output_dir, plan, sizes)
        expected = (plan.num_samples, sizes["saved_height"], sizes["saved_width"], 3)
        if summary["generated"] or not os.path.isfile(path) or npz_layout(path)["arr_0"][0] != expected:
            write_npz(folder, plan, sizes, path, progress=True)
        summary["npz"] = os.path.abspath(path)
    write_json_atomically(os.path.join(args.output_dir, SUMMARY_NAME), summary)


def _gather(state, stats: dict) -> list[dict]:
    if state.num_processes == 1:
        return [stats]
    from accelerate.utils import gather_object

    return gather_object([stats])


def format_summary(summary: dict[str, Any], unit: str = "samples") -> str:
    lines = [
        f"{summary['num_samples']} {unit} in {summary['output_dir']}: {summary['generated']} generated now, "
        f"{summary['skipped_shards']} of {summary['num_shards']} shard(s) already done."
    ]
    for stats in summary["processes"]:
        rate = f"{stats['samples_per_second']:.2f} {unit}/s" if stats["samples_per_second"] else "-"
        lines.append(
            f"  process {stats['process']} ({stats['device']}): {stats['samples']} {unit} in {stats['seconds']:.1f} s "
            f"({rate})"
        )
    if summary["npz"]:
        lines.append(f"ADM evaluation batch: {summary['npz']}")
    return "\n".join(lines)
