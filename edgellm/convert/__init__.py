"""Checkpoint readers, quantization, the graph builder and the bundle writer."""
