"""The server driven by the official `openai` Python client, over a real socket, with an API key: what the client
sends is answered as the Python API answers it, and errors arrive as the client's own exception types."""

from __future__ import annotations

import logging

import httpx
import pytest

import edgellm
from edgellm.server import create_app
from helpers import running_server

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "When in the Course of human"}]


@pytest.fixture(scope="module")
def served(bundle):
    """(openai client, base URL, a second model on the same bundle for the expected answers)."""
    path = bundle("llama", "f32", seq_length=256)
    with running_server(create_app(edgellm.load(path), "tiny", api_key="sesame")) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0), url, edgellm.load(path)


def test_chat_streamed_or_not_is_the_python_apis_answer(served, caplog):
    client, _, model = served
    want = model.generate(QUESTION, max_new_tokens=12)
    with caplog.at_level(logging.INFO, logger="edgellm.server"):
        answer = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == want.text and answer.choices[0].finish_reason == want.finish_reason
    assert answer.usage.completion_tokens == len(want.token_ids) and answer.model == "tiny"
    line = [r.getMessage() for r in caplog.records if r.name == "edgellm.server"][-1]
    assert line.startswith(answer.id.removeprefix("chatcmpl-")) and f"{len(want.token_ids)} generated" in line
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same conversation again: reused


def test_completions_and_models(served):
    client, _, model = served
    want = model.generate("We hold these truths", max_new_tokens=6, raw=True)
    got = client.completions.create(model="tiny", prompt="We hold these truths", max_tokens=6, temperature=0)
    assert got.choices[0].text == want.text
    assert [m.id for m in client.models.list()] == ["tiny"] and client.models.retrieve("tiny").id == "tiny"


def test_errors_arrive_as_the_clients_exceptions(served):
    client, url, _ = served
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=QUESTION, temperature=5)
    assert "between 0" in bad.value.message and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{url}/health").status_code == 200  # the one route without the key
    assert httpx.get(f"{url}/").status_code == 401 and httpx.get(f"{url}/?api_key=sesame").status_code == 200


def test_metrics_count_requests_tokens_and_times(served):
    client, url, _ = served
    client.completions.create(model="tiny", prompt="Liberty", max_tokens=3, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="", max_tokens=3)
    assert httpx.get(f"{url}/metrics").status_code == 401  # the key guards it too
    text = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer sesame"}).text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    answered = sum(v for k, v in values.items() if k.startswith("edgellm_requests_total") and "refused" not in k)
    assert answered >= 1 and values['edgellm_requests_total{outcome="refused"}'] >= 1
    assert values['edgellm_tokens_total{kind="completion"}'] >= 3 and values["edgellm_ttft_seconds_count"] >= 1
    assert values['edgellm_ttft_seconds_bucket{le="+Inf"}'] == values["edgellm_ttft_seconds_count"]
    assert values["edgellm_queue_length"] == 0 and values["edgellm_resident_memory_bytes"] > 0


def test_metrics_of_several_replicas_add_up_and_parse():
    """metrics.merge (the Ray front's /metrics): every sample summed, each metric's samples after its one HELP and
    TYPE (Prometheus' own parser reads it), and per replica under a `replica` label."""
    parser = pytest.importorskip("prometheus_client.parser")
    from edgellm.metrics import Metrics, merge

    class Finished:
        prompt_tokens, reused_tokens, token_ids, ttft_s, decode_tokens_per_s = 7, 3, [1, 2], 0.2, 30.0

    one, two = Metrics(), Metrics()
    one.finished("stop", Finished())
    two.finished("stop", Finished())
    two.finished("length", Finished())  # an outcome only the second replica has
    texts = {"a": one.text({"queue_length": (1, "waiting")}), "b": two.text({"queue_length": (2, "waiting")})}

    def samples(text):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in parser.text_string_to_metric_families(text) for s in family.samples}

    total = samples(merge(texts))
    assert total[("edgellm_requests_total", (("outcome", "stop"),))] == 2
    assert total[("edgellm_requests_total", (("outcome", "length"),))] == 1
    assert total[("edgellm_tokens_total", (("kind", "prompt"),))] == 21
    assert total[("edgellm_ttft_seconds_bucket", (("le", "0.25"),))] == 3
    assert total[("edgellm_queue_length", ())] == 3 and total[("edgellm_replicas", ())] == 2
    each = samples(merge(texts, per_replica=True))
    assert each[("edgellm_requests_total", (("outcome", "length"), ("replica", "b")))] == 1
    assert each[("edgellm_queue_length", (("replica", "a"),))] == 1


def log_softmax(row):
    import numpy as np

    row = np.asarray(row, dtype=np.float64)
    return row - (row.max() + np.log(np.exp(row - row.max()).sum()))


def test_logprobs_streamed_or_not_are_the_models_own(served):
    """Each chosen token's log-probability and its top alternatives are those of the model's logits over the prompt
    and the answer so far (the Python API's logits(), computed afresh)."""
    import numpy as np

    client, _, model = served
    answer = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    ids = model.prompt_ids(QUESTION)
    want = model.generate(QUESTION, max_new_tokens=8)
    logits = model.logits(ids + want.token_ids[:-1])[len(ids) - 1:]
    for entry, token, row in zip(content, want.token_ids, logits):
        expected = log_softmax(row)
        assert abs(entry.logprob - expected[token]) < 1e-4
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the likeliest
        assert np.allclose([t.logprob for t in entry.top_logprobs], np.sort(expected)[::-1][:3], atol=1e-4)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    plain = client.completions.create(model="tiny", prompt="We hold these truths", max_tokens=5, temperature=0,
                                      logprobs=2)
    lp = plain.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]  # (a token may be part of a
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)  # character: its text is then U+FFFD, as decoded
    # alone, and two such alternatives share one key of the completions shape)
    with pytest.raises(openai.BadRequestError, match="'top_logprobs' needs 'logprobs': true"):
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="'top_logprobs' must be"):
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, logprobs=True, top_logprobs=21)


def test_n_choices_decode_together_and_each_is_an_answer(served):
    client, url, model = served
    greedy = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=6, temperature=0, n=3)
    want = model.generate(QUESTION, max_new_tokens=6)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert all(c.message.content == want.text for c in greedy.choices)  # greedy: three times the one answer
    assert greedy.usage.completion_tokens == 3 * len(want.token_ids)
    sampled = client.completions.create(model="tiny", prompt="We hold these truths", max_tokens=8, temperature=1.0,
                                        seed=5, n=4)
    texts = [c.text for c in sampled.choices]
    assert len(texts) == 4 and len(set(texts)) > 1  # seeds 5, 6, 7, 8: different draws
    again = client.completions.create(model="tiny", prompt="We hold these truths", max_tokens=8, temperature=1.0,
                                      seed=5, n=4)
    assert [c.text for c in again.choices] == texts  # and the same ones again for the same seed
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=6, temperature=0, n=2,
                                            stream=True, stream_options={"include_usage": True})
    pieces: dict[int, str] = {0: "", 1: ""}
    finished = set()
    usage = None
    for chunk in stream:
        for c in chunk.choices:
            pieces[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
        usage = chunk.usage or usage
    assert pieces == {0: want.text, 1: want.text} and finished == {0, 1}
    assert usage.completion_tokens == 2 * len(want.token_ids)
    with pytest.raises(openai.BadRequestError, match="'n' must be"):
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, n=9)


def test_the_responses_api_streamed_or_not(served):
    client, _, model = served
    want = model.generate(QUESTION, max_new_tokens=8)
    response = client.responses.create(model="tiny", instructions="Be brief.", input="When in the Course of human",
                                       max_output_tokens=8, temperature=0)
    assert response.output_text == want.text and response.model == "tiny"
    assert response.usage.output_tokens == len(want.token_ids)
    assert response.status == ("incomplete" if want.finish_reason == "length" else "completed")
    items = [{"role": "user", "content": [{"type": "input_text", "text": "When in the Course of human"}]}]
    events = list(client.responses.create(model="tiny", instructions="Be brief.", input=items, max_output_tokens=8,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want.text
    assert events[-1].response.output_text == want.text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with pytest.raises(openai.BadRequestError, match="'previous_response_id' is not supported"):
        client.responses.create(model="tiny", input="Hi", previous_response_id="resp_123")
