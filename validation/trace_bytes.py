"""Bytes every aten op of a transformers LlamaDecoderLayer reads and writes, forward and backward.

A TorchDispatchMode sees each op PyTorch dispatches (views and allocations excluded) and sums the
bytes of its tensor inputs and outputs (an expanded view counts its storage once): what a CUDA
kernel for that op moves. Matmuls are listed apart (their time is FLOPs, and their bytes here
include the weights). Runs on CPU; TinyLlama's widths, a frozen bf16 base, batch 1 x 512.

    python validation/trace_bytes.py [-v]

2026-12-02 (torch 2.15, transformers 5.24): non-matmul bytes per token, forward 284,352 and
backward 599,776 (9,216 of it the CPU attention kernel's GQA clones); ftplan's graph: 291,840
and 589,824.
"""
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as ml

FREE = {"view", "_unsafe_view", "transpose", "t", "expand", "permute", "reshape", "unsqueeze",
        "squeeze", "slice", "select", "detach", "alias", "as_strided", "split", "chunk", "unbind",
        "narrow", "_reshape_alias", "split_with_sizes", "lift_fresh", "empty", "empty_like",
        "empty_strided", "new_empty", "new_empty_strided"}
MATMUL = {"mm", "addmm", "bmm"}


def nbytes(t):
    try:
        return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


class Trace(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name.rstrip("_") not in FREE:
            ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            outs = [a for a in tree_flatten(out)[0] if isinstance(a, torch.Tensor)]
            self.ops.append((name, sum(map(nbytes, ins)), sum(map(nbytes, outs))))
        return out


def main():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                      num_key_value_heads=4, num_hidden_layers=1, vocab_size=32000,
                      attn_implementation="sdpa")
    tokens, dt = 512, torch.bfloat16
    layer = ml.LlamaDecoderLayer(cfg, 0).to(dt).requires_grad_(False)
    h = torch.randn(1, tokens, 2048, dtype=dt, requires_grad=True)
    cos, sin = ml.LlamaRotaryEmbedding(cfg)(h, torch.arange(tokens)[None])
    with Trace() as fwd:
        y = layer(h, position_embeddings=(cos, sin), attention_mask=None)
        y = y[0] if isinstance(y, tuple) else y
    grad = torch.randn_like(y)
    with Trace() as bwd:
        y.backward(grad)
    for tag, ops in (("forward", fwd.ops), ("backward", bwd.ops)):
        other = sum(r + w for n, r, w in ops if n not in MATMUL)
        print(f"{tag:8} {len(ops):3} ops, non-matmul {other / tokens:,.0f} B/token")
        if "-v" in sys.argv:
            for n, r, w in ops:
                print(f"    {n:50} read {r / tokens:9,.0f} write {w / tokens:9,.0f} B/token")


if __name__ == "__main__":
    main()
