"""The public Model: prompts in, tokens, text and timings out."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..errors import EdgeLLMError
from ..format import SAMPLING_HEAD_GRAPH, VISION_GRAPH, open_bundle
from ..format.encryption import key_material
from .chat import ChatTemplate, check_messages, message_texts, user_content
from .constraints import JsonConstraint, grammar_tokenizer, schema_of
from .engine import Engine
from .lookup import prompt_lookup
from .memory import check_fits
from .prompt_cache import CachedSequence
from .sampling import HeadSampler, Sampler, SamplingParams
from .sessions import PROVIDERS, check_device, open_graph, session_options
from .tokenizer import StreamDecoder, Tokenizer, check_text
from .tools import Tools, tools_of

if TYPE_CHECKING:  # loaded only for vision-language bundles
    from .vision import VisionEncoder


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated ids only (no EOS)
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt positions served from the KV cache of an earlier call
    finish_reason: str = "stop"  # "stop" (EOS or a stop string) or "length"
    ttft_s: float = 0.0  # call to first token: image encoding + prefill of the new prompt tokens + first sample
    decode_s: float = 0.0  # first token to last
    images: int = 0  # images and videos in the prompt
    vision_s: float = 0.0  # time in the vision graph (inside ttft_s; 0 when every image came from a cache)
    drafted: int = 0  # prompt lookup: tokens drafted, and how many of them the model confirmed
    accepted: int = 0
    queued_s: float = 0.0  # a server's request: time waiting for a free slot (inside ttft_s)
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI tool_calls read from the answer (then `text` is
    # what it says beside them, and finish_reason "tool_calls")
    looped: bool = False  # stopped because the answer kept repeating itself (stop_loops)
    # logprobs=N: per generated token, (its id, its log-probability, the N likeliest [(id, log-probability)]), of
    # the model's own distribution (before temperature, penalties and masks)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None

    @property
    def prefill_tokens_per_s(self) -> float:
        return (self.prompt_tokens - self.reused_tokens) / self.ttft_s if self.ttft_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1  # the first token comes out of prefill
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def timing_line(self) -> str:
        vision = f"{self.images} image(s) encoded in {self.vision_s * 1000:.0f} ms | " if self.images else ""
        lookup = f" ({self.accepted} of {self.drafted} drafted tokens kept)" if self.drafted else ""
        lookup += " | stopped: the answer was repeating itself" if self.looped else ""
        # a rate over a few tokens (a cached prompt's new turn) says more about the fixed costs than about prefill
        fresh = self.prompt_tokens - self.reused_tokens
        prefill = f"{self.prefill_tokens_per_s:.0f} tok/s" if fresh >= RATE_MIN_TOKENS else f"{fresh} new tok"
        return (f"{vision}prompt {self.prompt_tokens} tok ({self.reused_tokens} cached) | "
                f"TTFT {self.ttft_s * 1000:.0f} ms | "
                f"prefill {prefill} | decode {len(self.token_ids)} tok at "
                f"{self.decode_tokens_per_s:.1f} tok/s{lookup}")


MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API
RATE_MIN_TOKENS = 32  # fewer prefilled tokens than this get a count in the timing line, not a rate


class Prompt(NamedTuple):
    """A prompt made ready for prefill by Model.prepare (generate/stream/logits accept it as it is)."""

    ids: list[int]
    media: list  # (positions, key, features) per image or video, as Engine.prefill takes them
    positions: np.ndarray | None = None  # [rows, len(ids)] where the family places media tokens; None: 0, 1, 2, ...


class Generation:
    """One answer being written: each next token (sampled by `sampler` from the step's logits) is taken by push(),
    which decodes its text, applies the stop strings, EOS and the token limit; finish() ends it. Model.stream drives
    one for a single sequence, the server's batch drives several at once."""

    def __init__(self, prompt: Prompt, sampler, decoder: StreamDecoder, stops: list[str], max_new_tokens: int,
                 eos_token_ids: set[int], started: float, tools: Tools | None = None, stop_loops: bool = False,
                 logprobs: int | None = None):
        self.prompt, self.sampler, self.decoder, self.stops, self.tools = prompt, sampler, decoder, stops, tools
        self.stop_loops, self.top_logprobs = stop_loops, logprobs
        self.max_new_tokens, self.eos, self.started = max_new_tokens, eos_token_ids, started
        self.result = GenerationResult(prompt_tokens=len(prompt.ids), images=len(prompt.media), finish_reason="length")
        self.history = list(prompt.ids)  # the prompt and the answer so far, as the sampler's penalty reads it
        self.text, self.emitted, self.hit_stop = "", 0, False
        self.first_at: float | None = None
        self.done = max_new_tokens == 0
        self.adapter: str | None = None  # the LoRA adapter the answer is computed with (a bundle's LoRA slots)

    def next_token(self, logits: np.ndarray) -> int:
        return self.choose(logits, self.history)

    def choose(self, logits: np.ndarray, history: list[int]) -> int:
        """The sampler's choice, its log-probability recorded where asked (logprobs)."""
        token = self.sampler(logits, history)
        if self.top_logprobs is not None and token not in self.eos:
            if self.result.logprobs is None:
                self.result.logprobs = []
            self.result.logprobs.append(log_probabilities(logits, token, self.top_logprobs))
        return token

    def push(self, token: int) -> str:
        """Take the next token; returns the text that can be shown now (none while a stop string may be forming)."""
        r = self.result
        if self.first_at is None:
            self.first_at = time.perf_counter()
            r.ttft_s = self.first_at - self.started
        if token in self.eos:
            r.finish_reason, self.done = "stop", True
            return ""
        r.token_ids.append(token)
        self.history.append(token)
        self.text += self.decoder.push(token)
        cut = _find_stop(self.text, self.stops)
        if cut is not None:
            self.text, r.finish_reason, self.hit_stop, self.done = self.text[:cut], "stop", True, True
            return ""
        self.done = len(r.token_ids) >= self.max_new_tokens
        if self.stop_loops and not self.done and len(r.token_ids) % 4 == 0 and repeating(r.token_ids):
            r.finish_reason, r.looped, self.done = "stop", True, True
        held = max(_held_back(self.text, self.stops), self.tools.hold_back(self.text) if self.tools else 0)
        safe = len(self.text) - held
        if safe <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:safe], safe
        return piece

    def finish(self) -> str:
        """End the answer (EOS, a stop string, the limit or a full context); returns the text not shown yet."""
        self.done = True
        if not self.hit_stop:
            self.text += self.decoder.flush()
            cut = _find_stop(self.text, self.stops)  # the held-back tail may complete a stop string
            if cut is not None:
                self.text, self.result.finish_reason = self.text[:cut], "stop"
        if self.tools is not None:
            content, self.result.tool_calls = self.tools.parse(self.text)
            if self.result.tool_calls:
                self.text, self.result.finish_reason = content or "", "tool_calls"
        tail = self.text[self.emitted:]
        self.emitted = len(self.text)
        self.result.text = self.text
        self.result.decode_s = time.perf_counter() - self.first_at if self.first_at else 0.0
        return tail


class Model:
    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, verify: bool = True,
                 spinning: bool = True, profile_prefix: str | None = None, check_memory: bool = True,
                 slots: int | None = 1, key: bytes | str | None = None, key_file: str | Path | None = None,
                 stage_placement: str | None = None):
        """slots: sequences the KV cache holds, which decode together in a server (None: as many as
        memory.default_slots finds room for, where the decoder can batch; else 1). key / key_file: an encrypted
        bundle's key (else $EDGELLM_KEY). stage_placement: a decoder written as stages (convert --num-device) runs
        each stage in a Ray actor, placed "spread" (on different nodes where there are), "strict-spread" or "pack"
        (runtime/ray_stages.py); this process keeps the embeddings, the tokenizer and the sampling."""
        started = time.perf_counter()
        stage_devices = device.split(",")  # one per stage of a decoder written as stages, or one for all
        for one in stage_devices:
            check_device(one)
        device = stage_devices[0]
        self.bundle = open_bundle(path, verify=False)
        if self.bundle.encrypted:
            if device == "openvino":
                raise EdgeLLMError("device openvino reads graphs from files, and this bundle's are encrypted; use "
                                   "device cpu (or cuda)")
            self.bundle.unlock(key_material(key, key_file))
        elif key is not None or key_file is not None:
            raise EdgeLLMError(f"{path}: the bundle is not encrypted, so it takes no key; drop --key-file (key= / "
                               "key_file= in Python)")
        if slots is not None and slots < 1:
            raise EdgeLLMError(f"slots must be 1 or more, got {slots}")
        if check_memory and stage_placement is None:  # (stages on Ray: the weights are on their nodes)
            check_fits(self.bundle, device, slots=slots or 1)
        # Checksumming the files runs beside building the session, which releases the GIL (as zlib and hashlib do
        # on large reads). The tokenizer is parsed first, alone: beside the session, the transient of a large
        # vocabulary's parse adds to ONNX Runtime's weight-packing peak and stays in the worker thread's malloc
        # arena, for little time saved (docs/benchmarks.md).
        background = ThreadPoolExecutor(1)
        verified = background.submit(self.bundle.verify_hashes) if verify else None
        self.manifest = self.bundle.manifest
        tokens = self.manifest.tokens
        self.eos_token_ids = set(tokens.eos_token_ids)
        template = self.bundle.file("chat_template.jinja")
        self.chat_template = (ChatTemplate(template.read_text(), tokens.bos_token, tokens.eos_token)
                              if template.is_file() else None)
        self.generation_config = self.bundle.json("generation_config.json")
        try:
            self.tokenizer = Tokenizer(self.bundle.file("tokenizer.json"))
            self.vision: VisionEncoder | None = None
            processor = None
            if VISION_GRAPH in self.manifest.graphs:
                from .vision import VisionEncoder, processor_for

                processor = processor_for(self.bundle)
                self.vision = VisionEncoder(self.bundle, processor, device, threads, spinning)
            self.engine = Engine(self.bundle, device=device, threads=threads, spinning=spinning,
                                 profile_prefix=profile_prefix, processor=processor, slots=slots,
                                 stage_devices=stage_devices, stage_placement=stage_placement)
        except Exception:
            if verified:
                verified.result()  # a corrupt file explains a failed load better than its parser's message
            raise
        finally:
            background.shutdown(wait=True)
        if verified:
            verified.result()
        self.device, self._sampling_head = device, None
        self.load_s = time.perf_counter() - started
        self.last_result: GenerationResult | None = None
        self.prompt_cache = None  # a PromptCache that stream() starts from and adds each finished sequence to

    @property
    def seq_length(self) -> int:
        return self.engine.seq_length

    def sampler(self, params: SamplingParams) -> Sampler:
        """The sampler of `params`: a sampled answer of a bundle with a sampling head (--do-sample) draws from the
        head's candidates, computed by its graph on the decoder's device."""
        head = self.manifest.graphs.get(SAMPLING_HEAD_GRAPH)
        if head is None or params.temperature <= 0:
            return Sampler(params)
        if self._sampling_head is None:
            self._sampling_head = open_graph(self.bundle, head, session_options(1, False), PROVIDERS[self.device])
        return HeadSampler(params, self._sampling_head)

    # --- prompts -------------------------------------------------------------------------------
    def prompt_ids(self, prompt_or_messages, raw: bool = False, images=None, videos=None,
                   frames: int | None = None) -> list[int]:
        """Exactly the ids generate() prefills. A string is one user turn (or, with raw=True or when the bundle
        has no chat template, plain text); a list of dicts is a conversation; a list of ints is used as is.
        With images/videos, each image placeholder is expanded to the tokens its embeddings will fill."""
        return self.prepare(prompt_or_messages, raw, images, videos, frames).ids

    def prepare(self, prompt_or_messages, raw: bool = False, images=None, videos=None,
                frames: int | None = None, tools: Tools | None = None) -> Prompt:
        """The prompt as token ids, and where each image's embeddings go; images are preprocessed here, once.
        `tools` (from tool_spec) are rendered by the chat template."""
        p, images, videos = prompt_or_messages, list(images or []), list(videos or [])
        extra: dict[str, Any] = tools.template_variables() if tools is not None else {}
        if tools is not None and (raw or isinstance(p, str) and self.chat_template is None):
            raise EdgeLLMError("tools need the chat template; a raw prompt cannot offer them")
        if isinstance(p, Prompt):
            if images or videos:
                raise EdgeLLMError("a prepared prompt already holds its images; do not pass images= again")
            return p
        if images or videos:
            self._vision_encoder()  # refused before the template is rendered
        if isinstance(p, str) and (images or videos):
            if raw or self.chat_template is None:
                raise EdgeLLMError("images need the bundle's chat template; raw prompts cannot hold them")
            p = [{"role": "user", "content": user_content(p, len(images), len(videos))}]
        if isinstance(p, str):
            if raw or self.chat_template is None:
                self._check_text_size([p])
                return Prompt(self.tokenizer.encode(p), [])
            p = [{"role": "user", "content": p}]
        if isinstance(p, (list, tuple)) and p and all(isinstance(t, (int, np.integer)) for t in p):
            if images or videos:
                raise EdgeLLMError("token ids cannot carry images; pass a prompt or messages with images=")
            return Prompt([int(t) for t in p], [])
        check_messages(p)
        if tools is not None:
            p = tools.messages(list(p))
        self._check_text_size([text for m in p for text in message_texts(m)])
        if self.chat_template is None:
            raise EdgeLLMError("this bundle has no chat template; pass a plain string prompt (raw text) instead")
        wanted = {kind: sum(1 for m in p if isinstance(m["content"], list)
                            for part in m["content"] if part.get("type") == kind) for kind in ("image", "video")}
        if wanted["image"] != len(images) or wanted["video"] != len(videos):
            raise EdgeLLMError(f"the messages hold {wanted['image']} image and {wanted['video']} video part(s), "
                               f"but {len(images)} image(s) and {len(videos)} video(s) were given")
        if not images and not videos:
            return Prompt(self.tokenizer.encode(self.chat_template.render(list(p), **extra), add_special_tokens=False),
                          [])
        vision = self._vision_encoder()
        items = self._media_in_order(vision, p, images, videos, frames)
        processor = vision.processor
        text = self.chat_template.render(_rewrite_parts(p, items, processor.template_parts), **extra)
        ids = self.tokenizer.encode(processor.expand_prompt(text, items), add_special_tokens=False)
        slots = np.flatnonzero(np.isin(ids, self.manifest.tokens.media_ids))
        media, spans, used = [], [], 0
        for item in items:
            spans.append(slots[used:used + item.tokens])
            media.append((spans[-1], item.key, lambda item=item: vision.features(item)))
            used += item.tokens
        if used != len(slots):
            raise EdgeLLMError(f"the prompt text holds {len(slots) - used} image token(s) of its own; "
                               "use image parts, not the raw image token")
        return Prompt(ids, media, processor.positions(len(ids), spans, items))

    def _vision_encoder(self) -> VisionEncoder:
        if self.vision is None:
            raise EdgeLLMError("this bundle has no vision graph: convert a vision-language model to use images")
        return self.vision

    @staticmethod
    def _media_in_order(vision: VisionEncoder, messages, images: list, videos: list, frames: int | None) -> list:
        """Preprocessed images and videos in the order their parts appear: the i-th image part takes images[i]."""
        queues = {"image": iter(images), "video": iter(videos)}
        items = []
        for m in messages:
            for part in m["content"] if isinstance(m["content"], list) else []:
                kind = part.get("type")
                if kind == "image":
                    items.append(vision.image(next(queues["image"])))
                elif kind == "video":
                    items.append(vision.video(next(queues["video"]), frames))
        return items

    def _check_text_size(self, texts: list[str]) -> None:
        """Refuse text too long for the bundle before tokenizing it (a 10 MB prompt takes seconds to tokenize)."""
        size = sum(check_text(text, "the prompt" if len(texts) == 1 else f"message {i}")
                   for i, text in enumerate(texts))
        limit = 2 * self.seq_length * self.tokenizer.longest_token_bytes
        if size > limit:
            raise EdgeLLMError(f"the prompt is {size:,} bytes: more than this bundle's {self.seq_length} tokens can "
                               f"hold (at most {limit:,} bytes); shorten the prompt")

    def check_length(self, n: int) -> None:
        if n == 0:
            raise EdgeLLMError("the prompt is empty")
        if n > self.seq_length:
            raise EdgeLLMError(f"prompt is {n} tokens but this bundle holds at most {self.seq_length} "
                               "(its --seq-length); shorten the prompt or reconvert with a larger --seq-length")

    # --- logits --------------------------------------------------------------------------------
    def logits(self, prompt, images=None, videos=None, raw: bool = False, frames: int | None = None,
               adapter: str | None = None) -> np.ndarray:
        """[prompt tokens, vocab] float32 logits, computed through the bundle's chunked prefill path. `prompt` is
        token ids, a string or messages, as for generate(); `adapter`: a loaded LoRA adapter's name."""
        prompt = self.prepare(prompt, raw, images, videos, frames)
        self.check_length(len(prompt.ids))
        self.engine.set_adapter(adapter)
        return self.engine.prefill(prompt.ids, all_logits=True, media=prompt.media, positions=prompt.positions)

    # --- generation ----------------------------------------------------------------------------
    def sampling_defaults(self) -> dict:
        """The checkpoint's generation_config.json, as the CLI uses it (the API defaults to greedy)."""
        g = self.generation_config
        sample = g.get("do_sample", False)
        return {"temperature": g.get("temperature", 1.0) if sample else 0.0, "top_k": g.get("top_k", 0) or 0,
                "top_p": g.get("top_p", 1.0) or 1.0, "min_p": g.get("min_p", 0.0) or 0.0,
                "repetition_penalty": g.get("repetition_penalty", 1.0) or 1.0}

    def generate(self, prompt_or_messages, max_new_tokens: int = 256, **kwargs) -> GenerationResult:
        for _ in self.stream(prompt_or_messages, max_new_tokens, **kwargs):
            pass
        assert self.last_result is not None, "stream() records its result"
        return self.last_result

    def start(self, prompt_or_messages, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
              top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
              stop: list[str] | str | None = None, raw: bool = False, ignore_eos: bool = False, images=None,
              videos=None, frames: int | None = None, json_schema=None, tools=None, tool_choice=None,
              started: float | None = None, adapter: str | None = None, stop_loops: bool = False,
              logprobs: int | None = None) -> Generation:
        """An answer to write (settings as for stream()), its prompt prepared and checked; whoever drives it runs the
        prefill and feeds it each step's logits. `started`: when the request came (perf_counter), for its TTFT."""
        started = time.perf_counter() if started is None else started
        if max_new_tokens < 0:
            raise EdgeLLMError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise EdgeLLMError(f"logprobs must be 0 to {MAX_TOP_LOGPROBS} (the likeliest tokens to report beside each "
                               f"chosen one), got {logprobs}")
        free = self.sampler(SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed))
        sampler: Sampler | ConstrainedSampler = free
        tools = tools if isinstance(tools, Tools) else self.tool_spec(tools, tool_choice)
        prompt = self.prepare(prompt_or_messages, raw, images, videos, frames, tools=tools)
        grammar = tools.grammar(self.tokenizer.token_to_id) if tools is not None else None
        if grammar is not None and json_schema not in (None, False):
            raise EdgeLLMError("a required tool call and json_schema do not combine; ask for one of them")
        vocab = self.manifest.model.vocab_size
        if json_schema not in (None, False) or grammar is not None:
            if grammar is not None:
                constraint = JsonConstraint(self.grammar_tokenizer, None, vocab, lark=grammar)
            elif isinstance(json_schema, JsonConstraint):  # compiled already (the server's, checking the request)
                constraint = json_schema
            else:
                constraint = JsonConstraint(self.grammar_tokenizer, schema_of(json_schema), vocab)
            sampler = ConstrainedSampler(free, constraint, self.eos_token_ids, self.think_tokens, prompt.ids)
        self.check_length(len(prompt.ids))
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self.engine.check_adapter(adapter)
        answer = Generation(prompt, sampler, StreamDecoder(self.tokenizer), stops, max_new_tokens,
                            set() if ignore_eos else self.eos_token_ids, started, tools, stop_loops, logprobs)
        answer.adapter = adapter
        return answer

    def close(self) -> None:
        """Give back what lives outside this process now (a staged decoder's Ray actors); the rest goes with the
        object."""
        self.engine.close()

    def load_adapter(self, path, name: str | None = None) -> str:
        """Load a PEFT LoRA adapter into the bundle's LoRA slots (convert --lora-slots) under `name` (default: its
        folder's name); answers then take adapter=name (the server: "model": "BUNDLE:name"). Returns the name."""
        from ..format.adapters import read_adapter

        adapter = read_adapter(path)
        name = name or adapter.folder.name
        self.engine.add_adapter(name, adapter.modules)
        return name

    def tool_spec(self, tools, tool_choice=None) -> Tools | None:
        """OpenAI `tools` and `tool_choice`, checked against this bundle's chat template (None: no tools offered)."""
        return tools_of(self.chat_template.source if self.chat_template else None, tools, tool_choice)

    def stream(self, prompt_or_messages, max_new_tokens: int = 256, progress: bool = False,
               prompt_lookup: int = 0, draft: Model | None = None, draft_tokens: int = 4,
               **settings) -> Iterator[str]:
        """Yields text pieces as they are decoded; the full result is in `model.last_result` afterwards.
        settings: temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, raw, ignore_eos, images,
        videos, frames, json_schema, tools (OpenAI function tools; the calls come back parsed in the result's
        tool_calls) and tool_choice ("auto", "required", "none" or {"type": "function", "function": {"name": ...}}).
        progress=True shows a bar on stderr while a long prompt (more than two chunks) is prefilled.
        prompt_lookup=K drafts up to K tokens per step from earlier text (runtime.lookup) and checks them in one
        decoder run: faster where the answer repeats its prompt, and the same answer: greedy, the same text; sampled,
        the same distribution (Sampler.check), though not the same text for a seed. draft=a smaller Model of the
        same tokenizer drafts `draft_tokens` tokens instead, greedily, checked the same way.
        json_schema=True (any JSON object) or a JSON schema (dict or text): every step is masked to what keeps the
        answer valid JSON of that schema (runtime.constraints; needs the structured extra). stop_loops=True ends an
        answer that keeps repeating itself (the result's `looped`; the command line's default)."""
        started = time.perf_counter()
        if prompt_lookup < 0:
            raise EdgeLLMError(f"prompt_lookup must be 0 (off) or more, got {prompt_lookup}")
        if draft is not None:
            if prompt_lookup:
                raise EdgeLLMError("give a draft model or prompt_lookup, not both")
            if draft_tokens < 1:
                raise EdgeLLMError(f"draft_tokens must be 1 or more, got {draft_tokens}")
            self.check_draft(draft)
        if settings.get("json_schema") not in (None, False) and (prompt_lookup or draft is not None):
            raise EdgeLLMError("structured output (json_schema) does not combine with drafting yet")
        answer = self.start(prompt_or_messages, max_new_tokens, started=started, **settings)
        result, prompt = answer.result, answer.prompt
        self.last_result = result
        engine = self.engine
        vision_before = self.vision.encode_s if self.vision else 0.0
        engine.set_adapter(answer.adapter)
        with prefill_progress(progress, engine.chunk_length) as on_chunk:
            logits = engine.prefill(prompt.ids, on_chunk=on_chunk, media=prompt.media, positions=prompt.positions,
                                    cache=self.prompt_cache)
        result.reused_tokens = engine.reused
        result.vision_s = (self.vision.encode_s if self.vision else 0.0) - vision_before
        drafter = None
        if prompt_lookup or draft is not None:
            drafter = (functools.partial(prompt_lookup_draft, count=prompt_lookup) if draft is None
                       else functools.partial(draft.draft_after, count=draft_tokens))
        if drafter is not None and answer.top_logprobs is not None:
            raise EdgeLLMError("logprobs cannot be given with prompt_lookup or a draft model (drafted tokens are "
                               "checked, not sampled one by one)")
        choose = answer.sampler if drafter is not None else answer.choose
        tokens = self._next_tokens(logits, choose, answer.history, drafter, len(prompt.ids) + max_new_tokens, result)
        while not answer.done:
            piece = answer.push(next(tokens))
            if piece:
                yield piece
            if engine.length >= self.seq_length:
                break
        tail = answer.finish()
        if tail:
            yield tail
        if self.prompt_cache is not None and engine.slot.adapter is None:  # the cache holds base-model KV
            self.prompt_cache.put(engine.snapshot())

    def _next_tokens(self, logits: np.ndarray, sampler, history: list[int], drafter, limit: int,
                     result: GenerationResult) -> Iterator[int]:
        """The answer's tokens, one per next(): the caller appends each to `history` before asking for the next
        (the history grows to at most `limit` tokens). With a `drafter` (history, room) -> up to `room` guessed
        tokens, a draft is checked in one decoder run: guesses are kept while the sampler's check keeps them (greedy:
        while they are what the model would have chosen), then the model's own next token; the cache forgets the
        rest."""
        engine = self.engine
        token = sampler(logits, history)
        while True:
            yield token
            room = min(limit - len(history) - 1, self.seq_length - engine.length - 2)
            draft = drafter(history, room) if drafter is not None and room > 0 else []
            if not draft:
                token = sampler(engine.decode(token), history)
                continue
            start = engine.length
            checked = engine.verify([token, *draft])
            accepted: list[int] = []
            for i, guess in enumerate(draft):
                token = sampler.check(checked[i], history + accepted, guess)
                if token != guess:
                    break
                accepted.append(guess)
            else:
                token = sampler(checked[len(draft)], history + accepted)
            engine.truncate(start + 1 + len(accepted))
            result.drafted += len(draft)
            result.accepted += len(accepted)
            for guess in accepted:
                yield guess

    @functools.cached_property
    def think_tokens(self) -> tuple[int, int] | None:
        """(<think>, </think>) token ids of a reasoning model (its template writes think blocks), else None."""
        opened, closed = self.tokenizer.token_to_id("<think>"), self.tokenizer.token_to_id("</think>")
        if opened is None or closed is None or self.chat_template is None or "<think>" not in self.chat_template.source:
            return None
        return opened, closed

    @functools.cached_property
    def grammar_tokenizer(self):
        """The tokenizer as the grammar engine reads it (built on first structured request)."""
        return grammar_tokenizer(str(self.bundle.file("tokenizer.json")), sorted(self.eos_token_ids),
                                 self.manifest.model.vocab_size)

    def system_prefix(self, system: str) -> list[int]:
        """The tokens every conversation that opens with this system prompt starts with (the chat template's
        text up to the first user message's content)."""
        marker = "\u2063edgellm-user-turn\u2063"
        if self.chat_template is None:
            raise EdgeLLMError("this bundle has no chat template, so it has no system prompt; cache a raw text")
        text = self.chat_template.render([{"role": "system", "content": system}, {"role": "user", "content": marker}])
        if marker not in text:
            raise EdgeLLMError("the chat template does not show the user's message as it was given")
        return self.tokenizer.encode(text[:text.index(marker)], add_special_tokens=False)

    def cache_prompt(self, prompt_or_messages, raw: bool = False, progress: bool = False) -> CachedSequence:
        """Prefill a prompt (text, messages or token ids, as for generate()) and keep its KV cache, pinned, in
        `self.prompt_cache`: what later prompts that start with it continue from (vendors call this share_prompt)."""
        if self.prompt_cache is None:
            raise EdgeLLMError("set model.prompt_cache (a PromptCache) to keep a computed prompt")
        prompt = self.prepare(prompt_or_messages, raw)
        self.check_length(len(prompt.ids))
        self.engine.reset()
        with prefill_progress(progress, self.engine.chunk_length) as on_chunk:
            self.engine.prefill(prompt.ids, on_chunk=on_chunk, media=prompt.media, positions=prompt.positions)
        entry = self.engine.snapshot()
        entry.pinned = True
        if entry.nbytes > self.prompt_cache.limit:
            raise EdgeLLMError(f"the prompt's KV cache takes {entry.nbytes / (1 << 20):.1f} MiB, more than the prompt "
                               f"cache's {self.prompt_cache.limit / (1 << 20):.0f} MiB; give a larger cache size")
        self.prompt_cache.put(entry)
        self.prompt_cache.flush()
        return entry

    def check_draft(self, draft: Model) -> None:
        """A draft model must read and write the same tokens as this one."""
        if draft.tokenizer.vocabulary != self.tokenizer.vocabulary:
            raise EdgeLLMError(f"the draft bundle {draft.bundle.path} has another tokenizer than "
                               f"{self.bundle.path}; a draft model must share the model's vocabulary")

    def draft_after(self, history: list[int], room: int, count: int) -> list[int]:
        """Up to min(count, room) tokens this model would write greedily after `history` (as a draft for a larger
        model: the cache keeps what it has of `history`, so each call computes only what is new)."""
        n = min(count, room, self.seq_length - len(history) - 1)
        if n < 1:
            return []
        logits, drafted = self.engine.prefill(history), []
        while True:
            drafted.append(int(np.argmax(logits)))
            if len(drafted) == n:
                return drafted
            logits = self.engine.decode(drafted[-1])

    def chat(self, system: str | None = None, max_new_tokens: int = 512, **sampling):
        """A multi-turn Conversation; `sampling` (temperature, top_p, ...) applies to every answer."""
        from .conversation import Conversation

        return Conversation(self, system=system, max_new_tokens=max_new_tokens, **sampling)


@contextmanager
def prefill_progress(enabled: bool, chunk: int):
    """A chunk callback for Engine.prefill that shows a bar once the work to do exceeds two chunks."""
    if not enabled:
        yield None
        return
    bar = None

    def on_chunk(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and total > 2 * chunk:
            from tqdm import tqdm

            # on a terminal the bar goes when done; piped or logged, its last state stays on a line of its own
            terminal = sys.stderr.isatty()
            bar = tqdm(total=total, desc="prefill", unit="tok", leave=not terminal, mininterval=0.1 if terminal else 5)
        if bar is not None:
            bar.update(done - bar.n)

    try:
        yield on_chunk
    finally:
        if bar is not None:
            bar.close()


LOOP_MIN_TOKENS, LOOP_MAX_PERIOD, LOOP_REPEATS = 48, 64, 3


def repeating(tokens: list[int]) -> bool:
    """Whether the answer ends in a loop: its last max(3 p, 48) tokens repeat with a period p of at most 64 (what
    greedy decoding of a small model falls into, and never leaves before the token limit)."""
    if len(tokens) < LOOP_MIN_TOKENS:
        return False
    tail = np.asarray(tokens[-LOOP_MAX_PERIOD * LOOP_REPEATS:])
    for period in range(1, LOOP_MAX_PERIOD + 1):
        span = max(period * LOOP_REPEATS, LOOP_MIN_TOKENS)
        if span > len(tail):
            break
        if np.array_equal(tail[len(tail) - span + period:], tail[len(tail) - span:len(tail) - period]):
            return True
    return False


def log_probabilities(logits: np.ndarray, token: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """(token, its log-probability, the `top` likeliest tokens with theirs) under softmax(logits)."""
    row = np.asarray(logits, dtype=np.float64).reshape(-1)
    peak = row.max()
    logz = peak + np.log(np.exp(row - peak).sum())
    best: list[tuple[int, float]] = []
    if top > 0:
        ids = np.argpartition(-row, min(top, row.size - 1))[:top]
        ids = ids[np.argsort(-row[ids], kind="stable")]
        best = [(int(i), float(row[i] - logz)) for i in ids]
    return int(token), float(row[token] - logz), best


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest


def _rewrite_parts(messages: list, items: list, parts) -> list:
    """The messages with each image/video part replaced by the parts `parts(item)` says the chat template should
    see for it (a template that knows no video sees a clip as its frames' image parts)."""
    queue, out = iter(items), []
    for m in messages:
        if not isinstance(m["content"], list):
            out.append(m)
            continue
        content: list = []
        for part in m["content"]:
            content.extend(parts(next(queue)) if part.get("type") in ("image", "video") else [part])
        out.append({**m, "content": content})
    return out


def prompt_lookup_draft(history: list[int], room: int, count: int) -> list[int]:
    return prompt_lookup(history, min(count, room))


class ConstrainedSampler:
    """A Sampler whose every choice is first masked by a constraint, which then takes the chosen token.

    A reasoning model (think_tokens: <think>, </think>) reasons freely first: the first token may also open a think
    block, and inside one (opened there or by the prompt) nothing is masked; the constraint starts after </think>."""

    def __init__(self, sampler: Sampler, constraint: JsonConstraint, eos_token_ids,
                 think_tokens: tuple[int, int] | None = None, prompt_ids: Sequence[int] = ()):
        self.sampler, self.constraint, self.eos = sampler, constraint, set(eos_token_ids)
        self.think = think_tokens or (-1, -1)  # read only in the states a reasoning model's tokens enter
        self.state = "answer"
        if think_tokens:
            opened, closed = think_tokens
            last_open = max((i for i, t in enumerate(prompt_ids) if t == opened), default=-1)
            last_close = max((i for i, t in enumerate(prompt_ids) if t == closed), default=-1)
            self.state = "thinking" if last_open > last_close else "start"

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        if self.state == "thinking":
            token = self.sampler(logits, history)
            if token == self.think[1]:
                self.state = "answer"
            return token
        if self.state == "start":  # the answer may begin with a think block
            opening = logits[self.think[0]]
            masked = self.constraint.mask(logits)
            masked[self.think[0]] = opening
            token = self.sampler(masked, history)
            if token == self.think[0]:
                self.state = "thinking"
                return token
            self.state = "answer"
        else:
            token = self.sampler(self.constraint.mask(logits), history)
        if token not in self.eos:
            self.constraint.advance(token)
        return token
