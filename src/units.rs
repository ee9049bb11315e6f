//! Units as types: bytes, FLOPs, and dtypes that know their width in bits.
//!
//! Dtypes carry bits, not bytes, so a 4-bit NF4 weight is not rounded to zero or one byte
//! (llm-analysis's `BYTES_INT4 = 4 // 8 == 0` is the bug this prevents).

use serde::Serialize;
use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Mul, Sub};

/// A number of bytes. Integer so breakdowns sum exactly to their totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Bytes(pub u64);

impl Bytes {
    pub const ZERO: Bytes = Bytes(0);

    pub fn from_gib(gib: f64) -> Bytes {
        Bytes((gib * GIB).round() as u64)
    }

    pub fn from_mib(mib: f64) -> Bytes {
        Bytes((mib * MIB).round() as u64)
    }

    pub fn gib(self) -> f64 {
        self.0 as f64 / GIB
    }

    /// One of `ranks` equal shards, rounded up (FSDP and ZeRO pad to a multiple of the ranks).
    pub fn div_ceil(self, ranks: u64) -> Bytes {
        Bytes(self.0.div_ceil(ranks.max(1)))
    }
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
const MIB: f64 = 1024.0 * 1024.0;

impl Add for Bytes {
    type Output = Bytes;
    fn add(self, rhs: Bytes) -> Bytes {
        Bytes(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Bytes {
    fn add_assign(&mut self, rhs: Bytes) {
        self.0 = self.0.saturating_add(rhs.0);
    }
}

impl Sub for Bytes {
    type Output = Bytes;
    fn sub(self, rhs: Bytes) -> Bytes {
        Bytes(self.0.saturating_sub(rhs.0))
    }
}

impl Mul<u64> for Bytes {
    type Output = Bytes;
    fn mul(self, rhs: u64) -> Bytes {
        Bytes(self.0.saturating_mul(rhs))
    }
}

impl Sum for Bytes {
    fn sum<I: Iterator<Item = Bytes>>(iter: I) -> Bytes {
        iter.fold(Bytes::ZERO, Add::add)
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} GiB", self.gib())
    }
}

/// Floating-point operations (a count, not a rate).
#[derive(Debug, Clone, Copy, Default, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct Flops(pub f64);

impl Add for Flops {
    type Output = Flops;
    fn add(self, rhs: Flops) -> Flops {
        Flops(self.0 + rhs.0)
    }
}

impl AddAssign for Flops {
    fn add_assign(&mut self, rhs: Flops) {
        self.0 += rhs.0;
    }
}

impl Sum for Flops {
    fn sum<I: Iterator<Item = Flops>>(iter: I) -> Flops {
        iter.fold(Flops(0.0), Add::add)
    }
}

/// Element types of tensors as PyTorch stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
    /// One byte: bool masks, int8 optimizer states.
    U8,
    /// int64 token ids.
    I64,
    /// 4-bit NormalFloat (QLoRA), two values per byte.
    Nf4,
}

impl DType {
    pub fn bits(self) -> u64 {
        match self {
            DType::F32 => 32,
            DType::Bf16 | DType::F16 => 16,
            DType::U8 => 8,
            DType::I64 => 64,
            DType::Nf4 => 4,
        }
    }

    /// Storage of `elements` values of this type, rounded up to whole bytes.
    pub fn bytes(self, elements: u64) -> Bytes {
        Bytes(elements.saturating_mul(self.bits()).div_ceil(8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_is_half_a_byte() {
        assert_eq!(DType::Nf4.bytes(10), Bytes(5));
        assert_eq!(DType::Nf4.bytes(3), Bytes(2));
        assert_eq!(DType::Bf16.bytes(3), Bytes(6));
        assert_eq!(DType::F32.bytes(1), Bytes(4));
    }

    #[test]
    fn bytes_saturate_instead_of_overflowing() {
        assert_eq!(Bytes(u64::MAX) + Bytes(1), Bytes(u64::MAX));
        assert!(DType::F32.bytes(u64::MAX).0 >= u64::MAX / 8);
    }
}
