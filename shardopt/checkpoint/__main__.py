"""``python -m shardopt.checkpoint export DIR OUT``: a checkpoint as one ``torch.save`` file."""

from __future__ import annotations

import argparse
import sys

from .errors import CheckpointError
from .torch_format import export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardopt.checkpoint", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export_command = commands.add_parser(
        "export",
        help="consolidate a checkpoint into one torch.save file: {'model', 'optimizer' (torch.optim's format), "
        "'scheduler', 'extra'} ('optimizer' and 'scheduler' are lists for several optimizers); needs no process group",
    )
    export_command.add_argument("directory", help="the checkpoint directory shardopt.checkpoint.save wrote")
    export_command.add_argument("output", help="the .pt file to write")
    args = parser.parse_args(argv)
    try:
        export(args.directory, args.output)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
