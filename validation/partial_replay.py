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
    if run["method"] == "ln_tuning":
        return ln_tuning(model)
    # BitFit, freezing, and DoRA (measure.py's LoRA has no `use_dora`): as the harness applies them.
    if run["method"] in PARTIAL or run.get("lora_dora"):
        return H.apply_method(model, run, bool(getattr(model.config, "is_encoder_decoder", False)))
    return _apply(model, run, dev, rec)

def settings(run, smoke, rec):
    batch, seq, wdtype, ac = _settings(run, smoke, rec)
    if run["method"] in PARTIAL:
        wdtype = torch.float32
        rec.update(weight_dtype="float32")
    return batch, seq, wdtype, ac

M.apply_method, M.settings = apply_method, settings

M.FROZEN_BASE = M.FROZEN_BASE | PARTIAL   # enable_input_require_grads under checkpointing, as the harness does

if __name__ == "__main__":
    run = json.loads(sys.argv[3])
    PL.from_record(sys.argv[1], sys.argv[2])  # registers the record's config under its model name
    steps, rec = PL.replay(run, 2)
    peaks = [peak for peak, _ in steps]
    print(json.dumps(dict(peak_plain_bytes=max(peaks), peak_plain_by_step=peaks,
                          **{k: rec.get(k) for k in ("params_trainable", "params_total", "weight_dtype")})))
