"""model.generate() of a winaconv model against transformers' own generate (GenerationMixin.generate on
the same model, so both loops run the same sparse forward), token for token in float32."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GenerationMixin, TextStreamer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from winaconv.calibrate import uniform_levels
from winaconv.runtime_model import to_runtime_model, winaconv_section
from winaconv_runtime.generation import DecodeSettings, GenerationInputError

from random_models import ALL_FAMILIES, random_model

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


def test_temperature_and_top_p_sample_the_expected_distribution(llama):
    """First and second new tokens of 4000 identical rows against the distribution transformers' warpers
    define, at two temperatures that share one logits plan (the values are read from the engine's tensor,
    so the second call must follow its own temperature). Tolerance per token: 4.5 binomial standard
    deviations (+0.002), a false failure about once in 10^4 runs; tokens outside the top-p nucleus must
    never appear."""
    rows, top_p = 4000, 0.9
    prompt = torch.tensor(random_prompts([5], seed=3)[0])[None]
    plans = set()
    for temperature in (0.7, 1.4):
        options = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        plans.add(DecodeSettings(GenerationConfig(max_new_tokens=2, **options), 5, None).plan)
        torch.manual_seed(0)
        out = llama.generate(prompt.expand(rows, -1), max_new_tokens=2, pad_token_id=0, **options)
        for position in (5, 6):  # chosen after the prefill, then by a decode step
            logits = llama(out[:1, :position]).logits[:, -1].float()
            # every row's prefix differs after the first sampled token: check the rows that share row 0's
            rows_alike = (out[:, :position] == out[:1, :position]).all(-1)
            context = out[:1, :position]
            scores = TopPLogitsWarper(top_p)(context, TemperatureLogitsWarper(temperature)(context, logits))
            expected = scores.softmax(-1)[0].double()
            assert 3 <= int((expected > 0).sum()) < VOCAB  # the nucleus really cuts, and there is something to sample
            counts = torch.bincount(out[rows_alike, position], minlength=VOCAB).double()
            observed, n = counts / counts.sum(), counts.sum()
            assert counts[expected == 0].sum() == 0
            tolerance = 4.5 * (expected * (1 - expected) / n).sqrt() + 0.002
            assert ((observed - expected).abs() <= tolerance).all(), (temperature, position)
    assert len(plans) == 1


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

    folder = str(converted_smollm2("wina", "global"))
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
