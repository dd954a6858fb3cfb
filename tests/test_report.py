"""The quality report inside every bundle (convert/report.py): measured at conversion against the source's float
weights (a GGUF's dequantized blocks), its figures are those the runtime computes from the two bundles; `edgellm
info` shows it, the server's model card serves it, `quality` prints it, and a low agreement gets a warning naming
the options that raise it."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from starlette.testclient import TestClient
from test_gguf import write_gguf

import edgellm
from edgellm.cli import main
from edgellm.convert.options import ConvertOptions
from edgellm.convert.report import advice, log_softmax, text_ids
from edgellm.server import create_app


def expected(bundle, reference, ids) -> dict:
    """The report's figures recomputed with the runtime, on ONNX Runtime's kernels as the report runs."""
    got, want = edgellm.load(bundle).logits(ids), edgellm.load(reference).logits(ids)
    after = np.asarray(ids[1:])

    def perplexity(logits):
        return float(np.exp(-log_softmax(logits[:-1])[np.arange(len(after)), after].mean()))

    return {"perplexity": perplexity(got), "reference_perplexity": perplexity(want),
            "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
            "max_logit_error": float(np.abs(got.astype(np.float64) - want).max())}


@pytest.mark.parametrize("source", ["folder", "gguf"])
def test_the_report_is_what_the_two_bundles_compute(tiny, tmp_path, monkeypatch, source):
    monkeypatch.setenv("EDGELLM_KERNELS", "off")
    model, folder = tiny("llama")
    src = folder
    if source == "gguf":
        src = tmp_path / "q4.gguf"
        write_gguf(model, folder, src, "llama", gguf.GGMLQuantizationType.Q4_0)
    w4 = edgellm.convert(src, tmp_path / "w4", seq_length=512, progress=False)
    f32 = edgellm.convert(src, tmp_path / "f32", quantize="f32", seq_length=512, progress=False)
    report = edgellm.load(w4).manifest.quality
    assert report["measured"] and report["text_tokens"] == 256
    assert report["reference"] == ("the GGUF's blocks, dequantized to float32" if source == "gguf"
                                   else "the checkpoint's own weights in float32")
    want = expected(w4, f32, text_ids((w4 / "tokenizer.json").read_text(), 256))
    for key, value in want.items():
        assert report[key] == pytest.approx(value, rel=2e-3, abs=2e-3), key
    assert report["perplexity_ratio"] == pytest.approx(want["perplexity"] / want["reference_perplexity"], rel=1e-3)
    layers = model.config.num_hidden_layers
    assert [e["layer"] for e in report["layers"]] == list(range(layers))  # the residual stream after each
    assert all(e["error"] > 0 for e in report["layers"]) and set(report["worst_layers"]) <= set(range(layers))
    own = edgellm.load(f32).manifest.quality  # a float32 bundle is its own reference
    assert own["reference"] == "itself (float32 weights)" and own["top1_agreement"] == 1.0
    assert own["perplexity_ratio"] == 1.0 and own["max_logit_error"] == 0.0


def test_info_the_model_card_and_quality_show_it(bundle, tmp_path, capsys):
    path = bundle("llama", "w4")
    report = edgellm.load(path).manifest.quality
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("source", "precision  -q w4", "runs on", f"top-1 agreement {report['top1_agreement']:.1%}",
                 "each layer's output error"):
        assert text in out, text
    card = TestClient(create_app(edgellm.load(path), "tiny")).get("/v1/models/tiny").json()
    assert card["quality"] == report
    text = tmp_path / "text.txt"
    text.write_text("We hold these truths to be self-evident, that all men are created equal. " * 4)
    assert main(["quality", str(path), "--text", str(text), "--reference", str(bundle("llama", "f32"))]) == 0
    assert "at conversion: against the checkpoint's own weights" in capsys.readouterr().out


def test_no_report_skipped_shapes_and_old_bundles_say_so(tiny, bundle, tmp_path, capsys):
    _, folder = tiny("llama")
    bare = edgellm.convert(folder, tmp_path / "bare", seq_length=64, progress=False, report=False)
    assert edgellm.load(bare).manifest.quality is None
    assert main(["info", str(bare)]) == 0
    assert "no quality report (converted before edgellm measured one, or with --no-report)" in \
        capsys.readouterr().out
    static = edgellm.load(bundle("llama", "w4", static=True)).manifest.quality
    assert static == {"measured": False, "why": "fixed-shape graphs (--static)"}


def test_a_low_agreement_names_the_options_that_raise_it():
    options = ConvertOptions(quantize="w4", lm_head="w8", accuracy_level=4, kv_cache="int8")
    low = {"measured": True, "top1_agreement": 0.8, "perplexity_ratio": 1.07, "worst_layers": [0, 27],
           "reference": "the checkpoint's own weights in float32"}
    text = advice(low, options)
    assert "agrees with the checkpoint's own weights in float32 on 80% of the built-in text's next tokens" in text
    for option in ("--accuracy-level 0", "--lm-head f16", "-q w8", "--kv-cache f32", "layers adding the most error: "
                                                                                     "0, 27"):
        assert option in text, option
    assert advice({**low, "top1_agreement": 0.95}, options) is None
