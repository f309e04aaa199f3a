"""model.generate() of a winaconv model against transformers' own generate (GenerationMixin.generate on
the same model, so both loops run the same sparse forward), token for token in float32."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GenerationMixin, TextStreamer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from winaconv.convert.calibrate import uniform_levels
from winaconv.convert.runtime_model import to_runtime_model, winaconv_section
from winaconv_runtime.generation_config import GenerationInputError, resolved_config
from winaconv_runtime.sampling import DecodeSettings, process_logits, top_k_candidates

from models import ALL_FAMILIES, random_model

VOCAB = 120


def runtime_model(base, level=0.5):
    """The runtime model of `base` (TEAL, no transform) with a uniform level stored and selected."""
    model, family = to_runtime_model(base, winaconv_section("teal", "none", ()))
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    uniform_levels(model, family, ids, [level])
    model.set_sparsity(level)
    return model


def transformers_generate(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GenerationMixin.generate(model, *args, **kwargs)


def left_padded_batch(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def random_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def llama():
    return runtime_model(random_model("llama"))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_greedy_equals_transformers_for_every_family(family):
    model = runtime_model(random_model(family))
    single = torch.tensor(random_prompts([7])[0])[None]
    ids, mask = left_padded_batch(random_prompts([9, 4, 6]))
    for prompt, attention in ((single, torch.ones_like(single)), (ids, mask)):
        kwargs = dict(attention_mask=attention, max_new_tokens=12, do_sample=False, pad_token_id=0)
        expected = transformers_generate(model, prompt, **kwargs)
        assert torch.equal(model.generate(prompt, **kwargs), expected)
    # an EOS that the middle row reaches: rows stop and are padded as transformers pads them
    free = transformers_generate(model, ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    eos = int(free[1, ids.shape[1] + 2])
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=[eos, 1])
    assert torch.equal(model.generate(ids, **kwargs), transformers_generate(model, ids, **kwargs))


def test_engine_steps_record_no_autograd_even_with_grad_on(llama):
    """Benchmarks and users drive the engine's steps directly; with grad on, an eager step would record a backward
    (and a compiled one trace one): the engine turns it off itself."""
    prompt = torch.tensor(random_prompts([6])[0])[None]
    llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False, pad_token_id=0)
    engine = next(iter(llama.__dict__["_winaconv_engines"].values()))
    seen = []
    hook = llama.lm_head.register_forward_hook(lambda module, args, out: seen.append((torch.is_grad_enabled(),
                                                                                      out.requires_grad)))
    try:
        with torch.enable_grad():
            engine.step()
            engine.start(prompt, torch.ones_like(prompt), engine.settings)
    finally:
        hook.remove()
    assert seen == [(False, False), (False, False)]


def test_length_limits_match_transformers(llama):
    ids, mask = left_padded_batch(random_prompts([8, 5, 3]))
    free = transformers_generate(llama, ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 1])  # row 0 emits it as its second new token
    cases = [dict(max_length=15), dict(), dict(max_new_tokens=10, min_new_tokens=6), dict(max_new_tokens=10, min_length=14),
             dict(max_new_tokens=10, min_length=14, min_new_tokens=3),
             dict(max_new_tokens=10), dict(max_new_tokens=1), dict(max_new_tokens=10, repetition_penalty=1.5)]
    for case in cases:
        kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=eos, **case)
        expected = transformers_generate(llama, ids, **kwargs)
        assert torch.equal(llama.generate(ids, **kwargs), expected), case
    assert transformers_generate(llama, ids, attention_mask=mask, pad_token_id=0).shape[1] == ids.shape[1] + 20  # default: 20 new


def test_bad_input_gives_one_line_errors(llama):
    ids = torch.tensor([random_prompts([5])[0]])
    for kwargs, message in ((dict(max_new_tokens=0), "max_new_tokens"),
                            (dict(max_length=4), "from max_length 4"),
                            (dict(do_sample=True, temperature=0.0), "temperature must be > 0")):
        with pytest.raises(GenerationInputError, match=message) as error:
            llama.generate(ids, **kwargs)
        assert "\n" not in str(error.value)
    too_long = torch.randint(3, VOCAB, (1, llama.config.max_position_embeddings + 1))
    with pytest.raises(GenerationInputError, match="more than the model's context of 128"):
        llama.generate(too_long, max_new_tokens=2)


def test_beam_search_falls_back_with_one_notice(llama):
    ids = torch.tensor([random_prompts([6])[0]])
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    with pytest.warns(UserWarning, match=r"^winaconv: beam search is not supported by the fast generate") as caught:
        got = llama.generate(ids, **kwargs)
    assert len([w for w in caught if str(w.message).startswith("winaconv")]) == 1
    assert torch.equal(got, transformers_generate(llama, ids, **kwargs))


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(llama):
    ids, mask = left_padded_batch(random_prompts([6, 3]))
    sample = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=1.5, pad_token_id=0)
    torch.manual_seed(7)
    first = llama.generate(ids, **sample)
    torch.manual_seed(7)
    assert torch.equal(llama.generate(ids, **sample), first)
    torch.manual_seed(8)
    assert not torch.equal(llama.generate(ids, **sample), first)
    greedy = llama.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(llama.generate(ids, **sample, top_k=1), greedy)


@pytest.mark.parametrize("top_k", [0, 8])
def test_temperature_and_top_p_sample_the_expected_distribution(llama, top_k):
    """First and second new tokens of 4000 identical rows against the distribution transformers' warpers
    define, at two temperatures that share one logits plan (the values are read from the engine's tensor,
    so the second call must follow its own temperature); top_k 8 takes the path that samples among the
    top-k candidates. Tolerance per token: 4.5 binomial standard deviations (+0.002), a false failure about
    once in 10^4 runs; tokens outside the top-p nucleus must never appear."""
    rows, top_p = 4000, 0.9
    prompt = torch.tensor(random_prompts([5], seed=3)[0])[None]
    plans = set()
    for temperature in (0.7, 1.4):
        options = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
        plans.add(DecodeSettings(GenerationConfig(max_new_tokens=2, **options), 5, None).plan)
        torch.manual_seed(0)
        out = llama.generate(prompt.expand(rows, -1), max_new_tokens=2, pad_token_id=0, **options)
        for position in (5, 6):  # chosen after the prefill, then by a decode step
            logits = llama(out[:1, :position]).logits[:, -1].float()
            # every row's prefix differs after the first sampled token: check the rows that share row 0's
            rows_alike = (out[:, :position] == out[:1, :position]).all(-1)
            context = out[:1, :position]
            scores = TemperatureLogitsWarper(temperature)(context, logits)
            if top_k:
                scores = TopKLogitsWarper(top_k)(context, scores)
            scores = TopPLogitsWarper(top_p)(context, scores)
            expected = scores.softmax(-1)[0].double()
            assert 3 <= int((expected > 0).sum()) < VOCAB  # the nucleus really cuts, and there is something to sample
            counts = torch.bincount(out[rows_alike, position], minlength=VOCAB).double()
            observed, n = counts / counts.sum(), counts.sum()
            assert counts[expected == 0].sum() == 0
            tolerance = 4.5 * (expected * (1 - expected) / n).sqrt() + 0.002
            assert ((observed - expected).abs() <= tolerance).all(), (temperature, position)
    assert len(plans) == 1


def test_unset_fields_are_resolved_as_transformers_resolves_them(llama):
    """A call's unset fields come from the model's generation_config, then from transformers' global defaults
    (top_k 50 among them), as in transformers' own generate; max_length stays unset (20 new tokens)."""
    saved = llama.generation_config
    try:
        llama.generation_config = GenerationConfig(eos_token_id=5, temperature=0.8)
        for given, kwargs in ((None, dict(do_sample=True)), (GenerationConfig(top_p=0.7), dict(max_new_tokens=3)),
                              (GenerationConfig(top_k=0), dict(do_sample=True, temperature=1.2))):
            ours, _ = resolved_config(llama, given, kwargs)
            theirs, _ = llama._prepare_generation_config(given, **kwargs)
            expected = theirs.to_dict()
            expected["max_length"] = None if given is None or given.max_length is None else expected["max_length"]
            assert ours.to_dict() == expected
    finally:
        llama.generation_config = saved


def test_sampling_without_top_k_keeps_transformers_default_top_50(llama):
    """No top_k given: transformers samples among the 50 best scores; 4000 rows at a high temperature must draw
    only those (and many of them), where sampling the whole vocabulary of 120 would draw nearly all."""
    prompt = torch.tensor(random_prompts([5], seed=4)[0])[None]
    assert llama.generation_config.top_k is None
    torch.manual_seed(0)
    out = llama.generate(prompt.expand(4000, -1), max_new_tokens=1, do_sample=True, temperature=3.0, pad_token_id=0)
    best = llama(prompt).logits[0, -1].topk(50).indices
    drawn = out[:, -1].unique()
    assert torch.isin(drawn, best).all()
    assert len(drawn) >= 45


def sampling_plan(temperature, top_k, top_p):
    """The logits plan and knobs of a generate() call with these warpers."""
    settings = DecodeSettings(GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p), 1, None)
    return settings.plan, torch.tensor(settings.knobs, dtype=torch.float64)


def warped_scores(logits, plan, knobs):
    """What choose_tokens gets: the processors up to temperature (no penalty, no minimum length here)."""
    none = torch.zeros(logits.shape, dtype=torch.bool)
    return process_logits(logits, none, torch.zeros(1, dtype=torch.long), plan, knobs, None)


def candidate_probabilities(candidates):
    """The [batch, vocab] float64 distribution TopKCandidates.sample() draws from: each entrant of the race
    wins with its share of the mass, and the group's share is spread evenly over its tied tokens."""
    k = candidates.index.shape[1]
    mass = candidates.mass.double()
    probs = torch.zeros(candidates.tied.shape, dtype=torch.float64).scatter_add_(1, candidates.index, mass[:, :k])
    probs += candidates.tied * mass[:, k:] / candidates.tied.sum(-1, keepdim=True)
    return probs / mass.sum(-1, keepdim=True)


def transformers_probabilities(scores, top_k, top_p):
    """transformers' TopKLogitsWarper then TopPLogitsWarper, then softmax, in float64, on scores that went
    through its TemperatureLogitsWarper in float32 (as in generate)."""
    scores = TopKLogitsWarper(top_k)(None, scores.double())
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


def tie_groups(scores_row):
    """Index of each token's group of equal scores, and the number of groups."""
    values, group = torch.unique(scores_row, return_inverse=True)
    return group, len(values)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "coarse"])
def test_top_k_candidates_give_transformers_distribution(kind):
    """The top-k candidate path against transformers' warpers, probability vector against probability vector,
    on random logits: plain float32, rounded to bfloat16 (as a bf16 model's logits are: ties at the k-th
    score are common) and on a coarse grid (many ties, also across the top-p boundary).

    transformers' top-p sorts with an unstable sort, so when the boundary splits a group of equal scores,
    which of them it drops is up to the implementation; what is defined is how much of the group's mass
    stays. So the test compares, per row, each group of equal scores' mass, and token by token every group
    the reference keeps or drops whole; tokens of a group dropped whole must have probability exactly 0.
    Tolerance 1e-6: the candidates' mass is float32 (relative rounding ~1e-7 per step over <= 50 terms)
    against a float64 reference."""
    g = torch.Generator().manual_seed(11)
    vocab, rows = 1000, 16
    missed_ties = split_groups = 0
    for trial in range(6):
        logits = torch.randn(rows, vocab, generator=g) * 3
        if kind == "bfloat16":
            logits = logits.bfloat16().float()
        elif kind == "coarse":
            logits = torch.randint(0, 24, (rows, vocab), generator=g) / 4.0
        for temperature, top_k, top_p in ((0.7, 50, 0.9), (1.0, 10, 0.5), (1.3, 5, 1.0), (0.7, 1, 0.9), (1.0, 200, 0.2)):
            plan, knobs = sampling_plan(temperature, top_k, top_p)
            scores = warped_scores(logits, plan, knobs)
            assert torch.equal(scores, TemperatureLogitsWarper(temperature)(None, logits))
            candidates = top_k_candidates(scores, plan, knobs)
            ours = candidate_probabilities(candidates)
            expected = transformers_probabilities(scores, top_k, top_p)
            assert torch.allclose(ours.sum(-1), torch.ones(rows, dtype=torch.float64), atol=1e-12, rtol=0)
            for row in range(rows):
                group, count = tie_groups(scores[row])
                ours_mass = torch.zeros(count, dtype=torch.float64).index_add_(0, group, ours[row])
                expected_mass = torch.zeros(count, dtype=torch.float64).index_add_(0, group, expected[row])
                assert torch.allclose(ours_mass, expected_mass, atol=1e-6, rtol=0), (kind, trial, top_k, top_p, row)
                low = torch.full((count,), 2.0, dtype=torch.float64).scatter_reduce_(0, group, expected[row], "amin")
                high = torch.zeros(count, dtype=torch.float64).scatter_reduce_(0, group, expected[row], "amax")
                whole = (low == high)[group]  # groups the reference keeps or drops whole
                assert torch.allclose(ours[row][whole], expected[row][whole], atol=1e-6, rtol=0)
                assert (ours[row][whole & (expected[row] == 0)] == 0).all()
                split_groups += int((high > low).sum())
            kth = scores.gather(1, candidates.index[:, -1:])
            tied_returned = (scores.gather(1, candidates.index) == kth).sum(-1)
            missed_ties += int(((scores == kth).sum(-1) > tied_returned).sum())  # tokens top-k keeps, topk left out
    print(kind, "rows where topk left out tied tokens:", missed_ties, "groups split by top-p:", split_groups)
    if kind != "float32":  # the cases this path has to get right were there
        assert missed_ties > 0
    if kind == "coarse":
        assert split_groups > 0


def test_top_k_sample_draws_tied_tokens_topk_left_out():
    """TopKCandidates.sample() on 20000 identical rows whose k-th score is shared by five tokens (topk returns
    two of them): every tied token must be drawn with its probability -- transformers' share, and, when top-p
    cuts into the group, an even split of the mass transformers keeps. Tolerance per token: 4.5 binomial
    standard deviations (+0.002)."""
    vocab, rows, top_k = 30, 20000, 4
    logits = torch.zeros(vocab)
    logits[[3, 17]] = torch.tensor([4.0, 3.0])
    tied = torch.tensor([1, 8, 12, 25, 29])
    logits[tied] = 2.5
    for top_p, kept_ties in ((1.0, 5), (0.8, 3)):  # 0.8: the first two tied tokens in ascending order are dropped
        plan, knobs = sampling_plan(1.0, top_k, top_p)
        scores = warped_scores(logits.expand(rows, -1), plan, knobs)
        candidates = top_k_candidates(scores, plan, knobs)
        assert int(torch.isin(tied, candidates.index[0]).sum()) == 2
        expected = transformers_probabilities(scores[:1], top_k, top_p)[0]
        assert int((expected[tied] > 0).sum()) == kept_ties
        even = expected.clone()
        even[tied] = expected[tied].sum() / len(tied)
        assert torch.allclose(candidate_probabilities(candidates)[0], even, atol=1e-6, rtol=0)
        torch.manual_seed(5)
        counts = torch.bincount(candidates.sample(), minlength=vocab).double()
        observed = counts / rows
        tolerance = 4.5 * (even * (1 - even) / rows).sqrt() + 0.002
        assert ((observed - even).abs() <= tolerance).all(), top_p
        assert (counts[tied] > 0).all() and counts[even == 0].sum() == 0


@pytest.fixture(scope="module")
def smollm2(smollm2_folder):
    base = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32)
    return runtime_model(base, level=0.5), AutoTokenizer.from_pretrained(smollm2_folder)


def test_real_model_greedy_eos_and_streamer(smollm2, capsys):
    model, tokenizer = smollm2
    # dense: at a sparse level, rounding differences between transformers' dynamic cache and the static
    # cache flip threshold decisions now and then (the sparse levels are checked on the random models)
    model.set_sparsity(0.0)
    prompts = ["The capital of France is", "Answer with one word. What colour is the sky?", "1, 2, 3,"]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    tokenizer.padding_side = "left"
    batch = tokenizer(chats, return_tensors="pt", padding=True)
    kwargs = dict(attention_mask=batch.attention_mask, max_new_tokens=24, do_sample=False)
    expected = transformers_generate(model, batch.input_ids, **kwargs)
    got = model.generate(batch.input_ids, **kwargs)
    assert torch.equal(got, expected)
    new = got[:, batch.input_ids.shape[1]:]
    eos = tokenizer.eos_token_id
    ended = [(row == eos).nonzero()[0, 0].item() for row in new if (row == eos).any()]
    assert ended and min(ended) < new.shape[1] - 2, "a row must stop early for the EOS check to mean something"
    single = tokenizer(prompts[0], return_tensors="pt")
    one = dict(attention_mask=single.attention_mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(single.input_ids, **one), transformers_generate(model, single.input_ids, **one))
    capsys.readouterr()
    transformers_generate(model, single.input_ids, streamer=TextStreamer(tokenizer), **one)
    theirs = capsys.readouterr().out
    model.generate(single.input_ids, streamer=TextStreamer(tokenizer), **one)
    assert capsys.readouterr().out == theirs and "Paris" in theirs


def test_generate_and_bench_commands_on_smollm2(converted_smollm2):
    from click.testing import CliRunner

    from winaconv.cli import main

    folder = str(converted_smollm2("wina", "pca"))
    runner = CliRunner()
    result = runner.invoke(main, ["generate", folder, "What is the capital of France?", "--chat", "--sparsity", "0",
                                  "--max-new-tokens", "12", "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout
    summary = result.stderr.strip().splitlines()[-1]
    assert "ms/token" in summary and "tokens/s" in summary and "sparsity 0, cpu" in summary
    result = runner.invoke(main, ["bench", folder, "--levels", "0,0.5", "--new-tokens", "4", "--prompt-tokens", "16",
                                  "--device", "cpu", "--json", "--save"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["speed"]) == {"0", "0.5"} and all(v > 0 for v in report["speed"].values())
    assert report["transformers_dense_ms"] > 0
    saved = json.loads((Path(folder) / "winaconv_results.json").read_text())
    assert saved["speed"] == {k: round(v, 3) for k, v in report["speed"].items()}
    result = runner.invoke(main, ["bench", folder, "--levels", "0.3", "--device", "cpu"])
    assert result.exit_code == 1 and "sparsity 0.3 is not stored" in result.output
