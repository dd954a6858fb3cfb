"""`edgellm info BUNDLE`: what a bundle holds, read from its manifest alone (nothing is loaded): where it came from,
the options it was converted with, its sizes and files, what it can run on, and its quality report."""

from __future__ import annotations

from pathlib import Path

from .format import STEP_GRAPH, VISION_GRAPH, Manifest, open_bundle


def quality_summary(report: dict | None) -> str:
    """The quality report in one line (the conversion's last line, `edgellm info`, `edgellm quality`)."""
    if not report:
        return "no quality report (converted before edgellm measured one, or with --no-report)"
    if not report.get("measured"):
        return f"no quality report: not measured for {report.get('why', 'this bundle')}"
    return (f"against {report['reference']}, over {report['text_tokens']} tokens of the built-in text: perplexity "
            f"{report['perplexity']:.3f} (x{report['perplexity_ratio']:.4f}), top-1 agreement "
            f"{report['top1_agreement']:.1%}, largest logit error {report['max_logit_error']:.3g}, worst layers "
            f"{', '.join(map(str, report['worst_layers'])) or '-'}")


def runs_on(manifest: Manifest) -> list[str]:
    """The devices and paths the bundle can run on, and why not where it cannot."""
    from .kernels import status

    q = manifest.quantization
    out = [f"cpu: {status().describe() if q.mode in ('w4', 'w8') else 'ONNX Runtime (float weights)'}"]
    out.append("cuda: with onnxruntime-gpu")
    if manifest.encryption is not None:
        out.append("openvino: no (its graphs are encrypted; OpenVINO reads files)")
    elif q.kv_cache == "int8":
        out.append("openvino: no (OpenVINO cannot read the int8 cache's scales)")
    else:
        out.append("openvino: prefill and vision (pip install -e \".[openvino]\")")
    stages = len(manifest.decoder_stages)
    if stages > 1:
        out.append(f"{stages} stages: -c one device per stage (e.g. cpu,cpu)")
    if STEP_GRAPH in manifest.graphs:
        out.append("fixed shapes (--static): accelerators without dynamic shapes")
    return out


def describe(path: str | Path) -> str:
    bundle = open_bundle(path, verify=False)
    m = bundle.manifest
    q, shape = m.quantization, m.model
    total = m.size_bytes / 2**20
    rows = [
        ("bundle", f"{bundle.path} (format v{m.format_version}, {m.created_by or 'edgellm'})"),
        ("source", f"{m.source.get('path', '?')} ({m.source.get('format', '?')})"),
        ("model", f"{m.architecture} (family {m.family}): {shape.num_hidden_layers} layers, hidden "
                  f"{shape.hidden_size}, {shape.num_attention_heads} heads of {shape.head_dim} "
                  f"({shape.num_key_value_heads} KV), vocabulary {shape.vocab_size}"),
        ("context", f"{m.seq_length} positions, prefill chunks of {m.chunk_length}"
                    + (f"; LongRoPE's long tables past {shape.rotary_switch}" if shape.rotary_switch else "")),
        ("precision", f"-q {q.mode}, blocks of {q.group_size} ({'symmetric' if q.symmetric else 'zero points'}), "
                      f"lm_head {q.lm_head}, accuracy level {q.accuracy_level}, {q.kv_cache} KV cache"),
        ("matmuls", ", ".join(f"{n} x {kind}" for kind, n in q.matmuls.items()) or "float"),
    ]
    if m.vision is not None:
        rows.append(("vision", f"{m.vision.family}, weights {m.vision.quantization}"))
    if m.lora:
        rows.append(("LoRA slots", f"{m.lora['slots']} adapters of rank up to {m.lora['rank']}"))
    if m.encryption is not None:
        rows.append(("encrypted", f"{len(m.encryption['files'])} files (a key is needed to load it)"))
    rows.append(("size", f"{total:,.1f} MiB in {len(m.files)} files"))
    rows += [("", f"{name}  {entry.bytes / 2**20:,.1f} MiB" + (f" (linked to {m.shared[name]})"
                                                               if name in m.shared else ""))
             for name, entry in sorted(m.files.items(), key=lambda kv: -kv[1].bytes)]
    rows += [("runs on" if i == 0 else "", line) for i, line in enumerate(runs_on(m))]
    rows.append(("quality", quality_summary(m.quality)))
    if m.quality and m.quality.get("layers"):
        errors = "  ".join(f"{e['layer']}:{e['error']:.3g}" for e in m.quality["layers"])
        rows.append(("", f"each layer's output error against the reference: {errors}"))
    if VISION_GRAPH in m.graphs and m.quality and m.quality.get("measured"):
        rows.append(("", "(the report measures the text decoder; the vision graph is not in it)"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {text}" for label, text in rows)
