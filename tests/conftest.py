"""Test-wide setup.

TRITON_INTERPRET must be set before anything imports triton: it makes Triton kernels run on CPU tensors
(slowly, exactly), which is how the kernel tests check them on machines without a GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
