"""The bundle format, owned here once: the typed manifest, the folder (atomic writing, checksums, opening), the
quantized-block layout and the embedding table's writer and row reader. The converter and the runtime share
nothing else."""

from .blocks import QuantizedWeight, unpack_nibbles
from .embeddings import EmbeddingTable, save_table
from .folder import Bundle, check_output, file_checksums, open_bundle, staging_folder, write_manifest
from .manifest import (
                       DECODER_GRAPH,
                       FORMAT,
                       FORMAT_VERSION,
                       MANIFEST,
                       READABLE_VERSIONS,
                       ROTARY_LENGTH,
                       SAMPLING_HEAD_GRAPH,
                       STEP_GRAPH,
                       VISION_GRAPH,
                       ArrayRef,
                       DecoderShape,
                       EmbeddingsEntry,
                       FileEntry,
                       Manifest,
                       Quantization,
                       Tokens,
                       VisionSection,
                       stage_graph,
)

__all__ = ["QuantizedWeight", "unpack_nibbles", "EmbeddingTable", "save_table", "Bundle", "check_output",
           "file_checksums", "open_bundle", "staging_folder", "write_manifest", "DECODER_GRAPH", "FORMAT",
           "FORMAT_VERSION", "MANIFEST", "READABLE_VERSIONS", "ROTARY_LENGTH", "SAMPLING_HEAD_GRAPH", "STEP_GRAPH",
           "VISION_GRAPH", "ArrayRef", "DecoderShape", "EmbeddingsEntry", "FileEntry", "Manifest", "Quantization",
           "Tokens", "VisionSection", "stage_graph"]
