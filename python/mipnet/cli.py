"""The ``mipnet`` command: ``mipnet train``, ``mipnet eval``, ``mipnet predict``, ``mipnet demo``.

``mipnet train -c configs/synthetic_resnet_tiny.yaml train.epochs=5``   train (YAML + overrides; ``--resume``)
``mipnet eval --checkpoint runs/x/checkpoint.pth [--boxes dets.json]``  pycocotools evaluation
``mipnet predict --checkpoint c.pth --image im.jpg --box x,y,w,h``      poses of every instance: PNG + COCO JSON
``mipnet demo [--out demo_out] [--full]``                               the synthetic crowd benchmark

Errors of the user's making (bad config values, missing or unreadable files, a checkpoint
that does not fit the model) print one line and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import __version__, demo, evaluate, predict, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mipnet", description="MIPNet training, evaluation and demo")
    parser.add_argument("--version", action="version", version=f"mipnet {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,predict,demo}")
    for name, module, help_text in (
        ("train", train, "train a baseline or MIPNet model (torchrun for several GPUs)"),
        ("eval", evaluate, "evaluate a checkpoint with pycocotools (GT or detection boxes)"),
        ("predict", predict, "poses of every instance on an image from given boxes (PNG + COCO JSON)"),
        ("demo", demo, "synthetic crowd benchmark: baseline vs MIPNet by occlusion"),
    ):
        p = sub.add_parser(name, help=help_text, description=module.__doc__.split("\n")[0])
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .models import CheckpointMismatchError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError,
            CheckpointMismatchError) as e:
        if args.debug:
            raise
        print(f"mipnet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
