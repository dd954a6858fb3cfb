"""LoRA adapters merged at conversion (`--lora`): the bundle computes what PEFT's merged model computes."""

from __future__ import annotations

import json
import shutil

import pytest

import edgellm
from edgellm.errors import EdgeLLMError
from helpers import CORPUS, reference_logits, relative_error

peft = pytest.importorskip("peft", reason="the oracle: pip install peft")


def adapter(model, folder, seed: int, **options):
    """A PEFT LoRA adapter of `model` with random A and B (PEFT starts B at zero, which would test nothing),
    saved in `folder`; returns PEFT's merged model."""
    import copy

    import torch

    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                                **options})
    lora = peft.get_peft_model(copy.deepcopy(model), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    lora.save_pretrained(folder)
    return lora.merge_and_unload().eval()


@pytest.mark.parametrize("options", [
    {},
    {"use_rslora": True, "target_modules": ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"]},
    {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}},
])
def test_a_merged_adapter_matches_peft(tiny, tmp_path, options):
    ref_model, folder = tiny("qwen2")
    merged = adapter(ref_model, tmp_path / "adapter", 5, **options)
    model = edgellm.load(edgellm.convert(folder, tmp_path / "bundle", quantize="f32", seq_length=64,
                                         lora=tmp_path / "adapter", progress=False))
    ids = model.tokenizer.encode(CORPUS.read_text())[:40]
    want = reference_logits(merged, ids)
    assert relative_error(model.logits(ids), want) < 1e-4
    assert relative_error(reference_logits(ref_model, ids), want) > 1e-2  # the adapter changes the model
    assert model.manifest.source["adapter"]["modules"] == len(options.get("target_modules", [1, 2, 3])) * 2


def test_an_adapter_of_another_model_is_one_clear_error(tiny, tmp_path):
    import transformers

    ref_model, folder = tiny("qwen2")
    other = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=ref_model.config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    adapter(other, tmp_path / "other", 1)
    with pytest.raises(EdgeLLMError, match="an adapter of another model"):
        edgellm.convert(folder, tmp_path / "b", lora=tmp_path / "other", progress=False)
    assert not (tmp_path / "b").exists()
    with pytest.raises(EdgeLLMError, match="no adapter_config.json"):
        edgellm.convert(folder, tmp_path / "b", lora=tmp_path, progress=False)
    dora = tmp_path / "dora"
    shutil.copytree(tmp_path / "other", dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(EdgeLLMError, match="DoRA adapters are not supported"):
        edgellm.convert(folder, tmp_path / "b", lora=dora, progress=False)


def test_adapters_fill_compiled_slots_at_run_time(tiny, tmp_path):
    """--lora-slots: the graph holds LoRA branches that a loaded adapter fills; the answer with an adapter is PEFT's
    merged model's, without one the base model's, and sequences with different adapters decode together."""
    ref_model, folder = tiny("qwen2")
    merged = adapter(ref_model, tmp_path / "a", 5)
    merged_b = adapter(ref_model, tmp_path / "b", 6, r=2, target_modules=["k_proj", "o_proj", "gate_proj",
                                                                           "up_proj"])
    bundle = edgellm.convert(folder, tmp_path / "bundle", quantize="f32", seq_length=64, lora_slots=2,
                             lora_max_rank=4, progress=False)
    model = edgellm.load(bundle, slots=2)
    assert model.load_adapter(tmp_path / "a", "a") == "a" and model.load_adapter(tmp_path / "b", "b") == "b"
    ids = model.tokenizer.encode(CORPUS.read_text())[:40]
    for name, want in ((None, ref_model), ("a", merged), ("b", merged_b)):
        assert relative_error(model.logits(ids, adapter=name), reference_logits(want, ids)) < 1e-4, name
    engine = model.engine
    rows = {}
    for slot, name in zip(engine.slots, ("a", "b")):
        with engine.using(slot):
            engine.set_adapter(name)
            engine.prefill(ids[:10])
    together = engine.decode_batch(engine.slots, [ids[10], ids[10]])
    for name, want in (("a", merged), ("b", merged_b)):
        rows[name] = reference_logits(want, ids[:11])[-1]
    assert relative_error(together[0], rows["a"]) < 1e-4 and relative_error(together[1], rows["b"]) < 1e-4
    adapter(ref_model, tmp_path / "big", 7, r=8)
    with pytest.raises(EdgeLLMError, match="the bundle's 2 LoRA slot\\(s\\) are full"):
        model.load_adapter(tmp_path / "big", "c")
    with pytest.raises(EdgeLLMError, match="rank 8 is more than the bundle's LoRA slots hold \\(4\\)"):
        model.load_adapter(tmp_path / "big", "a")  # (in place of a)
    with pytest.raises(EdgeLLMError, match="no adapter named 'c'"):
        model.generate("Hi", adapter="c")


def test_the_server_answers_with_the_adapter_a_request_names(tiny, tmp_path):
    """"model": "BUNDLE:ADAPTER" picks a loaded adapter; /v1/models lists each; the official client drives it."""
    import openai

    from edgellm.server import create_app
    from helpers import running_server

    ref_model, folder = tiny("qwen2")
    adapter(ref_model, tmp_path / "style", 9)
    bundle = edgellm.convert(folder, tmp_path / "bundle", quantize="f32", seq_length=128, lora_slots=1,
                             lora_max_rank=4, progress=False)
    model = edgellm.load(bundle, slots=2)
    model.load_adapter(tmp_path / "style")
    want = {name: model.generate("Hello there", max_new_tokens=12, ignore_eos=True, adapter=name).text
            for name in (None, "style")}
    assert want[None] != want["style"]
    with running_server(create_app(model, "tiny")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == ["tiny", "tiny:style"]
        for served, name in (("tiny", None), ("tiny:style", "style")):
            answer = client.chat.completions.create(model=served, max_tokens=12, temperature=0,
                                                    messages=[{"role": "user", "content": "Hello there"}],
                                                    extra_body={"ignore_eos": True})
            assert answer.choices[0].message.content == want[name] and answer.model == served
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="tiny:other", messages=[{"role": "user", "content": "Hi"}])
