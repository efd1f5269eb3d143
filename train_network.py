#!/usr/bin/env python
"""Train a LoRA / LoKr network for Stable Diffusion with kohya sd-scripts' command line.

    python train_network.py --optimizer_type AdaptiveHinaAdamW --learning_rate 1e-3 \\
        --optimizer_args "use_lr_mask=True" "warmup_steps=500" --network_module networks.lora \\
        --pretrained_model_name_or_path /path/to/sd15 --train_data_dir /path/to/data ...

With no model and no data it trains on the embedded tiny SD model and a generated dataset.
A mistake in the arguments, the config file or the data ends with one line and exit code 2;
a run stopped by a signal saves first and exits 130 (SIGINT) or 143 (SIGTERM); docs/reliability.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from library.config_util import describe_unknown, output_config, parse_with_config  # noqa: E402
from library.errors import TrainingStopped, UserError  # noqa: E402
from library.train_args import setup_parser  # noqa: E402


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse, but every unrecognised option is named in one message, sd-scripts options
        this trainer lacks told apart from typos (library.config_util.describe_unknown)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            names = [e[2:].split("=", 1)[0] for e in extras if e.startswith("--")]
            known = [s[2:] for a in self._actions for s in a.option_strings if s.startswith("--")]
            message = describe_unknown(names, known, dashes="--")
            stray = [e for e in extras if not e.startswith("--")]
            self.error(message or f"unrecognized arguments: {' '.join(stray)}")
        return parsed


def setup_one_line_parser(sdxl: bool = False) -> argparse.ArgumentParser:
    base = setup_parser(sdxl)
    parser = _OneLineParser(prog=base.prog, description=base.description)
    for action in base._actions:
        if action.dest == "help":
            continue
        parser._add_action(action)
    parser.set_defaults(**base._defaults)
    return parser


def main(argv=None, sdxl: bool = False) -> int:
    """Run ``train_network.py`` (or, with ``sdxl``, ``sdxl_train_network.py``); returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "diffusers", "transformers", "accelerate", "bitsandbytes", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = setup_one_line_parser(sdxl)
    prog = parser.prog
    try:
        args = parse_with_config(parser, argv)
        if args.output_config:
            if not args.config_file:
                raise UserError("--output_config needs --config_file (the file to write)")
            output_config(parser, args, args.config_file)
            return 0
        from library.trainer import prepare, train

        plan = prepare(args)
        train(args, plan)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # saved first; 130 / 143 after SIGINT / SIGTERM, as shells expect
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Tear the process group down on every exit path (normal, user error, crash): a gloo
    process that exits with its group alive can abort at interpreter teardown."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # pragma: no cover - teardown must never mask the real error
        pass


if __name__ == "__main__":
    sys.exit(main())
