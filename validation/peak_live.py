"""What is alive at a replayed run's peak, by the op that made each storage.

Replays one of measure.py's runs at full size under FakeTensorMode on CPU, as `measure.py --fake` does, but
accounted by a dispatch-level tracker with no module hooks (so none of MemTracker's step-to-step leak under
checkpointing, see tracker_leak.py): every storage an op creates is followed by a weak reference until it dies.
For each step it prints the peak, the op running at it, and the live storages grouped by (creating op, shape,
dtype), largest first; storages that existed before the step (parameters, buffers, optimizer states, the batch)
are `external`.

BART-large with adapters of 64, batch 8, 512 + 128 tokens, checkpointing (validation/sweep.jsonl) peaks in step 2
at 1,665,581,630 B, at the loss's backward: what `ftplan validate` compares for that run (1,768,524,346 B at
`_log_softmax_backward_data` before CUDA's cross entropy was mirrored, below).

Copy it beside ../shared/gt/measure.py and cases.py (it imports them):
  python3 peak_live.py '{"model": "bart-large", "method": "adapter", "batch": 8, "seq": [512, 128],
                         "grad_ckpt": true, "split": "dev", "attn": "sdpa", "adapter_dim": 64}' [--steps 2] [--top 40]
  python3 peak_live.py --record outliers.jsonl 'llama3.2-1b|lora|...'   (the run and its exact config from a
                                                                       record, for a model cases.py lacks)
"""
import argparse, collections, json, os, sys, weakref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import measure as M


class Live(TorchDispatchMode):
    """Live storage bytes and their peak, with the live set at the peak: every storage an op creates under it (or
    that existed at its start, `start`) is followed by a weak reference until it dies, so it keeps none alive. A
    storage resized while it is active is followed to its new size (FSDP2 frees and re-allocates unsharded
    parameters by `UntypedStorage.resize_`, outside the dispatcher); an FSDP2 parameter counts as its local shard.

    Autograd's gradient sums are counted as the engine makes them on real tensors, not as it makes them under this
    mode. Where a value feeds several ops, the engine sums their gradients in its InputBuffer, and
    `can_accumulate_inplace` (torch/csrc/autograd/input_buffer.cpp) lets it add into the first gradient only when that
    gradient is a plain tensor it holds the last reference to; a tensor subclass such as FakeTensor, or any tensor
    while a TorchDispatchMode is active (`isTensorSubclassLike`), always gets an out-of-place `old + new`. So a sum
    (`add.Tensor` in backward with grad mode off) whose first operand is not a view and dies before the next op (the
    engine held its last reference) is counted as written into that operand. On real CPU tensors at toy widths
    (Llama, GPT-2, Gemma 2, BART, T5, Pegasus; LoRA and checkpointing; mixed, bf16 and fp32), the profiler's record
    of which sums ran as `add_` matches this rule sum for sum, 30 cases of 30. The one that matters most is a tied
    embedding under mixed precision: its two fp32 gradients (vocabulary x hidden) are summed at the end of backward,
    and out of place they add a third, the 5.6 GB that had put the Gemma 4 31B replay 6.3 % above the estimate.

    Indexing's backward is counted the same way. `index_backward` (torch/csrc/autograd/FunctionsManual.cpp) scatters
    the gradient into `zeros_like(self)` in place (`_index_put_impl_`) on plain tensors, but out of place
    (`index_put`) when any operand is subclass-like, as a FakeTensor is: a second tensor of the input's size beside
    the zeros, which die as the function returns. So an `index_put` in backward into a tensor of its own shape and
    dtype is settled as a gradient sum is: written into its first operand when that dies before the next op. The
    one run it moves is Qwen3-MoE's LoRA on every linear (2 layers, 2,048 vocabulary), whose peak is the backward of
    the experts' `weighted_out[inv_perm]`: 536,870,912 B of S x hidden rows lower (2026-12-06)."""

    def __init__(self, start=()):
        super().__init__()
        self.live, self.now, self.peak, self.at = {}, 0, 0, None
        self.pending = None  # a gradient sum made under the mode: (first operand's storage, its result, bytes before)
        for t in start:
            self.track(t, "external")

    def track(self, t, made_by, counted=True):
        if hasattr(t, "to_local"):  # a DTensor: this rank's shard
            t = t.to_local()
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self.live:
            return
        ref = weakref.ref(st, lambda _, k=key: self.free(k))
        self.live[key] = [ref, st.nbytes(), made_by, tuple(t.shape), str(t.dtype).removeprefix("torch.")]
        if counted:
            self.grow(st.nbytes(), made_by)

    def is_gradient_sum(self, func, args, out):
        """An InputBuffer sum the engine could make in place: backward's `old + new`, same shape and dtype, with
        `old` dense and not made by a view op (a view's storage is shared, so real runs add out of place)."""
        return (func is torch.ops.aten.add.Tensor and torch._C._current_graph_task_id() != -1
                and not torch.is_grad_enabled() and len(args) == 2 and isinstance(args[1], torch.Tensor)
                and not getattr(args[0], "_made_by_view", False) and args[0].shape == out.shape
                and args[0].dtype == out.dtype and args[0].is_contiguous())

    def is_index_backward(self, func, args, out):
        """`index_backward`'s scatter into a fresh `zeros_like(self)`: an `index_put` in backward with grad mode off,
        into a dense tensor of its output's shape and dtype."""
        return (func is torch.ops.aten.index_put.default and torch._C._current_graph_task_id() != -1
                and not torch.is_grad_enabled() and isinstance(args[0], torch.Tensor)
                and not getattr(args[0], "_made_by_view", False) and args[0].shape == out.shape
                and args[0].dtype == out.dtype and args[0].is_contiguous())

    def settle(self):
        """Counts a pending gradient sum once the engine has moved on: if its first operand has died, the engine held
        its last reference and on real tensors writes the sum into it, so the bytes live do not change; otherwise
        the sum is a new tensor, live beside both operands at its creation."""
        if self.pending is None:
            return
        operand, out, before, at = self.pending
        self.pending = None
        n = out.untyped_storage().nbytes()
        if operand() is not None and before + n > self.peak:
            self.peak, self.at = before + n, at
        self.now += n

    def grow(self, n, made_by):
        self.now += n
        if self.now > self.peak:
            self.peak = self.now
            self.at = self.snapshot(made_by)

    def snapshot(self, made_by):
        """The live set now, as the peak keeps it: (creating op, [(bytes, op, shape, dtype), ...])."""
        return (made_by, [tuple(v[1:]) for v in self.live.values() if v[0]() is not None])

    def free(self, key):
        entry = self.live.pop(key, None)
        if entry is not None:
            self.now -= entry[1]

    def resized(self, st):
        self.settle()
        entry = self.live.get(id(st))
        if entry is not None:
            change, entry[1] = st.nbytes() - entry[1], st.nbytes()
            self.grow(change, "resize_")

    def __enter__(self):
        self.resize = torch.UntypedStorage.resize_

        def resize_(st, size):
            self.resize(st, size)
            self.resized(st)

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        self.settle()
        torch.UntypedStorage.resize_ = self.resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.settle()
        out = func(*args, **(kwargs or {}))
        outs = tree_flatten(out)[0]
        if func.is_view:
            for t in outs:
                if isinstance(t, torch.Tensor):
                    t._made_by_view = True
        if self.is_gradient_sum(func, args, out) or self.is_index_backward(func, args, out):
            at = None
            if self.now + out.untyped_storage().nbytes() > self.peak:  # the live set, should it be out of place
                at = self.snapshot(func.__name__)
            self.pending = (weakref.ref(args[0].untyped_storage()), out, self.now, at)
            self.track(out, func.__name__, counted=False)
            return out
        for t in outs:
            self.track(t, func.__name__)
        return out


def print_live(alive, top):
    """The live storages of a peak, grouped by (creating op, shape, dtype), largest first."""
    total, count = collections.Counter(), collections.Counter()
    for n, op, shape, dtype in alive:
        total[(op, shape, dtype)] += n
        count[(op, shape, dtype)] += 1
    for key, n in total.most_common(top):
        print(f"  {n:>14,} x{count[key]:<4} {key[0]} {key[1]} {key[2]}")


# Keys of a saved config.json that are not the config class's constructor arguments (or that build() sets).
NOT_ARGS = {"model_type", "transformers_version", "architectures", "_name_or_path", "use_cache", "dtype"}


def read_record(path, name):
    """The record called `name` in a .jsonl file."""
    with open(path) as fh:
        return next(r for r in map(json.loads, fh) if r["name"] == name)


def from_record(path, name, rec=None):
    """The run of the record called `name` in a .jsonl file (or of `rec`, already read), its model registered from
    the record's config."""
    rec = rec or read_record(path, name)
    run, cfg = rec["run"], rec["config"]
    cls = type(transformers.AutoConfig.for_model(cfg["model_type"])).__name__
    kw = {k: v for k, v in cfg.items() if k not in NOT_ARGS}
    if rec.get("lm_head_untied"):
        kw["tie_word_embeddings"] = False
    M.MODELS[run["model"]] = (cls, kw)
    if cfg.get("is_encoder_decoder"):
        M.ENC_DEC.add(run["model"])
    return run


def strided_mask(args, kwargs):
    """Whether an SDPA call's mask has a strided last dimension, which CUDA's fused kernels refuse."""
    mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
    return isinstance(mask, torch.Tensor) and mask.dim() > 0 and mask.stride(-1) != 1


def mirror_cuda_strided_mask_rule():
    """CUDA's fused SDPA kernels refuse a mask whose last dimension is strided (`check_last_dim_stride_equals_1_dense`:
    T5's permuted position bias) and the call takes the math path; the CPU flash kernel would take it. Such calls run
    under sdpa_kernel(MATH), as the replays in validation/ did (their `notes` say so)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def mirrored(*args, **kwargs):
        if strided_mask(args, kwargs):
            with sdpa_kernel(SDPBackend.MATH):
                return sdpa(*args, **kwargs)
        return sdpa(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = mirrored


def mirror_cuda_narrow_value():
    """Values narrower than queries and keys (DeepSeek's latent attention: 192-wide q and k, 128-wide v). PyTorch's CPU
    flash kernel refuses them (`check_head_dim_size_cpp` wants equal widths) and the call would take the math path,
    keeping each layer's fp32 score matrix. On an H200 (sm90, cuDNN 9.10 or later) SDPA prefers cuDNN, whose shape
    check allows different q/k and v widths up to 256 (`check_cudnn_tensor_shapes`); a call with a mask takes the
    memory-efficient kernel (`check_head_dim_size_mem_efficient` checks only alignment). Such calls run those kernels'
    aten ops here, whose fake kernels keep what CUDA's do: the output (cuDNN's laid out like q,
    `alloc_with_matching_layout`) and an fp32 log-sum-exp; a boolean mask becomes an additive bias, as
    `convert_boolean_attn_mask` makes it. Under autocast the fp32 operands are cast first, as CUDA autocast casts
    `scaled_dot_product_attention`'s (2026-12-07: before this, MiniCPM3-4B's mixed full run kept its fp32 q and an
    fp32 output per layer, 1.6 GB above what CUDA keeps)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def narrow(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if v.shape[-1] == q.shape[-1] or strided_mask((q, k, v, attn_mask), {}) or enable_gqa:
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)
        # The kernels' aten ops sit below autocast: on a GPU, `scaled_dot_product_attention` is on
        # CUDA autocast's lower-precision list (autocast_mode.cpp) and its fp32 operands are cast
        # before it picks a kernel. Calling the ops directly skips that, so cast them as it would
        # (MiniCPM3's rotary makes an fp32 q under mixed precision, beside bf16 keys and values).
        if torch.is_autocast_enabled(q.device.type):
            low = torch.get_autocast_dtype(q.device.type)
            q, k, v, attn_mask = (t.to(low) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t
                                  for t in (q, k, v, attn_mask))
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if attn_mask is None:
            return torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, grad, dropout_p, is_causal, False, scale=scale)[0]
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(~attn_mask, float("-inf"))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, attn_mask, grad, dropout_p, is_causal, scale=scale)[0]

    torch.nn.functional.scaled_dot_product_attention = narrow

def never_drop(model):
    """As measure.py does: a zero LayerDrop (BART, OPT) draws nothing from a fake tensor."""
    for m in model.modules():
        if getattr(m, "layerdrop", None) == 0:
            m.layerdrop = M.NeverDrop()


def mirror_cuda_dropout():
    """CUDA's dropout, as the replays of models with their published dropout ran it (validation/README.md, the
    sweep's notes): `F.dropout` in training with 0 < p < 1 takes aten's fused `native_dropout` on a CUDA tensor
    (`is_fused_kernel_acceptable`), which keeps the output and a byte-wide mask where the CPU path keeps an fp32 one;
    and a fused SDPA kernel draws its dropout inside from a Philox seed and offset, keeping no mask, so its
    `dropout_p` is left out of the call (a call the strided-mask rule sends to the math path keeps it). With p = 0
    nothing changes."""
    dropout = torch.nn.functional.dropout
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fused_dropout(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and input.numel() > 0:
            return torch.ops.aten.native_dropout(input, p, True)[0]
        return dropout(input, p, training, inplace)

    def fused_sdpa(*args, **kwargs):
        if not strided_mask(args, kwargs):
            if len(args) > 4:
                args = args[:4] + (0.0,) + args[5:]
            kwargs.pop("dropout_p", None)
        return sdpa(*args, **kwargs)

    torch.nn.functional.dropout = fused_dropout
    torch.nn.functional.scaled_dot_product_attention = fused_sdpa


def mirror_cuda_cross_entropy():
    """CUDA autocast's cross entropy. CPU autocast lists `cross_entropy_loss` as an fp32 op and casts 16-bit logits
    before `log_softmax`; CUDA autocast does not list it (aten/src/ATen/autocast_mode.h: `nll_loss` is on the fp32
    list, `cross_entropy_loss` is not), so on a GPU the op's decomposition runs (LossNLL.cpp,
    `cross_entropy_loss_symint`): `log_softmax(x, dim, x.scalar_type())`, whose explicit dtype the fp32_set_opt_dtype
    policy keeps (16-bit log-probabilities, kept for log_softmax's backward), then `nll_loss`, which autocast casts to
    fp32 (that copy kept for nll_loss's backward). Replayed here by calling the decomposition under CPU autocast with
    CUDA's fp32 rules mirrored; fp32 logits, label smoothing and probability targets keep the library's path."""
    cross_entropy = torch.nn.functional.cross_entropy
    nll_loss = torch.nn.functional.nll_loss

    def cuda_cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                           reduction="mean", label_smoothing=0.0):
        if (torch.is_autocast_enabled("cpu") and input.dtype in (torch.bfloat16, torch.float16)
                and label_smoothing == 0.0 and size_average is None and reduce is None
                and not torch.is_floating_point(target)):
            logp = torch.log_softmax(input, 1 if input.dim() > 1 else 0, dtype=input.dtype)
            return nll_loss(logp, target, weight, ignore_index=ignore_index, reduction=reduction)
        return cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)

    torch.nn.functional.cross_entropy = cuda_cross_entropy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="one of measure.py's run dicts, as JSON (with --record: the record's name)")
    ap.add_argument("--record", help="a .jsonl file holding the named record")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--json", action="store_true", help="print only {\"peak_plain_bytes\": ..., \"peak_plain_by_step\": [...]}")
    a = ap.parse_args()
    run = from_record(a.record, a.run) if a.record else json.loads(a.run)
    steps, _ = replay(run, a.steps)
    if a.json:
        peaks = [peak for peak, _ in steps]
        print(json.dumps({"peak_plain_bytes": max(peaks), "peak_plain_by_step": peaks}))
        return
    for step, (peak, (made_by, alive)) in enumerate(steps, 1):
        print(f"step {step}: peak {peak} B at {made_by}")
        print_live(alive, a.top)


def replay(run, steps):
    """`steps` training steps of `run` at full size under FakeTensorMode on CPU, with CUDA's autocast, dropout, cross
    entropy and SDPA kernel for narrower values mirrored. Returns each step's (peak, (op at the peak, live set there))
    and the run's record (measure.py's settings, build and method fields, `params_trainable` and `params_total` among
    them)."""
    rec = {"run": run, "notes": []}
    dev = torch.device("cpu")
    batch, seq, wdtype, use_autocast = M.settings(run, False, rec)
    M.mirror_cuda_autocast_fp32_ops()
    mirror_cuda_strided_mask_rule()
    mirror_cuda_dropout()
    mirror_cuda_cross_entropy()
    mirror_cuda_narrow_value()
    out = []
    with M.fake_mode(), M.unpacked_batches():
        torch.manual_seed(0)
        model, cfg = M.build(run, dev, False, wdtype, rec)
        never_drop(model)
        model, params = M.prepare(model, run, dev, rec)
        rec.update(params_trainable=sum(p.numel() for p in params),
                   params_total=sum(p.numel() for p in model.parameters()))
        opt, _ = M.make_optimizer(run, params, dev)
        data = M.make_batch(run, batch, seq, cfg.vocab_size, dev)
        for _ in range(steps):
            states = [s for st in opt.state.values() for s in st.values() if isinstance(s, torch.Tensor)]
            live = Live(list(model.parameters()) + list(model.buffers()) + list(data.values()) + states)
            with live:
                loss, _ = M.train_step(model, data, opt, params, dev.type, use_autocast)
            del loss
            out.append((live.peak, live.at))
    return out, rec


if __name__ == "__main__":
    main()
