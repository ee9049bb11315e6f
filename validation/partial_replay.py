"""Full-size fake replays of BitFit, LN tuning, freezing and DoRA (validation/partial.jsonl): peak_live.py's tracker and
CUDA mirrors, with the method applied as `ftplan measure`'s harness (harness/measure.py) applies it: fp32 weights,
bf16 autocast, `enable_input_require_grads` under checkpointing.

Copy it beside ../shared/gt/measure.py, cases.py and peak_live.py; FTPLAN_HARNESS names this repository's
harness/measure.py (default: ../harness/measure.py from this file). A record of the same model (for its config),
then the run:
  python3 partial_replay.py measured.jsonl 'gpt2|full|b8|s1024|gc0|sdpa' \
      '{"model": "gpt2", "method": "bitfit", "batch": 8, "seq": 1024, "grad_ckpt": false, "attn": "sdpa"}'
prints {"peak_plain_bytes", "peak_plain_by_step", "params_trainable", "params_total", "weight_dtype"}."""
import importlib.util, json, os, sys, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peak_live as PL
M = PL.M
HARNESS = os.environ.get("FTPLAN_HARNESS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "harness",
                                                            "measure.py")
spec = importlib.util.spec_from_file_location("H", HARNESS)
H = importlib.util.module_from_spec(spec); spec.loader.exec_module(H)
PARTIAL = {"bitfit", "ln_tuning", "freeze"}
_apply, _settings = M.apply_method, M.settings

def ln_tuning(model):
    """peft's LN tuning trains a copy of each targeted norm (`LNTuningLayer`: a deepcopy of the base norm, which
    FakeTensorMode cannot make); the replay trains the norm itself: the same ops and trainable count, without the
    frozen originals (a few hundred kB)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING as table
    norms = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and "norm" in type(m).__name__.lower()}
    targets = set(table.get(model.config.model_type, norms))
    model.requires_grad_(False)
    for n, m in model.named_modules():
        if n and n.rsplit(".", 1)[-1] in targets:
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    return model

def apply_method(model, run, dev, rec):
    if run.get("lora_dora"):  # DoRA: measure.py's LoRA has no `use_dora`; the harness's has
        return H.apply_method(model, run, bool(getattr(model.config, "is_encoder_decoder", False)))
    if run["method"] == "ln_tuning":
        return ln_tuning(model)
    if run["method"] in PARTIAL:
        return H.apply_method(model, run, bool(getattr(model.config, "is_encoder_decoder", False)))
    return _apply(model, run, dev, rec)

def settings(run, smoke, rec):
    batch, seq, wdtype, ac = _settings(run, smoke, rec)
    if run["method"] in PARTIAL:
        wdtype = torch.float32
        rec.update(weight_dtype="float32")
    return batch, seq, wdtype, ac

M.apply_method, M.settings = apply_method, settings

# peft's LN tuning moves each copied norm with `module.to(weight.device)`; under FakeTensorMode nn.Module._apply
# swaps parameters and refuses fake ones (see measure.py's fake_mode). Everything is on the CPU already, so a move
# that cannot swap is the identity here.
_to = torch.nn.Module.to
def _to_or_same(self, *args, **kwargs):
    try:
        return _to(self, *args, **kwargs)
    except RuntimeError as e:
        if "Couldn't swap" not in str(e):
            raise
        return self
torch.nn.Module.to = _to_or_same
M.FROZEN_BASE = M.FROZEN_BASE | PARTIAL   # enable_input_require_grads under checkpointing, as the harness does

def run_one(base, run, steps=2):
    rec = {"run": run, "notes": []}
    dev = torch.device("cpu")
    batch, seq, wdtype, use_autocast = M.settings(run, False, rec)
    M.mirror_cuda_autocast_fp32_ops(); PL.mirror_cuda_strided_mask_rule(); PL.mirror_cuda_dropout(); PL.mirror_cuda_cross_entropy()
    with M.fake_mode(), M.unpacked_batches():
        torch.manual_seed(0)
        model, cfg = M.build(run, dev, False, wdtype, rec)
        PL.never_drop(model)
        model, params = M.prepare(model, run, dev, rec)
        opt, _ = M.make_optimizer(run, params, dev)
        data = M.make_batch(run, batch, seq, cfg.vocab_size, dev)
        peaks = []
        for step in range(steps):
            states = [s for st in opt.state.values() for s in st.values() if isinstance(s, torch.Tensor)]
            live = PL.Live(list(model.parameters()) + list(model.buffers()) + list(data.values()) + states)
            with live:
                loss, _ = M.train_step(model, data, opt, params, dev.type, use_autocast)
            del loss
            peaks.append(live.peak)
    return dict(peak_plain_bytes=max(peaks), peak_plain_by_step=peaks, params_trainable=sum(p.numel() for p in params),
                params_total=sum(p.numel() for p in model.parameters()), weight_dtype=rec.get("weight_dtype"))

if __name__ == "__main__":
    base_file, base_name, run = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    base = PL.from_record(base_file, base_name)  # registers the record's config under its model name
    print(json.dumps(run_one(base, run)))
