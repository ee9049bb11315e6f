"""Runs that need bitsandbytes: QLoRA (NF4 base with double quantization, bf16 compute, peft's
prepare_model_for_kbit_training) and 8-bit AdamW. Run on a GPU: OUT=DIR python3 measure.py --cases=cases_bnb
(bitsandbytes installed from a carried wheel; see the fidelity issue). Compare QLoRA on peak_steps_1_2 / peak_steady:
peak_run also holds the bf16 weights before they are quantized."""
from cases import MODELS, ENC_DEC


def R(model, method, batch, seq, gc=False, split="dev", attn="sdpa", **kw):
    return dict(model=model, method=method, batch=batch, seq=seq, grad_ckpt=gc, split=split, attn=attn, **kw)


RUNS = [
    R("llama2-7b", "qlora", 1, 512, lora_r=16, lora_targets="qv"),
    R("llama2-7b", "qlora", 4, 1024, gc=True, lora_r=64, lora_targets="all"),
    R("tinyllama-1.1b", "qlora", 8, 1024, lora_r=16, lora_targets="all"),
    R("tinyllama-1.1b", "full", 4, 512, optimizer="adamw8bit"),
    R("qwen2.5-0.5b", "full_bf16", 4, 1024, optimizer="adamw8bit"),
]

RUNS += [  # ftplan session: paged optimizers (states in CUDA unified memory)
    R("tinyllama-1.1b", "full", 4, 512, optimizer="paged_adamw_32bit"),
    R("tinyllama-1.1b", "full", 4, 512, optimizer="paged_adamw_8bit"),
    R("llama2-7b", "qlora", 4, 1024, gc=True, lora_r=64, lora_targets="all", optimizer="paged_adamw_32bit"),
]
