"""The sampling head (`edgellm convert --do-sample`): a graph that turns one row of logits into the few candidates a
token is drawn from, so that on an accelerator only those leave the device. It computes what the runtime's Python
sampler (runtime.sampling.Sampler.distribution) computes, in the same order: repetition penalty on the tokens seen,
temperature, the top k (at most the head's width), softmax over them, top-p (the token that crosses the mass is
kept), min-p; the probabilities renormalized over what is kept, 0 for the rest.
"""

from __future__ import annotations

import numpy as np

from .graph import GraphBuilder, WeightPolicy

SAMPLING_HEAD_FILE = "sampling_head.onnx"
WIDTH = 64  # candidates the head returns: top_k is at most this (0, "off", means this)


def build_sampling_head(vocab_size: int, width: int = WIDTH) -> GraphBuilder:
    g = GraphBuilder(WeightPolicy("f32"))
    logits = g.input("logits", np.float32, [1, vocab_size])
    seen = g.input("seen", np.float32, [1, vocab_size])  # 1 for tokens of the history, else 0
    settings = {name: g.input(name, np.float32, [1]) for name in ("repetition_penalty", "temperature", "top_p",
                                                                  "min_p")}
    top_k = g.input("top_k", np.int64, [1])
    zero = g.const(np.float32(0), "zero")
    penalized = g.op("Where", [g.op("Greater", [logits, zero], name="positive"),
                               g.op("Div", [logits, settings["repetition_penalty"]], name="shrunk"),
                               g.op("Mul", [logits, settings["repetition_penalty"]], name="grown")], name="penalty")
    penalized = g.op("Where", [g.op("Cast", [seen], name="seen_mask", to=9), penalized, logits], name="penalized")
    scaled = g.op("Div", [penalized, settings["temperature"]], name="scaled")
    values, ids = g.op("TopK", [scaled, g.ints([width], "width")], name="top", outputs=2, axis=-1, largest=1,
                       sorted=1)
    position = g.const(np.arange(width, dtype=np.int64)[None, :], "position")
    k = g.op("Where", [g.op("Greater", [top_k, g.ints([0], "k_zero")], name="k_given"), top_k,
                       g.ints([width], "k_width")], name="k")
    in_k = g.op("Less", [position, k], name="in_top_k")
    values = g.op("Where", [in_k, values, g.const(np.float32(-np.inf), "minus_inf")], name="top_k_values")
    probs = g.op("Softmax", [values], name="softmax", axis=-1)
    before = g.op("Sub", [g.op("CumSum", [probs, g.ints(-1, "last_axis")], name="mass"), probs], name="mass_before")
    keep = g.op("And", [g.op("Less", [before, settings["top_p"]], name="in_top_p"),
                        g.op("GreaterOrEqual", [probs, g.op("Mul", [
                            settings["min_p"], g.op("ReduceMax", [probs], name="best", axes=[-1], keepdims=1)],
                            name="min_p_floor")], name="in_min_p")], name="keep")
    first = g.op("Equal", [position, g.ints([0], "first_position")], name="first")  # the best is always kept
    kept = g.op("Mul", [probs, g.op("Cast", [g.op("Or", [keep, first], name="kept_mask")], name="kept_float",
                                    to=1)], name="kept")
    total = g.op("ReduceSum", [kept, g.ints([-1], "sum_axis")], name="total", keepdims=1)
    g.output("probs", np.float32, [1, width], value=g.op("Div", [kept, total], name="normalized"))
    g.output("ids", np.int64, [1, width], value=ids)
    return g
