"""Property-based fuzzing (hypothesis), bounded in examples: whatever JSON a client sends, the server's request
parser answers with a Job or a clear refusal, never another exception; whatever sampling settings are asked for,
they are refused with EdgeLLMError or give a token of the vocabulary."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import edgellm
from edgellm.errors import EdgeLLMError
from edgellm.runtime.sampling import Sampler, SamplingParams
from edgellm.server import BadRequest, parse

pytestmark = pytest.mark.slow  # hypothesis: hundreds of generated requests and settings

SCALARS = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=16)
PARTS = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "audio", 3])},
                              optional={"text": JSON, "image_url": JSON})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", 1])},
                                optional={"content": st.text(max_size=40) | st.lists(PARTS, max_size=3) | JSON})
FIELDS = {"messages": st.lists(MESSAGE, max_size=4) | JSON, "prompt": st.text(max_size=40) | JSON,
          "max_tokens": st.integers(-5, 1 << 40) | JSON, "max_completion_tokens": JSON,
          "temperature": st.floats(allow_nan=True) | JSON, "top_p": st.floats() | JSON, "top_k": JSON,
          "min_p": JSON, "repetition_penalty": JSON, "seed": JSON, "stop": st.lists(st.text(max_size=3)) | JSON,
          "stream": JSON, "stream_options": JSON, "n": JSON, "response_format": JSON, "tools": JSON,
          "ignore_eos": JSON, "presence_penalty": JSON, "model": JSON}
BODIES = st.fixed_dictionaries({}, optional=FIELDS) | JSON


@pytest.fixture(scope="module")
def model(bundle):
    return edgellm.load(bundle("llama", "f32", seq_length=96))


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_the_request_parser_refuses_clearly_or_accepts(model, chat):
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(BODIES)
    def check(body):
        try:
            job = parse(model, body, chat)
        except (BadRequest, EdgeLLMError) as e:
            assert str(e) and "\n" not in str(e)
            return
        assert 1 <= job.max_tokens <= model.seq_length - len(job.prompt.ids)
        result = model.generate(job.prompt, max_new_tokens=min(job.max_tokens, 2), **job.sampling)
        assert len(result.token_ids) <= 2

    check()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(temperature=st.floats(allow_nan=True), top_k=st.integers(-3, 1 << 40), top_p=st.floats(allow_nan=True),
       min_p=st.floats(allow_nan=True), repetition_penalty=st.floats(allow_nan=True),
       seed=st.none() | st.integers(-1, 1 << 64), logits=st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=50))
@example(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=3.8844845564122986e-243, seed=None,
         logits=[1.0])  # found by CI: the penalty overflowed the logits to inf, and inf - inf made NaN probabilities
@example(temperature=1e-300, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1e-320, seed=1, logits=[1.0, 1e4])
def test_sampling_settings_are_refused_or_give_a_token(temperature, top_k, top_p, min_p, repetition_penalty, seed,
                                                      logits):
    try:
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    except EdgeLLMError as e:
        assert "must be" in str(e)
        return
    assert all(math.isfinite(v) for v in (temperature, top_p, min_p, repetition_penalty))
    token = Sampler(params)(np.array(logits, np.float32), [0, len(logits) - 1])
    assert 0 <= token < len(logits)
