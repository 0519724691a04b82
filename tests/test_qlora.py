"""QLoRA end to end in a whole model: LoRA adapters on a base loaded in 4 bits get the gradients they would get on
the same base held in floating point (the 4-bit weights dequantized), through every block.

The oracle is our own float model with each NF4Linear replaced by an nn.Linear holding its dequantized weight:
NF4Linear's backward must be exactly dL/dx = dL/dy @ W for that W, so the adapter gradients can only differ by
float32 rounding. (NF4Linear against bitsandbytes' Linear4bit, layer by layer: tests/test_nf4_linear.py.)
"""
import pytest
import torch
import torch.nn as nn

from minirlhf.checkpoint import load_model
from minirlhf.lora import add_lora, lora_modules
from minirlhf.nf4 import NF4Linear
from minirlhf.quantize import set_module
from tiny import save_hf


def dequantized_twin(model):
    """The model with every NF4Linear replaced, in place, by an nn.Linear holding its dequantized fp32 weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.dequantize()
            if module.bias is not None:
                linear.bias.data = module.bias.detach().float().clone()
            linear.requires_grad_(False)
            set_module(model, name, linear)
    return model


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_adapter_gradients_through_the_4bit_base_equal_the_dequantized_float_base(tmp_path, quant_type):
    folder = str(tmp_path / "tiny")
    save_hf(folder, tokenizer=False, num_hidden_layers=3)
    ids = torch.randint(2, 320, (2, 11), generator=torch.Generator().manual_seed(0))
    grads = {}
    for kind in ("4bit", "float"):
        model = load_model(folder, quantization=quant_type)
        n_4bit = sum(isinstance(m, NF4Linear) for m in model.modules())
        assert n_4bit == 3 * 4  # every block linear of every block is held in 4 bits
        if kind == "float":
            dequantized_twin(model)
            assert not any(isinstance(m, NF4Linear) for m in model.modules())
        torch.manual_seed(1)  # the same adapters in both
        add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
        for _, lora in lora_modules(model):  # B = 0 would give A no gradient
            nn.init.normal_(lora.lora_B.weight, std=0.05)
        model.train()
        logits = model(ids).logits  # [2, 11, 320]
        loss = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
        loss.backward()
        grads[kind] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert grads["4bit"].keys() == grads["float"].keys()
    names = list(grads["4bit"])
    assert len(names) == 3 * 4 * 2  # lora_A and lora_B of the 4 linears of each of the 3 blocks
    assert {n.rsplit(".", 2)[-2] for n in names} == {"lora_A", "lora_B"}
    for name in names:
        ours, oracle = grads["4bit"][name], grads["float"][name]
        assert ours.abs().sum() > 0, name  # the gradient reached this adapter, through every block above it
        err = ((ours - oracle).norm() / oracle.norm()).item()
        assert err <= 1e-5, (name, err)
