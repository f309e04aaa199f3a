"""The decode path of the runtime: linears that share an input run as one kernel launch, and the
GreedyDecoder's static-tensor step gives transformers' greedy tokens."""

import copy
import itertools
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationMixin

from winaconv.convert.calibrate import uniform_levels
from winaconv.convert.runtime_model import to_runtime_model, winaconv_section
from winaconv_runtime import sparse_linear
from winaconv_runtime.architectures import PROJECTIONS, projection_sizes
from winaconv_runtime.kernels import sparse_linear_reference

from models import FAMILY_MODELS, random_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from greedy_decoder import GreedyDecoder  # noqa: E402  (a benchmark front of the engine, not shipped)


def sparse_random_model(family, method="wina"):
    model, fam = to_runtime_model(random_model(family), winaconv_section(method, "none", ()))
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    uniform_levels(model, fam, ids, [0.25, 0.5], PROJECTIONS if method == "wina" else ())
    return model, ids


DEVICE_PATHS = sparse_linear._uses_kernels


def kernels_on_cpu_tensors(on: bool) -> None:
    """CPU tensors take the GPU decode path (interpreted Triton kernels) when on, their own path when off."""
    sparse_linear._uses_kernels = (lambda tensor: True) if on else DEVICE_PATHS


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """The GPU decode path on CPU tensors: interpreted Triton kernels, every decode product sparse."""
    monkeypatch.setattr(sparse_linear, "_uses_kernels", lambda tensor: True)
    monkeypatch.setattr(sparse_linear, "use_sparse_kernel", lambda tokens, n_in, n_out: tokens == 1)
    launches = []
    original = sparse_linear.sparse_linear_triton

    def counted(x, weight_t, tau, segment_ends, bias=None, kept_percent=100):
        launches.append(tuple(segment_ends))
        return original(x, weight_t, tau, segment_ends, bias, kept_percent)

    monkeypatch.setattr(sparse_linear, "sparse_linear_triton", counted)
    return launches


def decode_logits(model, ids):
    """Logits of one decode step after a prefill of ids[:, :-1]."""
    with torch.no_grad():
        past = model(ids[:, :-1], use_cache=True).past_key_values
        return model(ids[:, -1:], past_key_values=past).logits


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_shared_input_linears_take_one_launch_and_keep_the_rule(family, kernels_on_cpu):
    model, ids = sparse_random_model(family)
    model.set_sparsity(0.5)
    kernels_on_cpu_tensors(False)  # reference first: masked dense products, linear by linear
    reference = decode_logits(model, ids[:1, :12])
    kernels_on_cpu_tensors(True)
    model.set_sparsity(0.5)  # lays out (and, for q/k/v and gate/up, joins) the weights for the kernel
    kernels_on_cpu.clear()
    fused = decode_logits(model, ids[:1, :12])
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)
    sizes = {p: out for p, (_, out) in projection_sizes(model.config).items()}
    qkv = (sizes["q"], sizes["q"] + sizes["k"], sizes["q"] + sizes["k"] + sizes["v"])
    gate_up = (sizes["gate"], sizes["gate"] + sizes["up"])
    per_layer = [qkv, (sizes["o"],), gate_up, (sizes["down"],)]
    assert kernels_on_cpu == per_layer * model.config.num_hidden_layers, "one launch per input, not per projection"


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_stacked_masked_products_keep_the_rule(tokens):
    """One product over every segment's masked input, each segment's columns from its own row block, equals the
    rule segment by segment (float64 reference; odd sizes, a bias, a segment that keeps nothing)."""
    generator = torch.Generator().manual_seed(tokens)
    sizes, n_in = (5, 11, 3), 37
    x = torch.randn(tokens, n_in, generator=generator)
    weight = torch.randn(sum(sizes), n_in, generator=generator)
    bias = torch.randn(sum(sizes), generator=generator)
    tau = torch.rand(len(sizes), n_in, generator=generator)
    tau[2] = float("inf")
    pieces = sparse_linear.stacked_masked_products(x, weight, bias, tau, sizes)
    assert [tuple(p.shape) for p in pieces] == [(tokens, size) for size in sizes]
    expected = sparse_linear_reference(x, weight.t(), tau, list(itertools.accumulate(sizes)), bias, torch.float64)
    torch.testing.assert_close(torch.cat(pieces, dim=-1).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pieces[2].double(), bias[-3:].double().expand(tokens, -1))


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_few_token_products_read_each_input_in_one_product(family, kernels_on_cpu, monkeypatch):
    """Batch 2 on the GPU path (the sparse kernel runs at batch 1 only): q/k/v and gate/up, joined or fused, are
    one stacked masked product each, o and down one masked product: four products a layer, as at level 0, with
    the rule's logits."""
    model, ids = sparse_random_model(family)
    model.set_sparsity(0.5)
    kernels_on_cpu_tensors(False)
    reference = decode_logits(model, ids[:, :12])
    kernels_on_cpu_tensors(True)
    model.set_sparsity(0.5)
    products = []
    for name in ("stacked_masked_products", "masked_linear"):
        original = getattr(sparse_linear, name)
        monkeypatch.setattr(sparse_linear, name, lambda *a, _f=original, _n=name: products.append(_n) or _f(*a))
    with torch.no_grad():
        past = model(ids[:, :11], use_cache=True).past_key_values
        products.clear()
        step = model(ids[:, 11:12], past_key_values=past).logits
    torch.testing.assert_close(step, reference, rtol=1e-4, atol=1e-5)
    per_layer = ["stacked_masked_products", "masked_linear"] * 2
    assert products == per_layer * model.config.num_hidden_layers and not kernels_on_cpu


def test_stored_sparsities_pick_the_kernel_kind(kernels_on_cpu):
    """Each linear learns the share of channels its stored level keeps (it picks the GPU kernel's kind); a
    joined q/k/v or gate/up launch goes by its least sparse member; level 0 is dense."""
    model, _ = sparse_random_model("llama")
    model.config.winaconv["levels"]["0.5"]["sparsities"][0][PROJECTIONS.index("k")] = 0.9
    model.sparsity_settings = type(model.sparsity_settings).from_config(model.config)
    model.set_sparsity(0.5)
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.kept_percent == 10 and attention.q_proj.kept_percent == 50
    assert attention.o_proj.kept_percent == 50 and model.model.layers[1].self_attn.k_proj.kept_percent == 50
    assert max(m.kept_percent for m in attention.k_proj.shared_input_group.members) == 50
    model.set_sparsity(0)
    assert attention.k_proj.kept_percent == 100


def test_switching_levels_updates_joined_thresholds_in_place(kernels_on_cpu):
    model, ids = sparse_random_model("llama")
    model.set_sparsity(0.5)
    group = model._shared_input_groups[0]
    tau, weight_t = group.tau, group.weight_t
    at_half = decode_logits(model, ids[:1, :12])
    model.set_sparsity(0.25)
    assert group.tau is tau and group.weight_t is weight_t, "captured graphs keep reading the same tensors"
    at_quarter = decode_logits(model, ids[:1, :12])
    model.set_sparsity(0)
    dense = decode_logits(model, ids[:1, :12])
    model.set_sparsity(0.5)
    assert group.tau is tau
    torch.testing.assert_close(decode_logits(model, ids[:1, :12]), at_half)
    kernels_on_cpu_tensors(False)
    model.set_sparsity(0.25)
    torch.testing.assert_close(at_quarter, decode_logits(model, ids[:1, :12]), rtol=1e-4, atol=1e-5)
    model.set_sparsity(0)
    torch.testing.assert_close(dense, decode_logits(model, ids[:1, :12]))


def test_level_zero_runs_one_dense_product_per_shared_input(kernels_on_cpu, monkeypatch):
    """Dense on the GPU path: q/k/v and gate/up are one F.linear over the joined W^T (also after a dtype change),
    equal to the linears' own products; no kernel launch."""
    model, ids = sparse_random_model("qwen2")  # q/k/v biases are joined too
    kernels_on_cpu_tensors(False)
    model.set_sparsity(0)
    reference = decode_logits(model, ids[:1, :12])
    kernels_on_cpu_tensors(True)
    model.set_sparsity(0)
    products = []
    hand_out = sparse_linear.SharedInputGroup._hand_out
    monkeypatch.setattr(sparse_linear.SharedInputGroup, "_hand_out",
                        lambda group, *a: products.append(group) or hand_out(group, *a))
    group = model._shared_input_groups[0]
    assert group.joined and not group.is_fused
    k_weight = model.model.layers[0].self_attn.k_proj.weight
    assert k_weight.untyped_storage().data_ptr() == group.weight_t.untyped_storage().data_ptr()  # a view of it
    kernels_on_cpu.clear()
    torch.testing.assert_close(decode_logits(model, ids[:1, :12]), reference)
    layers = model.config.num_hidden_layers
    assert not kernels_on_cpu and len(products) == 2 * 2 * layers, "prefill and one step: 2 products per layer each"
    model.to(torch.float64)
    assert group.joined and group.weight_t.dtype == torch.float64
    torch.testing.assert_close(decode_logits(model, ids[:1, :12]), reference.double(), rtol=1e-4, atol=1e-5)


def test_joined_weights_survive_a_dtype_change(kernels_on_cpu):
    model, ids = sparse_random_model("qwen2")  # q/k/v biases are joined too
    model.set_sparsity(0.5)
    model.to(torch.float64)
    group = model._shared_input_groups[0]
    assert group.is_fused and group.weight_t.dtype == torch.float64
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.data_ptr() == group.weight_t.data_ptr() and q_proj.bias.dtype == torch.float64
    fused = decode_logits(model, ids[:1, :12])
    kernels_on_cpu_tensors(False)
    torch.testing.assert_close(fused, decode_logits(model, ids[:1, :12]))


@pytest.mark.parametrize("batch", [1, 2])  # the sparse kernel, the stacked masked products
def test_decode_step_compiles_without_graph_breaks(kernels_on_cpu, batch):
    model, ids = sparse_random_model("llama")
    model.set_sparsity(0.5)
    with torch.no_grad():
        past = model(ids[:batch, :11], use_cache=True).past_key_values
        eager = model(ids[:batch, 11:12], past_key_values=copy.deepcopy(past)).logits
        step = torch.compile(lambda token, cache: model(token, past_key_values=cache).logits, backend="eager",
                             fullgraph=True)
        compiled = step(ids[:batch, 11:12], copy.deepcopy(past))
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("family", ["llama", "mistral", "phi3", "qwen3"])
@pytest.mark.parametrize("level", [0, 0.5])
def test_greedy_decoder_gives_generates_tokens(family, level):
    model, ids = sparse_random_model(family, method="teal")
    model.set_sparsity(level)
    prompt = ids[:, :10]  # batch of 2; mistral's sliding window (8) is passed
    expected = GenerationMixin.generate(model, prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12,
                              do_sample=False, pad_token_id=0)
    decoder = GreedyDecoder(model, max_length=32, batch_size=2)
    assert torch.equal(decoder.generate(prompt, 12), expected)
    assert torch.equal(decoder.generate(prompt, 12), expected), "a second call starts from a clean cache"


def test_greedy_decoder_on_the_real_model(converted_smollm2, smollm2_folder):
    from transformers import AutoTokenizer

    folder = converted_smollm2("wina", "pca")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32, sparsity=0.25)
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    expected = GenerationMixin.generate(model, prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                              min_new_tokens=8)
    tokens = GreedyDecoder(model, max_length=64).generate(prompt, 8)
    assert torch.equal(tokens, expected)
    assert "Paris" in tokenizer.decode(tokens[0, prompt.shape[1]:])


def test_greedy_decoder_rejects_what_it_cannot_do():
    model, ids = sparse_random_model("llama", method="teal")
    decoder = GreedyDecoder(model, max_length=16, batch_size=1)
    with pytest.raises(ValueError, match="batch 1"):
        decoder.generate(ids[:, :4], 2)
    with pytest.raises(ValueError, match="max_length 16"):
        decoder.generate(ids[:1, :10], 7)
