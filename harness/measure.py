#!/usr/bin/env python3
"""ftplan's measuring harness: runs one fine-tuning plan for a few steps and reports its memory and time.

`ftplan measure` embeds this file, writes it to a temporary directory and runs it with the plan as JSON
on stdin:

    {"config": {...a transformers config, with model_type...},
     "run": {"method": "full" | "full_bf16" | "lora" | "qlora" | "prefix" | "prompt" | "ia3" | "adapter"
                        | "bitfit" | "ln_tuning" | "freeze",
             "batch": B, "seq": S or [source, target], "grad_ckpt": bool, "attn": "sdpa" | "eager" | "flash2",
             "lora_r", "lora_alpha", "lora_targets": "qv" | "all" | [names], "lora_dora",
             "n_virtual", "adapter_dim", "train_layers", "optimizer": "fused" | "foreach" | "sgd" |
             "adafactor" | "adamw8bit" | "paged_adamw_8bit" | "paged_adamw_32bit", "base_fp32": bool,
             "precision": "fp32" | "mixed_fp16" (fp16 autocast and a GradScaler; QLoRA computes in fp16)},
     "device": "cuda" | "cpu", "steps": N, "world_size": W, "engine": "ddp" | "fsdp" | "fsdp-grad-op"}

A multi-GPU plan (`world_size` > 1) runs under `torchrun --nproc_per_node W`, the spec in a file
(`--spec FILE`): DDP, or FSDP2 `fully_shard` on every block (the model's `_no_split_modules`) and the
root, `reshard_after_forward` False for fsdp-grad-op, `MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)` in place of autocast. Ranks use NCCL on CUDA (one GPU each) and gloo on CPU; rank 0
prints the reply with every rank's peak (`peak_by_rank`; `peak` is the largest).

It builds the model from the config with random weights (nothing is downloaded), applies the method
with peft as people do, trains N steps on random tokens and prints one JSON object on stdout:
peak memory over the run and per step (CUDA: `torch.cuda.max_memory_allocated`; CPU: the bytes of
live tensor storages as PyTorch's dispatcher creates and frees them), the median step time of the
steps after the first, tokens/s, parameter counts and versions. Exit 3: a package is missing
(`{"missing": name}`); 4: the device is unavailable; 5: out of memory (`{"oom": true, ...}`).
"""
import json
import os
import statistics
import sys
import time
import weakref

RANK = int(os.environ.get("RANK", "0"))


def emit(obj, code=0):
    if RANK == 0 or code != 0:
        print(json.dumps(obj))
        sys.stdout.flush()
    sys.exit(code)


try:
    import torch
    import transformers
except ImportError as e:
    emit({"missing": e.name}, 3)

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

FROZEN = {"lora", "qlora", "prefix", "prompt", "ia3", "adapter"}


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages, as the dispatcher sees them created; freed when the storage dies.

    While any TorchDispatchMode is active every tensor is subclass-like, and autograd's engine then sums a value's
    gradients out of place (`can_accumulate_inplace`, torch/csrc/autograd/input_buffer.cpp), as `index_backward`
    scatters out of place (`index_put`); on plain tensors it writes the sum into the first gradient when it holds
    that gradient's last reference. So such a sum in backward (same shape and dtype as a dense first operand that
    no view op made) is counted as written into its first operand when that operand dies before the next op, and
    as a new tensor otherwise (validation/peak_live.py; the profiler agreed sum for sum on toy models)."""

    def __init__(self, start=()):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0
        self.pending = None  # (first operand's storage, the sum, the bytes live before it)
        for t in start:
            self.track(t)

    def track(self, t, counted=True):
        if hasattr(t, "to_local"):  # an FSDP2 parameter (DTensor): this rank's shard
            t = t.to_local()
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self.live or st.nbytes() == 0:
            return
        self.live[key] = weakref.ref(st, lambda _, k=key, n=st.nbytes(): self.free(k, n))
        if counted:
            self.now += st.nbytes()
            self.peak = max(self.peak, self.now)

    def free(self, key, n):
        if self.live.pop(key, None) is not None:
            self.now -= n

    def settle(self):
        if self.pending is None:
            return
        operand, out, before = self.pending
        self.pending = None
        n = out.untyped_storage().nbytes()
        if operand() is not None:  # still referenced: out of place on plain tensors too
            self.peak = max(self.peak, before + n)
        self.now += n

    @staticmethod
    def gradient_sum(func, args, out):
        ops = (torch.ops.aten.add.Tensor, torch.ops.aten.index_put.default)
        return (func in ops and torch._C._current_graph_task_id() != -1 and not torch.is_grad_enabled()
                and len(args) >= 2 and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor)
                and not getattr(args[0], "_made_by_view", False) and args[0].shape == out.shape
                and args[0].dtype == out.dtype and args[0].is_contiguous() and args[0].device.type == "cpu")

    def __exit__(self, *exc):
        self.settle()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.settle()
        out = func(*args, **(kwargs or {}))
        outs = tree_flatten(out)[0]
        if func.is_view:
            for t in outs:
                if isinstance(t, torch.Tensor):
                    t._made_by_view = True
        if self.gradient_sum(func, args, out):
            self.pending = (weakref.ref(args[0].untyped_storage()), out, self.now)
            self.track(out, counted=False)
            return out
        for t in outs:
            self.track(t)
        return out


class Bottleneck(torch.nn.Module):
    """Houlsby/Pfeiffer adapter after the block's FFN: x + up(relu(down(x)))."""

    def __init__(self, hidden, dim):
        super().__init__()
        self.down, self.up = torch.nn.Linear(hidden, dim), torch.nn.Linear(dim, hidden)

    def forward(self, x):
        return x + self.up(torch.relu(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)


def ffn_sites(model):
    import re
    # MPT's `ffn` adds the residual itself: its output is the block's, the same shape.
    site = re.compile(r"\.\d+\.(mlp|ffn|fc2|layer\.\d+\.DenseReluDense)$")
    # The language model's blocks only: a multimodal checkpoint's vision tower (never run by
    # text-only training) has blocks named the same way.
    return [m for n, m in model.named_modules() if site.search(n) and "vision_tower" not in n]


# ftplan's projection roles (`--lora-targets q,v,gate`) by the module names families give them
# (src/spec/plan.rs, `Proj::MODULES`), most common first: a role becomes the first group of names
# the model has, as peft's `target_modules` then names them. Other names pass unchanged.
ROLE_MODULES = {
    "q": [["q_proj"], ["q"], ["query"], ["q_a_proj", "q_b_proj"], ["c_attn"], ["query_key_value"], ["qkv_proj"],
          ["Wqkv"]],
    "k": [["k_proj"], ["k"], ["key"], ["kv_a_proj_with_mqa"], ["c_attn"], ["query_key_value"], ["qkv_proj"],
          ["Wqkv"]],
    "v": [["v_proj"], ["v"], ["value"], ["kv_b_proj"], ["c_attn"], ["query_key_value"], ["qkv_proj"], ["Wqkv"]],
    "o": [["o_proj"], ["o"], ["out_proj"], ["dense"], ["c_proj"]],
    "gate": [["gate_proj"], ["w1"], ["wi_0"], ["gate_up_proj"]],
    "up": [["up_proj"], ["w3"], ["wi_1"], ["wi"], ["c_fc"], ["fc1"], ["dense_h_to_4h"], ["gate_up_proj"]],
    "down": [["down_proj"], ["w2"], ["wo"], ["fc2"], ["dense_4h_to_h"], ["c_proj"]],
}


def module_names(model, targets):
    """`targets` with each role replaced by the module names this model gives it."""
    head = model.get_output_embeddings()
    leaves = {name.rpartition(".")[2] for name, m in model.named_modules()
              if m is not head and type(m).__name__ in ("Linear", "Conv1D")}
    out = []
    for t in targets:
        groups = ROLE_MODULES.get(t)
        if groups is None:
            out.append(t)
            continue
        found = next(([n for n in g if n in leaves] for g in groups if any(n in leaves for n in g)), [t])
        out.extend(n for n in found if n not in out)
    return out


def apply_method(model, run, enc_dec):
    method = run["method"]
    if method in ("full", "full_bf16"):
        return model
    model.requires_grad_(False)
    if method == "bitfit":
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith(".bias"))
        return model
    if method == "freeze":
        # ftplan's freeze: blocks numbered across the encoder then the decoder; the top
        # `train_layers` of the chosen side train (default: the top block, or the whole side when
        # one is named). A stack's final norm trains with its top block, its embedding norm with
        # its bottom block; embeddings (token tables, an untied head, learned positions, T5's
        # relative bias) only with `train_embeddings`.
        stacks = []  # (owner module, blocks)
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.ModuleList) and len(m) > 1 \
                    and not any(n.startswith(k + ".") for k, _, _ in stacks):
                owner = model.get_submodule(n.rpartition(".")[0]) if "." in n else model
                stacks.append((n, owner, list(m)))
        blocks = [b for _, _, bs in stacks for b in bs]
        enc = len(stacks[0][2]) if enc_dec and len(stacks) > 1 else 0
        side = run.get("train_side")
        lo, hi = {"encoder": (0, enc), "decoder": (enc, len(blocks))}.get(side, (0, len(blocks)))
        top = run.get("train_layers", hi - lo if side else 1)
        trained = set(range(max(lo, hi - top), hi))
        first = 0
        for _, owner, bs in stacks:
            for i, b in enumerate(bs):
                b.requires_grad_(first + i in trained)
            for cn, c in owner.named_children():
                if "Norm" in type(c).__name__:
                    c.requires_grad_((first if "embed" in cn else first + len(bs) - 1) in trained)
            first += len(bs)
        emb = bool(run.get("train_embeddings"))
        for n, m in model.named_modules():
            if m is model.get_input_embeddings() or m is model.get_output_embeddings() \
                    or n.endswith(("embed_positions", "wpe", "relative_attention_bias")):
                m.requires_grad_(emb)
        return model
    if method == "adapter":
        text = model.config.get_text_config()
        hidden = text.hidden_size if hasattr(text, "hidden_size") else text.d_model
        for site in ffn_sites(model):
            site.add_module("bottleneck", Bottleneck(hidden, run["adapter_dim"]).to(next(model.parameters()).device))
            site.register_forward_hook(lambda mod, inp, out: mod.bottleneck(out))
        return model
    try:
        import peft
    except ImportError:
        emit({"missing": "peft"}, 3)
    task = peft.TaskType.SEQ_2_SEQ_LM if enc_dec else peft.TaskType.CAUSAL_LM
    if method == "qlora":
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=run["grad_ckpt"],
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if method in ("lora", "qlora"):
        t = run["lora_targets"]
        targets = "all-linear" if t == "all" else (None if t == "qv" else list(t))
        if targets is None:  # "qv": the query and value projections, as each family names them
            mla_q = ["q_proj"] if getattr(model.config, "q_lora_rank", None) is None else ["q_a_proj", "q_b_proj"]
            targets = {"gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "t5": ["q", "v"], "mt5": ["q", "v"], "bloom": ["query_key_value"],
                       "falcon": ["query_key_value"], "gpt_neox": ["query_key_value"], "phi3": ["qkv_proj"],
                       "codegen": ["qkv_proj"], "mpt": ["Wqkv"],
                       "deepseek_v2": mla_q + ["kv_b_proj"], "deepseek_v3": mla_q + ["kv_b_proj"]}.get(
                model.config.model_type, ["q_proj", "v_proj"])
        elif isinstance(targets, list):
            targets = module_names(model, targets)
        cfg = peft.LoraConfig(task_type=task, r=run["lora_r"], lora_alpha=run.get("lora_alpha", 2 * run["lora_r"]),
                              lora_dropout=0.0, target_modules=targets, use_dora=run.get("lora_dora", False),
                              fan_in_fan_out=model.config.model_type == "gpt2")
    elif method in ("prefix", "prompt"):
        # peft finds the head count under a few config keys only; MPT's `n_heads` is not one of
        # them (peft then asks for `num_attention_heads`), so pass the config's own value.
        kind = peft.PrefixTuningConfig if method == "prefix" else peft.PromptTuningConfig
        heads = getattr(model.config, "num_attention_heads", None)
        cfg = kind(task_type=task, num_virtual_tokens=run["n_virtual"],
                   **({"num_attention_heads": heads} if heads else {}))
    elif method == "ia3":
        # A model type missing from peft's IA3 table makes peft ask for target_modules: Llama's
        # entry then (keys, values, or a fused qkv projection whole, and the FFN's output
        # projection by its name), as ftplan estimates it.
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as ia3_table
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        ffn_out = next((n for n in ("down_proj", "fc2", "wo", "fc_out") if n in names), "down_proj")
        fused = next((n for n in ("qkv_proj", "Wqkv") if n in names), None)
        attn = [fused] if fused else ["k_proj", "v_proj"]
        kw = ({} if model.config.model_type in ia3_table else
              dict(target_modules=attn + [ffn_out], feedforward_modules=[ffn_out]))
        cfg = peft.IA3Config(task_type=task, **kw)
    elif method == "ln_tuning":
        # Likewise for LN tuning: every norm module, as ftplan estimates it.
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING as ln_table
        norms = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if n and "norm" in type(m).__name__.lower()})
        kw = {} if model.config.model_type in ln_table else dict(target_modules=norms)
        cfg = peft.LNTuningConfig(task_type=task, **kw)
    else:
        raise ValueError(f"unknown method {method}")
    return peft.get_peft_model(model, cfg)


def optimizer(params, name, device):
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-5, momentum=0.9)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-5)
    if name in ("adamw8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            emit({"missing": "bitsandbytes"}, 3)
        # Paged states live in CUDA unified memory, outside torch.cuda.max_memory_allocated.
        kind = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
        return kind(params, lr=1e-5)
    # Fused AdamW runs on the CPU too (torch >= 2.4 lists it among the fused kernels' devices);
    # without it, foreach holds a state-sized temporary the fused estimate does not have.
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    fused = name == "fused" and device in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(params, lr=1e-5, fused=fused, foreach=None if fused else True)


def module_python(device, dispatch_us, timed):
    """Python per module call of a transformers forward beyond its top-level ops' dispatches
    (see host_costs), in microseconds."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (1, 16), device=device)

    def forward():
        with torch.autocast(device, dtype=torch.bfloat16):
            return model(input_ids=ids, labels=ids).loss

    wall = timed(forward, n=50)
    calls = [0]
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: calls.__setitem__(0, calls[0] + 1))
    try:
        forward()
    finally:
        hook.remove()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward()

    def top_level(e):
        p = e.cpu_parent
        while p is not None and not p.name.startswith("aten::"):
            p = p.cpu_parent
        return p is None

    ops = sum(1 for e in prof.events()
              if e.device_type == DeviceType.CPU and e.name.startswith("aten::") and top_level(e))
    return max(0.0, (wall - ops * dispatch_us) / max(calls[0], 1))


def host_costs(device):
    """Per-op dispatch (an op on a tensor that requires grad: dispatch, autograd node, launch),
    per-module call (the Python a transformers module runs beyond its ops' dispatches), and
    non-reentrant gradient checkpointing's Python (per block, and per tensor the block saves), in
    microseconds. Dispatch: the median of five timed loops of 2,000 after a warm-up. Module: a
    2-layer Llama at width 64 (batch 1, 16 tokens, training mode, the plan's autocast), its
    forward's wall time (the median of five loops of 50) less its top-level aten ops at the
    dispatch cost, over the module calls a global forward pre-hook counts. (The difference of a
    6-layer and a 2-layer forward, which leaves out what a forward pays once, was tried: on a
    loaded 2-core machine it came out 0, since the two timings and the dispatch cost drift
    apart.) An empty module
    (nn.Identity) costs 1-2 us, but the time model's module cost stands for a transformers
    module's forward (its argument handling, shape bookkeeping, mask and cache logic): on the
    H200's host a forward less its top-level ops over its module calls, for 29 full-size models at
    toy shape (hundreds of modules each, so what a forward pays once is spread thin), had a median
    of 91 us (validation/host-h200.jsonl), where an Identity call took 2.0 us. Checkpointing:
    a chain of 1 and of 256 `tanh`s (each saves one tensor), forward and backward with and
    without `checkpoint`, less the recomputed forward; each the fastest of nine loops (the
    difference of two long loops, so a slow loop from the rest of the machine would swamp it)."""
    from torch.utils.checkpoint import checkpoint

    x = torch.zeros(16, device=device, requires_grad=True)

    def timed(body, n=2000, loops=6, pick=statistics.median):
        runs = []
        for _ in range(loops):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                body()
            if device == "cuda":
                torch.cuda.synchronize()
            runs.append((time.perf_counter() - t0) / n * 1e6)
        return pick(runs[1:])

    def chain(t, k):
        for _ in range(k):
            t = torch.tanh(t)
        return t

    def checkpoint_extra(k):
        fastest = dict(n=30, loops=10, pick=min)
        plain = timed(lambda: chain(x, k).sum().backward(), **fastest)
        forward = timed(lambda: chain(x, k), **fastest)
        ckpt = timed(lambda: checkpoint(chain, x, k, use_reentrant=False).sum().backward(), **fastest)
        return ckpt - plain - forward

    dispatch = timed(lambda: x * 1.0001)
    module = module_python(device, dispatch, timed)
    one, many = checkpoint_extra(1), checkpoint_extra(256)
    tensor = max(0.0, (many - one) / 255)
    return {"dispatch_us": dispatch, "module_us": module,
            "checkpoint_block_us": max(0.0, one - tensor), "checkpoint_tensor_us": tensor}


def wrap(model, engine, device, mixed):
    """Data parallelism as the plan lays it out: DDP, or FSDP2 on every block and the root."""
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        ids = [torch.cuda.current_device()] if device == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kw = {"reshard_after_forward": engine != "fsdp-grad-op"}
    if mixed:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks |= set(getattr(base, "_no_split_modules", None) or [])
    for m in list(model.modules()):
        if type(m).__name__ in blocks:
            fully_shard(m, **kw)
    fully_shard(model, **kw)
    return model


def mirror_cuda_kernels():
    """On CPU, the GPU's choice of kernels, which the estimate follows (as validation/peak_live.py replays):
    - `F.dropout` in training with 0 < p < 1 takes aten's fused `native_dropout` on a CUDA tensor
      (`is_fused_kernel_acceptable`), keeping a byte-wide mask where the CPU path keeps a full-width noise tensor;
    - a fused SDPA kernel draws its dropout inside from a Philox seed and offset and keeps no mask (the CPU has no
      fused kernel with dropout and would take the math path, keeping every layer's scores), so `dropout_p` is left
      out of the call;
    - CUDA's fused kernels refuse a mask whose last dimension is strided (T5's permuted position bias,
      `check_last_dim_stride_equals_1_dense`), so such a call runs the math path, dropout and all, as on the GPU;
    - CUDA autocast's fp32 ops (`mirror_cuda_autocast_fp32`);
    - T5's dropout inside that math path as CUDA draws it (`native_dropout`), the path written out op by op;
    - CUDA autocast's cross entropy: CPU autocast lists `cross_entropy_loss` and casts 16-bit logits to fp32, CUDA's
      runs the decomposition, `log_softmax` in the logits' dtype and `nll_loss` in fp32 (validation/peak_live.py's
      mirror, which the replays use);
    - `torch.is_autocast_enabled()` without a device asks about CUDA's autocast (its legacy form), so code that
      casts by it (Nemotron's `LayerNorm1P` runs its norm on the autocast dtype's copies) sees the CPU's state, as
      it would see CUDA's on the GPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dropout = torch.nn.functional.dropout
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fused_dropout(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and input.numel() > 0:
            return torch.ops.aten.native_dropout(input, p, True)[0]
        return dropout(input, p, training, inplace)

    def math_with_dropout(query, key, value, attn_mask, dropout_p, scale):
        # aten's `_scaled_dot_product_attention_math` (torch 2.11) op by op, with CUDA's fused dropout: under
        # autocast SDPA's operands arrive in the autocast dtype; the math path upcasts q, k and v, scales q and k
        # by the square root of the scale, adds the mask in place, takes `_safe_softmax`, drops, multiplies by v,
        # and casts the output (and the probabilities it also returns) back.
        if torch.is_autocast_enabled("cpu"):
            narrow = torch.get_autocast_dtype("cpu")
            query, key, value = (t.to(narrow) for t in (query, key, value))
            if attn_mask.is_floating_point():
                attn_mask = attn_mask.to(narrow)
        origin = query.dtype
        with torch.autocast("cpu", enabled=False):
            if origin in (torch.bfloat16, torch.float16):
                query, key, value = query.float(), key.float(), value.float()
            factor = (scale if scale is not None else 1.0 / query.shape[-1] ** 0.5) ** 0.5
            attn = torch.matmul(query * factor, key.transpose(-2, -1) * factor)
            attn.add_(attn_mask)
            attn = torch.ops.aten._safe_softmax(attn, -1)
            attn = torch.ops.aten.native_dropout(attn, dropout_p, True)[0]
            attn.to(origin)
            return torch.matmul(attn, value).to(origin)

    def cuda_sdpa(*args, **kwargs):
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if isinstance(mask, torch.Tensor) and mask.dim() > 0 and mask.stride(-1) != 1:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
            call = dict(zip(names, args), **kwargs)
            p = call.get("dropout_p", 0.0)
            if p > 0 and not call.get("is_causal") and call.get("enable_gqa") is None:
                return math_with_dropout(call["query"], call["key"], call["value"], mask, p, call.get("scale"))
            with sdpa_kernel(SDPBackend.MATH):
                return sdpa(*args, **kwargs)
        if len(args) > 4:
            args = args[:4] + (0.0,) + args[5:]
        kwargs.pop("dropout_p", None)
        query = kwargs.get("query", args[0] if args else None)
        if (isinstance(mask, torch.Tensor) and query.dim() == 4 and query.is_contiguous()
                and not query.transpose(1, 2).is_contiguous()):
            # CUDA takes a masked call with the memory-efficient kernel, which writes its output token-major
            # (`at::empty({B, M, num_heads, Kv})`); the CPU's kernel writes q's layout, so a head-major q (made by a
            # `cat`: partial rotary, Phi-3) would make the caller's `transpose(1, 2).contiguous()` a second copy.
            # A token-major q gives the CPU kernel CUDA's output layout (the kernel keeps this q as CUDA's keeps its).
            query = query.transpose(1, 2).contiguous().transpose(1, 2)
            if "query" in kwargs:
                kwargs["query"] = query
            else:
                args = (query,) + tuple(args[1:])
        return sdpa(*args, **kwargs)

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

    is_autocast_enabled = torch.is_autocast_enabled

    def autocast_enabled(device_type=None):
        return is_autocast_enabled("cpu" if device_type is None else device_type)

    torch.nn.functional.dropout = fused_dropout
    torch.nn.functional.scaled_dot_product_attention = cuda_sdpa
    torch.is_autocast_enabled = autocast_enabled
    torch.nn.functional.cross_entropy = cuda_cross_entropy
    mirror_cuda_autocast_fp32()


CUDA_AUTOCAST_LIB = []


def mirror_cuda_autocast_fp32():
    """CUDA autocast runs some ops in fp32 that CPU autocast leaves in bf16 (aten/src/ATen/autocast_mode.cpp: CUDA's
    fp32 list, and the ops it runs with `dtype=torch.float32`): `pow` in gelu_new's chain and relu2, the norms and
    losses among them. Kernels on the AutocastCPU key give CPU autocast CUDA's policy for those ops (the list
    ../shared/gt/measure.py mirrors for the replays), in checkpoints' recomputation too."""
    if CUDA_AUTOCAST_LIB:
        return
    lib = torch.library.Library("aten", "IMPL")
    half = (torch.bfloat16, torch.float16)
    autocast_off = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def wide(x):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype in half else x

    def in_fp32(op):
        def kernel(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(autocast_off):
                return op(*[wide(a) for a in args], **{k: wide(v) for k, v in kwargs.items()})
        return kernel

    def fp32_result(op, dtype_at):
        def kernel(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(autocast_off):
                if args and isinstance(args[0], torch.Tensor) and args[0].dtype in half:
                    if dtype_at is not None and len(args) > dtype_at:
                        if args[dtype_at] is None:
                            args = args[:dtype_at] + (torch.float32,) + args[dtype_at + 1:]
                    elif kwargs.get("dtype") is None:
                        kwargs = dict(kwargs, dtype=torch.float32)
                return op(*args, **kwargs)
        return kernel

    def aten(name):
        base, _, overload = name.partition(".")
        return getattr(getattr(torch.ops.aten, base), overload or "default")

    for name in ("layer_norm", "native_layer_norm", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "exp", "rsqrt", "log",
                 "log1p", "expm1", "reciprocal", "group_norm", "softplus", "mse_loss", "nll_loss", "logsumexp"):
        lib.impl(name, in_fp32(aten(name)), "AutocastCPU")
    for name, dtype_at in (("softmax.int", 2), ("log_softmax.int", 2), ("cumsum", None), ("sum.dim_IntList", None)):
        lib.impl(name, fp32_result(aten(name), dtype_at), "AutocastCPU")
    CUDA_AUTOCAST_LIB.append(lib)


def main():
    if "--spec" in sys.argv:
        with open(sys.argv[sys.argv.index("--spec") + 1]) as f:
            spec = json.load(f)
    else:
        spec = json.load(sys.stdin)
    if spec.get("calibrate_host"):
        device = spec["device"]
        if device == "cuda" and not torch.cuda.is_available():
            emit({"unavailable": "no CUDA device is visible to PyTorch"}, 4)
        emit({"host": host_costs(device),
              "environment": {"torch": torch.__version__,
                              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}})
    run, device, steps = spec["run"], spec["device"], max(2, spec.get("steps", 4))
    if device == "cuda" and not torch.cuda.is_available():
        emit({"unavailable": "no CUDA device is visible to PyTorch"}, 4)
    if device == "cpu":
        mirror_cuda_kernels()
    world, engine = spec.get("world_size", 1), spec.get("engine", "ddp")
    dist = None
    if world > 1:
        import torch.distributed as dist
        if device == "cuda":
            if torch.cuda.device_count() < world:
                emit({"unavailable": f"the plan needs {world} GPUs on this node, PyTorch sees "
                                     f"{torch.cuda.device_count()}"}, 4)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    cfg = dict(spec["config"])
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    # Training keeps no KV cache, as the estimate plans (and ../shared/gt/measure.py builds with
    # use_cache=False): with it on, transformers 5 makes a DynamicCache whose first update copies
    # every layer's keys and values (`torch.cat` onto an empty tensor in the keys' dtype) and
    # holds them to the end of the forward.
    config.use_cache = False
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    if enc_dec and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = 0  # T5's published configs: the pad token starts the decoder
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0
    # A multimodal checkpoint (Gemma 3) keeps its vocabulary and widths in its text config.
    text_config = config.get_text_config()
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):  # a class default past a shrunk vocabulary
        if isinstance(getattr(config, attr, None), int) and getattr(config, attr) >= text_config.vocab_size:
            setattr(config, attr, 0)
    method = run["method"]
    frozen = method in FROZEN
    # The autocast (and QLoRA compute) dtype: fp16 with a loss scaler for GPUs without bf16.
    fp16 = run.get("precision") == "mixed_fp16"
    half = torch.float16 if fp16 else torch.bfloat16
    bf16_weights = (frozen and not run.get("base_fp32")) or method == "full_bf16"
    dtype = torch.bfloat16 if bf16_weights else torch.float32
    attn = {"flash2": "flash_attention_2"}.get(run["attn"], run["attn"])
    cls = transformers.AutoModelForSeq2SeqLM if enc_dec else transformers.AutoModelForCausalLM
    kwargs = {"torch_dtype": dtype}
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            emit({"missing": "bitsandbytes"}, 3)
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=half)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.device(torch.cuda.current_device() if device == "cuda" else device):
        try:
            model = cls.from_config(config, attn_implementation=attn, **kwargs)
        except ValueError as e:
            if "attention implementation" not in str(e) and "attn_implementation" not in str(e):
                raise
            # Models with their own attention code (BLOOM) or none (Mamba) run what they have.
            model = cls.from_config(config, attn_implementation="eager", **kwargs)
    # transformers 5's T5Config forces `tie_word_embeddings=True` (it keeps `false` only as "do
    # not rescale"), so from_config ties T5 v1.1's head; its checkpoints (flan-t5, mT5) carry their
    # own `lm_head.weight` and load untied. Untie it as a checkpoint would.
    head, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if spec["config"].get("tie_word_embeddings") is False and head is not None \
            and head.weight is inp.weight:
        head.weight = torch.nn.Parameter(inp.weight.detach().clone())
    model = apply_method(model, run, enc_dec)
    if run["grad_ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if frozen or method in ("bitfit", "ln_tuning", "freeze"):
            model.enable_input_require_grads()
    model.train()
    autocast = not (method == "full_bf16" or (method not in FROZEN and run.get("precision") == "fp32"))
    if dist is not None:
        fsdp = engine != "ddp"
        model = wrap(model, engine, device, mixed=fsdp and autocast)
        autocast = autocast and not fsdp  # FSDP's mixed-precision policy casts instead
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params, run.get("optimizer", "fused"), device)
    # GradScaler: the loss scaled before backward, the gradients unscaled (and checked for
    # infinities) before the step; its state is a one-element scale and growth tracker.
    scaler = torch.amp.GradScaler(device, enabled=fp16)
    vocab = text_config.vocab_size
    seq = run["seq"]
    src, tgt = (seq[0], seq[1]) if isinstance(seq, list) else (seq, 0)
    batch = run["batch"]
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, src), generator=g).to(device)}
    if enc_dec:
        inputs["labels"] = torch.randint(0, vocab, (batch, tgt), generator=g).to(device)
    else:
        inputs["labels"] = inputs["input_ids"]
    tracker = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # after any sharding: the steady state is measured
    if device == "cpu":
        tracker = LiveBytes(list(model.parameters()) + list(model.buffers()) + list(inputs.values()))
        tracker.__enter__()
    times, peaks = [], []
    try:
        for _ in range(steps):
            if dist is not None:
                dist.barrier()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            elif tracker is not None:
                tracker.settle()
                tracker.peak = tracker.now
            t0 = time.perf_counter()
            with torch.autocast(device_type=device, dtype=half, enabled=autocast):
                loss = model(**inputs).loss
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
                peaks.append(torch.cuda.max_memory_allocated())
            else:
                tracker.settle()
                peaks.append(tracker.peak)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as e:
        emit({"oom": True, "message": str(e).splitlines()[0]}, 5)
    finally:
        if tracker is not None:
            tracker.__exit__(None, None, None)
    peak = max(peaks)
    by_rank = [peak]
    if dist is not None:
        by_rank = [None] * world
        dist.all_gather_object(by_rank, peak)
        times_all = [None] * world
        dist.all_gather_object(times_all, statistics.median(times[1:]))
        times = [0.0, max(times_all)]
        dist.destroy_process_group()
    step = statistics.median(times[1:])
    tokens = batch * (src + tgt) * world
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft
        versions["peft"] = peft.__version__
    except ImportError:
        pass
    emit({
        "measured": {
            "peak": max(by_rank),
            "peak_by_step": peaks,
            "peak_by_rank": by_rank,
            "step_seconds": step,
            "tokens_per_second": tokens / step,
            "params_total": sum(p.numel() for p in model.parameters()),  # DTensors: global sizes
            "params_trainable": sum(p.numel() for p in params),
        },
        "environment": dict(versions, device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                            python=sys.version.split()[0], world_size=world,
                            **({"engine": engine} if world > 1 else {})),
    })


if __name__ == "__main__":
    main()
