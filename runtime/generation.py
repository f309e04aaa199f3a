"""`model.generate()` for winaconv checkpoints: transformers' semantics on a static-tensor decode loop.

transformers' own generate spends milliseconds of host work per token (input preparation, logits
processors, stopping criteria, a host sync), which on a GPU hides any kernel gain. Here the prompt is
prefilled with the normal forward, then every token is one call of a step function that keeps all its
state in static tensors -- forward on a static KV cache, repetition penalty, min-length EOS suppression,
temperature / top-k / top-p sampling, EOS bookkeeping -- so on a GPU its forward is compiled once and the
whole step is replayed as a CUDA graph with no host sync; the host looks at the "all rows finished" flag
only every `SYNC_EVERY` tokens. On the CPU the same step runs eagerly.

Supported: greedy and sampling, `max_new_tokens` / `max_length` / `min_new_tokens` / `min_length`,
`repetition_penalty`, one or several `eos_token_id`, `pad_token_id`, left-padded batches, a `streamer`.
Anything else (beam search, assisted decoding, custom logits processors or stopping criteria, scores in
the output...) goes to transformers' own generate with a one-line notice.

Memory: one engine (static KV cache plus, on a GPU, one CUDA graph per sparsity level and LogitsPlan) is kept per
(batch size, cache length bucket); buckets are powers of two (at least 256 tokens, at most the model's
context) and at most `MAX_ENGINES` engines are kept (least recently used dropped), so the extra memory is
at most MAX_ENGINES KV caches of the requested size rounded up to a power of two, plus the graphs' pools.
"""

import copy
import inspect
import warnings
from collections import OrderedDict
from typing import NamedTuple

import torch
from transformers import GenerationConfig, StaticCache

SYNC_EVERY = 8  # tokens between host checks of "every row finished" (and streamer pushes)
MAX_ENGINES = 2
MIN_BUCKET = 256

# GenerationConfig fields this implementation honours; any other field that differs from its default
# sends the call to transformers' generate.
SUPPORTED_FIELDS = {
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
    "top_p", "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id", "use_cache",
    "decoder_start_token_id", "cache_implementation", "compile_config", "return_dict_in_generate",
    "transformers_version", "_from_model_config", "_commit_hash", "generation_kwargs", "output_attentions",
    "output_hidden_states", "output_scores", "output_logits", "num_beams", "num_return_sequences",
}


def _global_defaults() -> dict:
    """transformers' defaults for the fields neither the call nor the model sets (top_k 50, temperature 1, ...);
    max_length stays unset: DecodeSettings gives an unset one transformers' meaning (20 new tokens)."""
    defaults = dict(GenerationConfig._get_default_generation_params())
    defaults.pop("max_length", None)
    return defaults


def _defaults() -> dict:
    config = GenerationConfig()
    config.update(**_global_defaults(), defaults_only=True)
    return config.to_dict()


_DEFAULTS = _defaults()
_FALLBACK_KWARGS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
                    "negative_prompt_ids", "synced_gpus")


class GenerationInputError(ValueError):
    """Bad input to generate(); the message is one line."""


def _as_list(value):
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def resolved_config(model, generation_config: GenerationConfig | None, kwargs: dict) -> tuple[GenerationConfig, dict]:
    """The GenerationConfig transformers' generate runs with, in its order: the call's config (or an empty one),
    its unset fields from the model's generation_config, then transformers' global defaults, then the keyword
    arguments; also returns the keywords that are not config fields."""
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    config.update(**model.generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    config.update(**_global_defaults(), defaults_only=True)
    try:
        other = config.update(**kwargs)
        config.validate()
    except ValueError as error:  # transformers' own checks (max_new_tokens > 0, ...), on one line
        raise GenerationInputError(str(error).strip().splitlines()[0]) from None
    return config, other


def unsupported_reason(config: GenerationConfig, kwargs: dict) -> str | None:
    """Why this call needs transformers' generate, or None when the fast loop can run it."""
    for name in _FALLBACK_KWARGS:
        if kwargs.get(name) is not None:
            return name
    if config.num_beams not in (None, 1):
        return "beam search"
    if config.num_return_sequences not in (None, 1):
        return "num_return_sequences"
    for flag in ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
                 "output_hidden_states"):
        if getattr(config, flag, False):
            return flag
    for name, value in config.to_dict().items():
        if name not in SUPPORTED_FIELDS and name in _DEFAULTS and value != _DEFAULTS[name]:
            return name
    extra = set(kwargs) - {"input_ids", "attention_mask", "use_cache"}
    if extra:
        return ", ".join(sorted(extra))
    return None


class LogitsPlan(NamedTuple):
    """Which of transformers' logits processors a call uses. A captured decode step depends on this plan
    only; the values (temperature, top-p, penalty, minimum length) live in a device tensor, so a new
    temperature needs no new CUDA graph."""
    repetition_penalty: bool
    min_new_tokens: bool
    do_sample: bool
    temperature: bool
    top_k: int
    top_p: bool


# Rows of the plan's values ("knobs"), one float64 device tensor: transformers divides and compares by
# Python floats, whose float32 rounding a float64 tensor reproduces exactly.
KNOB_ROWS = (TEMPERATURE, ONE_MINUS_TOP_P, PENALTY, MIN_NEW_TOKENS) = range(4)


class DecodeSettings:
    """What one generate() call asks for, resolved to plain numbers (transformers' defaults included):
    the LogitsPlan of processors it uses and their values (`knobs`, indexed by KNOB_ROWS)."""

    def __init__(self, config: GenerationConfig, prompt_length: int, context: int | None):
        if context is not None and prompt_length > context:
            raise GenerationInputError(f"the prompt has {prompt_length} tokens, more than the model's context of {context}")
        if config.max_new_tokens is not None:
            max_new = int(config.max_new_tokens)
        elif config.max_length is not None:
            max_new = int(config.max_length) - prompt_length
        else:  # transformers' default: 20 new tokens, within the context
            max_new = 20 if context is None else min(20, context - prompt_length)
        if max_new < 1:
            raise GenerationInputError(
                f"nothing to generate: max_new_tokens must be >= 1 (got {max_new}"
                + ("" if config.max_new_tokens is not None else f" from max_length {config.max_length} and a prompt of {prompt_length}") + ")")
        self.max_new_tokens = max_new
        if config.min_new_tokens is not None:  # takes precedence over min_length, as in transformers
            self.min_new_tokens = int(config.min_new_tokens)
        else:
            self.min_new_tokens = max(int(config.min_length or 0) - prompt_length, 0)
        self.do_sample = bool(config.do_sample)
        self.temperature = float(config.temperature if config.temperature is not None else 1.0)
        self.top_k = int(config.top_k or 0)
        self.top_p = float(config.top_p if config.top_p is not None else 1.0)
        self.repetition_penalty = float(config.repetition_penalty or 1.0)
        self.eos_token_ids = _as_list(config.eos_token_id)
        pad = config.pad_token_id
        if pad is None and self.eos_token_ids:
            pad = self.eos_token_ids[0]  # what transformers does, with a warning
        self.pad_token_id = pad
        if self.do_sample and self.temperature <= 0:
            raise GenerationInputError(f"temperature must be > 0 when sampling (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise GenerationInputError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.repetition_penalty <= 0:
            raise GenerationInputError(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        self.plan = LogitsPlan(
            repetition_penalty=self.repetition_penalty != 1.0, min_new_tokens=self.min_new_tokens > 0,
            do_sample=self.do_sample, temperature=self.do_sample and self.temperature != 1.0,
            top_k=self.top_k if self.do_sample else 0, top_p=self.do_sample and self.top_p < 1.0)
        self.knobs = [0.0] * len(KNOB_ROWS)
        self.knobs[TEMPERATURE], self.knobs[ONE_MINUS_TOP_P] = self.temperature, 1 - self.top_p
        self.knobs[PENALTY], self.knobs[MIN_NEW_TOKENS] = self.repetition_penalty, self.min_new_tokens


def process_logits(logits, seen, generated, plan: LogitsPlan, knobs, eos_ids):
    """transformers' logits processors, in its order, up to the temperature warper, on [batch, vocab] float32
    scores; choose_tokens applies the top-k and top-p warpers that come next."""
    if plan.repetition_penalty:
        penalty = knobs[PENALTY]
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen, penalized, logits)
    if plan.min_new_tokens and eos_ids is not None:
        is_eos = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device).index_fill(0, eos_ids, True)
        logits = logits.masked_fill(is_eos & (generated < knobs[MIN_NEW_TOKENS]), float("-inf"))
    if plan.do_sample and plan.temperature:
        logits = logits / knobs[TEMPERATURE]
    return logits


def full_vocab_top_p(scores, one_minus_top_p):
    """transformers' TopPLogitsWarper over the whole vocabulary (the path without a top_k)."""
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= one_minus_top_p
    drop[:, -1] = False  # always keep the most likely token
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def _vocab_chunk(n: int) -> int | None:
    """The largest divisor of n in [64, 1024]: vocabulary reductions run over [rows, n / chunk, chunk] views."""
    return next((c for c in range(min(n, 1024), 63, -1) if n % c == 0), None)


# A reduction over a few rows of a vocabulary's length runs on a few GPU blocks: 15 us per argmax or sum over
# Llama-3's 128,256 scores on the H200, several per sampled token (benchmarks/experiments/token_choice_gpu.py).
# Reducing chunks first, then the chunk results, spreads the work over many blocks. Results are exact: integer
# sums, and the first index of the maximum as torch.argmax gives it (max over a dim returns the first one too).

def vocab_argmax(scores: torch.Tensor) -> torch.Tensor:
    """scores.argmax(dim=-1) of [rows, vocab] scores, in two passes."""
    rows, n = scores.shape
    chunk = _vocab_chunk(n)
    if chunk is None:
        return scores.argmax(dim=-1)
    best, where = scores.view(rows, n // chunk, chunk).max(dim=-1)
    which = best.argmax(dim=-1, keepdim=True)
    return (which * chunk + where.gather(1, which)).squeeze(1)


def vocab_count(flags: torch.Tensor) -> torch.Tensor:
    """flags.sum(dim=-1, keepdim=True) of [rows, vocab] booleans, in two passes."""
    rows, n = flags.shape
    chunk = _vocab_chunk(n)
    if chunk is None:
        return flags.sum(dim=-1, keepdim=True)
    return flags.view(rows, n // chunk, chunk).sum(dim=-1).sum(dim=-1, keepdim=True)


class TopKCandidates(NamedTuple):
    """What transformers' top-k warper (then top-p) leaves to sample, held as k candidates instead of the
    vocabulary: every token below the k-th score is -inf after top-k, so top-p, softmax and the race need
    only the values torch.topk returns. The catch is ties: top-k keeps every token equal to the k-th score,
    and topk returns only some of them. All those tied tokens form one group, an extra entrant of the race
    with their total mass, and a token drawn uniformly among them stands for the group when it wins."""
    index: torch.Tensor  # [batch, k] vocabulary ids, by descending score
    mass: torch.Tensor  # [batch, k + 1] unnormalised probabilities: the k candidates (0 for tied ones), then the group
    tied: torch.Tensor  # [batch, vocab] the tokens equal to the k-th score: the group

    def sample(self):
        """The exponential race (argmax mass / E) between the candidates and the group."""
        winner = (self.mass / torch.empty_like(self.mass).exponential_(1)).argmax(dim=-1, keepdim=True)
        noise = torch.rand(self.tied.shape, device=self.tied.device)
        tie = vocab_argmax(noise.masked_fill(~self.tied, -1))[:, None]  # uniform among the group
        return torch.cat([self.index, tie], dim=1).gather(1, winner).squeeze(1)


def top_k_candidates(scores, plan: LogitsPlan, knobs) -> TopKCandidates:
    """TopKLogitsWarper then TopPLogitsWarper (if on), on the k best scores of [batch, vocab] scores."""
    values, index = torch.topk(scores, plan.top_k, dim=-1)
    kth = values[:, -1:]
    tied = scores == kth
    ties = vocab_count(tied).to(scores.dtype)  # >= 1: topk may have returned only some of them
    weight = (values - values[:, :1]).exp()  # softmax numerators, the largest 1
    tie_weight = weight[:, -1:]  # of each tied token
    in_group = values == kth
    weight = weight.masked_fill(in_group, 0)  # tied candidates count in the group only
    group = ties * tie_weight
    if plan.top_p:
        # transformers sorts ascending and drops the tokens whose cumulative probability is <= 1 - top_p. The
        # group holds the smallest kept scores, so it comes first: its j-th token's cumulative mass is
        # j * tie_weight (which tied tokens come first is up to the unstable sort: here each is equally likely
        # to be kept). Then the candidates from the k-th up: the group plus a suffix sum of descending values.
        cumulative = group + weight.flip(-1).cumsum(dim=-1).flip(-1)
        threshold = knobs[ONE_MINUS_TOP_P] * cumulative[:, :1]  # in unnormalised mass
        drop = cumulative <= threshold
        drop[:, 0] = False  # always keep the most likely token
        weight = weight.masked_fill(drop, 0)
        # (a tie_weight that underflowed to 0 drops the whole group, as transformers' zero probabilities are)
        kept_ties = ties - torch.minimum((threshold / tie_weight).floor(), ties)
        kept_ties = torch.where(in_group[:, :1], kept_ties.clamp(min=1), kept_ties)  # the most likely is tied
        group = kept_ties * tie_weight
    return TopKCandidates(index, torch.cat([weight, group], dim=1), tied)


def choose_tokens(scores, plan: LogitsPlan, knobs):
    """Argmax, or transformers' top-k and top-p warpers and a sample drawn on the device without a host sync
    (exponential race: argmax p / E)."""
    if not plan.do_sample:
        return vocab_argmax(scores)
    if 0 < plan.top_k < scores.shape[-1]:  # a larger top_k keeps everything in transformers too
        return top_k_candidates(scores, plan, knobs).sample()
    if plan.top_p:
        scores = full_vocab_top_p(scores, knobs[ONE_MINUS_TOP_P])
    probs = scores.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1)
    return vocab_argmax(probs / noise)


def cache_keyword(model) -> str:
    """The forward keyword of the KV cache: transformers renamed past_key_values to cache (the old name is
    deprecated from 5.2x and goes in 5.40); older releases (5.17 on the GPU machine) know only the old one."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class DecodeEngine:
    """Static tensors for one (batch size, cache length): KV cache, token buffer, mask, row positions."""

    def __init__(self, model, batch_size: int, max_length: int, compile: bool | None = None,
                 cuda_graph: bool | None = None):
        self.model = model
        self.device = model.device
        on_gpu = self.device.type == "cuda"
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.use_graph = on_gpu if cuda_graph is None else bool(cuda_graph)
        self.compile = on_gpu if compile is None else bool(compile)
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_length)
        self._cache_keyword = cache_keyword(model)
        long = dict(dtype=torch.long, device=self.device)
        shape = (self.batch_size, self.max_length)
        self.tokens = torch.zeros(shape, **long)  # prompt (left-padded), then generated ids
        self.attention_mask = torch.zeros(shape, **long)
        self.position = torch.zeros((1,), **long)  # cache slot of the token fed to the next step
        self.row_positions = torch.zeros((self.batch_size, 1), **long)  # its rotary position, per row
        self.generated = torch.zeros((1,), **long)  # tokens generated so far
        self.finished = torch.zeros((self.batch_size,), dtype=torch.bool, device=self.device)
        self.finished_at = torch.zeros((self.batch_size,), **long)  # new-token count when the row hit EOS
        self.seen = torch.zeros((self.batch_size, model.config.vocab_size), dtype=torch.bool, device=self.device)
        self.knobs = torch.zeros((len(KNOB_ROWS),), dtype=torch.float64, device=self.device)
        self.pad_token = torch.zeros((), **long)
        self.settings: DecodeSettings | None = None
        self._eos = None
        self._eos_tensors: dict = {}
        # Only the forward is compiled (it specialises on the model: dense or sparse, batch, cache length);
        # the token choice runs as plain torch ops, recorded in the same CUDA graph, so a new sampling
        # setting never recompiles the model. (Compiled too, it was 1-2% faster per token at batch 1 on the
        # H200, but inductor of torch 2.11 failed on its batch-4 EOS bookkeeping:
        # benchmarks/results/generate_h200_append_compiled.log against generate_h200.log.)
        self._forward_fn = torch.compile(self._forward, dynamic=False) if self.compile else self._forward
        self._graphs: dict = {}
        self._warm: dict = {}

    def _graph_key(self):
        """What a captured step depends on besides the engine's own tensors."""
        settings = self.settings
        return (settings.plan, tuple(settings.eos_token_ids), settings.pad_token_id is not None,
                float(getattr(self.model, "sparsity", 0.0)))

    def start(self, input_ids, attention_mask, settings: DecodeSettings) -> None:
        """Prefill the prompt and choose the first new token."""
        batch, prompt_length = input_ids.shape
        self.settings = settings
        self._eos = None
        if settings.eos_token_ids:  # one lasting tensor per EOS set: a captured graph reads its memory
            ids = tuple(settings.eos_token_ids)
            self._eos = self._eos_tensors.get(ids)
            if self._eos is None:
                self._eos = self._eos_tensors[ids] = torch.tensor(ids, dtype=torch.long, device=self.device)
        self.knobs.copy_(torch.tensor(settings.knobs, dtype=torch.float64))
        self.pad_token.fill_(settings.pad_token_id if settings.pad_token_id is not None else 0)
        self.cache.reset()
        for buffer in (self.tokens, self.attention_mask, self.generated, self.finished_at):
            buffer.zero_()
        self.finished.fill_(False)
        self.tokens[:, :prompt_length] = input_ids
        self.attention_mask[:, :prompt_length] = attention_mask
        self.seen.fill_(False)
        self.seen.scatter_(1, input_ids, True)
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        logits = self.model(
            input_ids=input_ids, attention_mask=self.attention_mask,
            position_ids=positions, **{self._cache_keyword: self.cache},
            cache_position=torch.arange(prompt_length, device=self.device), use_cache=True, logits_to_keep=1,
        ).logits
        self.row_positions.copy_(positions[:, -1:] + 1)
        self.position.fill_(prompt_length - 1)
        self._append(logits[:, -1].float())

    def _append(self, logits) -> None:
        """Pick the next token from [batch, vocab] logits and write it at position + 1 (device only)."""
        plan = self.settings.plan
        scores = process_logits(logits, self.seen, self.generated, plan, self.knobs, self._eos)
        token = choose_tokens(scores, plan, self.knobs)
        if self.settings.pad_token_id is not None and self._eos is not None:
            token = torch.where(self.finished, self.pad_token, token)
        self.tokens.index_copy_(1, self.position + 1, token[:, None])
        self.seen.scatter_(1, token[:, None], True)
        self.generated.add_(1)
        if self._eos is not None:
            hit = torch.isin(token, self._eos) & ~self.finished
            self.finished_at.copy_(torch.where(hit, self.generated, self.finished_at))
            self.finished.logical_or_(hit)
        self.position.add_(1)

    def _forward(self):
        """Feed tokens[:, position]: the next token's [batch, vocab] float32 logits (device only)."""
        position = self.position
        self.attention_mask.index_fill_(1, position, 1)
        logits = self.model(
            input_ids=self.tokens.index_select(1, position), attention_mask=self.attention_mask,
            position_ids=self.row_positions, **{self._cache_keyword: self.cache}, cache_position=position, use_cache=True,
        ).logits
        self.row_positions.add_(1)
        return logits[:, -1].float()

    def _step(self) -> None:
        """One token: all on the device, no host sync."""
        self._append(self._forward_fn())

    def step(self) -> None:
        if not self.use_graph:
            self._step()
            return
        graph_key = self._graph_key()
        graph = self._graphs.get(graph_key)
        if graph is not None:
            graph.replay()
            return
        if self._warm.get(graph_key, 0) < 2:
            # real steps that also compile and warm the kernels, on a side stream as capture requires
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step()
            torch.cuda.current_stream().wait_stream(stream)
            self._warm[graph_key] = self._warm.get(graph_key, 0) + 1
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()  # recorded, not run
        self._graphs[graph_key] = graph
        graph.replay()

    def run(self, input_ids, attention_mask, settings: DecodeSettings, streamer=None,
            stop_at_eos: bool = True) -> torch.Tensor:
        """Prefill, decode up to max_new_tokens (stopping once every row hit EOS), return all ids."""
        prompt_length = input_ids.shape[1]
        self.start(input_ids, attention_mask, settings)
        streamed = 0
        checks = stop_at_eos and self._eos is not None
        done = 1
        while done < settings.max_new_tokens:
            if done % SYNC_EVERY == 0:
                streamed = self._stream(streamer, prompt_length, streamed, done)
                if checks and bool(self.finished.all()):
                    break
            self.step()
            done += 1
        new = done
        if checks:
            finished_at = torch.where(self.finished, self.finished_at, done)
            new = int(finished_at.max())
        self._stream(streamer, prompt_length, streamed, new)
        return self.tokens[:, :prompt_length + new].clone()

    def _stream(self, streamer, prompt_length, streamed, upto):
        if streamer is None or upto <= streamed:
            return streamed
        streamer.put(self.tokens[:, prompt_length + streamed:prompt_length + upto].cpu())
        return upto


def cache_bucket(length: int, context: int | None) -> int:
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return bucket if context is None else max(length, min(bucket, context))


class WinaconvGenerationMixin:
    """generate() with transformers' signature: the static-tensor loop, or transformers' own for the rest."""

    def _winaconv_engine(self, batch_size: int, length: int) -> DecodeEngine:
        engines = self.__dict__.setdefault("_winaconv_engines", OrderedDict())
        context = getattr(self.config, "max_position_embeddings", None)
        # an engine of this batch size whose cache is long enough is reused as is: no new cache, no new capture
        fits = [k for k in engines if k[0] == batch_size and k[2] == self.device and k[1] >= length]
        key = min(fits, key=lambda k: k[1]) if fits else (batch_size, cache_bucket(length, context), self.device)
        engine = engines.pop(key, None) or DecodeEngine(self, batch_size, key[1])
        engines[key] = engine
        while len(engines) > MAX_ENGINES:
            engines.popitem(last=False)
        return engine

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, streamer=None, **kwargs):
        config, other = resolved_config(self, generation_config, kwargs)
        reason = unsupported_reason(config, other)
        if reason is not None:
            warnings.warn(f"winaconv: {reason} is not supported by the fast generate; using transformers' slower loop", stacklevel=2)
            return super().generate(inputs, generation_config=generation_config, streamer=streamer, **kwargs)
        input_ids = other.pop("input_ids", inputs)
        if input_ids is None:
            raise GenerationInputError("generate() needs input_ids")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise GenerationInputError(f"input_ids must be [batch, length] with length >= 1 (got shape {tuple(input_ids.shape)})")
        input_ids = input_ids.to(self.device)
        attention_mask = other.get("attention_mask")
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device).long())
        if streamer is not None and input_ids.shape[0] > 1:
            raise GenerationInputError("a streamer needs batch size 1")
        context = getattr(self.config, "max_position_embeddings", None)
        settings = DecodeSettings(config, input_ids.shape[1], context)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        engine = self._winaconv_engine(input_ids.shape[0], input_ids.shape[1] + settings.max_new_tokens)
        try:
            return engine.run(input_ids, attention_mask, settings, streamer)
        finally:
            if streamer is not None:
                streamer.end()
