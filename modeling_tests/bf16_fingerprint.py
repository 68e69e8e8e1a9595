"""A fingerprint of this CPU's bf16 kernels, for the bit-exact bf16 tests (test_bf16.py). Imports only torch, so
that `python modeling_tests/bf16_fingerprint.py` is quick in a fresh process."""

import array
import hashlib

import torch
import torch.nn.functional as F


# kernel_fingerprint() on the machine where the package reproduces golden_bf16 bit for bit (AMD EPYC with
# AVX-512 and AVX512_BF16, torch 2.13.0+cpu, 1 thread). It changes with ONEDNN_MAX_CPU_ISA=AVX2 or
# ATEN_CPU_CAPABILITY=default, under which bits of the model's bf16 logits change as well.
REFERENCE_FINGERPRINT = "c57c46318abe796a"


def kernel_fingerprint() -> str:
    """Digest of bf16 SDPA, batched matmul, softmax @ V and linear outputs on fixed inputs (integers / 2**15
    rounded to bf16, so the inputs do not depend on the CPU). The sizes are large enough that a kernel with
    another accumulation order changes some output bits."""
    gen = torch.Generator().manual_seed(0)

    def bf16_input(*shape, scale=1.0):
        return (torch.randint(-(2**15), 2**15, shape, generator=gen).float() * (scale / 2**15)).to(torch.bfloat16)

    q, k, v = (bf16_input(64, 4, 21, 16) for _ in range(3))
    x, w = bf16_input(64, 21, 64), bf16_input(384, 64, scale=0.1)
    scores = torch.matmul(q, k.transpose(-1, -2))
    outputs = [
        F.scaled_dot_product_attention(q, k, v),
        scores,
        torch.matmul(torch.softmax(scores.float(), dim=-1).to(torch.bfloat16), v),
        F.linear(x, w),
    ]
    digest = hashlib.sha256()
    for tensor in outputs:
        digest.update(array.array("h", tensor.view(torch.int16).flatten().tolist()).tobytes())
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(kernel_fingerprint())
