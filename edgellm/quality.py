"""`edgellm quality`: perplexity of a bundle on a text, and its top-1 agreement with a reference bundle.

Both are teacher-forced: every position predicts the next token of the text, in windows of the bundle's length.
"""

from __future__ import annotations

import numpy as np

from .errors import EdgeLLMError


def score(model, ids: list[int], window: int) -> tuple[np.ndarray, np.ndarray]:
    """Per predicted position: the negative log-likelihood of the true next token, and the model's top-1 token.
    Each window's logits are computed once and reduced at once, so only two numbers per position are kept."""
    nll, top1 = [], []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start: start + window]
        if len(chunk) < 2:
            continue
        x = model.logits(chunk)[:-1].astype(np.float64)
        peak = x.max(-1)
        log_z = np.log(np.exp(x - peak[:, None]).sum(-1)) + peak
        nll.append(log_z - x[np.arange(len(chunk) - 1), chunk[1:]])
        top1.append(x.argmax(-1))
    return np.concatenate(nll), np.concatenate(top1)


def evaluate(model, text: str, reference=None, max_tokens: int = 2048) -> dict:
    ids = model.tokenizer.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise EdgeLLMError("the text is too short to measure (fewer than two tokens)")
    if reference is not None and reference.tokenizer.encode(text)[:max_tokens] != ids:
        raise EdgeLLMError("the reference bundle tokenizes the text differently; compare bundles of one model")
    window = min(model.seq_length, reference.seq_length if reference else model.seq_length)
    nll, top1 = score(model, ids, window)
    report = {"tokens": len(ids), "window": window, "perplexity": float(np.exp(nll.mean()))}
    if reference is not None:
        ref_nll, ref_top1 = score(reference, ids, window)
        report["top1_agreement"] = float((top1 == ref_top1).mean())
        report["reference_perplexity"] = float(np.exp(ref_nll.mean()))
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['tokens']} tokens, windows of {report['window']}",
             f"perplexity            {report['perplexity']:.4f}"]
    if "top1_agreement" in report:
        lines += [f"reference perplexity  {report['reference_perplexity']:.4f} "
                  f"({report['perplexity'] / report['reference_perplexity'] - 1:+.2%})",
                  f"top-1 agreement       {report['top1_agreement']:.2%}"]
    return "\n".join(lines)
