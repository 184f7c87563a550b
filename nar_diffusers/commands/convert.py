"""`nar-diffusers convert`, `convert-vq` and `convert-video`: the command lines over `nar_diffusers.conversion`.

Each command adds its flags to the parser the CLI gives it (`add_*_arguments`) and runs the library converter on the
parsed namespace (`run_*`). A conversion error is logged as one line and returns exit status 2; nothing is written
then. The root `conversion/convert_*.py` scripts call the same commands.
"""

from __future__ import annotations

import argparse

from diffusers.utils import logging

from ..conversion.output import REPORTED_ERRORS, one_line
from ..conversion.transformer import ARCHITECTURE_ALIASES, convert_nar_checkpoint
from ..conversion.video import convert_nar_video_checkpoint
from ..conversion.vq import convert_vq_checkpoint
from ..models.model_sizes import MODEL_SIZES, VIDEO_MODEL_SIZES
from ..schedulers.scheduler_selection import ARCHITECTURES
from ..utils.dtypes import DTYPES

logger = logging.get_logger(__name__)


def add_safety_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--overwrite` and `--trust-pickle`, shared by the three converters."""
    parser.add_argument(
        "--overwrite", action="store_true",
        help="Replace an existing output folder written by the converter (refused if it holds any other file).",
    )
    parser.add_argument(
        "--trust-pickle", action="store_true",
        help="Allow .pt/.bin checkpoints that pickle arbitrary objects; this runs code from the file, so only pass "
        "it for files from a source you trust. Without it such files are refused.",
    )
    return parser


def _run(label: str, convert, **kwargs) -> int:
    """Call `convert(**kwargs)`; a reported error becomes one logged line and exit status 2."""
    try:
        convert(**kwargs)
    except REPORTED_ERRORS as err:
        logger.error(f"{label} conversion failed: {one_line(err)}")
        return 2
    return 0


# --------------------------------------------------------------------------------------------------------------------
# nar-diffusers convert: a published NAR / LlamaGen image transformer (+ VQ tokenizer) -> NARPipeline folder
# --------------------------------------------------------------------------------------------------------------------


def add_nar_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of `nar-diffusers convert` to `parser`."""
    parser.add_argument("--transformer-checkpoint", required=True, help="Published NAR / LlamaGen GPT checkpoint.")
    parser.add_argument("--model-size", required=True, choices=list(MODEL_SIZES), help="Published model size.")
    parser.add_argument(
        "--image-size", required=True, type=int,
        help="Image side in pixels the model generates (NAR c2i: 384; t2i: 256 or 512).",
    )
    parser.add_argument(
        "--architecture", choices=[*ARCHITECTURES, *ARCHITECTURE_ALIASES], default="nar",
        help="'nar' (two stacked heads, neighbor order) or 'raster' (one head, raster order; 'llamagen' is the same).",
    )
    vq = parser.add_mutually_exclusive_group(required=True)
    vq.add_argument("--vq-checkpoint", help="LlamaGen VQ tokenizer checkpoint to convert (e.g. vq_ds16_c2i.pt).")
    vq.add_argument("--vq-path", help="An already converted diffusers VQModel folder.")
    parser.add_argument("--output-dir", required=True, help="Pipeline folder to write.")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Stored weight dtype.")
    parser.add_argument(
        "--text-encoder-path", default=None,
        help="Text-to-image models: a local folder with the T5 encoder and tokenizer (flan-t5-xl).",
    )
    return add_safety_arguments(parser)


def run_nar(args: argparse.Namespace) -> int:
    """Run `nar-diffusers convert`; returns 0, or 2 after logging a one-line error."""
    return _run(
        "Transformer", convert_nar_checkpoint,
        transformer_checkpoint=args.transformer_checkpoint, model_size=args.model_size, image_size=args.image_size,
        output_dir=args.output_dir, architecture=ARCHITECTURE_ALIASES.get(args.architecture, args.architecture),
        vq_checkpoint=args.vq_checkpoint, vq_path=args.vq_path, dtype=args.dtype,
        text_encoder_path=args.text_encoder_path, overwrite=args.overwrite, trust_pickle=args.trust_pickle,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# nar-diffusers convert-vq: a LlamaGen VQ tokenizer -> diffusers VQModel folder
# --------------------------------------------------------------------------------------------------------------------


def add_vq_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of `nar-diffusers convert-vq` to `parser`."""
    parser.add_argument("--checkpoint", required=True, help="LlamaGen VQ checkpoint (.pt/.pth or .safetensors).")
    parser.add_argument("--output-dir", required=True, help="Folder to write the diffusers VQModel into.")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Stored weight dtype.")
    return add_safety_arguments(parser)


def run_vq(args: argparse.Namespace) -> int:
    """Run `nar-diffusers convert-vq`; returns 0, or 2 after logging a one-line error."""
    return _run(
        "VQ", convert_vq_checkpoint, checkpoint_path=args.checkpoint, output_dir=args.output_dir, dtype=args.dtype,
        overwrite=args.overwrite, trust_pickle=args.trust_pickle,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# nar-diffusers convert-video: a published NAR video model + LARP tokenizer -> NARVideoPipeline folder
# --------------------------------------------------------------------------------------------------------------------


def add_video_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of `nar-diffusers convert-video` to `parser`."""
    parser.add_argument(
        "--ar-checkpoint", required=True, help="NAR video AR model: trainer .pth, hub folder or state dict."
    )
    parser.add_argument(
        "--tokenizer", required=True,
        help="LARP tokenizer: hub folder (config.json + weights), NAR folder (.pth + .json) or a LARP trainer file.",
    )
    parser.add_argument("--output-dir", required=True, help="NARVideoPipeline folder to write.")
    parser.add_argument(
        "--model-size", default=None, choices=list(VIDEO_MODEL_SIZES),
        help="Published size (default: from the trainer file, or inferred from the tensor shapes).",
    )
    parser.add_argument("--ema", action="store_true", help="Use the AR trainer file's EMA weights.")
    parser.add_argument("--tokenizer-ema", action="store_true", help="Use the LARP trainer file's EMA weights.")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Stored weight dtype.")
    return add_safety_arguments(parser)


def run_video(args: argparse.Namespace) -> int:
    """Run `nar-diffusers convert-video`; returns 0, or 2 after logging a one-line error."""
    return _run(
        "Video", convert_nar_video_checkpoint,
        ar_checkpoint=args.ar_checkpoint, tokenizer=args.tokenizer, output_dir=args.output_dir,
        model_size=args.model_size, ema=args.ema, tokenizer_ema=args.tokenizer_ema, dtype=args.dtype,
        overwrite=args.overwrite, trust_pickle=args.trust_pickle,
    )  # fmt: skip
