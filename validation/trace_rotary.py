"""Bytes the rotary embeddings of q and k move, forward and backward, in passes over q.

Runs transformers' own code for each form on CPU under trace_bytes.py's dispatch trace (views and
allocations excluded) and divides the bytes read and written by those of q and k: batch 1 x 512,
8 heads, bf16, q and k made as the attention makes them (head-major views of token-major
projections). The leaf gradients' final `copy_` is left out.

    python validation/trace_rotary.py

2026-12-06 (torch 2.15, transformers 5.17), forward / backward passes:
  Llama, whole head (128)          10.25 / 14.25
  GPT-NeoX, a quarter of 128        4.56 /  9.56
  GPT-J, 64 of 256 (its forward)    4.67 /  9.56
  Phi-3, whole head (96, a `cat`)  12.25 / 18.25
ftplan charges 10 f + 2 and 14 f + 6 where the code cuts q and concatenates (f the rotated share;
14 + 4 where nothing passes through), 10 and 14 where it does not (`Builder::rotary_qk`).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_bytes import Trace  # noqa: E402
from transformers.models.gpt_neox import modeling_gpt_neox as neox  # noqa: E402
from transformers.models.gptj import modeling_gptj as gptj  # noqa: E402
from transformers.models.llama import modeling_llama as llama  # noqa: E402
from transformers.models.phi3 import modeling_phi3 as phi3  # noqa: E402

B, H, S = 1, 8, 512
BF16 = torch.bfloat16


def passes(name, head, fn):
    q = torch.randn(B, S, H, head, dtype=BF16).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, S, H, head, dtype=BF16).transpose(1, 2).requires_grad_(True)
    with Trace() as fwd:
        out = fn(q, k)
    grads = [torch.ones_like(o) for o in out]
    with Trace() as bwd:
        torch.autograd.backward(out, grads)
    qk = 2 * q.numel() * q.element_size()

    def moved(ops):
        return sum(r + w for n, r, w in ops if n != "copy_") / qk

    print(f"{name:34} {moved(fwd.ops):6.2f} / {moved(bwd.ops):6.2f}")


def tables(width):
    return torch.randn(B, S, width, dtype=BF16), torch.randn(B, S, width, dtype=BF16)


def gptj_forward(q, k, rotary=64):
    # GPTJAttention.forward's own split, rotation and `cat`, on token-major q and k.
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    sin, cos = tables(rotary // 2)
    k_rot = gptj.apply_rotary_pos_emb(k[..., :rotary], sin, cos)
    q_rot = gptj.apply_rotary_pos_emb(q[..., :rotary], sin, cos)
    return torch.cat([q_rot, q[..., rotary:]], -1), torch.cat([k_rot, k[..., rotary:]], -1)


def main():
    torch.manual_seed(0)
    cos, sin = tables(128)
    passes("Llama, whole head (128)", 128, lambda q, k: llama.apply_rotary_pos_emb(q, k, cos, sin))
    cos, sin = tables(32)
    passes("GPT-NeoX, a quarter of 128", 128, lambda q, k: neox.apply_rotary_pos_emb(q, k, cos, sin))
    passes("GPT-J, 64 of 256 (its forward)", 256, gptj_forward)
    cos, sin = tables(96)
    passes("Phi-3, whole head (96, a `cat`)", 96, lambda q, k: phi3.apply_rotary_pos_emb(q, k, cos, sin))


if __name__ == "__main__":
    main()
