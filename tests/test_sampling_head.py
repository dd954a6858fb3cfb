"""The sampling head (`--do-sample`): a graph that gives the candidates and probabilities the Python sampler gives,
so that draws from it follow the same distribution."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import edgellm
from edgellm.convert.sampling_head import WIDTH, build_sampling_head
from edgellm.runtime.sampling import Sampler, SamplingParams

VOCAB = 300


@pytest.fixture(scope="module")
def head():
    g = build_sampling_head(VOCAB)
    return ort.InferenceSession(g.to_model().SerializeToString(), providers=["CPUExecutionProvider"])


def run_head(head, logits, previous, p: SamplingParams):
    seen = np.zeros((1, VOCAB), np.float32)
    seen[0, list(previous)] = 1
    f = lambda v: np.array([v], np.float32)  # noqa: E731
    probs, ids = head.run(["probs", "ids"], {
        "logits": logits[None].astype(np.float32), "seen": seen, "repetition_penalty": f(p.repetition_penalty),
        "temperature": f(p.temperature), "top_p": f(p.top_p), "min_p": f(p.min_p),
        "top_k": np.array([p.top_k], np.int64)})
    keep = probs[0] > 0
    return ids[0][keep], probs[0][keep]


SETTINGS = [dict(temperature=0.7, top_k=40), dict(temperature=1.3, top_k=64, top_p=0.9),
            dict(temperature=1.0, top_k=10, min_p=0.05, repetition_penalty=1.3),
            dict(temperature=0.5, top_k=50, top_p=0.5, repetition_penalty=0.8), dict(temperature=2.0, top_k=1)]


@pytest.mark.parametrize("settings", SETTINGS)
def test_the_head_gives_the_python_samplers_distribution(head, settings):
    rng = np.random.default_rng(0)
    params = SamplingParams(**settings)
    for _ in range(20):
        logits = rng.normal(0, 3, VOCAB).astype(np.float32)
        previous = rng.integers(0, VOCAB, 12).tolist()
        want_ids, want_probs = Sampler(params).distribution(logits, previous)
        ids, probs = run_head(head, logits, previous, params)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(probs, want_probs, atol=1e-5)


def test_top_k_off_means_the_heads_width(head):
    logits = np.random.default_rng(1).normal(0, 1, VOCAB).astype(np.float32)
    ids, probs = run_head(head, logits, [], SamplingParams(temperature=1.0))
    assert len(ids) == WIDTH
    np.testing.assert_allclose(probs, Sampler(SamplingParams(temperature=1.0, top_k=WIDTH)).distribution(
        logits, [])[1], atol=1e-5)


def test_a_bundle_with_the_head_samples_with_it(tiny, tmp_path):
    """Draws through the bundle's head and through the Python sampler, many per seed, fall alike."""
    _, folder = tiny("llama")
    plain = edgellm.load(edgellm.convert(folder, tmp_path / "plain", quantize="f32", seq_length=64, progress=False))
    headed = edgellm.load(edgellm.convert(folder, tmp_path / "head", quantize="f32", seq_length=64, progress=False,
                                          do_sample=True))
    assert headed.manifest.graphs.get("sampling_head") and not plain.manifest.graphs.get("sampling_head")
    params = SamplingParams(temperature=1.5, top_k=20, top_p=0.95, seed=0)
    logits = plain.logits(plain.tokenizer.encode("Four score and seven"))[-1]
    draws = {}
    for name, model in (("plain", plain), ("head", headed)):
        sampler = model.sampler(params)
        draws[name] = np.bincount([sampler(logits, [3, 5]) for _ in range(4000)], minlength=logits.shape[0])
    assert type(headed.sampler(params)).__name__ == "HeadSampler"
    total_variation = np.abs(draws["plain"] - draws["head"]).sum() / 2 / 4000
    assert total_variation < 0.05, total_variation
    text = headed.generate("Four score", max_new_tokens=8, temperature=0.9, seed=1).text
    assert text == headed.generate("Four score", max_new_tokens=8, temperature=0.9, seed=1).text
