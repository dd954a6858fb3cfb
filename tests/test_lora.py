"""LoRA adapters merged at conversion (`--lora`): the bundle computes what PEFT's merged model computes."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import CORPUS, reference_logits, relative_error

import edgellm
from edgellm.errors import EdgeLLMError

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
