#!/usr/bin/env python
"""NAR vs raster generation speed in one run: `nar-diffusers benchmark` (every flag the same).

Usage: python benchmarks/benchmark_generation.py --model-size GPT-B --grid 16 16 --batch-sizes 1 8 \
    --guidance-scale 2 --decode eager static --repeats 5 --json results.json
"""

import sys

from nar_diffusers.commands.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
