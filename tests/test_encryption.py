"""Encrypted bundles (`--encrypt`): graphs, weights and the embedding table sealed with AES-256-GCM, decrypted in
memory only; the same answers as the plain bundle; a wrong or missing key, and an altered byte, are one clear
error each."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest

import edgellm
from edgellm.errors import EdgeLLMError
from helpers import CORPUS

pytest.importorskip("cryptography", reason="encrypted bundles need it: pip install 'edgellm[encrypt]'")
KEY = "correct horse battery staple"


def files_under(folder) -> dict:
    """path -> modification time of every file under `folder` (files that vanish meanwhile are skipped)."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                found[os.path.join(root, name)] = os.stat(os.path.join(root, name)).st_mtime_ns
            except OSError:
                pass
    return found


@pytest.mark.slow  # scrypt, a conversion and a load per case
@pytest.mark.parametrize("arch,quant", [("llama", "w4"), ("gemma3", "f32")])
def test_an_encrypted_bundle_answers_as_the_plain_one_and_writes_nothing_decrypted(tiny, tmp_path, monkeypatch,
                                                                                  arch, quant):
    _, folder = tiny(arch)
    plain = edgellm.convert(folder, tmp_path / "plain", quantize=quant, seq_length=64, progress=False,
                            do_sample=True)
    sealed = edgellm.convert(folder, tmp_path / "sealed", quantize=quant, seq_length=64, progress=False,
                             encrypt=True, key=KEY, do_sample=True)
    secret = (plain / "decoder.onnx.data").read_bytes()
    probe = secret[len(secret) // 2: len(secret) // 2 + 64]  # weight bytes that must not appear in clear
    for path in sealed.iterdir():
        assert probe not in path.read_bytes(), path.name
    assert b"edgellm" not in (sealed / "decoder.onnx").read_bytes()[:4096]  # the graph's producer is hidden too
    tmp = tempfile.gettempdir()
    before_tmp, before_bundle = files_under(tmp), files_under(sealed)
    monkeypatch.setenv("EDGELLM_KEY", KEY)
    model = edgellm.load(sealed)
    ids = model.tokenizer.encode(CORPUS.read_text())[:30]
    np.testing.assert_array_equal(model.logits(ids), edgellm.load(plain).logits(ids))
    sampled = dict(max_new_tokens=8, temperature=0.8, seed=3, ignore_eos=True)  # through the sealed sampling head
    assert model.generate("Hello", **sampled).token_ids == edgellm.load(plain).generate("Hello", **sampled).token_ids
    assert files_under(sealed) == before_bundle
    for path in set(files_under(tmp)) - set(before_tmp):  # new files anywhere in the temp folder hold no plaintext
        try:
            with open(path, "rb") as f:
                assert probe not in f.read(1 << 30), path
        except OSError:
            pass


def test_missing_wrong_key_and_altered_bytes_are_refused(tiny, tmp_path, monkeypatch):
    _, folder = tiny("llama")
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    sealed = edgellm.convert(folder, tmp_path / "sealed", seq_length=64, progress=False, encrypt=True,
                             key_file=key_file)
    monkeypatch.delenv("EDGELLM_KEY", raising=False)
    with pytest.raises(EdgeLLMError, match="the bundle is encrypted: give its key in \\$EDGELLM_KEY or with"):
        edgellm.load(sealed)
    with pytest.raises(EdgeLLMError, match="wrong key for this encrypted bundle"):
        edgellm.load(sealed, key="not the right key")
    with pytest.raises(EdgeLLMError, match="wrong key for this encrypted bundle"):
        edgellm.load(sealed, key="short")  # too short to be any bundle's key: wrong, not a rule of new keys
    assert edgellm.load(sealed, key_file=key_file).generate("Hi", max_new_tokens=4).text is not None
    with pytest.raises(EdgeLLMError, match="device openvino reads graphs from files"):
        edgellm.load(sealed, device="openvino", key=KEY)
    altered = tmp_path / "altered"
    shutil.copytree(sealed, altered)
    data = bytearray((altered / "decoder.onnx.data").read_bytes())
    data[len(data) // 2] ^= 1
    (altered / "decoder.onnx.data").write_bytes(data)
    with pytest.raises(EdgeLLMError, match="checksum does not match"):
        edgellm.load(altered, key=KEY)
    with pytest.raises(EdgeLLMError, match="does not decrypt with this key \\(a wrong key, or the file was altered\\)"):
        edgellm.load(altered, key=KEY, verify=False)  # past the checksums: the cipher's tag refuses it too
    with pytest.raises(EdgeLLMError, match="encryption key needs at least 8 characters"):
        edgellm.convert(folder, tmp_path / "short", progress=False, encrypt=True, key="short")
    assert not (tmp_path / "short").exists()


def test_the_command_line_converts_and_runs_an_encrypted_bundle(tiny, tmp_path, monkeypatch, capsys):
    from edgellm.cli import main

    _, folder = tiny("llama")
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    monkeypatch.delenv("EDGELLM_KEY", raising=False)
    out = tmp_path / "sealed"
    assert main(["convert", "-m", str(folder), "-o", str(out), "-s", "64", "--encrypt", "--key-file",
                 str(key_file)]) == 0
    assert main(["run", str(out), "Hello", "-n", "4", "--key-file", str(key_file)]) == 0
    assert main(["run", str(out), "Hello", "-n", "4"]) == 2
    assert "give its key in $EDGELLM_KEY or with --key-file" in capsys.readouterr().err
    # --encrypt without a key says what --encrypt needs; a key for a plain bundle is refused, not ignored
    assert main(["convert", "-m", str(folder), "-o", str(tmp_path / "nokey"), "-s", "64", "--encrypt"]) == 2
    assert "--encrypt needs a key to encrypt with: --key-file FILE or $EDGELLM_KEY" in capsys.readouterr().err
    assert not (tmp_path / "nokey").exists()
    plain = edgellm.convert(folder, tmp_path / "plain", seq_length=64, progress=False)
    assert main(["run", str(plain), "Hello", "-n", "2", "--key-file", str(key_file)]) == 2
    assert "the bundle is not encrypted, so it takes no key; drop --key-file" in capsys.readouterr().err
