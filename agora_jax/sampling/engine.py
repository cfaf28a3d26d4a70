"""The host half of sampling: tokenize, bucket, pad, run the compiled programs, detokenize.

    engine = Engine(model, tokenizer)
    outs = engine.generate([messages, "raw text", [1, 2, 3]], SamplingParams(max_new_tokens=64, n=4))
    outs[0][3].text, outs[0][3].tokens, outs[0][3].logprobs, outs[0][3].finish_reason

Rows (prompt x sample) are sorted by length and cut into batches of at most `max_batch`; a batch is
padded to a power-of-two row count and prompt length (at least `min_prompt_len`), and generation to
a power-of-two token budget, so the number of compiled programs stays small (`num_compilations`).
Stop tokens end a row inside the decode loop (the loop exits early when every row has stopped);
stop strings are found on the host after decoding.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agora_jax.models import Tokenizer, Transformer
from agora_jax.sampling.params import Completion, Prompt, SamplingParams
from agora_jax.sampling.sampler import Decoder, Knobs, decode, prefill, single_decoder

BATCH_AXES = ("data", "fsdp")  # mesh axes the batch is split over (the `batch` rule of DEFAULT_RULES)


def bucket(n: int, minimum: int = 1) -> int:
    """The power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum, 1) - 1).bit_length()


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: text verbatim, ids as given, chat messages through the chat template."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif len(prompt) and isinstance(prompt[0], dict):
        ids = tokenizer.encode_chat(prompt)
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("empty prompt")
    return ids


_PREFILL = jax.jit(prefill, static_argnums=0, static_argnames=("max_new", "greedy"))
_DECODE = jax.jit(decode, static_argnums=0, static_argnames=("prompt_len", "greedy"), donate_argnames=("state",))
# Compiled programs of every engine in the process, by (program, decoder, input signature): engines
# for models of one architecture share them.
_COMPILED: dict[Any, Any] = {}


class Programs:
    """Ahead-of-time compiled prefill and decode programs of one `Decoder`, one per input shape (and
    greedy flag); the decode program donates its state. Counts the compilations it triggered."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.num_compilations = 0
        self.compile_seconds = 0.0

    def compiled(self, program: str, args: tuple, **statics: Any) -> jax.stages.Compiled:
        """The compiled "prefill" `(params, prompt, mask, seeds, samples, knobs; max_new, greedy)` or
        "decode" `(params, state, knobs; prompt_len, greedy)` program for `args`: arrays, or abstract
        arrays with their shardings (`jax.ShapeDtypeStruct`: compiled ahead of time, `agora_jax.compile`)."""
        jitted = {"prefill": _PREFILL, "decode": _DECODE}[program]
        signature = jax.tree.map(lambda x: (x.shape, x.dtype, getattr(x, "sharding", None)), args)
        key = (jitted, self.decoder.key, jax.tree.structure(args), tuple(jax.tree.leaves(signature)),
               tuple(sorted(statics.items())))
        if key not in _COMPILED:
            start = time.perf_counter()
            _COMPILED[key] = jitted.lower(self.decoder, *args, **statics).compile()
            self.compile_seconds += time.perf_counter() - start
            self.num_compilations += 1
        return _COMPILED[key]

    def run(self, params: Any, prompt: jax.Array, mask: jax.Array, seeds: jax.Array, samples: jax.Array,
            knobs: Knobs, max_new: int, greedy: bool):
        args = (params, prompt, mask, seeds, samples, knobs)
        state = self.compiled("prefill", args, max_new=max_new, greedy=greedy)(*args)
        return self.compiled("decode", (params, state, knobs), prompt_len=prompt.shape[-1], greedy=greedy)(
            params, state, knobs)


@dataclasses.dataclass(frozen=True)
class _Row:
    member: int  # which model's rows (stacked groups); 0 otherwise
    prompt: int
    sample: int
    ids: tuple[int, ...]
    seed: int


class Runner:
    """Runs one `Decoder` for `members` row sets (1, or the size of a stacked group): packs rows into
    bucketed batches, calls the compiled programs, turns the outputs into `Completion`s."""

    def __init__(self, decoder: Decoder, params: Any, tokenizers: Sequence[Tokenizer], vocab_size: int,
                 mesh: Mesh | None = None, max_batch: int = 256, min_prompt_len: int = 16):
        self.programs = Programs(decoder)
        self.params = params
        self.tokenizers = list(tokenizers)
        self.vocab_size = vocab_size
        self.mesh = mesh
        self.min_batch = int(np.prod([mesh.shape[a] for a in BATCH_AXES])) if mesh is not None else 1
        self.max_batch = bucket(max_batch, self.min_batch)
        self.min_prompt_len = min_prompt_len

    def run(self, prompts: Sequence[Sequence[Prompt]], params: SamplingParams) -> list[list[list[Completion]]]:
        """Completions `[member][prompt][sample]` for each member's prompts."""
        seeds = params.member_seeds([len(p) for p in prompts])
        rows = [[_Row(m, p, j, tuple(encode_prompt(self.tokenizers[m], prompt)), seeds[m][p])
                 for p, prompt in enumerate(member_prompts) for j in range(params.n)]
                for m, member_prompts in enumerate(prompts)]
        for member_rows in rows:
            member_rows.sort(key=lambda r: len(r.ids))
        out: list[list[list[Completion | None]]] = [[[None] * params.n for _ in p] for p in prompts]
        knobs = self._knobs(params)
        max_new = bucket(params.max_new_tokens, 16)
        for start in range(0, max(map(len, rows), default=0), self.max_batch):
            chunk = [member_rows[start:start + self.max_batch] for member_rows in rows]
            tokens, logprobs, lengths, stopped = self._run_batch(chunk, knobs, max_new, params.greedy)
            for m, member_rows in enumerate(chunk):
                for b, row in enumerate(member_rows):
                    n = lengths[m, b]
                    out[m][row.prompt][row.sample] = _completion(
                        self.tokenizers[m], tokens[m, b, :n].tolist(), logprobs[m, b, :n].tolist(), bool(stopped[m, b]),
                        self._stop_strings(m, params))
        return out  # type: ignore[return-value]

    def _stop_strings(self, member: int, params: SamplingParams) -> tuple[str, ...]:
        return params.stop_strings if params.stop_strings is not None else self.tokenizers[member].stop_strings

    def _knobs(self, params: SamplingParams) -> Knobs:
        is_stop = np.zeros((len(self.tokenizers), self.vocab_size), bool)
        for m, tokenizer in enumerate(self.tokenizers):
            ids = params.stop_token_ids if params.stop_token_ids is not None else tokenizer.stop_ids
            is_stop[m, [i for i in ids if 0 <= i < self.vocab_size]] = True
        return Knobs(
            temperature=jnp.float32(params.temperature), top_k=jnp.int32(params.top_k),
            top_p=jnp.float32(params.top_p), min_p=jnp.float32(params.min_p),
            is_stop=jnp.asarray(is_stop.reshape(*self.programs.decoder.lead, self.vocab_size)),
            max_new=jnp.int32(params.max_new_tokens))

    def _run_batch(self, chunk: list[list[_Row]], knobs: Knobs, max_new: int, greedy: bool):
        """Pad one batch `[members, B, T]`, run it, return numpy (tokens, logprobs, lengths, stopped)."""
        batch = bucket(max(map(len, chunk)), self.min_batch)
        length = bucket(max(len(r.ids) for rows in chunk for r in rows), self.min_prompt_len)
        shape = (len(chunk), batch)
        prompt = np.zeros((*shape, length), np.int32)
        mask = np.zeros((*shape, length), bool)
        seeds = np.zeros(shape, np.uint32)
        samples = np.zeros(shape, np.int32)
        for m, rows in enumerate(chunk):
            for b, row in enumerate(rows):
                prompt[m, b, length - len(row.ids):] = row.ids
                mask[m, b, length - len(row.ids):] = True
                seeds[m, b], samples[m, b] = row.seed % 2**32, row.sample
        lead = self.programs.decoder.lead
        arrays = [self._place(x.reshape(*lead, *x.shape[1:])) for x in (prompt, mask, seeds, samples)]
        state = self.programs.run(self.params, *arrays, knobs, max_new=max_new, greedy=greedy)
        outputs = jax.device_get((state.tokens, state.logprobs, state.lengths, state.done))
        return tuple(np.asarray(x).reshape(*shape, *np.shape(x)[len(lead) + 1:]) for x in outputs)

    def _place(self, x: np.ndarray) -> jax.Array:
        """Put a `[*lead, B, ...]` array on the devices, the batch axis split over (data, fsdp)."""
        if self.mesh is None:
            return jnp.asarray(x)
        lead = len(self.programs.decoder.lead)
        spec = PartitionSpec(*([None] * lead), BATCH_AXES, *([None] * (x.ndim - lead - 1)))
        return jax.device_put(x, NamedSharding(self.mesh, spec))


def _completion(tokenizer: Tokenizer, tokens: list[int], logprobs: list[float], stopped: bool,
                stop_strings: Sequence[str]) -> Completion:
    """A finished row: the stop token is kept in `tokens` but not in `text`; a stop string truncates
    the text before it and the tokens after the one that completed it."""
    body = tokens[:-1] if stopped else tokens
    text = tokenizer.decode(body)
    cut = _find_stop(text, stop_strings)
    if cut is None:
        return Completion(text, tokens, logprobs, "stop" if stopped else "length")
    lo, hi = 1, len(body)  # the shortest token prefix whose text contains a stop string
    while lo < hi:
        mid = (lo + hi) // 2
        if _find_stop(tokenizer.decode(body[:mid]), stop_strings) is None:
            lo = mid + 1
        else:
            hi = mid
    return Completion(text[:cut], body[:lo], logprobs[:lo], "stop")


def _find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else None


class Engine:
    """Batched generation with one model: one compiled program per (batch, prompt length, budget) bucket."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, mesh: Mesh | None = None,
                 max_batch: int = 256, min_prompt_len: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self._runner = Runner(single_decoder(model), nnx.state(model), [tokenizer], model.config.vocab_size,
                              mesh, max_batch, min_prompt_len)

    def refresh(self) -> None:
        """Re-read the model's weights (after they changed in place); compiled programs are kept."""
        self._runner.params = nnx.state(self.model)

    @property
    def num_compilations(self) -> int:
        return self._runner.programs.num_compilations

    @property
    def compile_seconds(self) -> float:
        return self._runner.programs.compile_seconds

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams = SamplingParams()) -> list[list[Completion]]:
        """`params.n` completions per prompt, in prompt order (with the model's current weights)."""
        self.refresh()
        return self._runner.run([prompts], params)[0]
