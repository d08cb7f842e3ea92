"""Fixtures of the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptlab.data.shards import prepare


@pytest.fixture(scope="module")
def pydocs(tmp_path_factory, tiny_tokenizer) -> Path:
    """python-docs (the embedded corpus) tokenized with the 512-id test tokenizer."""
    out = tmp_path_factory.mktemp("pydocs") / "data"
    prepare("python-docs", tiny_tokenizer, out, val_fraction=0.01, show_progress=False)
    return out
