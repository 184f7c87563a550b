#!/usr/bin/env python
"""Convert a published NAR video model (UCF-101) and its LARP tokenizer to a diffusers NARVideoPipeline folder.

Usage: python conversion/convert_nar_video_to_diffusers.py --ar-checkpoint nar_video_l.pth \
    --tokenizer ./LARP-L-long-tokenizer --output-dir ./nar-video-ucf101 [--model-size llama-abs-L] [--ema]
The same as `nar-diffusers convert-video`; see docs/conversion.md ("Published video models").
"""

import sys

from nar_diffusers.commands.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert-video", *sys.argv[1:]]))
