#!/usr/bin/env python
"""NAR vs raster generation speed in one run (same as `nar-diffusers benchmark`).

Usage: python benchmarks/benchmark_generation.py --model-size GPT-B --grid 16 16 --batch-sizes 1 8 \
    --guidance-scale 2 --decode eager static --repeats 5 --json results.json
"""

import sys

from nar_diffusers.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
