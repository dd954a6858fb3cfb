"""Models as users name them (model_store.py, hub.py): a Hugging Face folder, a .gguf file or a Hugging Face id runs
directly, converted once into the cache of bundles. Hub ids are resolved against a hub cache laid out on disk as
huggingface_hub lays it (refs/, snapshots/, blobs/); nothing reaches the network."""

from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import huggingface_hub
import huggingface_hub.constants  # (the package loads its submodules lazily)
import pytest
from test_gguf import write_gguf

import edgellm
from edgellm.cli import main
from edgellm.errors import EdgeLLMError
from edgellm.hub import HubId, parse_hub_id, pick_gguf
from edgellm.model_store import cached_bundles

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo: str, files: dict[str, Path]) -> Path:
    """A hub cache holding `files` (name in the repository -> a local file) of `repo` at COMMIT on main: blobs named
    by content, snapshot entries as links to them, as huggingface_hub writes them."""
    storage = root / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(COMMIT)
    for name, source in files.items():
        data = source.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        entry = storage / "snapshots" / COMMIT / name
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / blob.name)
    return storage


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline hub cache in tmp_path/hub (HF_HUB_OFFLINE, as huggingface_hub reads it)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path / "edgellm"))
    return cache


def test_hub_ids_are_told_from_paths():
    assert parse_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") == HubId("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert parse_hub_id("bartowski/Qwen2.5-0.5B-GGUF:Q4_K_M@v1.0") == HubId("bartowski/Qwen2.5-0.5B-GGUF", "Q4_K_M",
                                                                             "v1.0")
    assert parse_hub_id("hf.co/org/name:model-q8_0.gguf") == HubId("org/name", "model-q8_0.gguf")
    for not_an_id in ("./org/name", "/abs/path", "name", "a/b/c", "~/x/y"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_a_gguf_repository_picks_its_file_by_tag():
    files = ["README.md", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-q4_k_s.gguf", "mmproj-f16.gguf"]
    assert pick_gguf(HubId("o/m"), files) == "m-Q4_K_M.gguf"  # the default, as ollama picks it
    assert pick_gguf(HubId("o/m", "q8_0"), files) == "m-Q8_0.gguf"
    assert pick_gguf(HubId("o/m", "m-q4_k_s.gguf"), files) == "m-q4_k_s.gguf"
    with pytest.raises(EdgeLLMError, match=r"no GGUF file\(s\) match.*m-Q4_K_M.gguf, m-Q8_0.gguf"):
        pick_gguf(HubId("o/m", "IQ2_XS"), files)
    with pytest.raises(EdgeLLMError, match="split into several files"):
        pick_gguf(HubId("o/m", "Q2_K"), ["m-Q2_K-00001-of-00002.gguf", "m-Q2_K-00002-of-00002.gguf"])


@pytest.mark.slow
def test_a_hugging_face_folder_runs_directly_and_converts_once(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path / "cache"))
    _, folder = tiny("llama")
    assert main(["run", str(folder), "-p", "Hello", "-n", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert f"converting {folder.resolve()} into {tmp_path / 'cache' / 'bundles'}" in err and "TTFT" in err
    assert main(["run", str(folder), "-p", "Hello", "-n", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "converting" not in err and "using " in err  # the cached bundle, said where
    (record,) = cached_bundles()
    assert record.source == str(folder.resolve()) and record.path.is_dir()
    # the same greedy answer as the bundle converted by hand
    by_hand = edgellm.load(edgellm.convert(folder, tmp_path / "by-hand", progress=False))
    direct = edgellm.load(folder)
    assert direct.generate("Hello", 8).token_ids == by_hand.generate("Hello", 8).token_ids
    # a changed checkpoint is another bundle, never the stale one
    config = (folder / "config.json").read_text()
    try:
        (folder / "config.json").write_text(config.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
        edgellm.load(folder)
        assert len(cached_bundles()) == 2
    finally:
        (folder / "config.json").write_text(config)
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert record.name in listed and "MiB" in listed and str(folder.resolve()) in listed
    assert main(["rm", record.name]) == 0
    assert not record.path.exists() and len(cached_bundles()) == 1
    assert main(["rm", "nothing-of-that-name"]) == 2
    assert "no cached bundle has that name" in capsys.readouterr().err
    from edgellm.model_store import cached

    renamed = cached(folder, "by another name", False, {}, name="fixed-name")  # as the demo names its bundle
    assert edgellm.load(folder).bundle.path == renamed  # the same source and options: found under that name


@pytest.mark.slow
def test_hub_ids_resolve_through_the_hub_cache(tiny, tmp_path, offline_hub, capsys):
    model, folder = tiny("llama")
    checkpoint = {p.name: p for p in folder.iterdir() if p.is_file()}
    hub_cache(offline_hub, "someone/tiny-llama", checkpoint)
    q4 = tmp_path / "tiny-Q4_0.gguf"
    write_gguf(model, folder, q4, "llama", gguf.GGMLQuantizationType.Q4_0)
    q8 = tmp_path / "tiny-Q8_0.gguf"
    write_gguf(model, folder, q8, "llama", gguf.GGMLQuantizationType.Q8_0)
    hub_cache(offline_hub, "someone/tiny-llama-GGUF", {"tiny-Q4_0.gguf": q4, "tiny-Q8_0.gguf": q8})

    direct = edgellm.load("someone/tiny-llama")
    by_hand = edgellm.load(edgellm.convert(folder, tmp_path / "by-hand", progress=False))
    assert direct.generate("Hello", 6).token_ids == by_hand.generate("Hello", 6).token_ids
    assert main(["run", "someone/tiny-llama-GGUF:Q8_0", "-p", "Hello", "-n", "2"]) == 0
    assert "converting someone/tiny-llama-GGUF:Q8_0" in capsys.readouterr().err
    from_q8 = edgellm.load(edgellm.convert(q8, tmp_path / "q8", progress=False))
    assert edgellm.load("someone/tiny-llama-GGUF:Q8_0").generate("Hi", 4).token_ids == \
        from_q8.generate("Hi", 4).token_ids
    assert {r.source for r in cached_bundles()} == {"someone/tiny-llama", "someone/tiny-llama-GGUF:Q8_0"}
    # without a tag: no Q4_K_M here, two files: the user is told which there are
    assert main(["run", "someone/tiny-llama-GGUF", "-p", "x"]) == 2
    assert "tiny-Q4_0.gguf, tiny-Q8_0.gguf" in capsys.readouterr().err


def test_an_id_neither_cached_nor_reachable_is_one_clear_error(tmp_path, offline_hub, monkeypatch, capsys):
    assert main(["run", "nobody/not-cached", "-p", "x"]) == 2
    err = capsys.readouterr().err
    assert "nobody/not-cached is not in the Hugging Face cache" in err and "HF_HUB_OFFLINE is set" in err
    assert "Traceback" not in err
    # online, but the hub cannot be reached (a closed port stands for a machine without a network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    assert main(["serve", "nobody/not-cached", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "could not be reached" in err and "hf download nobody/not-cached" in err
    # a path that is not there and cannot be an id
    assert main(["run", str(tmp_path / "nothing"), "-p", "x"]) == 2
    assert "no such bundle folder, Hugging Face folder or .gguf file" in capsys.readouterr().err


@pytest.mark.slow
def test_a_gguf_takes_the_documented_defaults_written_out(tiny, tmp_path):
    model, folder = tiny("llama")
    q4 = tmp_path / "model.gguf"
    write_gguf(model, folder, q4, "llama", gguf.GGMLQuantizationType.Q4_0)
    assert main(["convert", "-m", str(q4), "-o", str(tmp_path / "cli"), "-g", "128", "--sym"]) == 0
    edgellm.convert(q4, tmp_path / "api", group_size=128, symmetric=True, progress=False)
    assert (tmp_path / "api" / "manifest.json").is_file()
