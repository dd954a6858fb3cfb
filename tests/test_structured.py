"""Structured output (llguidance): answers that must be JSON, or JSON of a schema, parse and validate every time,
greedy or sampled at temperature 1, through the Python API, the server and the official openai client."""

from __future__ import annotations

import json

import numpy as np
import pytest
from starlette.testclient import TestClient

import edgellm
from edgellm.errors import EdgeLLMError
from edgellm.server import create_app
from helpers import running_server

pytest.importorskip("llguidance", reason="the structured extra is not installed (pip install -e '.[structured]')")
jsonschema = pytest.importorskip("jsonschema")

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}, "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}}
POINTS = {"type": "array", "minItems": 1, "maxItems": 3,
          "items": {"type": "object", "required": ["x", "y"], "additionalProperties": False,
                    "properties": {"x": {"type": "number"}, "y": {"type": "number"}}}}


@pytest.fixture(scope="module")
def model(bundle):
    return edgellm.load(bundle("llama", "f32", seq_length=512))


@pytest.mark.parametrize("schema", [PERSON, POINTS], ids=["object", "array"])
def test_answers_follow_the_schema_greedy_and_sampled(model, schema):
    # the tiny random model would write anything; under the constraint every answer is valid
    for temperature, seed in [(0, None), *[(1.0, s) for s in range(4)]]:
        result = model.generate("Describe it.", max_new_tokens=300, json_schema=schema, temperature=temperature,
                                seed=seed)
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), schema)
    free = model.generate("Describe it.", max_new_tokens=40, temperature=0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.text)  # without the constraint it is not JSON


def test_a_schema_the_engine_refuses_and_drafting_are_clear_errors(model):
    with pytest.raises(EdgeLLMError, match="json_schema must be True or a JSON schema object"):
        model.generate("x", json_schema=5)
    with pytest.raises(EdgeLLMError, match="does not combine with drafting"):
        model.generate("x", json_schema=True, prompt_lookup=3)
    with pytest.raises(EdgeLLMError, match="the JSON schema cannot be used"):
        model.generate("x", json_schema={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})


def test_the_server_takes_response_format_streamed_or_not(model):
    client = TestClient(create_app(model, "tiny"))
    question = [{"role": "user", "content": "A person, please."}]
    for response_format, schema in [({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                            "strict": True}}, PERSON),
                                    ({"type": "json_object"}, {"type": "object"})]:
        body = {"messages": question, "max_tokens": 300, "temperature": 1, "seed": 3,
                "response_format": response_format}
        if schema is not PERSON:  # any object: bound it by the model's own end, or take what fits
            body["max_tokens"] = 400
        r = client.post("/v1/chat/completions", json=body)
        answer = r.json()["choices"][0]
        if answer["finish_reason"] == "stop":
            jsonschema.validate(json.loads(answer["message"]["content"]), schema)
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                       for line in streamed.text.split("\n\n") if line.startswith("data: {")
                       and json.loads(line[6:])["choices"])
        assert text == answer["message"]["content"]  # the same seed: the same answer
    r = client.post("/v1/chat/completions", json={"messages": question, "response_format": {"type": "xml"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    r = client.post("/v1/chat/completions", json={"messages": question, "response_format": {
        "type": "json_schema", "json_schema": {"name": "bad", "schema": {"$ref": "#/$defs/missing"}}}})
    assert r.status_code == 400 and "the JSON schema cannot be used" in r.json()["error"]["message"]


def test_the_openai_client_gets_schema_answers(bundle):
    """With the official client over a socket (its json_schema response_format, as applications send it)."""
    openai = pytest.importorskip("openai")

    model = edgellm.load(bundle("llama", "f32", seq_length=512))
    with running_server(create_app(model, "tiny")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        for seed in range(3):
            answer = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "A person."}], max_tokens=300, temperature=1,
                seed=seed, response_format={"type": "json_schema",
                                            "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
            jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)


def test_a_reasoning_model_thinks_freely_before_the_constraint(model):
    """The state machine of a reasoning model's constrained answer, driven by chosen logits: a think block at the
    start (or one the prompt opened) is not masked; after its end the answer is held to the grammar."""
    from edgellm.runtime.constraints import JsonConstraint
    from edgellm.runtime.model import ConstrainedSampler
    from edgellm.runtime.sampling import Sampler, SamplingParams

    vocab = model.manifest.model.vocab_size
    think = (model.tokenizer.token_to_id("<|im_start|>"), model.tokenizer.token_to_id("<|endoftext|>"))  # stand-ins
    word = model.tokenizer.encode("truths")[0]  # never a valid first token of JSON

    def favouring(token):
        logits = np.zeros(vocab, np.float32)
        logits[token] = 10.0
        return logits

    def constrained(prompt_ids=()):
        return ConstrainedSampler(Sampler(SamplingParams()), JsonConstraint(model.grammar_tokenizer, PERSON, vocab),
                                  model.eos_token_ids, think, list(prompt_ids))

    sampler = constrained()
    assert sampler(favouring(think[0]), []) == think[0]  # the answer opens a think block
    assert sampler(favouring(word), []) == word  # inside it nothing is masked
    assert sampler(favouring(think[1]), []) == think[1]
    after = sampler(favouring(word), [])
    assert after != word and model.tokenizer.decode([after]).strip() in ("{", "")  # the answer: JSON again
    assert constrained(prompt_ids=[5, think[0], 7])(favouring(word), []) == word  # the prompt opened the block
    assert constrained()(favouring(word), []) != word  # no block: constrained from the first token
