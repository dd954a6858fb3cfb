"""The quality report every bundle carries (the manifest's "quality"): what its precision costs, measured at
conversion. The converted decoder and a float32 decoder of the same source (its own float weights; a GGUF's blocks
dequantized) run over a built-in text; the report holds the perplexity of each and their ratio, how often the two
agree on the next token, the largest logit error, and each layer's output error against the reference's (the
residual stream between layers), with the layers that add the most. Both run on ONNX Runtime's own kernels, as
`EDGELLM_KERNELS=off` runs a bundle; edgellm's kernels round the same int8 activations.

The reference is one more conversion at float32, streamed like any other and deleted after: about the time of a
conversion and, while it runs, the float model's size on disk and in memory; where that would take more than half
the memory available, the report says so instead of measuring. `--no-report` leaves it out."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..format import EmbeddingsEntry, EmbeddingTable, save_table
from ..host import available_bytes
from .decoder_run import run_decoder, with_outputs
from .graph import GraphBuilder, WeightPolicy, data_file, save_graph
from .kv_cache import CALIBRATION_TEXT

REPORT_TOKENS = 256  # of the built-in text (fewer in a shorter bundle)
AGREEMENT_WARNING = 0.9  # top-1 agreement below this gets a warning naming the options that raise it
WORST_LAYERS = 3


def layer_outputs(layers: int) -> list[str]:
    """The residual stream after each layer, as the shared decoder names it: the sum its next norm adds up
    (graph.add_rms_norm), and the final norm's after the last layer."""
    return [f"model.layers.{i}.input_layernorm:sum" for i in range(1, layers)] + ["model.norm:sum"]


def text_ids(tokenizer_json: str, limit: int) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json).encode(CALIBRATION_TEXT).ids[:limit]


def skipped(why: str) -> dict:
    return {"measured": False, "why": why}


def quality_report(stage: Path, plan, embeddings: EmbeddingsEntry, extension_for=None) -> dict:
    """The report of the decoder written into `stage` (`plan`: the converter's), against float32 weights."""
    options = plan.options
    if len(plan.stages) > 1:
        return skipped("a decoder written as stages (--num-device)")
    if options.static:
        return skipped("fixed-shape graphs (--static)")
    if plan.lora_slots is not None:
        return skipped("LoRA slots (--lora-slots)")
    if options.quantize != "f32":
        need, free = reference_bytes(plan.model.args), available_bytes()
        if free is not None and need > free / 2:
            return skipped(f"a float32 reference of about {need / 2**30:.1f} GiB (more than half the "
                           f"{free / 2**30:.1f} GiB available); --no-report skips it outright")
    started = time.perf_counter()
    ids = text_ids(plan.tokenizer_json, min(REPORT_TOKENS, plan.seq_length))
    with tqdm(total=2 * len(ids), desc="quality report", unit="token", disable=not options.progress) as bar, \
            tempfile.TemporaryDirectory(prefix=".report-", dir=stage.parent) as tmp:
        here = Path(tmp)
        mine = _measured(stage / "decoder.onnx", EmbeddingTable(stage, embeddings), ids, plan, extension_for, bar)
        if options.quantize == "f32":
            reference = mine
            what = "itself (float32 weights)"
        else:
            table = _reference_decoder(here, plan)
            reference = _measured(here / "decoder.onnx", table, ids, plan, extension_for, bar)
            what = ("the GGUF's blocks, dequantized to float32" if plan.src.suffix.lower() == ".gguf"
                    else "the checkpoint's own weights in float32")
    report = compare(mine, reference, ids)
    report.update(measured=True, reference=what, seconds=round(time.perf_counter() - started, 1))
    return report


def reference_bytes(a) -> int:
    """About what the float32 reference decoder holds: its projections, the embedding table and the lm_head."""
    attention = a.hidden_size * a.head_dim * (2 * a.num_attention_heads + 2 * a.num_key_value_heads)
    per_layer = attention + 3 * a.hidden_size * a.intermediate_size
    return 4 * (a.num_hidden_layers * per_layer + 2 * a.vocab_size * a.hidden_size)


def _measured(decoder: Path, table: EmbeddingTable, ids: list[int], plan, extension_for,
              bar) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(logits [tokens, vocab], the residual stream after each layer found) of `decoder` over `ids`."""
    copy = decoder.with_name(f".{decoder.name}.report.onnx")  # beside its data file, which it reads
    try:
        found = with_outputs(decoder, layer_outputs(plan.model.args.num_hidden_layers), copy)
        done = bar.n
        run = run_decoder(copy, table, ids, plan.options.chunk_length, extension_for,
                          on_chunk=lambda n: bar.update(done + n - bar.n), all_logits=True, hidden=tuple(found))
    finally:
        copy.unlink(missing_ok=True)
    assert run.logits is not None
    return run.logits, run.hidden


def _reference_decoder(folder: Path, plan) -> EmbeddingTable:
    """The same decoder built at float32 into `folder`; returns its float embedding table."""
    options = plan.options
    g = GraphBuilder(WeightPolicy("f32", options.group_size, options.symmetric, 0), data_file(folder, "decoder.onnx"))
    g.lm_head_policy = WeightPolicy("f32", options.group_size, options.symmetric, 0)
    plan.model.build(g, plan.source, plan.seq_length)
    save_graph(g, folder / "decoder.onnx")
    entry = save_table(folder, plan.model.embedding_table(plan.source), "f32", None, plan.model.embedding_multiplier)
    return EmbeddingTable(folder, entry)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    peak = x.max(axis=-1, keepdims=True)
    return x - peak - np.log(np.exp(x - peak).sum(axis=-1, keepdims=True))


def compare(mine: tuple[np.ndarray, dict], reference: tuple[np.ndarray, dict], ids: list[int]) -> dict:
    (logits, hidden), (ref_logits, ref_hidden) = mine, reference
    after = np.asarray(ids[1:])
    nll = -log_softmax(logits[:-1])[np.arange(len(after)), after]
    ref_nll = -log_softmax(ref_logits[:-1])[np.arange(len(after)), after]
    perplexity, ref_perplexity = float(np.exp(nll.mean())), float(np.exp(ref_nll.mean()))
    error = np.abs(logits.astype(np.float64) - ref_logits)
    layers: list[dict] = []  # {"layer": i, "error": its output's relative error, "added": beyond the layer before}
    for name in hidden:
        ours, theirs = hidden[name].astype(np.float64), ref_hidden[name].astype(np.float64)
        # layer i's output is what layer i + 1's input norm adds up; the final norm's, the last layer's
        index = int(name.split(".")[2]) - 1 if name.startswith("model.layers.") else (
            layers[-1]["layer"] + 1 if layers else 0)
        off = float(np.linalg.norm(ours - theirs) / max(float(np.linalg.norm(theirs)), 1e-30))
        layers.append({"layer": index, "error": off, "added": off - (layers[-1]["error"] if layers else 0.0)})
    worst = sorted(layers, key=lambda e: -e["added"])[:WORST_LAYERS]
    return {"text_tokens": len(ids), "perplexity": round(perplexity, 4),
            "reference_perplexity": round(ref_perplexity, 4),
            "perplexity_ratio": round(perplexity / ref_perplexity, 5),
            "top1_agreement": round(float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()), 4),
            "max_logit_error": round(float(error.max()), 4),
            "relative_logit_error": round(float(error.max() / max(np.abs(ref_logits).max(), 1e-30)), 5),
            "layers": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in e.items()} for e in layers],
            "worst_layers": [e["layer"] for e in worst]}


def advice(report: dict, options) -> str | None:
    """A warning when the bundle's top-1 agreement is low, naming the options that would raise it."""
    if not report.get("measured") or report["top1_agreement"] >= AGREEMENT_WARNING:
        return None
    raise_it = []
    if options.accuracy_level == 4 and options.quantize in ("w4", "w8"):
        raise_it.append("--accuracy-level 0 (float activations)")
    if options.lm_head in ("w4", "w8"):
        raise_it.append(f"--lm-head {'w8' if options.lm_head == 'w4' else 'f16'}")
    if options.quantize == "w4":
        raise_it.append("-q w8")
    if options.kv_cache == "int8":
        raise_it.append("--kv-cache f32")
    layers = ", ".join(str(i) for i in report["worst_layers"])
    return (f"the converted decoder agrees with {report['reference']} on {report['top1_agreement']:.0%} of the "
            f"built-in text's next tokens (perplexity x{report['perplexity_ratio']:.3f}; the layers adding the most "
            f"error: {layers}); {', or '.join(raise_it) if raise_it else 'a higher precision'} would raise it")


def warn(report: dict, options) -> None:
    text = advice(report, options)
    if text:
        print(f"edgellm: warning: {text}", file=sys.stderr)


