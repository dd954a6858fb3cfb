"""`edgellm quality`: perplexity of a bundle on a text, and its top-1 agreement with a reference bundle.

Both are teacher-forced: every position predicts the next token of the text, in windows of the bundle's length.
"""

from __future__ import annotations

import numpy as np


def window_logits(model, ids: list[int], window: int):
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start: start + window]
        if len(chunk) > 1:
            yield chunk, model.logits(chunk)


def negative_log_likelihoods(model, ids: list[int], window: int) -> np.ndarray:
    nll = []
    for chunk, logits in window_logits(model, ids, window):
        x = logits[:-1].astype(np.float64)
        log_z = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        nll.append(log_z - x[np.arange(len(chunk) - 1), chunk[1:]])
    return np.concatenate(nll)


def evaluate(model, text: str, reference=None, max_tokens: int = 2048) -> dict:
    ids = model.tokenizer.encode(text)[:max_tokens]
    if len(ids) < 2:
        from .errors import EdgeLLMError

        raise EdgeLLMError("the text is too short to measure (fewer than two tokens)")
    window = min(model.seq_length, reference.seq_length if reference else model.seq_length)
    report = {"tokens": len(ids), "window": window,
              "perplexity": float(np.exp(negative_log_likelihoods(model, ids, window).mean()))}
    if reference is not None:
        ref_ids = reference.tokenizer.encode(text)[:max_tokens]
        if ref_ids != ids:
            from .errors import EdgeLLMError

            raise EdgeLLMError("the reference bundle tokenizes the text differently; compare bundles of one model")
        same = [(a.argmax(-1) == b.argmax(-1)) for (_, a), (_, b) in
                zip(window_logits(model, ids, window), window_logits(reference, ids, window))]
        report["top1_agreement"] = float(np.concatenate(same).mean())
        report["reference_perplexity"] = float(np.exp(negative_log_likelihoods(reference, ids, window).mean()))
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['tokens']} tokens, windows of {report['window']}",
             f"perplexity            {report['perplexity']:.4f}"]
    if "top1_agreement" in report:
        lines += [f"reference perplexity  {report['reference_perplexity']:.4f} "
                  f"({report['perplexity'] / report['reference_perplexity'] - 1:+.2%})",
                  f"top-1 agreement       {report['top1_agreement']:.2%}"]
    return "\n".join(lines)
