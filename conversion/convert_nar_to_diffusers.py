#!/usr/bin/env python
"""Convert a published NAR or LlamaGen image transformer checkpoint to a diffusers NARPipeline folder.

Usage: python conversion/convert_nar_to_diffusers.py --transformer-checkpoint nar_l.pt --model-size GPT-L \
    --image-size 384 --vq-checkpoint vq_ds16_c2i.pt --output-dir ./nar-l-c2i [--dtype bfloat16]
The same as `nar-diffusers convert`; see docs/conversion.md for every published model family.
"""

import sys

from nar_diffusers.commands.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
