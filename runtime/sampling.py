"""Token choice with transformers' semantics, on the device and without a host sync.

DecodeSettings resolves one generate() call to plain numbers: a LogitsPlan (which of transformers' logits
processors run) and their values ("knobs"). process_logits and choose_tokens apply them to [batch, vocab]
scores exactly as transformers' processors, warpers and multinomial sampling would, in its order.
"""

from typing import NamedTuple

import torch
from transformers import GenerationConfig

from .generation_config import GenerationInputError


def _as_list(value):
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]



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


# A reduction over a few rows of a vocabulary's length runs on a few GPU blocks, and a sampled token takes
# several of them. Reducing chunks first, then the chunk results, spreads the work over many blocks. Results are
# exact: integer sums, and the first index of the maximum as torch.argmax gives it (max over a dim returns the
# first one too).

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
