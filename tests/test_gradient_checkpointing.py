"""Gradient checkpointing: the same gradients, less memory, and only where a backward pass follows.

The memory test runs in a fresh process and measures, for each setting, the peak resident memory (VmHWM,
reset before each pass by writing 5 to /proc/self/clear_refs) during one forward + backward, minus the resident
memory just before it. Two things would blur that number, and both are handled: warm-up passes first pay the
one-time costs (torch.utils.checkpoint's first call imports ~900 modules, ~150 MB), and MALLOC_MMAP_THRESHOLD_
makes glibc give every freed block of 64 KB or more straight back to the system, instead of keeping it in its
heap under a threshold that moves with the allocation history.
"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from minirlhf import neox
from minirlhf.config import NeoXConfig
from minirlhf.lora import add_lora
from minirlhf.neox import CausalLM, init_weights

# activations dominate here: 2 x 512 tokens through 6 blocks of width 256
LONG = dict(layers=6, hidden=256, batch=2, tokens=512)


def tiny_lora_model(layers=2, hidden=64, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    config = NeoXConfig(vocab_size=320, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=4 * hidden, max_position_embeddings=2048, attention_dropout=dropout,
                        hidden_dropout=dropout)
    model = CausalLM(config)
    init_weights(model)
    add_lora(model, r=8, alpha=16, dropout=dropout, target_modules="all-linear")
    with torch.no_grad():  # B = 0 at init would hide the adapters' share of the gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model


def loss_and_grads(model, ids, mask):
    out = model(ids, mask, logits_positions=slice(-64, None))
    loss = out.logits.float().logsumexp(-1).mean() + out.hidden_states.square().mean()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def child(folder: str) -> None:
    """One forward + backward on the long input without, then with checkpointing; prints each pass's peak extra
    resident memory and saves its gradients."""
    torch.set_num_threads(1)
    model = tiny_lora_model(LONG["layers"], LONG["hidden"]).train()
    ids = torch.randint(2, 320, (LONG["batch"], LONG["tokens"]), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for setting in ("off", "on"):  # warm-up: one-time imports and allocations
        model.gpt_neox.gradient_checkpointing = setting == "on"
        loss_and_grads(model, ids[:1, :8], mask[:1, :8])
    for setting in ("off", "on"):
        model.gpt_neox.gradient_checkpointing = setting == "on"
        model.zero_grad(set_to_none=True)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS now
        before = vm_kb("VmRSS")
        grads = loss_and_grads(model, ids, mask)
        print(f"{setting} {(vm_kb('VmHWM') - before) / 1024:.1f}")
        save_file(grads, os.path.join(folder, f"{setting}.safetensors"))


def vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads peak memory from /proc (Linux)")
def test_same_gradients_with_less_peak_memory(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    result = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    extra = {setting: float(mb) for setting, mb in (line.split() for line in result.stdout.splitlines())}
    off, on = load_file(tmp_path / "off.safetensors"), load_file(tmp_path / "on.safetensors")
    assert off.keys() == on.keys() and len(off) == 4 * 2 * LONG["layers"]  # A and B of 4 linears per block
    for name in off:
        torch.testing.assert_close(on[name], off[name], rtol=0, atol=1e-6, msg=name)
    print(f"peak extra memory: {extra['off']:.0f} MB without, {extra['on']:.0f} MB with checkpointing")
    assert extra["on"] < 0.5 * extra["off"], extra


def test_dropout_masks_are_replayed_in_the_recomputation():
    ids = torch.randint(2, 320, (2, 48), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    grads = {}
    for on in (False, True):
        model = tiny_lora_model(dropout=0.1).train()
        model.gpt_neox.gradient_checkpointing = on
        torch.manual_seed(7)  # the same dropout masks in the forward of both runs
        grads[on] = loss_and_grads(model, ids, mask)
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=0, atol=1e-6, msg=name)


def test_only_passes_with_a_backward_are_checkpointed(monkeypatch):
    """Sampling and the no-grad scoring passes never pay for recomputation; a training pass uses one checkpoint
    per block."""
    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(neox, "checkpoint", counting_checkpoint)
    model = tiny_lora_model()
    model.gpt_neox.gradient_checkpointing = True
    ids = torch.randint(2, 320, (2, 16))
    from minirlhf.generate import generate

    generate(model, ids, torch.ones_like(ids), max_new_tokens=3)
    with torch.no_grad():
        model(ids)
    assert calls == []
    model(ids).logits.sum().backward()
    assert calls == list(model.gpt_neox.layers)


if __name__ == "__main__":
    child(sys.argv[1])
