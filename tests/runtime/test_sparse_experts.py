"""Mixture-of-experts families (docs/moe.md): lossless at level 0, the sparse experts equal to a float64 masked
reference on every path, streamed conversion equal to the in-memory one and resumable, generate() equal to
transformers' static-cache loop, and the one-line refusals."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationMixin

from winaconv.convert import ConvertOptions, convert
from winaconv.convert.calibrate import uniform_levels
from winaconv.convert.runtime_model import to_runtime_model, winaconv_section
from winaconv.errors import WinaconvError
from winaconv_runtime.architectures import PROJECTIONS, UnsupportedArchitecture, family_for_model_type, parameter_shares
from winaconv_runtime.checkpoint_format import CheckpointFormatError, section_problems
from winaconv_runtime.sparse_experts import gathered_experts, grouped_masked_experts, masked_experts

from models import MOE_FAMILIES, moe_folder, random_moe
from support import reference_experts

REPO = Path(__file__).resolve().parents[2]
SHAPES = [(1, 1), (1, 3), (3, 9)]  # (batch, tokens): decode, a few tokens, prefill


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny products: on a shared 2-core host every op torch splits across threads waited ~20 ms for the second
    one (a conversion took 15 s instead of 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sparse_model(family, level=0.5, dtype=torch.float32):
    base = random_moe(family, dtype=dtype)
    model, runtime_family = to_runtime_model(base, winaconv_section("wina", "none", PROJECTIONS))
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    uniform_levels(model, runtime_family, ids, [level], norm_scored=PROJECTIONS)
    model.set_sparsity(level)
    return base, model


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_level_0_is_the_base_model(family):
    base = random_moe(family)
    model, _ = to_runtime_model(copy.deepcopy(base), winaconv_section("wina", "none", PROJECTIONS))
    ids = torch.randint(3, 250, (2, 11), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(ids).logits, base(ids).logits)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_sparse_experts_equal_the_float64_reference_on_every_path(family):
    _, model = sparse_model(family)
    experts = model.model.layers[1].mlp.experts
    g = torch.Generator().manual_seed(3)
    for tokens in (1, 2, 7, 20):
        x = torch.randn(tokens, model.config.hidden_size, generator=g)
        scores = torch.rand(tokens, experts.num_experts, generator=g)
        weights, index = scores.topk(2, dim=-1)
        reference = reference_experts(x, index, weights, experts.gate_up_proj.detach(), experts.down_proj.detach(),
                                      experts.winaconv_tau_gate_up, experts.winaconv_tau_down, experts.act_fn)
        for path in (gathered_experts, masked_experts, grouped_masked_experts, type(experts).forward):
            out = path(experts, x, index, weights)
            assert (out.double() - reference).abs().max() < 1e-5 * reference.abs().max(), (path, tokens)
    # some channels are really dropped, and in every expert
    assert (experts.winaconv_tau_gate_up.isfinite() & (experts.winaconv_tau_gate_up > 0)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_prefill_in_chunks_equals_the_reference(monkeypatch, dtype):
    """The grouped masked path cut into chunks of 6 pairs (some experts get no pair in a chunk) against the float64
    reference, and the dispatch takes it for a prefill-sized batch."""
    from winaconv_runtime import sparse_experts

    _, model = sparse_model("qwen3_moe", dtype=dtype)
    experts = model.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(4)
    x = torch.randn(23, model.config.hidden_size, generator=g).to(dtype)
    weights, index = torch.rand(23, experts.num_experts, generator=g).topk(2, dim=-1)
    reference = reference_experts(x, index, weights, experts.gate_up_proj.detach(), experts.down_proj.detach(),
                                  experts.winaconv_tau_gate_up, experts.winaconv_tau_down, experts.act_fn)
    monkeypatch.setattr(sparse_experts, "GROUPED_CHUNK_PAIRS", 6)
    assert sparse_experts.grouped_products_supported(experts, x)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    chunked = grouped_masked_experts(experts, x, index, weights)
    assert (chunked.double() - reference).abs().max() < tolerance * reference.abs().max()
    calls = []
    monkeypatch.setattr(sparse_experts, "masked_experts", lambda *args: calls.append(args))
    assert torch.equal(type(experts).forward(experts, x, index, weights), chunked) and not calls


def test_gather_crossover_is_measured_once_per_shape_and_routes_decode(monkeypatch):
    """The experts' own paths are timed once per (shape, top_k, dtype, threads); a crossover of 0 sends decode to
    the grouped masked path, one of 1 to the row gather, and both give the reference's output."""
    from winaconv_runtime import cpu_kernels, sparse_experts

    monkeypatch.setattr(cpu_kernels, "GATHER_MODE", "auto")
    monkeypatch.setattr(sparse_experts, "_crossovers", {})
    measured = []
    real_measure = sparse_experts.measure_gather_crossover
    monkeypatch.setattr(sparse_experts, "measure_gather_crossover", lambda *a: measured.append(a) or real_measure(*a))
    _, model = sparse_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    crossover = sparse_experts.gather_crossover(experts, 2, torch.float32)
    assert 0.0 <= crossover <= 1.0
    assert sparse_experts.gather_crossover(experts, 2, torch.float32) == crossover and len(measured) == 1
    sparse_experts.gather_crossover(experts, 2, torch.bfloat16)
    assert len(measured) == 2

    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, model.config.hidden_size, generator=g)
    weights, index = torch.rand(1, experts.num_experts, generator=g).topk(2, dim=-1)
    reference = reference_experts(x, index, weights, experts.gate_up_proj.detach(), experts.down_proj.detach(),
                                  experts.winaconv_tau_gate_up, experts.winaconv_tau_down, experts.act_fn)
    calls = []
    for name in ("gathered_experts", "grouped_masked_experts"):
        real = getattr(sparse_experts, name)
        monkeypatch.setattr(sparse_experts, name, lambda *a, _name=name, _real=real: calls.append(_name) or _real(*a))
    key = (model.config.hidden_size, experts.down_proj.shape[-1], 2, torch.float32, torch.get_num_threads())
    for crossover, path in ((0.0, "grouped_masked_experts"), (1.0, "gathered_experts")):
        sparse_experts._crossovers[key] = crossover
        calls.clear()
        out = type(experts).forward(experts, x, index, weights)
        assert calls == [path]
        assert (out.double() - reference).abs().max() < 1e-5 * reference.abs().max()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_sparse_model_equals_its_float64_copy(family):
    """The whole model at 50%: float32 (row gather at decode sizes, masked loop above) against the same thresholds
    in float64 (masked products throughout)."""
    _, model = sparse_model(family)
    reference = copy.deepcopy(model).double()
    reference.set_sparsity(0.5)
    for batch, tokens in SHAPES:
        ids = torch.randint(3, 250, (batch, tokens), generator=torch.Generator().manual_seed(tokens))
        out, ref = model(ids).logits.double(), reference(ids).logits
        assert (out - ref).abs().max() < 1e-4 * ref.abs().max(), (batch, tokens)
    sparse = model(ids).logits
    model.set_sparsity(0)
    assert not torch.allclose(sparse, model(ids).logits, atol=1e-3)  # the level really drops channels


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_generate_equals_transformers_static_cache_loop(family):
    _, model = sparse_model(family)
    prompt = torch.randint(3, 250, (1, 7), generator=torch.Generator().manual_seed(5))
    ids = torch.randint(3, 250, (3, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    for inputs, attention in ((prompt, torch.ones_like(prompt)), (ids, mask)):
        kwargs = dict(attention_mask=attention, max_new_tokens=10, do_sample=False, pad_token_id=0)
        expected = GenerationMixin.generate(model, inputs, cache_implementation="static", **kwargs)
        assert torch.equal(model.generate(inputs, **kwargs), expected)


def _options(source, out, **options) -> dict:
    values = dict(model=str(source), out=str(out), method="wina", calib_file=str(source.parent / "calib.txt"),
                  device="cpu", calib_tokens=128, seq_len=32, greedy_tokens=32, greedy_step=0.1,
                  sparsity_levels=(0.5,), default_sparsity=0.5, max_shard_size="100KB")
    return {**values, **options}


def _convert(source, out, **options):
    return convert(ConvertOptions(**_options(source, out, **options)), say=lambda m: None)


# a conversion killed (no cleanup, as SIGKILL) once its journal holds the first layer
_KILLED_AFTER_FIRST_LAYER = """
import json, os, sys
import torch
from winaconv.convert import ConvertOptions, calibrate, convert
torch.set_num_threads(1)
original = calibrate.Calibrator.layer
def layer(self, index, decoder_layer):
    if index == 1:
        os._exit(9)
    return original(self, index, decoder_layer)
calibrate.Calibrator.layer = layer
convert(ConvertOptions(**json.loads(sys.argv[1])), say=lambda m: None)
"""


def _same_checkpoint(a, b):
    from safetensors.torch import load_file

    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    tensors = [{}, {}]
    for folder, into in zip((a, b), tensors):
        for shard in sorted(folder.glob("*.safetensors")):
            into.update(load_file(shard))
    assert sorted(tensors[0]) == sorted(tensors[1])
    assert all(torch.equal(t, tensors[1][n]) for n, t in tensors[0].items())


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_streamed_conversion_equals_in_memory_and_loads(tmp_path, family):
    source = moe_folder(tmp_path, family)
    _convert(source, tmp_path / "streamed")
    _convert(source, tmp_path / "whole", in_memory=True)
    _same_checkpoint(tmp_path / "streamed", tmp_path / "whole")
    section = json.loads((tmp_path / "streamed" / "config.json").read_text())["winaconv"]
    assert section["format_version"] == 2 and section["experts"]["count"] == 5
    assert section_problems(section, 3) == []
    assert len({tuple(row) for row in section["levels"]["0.5"]["expert_thresholds"][0]}) == 1  # pooled: one for all
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", trust_remote_code=True)
    assert model.sparsity == 0.5 and model.model.layers[0].mlp.experts.winaconv_tau_down is not None
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)


def test_killed_conversion_resumes_to_the_same_checkpoint(tmp_path):
    source = moe_folder(tmp_path, "qwen2_moe")
    _convert(source, tmp_path / "whole")
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_FIRST_LAYER,
                             json.dumps(_options(source, tmp_path / "resumed"))], cwd=REPO, capture_output=True)
    assert killed.returncode == 9, killed.stderr.decode()[-2000:]
    assert not (tmp_path / "resumed").exists()
    assert _convert(source, tmp_path / "resumed").resumed_layers == 1
    _same_checkpoint(tmp_path / "resumed", tmp_path / "whole")


@pytest.mark.parametrize("rule", ["own", "shrink"])
def test_expert_rules_other_than_the_default_convert(tmp_path, rule):
    source = moe_folder(tmp_path, "olmoe")
    _convert(source, tmp_path / rule, expert_calibration=rule)
    section = json.loads((tmp_path / rule / "config.json").read_text())["winaconv"]
    assert section["calibration"]["expert_calibration"] == rule
    table = section["levels"]["0.5"]["expert_thresholds"][0]
    assert len({tuple(row) for row in table}) > 1  # each expert its own grid (pooled: one for all)


def test_rotations_and_gpt_oss_are_refused_in_one_line(tmp_path):
    source = moe_folder(tmp_path, "mixtral")
    with pytest.raises(WinaconvError, match=r"transform 'pca' is not available for mixtral \(.*router") as error:
        _convert(source, tmp_path / "out", transform="pca")
    assert "\n" not in str(error.value)
    with pytest.raises(UnsupportedArchitecture, match="gpt_oss is not supported: .*MXFP4"):
        family_for_model_type("gpt_oss")


def test_format_versions(tmp_path):
    _, model = sparse_model("qwen3_moe")
    section = copy.deepcopy(model.config.winaconv)
    assert section_problems(section, 3, for_loading=True) == []
    dense_reader_view = {k: v for k, v in section.items() if k != "experts"}
    dense_reader_view["format_version"] = 1
    config = copy.deepcopy(model.config)
    config.winaconv = dense_reader_view
    with pytest.raises(CheckpointFormatError, match="needs the format-2 experts tables for 5 experts"):
        type(model)(config)
    broken = copy.deepcopy(section)
    broken["levels"]["0.5"]["expert_thresholds"][0].pop()
    assert section_problems(broken, 3, for_loading=True) == [
        "level 0.5 expert_thresholds must be 3 layers x 5 experts x 3 finite numbers >= 0"]
    mislabelled = dict(section, format_version=1)
    assert section_problems(mislabelled, 3, for_loading=True) == [
        "experts are declared but format_version is 1, not 2"]


def test_active_byte_shares_count_the_routed_and_shared_experts():
    from models import moe_config

    config = moe_config("qwen2_moe")
    shares = parameter_shares(config)
    hidden, heads = config.hidden_size, config.num_attention_heads
    attention = 2 * hidden * hidden + 2 * hidden * (hidden // heads) * config.num_key_value_heads
    expert_kind = (2 * 48 + 80) * hidden  # top-2 routed experts of width 48 and the shared expert of width 80
    assert shares["gate"] == pytest.approx(expert_kind / (attention + 3 * expert_kind))
    assert sum(shares.values()) == pytest.approx(1.0)
