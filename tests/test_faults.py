"""Faults an unattended box meets: a conversion killed part-way, a disk that fills up. Nothing half-written may stay
behind where a later run would trip on it."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgellm

ROOT = Path(__file__).resolve().parents[1]


def convert_command(folder: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "edgellm.cli", "convert", "-m", str(folder), "-o", str(out), "-s", "128"]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def larger_model(folder: Path) -> Path:
    """A random Llama of 18M parameters: its conversion writes for long enough to be killed part-way."""
    import torch
    import transformers

    from helpers import write_tokenizer

    folder.mkdir(parents=True)
    vocab = write_tokenizer(folder)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_a_conversion_killed_at_random_points_leaves_nothing_behind(tmp_path):
    """SIGKILL while the bundle is being written (at random moments after its staging folder appears): no bundle
    appears at the output, and the next conversion removes what the killed ones left and succeeds."""
    folder = larger_model(tmp_path / "hf")
    out = tmp_path / "bundle"
    rng = random.Random(0)
    killed_while_writing = 0
    for _attempt in range(5):
        process = subprocess.Popen(convert_command(folder, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        before = set(leftovers(out))
        deadline = time.monotonic() + 60
        while set(leftovers(out)) == before and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)  # until its staging folder exists: the conversion is writing
        time.sleep(rng.uniform(0, 0.3))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        if out.exists():  # it finished before the signal: a whole bundle, which loads
            edgellm.load(out)
            shutil.rmtree(out)
        elif process.returncode == -signal.SIGKILL and set(leftovers(out)) - before:
            killed_while_writing += 1
    assert killed_while_writing >= 1
    done = subprocess.run(convert_command(folder, out), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert leftovers(out) == []
    assert edgellm.load(out).generate("Liberty", max_new_tokens=2).token_ids


def small_folder(tmp_path: Path):
    """A folder of at most 256 KiB: a tmpfs when this user may mount one, else a per-file size limit (both make
    writes fail with an OSError, ENOSPC or EFBIG, part-way through the conversion)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                            capture_output=True).returncode == 0:
        return mount, "", lambda: subprocess.run(["umount", str(mount)], capture_output=True)
    limit = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             "resource.setrlimit(resource.RLIMIT_FSIZE, (262144, 262144)); ")
    return mount, limit, lambda: None


def test_a_full_disk_is_one_clear_error_and_leaves_nothing(tiny, tmp_path):
    _, folder = tiny("qwen2")
    mount, limit, release = small_folder(tmp_path)
    try:
        out = mount / "bundle"
        code = (f"{limit}import sys; from edgellm.cli import main; "
                f"sys.exit(main(['convert', '-m', {str(folder)!r}, '-o', {str(out)!r}, '-q', 'f32']))")
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert f"writing {out} failed:" in done.stderr and "nothing was written" in done.stderr
        assert "Traceback" not in done.stderr
        assert list(mount.iterdir()) == []
    finally:
        release()


@pytest.mark.parametrize("leftover", [".bundle.partial-999999999-1", ".bundle.old-999999999"])
def test_leftovers_of_a_dead_process_are_removed_and_a_live_ones_kept(tiny, tmp_path, leftover):
    _, folder = tiny("llama")
    (tmp_path / leftover).mkdir()
    (tmp_path / leftover / "decoder.onnx").write_bytes(b"half")
    live = tmp_path / f".bundle.partial-{os.getpid()}-1"  # a conversion still running (this process)
    live.mkdir()
    edgellm.convert(folder, tmp_path / "bundle", seq_length=64, progress=False)
    assert not (tmp_path / leftover).exists() and live.exists()
