//! A deterministic stand-in GPU: exact results on the CPU, timings from fixed rates.

use super::{AdapterInfo, Elem, GpuBench, KernelRun, pattern, reference};
use crate::error::Result;

/// Computes on the CPU and reports the time a GPU with these rates would take.
pub struct MockGpu {
    pub flops: f64,
    pub bandwidth: f64,
    /// Size at which matmuls reach half the peak (rate = peak x n / (n + knee)).
    pub knee: f64,
    /// A last-level cache: copies whose source and destination fit in `cache_bytes` run at
    /// `cache_bandwidth`.
    pub cache_bytes: u64,
    pub cache_bandwidth: f64,
}

impl Default for MockGpu {
    fn default() -> MockGpu {
        MockGpu {
            flops: 10e12,
            bandwidth: 1e12,
            knee: 96.0,
            cache_bytes: 0,
            cache_bandwidth: 0.0,
        }
    }
}

impl GpuBench for MockGpu {
    fn info(&self) -> AdapterInfo {
        AdapterInfo {
            name: "mock".into(),
            backend: "none".into(),
            device_type: "mock".into(),
            driver: String::new(),
        }
    }

    fn matmul(
        &mut self,
        _elem: Elem,
        n: u32,
        a: &[f32],
        b: &[f32],
        _reps: u32,
    ) -> Result<Vec<KernelRun>> {
        let size = n as usize;
        let mut c = vec![0.0; size * size];
        for i in 0..size {
            for j in 0..size {
                c[i * size + j] = reference(n, a, b, i, j);
            }
        }
        // A size-dependent rate: small products reach less of the peak.
        let nf = f64::from(n);
        let rate = self.flops * nf / (nf + self.knee);
        Ok(vec![KernelRun {
            kernel: "mock",
            c,
            seconds: 2.0 * nf.powi(3) / rate,
        }])
    }

    fn copy(&mut self, words: u64, _reps: u32, probes: &[u64]) -> Result<(Vec<u32>, f64)> {
        let footprint = 8 * words;
        let bandwidth = if footprint <= self.cache_bytes {
            self.cache_bandwidth
        } else {
            self.bandwidth
        };
        Ok((
            probes.iter().map(|&p| pattern(p)).collect(),
            footprint as f64 / bandwidth,
        ))
    }

    fn timestamps(&self) -> bool {
        true
    }
}
