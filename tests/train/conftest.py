"""Fixtures of the training tests."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gptlab.data.shards import prepare


@pytest.fixture(scope="module")
def pydocs(tmp_path_factory, tiny_tokenizer) -> Path:
    """python-docs (the embedded corpus) tokenized with the 512-id test tokenizer."""
    out = tmp_path_factory.mktemp("pydocs") / "data"
    prepare("python-docs", tiny_tokenizer, out, val_fraction=0.01, show_progress=False)
    return out


def free_port() -> int:
    """A TCP port nothing listens on now, for a test's process group (MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
