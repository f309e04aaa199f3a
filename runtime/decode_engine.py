"""The static-tensor decode loop behind `model.generate()`.

The prompt is prefilled with the normal forward, then every token is one call of a step function that keeps all
its state in static tensors -- forward on a static KV cache, then the token choice of sampling.py and the EOS
bookkeeping -- so on a GPU its forward is compiled once and the whole step is replayed as a CUDA graph with no
host sync; the host looks at the "all rows finished" flag only every `SYNC_EVERY` tokens. On the CPU the same
step runs eagerly.

Memory: one engine (static KV cache plus, on a GPU, one CUDA graph per sparsity level and LogitsPlan) is kept per
(batch size, cache length bucket); buckets are powers of two (at least 256 tokens, at most the model's
context) and at most `MAX_ENGINES` engines are kept (least recently used dropped), so the extra memory is
at most MAX_ENGINES KV caches of the requested size rounded up to a power of two, plus the graphs' pools.
"""

import inspect
from collections import OrderedDict

import torch
from transformers import StaticCache

from .decode_attention import install as install_decode_attention
from .expert_routing import install as install_expert_routing
from .sampling import KNOB_ROWS, DecodeSettings, choose_tokens, process_logits

SYNC_EVERY = 8  # tokens between host checks of "every row finished" (and streamer pushes)
MAX_ENGINES = 2
MIN_BUCKET = 256


def cache_keyword(model) -> str:
    """The forward keyword of the KV cache: transformers renamed past_key_values to cache (the old name is
    deprecated from 5.2x and goes in 5.40); older releases (5.17 on the GPU machine) know only the old one."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class DecodeEngine:
    """Static tensors for one (batch size, cache length): KV cache, token buffer, mask, row positions."""

    def __init__(self, model, batch_size: int, max_length: int, compile: bool | None = None,
                 cuda_graph: bool | None = None, decode_attention: bool | None = None,
                 expert_routing: bool | None = None):
        self.model = model
        self.device = model.device
        on_gpu = self.device.type == "cuda"
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.use_graph = on_gpu if cuda_graph is None else bool(cuda_graph)
        if on_gpu if decode_attention is None else decode_attention:
            install_decode_attention(model)  # a model on sdpa gets a kernel for its one-token steps
        if on_gpu if expert_routing is None else expert_routing:
            install_expert_routing(model)  # a MoE model's routers: softmax + top-k in one launch
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
        # setting never recompiles the model. (Compiling the token choice too gained little, and inductor
        # failed on its batch-4 EOS bookkeeping.)
        self._forward_fn = torch.compile(self._forward, dynamic=False) if self.compile else self._forward
        self._graphs: dict = {}
        self._warm: dict = {}

    def _graph_key(self):
        """What a captured step depends on besides the engine's own tensors."""
        settings = self.settings
        return (settings.plan, tuple(settings.eos_token_ids), settings.pad_token_id is not None,
                float(getattr(self.model, "sparsity", 0.0)))

    @torch.no_grad()  # inference only: a step traced or run with grad on would record a backward
    def start(self, input_ids, attention_mask, settings: DecodeSettings) -> None:
        """Prefill the prompt and choose the first new token."""
        prompt_length = input_ids.shape[1]
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

    @torch.no_grad()
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


def cached_engine(model, batch_size: int, length: int) -> DecodeEngine:
    """The model's engine for this batch size and total length, from its least-recently-used cache."""
    engines = model.__dict__.setdefault("_winaconv_engines", OrderedDict())
    context = getattr(model.config, "max_position_embeddings", None)
    # an engine of this batch size whose cache is long enough is reused as is: no new cache, no new capture
    fits = [k for k in engines if k[0] == batch_size and k[2] == model.device and k[1] >= length]
    key = min(fits, key=lambda k: k[1]) if fits else (batch_size, cache_bucket(length, context), model.device)
    engine = engines.pop(key, None) or DecodeEngine(model, batch_size, key[1])
    engines[key] = engine
    while len(engines) > MAX_ENGINES:
        engines.popitem(last=False)
    return engine
