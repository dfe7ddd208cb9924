"""The hybrid generation (Qwen3.5 dense and MoE, Qwen3-Next, Qwen3.5's multimodal
checkpoints' text path) against transformers, and the cache that carries its recurrent
state across turns."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import TINY, build_hybrid_reference, save_model_dir
from gguf import GGMLQuantizationType as T
from gguf_files import write_hybrid_gguf
from test_parity import (
    GREEDY,
    PROMPT,
    assert_logits_close,
    check_against_reference,
    reference_greedy,
)

from qwen3chat.config import SHAPE_FIELDS, ModelConfig
from qwen3chat.engine import Engine
from qwen3chat.errors import QwenChatError
from qwen3chat.generation import FinishEvent
from qwen3chat.loading import load_model
from qwen3chat.model.gated_delta_net import chunked_delta_rule, recurrent_delta_rule

KINDS = ["dense", "moe", "next", "multimodal"]


@pytest.fixture(scope="module", params=KINDS)
def hybrid_dir(request, tmp_path_factory, tokenizer_dir):
    reference = build_hybrid_reference(request.param, seed=KINDS.index(request.param))
    path = save_model_dir(reference, tmp_path_factory.mktemp(request.param), tokenizer_dir)
    return path, reference


def assert_as_exact_as_transformers(logits, ref_logits, reference):
    """Each step's logits within 1e-4 (of the largest) of the exact ones (3e-4 with
    experts), or at least as close as transformers' own float32 run: the exact ones are
    the float64 reference's over the same ids. (These decisive random weights amplify
    float32 rounding: with experts the residual stream runs ~20x larger, and either float32
    run can be 3e-4 off. On an Intel Xeon whose VM hides AVX512-BF16, Qwen3-Next's step 24
    was 2.2e-4 off through the native kernels and the torch path alike, transformers'
    1.1e-5, its worst step 6.7e-5.)"""
    ids = PROMPT + reference_greedy(reference, PROMPT, len(logits))[0]
    exact_model = copy.deepcopy(reference).double()
    exact_model.config._experts_implementation = "eager"  # the grouped one takes no float64
    with torch.no_grad():
        exact = exact_model(torch.tensor([ids])).logits[0, len(PROMPT) - 1 : -1]
    scale = exact.abs().amax(-1)
    ours = ((logits.double() - exact).abs().amax(-1) / scale).max()
    theirs = ((ref_logits.double() - exact).abs().amax(-1) / scale).max()
    floor = 3e-4 if getattr(reference.config, "num_experts", 0) else 1e-4
    assert ours <= max(floor, 1.5 * theirs), f"error {ours:.2g}, transformers' {theirs:.2g}"


def test_every_step_matches_transformers(hybrid_dir):
    """40 greedy steps: the same ids (check_against_reference) and exact logits."""
    path, reference = hybrid_dir
    logits, ref_logits = check_against_reference(path, reference)
    assert_as_exact_as_transformers(logits, ref_logits, reference)


@pytest.mark.parametrize("chunk_size", [1, 5])
def test_chunked_prefill_matches(hybrid_dir, chunk_size):
    path, reference = hybrid_dir
    logits, ref_logits = check_against_reference(path, reference, {"chunk_size": chunk_size})
    assert_as_exact_as_transformers(logits, ref_logits, reference)


def test_prompt_longer_than_a_delta_rule_chunk(tmp_path, tokenizer_dir):
    """150 tokens: the chunked rule scans three chunks, carrying the state between them."""
    reference = build_hybrid_reference("dense", seed=7)
    path = save_model_dir(reference, tmp_path / "m", tokenizer_dir)
    loaded = load_model(path, device="cpu", dtype="float32")
    ids = (PROMPT * 13)[:150]
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0]
    ours = Engine(loaded.model, loaded.tokenizer, max_seq_len=256).score(ids)
    assert_logits_close(ours, ref)


def test_recurrent_rule_equals_chunked_rule_from_a_state():
    """The decode step's form, token by token, against the prompt's chunked form, both
    starting from the same nonzero state and over more than one chunk."""
    torch.manual_seed(0)
    shape = (1, 3, 70)
    q = torch.randn(*shape, 8) * 0.3
    k = torch.nn.functional.normalize(torch.randn(*shape, 8), dim=-1)
    v = torch.randn(*shape, 5)
    beta, g = torch.rand(shape), -torch.rand(shape)
    start = torch.randn(1, 3, 8, 5)
    chunked_state, stepped_state = start.clone(), start.clone()
    chunked = chunked_delta_rule(q, k, v, beta, g, chunked_state)
    steps = [
        recurrent_delta_rule(*(t[:, :, i : i + 1] for t in (q, k, v, beta, g)), stepped_state)
        for i in range(shape[2])
    ]
    torch.testing.assert_close(chunked, torch.cat(steps, dim=2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked_state, stepped_state, atol=1e-5, rtol=1e-5)


def _reply(engine, prompt, steps=6):
    events = list(engine.generate(prompt, steps, GREEDY))
    finish = events[-1]
    assert isinstance(finish, FinishEvent)
    return finish


def test_later_turns_reuse_the_state_and_prefill_only_what_is_new(tmp_path, tokenizer_dir):
    """Three turns: the second continues the first's reply (the live state), the third
    rewrites the second's reply, as a template that drops the thinking does, so it
    starts from the checkpoint taken at the end of the second prompt. Each turn's ids
    equal a fresh engine's over the whole conversation."""
    reference = build_hybrid_reference("dense", seed=3)
    path = save_model_dir(reference, tmp_path / "m", tokenizer_dir)
    loaded = load_model(path, device="cpu", dtype="float32")
    loaded.tokenizer.stop_ids = []
    engine = Engine(loaded.model, loaded.tokenizer, max_seq_len=256)
    user, end = [872, 198, 9707, 11, 1879, 0], [151645, 198, 151644, 77091, 198]

    first = PROMPT
    reply1 = _reply(engine, first)
    second = first + reply1.token_ids + end + user + end
    reply2 = _reply(engine, second)
    # The live state held everything fed: the first prompt and all but the last reply id.
    assert reply2.timings.prefill_tokens == len(second) - (len(first) + len(reply1.token_ids) - 1)
    third = second + [9707] * 4 + end + user + end  # not reply2: the state must go back
    reply3 = _reply(engine, third)
    assert reply3.timings.prefill_tokens == len(third) - len(second)

    for prompt, reply in ((second, reply2), (third, reply3)):
        fresh = Engine(loaded.model, loaded.tokenizer, max_seq_len=256)
        assert _reply(fresh, prompt).token_ids == reply.token_ids


def test_an_interrupted_pass_is_never_reused(tmp_path, tokenizer_dir):
    """A pass that moved the states on but did not finish: only the checkpoint (or
    nothing) is offered again, and the next reply equals a fresh engine's."""
    reference = build_hybrid_reference("dense", seed=4)
    path = save_model_dir(reference, tmp_path / "m", tokenizer_dir)
    loaded = load_model(path, device="cpu", dtype="float32")
    loaded.tokenizer.stop_ids = []
    engine = Engine(loaded.model, loaded.tokenizer, max_seq_len=256)
    _reply(engine, PROMPT)
    cache = engine.cache
    held = len(cache)
    cache.linear_state(0, held, 3)  # what a pass does first, then it is interrupted
    longer = cache.tokens + [9707] * 3
    assert cache.common_prefix(longer) == len(PROMPT)  # the checkpoint, not the live state
    prompt = [*longer, 151645, 198]
    assert (
        _reply(engine, prompt).token_ids
        == _reply(Engine(loaded.model, loaded.tokenizer, max_seq_len=256), prompt).token_ids
    )


def test_config_defaults_and_errors():
    raw = {
        "architectures": ["Qwen3NextForCausalLM"],
        **{k: v for k, v in TINY.items() if k in SHAPE_FIELDS},
        "num_hidden_layers": 8,
        "full_attention_interval": 4,
        "head_dim": 256,
    }
    config = ModelConfig.from_hf_dict(raw)
    assert config.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 2
    assert config.rotary_dim == 64  # transformers' default quarter
    config.validate()
    bad = {**raw, "layer_types": ["linear_attention"] * 7 + ["sliding_window"]}
    with pytest.raises(QwenChatError, match="layer_types has 'sliding_window'"):
        ModelConfig.from_hf_dict(bad).validate()
    short = {**raw, "layer_types": ["full_attention"] * 3}
    with pytest.raises(QwenChatError, match="layer_types lists 3 layers"):
        ModelConfig.from_hf_dict(short).validate()
    heads = {**raw, "linear_num_key_heads": 3, "linear_num_value_heads": 4}
    with pytest.raises(QwenChatError, match="linear_num_value_heads"):
        ModelConfig.from_hf_dict(heads).validate()


def test_turns_through_the_qwen3_5_template_prefill_only_what_is_new(tmp_path, tokenizer_dir):
    """Qwen3.5's template ends a prompt with ``<think>\\n`` and renders a past reply
    without it, so the next prompt parts from this one inside the last turn's header: the
    checkpoint before that header is what a new turn starts from."""
    reference = build_hybrid_reference("dense", seed=5)
    path = save_model_dir(reference, tmp_path / "m", tokenizer_dir)
    (path / "tokenizer_config.json").unlink()  # no template of its own: the family's
    loaded = load_model(path, device="cpu", dtype="float32")
    tokenizer = loaded.tokenizer
    assert "<function=" in tokenizer.chat_template  # Qwen3.5's, not Qwen3's
    engine = Engine(loaded.model, tokenizer, max_seq_len=512)
    messages = [{"role": "system", "content": "Be brief."}]
    previous = None
    for question in ("Hello there", "And then?", "Why so?"):
        messages.append({"role": "user", "content": question})
        prompt = tokenizer.encode_chat(messages)
        reply = _reply(engine, prompt)
        if previous is not None:
            # What is new: the last header (3 ids) and the prompt's own tail after it.
            header = max(
                i for i, t in enumerate(previous) if t == tokenizer.token_id("<|im_start|>")
            )
            assert prompt[:header] == previous[:header]
            assert reply.timings.prefill_tokens == len(prompt) - header
            fresh = Engine(loaded.model, tokenizer, max_seq_len=512)
            assert _reply(fresh, prompt).token_ids == reply.token_ids
        text = tokenizer.decode(reply.token_ids)
        messages.append({"role": "assistant", "content": f"<think>\nhm\n</think>\n\n{text}"})
        previous = prompt


@pytest.mark.parametrize("kind", ["dense", "moe", "next"])
@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_gguf_as_llama_cpp_writes_it_reads_back(
    tmp_path, tokenizer_dir, kind, qtype, torch_matmuls
):
    """qwen35 (value heads tiled), qwen35moe and qwen3next files, read back: the same
    logits as transformers holding the file's weights (exact types: the same greedy ids
    too, and within float tolerance)."""
    reference = build_hybrid_reference(kind, seed=11)
    path = tmp_path / f"{kind}.gguf"
    stored = write_hybrid_gguf(reference, tokenizer_dir, path, qtype)
    reference.load_state_dict(stored, strict=False)
    loaded = load_model(path, device="cpu", dtype="float32")
    assert loaded.config.linear_value_heads_tiled == (kind != "next")
    engine = Engine(loaded.model, loaded.tokenizer, max_seq_len=128)
    with torch.no_grad():
        ref = reference(torch.tensor([PROMPT])).logits[0]
    assert_logits_close(engine.score(PROMPT), ref, rtol=1e-4 if qtype != T.Q4_0 else 2e-3)
    loaded.tokenizer.stop_ids = []
    ref_ids, _ = reference_greedy(reference, PROMPT, 12)
    assert (
        _reply(Engine(loaded.model, loaded.tokenizer, max_seq_len=128), PROMPT, 12).token_ids
        == ref_ids
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("steps", [1, 150])
@pytest.mark.parametrize("head_dim", [16, 112])
def test_native_delta_step_equals_the_torch_step(
    dtype, tiled, steps, head_dim, monkeypatch, row_kernels
):
    """The kernel's steps of a Gated DeltaNet layer (conv, rule, gated norm) against the
    torch code, from the same nonzero states: outputs and both states. A decode step's one
    token, and a prompt's 150 (three of the kernel's blocks of tokens; the torch code's
    chunked rule over three chunks). Heads of 16 values (one vector of AVX-512's), and of
    112 (a full strip of four vectors and a short one, in either form)."""
    from qwen3chat import kernels
    from qwen3chat.loading import random_model
    from qwen3chat.presets import preset_config

    config = dataclasses.replace(
        preset_config("tiny-hybrid"), linear_key_head_dim=head_dim, linear_value_head_dim=head_dim
    )
    model = random_model(config, dtype, torch.device("cpu"))
    layer = model.layers[0].linear_attn
    layer.tiled = tiled
    torch.manual_seed(0)
    with torch.no_grad():
        layer.A.copy_(-torch.rand(layer.num_v_heads) * 2)
        layer.conv1d.weight.normal_(0, 0.5)
    x = torch.randn(1, steps, model.config.hidden_size, dtype=dtype)
    conv = torch.randn(1, layer.conv_dim, 3, dtype=dtype)
    delta = torch.randn(1, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim)

    def step():
        states = type("States", (), {})()
        states.conv, states.delta = conv.clone(), delta.clone()
        states.linear_state = lambda layer, start, count: (states.conv, states.delta)
        with torch.no_grad():
            return layer(x, states, 5), states.conv, states.delta

    native = step()
    monkeypatch.setattr(kernels, "native", lambda x: None)
    reference = step()
    tolerance = (
        {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    )
    for ours, theirs in zip(native, reference, strict=True):
        torch.testing.assert_close(ours.float(), theirs.float(), **tolerance)


def test_native_delta_step_runs_each_row_on_its_own_slot(monkeypatch):
    """The server's decode step: rows on scattered slots of the state pools (run in
    parallel) each equal the torch step on that slot; other slots stay as they were, and
    two rows on one slot are refused."""
    from qwen3chat import kernels
    from qwen3chat.loading import load_preset
    from qwen3chat.model import native

    model = load_preset("tiny-hybrid", device="cpu", dtype="float32").model
    layer = model.layers[0].linear_attn
    torch.manual_seed(0)
    with torch.no_grad():
        layer.A.copy_(-torch.rand(layer.num_v_heads) * 2)
        layer.conv1d.weight.normal_(0, 0.5)
        proj = layer.in_proj(torch.randn(3, 1, model.config.hidden_size))
    conv = torch.randn(4, layer.conv_dim, 3)
    delta = torch.randn(4, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim)
    slots = torch.tensor([2, 0, 3])
    ours = conv.clone(), delta.clone()
    out = native.gated_delta_step(proj, layer, *ours, slots)
    assert out is not None
    with pytest.raises(RuntimeError, match="taken twice"):
        native.gated_delta_step(proj, layer, *ours, torch.tensor([1, 1, 3]))
    monkeypatch.setattr(kernels, "native", lambda x: None)
    theirs = conv.clone(), delta.clone()
    with torch.no_grad():
        for row, slot in enumerate(slots.tolist()):
            views = (t[slot : slot + 1] for t in theirs)
            expected = layer.mix(proj[row : row + 1], *views)
            torch.testing.assert_close(out[row], expected[0], atol=1e-5, rtol=1e-5)
    for mine, reference, start in zip(ours, theirs, (conv, delta), strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)
        assert torch.equal(mine[1], start[1])


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantize_at_load_keeps_what_must_stay_float(hybrid_dir, quantize):
    """--quantize on a hybrid checkpoint: the projections become integer codes (each
    fused part's rows where they belong: the codes dequantize to the float weights within
    the format's rounding), while the conv, the decay rate and time-step bias (float32) and
    the routers stay as they were. (These chaotic tiny models turn any weight error into
    large logit changes, so the check is on the weights.)"""
    from qwen3chat.quant import QuantizedWeight

    path, _ = hybrid_dir
    exact = load_model(path, device="cpu", dtype="float32").model
    model = load_model(path, device="cpu", dtype="float32", quantize=quantize).model
    linear, exact_linear = model.layers[0].linear_attn, exact.layers[0].linear_attn
    bound = 0.01 if quantize == "int8" else 0.15
    for name in ("in_proj", "out_proj"):
        weight = getattr(linear, name).weight
        assert isinstance(weight, QuantizedWeight)
        expected = getattr(exact_linear, name).weight
        error = (weight.matrix().dequantize() - expected).norm() / expected.norm()
        assert error < bound, (name, error)
    assert isinstance(linear.conv1d.weight, torch.nn.Parameter)
    assert torch.equal(linear.conv1d.weight, exact_linear.conv1d.weight)
    assert linear.A.dtype == linear.dt_bias.dtype == torch.float32
    for module in model.modules():
        if hasattr(module, "shared_expert_gate"):
            assert isinstance(module.gate.weight, torch.nn.Parameter)
            assert isinstance(module.shared_expert_gate.weight, torch.nn.Parameter)
