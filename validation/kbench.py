"""Micro-benchmarks of the kernel families a training step spends its non-GEMM time in (H200).

OUT=DIR python3 kbench.py [--cpu]   -> DIR/kbench.json
Each figure: median of CUDA-event timings after warm-up. Small kernels are timed inside a CUDA
graph (20 launches captured back to back) so that the host's launch cost is not in the figure.
"""
import json, os, statistics, sys, time

import torch

CPU = "--cpu" in sys.argv
dev = torch.device("cpu" if CPU else "cuda")
SCALE = 1 / 4096 if CPU else 1
res = {}


def timed(fn, warm=3, reps=10):
    for _ in range(warm):
        fn()
    if CPU:
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps
    ms = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
    return statistics.median(ms) / 1e3


def graphed(fn, n=20):
    """Seconds per call of fn when n calls are replayed from one CUDA graph."""
    if CPU:
        return timed(fn)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    return timed(g.replay) / n


def rec(name, seconds, nbytes):
    res[name] = dict(us=seconds * 1e6, bytes=nbytes, GBps=nbytes / seconds / 1e9)
    print(f"{name:40s} {seconds * 1e6:10.1f} us {nbytes / seconds / 1e9:8.0f} GB/s", flush=True)


bf, f32 = torch.bfloat16, torch.float32
T, H, F = int(8192 * SCALE) or 2, 2048, 5632  # tokens, hidden, ffn (TinyLlama, batch 8 x 1024)

# copy reference (measure.py's calibration figure)
n = int(2 ** 30 * SCALE)
x, y = torch.empty(n, device=dev), torch.empty(n, device=dev)
rec("copy_fp32_4GiB", timed(lambda: y.copy_(x)), 8 * n)
del x, y

# contiguous element-wise (vectorized TensorIterator path)
a, b = torch.randn(T, H, device=dev, dtype=bf), torch.randn(T, H, device=dev, dtype=bf)
rec("add_bf16_T_H", timed(lambda: a + b), 3 * a.numel() * 2)
rec("mul_bf16_T_H", timed(lambda: a * b), 3 * a.numel() * 2)
u = torch.randn(T, F, device=dev, dtype=bf)
rec("silu_bf16_T_F", timed(lambda: torch.nn.functional.silu(u)), 2 * u.numel() * 2)
rec("cast_bf16_to_fp32_T_H", timed(lambda: a.float()), a.numel() * 6)
af = a.float()
rec("cast_fp32_to_bf16_T_H", timed(lambda: af.to(bf)), a.numel() * 6)
rec("mul_fp32_T_H", timed(lambda: af * af), 3 * a.numel() * 4)
# broadcast / strided (non-vectorized path): rotary's q * cos, a row-scale, a transpose copy
q = torch.randn(8 if not CPU else 1, 32, int(1024 * SCALE) or 2, 64, device=dev, dtype=bf)
cos = torch.randn(q.shape[0], 1, q.shape[2], 64, device=dev, dtype=bf)
rec("mul_bf16_broadcast_rotary", timed(lambda: q * cos), 2 * q.numel() * 2 + cos.numel() * 2)
w = torch.randn(H, device=dev, dtype=bf)
rec("mul_bf16_rowscale_T_H", timed(lambda: a * w), 2 * a.numel() * 2)
qt = q.transpose(1, 2)
rec("contiguous_bf16_transpose", timed(lambda: qt.contiguous()), 2 * q.numel() * 2)
# reductions and norms
rec("sum_dim0_fp32_T_H", timed(lambda: af.sum(0)), af.numel() * 4)
rec("mean_lastdim_fp32_T_H", timed(lambda: af.pow(2).mean(-1, keepdim=True)), 2 * af.numel() * 4 + af.numel() * 4)
ln_w = torch.ones(H, device=dev, dtype=f32)
rec("layer_norm_fp32_T_H", timed(lambda: torch.nn.functional.layer_norm(af, (H,), ln_w, ln_w)), 2 * af.numel() * 4)
if hasattr(torch.nn.functional, "rms_norm"):
    rec("rms_norm_fp32_T_H", timed(lambda: torch.nn.functional.rms_norm(af, (H,), ln_w)), 2 * af.numel() * 4)


def hf_rmsnorm():  # transformers' LlamaRMSNorm on a bf16 input
    h = a.to(f32)
    v = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(v + 1e-6)
    return w * h.to(bf)


rec("hf_llama_rmsnorm_bf16_T_H(6 kernels)", timed(hf_rmsnorm), a.numel() * (2 + 4 + 4 + 4 + 4 + 4 + 2 + 2 + 2 + 2))
del u

# kernel floor: small adds replayed from a graph, size sweep
for n in [1, 1 << 12, 1 << 16, 1 << 20, 1 << 22, 1 << 24]:
    n = max(1, int(n * (SCALE if n > 4096 else 1)))
    s, t, o = (torch.randn(n, device=dev, dtype=bf) for _ in range(3))
    sf = s.float()
    rec(f"graph_add_bf16_n{n}", graphed(lambda: torch.add(s, t, out=o)), 3 * n * 2)
    rec(f"graph_mul_fp32_n{n}", graphed(lambda: torch.mul(sf, 2.0)), n * 4 * 2)

# optimizers over a TinyLlama-like parameter list (1.1 B parameters)
shapes = [(32000, 2048), (32000, 2048)] + 22 * [(2048, 2048), (256, 2048), (256, 2048), (2048, 2048),
                                              (5632, 2048), (5632, 2048), (2048, 5632), (2048,), (2048,)]
for dtype in (f32, bf):
    ps = [torch.nn.Parameter(torch.zeros(*(int(d * SCALE) or 1 for d in sh[:1]), *sh[1:], device=dev, dtype=dtype))
          for sh in shapes]
    for p in ps:
        p.grad = torch.zeros_like(p)
    count = sum(p.numel() for p in ps)
    es = dtype.itemsize if hasattr(dtype, "itemsize") else torch.finfo(dtype).bits // 8
    for label, opt, nbytes in [
        ("adamw_fused", torch.optim.AdamW(ps, lr=1e-5, fused=True), 7 * count * es),
        ("adamw_foreach", torch.optim.AdamW(ps, lr=1e-5, foreach=True), None),
        ("sgd_momentum_foreach", torch.optim.SGD(ps, lr=1e-5, momentum=0.9, foreach=True), 8 * count * es),
    ]:
        secs = timed(opt.step, warm=2, reps=5)
        rec(f"{label}_{str(dtype)[6:]}_{count / 1e9:.2f}B", secs, nbytes or 14 * count * es)
        opt.state.clear()
    del ps
    if not CPU:
        torch.cuda.empty_cache()

res["device"] = torch.cuda.get_device_name() if not CPU else "cpu"
res["torch"] = torch.__version__
with open(os.path.join(os.environ.get("OUT", "."), "kbench.json"), "w") as fh:
    json.dump(res, fh, indent=1)
