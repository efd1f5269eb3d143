#!/usr/bin/env python
"""Train a LoRA / LoKr network for SDXL with kohya sd-scripts' command line.

    python sdxl_train_network.py --optimizer_type AdaptiveHinaAdamW --learning_rate 1e-3 \\
        --network_module networks.lora --network_train_unet_only --cache_text_encoder_outputs \\
        --pretrained_model_name_or_path /path/to/sdxl-diffusers --train_data_dir /path/to/data ...

The options are train_network.py's plus SDXL's own; with no model and no data it trains on the
embedded tiny SDXL-architecture model and a generated dataset. Exit codes as train_network.py.
"""
from __future__ import annotations

import sys

from train_network import main

if __name__ == "__main__":
    sys.exit(main(sdxl=True))
