//! The attention core: which SDPA kernel runs (fused, math, eager) and what each keeps.

use super::build::{Builder, OpSpec, Val, unless_kept};
use crate::graph::op::{AttentionPath, Cost, Name, OpKind, TensorId, TensorKind};
use crate::spec::model::{ReturnedWeights, Stack};
use crate::spec::plan::AttentionKernel;
use crate::units::{Bytes, DType, Flops};
use smallvec::SmallVec;

impl Builder<'_> {
    /// Self- or cross-attention core between projected q, k, v.
    pub fn attention(
        &mut self,
        name: Name,
        [q, k, v]: [Val; 3],
        stack: &Stack,
        batch: u64,
        (seq_q, seq_k): (u64, u64),
        call: AttnCall,
    ) -> Val {
        let AttnCall {
            mask,
            window,
            q_head_major,
            mut pinned,
        } = call;
        let heads = stack.heads;
        let head_dim = stack.head_dim;
        // Values may be narrower than queries and keys (DeepSeek's latent attention).
        let v_head = v.width / stack.kv_heads.max(1);
        let grad = q.grad || k.grad || v.grad;
        let p_drop = self.model.dropout.attention;
        let scores = batch
            .saturating_mul(heads)
            .saturating_mul(seq_q)
            .saturating_mul(seq_k);
        let out_width = heads * v_head;
        let k_width = heads * head_dim;
        let mut saves: SmallVec<[TensorId; 6]> = SmallVec::new();
        let mut fwd_extra = Bytes::ZERO;
        // What the model's loop still holds from the previous block (eager, below).
        let mut returned = Bytes::ZERO;
        // Kernels GPT-OSS's sink adds each way (cat, max, subtract; slice, max and cat
        // backward, the two gradients' sum, the sink's reduction).
        let mut sink_kernels = (0u32, 0u32);
        let mut bwd_extra = Bytes::ZERO;
        // The eager path's operand casts, not alive at its worst moment (below).
        let mut operand_casts: SmallVec<[TensorId; 3]> = SmallVec::new();
        // The math path's backward extras, where its backward is charged alone (below).
        let mut math_backward: Option<Bytes> = None;
        // The input gradients live at the backward's worst moment, where that is not all of
        // them at once with the output's (the fused kernels' single backward call).
        let mut grads_at_worst: Option<Bytes> = None;
        let sinks = self.model.attention_sinks;
        let kernel = match (self.plan.attention, mask) {
            // A model without an SDPA path (`_supports_sdpa = False`: GPT-OSS, whose sink logit
            // SDPA cannot take; GPT-Neo; GPT-J; BLOOM and MPT, whose ALiBi bias joins eager
            // scores) runs its eager code; flash_attention_2 means the model's flash class
            // (GPT-OSS: the hub's sink-aware kernel).
            (AttentionKernel::Sdpa, _) if !self.model.sdpa => Kernel::Eager,
            (AttentionKernel::Eager, _) => Kernel::Eager,
            // T5's self-attention bias is `compute_bias`'s permuted view (last-dim stride = the
            // number of heads): every fused kernel requires stride 1 in the last dimension of
            // the mask (`check_last_dim_stride_equals_1_dense`, aten sdp_utils), so SDPA runs
            // its math path. transformers has no flash_attention_2 path for it either.
            (_, AttnMask::StridedBias) => Kernel::Math,
            // Falcon's own call with fewer KV heads than query heads (`Family::sdpa_without_gqa`;
            // the new decoder broadcasts them to every head first).
            (AttentionKernel::Sdpa, _)
                if self.model.family.sdpa_without_gqa()
                    && !self.model.kv_broadcast
                    && stack.kv_heads < heads =>
            {
                Kernel::Math
            }
            // flash_attention_2 takes causality, the window and padding as arguments (a
            // prefix is a longer key sequence, bottom-right aligned): never a mask tensor,
            // grouped KV heads native.
            (AttentionKernel::Flash2, _) => Kernel::Flash,
            (AttentionKernel::Sdpa, _) => Kernel::Fused,
        };
        // Without autocast, the values' dtype: the module's (q and k can be wider, rotated by
        // CodeGen's fp32 tables).
        let compute = if self.autocast { self.half } else { v.dtype };
        // Query heads per KV head. A `matmul` reading grouped keys or values broadcast to every
        // head folds batch and heads into `bmm`'s batch, which copies them at every head unless
        // one KV head at batch 1 folds as a stride-0 view (the math and eager paths, below).
        let group = heads / stack.kv_heads.max(1);
        let broadcast_copies = group > 1 && (stack.kv_heads > 1 || batch > 1);
        let out;
        match kernel {
            Kernel::Fused | Kernel::Flash => {
                // flash / memory-efficient: q, k, v (as cast by autocast), the output (token-major
                // unless q is head-major, below), and fp32 logsumexp.
                // Dropout inside the kernel is regenerated from the RNG state: no mask.
                // The caller's locals (`sdpa_attention_forward(module, query, key, value,
                // ...)`, and the attention forward's `query_states`, ...) name the operands
                // while the kernel runs, beside the copies autocast and `repeat_kv` make of
                // them: an operand nothing saves (the fp32 output of an fp32 rotary, which
                // autocast casts) is alive there.
                for t in [q.id, k.id, v.id] {
                    if !pinned.contains(&t) {
                        pinned.push(t);
                    }
                }
                // With SDPA, transformers passes `enable_gqa` only when there is no mask and
                // the heads are at most 256 wide (`use_gqa_in_sdpa`; Gemma 4's global heads are
                // 512); otherwise `repeat_kv` materialises keys and values for every head: its
                // `expand(...).reshape(...)` copies, except from a single KV head, whose size-1
                // dimension merges with the expanded one into a stride-0 view (checked on CPU:
                // same storage), which the kernel reads as it is, unless autocast casts it (fp32
                // keys from an fp32 rotary), and the cast writes every head. flash_attention_2
                // never gets a mask tensor and takes grouped KV as is.
                let masked = kernel == Kernel::Fused && mask == AttnMask::Explicit;
                let repeated = kernel == Kernel::Fused && group > 1 && (masked || head_dim > 256);
                let copied = |x: &Val| repeated && (stack.kv_heads > 1 || x.dtype != compute);
                // From several KV heads, `repeat_kv` copies in the keys' own dtype, and
                // autocast's cast of that copy is another: the wide copy, named `key` in
                // `sdpa_attention_forward`, lives while the kernel runs (fp32 keys from an fp32
                // rotary under autocast; a CPU trace of Gemma 4's global layer shows both).
                for (x, width) in [(&k, k_width), (&v, out_width)] {
                    if repeated && stack.kv_heads > 1 && x.dtype != compute {
                        fwd_extra += x.dtype.bytes(x.tokens.saturating_mul(width));
                    }
                }
                let k = if copied(&k) {
                    self.val(k_width, k.tokens, compute, k.grad)
                } else {
                    k
                };
                let v = if copied(&v) {
                    self.val(out_width, v.tokens, compute, v.grad)
                } else {
                    v
                };
                let q = self.autocast(name.then("q_cast"), q, compute);
                let k = self.autocast(name.then("k_cast"), k, compute);
                let v = self.autocast(name.then("v_cast"), v, compute);
                saves.extend([q.id, k.id, v.id]);
                saves.push(self.tensor(
                    TensorKind::Activation,
                    DType::F32.bytes(batch * heads * seq_q),
                ));
                if masked {
                    // SDPA converts a boolean mask to an additive one per call and the
                    // memory-efficient kernel keeps it (convert_boolean_attn_mask).
                    saves.push(
                        self.tensor(TensorKind::Activation, compute.bytes(batch * seq_q * seq_k)),
                    );
                }
                if mask == (AttnMask::ContiguousBias { grad: true }) {
                    // The memory-efficient backward writes the bias gradient at the bias's
                    // expanded (batch, heads, q, k) size before autograd sums it back
                    // (`_efficient_attention_backward`, `bias_requires_grad`).
                    bwd_extra += compute.bytes(scores);
                }
                out = self.val(out_width, q.tokens, compute, grad);
                saves.push(out.id);
            }
            Kernel::Math => {
                // `_scaled_dot_product_attention_math` (aten attention.cpp) upcasts bf16/fp16
                // q, k and v to fp32 (unless the reduced-precision math flag is set); each
                // matmul keeps an operand only for the other's gradient: q when k needs one, k
                // when q does, v when the probabilities do. `_safe_softmax` has its own
                // derivative and returns one fp32 probability matrix, kept by its backward and
                // the matmul with v; while it runs, the scores and the `-inf` test's boolean
                // (`isneginf`) live beside it: `where_out` zeroes fully masked rows in the
                // softmax's own output (since torch 2.6, pytorch#139613; before, `where` made a
                // fourth score-sized tensor). Dropout keeps its mask and its fp32 output.
                // Backward holds the incoming gradient and softmax backward's result, both fp32
                // and score-sized.
                let acc = DType::F32;
                // Grouped keys and values (Falcon's direct call) reach the math path's
                // `matmul`s at their own head count, and the copies `broadcast_copies` says
                // are what the matmuls keep. A CPU replay of four Falcon-7B layers keeps three
                // (2, 71, 1,024, 64) fp32 tensors per layer: q, and k and v expanded.
                let (k_width, v_width) = if broadcast_copies {
                    (k_width, out_width)
                } else {
                    (k.width, v.width)
                };
                if k.grad {
                    saves.push(self.val(q.width, q.tokens, acc, q.grad).id);
                }
                if q.grad {
                    saves.push(self.val(k_width, k.tokens, acc, k.grad).id);
                }
                let mut v_copy = Bytes::ZERO;
                if q.grad || k.grad {
                    let v32 = self.val(v_width, v.tokens, acc, v.grad);
                    v_copy = v32.bytes();
                    saves.push(v32.id);
                }
                saves.push(self.tensor(TensorKind::Activation, acc.bytes(scores)));
                if p_drop > 0.0 {
                    saves.push(self.tensor(TensorKind::Activation, DType::U8.bytes(scores)));
                    saves.push(self.tensor(TensorKind::Activation, acc.bytes(scores)));
                }
                fwd_extra += acc.bytes(scores) + DType::U8.bytes(scores);
                bwd_extra += acc.bytes(scores) * 2;
                // Backward's worst moment is softmax's backward: the saved probabilities, dP
                // and dS, three score matrices (a checkpointed block's recomputed forward holds
                // less at this op: the scores, the probabilities and the byte-wide `-inf`
                // test); by then the product with v has run its backward, which frees v's
                // fp32 copy. (A replay of checkpointed T5-base full fine-tuning traced without
                // module hooks, `validation/peak_live.py`, peaks there with exactly these live:
                // no boolean, no fp32 v.)
                math_backward = Some(bwd_extra - v_copy);
                // At softmax's backward the product with v has run its backward: v's fp32
                // gradient exists and the output's gradient has been released; q's and k's come
                // after. (The sum's gradient the residual keeps meanwhile is the block's:
                // `Builder::residual`.) The replay above holds exactly this one.
                grads_at_worst = Some(if v.grad {
                    acc.bytes(v.elements())
                } else {
                    Bytes::ZERO
                });
                out = self.val(out_width, q.tokens, compute, grad);
            }
            Kernel::Eager => {
                // eager_attention_forward: matmul keeps q and k (GQA keys and values repeated
                // to every head), softmax(dtype=fp32) keeps its fp32 output, the bf16 copy of
                // it is kept by the matmul with v, and so is v.
                // `matmul` on a head-split view of a fused projection's output (GPT-2's
                // `c_attn`, MPT's `Wqkv`: batch and head strides that do not fold into one
                // dimension) makes a contiguous copy for `bmm`, and that copy, part-sized, is
                // what autograd keeps, not the fused output (which the call then releases).
                let (q, k, v) = (
                    self.own_storage(q),
                    self.own_storage(k),
                    self.own_storage(v),
                );
                // GPT-Neo's and GPT-J's `_attn` cast q and k to fp32 first. Under autocast
                // the matmul casts them back to bf16 (those copies are what it keeps) while
                // the fp32 ones live until the call returns; without autocast the scores are
                // an fp32 matmul that keeps the fp32 q and k.
                let upcast = self.model.attention_upcast;
                let qk_dtype = if upcast && !self.autocast {
                    DType::F32
                } else {
                    compute
                };
                if upcast && self.autocast {
                    fwd_extra += DType::F32.bytes(q.elements()) + DType::F32.bytes(k.elements());
                }
                // Under autocast the casts are autocast's (bound to no name); without it, the
                // model's own `.to(torch.float32)`, bound to `_attn`'s `query` and `key`.
                let cast = |b: &mut Self, name, x, dtype| {
                    if b.autocast {
                        b.autocast(name, x, dtype)
                    } else {
                        b.cast(name, x, dtype)
                    }
                };
                let q = cast(self, name.then("q_cast"), q, qk_dtype);
                // Grouped keys and values reach `matmul` repeated for every head (`repeat_kv`,
                // or Falcon's broadcast), and `matmul` folds batch and heads into `bmm`'s batch.
                // One KV head at batch 1 folds as a view (a stride-0 batch `bmm` reads as it
                // is: a CPU replay of Falcon-7B keeps the one head); anything else, or a cast
                // to the matmul's dtype, writes every head.
                let repeated =
                    |x: &Val, dtype: DType| broadcast_copies || (group > 1 && x.dtype != dtype);
                let k_rep = if repeated(&k, qk_dtype) {
                    self.val(k_width, k.tokens, qk_dtype, k.grad)
                } else {
                    cast(self, name.then("k_cast"), k, qk_dtype)
                };
                let v_rep = if repeated(&v, compute) {
                    self.val(out_width, v.tokens, compute, v.grad)
                } else {
                    cast(self, name.then("v_cast"), v, compute)
                };
                // Autocast casts q and k for the scores' product and v for the last: the first
                // two are gone by softmax, and v's is made after it.
                operand_casts.extend([q.id, k_rep.id, v_rep.id]);
                // Each matmul keeps an operand only for the other's gradient (autograd saves
                // `bmm`'s `self` only when `mat2` needs a gradient, and the reverse): q for
                // k's, k for q's, v when the probabilities need one. A seq2seq decoder's
                // cross-attention over an encoder nothing trains (prefix tuning) has keys and
                // values without gradients: q and the probabilities' copy are not kept.
                let scores_grad = q.grad || k.grad;
                if k.grad {
                    saves.push(q.id);
                }
                if q.grad {
                    saves.push(k_rep.id);
                }
                if scores_grad {
                    saves.push(v_rep.id);
                }
                // The product with v frees the v it kept once its backward has run, before
                // softmax's backward (where no saved q or k shares its storage, as a fused
                // projection's views do).
                let v_kept = scores_grad && v_rep.id != q.id && v_rep.id != k_rep.id;
                let v_freed = if v_kept { v_rep.bytes() } else { Bytes::ZERO };
                // Softmax's saved output: fp32 where the code asks for it
                // (`softmax(..., dtype=torch.float32)`, Llama and most families) or autocast
                // promotes it; GPT-2's, T5's and BART's `eager_attention_forward` softmax in
                // the scores' dtype (`Family::eager_softmax_in_input_dtype`).
                // GPT-OSS softmaxes `cat([scores, sinks])` in that tensor's own dtype: the
                // scores' promoted with the sink parameter's (fp32 weights make it fp32).
                let softmax_dtype = if sinks {
                    super::build::wider(compute, self.base)
                } else if self.autocast || !self.model.family.eager_softmax_in_input_dtype() {
                    DType::F32
                } else {
                    compute
                };
                if self.model.softcap.attention > 0.0 {
                    // Gemma-2's soft-capping: scores / cap, tanh (keeps its output), * cap.
                    saves.push(self.tensor(TensorKind::Activation, compute.bytes(scores)));
                    fwd_extra += compute.bytes(scores);
                }
                if sinks {
                    // One more column per query (the sink), and `max(dim=-1)`'s indices for
                    // its backward (int64 per query row).
                    let rows = batch.saturating_mul(heads).saturating_mul(seq_q);
                    saves.push(self.tensor(TensorKind::Activation, DType::I64.bytes(rows)));
                    let with_sink = rows.saturating_mul(seq_k + 1);
                    saves.push(self.tensor(TensorKind::Activation, softmax_dtype.bytes(with_sink)));
                    let copy = if softmax_dtype != compute {
                        saves.push(self.tensor(TensorKind::Activation, compute.bytes(scores)));
                        compute.bytes(scores)
                    } else {
                        Bytes::ZERO
                    };
                    // Forward: the concatenated logits and their max-subtracted copy live
                    // together before the softmax; backward: the sliced gradient widened back,
                    // softmax's result and `max`'s scattered gradient, summed. By then the
                    // product with v has run its backward and freed what it kept, the
                    // probabilities' cast copy and v (`v_freed`; a replay of GPT-OSS-20B over
                    // 8 FSDP2 ranks holds k's repeated copy there and not v's).
                    fwd_extra += softmax_dtype.bytes(with_sink) * 2;
                    bwd_extra += softmax_dtype.bytes(with_sink) * 2 - (copy + v_freed);
                    sink_kernels = (3, 5);
                } else {
                    // The probabilities, mask and copy saved below, held from this op on.
                    let first_kept = saves.len();
                    if scores_grad {
                        saves
                            .push(self.tensor(TensorKind::Activation, softmax_dtype.bytes(scores)));
                    }
                    // What the matmul with v keeps (for v's gradient only): dropout's output,
                    // or softmax's cast copy.
                    let copy_kept = v.grad && (p_drop > 0.0 || softmax_dtype != compute);
                    if p_drop > 0.0 && scores_grad {
                        // Dropout keeps only its mask (the cast copy before it is kept by nobody).
                        saves.push(self.tensor(TensorKind::Activation, DType::U8.bytes(scores)));
                    }
                    if copy_kept {
                        saves.push(self.tensor(TensorKind::Activation, compute.bytes(scores)));
                    }
                    // The forward's worst moment, of three: the scores and their scaled or
                    // masked copy; softmax, with the scores it reads (and, in Falcon and BLOOM,
                    // the unmasked ones still referenced), its upcast input and its output;
                    // the probabilities and their cast (or dropout's output and mask). A bf16
                    // input asked for fp32 is copied first (`softmax` in aten SoftMax.cpp:
                    // `input.toType(dtype)`); only CUDA's fp16 takes the `half_to_float` kernel
                    // and no copy. What the op saves is already held; the rest is transient.
                    // The scores are in the matmul's dtype (fp32 where `_attn` upcast q and k
                    // without autocast); the copy cast for v, dropout's output and the
                    // probabilities a block returns, in v's.
                    let s = compute.bytes(scores);
                    let s_scores = qk_dtype.bytes(scores);
                    let upcast = softmax_dtype != qk_dtype && qk_dtype != DType::F16;
                    let held = if self.model.family.eager_scores_held_through_softmax() {
                        2
                    } else {
                        1
                    };
                    let probs = softmax_dtype.bytes(scores);
                    let cast = if softmax_dtype != compute {
                        s
                    } else {
                        Bytes::ZERO
                    };
                    let dropped = if p_drop > 0.0 {
                        s + DType::U8.bytes(scores)
                    } else {
                        Bytes::ZERO
                    };
                    // The output (charged with the op's other transients) exists from the
                    // product with v on, the third moment only.
                    let out_bytes = self.val_bytes(out_width, q.tokens, compute);
                    let worst = (s_scores * 2)
                        .max(s_scores * held + if upcast { probs } else { Bytes::ZERO } + probs)
                        .max(probs + cast + dropped + out_bytes);
                    let kept: Bytes = saves[first_kept..]
                        .iter()
                        .map(|&t| self.graph.tensor(t).bytes)
                        .sum();
                    fwd_extra += worst - kept - out_bytes;
                    // The previous block's probabilities, returned and still held by the
                    // model's loop while this block runs, where nothing saved them (a
                    // checkpointed block keeps none). Only in the first forward: a block
                    // recomputed in backward runs alone.
                    returned = match self.model.returned_weights {
                        ReturnedWeights::Cast if self.plan.grad_ckpt || !copy_kept => s,
                        ReturnedWeights::Softmax if self.plan.grad_ckpt || !scores_grad => probs,
                        _ => Bytes::ZERO,
                    };
                    if p_drop == 0.0 {
                        // Backward through softmax holds its incoming gradient (upcast by the
                        // `.to()` backward where there is a cast) and its result, both in the
                        // softmax's dtype; what the matmul with v kept, the bf16 copy and v
                        // (`v_freed`), is released when that matmul's backward has run: two
                        // score matrices less those. (A replay of checkpointed GPT-J holds
                        // neither there.)
                        let copy = if copy_kept { s } else { Bytes::ZERO };
                        bwd_extra += probs * 2 - (copy + v_freed);
                    }
                }
                // Softmax's backward, the worst moment, runs after the product with v's
                // (`matmul(probs, v)` made both its gradients, dP and the repeated v's) and
                // before the scores' product makes q's and k's: v's gradient is the one held.
                // A replay of checkpointed MPT-7B LoRA holds exactly that beside the score
                // matrices (validation/README.md, "Eager attention's transients").
                grads_at_worst = Some(if v.grad { v_rep.bytes() } else { Bytes::ZERO });
                out = self.val(out_width, q.tokens, compute, grad);
            }
        }
        let flops = 2.0 * scores as f64 * (head_dim + v_head) as f64;
        let unfused = matches!(kernel, Kernel::Math | Kernel::Eager);
        // Causal attention computes half the scores with a fused kernel (`is_causal`); a
        // materialised mask makes every kernel compute them all; flash_attention_2 also skips
        // what lies outside the window: of the seq_q x seq_k pairs, each query sees
        // min(position + 1, window) keys.
        let causal_factor = match (kernel, mask) {
            // Eager and SDPA's math path multiply out every score, masked or not.
            (Kernel::Eager | Kernel::Math, _) => 1.0,
            (Kernel::Flash, AttnMask::Causal | AttnMask::Explicit) | (_, AttnMask::Causal) => {
                let visible = |w: u64| {
                    let w = w.min(seq_k) as f64;
                    w * (w + 1.0) / 2.0 + (seq_k as f64 - w) * w
                };
                let full = visible(seq_k);
                let seen = window.map_or(full, visible);
                if kernel == Kernel::Flash && mask == AttnMask::Explicit && window.is_none() {
                    1.0
                } else {
                    0.5 * seen / full.max(1.0)
                }
            }
            _ => 1.0,
        };
        let io = q.bytes() + k.bytes() + v.bytes() + out.bytes();
        let score_bytes = match kernel {
            Kernel::Fused | Kernel::Flash => Bytes::ZERO,
            // Scale, mask, softmax and its read by the product with v; dropout adds its own
            // pass (fp32 probabilities read, the result and its byte mask written).
            Kernel::Math | Kernel::Eager if p_drop > 0.0 => Bytes(scores.saturating_mul(16 + 9)),
            Kernel::Math | Kernel::Eager => DType::F32.bytes(scores) * 4,
        };
        // GPT-OSS's learned sink logit, one per head, read by every query's softmax.
        let params = if sinks {
            let sink = self.base_param(
                name.then("sinks"),
                (heads, 1),
                crate::spec::model::ParamRole::Bias,
            );
            SmallVec::from_slice(&[sink])
        } else {
            SmallVec::new()
        };
        // In a checkpointed block's first forward the memory walk charges the unnamed saves
        // (autocast's casts) at this op, where nothing keeps them; the eager path's are not
        // alive at its worst moment, softmax.
        let not_at_worst: Bytes = if grad && self.segment.is_some() {
            saves
                .iter()
                .filter(|t| operand_casts.contains(t) && self.graph.tensor(**t).unnamed)
                .map(|&t| self.graph.tensor(t).bytes)
                .sum()
        } else {
            Bytes::ZERO
        };
        let saves = if grad { saves } else { SmallVec::new() };
        // The fused kernels' backward reads their output.
        let out_transient = unless_kept(&saves, out);
        let op = self.emit(OpSpec {
            name,
            kind: OpKind::Attention,
            params,
            saves,
            out: out.bytes(),
            forward_transient: out_transient + fwd_extra + returned - not_at_worst,
            // (A checkpointed block's rerun forward is the walk's: `Phase::Recompute`.)
            backward_transient: grads_at_worst.unwrap_or(io) + math_backward.unwrap_or(bwd_extra),
            cost: Cost {
                forward_flops: Flops(flops * causal_factor),
                // Flash backward recomputes the scores: 2.5x the forward matmuls; op by op, the
                // saved probabilities leave four products (dV, dP, dQ, dK): 2x.
                input_grad_flops: Flops(if unfused { 2.0 } else { 2.5 } * flops * causal_factor),
                weight_grad_flops: Flops(0.0),
                forward_bytes: io + score_bytes,
                backward_bytes: io * 2 + score_bytes * 2,
                // Head split views and transposes around the kernel(s).
                forward_kernels: if matches!(kernel, Kernel::Fused | Kernel::Flash) {
                    9
                } else {
                    14 + sink_kernels.0
                },
                backward_kernels: if matches!(kernel, Kernel::Fused | Kernel::Flash) {
                    9
                } else {
                    16 + sink_kernels.1
                },
                min_dim: head_dim,
                // The attention module and the block around it.
                modules: 2,
                misaligned: false,
                attention: if unfused {
                    AttentionPath::Unfused
                } else if kernel == Kernel::Fused && mask == AttnMask::Explicit {
                    AttentionPath::FusedMasked
                } else if p_drop > 0.0 {
                    AttentionPath::FusedDropout
                } else {
                    AttentionPath::Fused
                },
                ..Cost::default()
            },
            // SDPA's math path upcasts q, k and v to fp32 (`_scaled_dot_product_attention_math`):
            // its products run in fp32.
            compute: if kernel == Kernel::Math {
                DType::F32
            } else {
                compute
            },
            in_backward: grad,
        });
        // The bias this mask carries is the stack's, read by every block: its gradient (the
        // scores' gradient summed over the batch) is added to the one autograd accumulates.
        let grads: SmallVec<[TensorId; 1]> = self
            .bias_grads
            .iter()
            .filter(|&&(m, _)| m == mask)
            .map(|&(_, g)| g)
            .collect();
        let pinned: SmallVec<[TensorId; 4]> =
            pinned.into_iter().filter(|&t| !self.is_named(t)).collect();
        if let Some(o) = self.graph.op_mut(op) {
            if grad {
                o.grads = grads;
            }
            // Rerun in backward, the block holds its operand casts (saved) and no other
            // block's returned probabilities.
            o.first_forward_only = returned;
            o.rerun_only = not_at_worst;
            o.pinned = pinned;
        }
        // The caller's `transpose(1, 2).contiguous()` (transformers' attention functions) is
        // free when the kernel wrote its output token-major. FlashAttention's forward allocates
        // it like q (`empty_like`) and cuDNN's with q's layout (`alloc_with_matching_layout`,
        // aten cudnn/MHA.cpp), as does the CPU kernel; so a q that is head-major in memory (made
        // by a `cat`: partial rotary, latent attention) gives a head-major output, and the copy
        // is a new tensor, which the output projection keeps beside the one the kernel saved.
        // The memory-efficient kernel, which takes the masked calls on CUDA, always writes
        // token-major (`at::empty({B, M, num_heads, Kv})`).
        let layout_follows_q = matches!(kernel, Kernel::Flash)
            || (kernel == Kernel::Fused && mask != AttnMask::Explicit);
        if q_head_major && layout_follows_q {
            return self.contiguous(name.then("out_copy"), out);
        }
        out
    }
}

/// How the attention module calls its core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttnCall {
    pub mask: AttnMask,
    /// A sliding window, in tokens.
    pub window: Option<u64>,
    /// q reaches the kernel head-major in memory (made by a `cat`).
    pub q_head_major: bool,
    /// What the frames around the core still name while it runs (`Op::pinned`).
    pub pinned: SmallVec<[TensorId; 4]>,
}

impl AttnCall {
    /// A call with `mask`, no window, a token-major q and nothing else held.
    pub fn masked(mask: AttnMask) -> AttnCall {
        AttnCall {
            mask,
            window: None,
            q_head_major: false,
            pinned: SmallVec::new(),
        }
    }
}

/// What accompanies an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnMask {
    /// Causal with no explicit mask (`is_causal=True`).
    Causal,
    /// No mask (encoder self-attention, cross-attention).
    Full,
    /// A boolean mask materialised by the caller (prefix tuning's extended mask).
    Explicit,
    /// A float bias whose last dimension is strided (T5's relative position bias in
    /// self-attention, `values.permute([2, 0, 1])`): no fused kernel takes it.
    StridedBias,
    /// A contiguous float bias (T5's cross-attention zeros); `grad` when it requires grad
    /// (T5 sets `requires_grad` on it under gradient checkpointing).
    ContiguousBias { grad: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// flash_attention_2 (Dao 2023).
    Flash,
    Fused,
    Math,
    Eager,
}
