"""The core model against stock transformers Llama, the KV cache against the full forward, and sharing."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from fixtures import llama3_scaling
from mobillama.config import ModelConfig, get_preset
from mobillama.convert.to_llama import llama_config
from mobillama.model import KVCache, MobiLlama, causal_lm_loss

TOL = 1e-4
# Parity with stock transformers, relative to the largest logit. On a realistic-scale model (max |logit|
# ~14, see tests/conftest.py) float32 reordering gives at most ~2e-6 over 64 tokens; a 10% error in the
# rotary base gives ~0.06 and a norm epsilon of 1e-6 or 1e-4 instead of 1e-5 gives ~0.04 and ~0.3.
PARITY = 1e-5
# bf16 against float32, same measure: ~0.03 on the realistic model (bf16 keeps 8 bits of mantissa).
BF16 = 0.06


def stock_llama_like(model: MobiLlama) -> LlamaForCausalLM:
    """A transformers LlamaForCausalLM carrying the same weights; shared FFNs stay shared objects."""
    c = model.config
    config = llama_config(c, torch.float32)
    config._attn_implementation = "eager"
    llama = LlamaForCausalLM(config).eval()
    layers = llama.model.layers
    for i in range(c.num_hidden_layers):
        first = c.ffn_groups[c.ffn_index(i)][0]
        layers[i].mlp = layers[first].mlp  # one LlamaMLP object per FFN group, as in MobiLlama
    state = {}
    for k, v in model.state_dict().items():
        if ".ffns." in k:
            g, rest = k.split(".ffns.")[1].split(".", 1)
            state[f"model.layers.{c.ffn_groups[int(g)][0]}.mlp.{rest}"] = v
        else:
            state[k] = v
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(".mlp." in k for k in missing)  # aliases of the shared MLP, already filled
    return llama


@pytest.mark.parametrize("sharing", ["none", "all", "group:2", "dedicated:1+group:2"])
def test_logits_match_stock_llama(sharing, realistic_model, rel_err):
    cfg = get_preset("micro").replace(ffn_sharing=sharing)
    model = realistic_model(cfg)
    llama = stock_llama_like(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), llama(ids).logits
    print(
        f"{sharing}: max |logit| {theirs.abs().max().item():.3g}, relative error {rel_err(ours, theirs):.3g}"
    )
    assert theirs.abs().max().item() > 5  # the scale the tolerance was measured at
    assert rel_err(ours, theirs) <= PARITY


def test_logits_match_stock_llama_with_left_padding(realistic_model, rel_err):
    cfg = get_preset("micro").replace(num_key_value_heads=4)
    model = realistic_model(cfg)
    llama = stock_llama_like(model)
    ids = torch.randint(3, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = llama(ids, attention_mask=mask).logits
    real = mask.bool()
    print(f"left padding: relative error {rel_err(ours[real], theirs[real]):.3g}")
    assert rel_err(ours[real], theirs[real]) <= PARITY


def test_shared_ffn_is_one_object_and_stored_once():
    cfg = get_preset("micro")
    model = MobiLlama(cfg)
    ffn_keys = [k for k in model.state_dict() if ".ffns." in k]
    assert ffn_keys == [
        "model.ffns.0.gate_proj.weight",
        "model.ffns.0.up_proj.weight",
        "model.ffns.0.down_proj.weight",
    ]
    assert not any(".mlp." in k for k in model.state_dict())
    assert len(MobiLlama(cfg.replace(ffn_sharing="none")).model.ffns) == cfg.num_hidden_layers


def test_shared_ffn_gradient_is_the_sum_of_per_layer_gradients(seeded_model):
    cfg = get_preset("micro").replace(ffn_sharing="all")
    shared = seeded_model(cfg).train()
    unshared = MobiLlama(cfg.replace(ffn_sharing="none")).train()
    state = shared.state_dict()
    for i in range(cfg.num_hidden_layers):  # copy the one FFN into every layer of the unshared model
        for part in ("gate_proj", "up_proj", "down_proj"):
            state[f"model.ffns.{i}.{part}.weight"] = state[f"model.ffns.0.{part}.weight"]
    unshared.load_state_dict(state)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    causal_lm_loss(shared(ids), ids).backward()
    causal_lm_loss(unshared(ids), ids).backward()
    for part in ("gate_proj", "up_proj", "down_proj"):
        summed = sum(getattr(unshared.model.ffns[i], part).weight.grad for i in range(cfg.num_hidden_layers))
        torch.testing.assert_close(
            getattr(shared.model.ffns[0], part).weight.grad, summed, rtol=1e-5, atol=1e-7
        )


@pytest.mark.parametrize("sharing", ["all", "none"])
def test_kv_cache_decode_equals_full_forward(sharing, seeded_model):
    cfg = get_preset("micro").replace(ffn_sharing=sharing)
    model = seeded_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache()
        steps = [model(ids[:, :5], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(5, 12)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= TOL


def test_kv_cache_chunked_prefill_equals_full_forward(seeded_model):
    cfg = get_preset("micro")
    model = seeded_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache()
        parts = [
            model(ids[:, :4], cache=cache),
            model(ids[:, 4:9], cache=cache),
            model(ids[:, 9:], cache=cache),
        ]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= TOL


def test_batched_left_padded_decode_equals_each_prompt_alone(seeded_model):
    cfg = get_preset("micro")
    model = seeded_model(cfg)
    prompts = [torch.randint(3, cfg.vocab_size, (n,)) for n in (7, 3)]
    continuation = torch.randint(3, cfg.vocab_size, (2, 4))
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = p
        mask[b, width - len(p) :] = 1
    with torch.no_grad():
        cache = KVCache()
        out = [model(ids, attention_mask=mask, cache=cache)[:, -1:]]
        for t in range(continuation.shape[1]):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            out.append(model(continuation[:, t : t + 1], attention_mask=mask, cache=cache))
        batched = torch.cat(out, dim=1)
        for b, p in enumerate(prompts):
            alone = model(torch.cat([p, continuation[b]])[None])[:, len(p) - 1 :]
            assert (batched[b] - alone[0]).abs().max().item() <= TOL


def test_bf16_forward_runs_and_stays_close(realistic_model, rel_err):
    cfg = get_preset("micro")
    model = realistic_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        low = model.to(torch.bfloat16)(ids).float()
    assert torch.isfinite(low).all()
    print(f"bf16: relative error {rel_err(low, ref):.3g}")
    assert rel_err(low, ref) < BF16


def test_tied_embeddings_share_the_tensor():
    model = MobiLlama(get_preset("micro").replace(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_init_std_is_point_zero_two():
    model = MobiLlama(
        ModelConfig(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    )
    std = model.model.layers[0].self_attn.q_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002
    assert torch.all(model.model.norm.weight == 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_bf16_forward_matches_cpu(realistic_model, rel_err):
    cfg = get_preset("micro")
    model = realistic_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        gpu = model.cuda().to(torch.bfloat16)(ids.cuda()).float().cpu()
    print(f"cuda bf16: relative error {rel_err(gpu, ref):.3g}")
    assert rel_err(gpu, ref) < BF16


def test_packed_segments_equal_each_sequence_alone(seeded_model):
    cfg = get_preset("micro")
    model = seeded_model(cfg)
    a, b, c = (torch.randint(0, cfg.vocab_size, (n,)) for n in (5, 3, 4))
    packed = torch.cat([a, b, c])[None]
    segments = torch.tensor([[0] * 5 + [1] * 3 + [2] * 4])
    with torch.no_grad():
        out = model(packed, segment_ids=segments)[0]
        alone = torch.cat([model(x[None])[0] for x in (a, b, c)])
    assert (out - alone).abs().max().item() <= TOL


def test_segment_ids_refuse_a_cache():
    model = MobiLlama(get_preset("micro"))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, cache=KVCache(), segment_ids=torch.zeros(1, 4, dtype=torch.long))


# --- RoPE scaling ---------------------------------------------------------------------------------------

ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    # original context 32 < the 64-token input: all three Llama 3 bands (kept, blended, slowed) are used
    "llama3": llama3_scaling(32),
}


def test_plain_rope_tables_are_unchanged():
    """No scaling is the formula the model always used, bit for bit."""
    from mobillama.model import rope_cos_sin, rope_inv_freq

    positions = torch.arange(300)[None]
    inv_freq = 1.0 / (5e5 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    emb = torch.cat([positions.float()[..., None] * inv_freq] * 2, dim=-1)
    cos, sin = rope_cos_sin(positions, 16, 5e5, torch.float32)
    assert torch.equal(rope_inv_freq(16, 5e5), inv_freq)
    assert torch.equal(cos, emb.cos()) and torch.equal(sin, emb.sin())
    assert all(
        torch.equal(a, b) for a, b in zip(rope_cos_sin(positions, 16, 5e5, torch.float32, None), (cos, sin))
    )


@pytest.mark.parametrize("kind", ["linear", "llama3"])
def test_rope_inv_freq_equals_transformers(kind):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mobillama.model import rope_inv_freq

    scaling = ROPE_SCALINGS[kind]
    cfg = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_parameters={**scaling, "rope_theta": 10000.0},
    )
    theirs, attention_factor = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    ours = rope_inv_freq(16, 10000.0, scaling)
    assert attention_factor == 1.0 and torch.equal(ours, theirs)
    plain = rope_inv_freq(16, 10000.0)
    if kind == "llama3":  # some frequencies kept, some divided by the factor, some blended
        ratio = plain / ours
        assert ratio[0] == 1.0 and ratio[-1] == 8.0 and ((ratio > 1.0) & (ratio < 8.0)).any()
    else:
        assert torch.equal(ours, plain / 4.0)


@pytest.mark.parametrize("kind", ["linear", "llama3"])
def test_logits_with_rope_scaling_match_stock_llama(kind, realistic_model, rel_err):
    cfg = get_preset("micro").replace(ffn_sharing="none", rope_scaling=ROPE_SCALINGS[kind])
    model = realistic_model(cfg)
    llama = stock_llama_like(model)  # llama_config carries the scaling as rope_parameters
    assert llama.config.rope_parameters["rope_type"] == kind
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    plain = realistic_model(cfg.replace(rope_scaling=None))
    with torch.no_grad():
        ours, theirs, unscaled = model(ids), llama(ids).logits, plain(ids)
    print(
        f"{kind}: relative error {rel_err(ours, theirs):.3g}, vs plain RoPE {rel_err(unscaled, theirs):.3g}"
    )
    assert rel_err(ours, theirs) <= PARITY
    assert rel_err(unscaled, theirs) > 100 * PARITY  # the scaling matters at this length
