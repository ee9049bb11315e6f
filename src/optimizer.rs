//! What each optimizer keeps per trainable parameter, and what its step allocates.

use crate::graph::op::Param;
use crate::spec::plan::Optimizer;
use crate::units::{Bytes, DType};

/// bitsandbytes keeps tensors smaller than this in 32-bit states (`min_8bit_size`).
const MIN_8BIT_SIZE: u64 = 4096;
/// bitsandbytes' block size for optimizer-state quantization (one fp32 absmax per block).
const BNB_BLOCK: u64 = 256;

/// bitsandbytes' paged optimizers allocate a state in unified memory only for tensors of at
/// least this many elements (`get_state_buffer`: `p.numel() < 1e5` takes `torch.zeros_like`).
const MIN_PAGED_SIZE: u64 = 100_000;

/// A paged optimizer's unified-memory state dtype and the trainable tensors whose two states
/// get it (at least 1e5 elements); None for an optimizer that does not page.
fn paged_states<'p>(
    optimizer: Optimizer,
    params: &'p [&'p Param],
) -> Option<(DType, impl Iterator<Item = &'p &'p Param>)> {
    let state = match optimizer {
        Optimizer::PagedAdamw8bit => DType::U8,
        Optimizer::PagedAdamw32bit => DType::F32,
        _ => return None,
    };
    Some((
        state,
        params.iter().filter(|p| p.elements >= MIN_PAGED_SIZE),
    ))
}

/// The part of [`state_bytes`] a paged optimizer keeps in CUDA unified memory: the states of
/// tensors of at least 1e5 elements; their 8-bit absmax vectors and every smaller tensor's
/// states are ordinary allocations (bitsandbytes 0.50, optim/optimizer.py `init_state`).
pub fn paged_state_bytes(optimizer: Optimizer, params: &[&Param]) -> Bytes {
    paged_states(optimizer, params).map_or(Bytes::ZERO, |(state, large)| {
        large.map(|p| state.bytes(p.elements) * 2 * p.copies).sum()
    })
}

/// The state tensors a paged optimizer keeps in unified memory (two per large tensor), each
/// prefetched to the GPU before its update (`prefetch_state`).
pub fn paged_state_tensors(optimizer: Optimizer, params: &[&Param]) -> u64 {
    paged_states(optimizer, params).map_or(0, |(_, large)| large.map(|p| 2 * p.copies).sum())
}

/// Persistent optimizer state for the trainable parameters.
pub fn state_bytes(optimizer: Optimizer, params: &[&Param]) -> Bytes {
    params
        .iter()
        .map(|p| -> Bytes {
            // One copy's state, times the copies a repeated block's parameter stands for.
            // PyTorch creates states with `zeros_like(param)`: the parameter's (kept) dtype.
            let dtype = p.storage;
            // Fused and foreach AdamW keep `step` as a 1-element fp32 tensor per parameter.
            let step = DType::F32.bytes(1);
            let one = match optimizer {
                Optimizer::Adamw | Optimizer::AdamwForeach => dtype.bytes(p.elements) * 2 + step,
                // bitsandbytes keeps `step` as a Python int.
                Optimizer::Adamw8bit | Optimizer::PagedAdamw8bit => {
                    if p.elements < MIN_8BIT_SIZE {
                        DType::F32.bytes(p.elements) * 2
                    } else {
                        DType::U8.bytes(p.elements) * 2
                            + DType::F32.bytes(p.elements.div_ceil(BNB_BLOCK)) * 2
                    }
                }
                // `optim_bits=32`: fp32 states whatever the parameter's dtype.
                Optimizer::PagedAdamw32bit => DType::F32.bytes(p.elements) * 2,
                Optimizer::Sgd => dtype.bytes(p.elements),
                Optimizer::Adafactor => {
                    // Factored second moment for matrices, full for vectors (Shazeer & Stern
                    // 2018, sec. 3); torch.optim.Adafactor keeps no first moment by default.
                    let (rows, cols) = p.shape;
                    let elements = if rows > 1 && cols > 1 {
                        rows + cols
                    } else {
                        p.elements
                    };
                    dtype.bytes(elements) + step
                }
            };
            one * p.copies
        })
        .sum()
}

/// Memory the optimizer step allocates on top of parameters, gradients and states.
pub fn step_temporary(optimizer: Optimizer, params: &[&Param]) -> Bytes {
    match optimizer {
        // Fused kernels update in place.
        Optimizer::Adamw
        | Optimizer::Adamw8bit
        | Optimizer::PagedAdamw8bit
        | Optimizer::PagedAdamw32bit => Bytes::ZERO,
        // `_multi_tensor_adamw`: `exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)` holds one
        // state-sized tensor per parameter until `_foreach_addcdiv_` has used it.
        Optimizer::AdamwForeach => params.iter().map(|p| p.grad_bytes()).sum(),
        // `_foreach_mul_` / `_foreach_add_` on the momentum buffers are in place.
        Optimizer::Sgd => Bytes::ZERO,
        // `_single_tensor_adafactor` builds a full-size variance estimate one parameter at a
        // time: the largest parameter's worth.
        Optimizer::Adafactor => params
            .iter()
            .map(|p| p.storage.bytes(p.elements))
            .max()
            .unwrap_or(Bytes::ZERO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::op::ParamRole;

    fn matrix(rows: u64, cols: u64) -> Param {
        Param {
            name: crate::graph::op::Name::root("w"),
            elements: rows * cols,
            dtype: DType::F32,
            storage: DType::F32,
            unit: 0,
            trainable: true,
            role: ParamRole::Linear,
            extra: Bytes::ZERO,
            shape: (rows, cols),
            copies: 1,
            layer: None,
            idle: false,
        }
    }

    #[test]
    fn adamw_keeps_two_states_in_the_param_dtype() {
        let p = matrix(100, 100);
        assert_eq!(
            state_bytes(Optimizer::Adamw, &[&p]),
            Bytes(2 * 4 * 10_000 + 4)
        );
    }

    #[test]
    fn adafactor_factors_matrices() {
        let p = matrix(100, 50);
        assert_eq!(state_bytes(Optimizer::Adafactor, &[&p]), Bytes(4 * 150 + 4));
    }

    #[test]
    fn adamw8bit_is_a_quarter_of_fp32_adamw_plus_absmax() {
        let p = matrix(256, 256);
        let bytes = state_bytes(Optimizer::Adamw8bit, &[&p]);
        assert_eq!(bytes, Bytes(2 * 65_536 + 2 * 4 * 256));
    }
}
