#!/usr/bin/env python
"""Convert a LlamaGen VQ tokenizer checkpoint to a diffusers VQModel folder.

Usage: python conversion/convert_vq_to_diffusers.py --checkpoint vq_ds16_c2i.pt --output-dir ./vq-16 [--dtype float32]
"""

import sys
from pathlib import Path

try:
    from nar_diffusers.conversion.vq import main
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from nar_diffusers.conversion.vq import main

if __name__ == "__main__":
    sys.exit(main())
