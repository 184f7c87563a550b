#!/usr/bin/env python
"""Convert a LlamaGen VQ tokenizer checkpoint to a diffusers VQModel folder.

Usage: python conversion/convert_vq_to_diffusers.py --checkpoint vq_ds16_c2i.pt --output-dir ./vq-16 [--dtype float32]
The same as `nar-diffusers convert-vq`; see docs/conversion.md.
"""

import sys

from nar_diffusers.commands.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert-vq", *sys.argv[1:]]))
