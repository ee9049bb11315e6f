//! The op sequence of each architecture family: embeddings, blocks, head and loss, with the
//! method's insertions (`peft`'s adapters, prompts and prefixes) placed where peft puts them.

use crate::graph::attention::{AttnCall, AttnMask};
use crate::graph::build::{Builder, OpSpec, Val, wider};
use crate::graph::op::{
    Cost, Name, OpGraph, OpKind, ParamId, ParamRole, Scope, Tensor, TensorId, TensorKind,
};
use crate::units::{Bytes, DType, Flops};
use smallvec::SmallVec;

/// Every parameter role, for checking that a run of blocks trains uniformly.
const ROLES: [ParamRole; 6] = [
    ParamRole::Embedding,
    ParamRole::Linear,
    ParamRole::Bias,
    ParamRole::Norm,
    ParamRole::NormBias,
    ParamRole::Adapter,
];
use crate::spec::model::{
    AttentionGate, BlockKind, ExpertGate, Family, FfnKind, Mixer, ModelSpec, NormPlacement,
    Positions, QkNorm, QkOrder, QueryScale, RotaryApply, Stack, VisionTower,
};
use crate::spec::plan::{Depth, LoraTargets, Method, Plan, Proj};

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
    b.graph.buffers = model.buffers;
    // Megatron-LM keeps a copy of tied word embeddings on the last stage for the LM head.
    let embed = (stage.first || (stage.last && model.tie_word_embeddings)).then(|| {
        b.base_param(
            Name::root("embed_tokens"),
            (model.vocab_size, model.hidden_size),
            ParamRole::Embedding,
        )
    });
    if let Some(tower) = model.vision.filter(|_| stage.first) {
        vision_tower(&mut b, &tower);
    }
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
    // peft's prompt tuning prepends the virtual tokens to the encoder's input only in a
    // seq2seq model (`PeftModelForSeq2SeqLM.forward`, PROMPT_TUNING branch).
    let seq = if model.is_encoder_decoder() {
        seq
    } else {
        seq + plan.method.prompt_tokens()
    };
    let decoder_scope = b.scope(Scope::default(), "decoder");
    let (x, _) = stack_forward(&mut b, decoder_scope, embed, &model.decoder, seq, memory);
    if !stage.last {
        return b.finish();
    }
    let x = if model.family.is_t5() && model.tie_word_embeddings {
        // T5 rescales by d_model^-0.5 before a tied LM head (a scalar multiply: saves nothing).
        b.scale(Name::root("lm_head").then("rescale"), x)
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

/// A multimodal checkpoint's vision tower and projector: weights that text-only training loads
/// and never runs, so no op reads them. Full fine-tuning leaves them `requires_grad`: counted as
/// trainable (as `requires_grad` counts them), but autograd gives them no `.grad`, so the
/// optimizer keeps no state for them (`idle`). peft matches target names anywhere in the model:
/// `q_proj`, `k_proj`, `v_proj` and `out_proj` name the tower's attention projections too, and
/// `all-linear` also takes `fc1` and `fc2`; the factors it adds there are trainable and idle.
fn vision_tower(b: &mut Builder, tower: &VisionTower) {
    let full = b.plan.method == Method::Full;
    let (base, storage) = (b.base, b.storage_base);
    let tower_param = b.param(
        Name::root("vision_tower"),
        (tower.params, 1),
        base,
        storage,
        full,
        ParamRole::Linear,
    );
    if let Some(p) = b.graph.params.get_mut(tower_param.0 as usize) {
        p.idle = full;
    }
    let Some(lora) = b.plan.method.lora() else {
        return;
    };
    let (h, i) = (tower.hidden, tower.intermediate);
    let attention = |proj: Proj| lora.targets.reaches(proj);
    let mlp = lora.targets == LoraTargets::AllLinear;
    // (module, in, out, hit) per encoder layer; the pooling head has one more `out_proj`, `fc1`
    // and `fc2`.
    let sites = [
        ("q_proj", h, h, attention(Proj::Q)),
        ("k_proj", h, h, attention(Proj::K)),
        ("v_proj", h, h, attention(Proj::V)),
        ("out_proj", h, h, attention(Proj::OutProj)),
        ("fc1", h, i, mlp),
        ("fc2", i, h, mlp),
    ];
    for (module, inputs, outputs, hit) in sites {
        if !hit {
            continue;
        }
        let copies =
            tower.layers + u64::from(tower.head && matches!(module, "out_proj" | "fc1" | "fc2"));
        b.idle_lora(
            Name::root("vision_tower").then(module),
            (inputs, outputs),
            Some(copies),
        );
    }
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
    // Blocks are numbered across the encoder, then the decoder (what `Method::trains` reads).
    let offset = if memory.is_some() {
        model.encoder.map_or(0, |e| e.layers)
    } else {
        0
    };
    // Virtual tokens in front of this stack's input: every causal LM's, a seq2seq encoder's.
    let prompted = if is_decoder && model.is_encoder_decoder() {
        0
    } else {
        plan.method.prompt_tokens()
    };

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
                batch * (seq - prompted),
            );
            if model.multipliers.token_embedding != 1.0 {
                // MiniCPM3ScaledWordEmbedding: `super().forward(input_ids) * embed_scale`, in
                // the embedding module itself (so before peft's prompt, and the lookup the
                // input-require-grads hook below sees is the scaled one).
                x = b.scale(name.at("embed_tokens").then("scale"), x);
            }
            if plan.grad_ckpt && !x.grad {
                // `enable_input_require_grads`, which transformers' Trainer and peft call when
                // a frozen model is checkpointed (a checkpoint needs a grad-requiring input): a
                // forward hook on the input-embedding module calls `requires_grad_()` on its
                // output, which becomes a leaf that requires grad. Every op from there to the
                // first block records autograd and saves what it saves (BART's
                // `layernorm_embedding` its fp32 input under autocast), and the leaf's
                // AccumulateGrad node holds it until backward ends.
                x.grad = true;
                b.hold(name.at("embed_tokens").then("input_require_grads"), x);
            }
            if let (Method::Prompt { virtual_tokens }, true) = (&plan.method, prompted > 0) {
                // peft's PromptEmbedding, cast to the embeddings' dtype and concatenated in
                // front. A seq2seq model's table has a row set per transformer submodule
                // (`num_transformer_submodules` = 2), all looked up and cast; the encoder's
                // first `virtual_tokens` are used.
                let rows = *virtual_tokens * if model.is_encoder_decoder() { 2 } else { 1 };
                let p = b.adapter_param(name.at("prompt_embeddings"), (rows, h));
                let prompt = b.embedding(name.at("prompt"), p, h, batch * rows);
                let prompt = b.cast(name.at("prompt").then("cast"), prompt, x.dtype);
                let used = b.val(h, batch * *virtual_tokens, x.dtype, prompt.grad);
                x = b.concat(name.at("prompt").then("cat"), used, x);
            }
            if model.multipliers.embedding != 1.0 {
                // Granite: `inputs_embeds * embedding_multiplier`.
                x = b.scale(name.at("embed").then("multiplier"), x);
            }
            let table = match model.positions {
                Positions::Learned { rows } => {
                    Some(b.base_param(name.at("embed_positions"), (rows, h), ParamRole::Embedding))
                }
                Positions::Sinusoidal { rows } => {
                    Some(b.frozen_param(name.at("embed_positions"), (rows, h)))
                }
                _ => None,
            };
            if let Some(pos) = table {
                let p = b.embedding(name.at("embed_positions"), pos, h, tokens);
                x = b.add(name.at("embed").then("add"), x, p);
            }
            if model.embedding_norm {
                // BART's `layernorm_embedding`, BLOOM's `word_embeddings_layernorm`: it trains
                // with the stack's bottom block (what `--method freeze` reads).
                b.layer = Some(offset);
                x = b.norm(name.at("embedding_norm"), x);
                b.layer = None;
            }
            x = b.dropout(name.at("embed").then("dropout"), x, model.dropout.embedding);
            x
        }
    };
    let embed_dtype = x.dtype;
    let tables = rotary_tables(model, stack, seq, embed_dtype);
    if tables > Bytes::ZERO {
        let t = b.tensor(TensorKind::Activation, tables);
        b.hold_tensor(name.at("position_embeddings"), t, embed_dtype);
    }
    if let (Some(ple), Some(_), true) = (model.per_layer_input, embed, first) {
        b.per_layer_inputs = Some(per_layer_inputs(b, name, x, ple, stack.layers));
    }

    // Prefix tuning: one embedding of virtual_tokens x (layers x 2 x kv width), cast to the base
    // dtype and concatenated before each layer's keys and values. peft hands them to the model
    // as its key/value cache, which only a decoder's self-attention reads: a seq2seq encoder
    // takes no cache, and `PeftModel.get_prompt` empties the cross-attention cache
    // (`cross_attention_cache = DynamicCache()`, peft 0.21), so an encoder-decoder's encoder
    // runs unchanged, and with a frozen base it keeps nothing for backward (checked on BART and
    // T5 on CPU: encoder keys are the source length, decoder self-attention keys are the
    // prefix plus the target, cross-attention keys the source).
    let prefix = if is_decoder {
        plan.method.prefix_tokens()
    } else {
        0
    };
    b.prefix = prefix;
    if prefix > 0 && first {
        let width = model
            .peft_prefix_width()
            .unwrap_or(stack.kv_heads * stack.head_dim);
        let p = b.adapter_param(
            name.at("prefix_encoder"),
            (prefix, stack.layers * 2 * width),
        );
        b.embedding(
            name.at("prefix"),
            p,
            stack.layers * 2 * width,
            batch * prefix,
        );
    }
    // T5 under checkpointing: the stack's first block computes the relative position bias, a
    // (1, heads, q, k) view of its embedding lookup in that table's dtype, and the stack hands
    // it to every later block as an argument (`T5Stack.forward`), so each block's checkpoint
    // holds it for its recomputation until that block's backward; the first block recomputes
    // it there. A decoder block's cross-attention gets a zeros bias (1, heads, q, source) in
    // the queries' dtype, made in the first block and handed on the same way; transformers
    // sets `requires_grad` on it, a leaf that its `AccumulateGrad` node keeps to the end of
    // backward (`Tensor::graph_held`).
    //
    // Each block's attention adds its bias gradient (the scores' gradient summed over the
    // batch) to the one autograd accumulates for the bias: in the `InputBuffer` of the first
    // block's lookup, from the last block's attention backward to the first's, when the table
    // trains; and for the zeros, a leaf, in its `.grad`, kept to the end (`Tensor::graph_held`).
    let mut position_biases: SmallVec<[TensorId; 2]> = SmallVec::new();
    b.bias_grads.clear();
    if model.family.is_t5()
        && let Positions::RelativeBias { buckets } = model.positions
    {
        let table = b.base_param(
            name.at("relative_attention_bias"),
            (buckets, stack.heads),
            ParamRole::Embedding,
        );
        let table = b.graph.param(table);
        let (dtype, trains) = (table.dtype, table.trainable);
        let keys = seq + prefix;
        let bias = dtype.bytes(stack.heads * seq * keys);
        if trains {
            let g = b.tensor(TensorKind::Activation, bias);
            b.bias_grads.push((AttnMask::StridedBias, g));
            if !plan.grad_ckpt {
                // The lookup (`nn.Embedding` over the (q, k) bucket indices) keeps its int64
                // indices for the table's gradient (`embedding_dense_backward`), from the first
                // block's forward to its backward. (Checkpointed, only the first block's
                // recomputation keeps them, at the very end of backward.)
                let buckets = b.tensor(TensorKind::Activation, DType::I64.bytes(seq * keys));
                b.hold_tensor(
                    name.at("relative_attention_bias").then("buckets"),
                    buckets,
                    DType::I64,
                );
            }
        }
        if plan.grad_ckpt {
            position_biases.push(b.tensor(TensorKind::Activation, bias));
            if let Some((_, source)) = memory {
                let queries = if b.autocast { b.half } else { b.base };
                let zeros = queries.bytes(stack.heads * seq * source);
                let held = |b: &mut Builder| {
                    b.graph.add_tensor(Tensor {
                        graph_held: true,
                        ..Tensor::new(TensorKind::Activation, zeros)
                    })
                };
                position_biases.push(held(b));
                let g = held(b);
                b.bias_grads
                    .push((AttnMask::ContiguousBias { grad: true }, g));
            }
        }
    }

    // Eager attention in a decoder-only model: one materialised mask per mask type (full,
    // sliding), which checkpointing keeps to the end of backward. Without checkpointing the
    // model's forward names them (`causal_mask_mapping`) until its blocks are done, and nothing
    // keeps them after (a CPU replay of BLOOM, which peaks in its forward, holds its fp32 mask
    // there). Latent attention's models build theirs as every other does (three checkpointed
    // eager DeepSeek-V2-Lite replays keep its (B, 1, S, S) bf16 mask: 134 MB at 4 x 4,096).
    let mut masks = None;
    if b.plan.attention == crate::spec::plan::AttentionKernel::Eager
        && first
        && model.has_attention()
        && !model.is_encoder_decoder()
    {
        let (full, sliding) = model.attention_kinds();
        let types = u64::from(full) + u64::from(sliding);
        let keys = seq + prefix;
        let bytes = embed_dtype.bytes(batch * seq * keys * types);
        if !plan.grad_ckpt {
            masks = Some(b.tensor(TensorKind::Activation, bytes));
        } else if !matches!(model.positions, Positions::Alibi) {
            b.checkpointed_masks(bytes);
        }
    }
    // SDPA's sliding window, where the layers' calls get a mask (`self_attention_mask`: once
    // the keys reach it): `sdpa_mask` materialises one boolean (1, 1, q, k) mask for the
    // sliding layers (no batch dimension without a padding mask), which the model's forward
    // names until the blocks are done, and checkpointing keeps to the end of backward as it
    // does eager's (a CPU replay of checkpointed Gemma 4 holds it at the loss's backward;
    // Command R7B's, 8,192 x 8,192, was the whole of its -0.2 %).
    // DeepSeek Sparse Attention's model builds its causal mask the same way, at any length
    // (`allow_is_causal_skip=False`, for the indexer).
    if b.plan.attention == crate::spec::plan::AttentionKernel::Sdpa
        && first
        && prefix == 0
        && !model.is_encoder_decoder()
        && (model.indexer().is_some()
            || model.mixers.iter().any(|m| {
                matches!(m, Mixer::SlidingWindow { window }
                if self_attention_mask(b, true, seq, Some(*window)) == AttnMask::Explicit)
            }))
    {
        let bytes = DType::U8.bytes(seq.saturating_mul(seq));
        if plan.grad_ckpt {
            b.checkpointed_masks(bytes);
        } else {
            masks = Some(b.tensor(TensorKind::Activation, bytes));
        }
    }

    // Blocks are built once per kind and marked as copies: the model is cut into segments
    // that train alike (the boundary of `--method freeze`); each segment's first block is built
    // on its own (gradients may start inside it), and the rest are grouped by what they are
    // made of (`BlockKind`: Gemma-2's local and global layers, DeepSeek's dense and sparse
    // ones), the kind of the segment's last block built last. Every copy is the same ops on
    // the same shapes, so the order inside a segment does not change the sums.
    let all_layers = b.layers;
    let depth = |layer| Depth {
        layer: Some(layer),
        layers: all_layers,
        encoder_layers: model.encoder.map_or(0, |e| e.layers),
    };
    let same = |a: u64, c: u64| {
        ROLES
            .iter()
            .all(|&r| plan.method.trains(r, depth(a)) == plan.method.trains(r, depth(c)))
    };
    let kind_of = |l: u64| {
        if memory.is_none() && model.is_encoder_decoder() {
            BlockKind {
                mixer: Mixer::Attention,
                ffn: FfnKind::Dense,
                rope: true,
                kv_shared: false,
                topk_shared: false,
            }
        } else {
            model.block_kind(l)
        }
    };
    // GLM-5's layers return their top-k indices, (B, S, top-k) int32, to the model's loop,
    // which names the latest until the blocks are done and hands it to the next layer as
    // `prev_topk_indices`; under checkpointing each layer's checkpoint keeps that argument
    // (`GradientCheckpointingLayer` binds its keyword arguments into the recomputed call) to
    // its backward: one tensor per layer that runs an indexer, but the last.
    let (mut topk, mut held_topk) = (None, Bytes::ZERO);
    if let Some(ix) = model.indexer().filter(|ix| ix.returns_topk && first) {
        let bytes = Bytes(
            (batch * seq)
                .saturating_mul(ix.topk.min(seq))
                .saturating_mul(4),
        );
        topk = Some(b.tensor(TensorKind::Activation, bytes));
        let running = (0..stack.layers.saturating_sub(1))
            .filter(|&l| !model.reuses_topk(l))
            .count() as u64;
        held_topk = bytes * running;
    }
    // The model's forward names the stack's input (`inputs_embeds`) and its masks until the
    // blocks are done.
    let stack_named = b.name(&[x.id]);
    b.name(masks.as_slice());
    b.name(topk.as_slice());
    let run = |b: &mut Builder, x: Val, (kind, first, copies): (BlockKind, u64, u64)| {
        let label = if copies > 1 {
            format!("layers.{first}+{}", copies - 1)
        } else {
            format!("layers.{first}")
        };
        let ln = b.scope(name, &label);
        b.set_repeat(u32::try_from(copies).unwrap_or(u32::MAX));
        b.layer = Some(offset + first);
        b.begin_block(x, memory.map(|(m, _)| m), &position_biases);
        // The model's loop names the block's input until the block returns.
        let named = b.name(&[x.id]);
        let out = block(b, ln, x, stack, seq, embed_dtype, is_decoder, memory, kind);
        b.unname(named);
        b.end_block();
        b.layer = None;
        b.set_repeat(1);
        out
    };
    let mut start = 0;
    while start < stack.layers {
        let mut end = start + 1;
        while end < stack.layers && same(offset + start, offset + end) {
            end += 1;
        }
        let uniform = (start + 1..end).all(|l| kind_of(l) == kind_of(start));
        if !x.grad && !uniform {
            // Until a block returns an output that needs a gradient (the stack's input needs
            // none: a frozen embedding, no checkpointing), no autograd graph is recorded, and
            // in a model of several kinds of blocks which one starts it depends on what each
            // holds: LoRA on attention only leaves a hybrid's Mamba and MLP layers below its
            // first attention layer untracked. So blocks are built one at a time, in order,
            // until one does; a later block of a kind already built without one is a copy of
            // it, and the copies of each such kind are built after, as one run, on an input
            // that needs no gradient (their order does not matter: they keep nothing). (Where
            // every block is of one kind, the first is built on its own below and decides for
            // the rest.)
            // (kind, the layer built, the first copy's layer, copies)
            let mut idle: Vec<(BlockKind, u64, u64, u64)> = Vec::new();
            while start < end && !x.grad {
                let k = kind_of(start);
                match idle.iter_mut().find(|r| r.0 == k) {
                    Some(r) => {
                        if r.3 == 0 {
                            r.2 = start;
                        }
                        r.3 += 1;
                        record_built_as(b, offset + start, offset + r.2);
                    }
                    None => {
                        record_built_as(b, offset + start, offset + start);
                        x = run(b, x, (k, start, 1));
                        if !x.grad {
                            idle.push((k, start, start, 0));
                        }
                    }
                }
                start += 1;
            }
            for (k, _, first, copies) in idle.into_iter().filter(|r| r.3 > 0) {
                run(b, Val { grad: false, ..x }, (k, first, copies));
            }
            continue;
        }
        // (kind, first layer, copies), in build order.
        let mut runs: Vec<(BlockKind, u64, u64)> = vec![(kind_of(start), start, 1)];
        let last_kind = kind_of(end - 1);
        let mut grouped: Vec<(BlockKind, u64, u64)> = Vec::new();
        record_built_as(b, offset + start, offset + start);
        for l in start + 1..end {
            let k = kind_of(l);
            let first = match grouped.iter_mut().find(|r| r.0 == k) {
                Some(r) => {
                    r.2 += 1;
                    r.1
                }
                None => {
                    grouped.push((k, l, 1));
                    l
                }
            };
            record_built_as(b, offset + l, offset + first);
        }
        if let Some(i) = grouped.iter().position(|r| r.0 == last_kind) {
            let r = grouped.remove(i);
            grouped.push(r);
        }
        runs.extend(grouped);
        for r in runs {
            x = run(b, x, r);
        }
        start = end;
    }
    b.unname(stack_named);
    // Gemma 4's stored keys and values of the first forward, kept by every checkpoint to the
    // end of backward (`Builder::held_by_checkpoints`; a CPU replay of a checkpointed 6-layer
    // Gemma 4 31B holds its last sliding layer's and its global layer's, 201 MB at 2 x 4,096).
    // The recomputation replaces them with its own, which the attention keeps anyway.
    for (i, bytes) in std::mem::take(&mut b.stored_kv).into_iter().enumerate() {
        let kind = ["full", "sliding"][i];
        b.held_by_checkpoints(name.at("shared_kv_states").then(kind), bytes);
    }
    b.held_by_checkpoints(name.at("prev_topk_indices"), held_topk);
    if model.norm_placement != NormPlacement::Post && b.stage.last {
        // The stack's final norm trains with its top block.
        b.layer = Some(offset + stack.layers.saturating_sub(1));
        x = b.norm(name.at("final_norm"), x);
        b.layer = None;
    }
    b.bias_grads.clear();
    if model.family.is_t5() {
        x = b.dropout(name.at("final_dropout"), x, model.dropout.residual);
    }
    (x, seq)
}

/// Notes that block `layer` is built as block `first` (what a chart of the model reads).
fn record_built_as(b: &mut Builder, layer: u64, first: u64) {
    let v = &mut b.graph.built_as;
    if v.len() <= layer as usize {
        v.resize(layer as usize + 1, 0);
    }
    v[layer as usize] = first;
}

/// One block: a mixer (attention or a state-space scan) and an FFN, normalised where the
/// architecture puts its norms.
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
    kind: BlockKind,
) -> Val {
    let model = b.model;
    let p_res = model.dropout.residual;
    let drop_attention = |b: &mut Builder, at: Name, a: Val| {
        if model.dropout.residual_ffn_only {
            a
        } else {
            b.dropout(at, a, p_res)
        }
    };
    let window = match kind.mixer {
        Mixer::SlidingWindow { window } => Some(window),
        _ => None,
    };
    let self_mask = self_attention_mask(b, is_decoder, seq, window);
    if kind.single() {
        // Mamba's blocks (`residual_in_fp32`) and Nemotron-H's layers (`residual +
        // hidden_states` in the stream's dtype): one sub-layer, `mixer` in every one of them.
        let fp32_residual = model.family != crate::spec::model::Family::NemotronH;
        return b.recurrent_block(name, x, fp32_residual, |b, mixer, hn| match kind.mixer {
            Mixer::Ssm(ssm) => mamba_mixer(b, mixer, hn, ssm),
            Mixer::Ssd(ssd) => in_tp_region(b, |b| b.ssd_mixer(mixer, hn, ssd)),
            Mixer::None => {
                // A bottleneck adapter follows the FFN, as in the two-sub-layer blocks.
                let m = mlp(b, (name, "mixer"), hn, stack, kind.ffn);
                adapter(b, name.at("adapter"), m)
            }
            _ => self_attention(
                b,
                (name, "mixer"),
                hn,
                stack,
                seq,
                embed_dtype,
                (self_mask, window, kind.rope, kind.kv_shared),
            ),
        });
    }
    if let Some(ssd) = model.parallel_ssd {
        // Falcon-H1's layer: the Mamba-2 mixer on the normed input scaled by
        // `ssm_in_multiplier` (inside the mixer), its output times `ssm_out_multiplier`; then
        // attention on that input times `attention_in_multiplier`, its output times
        // `attention_out_multiplier`; their sum added to the residual; then the MLP's half.
        // The layer's `hidden_states` names the normed input until the sum replaces it, and
        // the Mamba output waits, named, through the attention.
        let h = b.norm(name.at("input_layernorm"), x);
        let named = b.name(&[h.id]);
        let m = in_tp_region(b, |b| {
            let scope = b.scope(name, "mamba");
            b.ssd_mixer(scope, h, ssd)
        });
        let m = b.scale(name.at("mamba").then("out_multiplier"), m);
        b.name(&[m.id]);
        let ha = b.scale(name.at("self_attn").then("in_multiplier"), h);
        let a = self_attention(
            b,
            (name, "self_attn"),
            ha,
            stack,
            seq,
            embed_dtype,
            (self_mask, window, kind.rope, kind.kv_shared),
        );
        let a = b.scale(name.at("self_attn").then("out_multiplier"), a);
        b.unname(named);
        let sum = b.add(name.at("mixers").then("add"), m, a);
        let x = b.residual(name.at("residual"), x, sum);
        let named = b.name(&[x.id]);
        let h = b.norm(name.at("pre_ff_layernorm"), x);
        let f = mlp(b, (name, "feed_forward"), h, stack, FfnKind::Dense);
        let x = b.residual(name.at("mlp").then("residual"), x, f);
        b.unname(named);
        return x;
    }
    let attend = |b: &mut Builder, at: (Scope, &'static str), h| match kind.mixer {
        // Qwen3.5's linear layers: `linear_attn` where the others have `self_attn`.
        Mixer::GatedDeltaNet(d) => {
            in_tp_region(b, |b| b.gated_delta_net((at.0, "linear_attn"), h, d))
        }
        // LFM2's convolution layers: `conv` where the others have `self_attn`.
        Mixer::ShortConv(c) => in_tp_region(b, |b| b.short_conv((at.0, "conv"), h, c)),
        // Granite 4.0's Mamba-2 layers: `mamba` where the others have `self_attn`.
        Mixer::Ssd(s) => in_tp_region(b, |b| {
            let scope = b.scope(at.0, "mamba");
            b.ssd_mixer(scope, h, s)
        }),
        // Jamba's Mamba layers: `mamba` likewise.
        Mixer::Ssm(s) => {
            let scope = b.scope(at.0, "mamba");
            mamba_mixer(b, scope, h, s)
        }
        _ => self_attention(
            b,
            at,
            h,
            stack,
            seq,
            embed_dtype,
            (self_mask, window, kind.rope, kind.kv_shared),
        ),
    };
    if model.parallel_block {
        // Phi / Falcon: attention and MLP read one norm output; both add to the residual.
        // GPT-NeoX and Falcon's new decoder normalise the input again for the MLP: Falcon
        // before its attention (`ln_attn`, then `ln_mlp`), whose output its forward names
        // while the attention runs; GPT-NeoX after it.
        let h = b.norm(name.at("input_layernorm"), x);
        let early = model.parallel_two_norms && model.family.norms_both_before_attention();
        let h_mlp = early.then(|| b.norm(name.at("post_attention_layernorm"), x));
        let named = b.name(&[h.id]);
        b.name(h_mlp.map(|v| v.id).as_slice());
        let a = attend(b, (name, "attn"), h);
        let a = drop_attention(b, name.at("attn").then("dropout"), a);
        // The attention's output waits, named, through the MLP.
        b.name(&[a.id]);
        let h = match h_mlp {
            Some(h_mlp) => h_mlp,
            None if model.parallel_two_norms => b.norm(name.at("post_attention_layernorm"), x),
            None => h,
        };
        b.name(&[h.id]);
        let mlp_at = b.graph.len();
        let m = mlp(b, (name, "mlp"), h, stack, kind.ffn);
        if h_mlp.is_none() && !model.parallel_two_norms {
            // One norm output read by both: the MLP's gradient of it (in its dtype, fp32 from
            // an autocast LayerNorm) waits through the attention's backward for the
            // attention's, as a residual's does.
            b.await_grads(&[(h, mlp_at)]);
        }
        let m = if model.family.dropout_in_mlp() {
            let m = b.dropout(name.at("mlp").then("dropout"), m, p_res);
            adapter(b, name.at("adapter"), m)
        } else {
            let m = adapter(b, name.at("adapter"), m);
            b.dropout(name.at("mlp").then("dropout"), m, p_res)
        };
        let sum = b.add(name.at("parallel").then("add"), a, m);
        let out = b.residual(name.at("residual"), x, sum);
        b.unname(named);
        return out;
    }
    if model.norm_placement == NormPlacement::Post {
        // BART: sub-layer, dropout, residual add, then LayerNorm.
        let a = attend(b, (name, "self_attn"), x);
        let a = b.dropout(name.at("self_attn").then("dropout"), a, p_res);
        let mut x = b.residual(name.at("self_attn").then("residual"), x, a);
        x = b.norm(name.at("self_attn_layer_norm"), x);
        if let Some(mem) = memory {
            let c = cross_attention(b, (name, "encoder_attn"), x, mem, stack, seq);
            let c = b.dropout(name.at("encoder_attn").then("dropout"), c, p_res);
            x = b.residual(name.at("encoder_attn").then("residual"), x, c);
            x = b.norm(name.at("encoder_attn_layer_norm"), x);
        }
        // The feed-forward half's input is named as `residual` and `hidden_states`.
        let named = b.name(&[x.id]);
        let m = mlp(b, (name, "mlp"), x, stack, kind.ffn);
        let m = adapter(b, name.at("adapter"), m);
        let m = b.dropout(name.at("mlp").then("dropout"), m, p_res);
        let x = b.residual(name.at("mlp").then("residual"), x, m);
        b.unname(named);
        return b.norm(name.at("final_layer_norm"), x);
    }
    // Pre-norm (Llama, GPT-2, OPT, T5), sandwich (Gemma-2/3: pre and post) or output-only
    // (OLMo-2: the sub-layer's output is normalised before the residual add).
    let pre = model.norm_placement != NormPlacement::Output;
    let post = matches!(
        model.norm_placement,
        NormPlacement::Sandwich | NormPlacement::Output
    );
    let h = if pre {
        b.norm(name.at("input_layernorm"), x)
    } else {
        x
    };
    // The block's forward names the attention's input (`hidden_states`) until it returns.
    let named = b.name(&[h.id]);
    let mut a = attend(b, (name, "self_attn"), h);
    b.unname(named);
    if post {
        a = b.norm(name.at("post_attention_layernorm"), a);
    }
    let a = drop_attention(b, name.at("self_attn").then("dropout"), a);
    let a = residual_multiplier(b, name.at("self_attn").then("multiplier"), a);
    let mut x = b.residual(name.at("self_attn").then("residual"), x, a);
    if let Some(mem) = memory {
        let h = b.norm(name.at("cross_layernorm"), x);
        let c = cross_attention(b, (name, "cross_attn"), h, mem, stack, seq);
        let c = b.dropout(name.at("cross_attn").then("dropout"), c, p_res);
        x = b.residual(name.at("cross_attn").then("residual"), x, c);
    }
    // Through the feed-forward half the block names the sum so far (`residual`) and the FFN's
    // input (`hidden_states`).
    let named = b.name(&[x.id]);
    let h = if pre {
        b.norm(name.at("pre_feedforward_layernorm"), x)
    } else {
        x
    };
    b.name(&[h.id]);
    // Gemma 4's `use_double_wide_mlp`: the shared-KV layers' MLPs are twice as wide.
    let wide_stack;
    let stack = if kind.kv_shared && model.double_wide_shared_mlp {
        wide_stack = Stack {
            intermediate_size: stack.intermediate_size * 2,
            ..*stack
        };
        &wide_stack
    } else {
        stack
    };
    let beside = model
        .moe
        .filter(|m| m.beside_mlp && kind.ffn == FfnKind::Moe);
    let mut m = match beside {
        Some(moe) => {
            let m = mlp(b, (name, "mlp"), h, stack, FfnKind::Dense);
            let m = b.norm(name.at("post_feedforward_layernorm_1"), m);
            let e = experts_beside_mlp(b, name, x, moe);
            b.residual(name.at("moe").then("add"), m, e)
        }
        None => mlp(b, (name, "mlp"), h, stack, kind.ffn),
    };
    if post {
        m = b.norm(name.at("post_feedforward_layernorm"), m);
    }
    let m = if model.family.dropout_in_mlp() {
        b.dropout(name.at("mlp").then("dropout"), m, p_res)
    } else {
        m
    };
    let m = adapter(b, name.at("adapter"), m);
    let m = if model.family.dropout_in_mlp() {
        m
    } else {
        b.dropout(name.at("mlp").then("dropout"), m, p_res)
    };
    let m = residual_multiplier(b, name.at("mlp").then("multiplier"), m);
    let x = b.residual(name.at("mlp").then("residual"), x, m);
    b.unname(named);
    match b.per_layer_inputs {
        Some(inputs) => per_layer_input_gate(b, name, x, inputs),
        None => x,
    }
}

/// Gemma 4's per-layer inputs (`Gemma4TextModel.get_per_layer_inputs` and
/// `project_per_layer_inputs`), once per forward: the token ids looked up in
/// `embed_tokens_per_layer` (scaled by sqrt(width)), and the scaled embeddings projected by
/// `per_layer_model_projection` (hidden -> layers x width, times hidden^-0.5), reshaped per
/// layer and normed by `per_layer_projection_norm`; their sum times 2^-0.5 is what the blocks
/// read, each its own slice (a view, so the whole tensor lives until the last of them is done).
fn per_layer_inputs(
    b: &mut Builder,
    name: Scope,
    x: Val,
    ple: crate::spec::model::PerLayerInput,
    layers: u64,
) -> Val {
    let width = layers * ple.width;
    let table = b.base_param(
        name.at("embed_tokens_per_layer"),
        (ple.vocab, width),
        ParamRole::Embedding,
    );
    let looked_up = b.embedding(name.at("embed_tokens_per_layer"), table, width, x.tokens);
    let identity = b.scale(name.at("embed_tokens_per_layer").then("scale"), looked_up);
    // `nn.Linear`s that `all-linear` wraps (no target role names them).
    let projected = b.nn_linear(name.at("per_layer_model_projection"), x, width, false);
    let projected = all_linear_lora(b, name.at("per_layer_model_projection"), x, projected);
    let projected = b.scale(
        name.at("per_layer_model_projection").then("scale"),
        projected,
    );
    let normed = b.norm_sized(name.at("per_layer_projection_norm"), projected, ple.width);
    let sum = b.add(name.at("per_layer_inputs").then("add"), normed, identity);
    b.scale(name.at("per_layer_inputs").then("scale"), sum)
}

/// The end of a Gemma 4 block with per-layer inputs (`Gemma4TextDecoderLayer`): the residual
/// stream through `per_layer_input_gate` (hidden -> width), the activation, times the layer's
/// slice of the per-layer inputs, `per_layer_projection` (width -> hidden) and
/// `post_per_layer_input_norm`, added back (the in-place `layer_scalar` after it keeps nothing).
fn per_layer_input_gate(b: &mut Builder, name: Scope, x: Val, inputs: Val) -> Val {
    let width = inputs.width / b.model.decoder.layers.max(1);
    let slice = Val { width, ..inputs };
    b.fork(name.at("per_layer").then("fork"), x, 2);
    let gate = b.nn_linear(name.at("per_layer_input_gate"), x, width, false);
    let gate = all_linear_lora(b, name.at("per_layer_input_gate"), x, gate);
    let g = b.activation(name.at("per_layer").then("act"), gate);
    let g = b.mul(name.at("per_layer").then("mul"), g, slice);
    let h = b.model.hidden_size;
    let out = b.nn_linear(name.at("per_layer_projection"), g, h, false);
    let g = all_linear_lora(b, name.at("per_layer_projection"), g, out);
    let g = b.norm(name.at("post_per_layer_input_norm"), g);
    b.residual(name.at("per_layer").then("residual"), x, g)
}

/// Granite's `branch * residual_multiplier` before each residual add (none elsewhere).
fn residual_multiplier(b: &mut Builder, name: Name, branch: Val) -> Val {
    if b.model.multipliers.residual == 1.0 {
        branch
    } else {
        b.scale(name, branch)
    }
}

/// What accompanies self-attention. A sliding window as transformers builds it
/// (`masking_utils.sdpa_mask`): no mask while the keys fit the window (`is_causal` suffices),
/// a materialised mask once they reach it (`_ignore_causal_mask_sdpa` declines the skip);
/// flash_attention_2 takes the window as kernel arguments and never needs one.
fn self_attention_mask(b: &Builder, is_decoder: bool, seq: u64, window: Option<u64>) -> AttnMask {
    let model = b.model;
    let keys = seq + b.prefix;
    match model.positions {
        Positions::RelativeBias { .. } => AttnMask::StridedBias,
        _ if b.prefix > 0 => AttnMask::Explicit,
        _ if is_decoder && window.is_some_and(|w| keys >= w) => AttnMask::Explicit,
        // FalconModel builds its mask with `allow_is_causal_skip=False` (to add ALiBi onto
        // it), and its attention hands that mask to SDPA whether or not ALiBi is on.
        _ if is_decoder && model.family == Family::Falcon => AttnMask::Explicit,
        // DeepSeek Sparse Attention ANDs each layer's top-k onto the causal mask, which its
        // model builds with `allow_is_causal_skip=False` for the indexer.
        _ if is_decoder && model.indexer().is_some() => AttnMask::Explicit,
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
    mask: (AttnMask, Option<u64>, bool, bool),
) -> Val {
    in_tp_region(b, |b| {
        self_attention_ops(b, at, x, stack, seq, embed_dtype, mask)
    })
}

/// The rotary tables a stack's forward computes once and hands to every layer
/// (`position_embeddings = self.rotary_emb(hidden_states, position_ids)`, transformers 5.17):
/// cos and sin, each (1, seq, rotary width) from the batch-1 `cache_position.unsqueeze(0)`, in
/// the hidden states' dtype (`LlamaRotaryEmbedding.forward`'s `.to(dtype=x.dtype)`). Every
/// layer's rotary multiplies save them, so they live from before the first layer to its
/// backward. Gemma 3 and 4, OLMo 3 and Mellum (`LagunaModel.forward`) compute a pair per layer type (`for layer_type in
/// set(config.layer_types)`), Gemma 4's global pair at its global head width; Llama 4 one
/// complex64 `freqs_cis` of half the width. GPT-J and CodeGen index a table buffer inside each
/// attention instead (their pinned rotary locals).
fn rotary_tables(model: &ModelSpec, stack: &Stack, seq: u64, dtype: DType) -> Bytes {
    let Positions::Rotary { fraction } = model.positions else {
        return Bytes::ZERO;
    };
    if matches!(model.family, Family::Gptj | Family::Codegen) {
        return Bytes::ZERO;
    }
    let width = |head_dim: u64| (head_dim as f64 * fraction).round() as u64;
    let local = model.mla.map_or(stack.head_dim, |m| m.rope_dim);
    let per_type = matches!(
        model.family,
        Family::Gemma3 | Family::Gemma4 | Family::Mellum
    ) || model.model_type == "olmo3";
    let mut widths: SmallVec<[u64; 2]> = smallvec::smallvec![width(local)];
    if per_type && model.attention_kinds() == (true, true) {
        widths.push(width(model.global_attention.map_or(local, |g| g.head_dim)));
    }
    let elements: u64 = widths.iter().map(|w| seq.saturating_mul(*w)).sum();
    if model.rotary_apply == RotaryApply::ComplexFp32 {
        // One complex64 table of half the width: 8 bytes per complex, 4 per channel.
        DType::F32.bytes(elements)
    } else {
        dtype.bytes(elements) * 2
    }
}

/// A q or k norm ([`QkNorm`]): one weight per head channel, or one over the whole projection.
fn qk_norm(b: &mut Builder, name: Name, x: Val, head_dim: u64) -> Val {
    match b.model.qk_norm {
        QkNorm::PerHead => b.norm_sized(name, x, head_dim),
        QkNorm::Full => b.norm(name, x),
        QkNorm::None | QkNorm::L2AfterRotary => x,
    }
}

fn self_attention_ops(
    b: &mut Builder,
    at: (Scope, &'static str),
    x: Val,
    stack: &Stack,
    seq: u64,
    embed_dtype: crate::units::DType,
    (mask, window, rope, kv_shared): (AttnMask, Option<u64>, bool, bool),
) -> Val {
    if let Some(mla) = b.model.mla {
        return latent_attention(b, at, x, stack, seq, embed_dtype, (mask, window), mla);
    }
    let name = b.scope(at.0, at.1);
    let model = b.model;
    // Gemma 4's global layers: their own head width and KV heads and, with
    // `attention_k_eq_v`, no `v_proj` (the key projection's output is the values too).
    let global = model.global_attention.filter(|_| window.is_none());
    let global_stack = global.map(|g| Stack {
        head_dim: g.head_dim,
        kv_heads: g.kv_heads,
        ..*stack
    });
    let stack = global_stack.as_ref().unwrap_or(stack);
    let keys_as_values = global.is_some_and(|g| g.keys_as_values);
    let q_width = stack.heads * stack.head_dim;
    let kv_width = stack.kv_heads * stack.head_dim;
    // Gated attention (Qwen3.5): `q_proj` writes, per head, the queries and then the gate;
    // `gate.reshape(...)` of that strided half copies it, and the queries' half is a view
    // the q norm reads.
    let gated = model.attention_output_gate == AttentionGate::QueryHalf;
    let mut gate = None;
    // What the attention forward's own locals name while the core runs (below), beside what
    // the frames around it name (the block's `hidden_states`, the norm's output the
    // projections read: `Builder::name` in `block`).
    let mut pinned: SmallVec<[TensorId; 4]> = SmallVec::new();
    // Each value the ops below read, with the op that reads it last: its gradient waits from
    // that op's backward to its producer's (`Builder::await_grads`).
    let mut reads: SmallVec<[(Val, usize); 8]> = SmallVec::new();
    // The order the forward builds q and k with their norms and rotary (`Family::qk_order`);
    // the projections' branch below may norm (and rotate) each as it is made.
    let order = model.family.qk_order();
    let rotary_full_width = matches!(model.positions, Positions::Rotary { fraction } if fraction == 1.0)
        && rope
        && !model.family.rotary_concatenates()
        && model.rotary_apply == RotaryApply::Shared;
    let (mut normed, mut rotated) = (false, false);
    let (mut q, mut k, mut v) = if model.fused_qkv {
        let qkv = b.linear(
            name.at("qkv"),
            x,
            q_width + 2 * kv_width,
            model.qkv_bias,
            Some(Proj::Q),
        );
        let part = |width| Val { width, ..qkv };
        if model.qkv_split_copies {
            // CodeGen: each part is reshaped out of a non-contiguous split view, a copy. No op
            // keeps the fused output, but the forward's `qkv` and `qkv_split` name it until it
            // returns.
            pinned.push(qkv.id);
            (
                b.contiguous(name.at("q_split"), part(q_width)),
                b.contiguous(name.at("k_split"), part(kv_width)),
                b.contiguous(name.at("v_split"), part(kv_width)),
            )
        } else {
            (part(q_width), part(kv_width), part(kv_width))
        }
    } else if kv_shared {
        // Gemma 4's shared-KV layers: only queries of their own; the keys and values are an
        // earlier layer's (normed and rotated there), which that layer's attention already
        // keeps. They stand here as tensors of no size, so nothing is counted twice.
        let q = b.linear(name.at("q_proj"), x, q_width, model.qkv_bias, Some(Proj::Q));
        let shared = |b: &mut Builder| Val {
            id: b.tensor(
                crate::graph::op::TensorKind::Activation,
                crate::units::Bytes::ZERO,
            ),
            width: kv_width,
            ..q
        };
        (q, shared(b), shared(b))
    } else {
        let gate_proj = model.attention_output_gate == AttentionGate::Projection;
        b.fork(
            name.at("fork"),
            x,
            if keys_as_values { 2 } else { 3 } + u32::from(gate_proj),
        );
        let q_out = if gated { 2 * q_width } else { q_width };
        let q = b.linear(name.at("q_proj"), x, q_out, model.qkv_bias, Some(Proj::Q));
        let q = if gated {
            let half = Val {
                width: q_width,
                ..q
            };
            gate = Some(b.contiguous(name.at("gate_split"), half));
            half
        } else {
            q
        };
        normed = matches!(
            order,
            QkOrder::NormedAsProjected | QkOrder::EachRotatedAsProjected
        ) && model.qk_norm != QkNorm::None;
        rotated = order == QkOrder::EachRotatedAsProjected && rotary_full_width;
        let rotate = |b: &mut Builder, reads: &mut SmallVec<_>, part: &'static str, x: Val| {
            reads.push((x, b.graph.len()));
            let table = model.family.rotary_table_dtype(embed_dtype, x.dtype);
            b.rotary(name.at(part), x, table, model.rotary_apply, SmallVec::new())
                .1
        };
        let q = if normed {
            reads.push((q, b.graph.len()));
            qk_norm(b, name.at("q_norm"), q, stack.head_dim)
        } else {
            q
        };
        let q = if rotated {
            rotate(b, &mut reads, "rotary_q", q)
        } else {
            q
        };
        let k_proj = b.linear(
            name.at("k_proj"),
            x,
            kv_width,
            model.qkv_bias,
            Some(Proj::K),
        );
        // Falcon-H1: `k_proj(x) * key_multiplier`, before v_proj runs.
        let k_proj = if model.family == crate::spec::model::Family::FalconH1 {
            b.scale(name.at("key_multiplier"), k_proj)
        } else {
            k_proj
        };
        if keys_as_values {
            // The key norm and the value norm both read k_proj's output: its gradient is
            // their two gradients' sum.
            b.fork(name.at("kv_fork"), k_proj, 2);
        }
        let k = if normed {
            // With keys as values, the value norm reads k's projection last.
            if !keys_as_values {
                reads.push((k_proj, b.graph.len()));
            }
            qk_norm(b, name.at("k_norm"), k_proj, stack.head_dim)
        } else {
            k_proj
        };
        let k = if rotated {
            rotate(b, &mut reads, "rotary_k", k)
        } else {
            k
        };
        let v = if keys_as_values {
            k_proj
        } else {
            b.linear(
                name.at("v_proj"),
                x,
                kv_width,
                model.qkv_bias,
                Some(Proj::V),
            )
        };
        if gate_proj {
            // AFMoE: `gate_proj(hidden_states)` after v, before the q/k norms; a module named
            // `gate_proj`, as the FFN's gate is, so the FFN's target name reaches it too.
            gate = Some(b.linear(name.at("gate_proj"), x, q_width, false, Some(Proj::Gate)));
        }
        (q, k, v)
    };
    match model.qk_norm {
        _ if normed || order == QkOrder::NormsAfterRotary => {}
        QkNorm::None => {}
        QkNorm::PerHead if kv_shared => {
            reads.push((q, b.graph.len()));
            q = b.norm_sized(name.at("q_norm"), q, stack.head_dim);
        }
        // Qwen3, Gemma-3: `q_norm(q.view(..., head_dim))`, the same for k, before rotary.
        QkNorm::PerHead => {
            reads.push((q, b.graph.len()));
            q = b.norm_sized(name.at("q_norm"), q, stack.head_dim);
            // With keys as values, the value norm below reads k's projection last.
            if !keys_as_values {
                reads.push((k, b.graph.len()));
            }
            k = b.norm_sized(name.at("k_norm"), k, stack.head_dim);
        }
        // OLMo-2: one RMSNorm over the whole q (and k) projection.
        QkNorm::Full => {
            reads.push((q, b.graph.len()));
            q = b.norm(name.at("q_norm"), q);
            reads.push((k, b.graph.len()));
            k = b.norm(name.at("k_norm"), k);
        }
        // Llama 4: after rotary, below.
        QkNorm::L2AfterRotary => {}
    }
    if model.value_norm && !kv_shared {
        reads.push((v, b.graph.len()));
        v = b.unscaled_rms_norm(name.at("v_norm"), v, (stack.head_dim, 2));
    }
    let mut q_head_major = false;
    if let (Positions::Rotary { .. }, true, true) = (model.positions, rope, kv_shared) {
        reads.push((q, b.graph.len()));
        (_, q) = b.rotary(
            name.at("rotary_q"),
            q,
            embed_dtype,
            model.rotary_apply,
            smallvec::SmallVec::new(),
        );
    } else if let (Positions::Rotary { fraction }, true, false) = (model.positions, rope, rotated) {
        let rotary_width = (stack.head_dim as f64 * fraction).round() as u64;
        // Partial rotary rebuilds q as `cat((q_rot, q_pass), dim=-1)`: a new, head-major tensor;
        // some families' rotary does so even with nothing to pass through.
        let concatenated = model.family.rotary_concatenates();
        let partial = rotary_width < stack.head_dim;
        q_head_major = partial || concatenated;
        let (q_in, k_in) = (q, k);
        let at = b.graph.len();
        (q, k) = b.rotary_qk(
            (name.at("rotary_q"), name.at("rotary_k")),
            (q, k),
            model.family.rotary_table_dtype(embed_dtype, k.dtype),
            model.rotary_apply,
            (seq, stack.head_dim, rotary_width, concatenated),
        );
        reads.push((q_in, at));
        if let Some(k_at) = b.op_named_from(at, name.at("rotary_k")) {
            reads.push((k_in, k_at));
        }
        if partial && model.family.rotary_split_in_attention() {
            // `q_pass` and `k_pass` (views) keep the unrotated q and k, and `q_rot` and `k_rot`
            // the rotated parts, in the rotary's dtype.
            let mut rotated = |x: Val| {
                let width = x.width / stack.head_dim.max(1) * rotary_width;
                let bytes = x.dtype.bytes(x.tokens.saturating_mul(width));
                b.tensor(TensorKind::Activation, bytes)
            };
            let (q_rot, k_rot) = (rotated(q), rotated(k));
            pinned.extend([q_in.id, k_in.id, q_rot, k_rot]);
        }
    }
    if order == QkOrder::NormsAfterRotary && !kv_shared {
        reads.push((q, b.graph.len()));
        q = qk_norm(b, name.at("q_norm"), q, stack.head_dim);
        reads.push((k, b.graph.len()));
        k = qk_norm(b, name.at("k_norm"), k, stack.head_dim);
    }
    if kv_shared {
        // The earlier layer's keys went through the same norm and rotary as these queries:
        // they arrive in the queries' dtype (fp32 where the rotary tables are), which decides
        // whether SDPA's autocast casts them (and so copies `repeat_kv`'s view, below).
        k.dtype = q.dtype;
    } else if model.family.stores_full_length_kv() {
        b.stored_kv[usize::from(window.is_some())] = k.bytes() + v.bytes();
    }
    if model.qk_norm == QkNorm::L2AfterRotary && rope {
        // One `qk_norm` module, called on q and on k.
        reads.push((q, b.graph.len()));
        q = b.unscaled_rms_norm(name.at("q_norm"), q, (stack.head_dim, 1));
        if !kv_shared {
            reads.push((k, b.graph.len()));
            k = b.unscaled_rms_norm(name.at("k_norm"), k, (stack.head_dim, 1));
        }
    }
    let scaled = match model.query_scale {
        QueryScale::None => false,
        QueryScale::Every => true,
        QueryScale::NopeLayers => !rope,
    };
    if scaled {
        reads.push((q, b.graph.len()));
        q = b.position_scale(name.at("q_scale"), q, seq);
    }
    let batch = b.plan.batch;
    let prefix = b.prefix;
    let mut seq_k = seq;
    // DynamicCache.update concatenates the prefix in front of the keys and values, at the
    // width the layer caches (Falcon's new decoder broadcasts its KV heads first); peft skips
    // the layers whose cache has another shape than the prefix (Gemma 4's local layers).
    let cached = model.cached_kv_width(stack);
    // The keys and values the core reads from this layer's own projections (not an earlier
    // layer's, nor the cache's concatenation with a prefix).
    let mut own_kv = !kv_shared;
    if prefix > 0 && model.peft_prefix_width() == Ok(cached) {
        seq_k += prefix;
        k = b.val(cached, batch * seq_k, k.dtype, true);
        v = b.val(cached, batch * seq_k, v.dtype, true);
        own_kv = false;
    }
    let at = b.graph.len();
    let mut a = b.attention(
        name.at("core"),
        [q, k, v],
        stack,
        batch,
        (seq, seq_k),
        AttnCall {
            mask,
            window,
            q_head_major,
            pinned,
        },
    );
    // The core reads each operand through autocast's cast where it has one.
    let core = name.at("core");
    let reader = |b: &Builder, cast: &'static str| {
        b.op_named_from(at, core.then(cast))
            .or_else(|| b.op_named_from(at, core))
    };
    let mut operands: SmallVec<[(Val, &'static str); 3]> = smallvec::smallvec![(q, "q_cast")];
    if own_kv {
        operands.push((k, "k_cast"));
        if v.id != k.id {
            operands.push((v, "v_cast"));
        }
    }
    for (x, cast) in operands {
        if let Some(r) = reader(b, cast) {
            reads.push((x, r));
        }
    }
    b.await_grads(&reads);
    if let Some(g) = gate {
        // `attn_output * torch.sigmoid(gate)`: sigmoid keeps its output, the product both.
        let s = b.sigmoid(name.at("gate_sigmoid"), g);
        a = b.mul(name.at("gate_mul"), a, s);
    }
    let o_bias = model.out_bias.unwrap_or(model.linear_bias);
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
    // The encoder's output feeds every decoder layer's keys and values; per layer, its two
    // gradients join the running sum (two adds each, one fewer in all).
    b.fork(name.at("fork"), mem, 3);
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
    // T5's cross-attention adds a zeros bias (no relative positions across sequences),
    // created per forward, contiguous; `requires_grad` under gradient checkpointing.
    let mask = match model.positions {
        Positions::RelativeBias { .. } => AttnMask::ContiguousBias {
            grad: b.plan.grad_ckpt,
        },
        _ => AttnMask::Full,
    };
    let a = b.attention(
        name.at("core"),
        [q, k, v],
        stack,
        batch,
        (seq, mem_seq),
        AttnCall::masked(mask),
    );
    b.linear(
        name.at("o_proj"),
        a,
        model.hidden_size,
        model.linear_bias,
        Some(Proj::O),
    )
}

/// The FFN, dense or mixture-of-experts: a tensor-parallel region.
fn mlp(b: &mut Builder, at: (Scope, &'static str), x: Val, stack: &Stack, ffn: FfnKind) -> Val {
    in_tp_region(b, |b| match (ffn, b.model.moe) {
        (FfnKind::Moe, Some(moe)) if !moe.beside_mlp => moe_ops(b, at, x, x, moe),
        _ => {
            let name = b.scope(at.0, at.1);
            dense_ffn(b, name, x, stack.intermediate_size).0
        }
    })
}

/// Runs `f` with the builder inside a tensor-parallel region (Megatron's column-then-row
/// parallel pair), where sequence parallelism does not split activations.
fn in_tp_region(b: &mut Builder, f: impl FnOnce(&mut Builder) -> Val) -> Val {
    let outer = std::mem::replace(&mut b.tp_region, true);
    let out = f(b);
    b.tp_region = outer;
    out
}

/// A dense FFN of width `inter`: gated (SwiGLU/GeGLU) or two-matrix. Also returns the index of
/// the last op that reads `x` (its projections', LoRA's included).
fn dense_ffn(b: &mut Builder, name: Scope, x: Val, inter: u64) -> (Val, usize) {
    let model = b.model;
    let bias = model.linear_bias;
    if model.gated_ffn {
        let (g, u) = if model.fused_gate_up {
            // One projection to both halves, chunked: the activation keeps the gate half and
            // the product the up half, both views of the one output.
            let gu = b.linear(
                name.at("gate_up_proj"),
                x,
                2 * inter,
                bias,
                Some(Proj::Gate),
            );
            let half = Val { width: inter, ..gu };
            (half, half)
        } else {
            b.fork(name.at("fork"), x, 2);
            (
                b.linear(name.at("gate_proj"), x, inter, bias, Some(Proj::Gate)),
                b.linear(name.at("up_proj"), x, inter, bias, Some(Proj::Up)),
            )
        };
        let readers_end = b.graph.len() - 1;
        // Falcon-H1's µP: `act(gate_proj(x) * gate_multiplier)`, `down_proj(y) *
        // down_multiplier`.
        let falcon = model.family == crate::spec::model::Family::FalconH1;
        let g = if falcon {
            b.scale(name.at("gate_multiplier"), g)
        } else {
            g
        };
        let a = b.activation(name.at("act"), g);
        let p = b.mul(name.at("gate_mul"), a, u);
        let p = b.dropout(name.at("act").then("dropout"), p, model.dropout.activation);
        let p = to_output_weight_dtype(b, name, p);
        let out = b.linear(
            name.at("down_proj"),
            p,
            model.hidden_size,
            bias,
            Some(Proj::Down),
        );
        let out = if falcon {
            b.scale(name.at("down_multiplier"), out)
        } else {
            out
        };
        (out, readers_end)
    } else {
        let f = b.linear(name.at("fc1"), x, inter, bias, Some(Proj::Up));
        let readers_end = b.graph.len() - 1;
        let a = b.activation(name.at("act"), f);
        let a = b.dropout(name.at("act").then("dropout"), a, model.dropout.activation);
        let a = to_output_weight_dtype(b, name, a);
        let out = b.linear(name.at("fc2"), a, model.hidden_size, bias, Some(Proj::Down));
        (out, readers_end)
    }
}

/// T5's feed-forward casts its hidden state to the dtype of `wo`'s weight before `wo`
/// (`T5DenseActDense.forward`, kept for checkpoints whose `wo` stays fp32 or int8): over fp32
/// weights under autocast that is an fp32 copy of the FFN-wide activation, which autocast then
/// casts back to bf16 for the matmul, a new tensor that `wo` keeps.
fn to_output_weight_dtype(b: &mut Builder, name: Scope, x: Val) -> Val {
    if b.model.family.is_t5() {
        let base = b.base;
        b.cast(name.at("fc2").then("to_weight_dtype"), x, base)
    } else {
        x
    }
}

/// Multi-head latent attention as transformers' DeepSeek-V2/V3 attention runs it (DeepSeek-AI
/// 2024, sec. 2.1): q from `q_proj` (or `q_a_proj`, RMSNorm, `q_b_proj`); one
/// `kv_a_proj_with_mqa` to the latent plus a rotary key shared by every head; RMSNorm on the
/// latent; `kv_b_proj` up to per-head keys and values; keys and queries are the concatenation of
/// their plain and rotary parts (new tensors); values have their own head width.
#[expect(clippy::too_many_arguments)]
fn latent_attention(
    b: &mut Builder,
    at: (Scope, &'static str),
    x: Val,
    stack: &Stack,
    seq: u64,
    embed_dtype: crate::units::DType,
    (mask, window): (AttnMask, Option<u64>),
    mla: crate::spec::model::Mla,
) -> Val {
    let name = b.scope(at.0, at.1);
    let heads = stack.heads;
    let qk = mla.nope_dim + mla.rope_dim;
    let (q, q_resid) = match mla.q_rank {
        Some(r) => {
            let qa = b.linear(name.at("q_a_proj"), x, r, false, Some(Proj::QA));
            let qa = b.norm(name.at("q_a_layernorm"), qa);
            let q = b.linear(name.at("q_b_proj"), qa, heads * qk, false, Some(Proj::QB));
            (q, Some(qa))
        }
        None => (
            b.linear(name.at("q_proj"), x, heads * qk, false, Some(Proj::Q)),
            None,
        ),
    };
    let kv_a = b.linear(
        name.at("kv_a_proj_with_mqa"),
        x,
        mla.kv_rank + mla.rope_dim,
        false,
        Some(Proj::KvA),
    );
    let latent = Val {
        width: mla.kv_rank,
        ..kv_a
    };
    let latent = b.norm(name.at("kv_a_layernorm"), latent);
    let kv = b.linear(
        name.at("kv_b_proj"),
        latent,
        heads * (mla.nope_dim + mla.v_dim),
        false,
        Some(Proj::KvB),
    );
    let q_rope = Val {
        width: heads * mla.rope_dim,
        ..q
    };
    let k_rope = Val {
        width: mla.rope_dim,
        ..kv_a
    };
    let (q_rope, k_rope) = b.rotary_qk(
        (name.at("rotary_q"), name.at("rotary_k")),
        (q_rope, k_rope),
        embed_dtype,
        RotaryApply::Shared,
        // The `cat` with the non-rotary part is `q_cat` and `k_cat` below.
        (seq, mla.rope_dim, mla.rope_dim, false),
    );
    // torch.cat of the plain and rotary parts (the shared rotary key expanded to every head).
    let q_nope = Val {
        width: heads * mla.nope_dim,
        ..q
    };
    let q_proj = q;
    let mut q = b.concat_width(name.at("q_cat"), q_nope, q_rope);
    if b.model.query_scale == QueryScale::Every {
        q = b.position_scale(name.at("q_scale"), q, seq);
    }
    let k_nope = Val {
        width: heads * mla.nope_dim,
        ..kv
    };
    let k_rope = Val {
        width: heads * mla.rope_dim,
        ..k_rope
    };
    let k = b.concat_width(name.at("k_cat"), k_nope, k_rope);
    let v = Val {
        width: heads * mla.v_dim,
        ..kv
    };
    // DeepSeek Sparse Attention: the indexer runs once the keys and values exist; what the
    // attention forward builds from its top-k is alive while the core runs.
    let pinned = match (mla.indexer, q_resid) {
        (Some(ix), Some(q_resid)) => {
            // The attention forward names, while its indexer runs: `q_pass`, a view of
            // `q_b_proj`'s output; the rotated `q_rot` and `k_rot`; `kv_pass`, a view of
            // `compressed_kv`; `query_states`; and `expand_kv`'s keys and values (a view of
            // `kv_b_proj`'s output). A CPU replay of a 4-layer toy in pure bf16, which peaks
            // in the indexer, holds them (60 MB at 2 x 2,048).
            let named = b.name(&[q_proj.id, q_rope.id, k_rope.id, kv_a.id, q.id, k.id, kv.id]);
            let pinned =
                lightning_indexer(b, name.at("indexer"), (x, q_resid), (seq, embed_dtype), ix);
            b.unname(named);
            pinned
        }
        _ => SmallVec::new(),
    };
    let a = b.attention(
        name.at("core"),
        [q, k, v],
        stack,
        b.plan.batch,
        (seq, seq),
        // `cat((q_pass, q_rot), dim=-1)`: head-major.
        AttnCall {
            window,
            q_head_major: true,
            pinned,
            ..AttnCall::masked(mask)
        },
    );
    b.linear(
        name.at("o_proj"),
        a,
        b.model.hidden_size,
        false,
        Some(Proj::O),
    )
}

/// DeepSeek Sparse Attention's lightning indexer ([`Indexer`]) as transformers 5.17 runs it on
/// the eager and SDPA paths (`DeepseekV32Indexer.forward`, `DeepseekV32Attention.forward`;
/// GLM-5's `GlmMoeDsaIndexer` differs only in its interleaved rotary), reading the block's
/// normed input `x` and the query bottleneck `q_resid`. Returns what the attention forward
/// then names while its core runs.
///
/// The indexer is a `@torch.no_grad()` method: its parameters (`wq_b`, `wk`, `k_norm`,
/// `weights_proj`) and any LoRA factors `all-linear` puts on its linears are trainable yet get
/// no gradient, so the optimizer keeps no state for them ([`Param::idle`]), and its ops save
/// nothing. What it allocates lives only while it runs, at three candidate peaks, over the
/// tensors its locals keep to its return (the projected queries, which `q_pass` views; the
/// rotated rotary part; their concatenation; the normed key, its rotated part and their
/// concatenation):
/// - `torch.matmul(q.float(), k.float()...)`: q's fp32 copy (and autocast's bf16 cast of it)
///   and the key broadcast to every query beside the (B, S, heads, keys) scores;
/// - `* softmax_scale`, then `F.relu`: two such score tensors at once;
/// - the head-weighted sum and its `masked_fill` (two (B, S, keys) tensors) beside the scores
///   `scores` still names, then `topk`'s values and int64 indices and their int32 copy.
///
/// The scores' dtype is autocast's (bf16, matmul being on its lower-precision list) under
/// autocast, else fp32 (`q.float()`). LayerNorm runs in fp32 under autocast, so the key is
/// fp32 there. The causal mask reaches it batch-less (`sdpa_mask` without a padding mask).
/// Back in the attention forward, `new_ones(...).scatter(-1, topk, False)` makes the (B, 1,
/// S, keys) boolean index mask and `attention_mask & ~index_mask` the combined one that SDPA
/// takes; both, and the int32 top-k, are named while the core runs (returned as pinned).
fn lightning_indexer(
    b: &mut Builder,
    name: Name,
    (x, q_resid): (Val, Val),
    (seq, embed_dtype): (u64, DType),
    ix: crate::spec::model::Indexer,
) -> SmallVec<[TensorId; 4]> {
    let model = b.model;
    let keys = seq;
    let topk = ix.topk.min(keys);
    let (bs, bst) = (x.tokens, x.tokens.saturating_mul(keys));
    // int32 indices, four bytes each.
    let top = Bytes(bs.saturating_mul(topk).saturating_mul(4));
    // SDPA gets the boolean `attention_mask & ~index_mask`; eager attention (whose causal mask
    // is additive, in the embeddings' dtype) its `masked_fill(index_mask, min)`.
    let index_masks = if b.plan.attention == crate::spec::plan::AttentionKernel::Eager {
        Bytes(bst) + embed_dtype.bytes(bst)
    } else {
        Bytes(bst) * 2
    };
    let shared = b.layer.is_some_and(|l| model.reuses_topk(l));
    let mut pinned: SmallVec<[TensorId; 4]> = SmallVec::new();
    pinned.push(b.tensor(TensorKind::Activation, index_masks));
    if !ix.returns_topk {
        // DeepSeek-V3.2's top-k is the attention forward's local; GLM-5's goes back to the
        // model's loop, which names it (`stack_forward`).
        pinned.push(b.tensor(TensorKind::Activation, top));
    }
    let mask_kernels = 5;
    if shared {
        // A shared layer builds its mask from the previous layer's top-k: `new_ones`,
        // `.long()`, `scatter`, `~` and `&`.
        b.emit(OpSpec {
            name: name.then("mask"),
            kind: OpKind::Elementwise,
            params: SmallVec::new(),
            saves: SmallVec::new(),
            out: Bytes::ZERO,
            forward_transient: Bytes::ZERO,
            backward_transient: Bytes::ZERO,
            cost: Cost {
                forward_bytes: Bytes(bst) * 5 + DType::I64.bytes(bs.saturating_mul(topk)) * 2,
                forward_kernels: mask_kernels,
                ..Cost::default()
            },
            compute: DType::Bf16,
            in_backward: false,
        });
        return pinned;
    }
    let (heads, dim, rope) = (ix.heads, ix.head_dim, model.mla.map_or(0, |m| m.rope_dim));
    let hidden = x.width;
    let q_rank = q_resid.width;
    // The parameters, frozen or trainable-but-idle.
    let qlora = matches!(b.plan.method, Method::Qlora(_)) && model.family.bnb_swaps(None);
    let mut params: SmallVec<[ParamId; 3]> = SmallVec::new();
    let linears = [
        ("wq_b", (heads * dim, q_rank)),
        ("wk", (dim, hidden)),
        ("weights_proj", (heads, hidden)),
    ];
    for (module, shape) in linears {
        let p = if qlora {
            b.nf4_weight(name.then(module).then("weight"), shape)
        } else {
            b.base_param(name.then(module).then("weight"), shape, ParamRole::Linear)
        };
        params.push(p);
        if b.plan
            .method
            .lora()
            .is_some_and(|l| l.targets == LoraTargets::AllLinear)
        {
            b.idle_lora(name.then(module), (shape.1, shape.0), None);
        }
    }
    // `k_norm` is an `nn.LayerNorm`: a weight and a bias.
    let norm = b.base_param(
        name.then("k_norm").then("weight"),
        (1, dim),
        ParamRole::Norm,
    );
    let bias = b.base_param(
        name.then("k_norm").then("bias"),
        (1, dim),
        ParamRole::NormBias,
    );
    for p in params.iter().copied().chain([norm, bias]) {
        if let Some(p) = b.graph.params.get_mut(p.0 as usize)
            && p.trainable
        {
            p.idle = true;
        }
    }
    let c = b.compute();
    let scores_dtype = if b.autocast { b.half } else { DType::F32 };
    let key_dtype = if b.autocast { DType::F32 } else { c };
    let q_elems = bs.saturating_mul(heads * dim);
    let scores = scores_dtype.bytes(bst.saturating_mul(heads));
    let index_scores = scores_dtype.bytes(bst);
    // Named to the indexer's return: `q` (as `q_pass`), the rotated `q_rot`, their `cat`, the
    // normed key, its rotated part and their `cat`.
    let locals = c.bytes(q_elems) * 2
        + c.bytes(bs.saturating_mul(heads * rope))
        + key_dtype.bytes(bs.saturating_mul(2 * dim + rope));
    let q_float = DType::F32.bytes(q_elems)
        + if b.autocast {
            b.half.bytes(q_elems)
        } else {
            Bytes::ZERO
        };
    // `torch.matmul` of (B, S, heads, dim) by the key's (B, 1, dim, keys) broadcasts the
    // batch dimensions: it expands the key to (B, S, dim, keys) and reshapes that to
    // (B * S, dim, keys) for `bmm` (aten `_matmul_impl`), which copies it, in the scores'
    // dtype (autocast casts the key first), unless the batch is 1: merging a size-1 dimension
    // with the stride-0 one is a view. (A CPU profile of the indexer shows the copy at batch 2
    // and none at batch 1.)
    let key_copy = if b.plan.batch > 1 {
        scores_dtype.bytes(bst.saturating_mul(dim))
    } else {
        Bytes::ZERO
    };
    let at_matmul = q_float + key_copy + scores;
    let at_scale_relu = scores * 2;
    // The batch-less causal mask's `~` beside the weighted sum and its masked copy.
    let at_mask = scores
        + DType::F32.bytes(bs.saturating_mul(heads))
        + index_scores * 2
        + Bytes(seq.saturating_mul(keys));
    let at_topk = scores
        + index_scores
        + DType::I64.bytes(bs.saturating_mul(topk))
        + scores_dtype.bytes(bs.saturating_mul(topk)).max(top);
    let peak = locals + at_matmul.max(at_scale_relu).max(at_mask).max(at_topk);
    // The projections: `wq_b`, `wk`, `weights_proj` (and `k_norm` and the rotary, memory-bound).
    let proj_flops =
        2.0 * bs as f64 * (q_rank * heads * dim + hidden * dim + hidden * heads) as f64;
    b.emit(OpSpec {
        name: name.then("proj"),
        kind: OpKind::Matmul,
        params,
        saves: SmallVec::new(),
        out: Bytes::ZERO,
        forward_transient: Bytes::ZERO,
        backward_transient: Bytes::ZERO,
        cost: Cost {
            forward_flops: Flops(proj_flops),
            forward_bytes: locals * 2 + c.bytes(bs.saturating_mul(q_rank + 2 * hidden)),
            forward_kernels: 16,
            min_dim: dim.min(heads),
            modules: 5,
            ..Cost::default()
        },
        compute: c,
        in_backward: false,
    });
    // Every query head against every key (no causal skipping), the weighted sum over heads.
    let score_flops = 2.0 * bst as f64 * heads as f64 * (dim + 1) as f64;
    b.emit(OpSpec {
        name: name.then("scores"),
        kind: OpKind::Matmul,
        params: SmallVec::new(),
        saves: SmallVec::new(),
        out: Bytes::ZERO,
        forward_transient: peak,
        backward_transient: Bytes::ZERO,
        cost: Cost {
            forward_flops: Flops(score_flops),
            // The scores written, scaled, relu'd and read by the weighted sum; the sum, its
            // masked copy and top-k's read; the index mask's and the combined mask's passes.
            forward_bytes: scores * 6
                + key_copy * 2
                + q_float
                + index_scores * 4
                + Bytes(bst) * 5
                + top * 3,
            forward_kernels: 12 + mask_kernels,
            min_dim: dim.min(keys),
            ..Cost::default()
        },
        compute: scores_dtype,
        in_backward: false,
    });
    pinned
}

/// A Mamba mixer as transformers runs it without the `mamba-ssm` CUDA kernels (the torch path
/// of `MambaMixer`, what `pip install transformers` trains with), on the normed block input
/// (its block is `Builder::recurrent_block`): `in_proj` to the input and gate (2 x inner), a
/// depthwise causal `conv1d` and SiLU, `x_proj` to the step size and the input-dependent B
/// and C, `dt_proj`, then `mamba_selective_scan`'s recurrent loop, D skip, SiLU(gate) product
/// and `out_proj`.
///
/// What the scan keeps (modeling_mamba.py): `exp(A * dt)` and `dt * B` over
/// batch x inner x seq x state in fp32 (the discretised A and B), and, per time step, the
/// recurrent state (fp32) that the next step's multiply keeps plus its cast copy that the
/// matmul with C keeps: 14 bytes per (batch, inner, position, state) element, linear in the
/// sequence, while the state carried between steps stays batch x inner x state. Beside it, per
/// position: softplus' input and output (fp32 under autocast), the fp32 input copy `deltaB_u`
/// multiplies, and the D skip's 16-bit input (checked against live-set replays of Mamba-130m,
/// 2026-12-05 and, pure bf16, 2026-12-06).
fn mamba_mixer(b: &mut Builder, mixer: Scope, hn: Val, ssm: crate::spec::model::Ssm) -> Val {
    use crate::graph::op::{ParamRole, TensorKind};
    use crate::units::DType;
    let h = b.model.hidden_size;
    let tokens = hn.tokens;
    let seq = tokens / b.plan.batch.max(1);
    let inner = ssm.inner;
    let proj = b.linear(
        mixer.at("in_proj"),
        hn,
        2 * inner,
        false,
        Some(Proj::InProj),
    );
    let xs = Val {
        width: inner,
        ..proj
    };
    let gate = Val {
        width: inner,
        ..proj
    };
    // conv1d (depthwise, padding conv - 1) saves its input; SiLU saves the conv output.
    let conv_w = b.base_param(
        mixer.at("conv1d.weight"),
        (inner, ssm.conv),
        ParamRole::Linear,
    );
    let conv_b = b.base_param(mixer.at("conv1d.bias"), (1, inner), ParamRole::Bias);
    // `causal_conv1d_fn` runs `F.conv1d(hidden_states.to(weight.dtype), ...)`: with fp32
    // weights under autocast, that fp32 copy is cast back to 16 bits for the convolution, a new
    // tensor it keeps for its weight's gradient; otherwise it keeps a view of in_proj's output.
    // A frozen convolution keeps no input.
    let recast = b.autocast && b.base == DType::F32;
    let conv_in = if !b.trains(ParamRole::Linear) {
        None
    } else if recast {
        Some(b.tensor(TensorKind::Activation, xs.bytes()))
    } else {
        Some(xs.id)
    };
    let conv = b.val(inner, tokens, xs.dtype, xs.grad || conv_in.is_some());
    let op = b.elementwise(
        mixer.at("conv1d"),
        &[xs],
        conv,
        conv_in.into_iter().collect(),
        2.0 * ssm.conv as f64,
    );
    if let Some(o) = b.graph.op_mut(op) {
        o.params.extend([conv_w, conv_b]);
        if recast {
            // The fp32 copy and the 16-bit one, alive while the convolution runs.
            o.forward_transient += DType::F32.bytes(inner * tokens) + xs.bytes();
        }
    }
    let act = b.activation(mixer.at("act"), conv);
    // x_proj reads the transposed activations: F.linear copies them contiguous first.
    let xc = b.contiguous(mixer.at("transpose"), act);
    let dbc = b.linear(
        mixer.at("x_proj"),
        xc,
        ssm.dt_rank + 2 * ssm.state,
        false,
        Some(Proj::XProj),
    );
    // dt, B and C are views of x_proj's output, which the step's matmul and the scan's
    // per-step products with C keep; normed (Falcon Mamba, Jamba), each is a new tensor, the
    // norms keep their fp32 copies instead, and the scan keeps the normed C: its 16-bit
    // slices, or autocast's 16-bit copies of an fp32 one's (a weighted norm's fp32 weight
    // promotes it).
    use crate::spec::model::DtBcNorms;
    let (dt_in, c_kept) = match ssm.dt_bc_norms {
        DtBcNorms::None => (
            Val {
                width: ssm.dt_rank,
                ..dbc
            },
            None,
        ),
        norms => {
            let mut norm = |part: &'static str, width: u64| {
                let x = Val { width, ..dbc };
                match norms {
                    DtBcNorms::Weighted => b.norm(mixer.at(part), x),
                    _ => b.unscaled_rms_norm(mixer.at(part), x, (width, 1)),
                }
            };
            let dt = norm("dt_layernorm", ssm.dt_rank);
            norm("b_layernorm", ssm.state);
            let c = norm("c_layernorm", ssm.state);
            let c_kept = if c.dtype == b.compute() {
                c.id
            } else {
                b.tensor(
                    TensorKind::Activation,
                    b.compute().bytes(tokens * ssm.state),
                )
            };
            (dt, Some(c_kept))
        }
    };
    let dt = b.linear(mixer.at("dt_proj"), dt_in, inner, true, Some(Proj::DtProj));
    let a_log = b.base_param(mixer.at("A_log"), (inner, ssm.state), ParamRole::Linear);
    let d = b.base_param(mixer.at("D"), (1, inner), ParamRole::Linear);
    // softplus(dt + bias) (saves its input): fp32 under autocast, which lists softplus, else
    // in dt's own dtype; the product with A and B keeps its output.
    let soft = if b.autocast { DType::F32 } else { dt.dtype };
    let dt32 = b.val(inner, tokens, soft, true);
    // The scan records autograd when its input or step size needs a gradient (LoRA on in_proj
    // or x_proj below any trained block) or A_log and D train.
    let grad = xc.grad || dt.grad || b.trains(ParamRole::Linear);
    let batch = b.plan.batch;
    let bisn = batch * inner * seq * ssm.state;
    let discretised = b.tensor(TensorKind::Activation, DType::F32.bytes(bisn) * 2);
    let states = b.tensor(
        TensorKind::Activation,
        (DType::F32.bytes(1) + b.compute().bytes(1)) * bisn,
    );
    // softplus keeps its input (autocast's fp32 copy of dt, or dt + bias itself), `dt *
    // B.float()` the fp32 B, and `deltaB * hidden_states.float()` the fp32 copy of the input.
    let small = b.tensor(
        TensorKind::Activation,
        soft.bytes(tokens * inner)
            + DType::F32.bytes(tokens * inner)
            + DType::F32.bytes(tokens * ssm.state),
    );
    let mut saves: smallvec::SmallVec<[TensorId; 6]> =
        smallvec::smallvec![discretised, states, small, dt32.id];
    saves.extend(c_kept);
    // The D skip, `hidden_states * D`, keeps the (16-bit) input for D's gradient.
    if b.trains(ParamRole::Linear) {
        saves.push(act.id);
    }
    let y = b.val(inner, tokens, DType::F32, grad);
    let op = b.elementwise(
        mixer.at("selective_scan"),
        &[xc, dt],
        y,
        saves,
        6.0 * ssm.state as f64,
    );
    if let Some(o) = b.graph.op_mut(op) {
        o.params.extend([a_log, d]);
        // deltaB_u and the A * dt product before exp, alive together while the loop runs;
        // backward sums each step's slice gradients into full-size buffers.
        o.forward_transient += DType::F32.bytes(bisn) * 2;
        o.backward_transient += DType::F32.bytes(bisn) * 3;
        // Per step: a multiply, an add, a cast, a matmul and the views around them.
        let steps = u32::try_from(seq).unwrap_or(u32::MAX);
        o.cost.forward_kernels = steps.saturating_mul(4).saturating_add(12);
        o.cost.backward_kernels = steps.saturating_mul(8).saturating_add(16);
        o.cost.forward_bytes = DType::F32.bytes(bisn) * 6;
        o.cost.backward_bytes = DType::F32.bytes(bisn) * 12;
    }
    // scan_output * silu(gate): SiLU keeps the gate, the product keeps both factors.
    let g = b.activation(mixer.at("gate_act"), gate);
    let yg = b.mul(mixer.at("gate_mul"), y, g);
    // peft refuses LoRA on Mamba's `out_proj` and `conv1d` ("incompatible with Mamba-based
    // models") for the model types it lists (`estimate::check_plan` refuses the plan); Jamba
    // is not among them.
    b.linear(mixer.at("out_proj"), yg, h, false, Some(Proj::OutProj))
}

/// One expert stack's LoRA as peft 0.21 reaches transformers 5's 3-D expert parameters
/// (`ParamWrapper`: factors `[a, b]` shared across experts, E x r rows). peft 0.21.2 folds a
/// single adapter into the stack with one `baddbmm(W, lhs, rhs)` in W's dtype
/// (`_LoraFactorsProxy`): no delta the size of the stack in forward, only the merged weight,
/// which the experts' grouped matmul keeps (`sizes`: merged weight and factor elements; the
/// matmul's input is kept by the matmul, `merged_stack_matmul`); the factors' casts to W's
/// dtype are what `baddbmm` keeps for each other's gradient (none when the adapters already
/// have it).
fn expert_lora_merge(
    b: &mut Builder,
    name: Name,
    params: [crate::graph::op::ParamId; 2],
    (merged, factors): (u64, u64),
    (rank, compute): (u64, crate::units::DType),
) -> usize {
    let factor_copies = if b.adapter == compute {
        crate::units::Bytes::ZERO
    } else {
        compute.bytes(factors)
    };
    let kept = b.tensor(
        crate::graph::op::TensorKind::Activation,
        compute.bytes(merged) + factor_copies,
    );
    let merge = b.val(1, 1, compute, true);
    let op = b.elementwise(name, &[], merge, smallvec::smallvec![kept], 0.0);
    if let Some(o) = b.graph.op_mut(op) {
        o.params.extend(params);
        o.cost.forward_flops = crate::units::Flops(2.0 * (merged * rank) as f64);
    }
    op
}

/// A grouped matmul (`matmul`, input `input`) over a merged stack (`merged` bytes), which needs
/// a gradient: the matmul keeps its input for that gradient (the stack itself being frozen, it
/// would keep nothing), makes the gradient in its backward beside its input's, and it waits,
/// as the gradient of a tensor autograd accumulates (`Op::grads`), until the merge `merge`
/// folds it into the LoRA factors. The input is its own tensor: the experts' frame names the
/// gathered rows too, and one tensor is counted once.
fn merged_stack_matmul(
    b: &mut Builder,
    (merge, matmul): (usize, usize),
    input: TensorId,
    merged: crate::units::Bytes,
) {
    let g = b.tensor(crate::graph::op::TensorKind::Activation, merged);
    if let Some(o) = b.graph.op_mut(matmul) {
        o.saves.push(input);
        o.backward_transient += merged;
        o.grads.push(g);
    }
    if let Some(o) = b.graph.op_mut(merge) {
        o.grads.push(g);
    }
}

/// LoRA beside a linear (input `x`, output `y`) that only peft's `all-linear` reaches (it has
/// no role a target list can name: MoE routers, Qwen2-MoE's `shared_expert_gate`).
fn all_linear_lora(b: &mut Builder, name: Name, x: Val, y: Val) -> Val {
    let Some(r) = b
        .plan
        .method
        .lora()
        .filter(|l| l.targets == crate::spec::plan::LoraTargets::AllLinear)
        .map(|l| l.rank)
    else {
        return y;
    };
    let a = b.adapter_param(name.then("lora_A"), (r, x.width));
    let bb = b.adapter_param(name.then("lora_B"), (y.width, r));
    let mid = b.lora_matmul(name.then("lora_A"), x, r, a, x.grad);
    let up = b.lora_matmul(name.then("lora_B"), mid, y.width, bb, true);
    b.residual(name.then("lora_add"), y, up)
}

/// GPT-OSS's expert gate (`GptOssExperts._apply_gate`) on the interleaved gate/up projection
/// `gu`: `gate = gu[..., ::2].clamp(max=7)`, `up = gu[..., 1::2].clamp(-7, 7)`,
/// `glu = gate * sigmoid(1.702 gate)`, then `(up + 1) * glu`. Each clamp keeps its input for its
/// mask (both strided views of `gu`, which thus stays for backward), the scaled copy is kept by
/// nobody, sigmoid keeps its output and each product both factors.
fn clamped_swiglu(b: &mut Builder, name: Name, gu: Val) -> Val {
    let half = Val {
        width: gu.width / 2,
        ..gu
    };
    // One element-wise op on `input` to a new half-width value, keeping `keep`.
    let step =
        |b: &mut Builder, op: &'static str, input: Val, keep: Option<TensorId>, flops: f64| {
            let out = b.val(half.width, gu.tokens, gu.dtype, gu.grad);
            let saves = keep.map_or_else(smallvec::SmallVec::new, |t| smallvec::smallvec![t]);
            b.elementwise(name.then(op), &[input], out, saves, flops);
            out
        };
    let gate = step(b, "gate_clamp", half, Some(gu.id), 1.0);
    let up = step(b, "up_clamp", half, Some(gu.id), 2.0);
    let scaled = step(b, "alpha", gate, None, 1.0);
    let sig = b.sigmoid(name.then("sigmoid"), scaled);
    let glu = b.mul(name.then("glu"), gate, sig);
    let up1 = step(b, "up_plus_one", up, None, 1.0);
    b.mul(name.then("mul"), up1, glu)
}

/// Gemma 4's experts beside the MLP (`Gemma4TextDecoderLayer` with `enable_moe_block`), on the
/// block's residual input `x`: the router (`Gemma4TextRouter`) reads a scale-less RMSNorm of it
/// times a learned per-channel `scale` and hidden^-0.5, the experts read
/// `pre_feedforward_layernorm_2` of it, and `post_feedforward_layernorm_2` norms their output.
/// Each top-k weight is multiplied by its expert's `per_expert_scale` (a gather of E values).
fn experts_beside_mlp(b: &mut Builder, name: Scope, x: Val, moe: crate::spec::model::Moe) -> Val {
    // The residual input gains two readers beyond the residual add and the MLP's norm.
    b.fork(name.at("moe").then("fork"), x, 3);
    let h = b.model.hidden_size;
    let normed = b.unscaled_rms_norm(name.at("router").then("norm"), x, (h, 2));
    let scale = b.base_param(name.at("router").then("scale"), (1, h), ParamRole::Linear);
    let per_expert = b.base_param(
        name.at("router").then("per_expert_scale"),
        (1, moe.experts),
        ParamRole::Linear,
    );
    let trains = b.trains(ParamRole::Linear);
    // `normed * scale`: `scale` is a dimensioned (h,) tensor, so the product is in the wider
    // dtype. The constant factor keeps nothing; `per_expert_scale` multiplies the top-k weights
    // (tokens x k: no memory that matters).
    let dtype = wider(normed.dtype, b.base);
    let scaled = b.param_mul(
        name.at("router").then("scale"),
        normed,
        (scale, trains),
        dtype,
    );
    if let Some(o) = b.graph.len().checked_sub(1).and_then(|i| b.graph.op_mut(i)) {
        o.params.push(per_expert);
    }
    let router_x = b.val(h, x.tokens, scaled.dtype, scaled.grad);
    b.elementwise(
        name.at("router").then("root_size"),
        &[scaled],
        router_x,
        smallvec::SmallVec::new(),
        1.0,
    );
    let experts_x = b.norm(name.at("pre_feedforward_layernorm_2"), x);
    let e = in_tp_region(b, |b| {
        moe_ops(b, (name, "experts"), experts_x, router_x, moe)
    });
    b.norm(name.at("post_feedforward_layernorm_2"), e)
}

/// transformers' sparse MoE block (`MixtralSparseMoeBlock` and its kin): router logits from a
/// linear `gate` (h -> experts, biased in GPT-OSS only; not a LoRA target, so LoRA's
/// `gate`/`w1` means the experts' gate projections), top-k weights from a softmax (or sigmoid)
/// over the experts; then the experts as transformers 5 runs them (`grouped_mm_experts_forward`):
/// every routed row gathered in expert order, one grouped matmul per projection over all of
/// them against the `[E, out, in]` stacks, the gated activation between, the outputs scaled by
/// the routing weights, put back in token order and summed over each token's choices.
fn moe_ops(
    b: &mut Builder,
    at: (Scope, &'static str),
    x: Val,
    router_x: Val,
    moe: crate::spec::model::Moe,
) -> Val {
    let name = b.scope(at.0, at.1);
    let h = b.model.hidden_size;
    let inter = moe.expert_intermediate;
    let experts = moe.experts.max(1);
    // The block's forward names its input throughout (`hidden_states`).
    let block_frame = b.name(&[x.id]);
    // Qwen's MoE blocks run the shared expert before the router (`Family::shared_expert_first`):
    // its saved activations are alive through the routed experts' forward, its output is
    // named (`shared_expert_output`) until its gate scales it, and its backward comes after
    // theirs.
    let early = (b.model.family.shared_expert_first() && moe.shared_intermediate > 0).then(|| {
        let shared_scope = b.scope(name, "shared_expert");
        dense_ffn(b, shared_scope, x, moe.shared_intermediate)
    });
    b.name(early.map(|(s, _)| s.id).as_slice());
    for i in 0..moe.input_jitter {
        b.jitter(
            name.at("jitter")
                .then(["block", "router"][i.min(1) as usize]),
            x,
        );
    }
    // An fp32 router reads an fp32 copy of its input (the input itself when it is fp32
    // already), which its matmul and LoRA keep as they would a half-precision one. ERNIE's is
    // an fp32 module with autocast off; HunYuan's an fp32 weight whose matmul autocast still
    // runs in bf16, and which reads its input as it is when the weight is not fp32 at run time
    // (`if self.wg.weight.dtype == torch.float32`), as under an engine that runs every
    // parameter in bf16; DeepSeek's and GLM-4.5's cast both operands to fp32,
    // which autocast undoes when it is on, and which without it is the fp32 matmul that
    // autocast to an fp32 "half" type describes (the input's cast kept by the matmul), plus the
    // weight's fp32 copy, kept for the input's gradient.
    use crate::spec::model::RouterPrecision;
    use crate::units::DType;
    let saved = (b.autocast, b.half, b.base, b.storage_base);
    let operands_fp32 = moe.router == RouterPrecision::Fp32Operands && !b.autocast;
    let router_in = match moe.router {
        RouterPrecision::Fp32Module => {
            (b.autocast, b.base, b.storage_base) = (false, DType::F32, DType::F32);
            b.cast(name.at("gate").then("float"), router_x, DType::F32)
        }
        RouterPrecision::Fp32Operands if operands_fp32 => {
            (b.autocast, b.half) = (true, DType::F32);
            router_x
        }
        RouterPrecision::Fp32Weight if !super::build::engine_casts_parameters(b.plan) => {
            (b.base, b.storage_base) = (DType::F32, DType::F32);
            if b.autocast {
                router_x
            } else {
                b.cast(name.at("gate").then("float"), router_x, DType::F32)
            }
        }
        RouterPrecision::Fp32Operands | RouterPrecision::Fp32Weight | RouterPrecision::Model => {
            router_x
        }
    };
    let mut router = if b.model.family.router_is_linear() {
        b.nn_linear(name.at("gate"), router_in, experts, moe.bias)
    } else {
        b.linear(name.at("gate"), router_in, experts, moe.bias, None)
    };
    let gate_op = b.graph.len().saturating_sub(1);
    if moe.frozen_score_bias {
        // One value per expert, frozen (`requires_grad=False`), added to the scores before
        // top-k; read by the router. ERNIE's `moe_statics` is fp32 (the router's module is);
        // AFMoE's `expert_bias` has the model's dtype.
        let statics = b.frozen_param(name.at("gate").then("moe_statics"), (1, experts));
        if let Some(o) = b.graph.op_mut(gate_op) {
            o.params.push(statics);
        }
    }
    if operands_fp32 && x.grad {
        let copy = b.tensor(
            crate::graph::op::TensorKind::Activation,
            DType::F32.bytes(experts * h),
        );
        if let Some(o) = b.graph.op_mut(gate_op) {
            o.saves.push(copy);
            o.cost.forward_kernels += 1;
        }
    }
    // Whether peft's LoRA reaches the experts and the router at all
    // (`Family::peft_converts_experts`); `all-linear` then adds the router's weight.
    let peft_reaches_experts = b.model.family.peft_converts_experts();
    // A router that is an `nn.Linear` (`Family::router_is_linear`) is wrapped by `all-linear`
    // although peft leaves its experts alone.
    if peft_reaches_experts || b.model.family.router_is_linear() {
        router = all_linear_lora(b, name.at("gate"), router_in, router);
    }
    (b.autocast, b.half, b.base, b.storage_base) = saved;
    if moe.routing == crate::spec::model::Routing::EveryExpert {
        let out = experts_on_every_token(b, name, x, router, moe);
        let out = shared_experts(b, name, x, out, moe, early);
        let out = output_norm(b, name, out, moe);
        b.unname(block_frame);
        return out;
    }
    let probs = b.cast(
        name.at("router").then("softmax"),
        router,
        crate::units::DType::F32,
    );
    use crate::spec::model::RoutingWeights;
    let weights = match moe.weights {
        RoutingWeights::Fp32 => DType::F32,
        RoutingWeights::Logits => router.dtype,
        RoutingWeights::Softmax if b.autocast => DType::F32,
        RoutingWeights::Softmax => router.dtype,
        RoutingWeights::Hidden => x.dtype,
    };
    // Top-k routing from an fp32 softmax casts the weights back where the family does.
    let cast_back = u32::from(weights != probs.dtype);
    if let Some(o) = b.graph.len().checked_sub(1).and_then(|i| b.graph.op_mut(i)) {
        let (forward, backward) = match moe.routing {
            // The router's own kernels beyond its linear and the cast to fp32 (a dispatch count
            // of Mixtral's and Qwen3-MoE's blocks, torch 2.15): softmax, topk, the top-k
            // weights' sum, and the clone and division of the in-place `/=` on topk's output,
            // 5, and the weights' cast back to the logits' dtype where the family makes one;
            // backward, the cast's, the division's (div, neg, sum and a second div), topk's
            // scatter, softmax's and the fork's add, 10, and the cast back's.
            // ERNIE's router adds its `moe_statics` bias before topk, gathers the weights from
            // the probabilities and clamps their sum: add, gather and clamp forward; gather's
            // zeroed scatter and clamp's masked gradient backward.
            crate::spec::model::Routing::TopK if moe.router == RouterPrecision::Fp32Module => {
                (8, 13)
            }
            crate::spec::model::Routing::TopK => (5 + cast_back, 10 + cast_back),
            // The same without the renormalisation (the sum, clone and division forward; the
            // division's four kernels, the sum's expand and the fork's add backward).
            crate::spec::model::Routing::TopKUnnormalised => (2 + cast_back, 4 + cast_back),
            // GPT-OSS: topk on the logits, then the softmax (this op); backward, topk's zeros
            // and scatter and the fork's add (a dispatch count of its block, torch 2.15).
            // Granite's and Command A+'s `softmax(top_k_logits, dtype=torch.float)` cast to the
            // hidden states' dtype are counted as GPT-OSS's.
            crate::spec::model::Routing::SoftmaxOfTopK => (1, 3),
            // Command A+'s sigmoid in place of that softmax (in the logits' dtype, so its
            // `.to(hidden_states.dtype)` copies nothing), its `/ sum` where normalised: the sum
            // and the division forward, the division's four kernels and the sum's expand
            // backward, as in the in-place renormalisation above (which also clones).
            crate::spec::model::Routing::SigmoidOfTopK { normalised } => {
                let n = u32::from(normalised);
                (1 + 2 * n, 3 + 5 * n)
            }
            // PhimoeTopKRouter's `sparsemixer` (a dispatch count of the router in training,
            // torch 2.15, views and detaches left out): per choice the threshold mask (max,
            // abs, clamp, sub, div, gt), masked_fill, the Gumbel sample (empty_like,
            // exponential_, log, sub, max), softmax, gather, the midpoint mask (max, eq,
            // rand_like, gt, logical_or, add) and PhimoeMultiplier's mul, 22 and the second's
            // 23 (a `uniform_` more), the first choice masked out with `scatter`, two `cat`s:
            // 48, less the cast already counted; backward, PhimoeMultiplier's four per choice
            // (its softmax is not differentiated), their sum and the fork's add, 10. Its
            // tensors are tokens x experts: no memory that matters.
            crate::spec::model::Routing::SparseMixer => (47, 10),
            // Returned before the softmax.
            crate::spec::model::Routing::EveryExpert => (0, 0),
        };
        o.cost.forward_kernels += forward;
        o.cost.backward_kernels += backward;
    }
    if probs.grad {
        // `F.softmax(router_logits, dim=-1, dtype=torch.float)` keeps its fp32 output for its
        // backward (`_softmax_backward_data` reads it), tokens x experts: 8 MiB a layer for
        // Qwen3-MoE's 128 experts at 16,384 tokens, which a CPU replay holds in every layer.
        // (An fp32 router's softmax is no cast: an op of its own keeps it.)
        if probs.id != router.id {
            if let Some(o) = b.graph.len().checked_sub(1).and_then(|i| b.graph.op_mut(i)) {
                o.saves.push(probs.id);
            }
        } else {
            let kept = b.tensor(crate::graph::op::TensorKind::Activation, probs.bytes());
            b.hold_tensor(name.at("router").then("softmax"), kept, DType::F32);
        }
    }
    // Nemotron 3 Super's LatentMoE: the experts read `fc1_latent_proj(hidden_states)` and
    // work at its width; `fc2_latent_proj` projects their sum back (both `nn.Linear`, biased
    // by `mlp_bias`, reached by no target name).
    let hidden = h;
    let x_block = x;
    let x = match moe.latent {
        Some(latent) => {
            let bias = b.model.linear_bias;
            b.nn_linear(name.at("fc1_latent_proj"), x, latent, bias)
        }
        None => x,
    };
    let h = x.width;
    // transformers 5 runs every routed row through the experts at once
    // (`grouped_mm_experts_forward` in integrations/moe.py, its default
    // `experts_implementation`; the fallback without a grouped kernel writes the same S-row
    // outputs). The rows are sorted by expert, not split: each projection is one grouped matmul
    // over all S = tokens x top_k routed rows against the whole `[E, out, in]` stack. So what a
    // layer holds does not depend on how the router spreads the tokens: the one op set below
    // carries all S rows and all E experts' weights.
    let routed = x.tokens * moe.top_k;
    // The first projection's width: gate and up, or up alone for non-gated experts.
    let up_width = if moe.gate == ExpertGate::None {
        inter
    } else {
        2 * inter
    };
    // LoRA on the experts as peft 0.21 reaches transformers 5's 3-D expert parameters
    // (`gate_up_proj` [E, 2 inter, h], `down_proj` [E, h, inter]; `ParamWrapper`): factors
    // shared across experts with E x r rows, the delta `B @ A` added to the whole parameter
    // every forward; the experts' matmuls then keep the merged (bf16) weights and their inputs
    // for backward.
    let (gate_up, down) = if peft_reaches_experts {
        (
            b.lora_on_experts(Proj::Gate)
                .or(b.lora_on_experts(Proj::Up)),
            b.lora_on_experts(Proj::Down),
        )
    } else {
        (None, None)
    };
    // Each wrapped stack is merged where the experts read it (`torch.nn.utils.parametrize`
    // recomputes a parameter at each access): gate_up before the first grouped matmul, down
    // before the second, so that in backward the down stack's merge folds its gradient into
    // its factors (and frees its merged weight) before the gate_up stack's gradient exists.
    // `baddbmm` is on autocast's list: the merged stacks are in its dtype.
    let merge_dtype = b.compute();
    let gate_up_merge = gate_up.map(|r| {
        // A pair of factors per fused projection (gate and up, or up alone).
        let rows = up_width / inter.max(1) * r * experts;
        let a = b.adapter_param(name.at("experts").then("gate_up_lora_A"), (rows, h));
        let bb = b.adapter_param(name.at("experts").then("gate_up_lora_B"), (up_width, rows));
        let merged = experts * up_width * h;
        let op = expert_lora_merge(
            b,
            name.at("experts").then("gate_up_lora_merge"),
            [a, bb],
            (merged, rows * (h + up_width)),
            (r, merge_dtype),
        );
        (op, merge_dtype.bytes(merged))
    });
    let down_merge = down.map(|r| {
        let rows = r * experts;
        let a = b.adapter_param(name.at("experts").then("down_lora_A"), (rows, inter));
        let bb = b.adapter_param(name.at("experts").then("down_lora_B"), (h, rows));
        ([a, bb], (experts * h * inter, rows * (inter + h)), r)
    });
    // transformers 5's experts run `grouped_mm` on `input.to(weight.dtype)`, which autocast does
    // not touch (`_grouped_mm` is not on its lists): fp32 experts (mixed precision, QLoRA's
    // upcast) compute in fp32 and keep no 16-bit weight copies.
    let autocast = std::mem::replace(&mut b.autocast, false);
    let es = b.scope(name, "experts");
    let mark = b.graph.mark();
    // `hidden_states[perm // top_k]`: an (S, h) copy of the rows in expert order, cast to the
    // stack's dtype; its in-place pre-mask (`masked_fill_`) keeps it. Its backward scatters the
    // gradient back.
    let xe = b.val(x.width, routed, x.dtype, x.grad);
    let gather = b.elementwise(es.at("gather"), &[x], xe, smallvec::SmallVec::new(), 0.0);
    keeps_indices(b, routed);
    // `grouped_mm_experts_forward` names the gathered rows (`selected_hidden_states_g`) until
    // it returns, whether or not a matmul keeps them.
    let experts_frame = b.name(&[xe.id]);
    if let Some(o) = b.graph.op_mut(gather) {
        // Beyond the ops below (a dispatch count of Mixtral's block, torch 2.15, views left
        // out): forward sort, floor_divide, the routing weights' gather, the int cast, histc,
        // cumsum, the sentinel compare, clamp_, the pre-mask's masked_fill_, arange and
        // index_put_ for the inverse permutation, 11; backward the reorder's zeros, the weight
        // product's second multiply with its cast and sum, the gate product's second multiply,
        // the `cat` of the two halves' gradients, the pre-mask's masked_fill, this gather's
        // zeros and the routing weights' gather (zeros and index_put), 10.
        o.cost.forward_kernels += 11;
        o.cost.backward_kernels += 10;
    }
    let stack = b.compute();
    let xe = b.cast(es.at("to_weight_dtype"), xe, stack);
    // transformers 5's experts are 3-D parameters, not `nn.Linear` modules: no target
    // name reaches them one by one (LoRA reaches them through the fused stack above),
    // IA3 does not wrap them, and bitsandbytes quantizes `nn.Linear` only
    // (`replace_with_bnb_linear`), so under QLoRA they stay 16-bit and
    // `prepare_model_for_kbit_training` upcasts them to fp32 with everything else that
    // was not quantized.
    let gate_up_op = b.graph.len();
    let gu = grouped_linear(b, es.at("gate_up_proj"), xe, up_width, (moe.bias, experts));
    if let Some((merge, merged)) = gate_up_merge {
        merged_stack_matmul(b, (merge, gate_up_op), xe.id, merged);
    }
    let gu = sentinel_mask(b, es.at("gate_up_mask"), gu);
    let p = match moe.gate {
        ExpertGate::Activation => {
            // `gate_up_proj`, chunked: the activation keeps the gate half and the product the
            // up half, views of one (S, 2 x inter) output.
            let gate = Val { width: inter, ..gu };
            let a = b.activation(es.at("act"), gate);
            b.mul(es.at("mul"), a, Val { width: inter, ..gu })
        }
        ExpertGate::ClampedSwiglu => clamped_swiglu(b, es.at("gate"), gu),
        // `self.act_fn(proj_out)` on the whole (S, inter) output.
        ExpertGate::None => b.activation(es.at("act"), gu),
    };
    let down_merge = down_merge.map(|(params, sizes, r)| {
        let op = expert_lora_merge(
            b,
            name.at("experts").then("down_lora_merge"),
            params,
            sizes,
            (r, merge_dtype),
        );
        (op, merge_dtype.bytes(sizes.0))
    });
    let down_op = b.graph.len();
    let d = grouped_linear(b, es.at("down_proj"), p, h, (moe.bias, experts));
    if let Some((merge, merged)) = down_merge {
        merged_stack_matmul(b, (merge, down_op), p.id, merged);
    }
    let d = sentinel_mask(b, es.at("down_mask"), d);
    // ... and the masked down projection (`proj_out`, last bound there) likewise.
    b.name(&[d.id]);
    // Scaled by the routing weights (in the wider of their dtype and the experts'; the product
    // keeps both factors), put back in token order (`weighted_out[inv_perm]`, an (S, h) copy
    // that keeps nothing) and summed over each token's top-k choices, then cast to the hidden
    // states' dtype.
    let w = b.val(1, routed, weights, probs.grad);
    let scaled = b.mul(es.at("weight"), d, w);
    let reordered = b.val(h, routed, scaled.dtype, scaled.grad);
    let reordered = unkept(b, es.at("reorder"), scaled, (reordered, 0.0));
    // Indexing keeps its indices (`IndexBackward0`): the inverse permutation, S int64s. Being
    // the block's last saved tensor where no shared expert follows, it is where backward
    // reruns a checkpointed block's forward, with this op's output gradient (S rows) waiting.
    keeps_indices(b, routed);
    let summed = b.val(
        h,
        x.tokens,
        reordered.dtype,
        reordered.grad || b.is_base_trainable(),
    );
    let summed = unkept(b, es.at("sum"), reordered, (summed, 1.0));
    let out = b.cast(es.at("to_hidden_dtype"), summed, x.dtype);
    // One call of the `experts` module (and of its activation module).
    let calls = 1 + u32::from(moe.gate == ExpertGate::Activation);
    launched_once(b, mark.0, (0, calls), None);
    b.unname(experts_frame);
    b.autocast = autocast;
    let out = match moe.latent {
        Some(_) => {
            let bias = b.model.linear_bias;
            b.nn_linear(name.at("fc2_latent_proj"), out, hidden, bias)
        }
        None => out,
    };
    let x = x_block;
    let out = shared_experts(b, name, x, out, moe, early);
    let out = output_norm(b, name, out, moe);
    b.unname(block_frame);
    out
}

/// A.X K1's `post_mlp_layernorm`: the model's RMSNorm on the sparse block's output.
fn output_norm(b: &mut Builder, name: Scope, out: Val, moe: crate::spec::model::Moe) -> Val {
    if moe.output_norm {
        b.norm(name.at("post_mlp_layernorm"), out)
    } else {
        out
    }
}

/// One grouped matmul of the experts: `_grouped_mm` over the S routed rows against the whole
/// `[E, out, in]` stack, which is `b.linear` on those rows with parameters standing for all
/// `experts` stacks (weights, gradients, optimizer states and the bytes the kernel reads). A
/// bias is gathered per routed row (`bias[expert_ids]`, an (S, out) tensor) and added in place.
fn grouped_linear(
    b: &mut Builder,
    name: Name,
    x: Val,
    out: u64,
    (bias, experts): (bool, u64),
) -> Val {
    let op = b.graph.len();
    let y = b.linear(name, x, out, bias, None);
    let e = experts.max(1);
    let ids = b
        .graph
        .op_mut(op)
        .map(|o| o.params.clone())
        .unwrap_or_default();
    let mut weights = crate::units::Bytes::ZERO;
    for id in ids {
        if let Some(p) = b.graph.params.get_mut(id.0 as usize) {
            weights += p.compute_bytes();
            p.stack(e);
        }
    }
    if let Some(o) = b.graph.op_mut(op) {
        o.cost.forward_bytes += weights * (e - 1);
        o.cost.backward_bytes += weights * (2 * (e - 1));
        // Autocast casts the whole stacked fp32 weight (and its gradient back).
        o.cost.side.forward_cast = o.cost.side.forward_cast * e;
        o.cost.side.backward_cast = o.cost.side.backward_cast * e;
        // The grouped kernel runs each expert's rows as one group: the rate of a GEMM as tall
        // as a group (routing taken as uniform).
        o.cost.min_dim = o.cost.min_dim.min(x.tokens.div_ceil(e));
        if bias {
            o.forward_transient += y.bytes();
            o.cost.forward_kernels += 2;
        }
    }
    y
}

/// `proj_out.masked_fill(sentinel_mask, 0.0)` after a grouped matmul (the rows an expert-
/// parallel sentinel leaves unwritten): a new tensor of the matmul's output. Backward masks
/// the gradient into another.
fn sentinel_mask(b: &mut Builder, name: Name, x: Val) -> Val {
    let out = b.val(x.width, x.tokens, x.dtype, x.grad);
    unkept(b, name, x, (out, 0.0))
}

/// An element-wise op from `input`, which nothing keeps, to a new `out` (with `flops` per
/// element), keeping nothing itself: the input dies only as the op returns, so both are live
/// while it runs.
fn unkept(b: &mut Builder, name: Name, input: Val, (out, flops): (Val, f64)) -> Val {
    let op = b.elementwise(name, &[input], out, smallvec::SmallVec::new(), flops);
    if let Some(o) = b.graph.op_mut(op) {
        o.forward_transient += input.bytes();
    }
    out
}

/// The last op, an `index` with `count` int64 indices, keeps them for its backward.
fn keeps_indices(b: &mut Builder, count: u64) {
    let Some(last) = b.graph.len().checked_sub(1) else {
        return;
    };
    if b.graph.op(last).is_some_and(|o| o.in_backward) {
        let t = b.tensor(
            crate::graph::op::TensorKind::Activation,
            crate::units::DType::I64.bytes(count),
        );
        if let Some(o) = b.graph.op_mut(last) {
            o.saves.push(t);
        }
    }
}

/// Expert `e`'s op set (from op `since`) in a layer whose experts run in one call: it launches
/// nothing beyond expert 0's set and makes `calls` module calls (on its first op). With
/// `batched` (the expert count E), that one call has every expert's buffers in flight: the set
/// standing for the other E - 1 holds theirs in forward (expert 0's results already made) and
/// all E's in backward (beside expert 0's still-held inputs).
fn launched_once(b: &mut Builder, since: usize, (e, calls): (u64, u32), batched: Option<u64>) {
    for i in since..b.graph.len() {
        if let Some(o) = b.graph.op_mut(i) {
            o.cost.modules = 0;
            if e == 1 {
                o.cost.forward_kernels = 0;
                o.cost.backward_kernels = 0;
                if let Some(experts) = batched {
                    o.forward_transient = o.forward_transient * (experts - 1);
                    o.backward_transient = o.backward_transient * experts;
                }
            }
        }
    }
    if let Some(o) = b.graph.op_mut(since) {
        o.cost.modules = calls;
    }
}

/// The scope of expert `e` of a layer's two expert op sets: `experts.0`, and `experts.1-{E-1}`
/// for the one standing for the others.
fn expert_scope(b: &mut Builder, name: Scope, e: u64, experts: u64) -> Scope {
    let label = match e {
        0 => "experts.0".to_string(),
        _ if experts > 2 => format!("experts.1-{}", experts - 1),
        _ => "experts.1".to_string(),
    };
    b.scope(name, &label)
}

/// Llama 4's experts (`Llama4TextMoe`, `Llama4TextExperts`) on the router's logits: every
/// token through every expert. The router keeps the top-k logits (the rest -inf) and takes
/// `sigmoid(scores.float()).to(dtype)`, which keeps its output; `hidden_states.repeat(E, 1)`
/// copies the input once per expert, and the product with the transposed scores keeps both
/// (the copies for the scores' gradient). The experts are two `torch.bmm`s over that
/// (E, tokens, hidden) product: gate_up (whose output the SiLU and `up *` keep, as views),
/// then down; `bmm` is on autocast's list, so fp32 expert stacks get cached bf16 copies. The
/// outputs are summed over the experts (`sum(0)`, nothing kept) into the shared expert's.
fn experts_on_every_token(
    b: &mut Builder,
    name: Scope,
    x: Val,
    logits: Val,
    moe: crate::spec::model::Moe,
) -> Val {
    let h = b.model.hidden_size;
    let inter = moe.expert_intermediate;
    let experts = moe.experts.max(1);
    let tokens = x.tokens;
    let scores = b.val(experts, tokens, logits.dtype, logits.grad);
    let op = b.elementwise(
        name.at("router").then("sigmoid"),
        &[logits],
        scores,
        smallvec::smallvec![scores.id],
        4.0,
    );
    if let Some(o) = b.graph.op_mut(op) {
        // topk, full_like, scatter_, the cast to fp32, sigmoid and the cast back; backward
        // the casts', sigmoid's and the scatter's gather.
        o.cost.forward_kernels = 6;
        o.cost.backward_kernels = 4;
    }
    let all = tokens.saturating_mul(experts);
    let repeated = b.val(h, all, x.dtype, x.grad);
    let op = b.elementwise(
        name.at("repeat"),
        &[x],
        repeated,
        smallvec::SmallVec::new(),
        0.0,
    );
    // `repeat`'s derivative sums the copies' gradients: one pass over them.
    b.set_backward_bytes(op, repeated.bytes() + x.bytes());
    // `router_scores.transpose(0, 1).reshape(-1, 1)`: a copy of the (tokens, E) scores.
    let weights = b.val(1, all, scores.dtype, scores.grad);
    b.elementwise(
        name.at("scores_t"),
        &[scores],
        weights,
        smallvec::SmallVec::new(),
        0.0,
    );
    let scaled = b.mul(name.at("routed_in"), repeated, weights);
    let out = b.val(
        h,
        tokens,
        scaled.dtype,
        scaled.grad || b.is_base_trainable(),
    );
    // Expert 0, then one expert standing for the other E - 1 (`OpGraph::scale_since`): each
    // reads its rows of the product, a view its matmul keeps whole (once, made before).
    for e in 0..experts.min(2) {
        let es = expert_scope(b, name, e, experts);
        let mark = b.graph.mark();
        let xe = Val { tokens, ..scaled };
        let gate_up = b.linear(es.at("gate_up_proj"), xe, 2 * inter, moe.bias, None);
        let gate = Val {
            width: inter,
            ..gate_up
        };
        let a = b.activation(es.at("act"), gate);
        let up = Val {
            width: inter,
            ..gate_up
        };
        let p = b.mul(es.at("mul"), up, a);
        let d = b.linear(es.at("down_proj"), p, h, moe.bias, None);
        b.elementwise(es.at("sum"), &[d], out, smallvec::SmallVec::new(), 1.0);
        if e == 1 {
            b.graph.scale_since(mark, experts - 1);
        }
        // Each `bmm` launches once for all experts, with all their buffers in flight; the
        // `experts` module is called once.
        launched_once(b, mark.0, (e, u32::from(e == 0)), Some(experts));
    }
    // The sum over experts is complete once the last expert has added its rows: what follows
    // (the shared expert's residual, which holds this gradient across the shared branch's
    // backward) must see it made there, not before the experts.
    if let Some(last) = b.graph.len().checked_sub(1) {
        b.graph.set_producer(out.id, last);
    }
    out
}

/// The routed experts' output `out` plus the shared experts every token passes through
/// (Qwen2-MoE's `shared_expert`, DeepSeek's `shared_experts`, Llama 4's `shared_expert`): a
/// dense gated FFN, scaled by a sigmoid gate in Qwen2-MoE.
/// `early`: the shared expert's output and last op reading `x`, where the family runs it before
/// the router.
fn shared_experts(
    b: &mut Builder,
    name: Scope,
    x: Val,
    out: Val,
    moe: crate::spec::model::Moe,
    early: Option<(Val, usize)>,
) -> Val {
    if moe.shared_intermediate == 0 {
        return out;
    }
    let (mut s, mut last_reader) = match early {
        Some(made) => made,
        None => {
            let shared_scope = b.scope(name, "shared_expert");
            dense_ffn(b, shared_scope, x, moe.shared_intermediate)
        }
    };
    if moe.shared_gate {
        let g = b.nn_linear(name.at("shared_expert_gate"), x, 1, false);
        // An `nn.Linear`, so `all-linear` wraps it.
        let g = all_linear_lora(b, name.at("shared_expert_gate"), x, g);
        last_reader = b.graph.len() - 1;
        let sig = b.sigmoid(name.at("shared_gate_sigmoid"), g);
        s = b.mul(name.at("shared_gate_mul"), s, sig);
    }
    // The block's input to the experts is read by the router, the routed experts and the shared
    // ones. Its last reader's backward runs first, and that contribution to its gradient waits
    // in the sum through the other readers' backward: the shared experts' (or Qwen's gate's,
    // whose shared expert ran first) through the routed experts' whole backward. A shared
    // expert run first with no gate after the experts leaves the routed gather as the last
    // reader, whose backward ends the routed side: nothing waits across it.
    if early.is_none() || moe.shared_gate {
        b.hold_grad_sum(x, last_reader);
    }
    // Hy3's `(routed_output.float() + self.shared_experts(x).float()).to(x.dtype)`: two fp32
    // copies, their fp32 sum, and its cast back (no-ops where the hidden states are fp32).
    let hidden = x.dtype;
    let (out, s) = if moe.fp32_combine {
        (
            b.cast(name.at("routed_float"), out, DType::F32),
            b.cast(name.at("shared_float"), s, DType::F32),
        )
    } else {
        (out, s)
    };
    let sum = b.residual(name.at("shared_add"), out, s);
    let sum = if moe.fp32_combine {
        b.cast(name.at("combine_cast"), sum, hidden)
    } else {
        sum
    };
    if moe.shared_average {
        // `(final_hidden_states + shared_expert_output) / 2`: a new tensor; a division by a
        // constant keeps nothing for backward.
        b.scale(name.at("shared_average"), sum)
    } else {
        sum
    }
}
