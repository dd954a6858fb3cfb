"""Fixtures: tiny randomly initialised models of each text family, built with transformers (the oracle), and their
bundles; what builds them is in helpers.py."""

from __future__ import annotations

import os
import tempfile

# No test touches the user's cache of bundles or needs the network for a Hugging Face id (huggingface_hub reads
# these at import, so they are set before anything imports it); a test of the hub path sets its own.
os.environ["EDGELLM_CACHE"] = tempfile.mkdtemp(prefix="edgellm-cache-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

import edgellm  # noqa: E402
from helpers import make_tiny_model  # noqa: E402


def pytest_collection_modifyitems(items):
    """browser and soak tests are slow tests too: `-m "not slow"` leaves them out without naming them."""
    for item in items:
        if item.get_closest_marker("browser") or item.get_closest_marker("soak"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch) -> (transformers model, HF folder); built once per session."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            folder = tmp_path_factory.mktemp(f"hf-{arch}")
            cache[arch] = (make_tiny_model(arch, folder), folder)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def bundle(tiny, tmp_path_factory):
    """bundle(arch, quant, **options) -> converted bundle folder; converted once per combination."""
    cache = {}

    def get(arch: str, quant: str = "f32", **options):
        key = (arch, quant, tuple(sorted(options.items())))
        if key not in cache:
            _, folder = tiny(arch)
            out = tmp_path_factory.mktemp("bundles") / f"{arch}-{quant}"
            options.setdefault("seq_length", 512)
            options.setdefault("chunk_length", 16)
            cache[key] = edgellm.convert(folder, out, quantize=quant, progress=False, **options)
        return cache[key]

    return get
