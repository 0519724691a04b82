"""Int8Linear's input gradient without an fp32 copy of the weight: each of its three paths against a
transcription of its math, and the LoRA gradients they give on the shipped model against the fp32 backward.

    half        bf16 gradient: (dL/dy * s_w / 127) in bf16 @ W8 cast to bf16
    switchback  fp32 gradient on a device with int8 units: dL/dy * s_w / 127 quantized per row, int8 GEMM with W8
    fp32        fp32 gradient elsewhere: dL/dy @ dequantized W (test_int8_linear.py checks it to 1e-6)

The paths are chosen from the capability flags, which the tests set both ways (torch._int_mm is exact on any
x86 CPU, only slow without VNNI), so every path runs on every machine.
"""

import pytest
import torch
import torch.nn as nn

import minirlhf
from minirlhf.embedded import default_path
from minirlhf.int8 import Int8Linear, backward_path
from minirlhf.kernels import reference as R
from minirlhf.lora import add_lora


def layer_and_grad(dtype, M=24, K=96, N=72, seed=0):
    torch.manual_seed(seed)
    layer = Int8Linear.from_linear(nn.Linear(K, N)).to(dtype)
    x = torch.randn(M, K).to(dtype).requires_grad_()
    g = torch.randn(M, N).to(dtype)
    return layer, x, g


def input_gradient(layer, x, g):
    (layer(x) * g).sum().backward()
    return x.grad


def exact_product(layer, g):
    """dL/dy @ W in float64, W the layer's dequantized weight: the number each path approximates."""
    return g.double() @ layer.dequantize().double()


@pytest.mark.parametrize("fast", [True, False])
def test_paths_are_chosen_by_dtype_and_int8_units(monkeypatch, fast):
    monkeypatch.setattr(R, "CPU_FAST_INT_MM", fast)
    assert backward_path(torch.zeros(2, 2, dtype=torch.bfloat16)) == "half"
    assert backward_path(torch.zeros(2, 2)) == ("switchback" if fast else "fp32")
    monkeypatch.setenv("MINIRLHF_INT8_SWITCHBACK", "0")
    assert backward_path(torch.zeros(2, 2)) == "fp32" and backward_path(torch.zeros(2, dtype=torch.bfloat16)) == "half"


def test_switchback_is_an_int8_product_of_the_scaled_gradient(monkeypatch):
    """SwitchBack's gradient equals its definition, written out in float64: g = dL/dy * s_w / 127, row absmax
    s_g, codes round(127 g / s_g), dL/dx = s_g / 127 * (codes @ W8)."""
    monkeypatch.setattr(R, "CPU_FAST_INT_MM", True)
    layer, x, g = layer_and_grad(torch.float32)
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(tuple(b.shape)) or int_mm(a, b))
    got = input_gradient(layer, x, g)
    assert (72, 96) in calls  # the backward's int8 GEMM: codes [M, N] @ W8 [N, K]

    scaled = g.double() * layer.weight_scale.double() / 127
    s_g = scaled.abs().amax(1, keepdim=True)
    codes = torch.round(127 * scaled / s_g)
    want = s_g / 127 * (codes @ layer.weight.double())
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    # and how far that is from the exact product: 8-bit rows, a ~1% error per element
    err = (got.double() - exact_product(layer, g)).norm() / exact_product(layer, g).norm()
    assert err < 0.02, err


def test_half_path_is_a_bf16_product_within_bf16_rounding():
    layer, x, g = layer_and_grad(torch.bfloat16)
    got = input_gradient(layer, x, g)
    assert got.dtype == torch.bfloat16
    exact = exact_product(layer, g.float())
    err = (got.double() - exact).norm() / exact.norm()
    assert err < 2 ** -7, err  # two bf16 roundings (the scaled gradient, the result): ~2^-9 each


def test_backward_makes_no_float_copy_of_the_weight(monkeypatch):
    """The fp32 path's dequantize_weight is what the other two avoid."""
    monkeypatch.setattr(R, "CPU_FAST_INT_MM", True)
    monkeypatch.setattr(R, "dequantize_weight", lambda *a: pytest.fail("the weight was dequantized"))
    for dtype in (torch.float32, torch.bfloat16):
        layer, x, g = layer_and_grad(dtype)
        input_gradient(layer, x, g)


def test_switchback_triton_equals_torch(monkeypatch):
    """The same product on the Triton kernels (interpreter here): the forward's GEMM with W8^T as its weight."""
    monkeypatch.setattr(R, "CPU_FAST_INT_MM", True)
    layer, x, g = layer_and_grad(torch.float32, M=11, K=40, N=24)
    monkeypatch.setenv("MINIRLHF_INT8_BACKEND", "torch")
    want = input_gradient(layer, x, g).clone()
    x.grad = None
    monkeypatch.setenv("MINIRLHF_INT8_BACKEND", "triton")
    got = input_gradient(layer, x, g)
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()


def lora_gradients(dtype, fast, monkeypatch):
    """Gradients of the LoRA A and B matrices of the shipped LM (int8 base, adapters on every linear, B random so
    A gets a gradient too) for the mean log-likelihood of four sentences."""
    monkeypatch.setattr(R, "CPU_FAST_INT_MM", fast)
    tok = minirlhf.load_tokenizer(default_path("lm"))
    ids, mask = tok.encode_batch(["A gorgeous, witty, seductive movie.", "Boring and long, the plot is a mess",
                                  "I loved every minute of it", "the acting was"])
    model = minirlhf.load_model(default_path("lm"), dtype=dtype, quantization="int8")
    torch.manual_seed(0)
    add_lora(model, r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    logits = model(ids, mask).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (-(logprobs * mask[:, 1:]).sum() / mask.sum()).backward()
    return {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype, fast, path", [(torch.float32, True, "switchback"), (torch.bfloat16, False, "half")])
def test_lora_gradients_keep_their_direction(monkeypatch, dtype, fast, path):
    """#14's bar: cosine similarity >= 0.999 between each LoRA gradient and the fp32 computation's (fp32 float parts,
    the fp32 backward). The bf16 row changes the forward's dtype too, so it bounds the whole bf16 run."""
    want = lora_gradients(torch.float32, False, monkeypatch)
    got = lora_gradients(dtype, fast, monkeypatch)
    assert backward_path(torch.zeros(1, dtype=dtype)) == path
    cos = {n: torch.nn.functional.cosine_similarity(got[n].flatten(), want[n].flatten(), 0).item() for n in want}
    assert len(cos) == 4 * 4 * 2  # 4 blocks x 4 linears x (A, B)
    assert min(cos.values()) >= 0.999, sorted(cos.items(), key=lambda kv: kv[1])[:3]
