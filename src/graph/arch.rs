//! The op sequence of each architecture family: embeddings, blocks, head and loss, with the
//! method's insertions (`peft`'s adapters, prompts and prefixes) placed where peft puts them.

use crate::graph::attention::AttnMask;
use crate::graph::build::{Builder, Val};
use crate::graph::op::{Name, OpGraph, ParamId, ParamRole, Scope};

/// Every parameter role, for checking that a run of blocks trains uniformly.
const ROLES: [ParamRole; 6] = [
    ParamRole::Embedding,
    ParamRole::Linear,
    ParamRole::Bias,
    ParamRole::Norm,
    ParamRole::NormBias,
    ParamRole::Adapter,
];
use crate::spec::model::{Family, ModelSpec, Positions, Stack};
use crate::spec::plan::{Method, Plan, Proj};

/// Which part of the model a graph covers: the whole model, or one pipeline stage (the first
/// holds the embeddings, the last the final norm, LM head and loss; Narayanan et al. 2021).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage {
    pub first: bool,
    pub last: bool,
}

impl Stage {
    pub const WHOLE: Stage = Stage {
        first: true,
        last: true,
    };
}

/// Builds the op graph of one training step.
pub fn build(model: &ModelSpec, plan: &Plan) -> OpGraph {
    build_stage(model, plan, Stage::WHOLE)
}

/// Builds the graph of one pipeline stage (decoder-only models): a later stage receives its
/// input activation from the previous stage and sends its output on.
pub fn build_stage(model: &ModelSpec, plan: &Plan, stage: Stage) -> OpGraph {
    let mut b = Builder::new(model, plan);
    b.stage = stage;
    // Megatron-LM keeps a copy of tied word embeddings on the last stage for the LM head.
    let embed = (stage.first || (stage.last && model.tie_word_embeddings)).then(|| {
        b.base_param(
            Name::root("embed_tokens"),
            (model.vocab_size, model.hidden_size),
            ParamRole::Embedding,
        )
    });
    let memory = match model.encoder {
        Some(enc) => {
            let src = plan.seq + plan.method.prompt_tokens();
            let encoder_scope = b.scope(Scope::default(), "encoder");
            let out = stack_forward(&mut b, encoder_scope, embed, &enc, src, None);
            Some(out)
        }
        None => None,
    };
    let seq = if model.is_encoder_decoder() {
        plan.target_seq
    } else {
        plan.seq
    };
    let seq = seq + plan.method.prompt_tokens();
    let decoder_scope = b.scope(Scope::default(), "decoder");
    let (x, _) = stack_forward(&mut b, decoder_scope, embed, &model.decoder, seq, memory);
    if !stage.last {
        return b.finish();
    }
    let x = if model.family == Family::T5 && model.tie_word_embeddings {
        // T5 rescales by d_model^-0.5 before a tied LM head (a scalar multiply: saves nothing).
        b.cast(Name::root("lm_head").then("rescale"), x, x.dtype)
    } else {
        x
    };
    let head = match embed.filter(|_| model.tie_word_embeddings) {
        Some(tied) => tied,
        None => b.base_param(
            Name::root("lm_head"),
            (model.vocab_size, model.hidden_size),
            ParamRole::Embedding,
        ),
    };
    b.lm_head_and_loss(x, head, model.lm_head_bias);
    b.finish()
}

/// The encoder (when `memory` is None and the model is encoder-decoder) or the decoder stack.
fn stack_forward(
    b: &mut Builder,
    name: Scope,
    embed: Option<ParamId>,
    stack: &Stack,
    seq: u64,
    memory: Option<(Val, u64)>,
) -> (Val, u64) {
    let model = b.model;
    let plan = b.plan;
    let batch = plan.batch;
    let tokens = batch.saturating_mul(seq);
    let h = model.hidden_size;
    let is_decoder = memory.is_some() || !model.is_encoder_decoder();

    let first = b.stage.first;
    let mut x = match embed.filter(|_| first) {
        // A later pipeline stage: the previous stage's output arrives, and its gradient goes
        // back, in the dtype the embedding produced.
        None => b.val(h, tokens, b.base, true),
        Some(embed_param) => {
            let mut x = b.embedding(
                name.at("embed_tokens"),
                embed_param,
                h,
                batch * (seq - plan.method.prompt_tokens()),
            );
            if let Method::Prompt { virtual_tokens } = plan.method {
                // peft's PromptEmbedding, cast to the embeddings' dtype and concatenated in front.
                let rows = virtual_tokens;
                let p = b.adapter_param(name.at("prompt_embeddings"), (rows, h));
                let prompt = b.embedding(name.at("prompt"), p, h, batch * rows);
                let prompt = b.cast(name.at("prompt").then("cast"), prompt, x.dtype);
                x = b.concat(name.at("prompt").then("cat"), prompt, x);
            }
            if let Positions::Learned { rows } = model.positions {
                let pos = b.base_param(name.at("embed_positions"), (rows, h), ParamRole::Embedding);
                let p = b.embedding(name.at("embed_positions"), pos, h, tokens);
                x = b.add(name.at("embed").then("add"), x, p);
            }
            if model.family == Family::Bart {
                x = b.norm(name.at("layernorm_embedding"), x);
            }
            x = b.dropout(name.at("embed").then("dropout"), x, model.dropout.embedding);
            if plan.grad_ckpt && !x.grad {
                // `enable_input_require_grads`: checkpointing a frozen model needs a grad-requiring input.
                x.grad = true;
            }
            x
        }
    };
    let embed_dtype = x.dtype;

    // Prefix tuning: one embedding of virtual_tokens x (layers x 2 x kv width), cast to the base
    // dtype and concatenated before each layer's keys and values.
    let prefix = plan.method.prefix_tokens();
    if prefix > 0 && first {
        let kv_width = stack.kv_heads * stack.head_dim;
        let p = b.adapter_param(
            name.at("prefix_encoder"),
            (prefix, stack.layers * 2 * kv_width),
        );
        b.embedding(
            name.at("prefix"),
            p,
            stack.layers * 2 * kv_width,
            batch * prefix,
        );
    }
    if model.family == Family::T5
        && let Positions::RelativeBias { buckets } = model.positions
    {
        b.base_param(
            name.at("relative_attention_bias"),
            (buckets, stack.heads),
            ParamRole::Embedding,
        );
    }

    // Layer 0 is built on its own (gradients may start inside it); layers 1..L-1 are the same
    // ops on the same shapes, so they are built once and marked as L-1 copies.
    // Blocks are numbered across the encoder, then the decoder (what `Method::trains` reads).
    let offset = if memory.is_some() {
        model.encoder.map_or(0, |e| e.layers)
    } else {
        0
    };
    // A run of identical blocks must train identically: it ends where the method's choice
    // changes (the boundary of `--method freeze`).
    let total = b.layers;
    let same = |a: u64, c: u64| {
        ROLES.iter().all(|&r| {
            plan.method.trains(r, Some(a), total) == plan.method.trains(r, Some(c), total)
        })
    };
    let mut layer = 0;
    while layer < stack.layers {
        let rest = stack.layers - layer;
        let mut copies = if layer >= 1 && rest > 1 { rest } else { 1 };
        if let Some(j) = (1..copies).find(|&j| !same(offset + layer, offset + layer + j)) {
            copies = j;
        }
        let copies = u32::try_from(copies).unwrap_or(u32::MAX);
        let label = if copies > 1 {
            format!("layers.{layer}-{}", layer + u64::from(copies) - 1)
        } else {
            format!("layers.{layer}")
        };
        let ln = b.scope(name, &label);
        b.set_repeat(copies);
        b.layer = Some(offset + layer);
        b.begin_block(x);
        x = block(b, ln, x, stack, seq, embed_dtype, is_decoder, memory);
        b.end_block();
        b.layer = None;
        b.set_repeat(1);
        layer += u64::from(copies);
    }
    if model.family != Family::Bart && b.stage.last {
        x = b.norm(name.at("final_norm"), x);
    }
    if model.family == Family::T5 {
        x = b.dropout(name.at("final_dropout"), x, model.dropout.residual);
    }
    (x, seq)
}

/// One transformer block.
#[expect(clippy::too_many_arguments)]
fn block(
    b: &mut Builder,
    name: Scope,
    x: Val,
    stack: &Stack,
    seq: u64,
    embed_dtype: crate::units::DType,
    is_decoder: bool,
    memory: Option<(Val, u64)>,
) -> Val {
    let model = b.model;
    let p_res = model.dropout.residual;
    let self_mask = self_attention_mask(b, is_decoder);
    if model.parallel_block {
        // Phi / Falcon: attention and MLP read one norm output; both add to the residual.
        let h = b.norm(name.at("input_layernorm"), x);
        let a = self_attention(b, (name, "attn"), h, stack, seq, embed_dtype, self_mask);
        let a = b.dropout(name.at("attn").then("dropout"), a, p_res);
        // GPT-NeoX normalises the input again for the MLP (`post_attention_layernorm(x)`).
        let h = if model.parallel_two_norms {
            b.norm(name.at("post_attention_layernorm"), x)
        } else {
            h
        };
        let m = mlp(b, (name, "mlp"), h, stack);
        let m = adapter(b, name.at("adapter"), m);
        let m = b.dropout(name.at("mlp").then("dropout"), m, p_res);
        let sum = b.add(name.at("parallel").then("add"), a, m);
        return b.add(name.at("residual"), x, sum);
    }
    if model.post_norm {
        // BART: sub-layer, dropout, residual add, then LayerNorm.
        let a = self_attention(
            b,
            (name, "self_attn"),
            x,
            stack,
            seq,
            embed_dtype,
            self_mask,
        );
        let a = b.dropout(name.at("self_attn").then("dropout"), a, p_res);
        let mut x = b.add(name.at("self_attn").then("residual"), x, a);
        x = b.norm(name.at("self_attn_layer_norm"), x);
        if let Some(mem) = memory {
            let c = cross_attention(b, (name, "encoder_attn"), x, mem, stack, seq);
            let c = b.dropout(name.at("encoder_attn").then("dropout"), c, p_res);
            x = b.add(name.at("encoder_attn").then("residual"), x, c);
            x = b.norm(name.at("encoder_attn_layer_norm"), x);
        }
        let m = mlp(b, (name, "mlp"), x, stack);
        let m = adapter(b, name.at("adapter"), m);
        let m = b.dropout(name.at("mlp").then("dropout"), m, p_res);
        let x = b.add(name.at("mlp").then("residual"), x, m);
        return b.norm(name.at("final_layer_norm"), x);
    }
    // Pre-norm (Llama, GPT-2, OPT, T5).
    let h = b.norm(name.at("input_layernorm"), x);
    let a = self_attention(
        b,
        (name, "self_attn"),
        h,
        stack,
        seq,
        embed_dtype,
        self_mask,
    );
    let a = b.dropout(name.at("self_attn").then("dropout"), a, p_res);
    let mut x = b.add(name.at("self_attn").then("residual"), x, a);
    if let Some(mem) = memory {
        let h = b.norm(name.at("cross_layernorm"), x);
        let c = cross_attention(b, (name, "cross_attn"), h, mem, stack, seq);
        let c = b.dropout(name.at("cross_attn").then("dropout"), c, p_res);
        x = b.add(name.at("cross_attn").then("residual"), x, c);
    }
    let h = b.norm(name.at("post_attention_layernorm"), x);
    let m = mlp(b, (name, "mlp"), h, stack);
    let m = if model.family == Family::Gpt2 {
        b.dropout(name.at("mlp").then("dropout"), m, p_res)
    } else {
        m
    };
    let m = adapter(b, name.at("adapter"), m);
    let m = if model.family == Family::Gpt2 {
        m
    } else {
        b.dropout(name.at("mlp").then("dropout"), m, p_res)
    };
    b.add(name.at("mlp").then("residual"), x, m)
}

fn self_attention_mask(b: &Builder, is_decoder: bool) -> AttnMask {
    let model = b.model;
    match model.positions {
        Positions::RelativeBias { .. } if b.is_base_trainable() => AttnMask::TrainableBias,
        Positions::RelativeBias { .. } => AttnMask::FrozenBias,
        _ if b.plan.method.prefix_tokens() > 0 => AttnMask::Explicit,
        _ if is_decoder => AttnMask::Causal,
        _ => AttnMask::Full,
    }
}

/// The bottleneck adapter after the FFN output, when the method is `adapter`.
fn adapter(b: &mut Builder, name: Name, x: Val) -> Val {
    match b.plan.method {
        Method::Adapter { size } => b.bottleneck(name, x, size),
        _ => x,
    }
}

/// q/k/v projections, positions, the attention core and the output projection: a
/// tensor-parallel region.
fn self_attention(
    b: &mut Builder,
    at: (Scope, &'static str),
    x: Val,
    stack: &Stack,
    seq: u64,
    embed_dtype: crate::units::DType,
    mask: AttnMask,
) -> Val {
    in_tp_region(b, |b| {
        self_attention_ops(b, at, x, stack, seq, embed_dtype, mask)
    })
}

fn self_attention_ops(
    b: &mut Builder,
    at: (Scope, &'static str),
    x: Val,
    stack: &Stack,
    seq: u64,
    embed_dtype: crate::units::DType,
    mask: AttnMask,
) -> Val {
    let name = b.scope(at.0, at.1);
    let model = b.model;
    let q_width = stack.heads * stack.head_dim;
    let kv_width = stack.kv_heads * stack.head_dim;
    let (mut q, mut k, mut v) = if model.fused_qkv {
        let qkv = b.linear(
            name.at("qkv"),
            x,
            q_width + 2 * kv_width,
            model.qkv_bias,
            Some(Proj::Q),
        );
        (
            Val {
                width: q_width,
                ..qkv
            },
            Val {
                width: kv_width,
                ..qkv
            },
            Val {
                width: kv_width,
                ..qkv
            },
        )
    } else {
        let q = b.linear(name.at("q_proj"), x, q_width, model.qkv_bias, Some(Proj::Q));
        let k = b.linear(
            name.at("k_proj"),
            x,
            kv_width,
            model.qkv_bias,
            Some(Proj::K),
        );
        let v = b.linear(
            name.at("v_proj"),
            x,
            kv_width,
            model.qkv_bias,
            Some(Proj::V),
        );
        (q, k, v)
    };
    if model.qk_norm {
        // Qwen3: `q_norm(q.view(..., head_dim))`, the same for k, before rotary.
        q = b.norm_sized(name.at("q_norm"), q, stack.head_dim);
        k = b.norm_sized(name.at("k_norm"), k, stack.head_dim);
    }
    if let Positions::Rotary { .. } = model.positions {
        q = b.rotary(name.at("rotary_q"), q, embed_dtype);
        k = b.rotary(name.at("rotary_k"), k, embed_dtype);
    }
    let batch = b.plan.batch;
    let prefix = b.plan.method.prefix_tokens();
    let mut seq_k = seq;
    if prefix > 0 {
        // DynamicCache.update concatenates the prefix in front of the keys and values.
        seq_k += prefix;
        k = b.val(kv_width, batch * seq_k, k.dtype, true);
        v = b.val(kv_width, batch * seq_k, v.dtype, true);
    }
    let a = b.attention(name.at("core"), q, k, v, stack, batch, (seq, seq_k), mask);
    let o_bias = model.linear_bias;
    b.linear(
        name.at("o_proj"),
        a,
        model.hidden_size,
        o_bias,
        Some(Proj::O),
    )
}

/// Decoder cross-attention over the encoder output `memory` (keys and values from it).
fn cross_attention(
    b: &mut Builder,
    at: (Scope, &'static str),
    x: Val,
    memory: (Val, u64),
    stack: &Stack,
    seq: u64,
) -> Val {
    in_tp_region(b, |b| cross_attention_ops(b, at, x, memory, stack, seq))
}

fn cross_attention_ops(
    b: &mut Builder,
    at: (Scope, &'static str),
    x: Val,
    memory: (Val, u64),
    stack: &Stack,
    seq: u64,
) -> Val {
    let name = b.scope(at.0, at.1);
    let model = b.model;
    let (mem, mem_seq) = memory;
    let q_width = stack.heads * stack.head_dim;
    let kv_width = stack.kv_heads * stack.head_dim;
    let q = b.linear(name.at("q_proj"), x, q_width, model.qkv_bias, Some(Proj::Q));
    let k = b.linear(
        name.at("k_proj"),
        mem,
        kv_width,
        model.qkv_bias,
        Some(Proj::K),
    );
    let v = b.linear(
        name.at("v_proj"),
        mem,
        kv_width,
        model.qkv_bias,
        Some(Proj::V),
    );
    let batch = b.plan.batch;
    let mask = match model.positions {
        Positions::RelativeBias { .. } if b.is_base_trainable() => AttnMask::TrainableBias,
        _ => AttnMask::Full,
    };
    let a = b.attention(name.at("core"), q, k, v, stack, batch, (seq, mem_seq), mask);
    b.linear(
        name.at("o_proj"),
        a,
        model.hidden_size,
        model.linear_bias,
        Some(Proj::O),
    )
}

/// The feed-forward network: gated (SwiGLU/GeGLU) or two-matrix.
/// The FFN: a tensor-parallel region.
fn mlp(b: &mut Builder, at: (Scope, &'static str), x: Val, stack: &Stack) -> Val {
    in_tp_region(b, |b| mlp_ops(b, at, x, stack))
}

/// Runs `f` with the builder inside a tensor-parallel region (Megatron's column-then-row
/// parallel pair), where sequence parallelism does not split activations.
fn in_tp_region(b: &mut Builder, f: impl FnOnce(&mut Builder) -> Val) -> Val {
    let outer = std::mem::replace(&mut b.tp_region, true);
    let out = f(b);
    b.tp_region = outer;
    out
}

fn mlp_ops(b: &mut Builder, at: (Scope, &'static str), x: Val, stack: &Stack) -> Val {
    if let Some(moe) = b.model.moe {
        return moe_ops(b, at, x, stack, moe);
    }
    let name = b.scope(at.0, at.1);
    let model = b.model;
    let inter = stack.intermediate_size;
    let bias = model.linear_bias;
    if model.gated_ffn {
        let g = b.linear(name.at("gate_proj"), x, inter, bias, Some(Proj::Gate));
        let u = b.linear(name.at("up_proj"), x, inter, bias, Some(Proj::Up));
        let a = b.activation(name.at("act"), g);
        let p = b.mul(name.at("gate_mul"), a, u);
        let p = b.dropout(name.at("act").then("dropout"), p, model.dropout.activation);
        b.linear(
            name.at("down_proj"),
            p,
            model.hidden_size,
            bias,
            Some(Proj::Down),
        )
    } else {
        let f = b.linear(name.at("fc1"), x, inter, bias, Some(Proj::Up));
        let a = b.activation(name.at("act"), f);
        let a = b.dropout(name.at("act").then("dropout"), a, model.dropout.activation);
        b.linear(name.at("fc2"), a, model.hidden_size, bias, Some(Proj::Down))
    }
}

/// transformers' sparse MoE block (`MixtralSparseMoeBlock`): router logits from a linear `gate`
/// (h -> experts, no bias; not a LoRA target, so LoRA's `gate`/`w1` means the experts' gate
/// projections), a softmax in fp32 over the experts and top-k; each expert, a gated FFN
/// (`w1`, `w3`, `w2`), runs on the tokens routed to it (gathered with `index_select`), its
/// output scaled by the routing weight and added back with `index_add_`. Routing is taken as
/// uniform: each expert receives tokens x top_k / experts.
fn moe_ops(
    b: &mut Builder,
    at: (Scope, &'static str),
    x: Val,
    stack: &Stack,
    moe: crate::spec::model::Moe,
) -> Val {
    let name = b.scope(at.0, at.1);
    let h = b.model.hidden_size;
    let inter = stack.intermediate_size;
    let experts = moe.experts.max(1);
    let mut router = b.linear(name.at("gate"), x, experts, false, None);
    let router_lora = b
        .plan
        .method
        .lora()
        .filter(|l| l.targets == crate::spec::plan::LoraTargets::AllLinear)
        .map(|l| l.rank);
    if let Some(r) = router_lora {
        // peft's `all-linear` wraps the router too.
        let a = b.adapter_param(name.at("gate").then("lora_A"), (r, h));
        let bb = b.adapter_param(name.at("gate").then("lora_B"), (experts, r));
        let mid = b.lora_matmul(name.at("gate").then("lora_A"), x, r, a, x.grad);
        let up = b.lora_matmul(name.at("gate").then("lora_B"), mid, experts, bb, true);
        router = b.add(name.at("gate").then("lora_add"), router, up);
    }
    let probs = b.cast(
        name.at("router").then("softmax"),
        router,
        crate::units::DType::F32,
    );
    let routed = (x.tokens * moe.top_k).div_ceil(experts);
    let out = b.val(h, x.tokens, x.dtype, x.grad || b.is_base_trainable());
    // LoRA on the experts as peft 0.21 reaches transformers 5's 3-D expert parameters
    // (`gate_up_proj` [E, 2 inter, h], `down_proj` [E, h, inter]; `ParamWrapper`): factors
    // shared across experts with E x r rows, the delta `B @ A` added to the whole parameter
    // every forward; the experts' matmuls then keep the merged (bf16) weights and their inputs
    // for backward.
    let gate_up = b.lora_on(Some(Proj::Gate)).or(b.lora_on(Some(Proj::Up)));
    let down = b.lora_on(Some(Proj::Down));
    if gate_up.is_some() || down.is_some() {
        let mut params = smallvec::SmallVec::<[crate::graph::op::ParamId; 3]>::new();
        let (mut merged, mut largest) = (0u64, 0u64);
        if let Some(r) = gate_up {
            let rows = 2 * r * experts;
            params.push(b.adapter_param(name.at("experts").then("gate_up_lora_A"), (rows, h)));
            params.push(
                b.adapter_param(name.at("experts").then("gate_up_lora_B"), (2 * inter, rows)),
            );
            merged += experts * 2 * inter * h;
            largest = largest.max(experts * 2 * inter * h);
        }
        if let Some(r) = down {
            let rows = r * experts;
            params.push(b.adapter_param(name.at("experts").then("down_lora_A"), (rows, inter)));
            params.push(b.adapter_param(name.at("experts").then("down_lora_B"), (h, rows)));
            merged += experts * h * inter;
            largest = largest.max(experts * h * inter);
        }
        let compute = b.compute();
        let kept = b.tensor(
            crate::graph::op::TensorKind::Activation,
            compute.bytes(merged) + compute.bytes(x.tokens * moe.top_k * (h + inter)),
        );
        let merge = b.val(1, 1, compute, true);
        let op = b.elementwise(
            name.at("experts").then("lora_merge"),
            &[],
            merge,
            smallvec::smallvec![kept],
            0.0,
        );
        if let Some(o) = b.graph.op_mut(op) {
            o.params.extend(params);
            // The fp32 delta and the merged parameter, one wrapped parameter at a time.
            o.forward_transient += crate::units::DType::F32.bytes(largest) * 2;
            o.cost.forward_flops =
                crate::units::Flops(2.0 * (merged * (gate_up.or(down).unwrap_or(0))) as f64);
        }
    }
    let expert_lora = gate_up.is_none() && down.is_none();
    for e in 0..experts {
        let es = b.scope(name, &format!("experts.{e}"));
        // index_select of this expert's tokens (its backward scatters the gradient back).
        let xe = b.val(x.width, routed, x.dtype, x.grad);
        b.elementwise(es.at("gather"), &[x], xe, smallvec::SmallVec::new(), 0.0);
        let role = |p: Proj| expert_lora.then_some(p);
        let g = b.linear(es.at("w1"), xe, inter, false, role(Proj::Gate));
        let u = b.linear(es.at("w3"), xe, inter, false, role(Proj::Up));
        let a = b.activation(es.at("act"), g);
        let p = b.mul(es.at("mul"), a, u);
        let d = b.linear(es.at("w2"), p, h, false, role(Proj::Down));
        // Scaled by its routing weights (kept for backward), then index_add_ into the output.
        let w = b.val(1, routed, probs.dtype, probs.grad);
        let scaled = b.mul(es.at("weight"), d, w);
        b.elementwise(
            es.at("index_add"),
            &[scaled],
            out,
            smallvec::SmallVec::new(),
            1.0,
        );
    }
    out
}
