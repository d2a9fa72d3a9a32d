import os
import socket
import sys

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported (any test module, or DeepSpeed, may
# import it), so the CPU interpreter must be chosen before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def default_cache(tmp_path_factory):
    """One embedded default corpus for the whole test session (built once, ~30 s)."""
    cache = os.environ.get("FQTRAIN_TEST_CACHE") or str(tmp_path_factory.mktemp("fqtrain-cache"))
    os.environ["FQTRAIN_CACHE"] = cache
    from train.default_data import ensure_default_dataset

    prefix = ensure_default_dataset(2048)
    return {"cache": cache, "prefix": prefix}
