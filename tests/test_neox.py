"""Our GPT-NeoX against transformers' on tiny random checkpoints that transformers saved itself."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import minirlhf
from minirlhf.generate import generate
from minirlhf.kernels import onednn_linear
from minirlhf.kernels.onednn_linear import PackedHead
from minirlhf.neox import KVCache
from tiny import hf_model, rewrite_config, save_hf

TOL = 1e-4

VARIANTS = {
    "parallel-rot0.25-untied": dict(use_parallel_residual=True, rotary_pct=0.25, tie_word_embeddings=False),
    "sequential-rot1.0-tied": dict(use_parallel_residual=False, rotary_pct=1.0, tie_word_embeddings=True),
    "parallel-rot1.0-tied-nobias": dict(use_parallel_residual=True, rotary_pct=1.0, tie_word_embeddings=True,
                                        attention_bias=False),
    "sequential-rot0.25-untied": dict(use_parallel_residual=False, rotary_pct=0.25, tie_word_embeddings=False),
}


def batch(vocab=160, B=3, T=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    # left padding: row 1 has 3 pads, row 2 has 7 pads
    for row, pads in ((1, 3), (2, 7)):
        ids[row, :pads] = 1
        mask[row, :pads] = 0
    return ids, mask


def hf_logits(model, ids, mask):
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits


def max_diff_real(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_transformers(tmp_path, variant):
    ref = save_hf(tmp_path, **VARIANTS[variant])
    ours = minirlhf.load_model(str(tmp_path))
    ids, mask = batch()
    with torch.no_grad():
        out = ours(ids, mask)
    assert max_diff_real(out.logits, hf_logits(ref, ids, mask), mask) < TOL
    # no padding at all, positions by default
    with torch.no_grad():
        assert (ours(ids[:1]).logits - ref(input_ids=ids[:1]).logits).abs().max() < TOL


def test_classic_pythia_config_form(tmp_path):
    ref = save_hf(tmp_path, rotary_pct=0.5, rotary_emb_base=500.0)
    assert ref.config.rope_parameters["rope_theta"] == 500.0

    def classic(c):
        rope = c.pop("rope_parameters")
        c.pop("attention_bias")
        c["rotary_pct"], c["rotary_emb_base"] = rope["partial_rotary_factor"], rope["rope_theta"]
        return c

    rewrite_config(tmp_path, classic)
    ours = minirlhf.load_model(str(tmp_path))
    assert ours.config.rotary_pct == 0.5 and ours.config.rotary_emb_base == 500.0
    ids, mask = batch()
    with torch.no_grad():
        assert max_diff_real(ours(ids, mask).logits, hf_logits(ref, ids, mask), mask) < TOL


def test_sharded_bf16_with_legacy_buffers(tmp_path):
    ref = hf_model(seed=3).to(torch.bfloat16)
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    # old Pythia checkpoints carry a causal-mask buffer, a fill value and RoPE frequencies
    first = tmp_path / shards[0]
    tensors = load_file(first)
    for i in range(2):
        p = f"gpt_neox.layers.{i}.attention."
        tensors[p + "bias"] = torch.tril(torch.ones(128, 128, dtype=torch.bool))[None, None]
        tensors[p + "masked_bias"] = torch.tensor(-1e9)
        tensors[p + "rotary_emb.inv_freq"] = torch.rand(2)
        for k in ("bias", "masked_bias", "rotary_emb.inv_freq"):
            index["weight_map"][p + k] = shards[0]
    save_file(tensors, first, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))

    ours = minirlhf.load_model(str(tmp_path))  # fp32 from bf16 on disk
    import transformers
    ref32 = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = batch()
    assert max_diff_real(ours(ids, mask).logits.detach(), hf_logits(ref32, ids, mask), mask) < TOL
    bf16 = minirlhf.load_model(str(tmp_path), dtype=torch.bfloat16)
    assert bf16.gpt_neox.embed_in.weight.dtype == torch.bfloat16
    assert torch.equal(bf16.embed_out.weight.float(), ours.embed_out.weight)


def test_kv_cache_step_by_step_equals_full_forward(tmp_path):
    save_hf(tmp_path, tokenizer=False)
    model = minirlhf.load_model(str(tmp_path))
    ids, mask = batch(T=12)
    with torch.no_grad():
        full = model(ids, mask).logits
        cache = KVCache(model.config, 3, 12)
        steps = [model(ids[:, :5], mask[:, :5], cache=cache).logits]  # a prompt chunk, then one at a time
        for t in range(5, 12):
            steps.append(model(ids[:, t:t + 1], mask[:, :t + 1], cache=cache).logits)
    assert max_diff_real(torch.cat(steps, 1), full, mask) < TOL


def test_logits_for_chosen_positions_and_hidden_states(tmp_path):
    ref = save_hf(tmp_path, tokenizer=False)
    model = minirlhf.load_model(str(tmp_path))
    ids, mask = batch()
    with torch.no_grad():
        out = model(ids, mask)
        part = model(ids, mask, logits_positions=slice(4, 9))
        h_ref = ref(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    output_hidden_states=True).hidden_states[-1]
    assert torch.equal(part.logits, out.logits[:, 4:9])
    assert max_diff_real(out.hidden_states, h_ref, mask) < TOL


def test_greedy_generation_equals_transformers(tmp_path):
    ref = save_hf(tmp_path, tokenizer=False)
    model = minirlhf.load_model(str(tmp_path))
    ids, mask = batch(T=9)
    tokens, resp_mask = generate(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 pad_token_id=1)
    assert tokens.shape == (3, 12) and resp_mask.all()
    for row in range(3):  # ours batched and left-padded; transformers one unpadded row at a time
        prompt = ids[row][mask[row].bool()][None]
        expected = ref.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=1,
                                min_new_tokens=12)[0, prompt.shape[1]:]
        assert tokens[row].tolist() == expected.tolist()


def test_generation_stops_at_eos_per_row_and_respects_limits(tmp_path):
    save_hf(tmp_path, tokenizer=False)
    model = minirlhf.load_model(str(tmp_path))
    ids, mask = batch(T=6)
    greedy, _ = generate(model, ids, mask, max_new_tokens=8, do_sample=False)
    eos = int(greedy[0, 2])  # make row 0's third greedy token the eos token
    tokens, resp = generate(model, ids, mask, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=1)
    first_eos = (tokens[0] == eos).nonzero()[0].item()
    assert first_eos <= 2 and resp[0, :first_eos + 1].all() and not resp[0, first_eos + 1:].any()
    assert (tokens[0, first_eos + 1:] == 1).all()
    # min_new_tokens forbids eos before it
    tokens, _ = generate(model, ids, mask, max_new_tokens=8, min_new_tokens=5, do_sample=False,
                         eos_token_id=eos, pad_token_id=1)
    assert not (tokens[:, :5] == eos).any()
    # per-row length limits
    limits = torch.tensor([2, 5, 3])
    tokens, resp = generate(model, ids, mask, max_new_tokens=limits, do_sample=False, pad_token_id=1)
    assert tokens.shape[1] == 5 and resp.sum(1).tolist() == [2, 5, 3]
    assert tokens[0, 2:].eq(1).all() and tokens[2, 3:].eq(1).all()


def test_sampling_reproducible_for_a_seed(tmp_path):
    save_hf(tmp_path, tokenizer=False)
    model = minirlhf.load_model(str(tmp_path))
    ids, mask = batch(T=6)

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate(model, ids, mask, max_new_tokens=10, generator=g, **kw)[0]

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    assert torch.equal(sample(7, top_k=5, top_p=0.9, temperature=0.7), sample(7, top_k=5, top_p=0.9, temperature=0.7))
    # top_k = 1 is greedy
    greedy = generate(model, ids, mask, max_new_tokens=10, do_sample=False)[0]
    assert torch.equal(sample(3, top_k=1), greedy)


def test_top_p_and_top_k_filter():
    from minirlhf.generate import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, top_p=0.7).isfinite()[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert filter_logits(logits, top_k=3).isfinite()[0].tolist() == [True, True, True, False]


def test_sequence_classifier_equals_transformers_and_round_trips(tmp_path):
    import transformers

    ref = save_hf(tmp_path / "hf", "GPTNeoXForSequenceClassification", tokenizer=False, num_labels=1)
    ours = minirlhf.load_model(str(tmp_path / "hf"))
    assert isinstance(ours, minirlhf.SequenceClassifier)
    ids, mask = batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        got = ours(ids, mask).logits
    assert got.shape == (3, 1) and (got - expected).abs().max() < TOL
    # we save, transformers loads
    minirlhf.save_model(ours, str(tmp_path / "ours"))
    back = transformers.GPTNeoXForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert (again - expected).abs().max() < TOL


def classifier_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


def test_sequence_classifier_reads_the_last_token_transformers_reads(tmp_path):
    """transformers 5 (GPTNeoXForSequenceClassification.forward) pools at the rightmost token whose id is not
    pad_token_id, whatever the attention mask says: with right padding that is the last real token, and when
    pad_token_id == eos_token_id a real trailing eos is skipped too. Ours must read the same position."""
    # right padding, pad 1 != eos 0: ids [3, 11], row 1 has 3 pads on the right, row 2 has 7
    ref = save_hf(tmp_path / "right", "GPTNeoXForSequenceClassification", tokenizer=False, num_labels=1)
    ours = minirlhf.load_model(str(tmp_path / "right"))
    ids, mask = batch()
    ids, mask = ids.flip(-1), mask.flip(-1)  # batch() pads on the left; flipped, the padding is on the right
    assert mask[1].tolist() == [1] * 8 + [0] * 3 and (ids[mask == 0] == 1).all()
    expected = classifier_logits(ref, ids, mask)
    with torch.no_grad():
        got = ours(ids, mask).logits
    assert (got - expected).abs().max() < TOL

    # pad_token_id == eos_token_id == 0, as in many Pythia reward models: left-padded with 0, and rows whose
    # real text ends in eos (mask 1 there). transformers reads the token before the trailing eos tokens.
    ref = save_hf(tmp_path / "eos", "GPTNeoXForSequenceClassification", tokenizer=False, num_labels=1,
                  pad_token_id=0)
    ours = minirlhf.load_model(str(tmp_path / "eos"))
    assert ours.config.pad_token_id == ours.config.eos_token_id == 0
    ids, mask = batch()
    ids[mask == 0] = 0  # the padding holds pad_token_id
    ids[0, -1] = 0  # row 0 (no padding) ends in one real eos
    ids[2, -2:] = 0  # row 2 (7 pads on the left) ends in two
    expected = classifier_logits(ref, ids, mask)
    with torch.no_grad():
        got = ours(ids, mask).logits
    assert (got - expected).abs().max() < TOL
    # ... and that is really a different position from the last real one: row 0 read at column 9, not 10
    with torch.no_grad():
        at_last_real = ref.score(ref.gpt_neox(input_ids=ids, attention_mask=mask,
                                              position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state)
    assert (expected[0] - at_last_real[0, 9]).abs().max() < TOL
    assert (expected[0] - at_last_real[0, 10]).abs().max() > 1e-3


def test_causal_lm_save_is_loaded_by_transformers(tmp_path):
    import transformers

    for name, variant in (("untied", VARIANTS["parallel-rot0.25-untied"]), ("tied", VARIANTS["sequential-rot1.0-tied"])):
        ref = save_hf(tmp_path / name, **variant)
        ours = minirlhf.load_model(str(tmp_path / name))
        minirlhf.save_model(ours, str(tmp_path / f"{name}-ours"), tokenizer_folder=str(tmp_path / name))
        assert os.path.isfile(tmp_path / f"{name}-ours" / "tokenizer.json")
        back = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / f"{name}-ours").eval()
        ids, mask = batch()
        assert max_diff_real(hf_logits(back, ids, mask), hf_logits(ref, ids, mask), mask) < TOL
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_loaded_model_is_frozen_eval_and_counts_tied_once(tmp_path):
    save_hf(tmp_path, tokenizer=False, tie_word_embeddings=True)
    model = minirlhf.load_model(str(tmp_path))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.embed_out.weight is model.gpt_neox.embed_in.weight


needs_onednn_linear = pytest.mark.skipif(not onednn_linear.available(), reason="this torch build has no oneDNN linear")


@needs_onednn_linear
def test_packed_head_gives_f_linears_logits_and_gradient_bit_for_bit(monkeypatch):
    """A frozen bf16 head on a CPU multiplies with its weight packed once (kernels/onednn_linear.py): the same
    oneDNN kernel on the same layout as F.linear's, so the logits and the input gradient are bit-identical."""
    torch.manual_seed(0)
    head = PackedHead(64, 1000, bias=False).to(torch.bfloat16).requires_grad_(False)
    packs = []
    pack = onednn_linear.pack
    monkeypatch.setattr(onednn_linear, "pack", lambda w: packs.append(1) or pack(w))
    for shape in [(3, 64), (2, 5, 64), (1, 1, 64)]:
        x = torch.randn(*shape).bfloat16().requires_grad_()
        x_plain = x.detach().clone().requires_grad_()
        y, y_plain = head(x), F.linear(x_plain, head.weight)
        assert head._packed is not None and torch.equal(y, y_plain)
        g = torch.randn_like(y)
        y.backward(g), y_plain.backward(g)
        assert torch.equal(x.grad, x_plain.grad)
    assert len(packs) == 1  # packed on the first call, reused

    with torch.no_grad():
        head.weight.mul_(2)  # an in-place write moves the version counter: packed again
        x = torch.randn(4, 64).bfloat16()
        assert torch.equal(head(x), F.linear(x, head.weight)) and len(packs) == 2
    assert head.packed_bytes() == 1000 * 64 * 2
    assert minirlhf.memory_report(head)["head_packed"] == 1000 * 64 * 2  # and the memory report counts it
    twin = copy.deepcopy(head)  # the opaque packed tensor is not copied: the copy packs anew
    assert twin._packed is None and torch.equal(twin(x), head(x))
    head.float()  # cast: the pack is dropped, and fp32 runs plain F.linear
    assert head._packed is None and torch.equal(head(x.float()), F.linear(x.float(), head.weight))
    assert head._packed is None and head.packed_bytes() == 0


@needs_onednn_linear
def test_packed_head_made_under_inference_mode_runs_plainly():
    with torch.inference_mode():
        head = PackedHead(16, 40).to(torch.bfloat16).requires_grad_(False)
        x = torch.randn(3, 16).bfloat16()
        assert torch.equal(head(x), F.linear(x, head.weight, head.bias)) and head._packed is None


@needs_onednn_linear
def test_packed_head_trains_plainly_and_keeps_nn_linears_state_dict():
    head = PackedHead(16, 40).to(torch.bfloat16)  # requires_grad: a trained head is never packed
    x = torch.randn(3, 16).bfloat16()
    head(x).sum().backward()
    assert head._packed is None and head.weight.grad is not None and head.bias.grad is not None
    assert set(head.state_dict()) == {"weight", "bias"}


def test_sample_never_draws_a_token_of_probability_zero():
    """Inverse-CDF sampling with filtered (-inf) tokens after the last kept one: every u in [0, 1] lands on a kept
    token, and u * total rounding up to the total (u = 1 here) gives the last kept token, not the end of the row."""
    from minirlhf.generate import sample

    inf = float("inf")
    logits = torch.tensor([[0.0, 1.0, -inf, 2.0, -inf, -inf], [-inf, 3.0, -inf, -inf, -inf, -inf]])
    for u in (0.0, 0.3, 0.7, 1 - 2**-24, 1.0):
        token = sample(logits, u=torch.full((2,), u))
        assert torch.isfinite(logits[torch.arange(2), token]).all(), (u, token)
    assert sample(logits, u=torch.ones(2)).tolist() == [3, 1]
    p = torch.softmax(logits[0], -1)  # the first row's CDF steps: 0.090, 0.335, 0.335, 1.0
    assert sample(logits[:1], u=torch.tensor([0.2])).item() == 1 and p[:2].sum() > 0.2 > p[0]
