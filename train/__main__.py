"""`python -m train [--config FILE.toml] [--section.key=value ...]`, also the `fqtrain` command."""
from __future__ import annotations

import sys

USAGE = """usage: fqtrain [--config FILE.toml] [--section.key=value ...]

Trains a Llama-style model. With no arguments: the embedded debug run (tiny model, a corpus made
from the Python standard library, FQ INT8 layers on). Sections: model, data, train, optim, fq,
parallel, checkpoint, logging; see train/config.py for every key, its type and default.
Multi-process: torchrun --nproc_per_node=N -m train [...]
"""


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    config_path, overrides = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if arg == "--config":
            if i + 1 >= len(argv):
                raise SystemExit("fqtrain: --config needs a file path")
            config_path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("--") and "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            overrides.append(f"{arg}={argv[i + 1]}")  # --section.key value
            i += 1
        else:
            overrides.append(arg)
        i += 1
    return config_path, overrides


def finish() -> None:
    """Leave after a completed run. A world of one tears its process group down normally. Under
    torchrun the process exits at once instead: the C++ destructors of gloo's (and DeepSpeed's)
    communication threads abort the interpreter's shutdown now and then ("terminate called
    without an active exception", exit -6), which would turn a finished run into a failed job.
    Everything the run writes is flushed and closed by then."""
    import logging
    import os

    import torch.distributed as dist

    if dist.get_world_size() == 1:
        dist.destroy_process_group()
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    from train.config import ConfigError, load_config

    argv = sys.argv[1:] if argv is None else argv
    config_path, overrides = parse_args(argv)
    try:
        cfg = load_config(config_path, overrides)
        from train.trainer import run

        run(cfg)
        finish()
    except ConfigError as e:
        print(f"fqtrain: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # Errors about the user's input or the run's state carry their own explanation: show
        # it without a traceback. Anything else is a bug and keeps its traceback.
        from train.checkpoint import CheckpointError
        from train.data import DataError
        from train.trainer import TrainingAborted

        if isinstance(e, (DataError, CheckpointError, TrainingAborted)):
            print(f"fqtrain: error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
