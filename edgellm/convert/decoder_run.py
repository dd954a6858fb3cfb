"""Running a decoder graph the converter has just written over a text, chunk by chunk as the runtime prefills it:
the int8 cache's calibration reads the caches it fills, the quality report the logits at every position and the
residual stream between layers. (The converter does not import the runtime: this is ONNX Runtime directly, with
its own kernels.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..errors import EdgeLLMError
from ..format import ROTARY_LENGTH, EmbeddingTable

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(float16)": np.float16}


def present_name(past: str) -> str:
    """The graph output a cache input is written back to: past_key.3 -> present_key.3."""
    return "present" + past[len("past"):]


@dataclass
class DecoderRun:
    caches: dict[str, np.ndarray]  # past name -> [1, heads, seq_length, dim], filled up to the text's length
    logits: np.ndarray | None = None  # [tokens, vocab], with all_logits
    hidden: dict[str, np.ndarray] = field(default_factory=dict)  # tensor name -> [tokens, hidden]


def with_outputs(decoder: Path, names: list[str], into: Path) -> list[str]:
    """A copy of the graph `decoder` at `into` (beside its data file) that also outputs those of tensors `names` it
    computes; returns them."""
    model = onnx.load(str(decoder), load_external_data=False)
    made = {o for node in model.graph.node for o in node.output}
    found = [n for n in names if n in made]
    model.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in found)
    onnx.save_model(model, str(into))
    return found


def run_decoder(decoder: Path, table: EmbeddingTable, token_ids: list[int], chunk_length: int,
                extension_for=None, on_chunk=None, all_logits: bool = False,
                hidden: tuple[str, ...] = ()) -> DecoderRun:
    """Run `decoder` over `token_ids` in chunks of `chunk_length`. `extension_for(graph inputs {name: shape})`: the
    family's DecoderExtension, whose extra inputs for text it feeds; on_chunk(tokens done) after each chunk;
    all_logits: the logits of every position; `hidden`: graph outputs to collect per position (the decoder must
    output them: with_outputs)."""
    session = ort.InferenceSession(str(decoder), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    extension = extension_for({n: i.shape for n, i in inputs.items()}) if extension_for else None
    names = [n for n in inputs if n.startswith("past_")]
    if not names:
        raise EdgeLLMError(f"{decoder}: the decoder graph has no KV cache inputs")
    length = len(token_ids)
    shape = [d if isinstance(d, int) else 1 for d in inputs[names[0]].shape]  # [1 (of batch), heads, seq, dim]
    caches = {n: np.zeros(shape, ORT_DTYPES.get(inputs[n].type, np.float32)) for n in names}
    binding = session.io_binding()
    for n, cache in caches.items():
        value = ort.OrtValue.ortvalue_from_numpy(cache)
        binding.bind_ortvalue_input(n, value)
        binding.bind_ortvalue_output(present_name(n), value)
    rows = inputs["position_ids"].shape[0] if isinstance(inputs["position_ids"].shape[0], int) else 1
    logits: list[np.ndarray] = []
    collected: dict[str, list[np.ndarray]] = {name: [] for name in hidden}
    for begin in range(0, length, chunk_length):
        end = min(begin + chunk_length, length)
        index = np.arange(end - begin) if all_logits else np.array([end - begin - 1])
        feed = {"inputs_embeds": table[np.asarray(token_ids[begin:end])][None].astype(np.float32),
                "position_ids": np.repeat(np.arange(begin, end, dtype=np.int64)[None], rows, axis=0),
                "seqlens_k": np.array([end - 1], np.int32), "total_sequence_length": np.array(end, np.int32),
                "logits_index": index.astype(np.int64)}
        if extension is not None:
            feed.update(extension.inputs(end - begin, []))
        if ROTARY_LENGTH in inputs:  # the text is one prompt: its whole length decides
            feed[ROTARY_LENGTH] = np.array(length, np.int32)
        for name, value in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in ("logits", *hidden):  # (bound again each chunk: their shapes follow the chunk's length)
            binding.bind_output(name)
        session.run_with_iobinding(binding)
        values = binding.get_outputs()  # in the order bound: the caches (in place), logits, the hidden states
        outputs = {name: values[len(caches) + i].numpy() for i, name in enumerate(["logits", *hidden])}
        if all_logits:
            logits.append(outputs["logits"].reshape(len(index), -1))
        for name in hidden:
            collected[name].append(outputs[name].reshape(end - begin, -1))
        if on_chunk:
            on_chunk(end)
    return DecoderRun(caches, np.concatenate(logits) if all_logits else None,
                      {name: np.concatenate(parts) for name, parts in collected.items()})
