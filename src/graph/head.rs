//! Embedding lookups, the LM head and the loss over the vocabulary.

use super::build::{Builder, OpSpec, Val, WeightCast, wider};
use crate::graph::op::{Cost, Name, OpKind, ParamId, ParamRole, TensorId, TensorKind};
use crate::spec::plan::Method;
use crate::units::{Bytes, DType, Flops};
use smallvec::{SmallVec, smallvec};

impl Builder<'_> {
    /// Token (and position) embedding lookup: backward needs only the indices.
    pub fn embedding(&mut self, name: Name, param: ParamId, width: u64, tokens: u64) -> Val {
        let p = self.graph.param(param).clone();
        let dtype = p.dtype;
        let out = self.val(width, tokens, dtype, p.trainable);
        let table_bytes = p.bytes();
        self.emit(OpSpec {
            name,
            kind: OpKind::Embedding,
            params: smallvec![param],
            saves: SmallVec::new(),
            out: out.bytes(),
            forward_transient: out.bytes(),
            // The table-sized gradient is counted as the parameter's gradient.
            backward_transient: out.bytes(),
            cost: Cost {
                forward_bytes: out.bytes() * 2,
                backward_bytes: out.bytes() * 2
                    + if p.trainable {
                        table_bytes * 2
                    } else {
                        Bytes::ZERO
                    },
                forward_kernels: 1,
                backward_kernels: u32::from(p.trainable) * 2,
                modules: 1,
                ..Cost::default()
            },
            compute: dtype,
            in_backward: p.trainable,
        });
        out
    }

    /// The LM head and the loss.
    ///
    /// Causal LMs go through transformers' `ForCausalLMLoss`, which upcasts the logits with
    /// `.float()`; seq2seq models call `CrossEntropyLoss` on the logits as they are (see the
    /// loss below for what CUDA autocast makes of that). `log_softmax` keeps its output; its
    /// backward and `nll_loss`'s each produce a vocabulary-sized gradient, the largest transient
    /// of the step.
    pub fn lm_head_and_loss(&mut self, x: Val, head: ParamId, bias: bool) -> usize {
        // MiniCPM3ForCausalLM: `hidden_states = hidden_states / self.config.logits_scaling`
        // before the head. The model's output object still holds the undivided state until the
        // loss is computed, beside the divided one (`output`, below).
        let output = x;
        let x = if self.model.multipliers.head_input_divisor == 1.0 {
            x
        } else {
            self.scale(Name::root("lm_head").then("input_scaling"), x)
        };
        let vocab = self.model.vocab_size;
        let tokens = x.tokens;
        let head_param = self.graph.param(head).clone();
        let trainable = head_param.trainable;
        let compute = self.compute();
        let xin = if self.autocast {
            self.autocast(Name::root("lm_head").then("cast"), x, self.half)
        } else {
            x
        };
        let mut saves: SmallVec<[TensorId; 6]> = SmallVec::new();
        if trainable {
            saves.push(xin.id);
        }
        let cast = if self.autocast && head_param.dtype == DType::F32 {
            self.autocast_weight(head_param.elements, trainable, x.grad)
        } else {
            WeightCast::default()
        };
        let mut params: SmallVec<[ParamId; 3]> = smallvec![head];
        if bias {
            params.push(self.base_param(
                Name::root("lm_head").then("bias"),
                (1, vocab),
                ParamRole::Bias,
            ));
        }
        let logits = self.val(vocab, tokens, compute, x.grad || trainable);
        let flops = 2.0 * tokens as f64 * x.width as f64 * vocab as f64;
        let grad = logits.grad;
        // The last hidden state stays referenced until the loss is computed (the causal LM's
        // `hidden_states = outputs.last_hidden_state`, a seq2seq model's `outputs[0]`), whether
        // or not autograd keeps it: under autocast the head keeps its bf16 copy, a frozen head
        // nothing, and a LayerNorm keeps its input, not its output.
        let saved_here = grad && trainable && xin.id == x.id;
        // Live only as a reference unless the op that made it keeps it for backward.
        let unsaved = |v: Val| {
            let kept = self
                .graph
                .op(self.graph.producer(v.id))
                .is_some_and(|o| o.saves.contains(&v.id));
            if kept {
                Bytes::ZERO
            } else {
                self.graph.tensor(v.id).bytes
            }
        };
        let mut hidden = if saved_here { Bytes::ZERO } else { unsaved(x) };
        if output.id != x.id {
            hidden += unsaved(output);
        }
        self.emit(OpSpec {
            name: Name::root("lm_head"),
            kind: OpKind::Matmul,
            params,
            saves: if grad { saves } else { SmallVec::new() }
                .into_iter()
                .chain(cast.copy)
                .collect(),
            out: logits.bytes(),
            forward_transient: logits.bytes() + cast.transient + hidden,
            backward_transient: logits.bytes() + xin.bytes(),
            cost: Cost {
                forward_flops: Flops(flops),
                input_grad_flops: Flops(if x.grad { flops } else { 0.0 }),
                weight_grad_flops: Flops(if trainable { flops } else { 0.0 }),
                forward_bytes: xin.bytes() + logits.bytes() + compute.bytes(head_param.elements),
                backward_bytes: (xin.bytes() + logits.bytes()) * 2
                    + compute.bytes(head_param.elements) * 2,
                forward_kernels: 2,
                backward_kernels: 3,
                min_dim: tokens.min(x.width),
                modules: 1,
                misaligned: !vocab.is_multiple_of(8) || !x.width.is_multiple_of(8),
                side: cast.side,
                ..Cost::default()
            },
            compute,
            in_backward: grad,
        });
        let logits = if self.model.softcap.logits > 0.0 {
            // Gemma-2's final soft-capping: logits / cap, tanh (keeps its output), * cap; each
            // a new vocabulary-sized tensor in the logits' dtype.
            let capped = self.val(vocab, tokens, logits.dtype, logits.grad);
            let op = self.elementwise(
                Name::root("lm_head").then("softcap"),
                &[logits],
                capped,
                smallvec![capped.id],
                3.0,
            );
            if let Some(o) = self.graph.op_mut(op) {
                o.forward_transient += logits.bytes() + hidden;
                o.cost.forward_kernels = 3;
                o.cost.backward_kernels = 3;
            }
            capped
        } else {
            logits
        };
        let logits = if self.model.logits_buffer {
            // BART's `lm_logits + self.final_logits_bias`: a new tensor of the wider dtype (the
            // 16-bit logits are freed once it exists). The buffer has the dtype the model was
            // stored in: fp32 under autocast and under FSDP's MixedPrecisionPolicy, which casts
            // parameters and not buffers, so there the loss runs on fp32 logits; bf16 when the
            // model itself was cast (pure bf16, DeepSpeed's bf16 mode, or a QLoRA load, whose
            // `prepare_model_for_kbit_training` upcasts parameters only).
            let buffer = if matches!(self.plan.method, Method::Qlora(_)) {
                self.half
            } else {
                self.storage_base
            };
            self.scale_into(
                Name::root("lm_head").then("final_logits_bias"),
                logits,
                wider(logits.dtype, buffer),
            )
        } else {
            logits
        };
        let logits = if self.model.multipliers.logits_divisor == 1.0 {
            logits
        } else {
            // Granite: `logits / logits_scaling`, a new vocabulary-sized tensor in the logits'
            // dtype; the undivided logits are freed once it exists.
            self.scale(Name::root("lm_head").then("scaling"), logits)
        };
        // `log_softmax` runs in the dtype it is given: fp32 after the causal LM's `.float()`,
        // the logits' own dtype for a seq2seq model. Under CUDA autocast `cross_entropy_loss`
        // is on no cast list (autocast_mode.h's fp32 list has `nll_loss`, not it; CPU, XPU and
        // XLA autocast do list it), so its decomposition calls `log_softmax(x, dim,
        // x.scalar_type())`, whose explicit dtype the fp32_set_opt_dtype policy respects: 16-bit
        // log-probabilities. `nll_loss`, on the fp32 list, then casts them and keeps that fp32
        // copy for its backward (LossNLL.cpp's `cross_entropy_loss_symint`).
        let seq2seq = self.model.is_encoder_decoder();
        let logp_dtype = if seq2seq { logits.dtype } else { DType::F32 };
        let nll_dtype = if seq2seq && self.autocast {
            DType::F32
        } else {
            logp_dtype
        };
        let elements = tokens * vocab;
        let logp = self.tensor(TensorKind::Logits, logp_dtype.bytes(elements));
        let mut saves: SmallVec<[TensorId; 6]> = smallvec![logp];
        // The causal LM's `.float()` copy feeds `log_softmax` and is not kept.
        let upcast = if logp_dtype != logits.dtype {
            logp_dtype.bytes(elements)
        } else {
            Bytes::ZERO
        };
        // nll_loss's kept fp32 copy of 16-bit log-probabilities; freed after its backward.
        let nll_cast = if nll_dtype != logp_dtype {
            let bytes = nll_dtype.bytes(elements);
            saves.push(self.tensor(TensorKind::Logits, bytes));
            bytes
        } else {
            Bytes::ZERO
        };
        // Backward: nll_loss's gradient beside everything the loss keeps; then, once its copy
        // has gone, log_softmax's incoming and outgoing gradients beside its output.
        let vocab_grad = nll_dtype.bytes(elements);
        let backward_transient = vocab_grad.max(logp_dtype.bytes(elements) * 2 - nll_cast);
        // Traffic: a conversion to fp32 before or after log_softmax moves the fp32 bytes.
        let widened = upcast.max(nll_cast);
        self.emit(OpSpec {
            name: Name::root("loss"),
            kind: OpKind::Loss,
            params: SmallVec::new(),
            saves,
            out: Bytes::ZERO,
            // The bf16 logits stay referenced by the model output until the loss is computed,
            // and so does the last hidden state (above).
            forward_transient: logits.bytes() + upcast + hidden,
            backward_transient,
            cost: Cost {
                forward_flops: Flops(5.0 * elements as f64),
                input_grad_flops: Flops(4.0 * elements as f64),
                forward_bytes: logits.bytes() + widened * 3,
                backward_bytes: vocab_grad * 4 + logits.bytes(),
                // float, pad, slice, contiguous, views, log_softmax, nll_loss.
                forward_kernels: 8,
                backward_kernels: 5,
                ..Cost::default()
            },
            compute: nll_dtype,
            in_backward: grad,
        })
    }
}
