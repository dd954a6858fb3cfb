"""What the model families build on: the shared decoder (decoder.py), the shared layers (layers.py) and the typed
records a family declares itself with (family.py)."""
