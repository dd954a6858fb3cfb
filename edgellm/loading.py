"""How the commands and the server's replicas open a model with the runtime flags (device, threads, key, adapters,
prompt cache, stages on Ray): one place, so that `edgellm serve` and its Ray replicas load alike."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LoadOptions:
    """The runtime flags a model loads with (the CLI's `-c`, `-t`, `--key-file`, `--adapter`, `--prompt-cache`,
    `--cache-mib`, `--ray-stages`, `--no-memory-check`)."""

    device: str = "cpu"
    threads: int | None = None
    check_memory: bool = True
    key_file: str | None = None
    adapter: list[str] = field(default_factory=list)  # [NAME=]PATH of PEFT adapters for the bundle's LoRA slots
    prompt_cache: str | None = None  # a folder of kept prompts' KV caches
    cache_mib: int = 256
    ray_stages: str | None = None  # the placement of a staged decoder's Ray actors (runtime/ray_stages.py)

    @classmethod
    def of(cls, args) -> LoadOptions:
        """The options among a command's parsed arguments."""
        given = vars(args)
        return cls(**{name: given[name] for name in cls.__dataclass_fields__ if given.get(name) is not None})


def open_model(bundle, options: LoadOptions, slots: int | None = 1, keep_prompts: bool = False,
               folder: str | Path | None = None):
    """The model of the bundle folder `bundle`, loaded with `options`, its adapters loaded (`model.adapter_names`,
    in order) and, with a prompt cache folder (`folder`, else options.prompt_cache) or `keep_prompts` (a
    memory-only cache of options.cache_mib), its PromptCache; what it did, said on stderr."""
    from . import load

    model = load(bundle, device=options.device, threads=options.threads, check_memory=options.check_memory,
                 slots=slots, key_file=options.key_file, stage_placement=options.ray_stages)
    print(f"loaded {bundle} in {model.load_s * 1000:.0f} ms ({model.engine.describe()})", file=sys.stderr)
    model.adapter_names = []
    for spec in options.adapter:
        name, _, path = spec.rpartition("=")
        model.adapter_names.append(model.load_adapter(path, name or None))
        print(f"adapter {model.adapter_names[-1]} ({path}) loaded", file=sys.stderr)
    folder = folder or options.prompt_cache
    if folder is not None or (keep_prompts and options.cache_mib):
        from .runtime.prompt_cache import PromptCache

        model.prompt_cache = PromptCache(options.cache_mib, model.bundle, folder)
        if folder is not None and model.vision is not None:  # image features too, by content
            model.vision.keep_on_disk(Path(folder) / "vision", model.bundle.identity)
        for reason in model.prompt_cache.refused:
            print(f"edgellm: warning: skipped {reason}", file=sys.stderr)
        if folder is not None:
            print(f"prompt cache {folder}: {len(model.prompt_cache)} sequence(s), "
                  f"{model.prompt_cache.nbytes / (1 << 20):.1f} MiB", file=sys.stderr)
    return model


def served_loader(name: str, bundle, options: LoadOptions, slots: int | None, several: bool):
    """A server's loader of one of its models (server/pool.ServedModel): the model and its prompt cache, kept in
    the folder options.prompt_cache (in a folder per model where the server has `several`)."""
    def load():
        folder = Path(options.prompt_cache) / name.replace("/", "--") if options.prompt_cache and several else None
        model = open_model(bundle, options, slots=slots, keep_prompts=True, folder=folder)
        return model, model.prompt_cache
    return load
