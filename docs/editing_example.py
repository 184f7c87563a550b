"""Complete handwritten digits from their top half with the digits demo's NAR pipeline (`NARInpaintPipeline`).

    nar-diffusers demo --output-dir nar-demo
    python docs/editing_example.py --pipeline nar-demo/pipeline --output docs/images/editing_digits.png \
        --growth-output docs/images/growing_digit.png

One row per held-out digit (never seen in training): the digit, what is kept (its top half, as VQ tokens; gray = to
generate), then completions with the digit's own class label and different seeds; the last row keeps the top half of
a digit and asks for other classes. Images are upscaled 4x (nearest) for display.
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image, ImageDraw

from nar_diffusers import NARInpaintPipeline, NARPipeline
from nar_diffusers.commands.demo import NUM_HELD_OUT, split_digits
from nar_diffusers.utils.image_utils import tensor_to_pil
from nar_diffusers.utils.preview import TokenPreview, preview_images

SCALE, GAP = 4, 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="nar-demo/pipeline", help="The demo's NAR pipeline folder.")
    parser.add_argument("--output", default="editing_digits.png")
    parser.add_argument("--digits", type=int, nargs="+", default=[0, 2, 3, 5, 7], help="Classes of the rows.")
    parser.add_argument("--completions", type=int, default=5, help="Completions (seeds) per row.")
    parser.add_argument("--other-classes", type=int, nargs="+", default=[3, 8, 9, 5, 2],
                        help="Classes asked for in the last row, which keeps the top half of --last-row-digit.")
    parser.add_argument("--last-row-digit", type=int, default=3, help="The digit whose top half the last row keeps.")
    parser.add_argument("--seed", type=int, default=0, help="The demo's split seed (the held-out digits).")
    parser.add_argument("--growth-output", default=None,
                        help="Also write the previews of one generation (a 7, seed 0), one per forward pass, in a row.")
    args = parser.parse_args()

    pipe = NARInpaintPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    data = split_digits(16, args.seed)  # the demo's held-out digits (16 px, in [-1, 1])
    assert data["test_images"].shape[0] == NUM_HELD_OUT
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 8, 16, 16))  # white = regenerate: the bottom half (the bottom 4 of 8 token rows)

    rows = []
    for digit in [*args.digits, args.last_row_digit]:
        index = int((data["test_labels"] == digit).nonzero()[0])
        image = tensor_to_pil(data["test_images"][index : index + 1])[0]
        known, _ = pipe.prepare_known_tokens(image, mask)
        kept = preview_images(pipe, known)[0]
        last = len(rows) == len(args.digits)
        labels = args.other_classes if last else [digit] * args.completions
        generators = [torch.Generator().manual_seed(i) for i in range(len(labels))]
        completed = pipe(image=image, mask_image=mask, class_labels=labels, generator=generators).images
        rows.append([image, kept, *completed])

    columns = max(len(row) for row in rows)
    cell = 16 * SCALE
    width = columns * (cell + GAP) + GAP + GAP  # an extra gap after the "kept" column
    height = len(rows) * (cell + GAP) + GAP + GAP  # and before the last row
    sheet = Image.new("RGB", (width, height), "white")
    for r, row in enumerate(rows):
        y = GAP + r * (cell + GAP) + (GAP if r == len(rows) - 1 else 0)
        for c, picture in enumerate(row):
            x = GAP + c * (cell + GAP) + (GAP if c >= 2 else 0)
            sheet.paste(picture.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
    draw = ImageDraw.Draw(sheet)
    x = GAP + 2 * (cell + GAP) + GAP // 2 - 1
    draw.line([(x, 0), (x, height)], fill=(200, 60, 60), width=1)
    sheet.save(args.output, optimize=True)
    print(f"Wrote {args.output} ({width}x{height})")

    if args.growth_output:
        # What the app streams: the grid after each forward pass, cells not generated yet in gray.
        preview = TokenPreview()
        frames = []
        preview.on_preview = lambda step, images: frames.append(images[0])
        generator_pipe = NARPipeline(**pipe.components, sampling_defaults=pipe.sampling_defaults)
        generator_pipe.set_progress_bar_config(disable=True)
        generator_pipe(class_labels=[7], generator=torch.Generator().manual_seed(0), callback_on_step_end=preview)
        cell = 16 * 3
        strip = Image.new("RGB", (len(frames) * (cell + 2) + 2, cell + 4), "white")
        for i, frame in enumerate(frames):
            strip.paste(frame.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (2 + i * (cell + 2), 2))
        strip.save(args.growth_output, optimize=True)
        print(f"Wrote {args.growth_output} ({len(frames)} forward passes)")


if __name__ == "__main__":
    main()
