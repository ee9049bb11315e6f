//! `ftplan calibrate`: measure the GPU's achievable matmul rate and copy bandwidth with wgpu
//! compute kernels, check every result against a CPU reference, and write a calibration file
//! that replaces the datasheet curves in the time model.
//!
//! The GPU sits behind [`GpuBench`]; [`mock::MockGpu`] is deterministic, so nothing but the
//! wgpu correctness test needs an adapter.

pub mod file;
pub mod mock;
pub mod wgpu_bench;

pub use file::{AdapterInfo, Calibration, Point};

use crate::error::{Error, Result};

/// What a benchmark backend must do.
pub trait GpuBench {
    fn info(&self) -> AdapterInfo;
    /// Multiplies two n x n row-major matrices (inputs stored as `elem`, accumulated in f32)
    /// `reps` times with every kernel variant that handles n; returns each variant's product and
    /// seconds per product (warm-ups excluded). Empty when the adapter cannot run `elem`.
    fn matmul(
        &mut self,
        elem: Elem,
        n: u32,
        a: &[f32],
        b: &[f32],
        reps: u32,
    ) -> Result<Vec<KernelRun>>;
    /// Copies a buffer of `words` u32 values (filled with [`pattern`]) `reps` times; returns
    /// the destination's values at `probes` and the seconds per copy.
    fn copy(&mut self, words: u64, reps: u32, probes: &[u64]) -> Result<(Vec<u32>, f64)>;
    /// The largest buffer `copy` can bind, bytes.
    fn max_copy_bytes(&self) -> u64 {
        u64::MAX
    }
    /// Whether timings come from timestamp queries (else submit-and-wait wall clock).
    fn timestamps(&self) -> bool;
}

/// Storage type of the matmul inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    /// Half precision, where the adapter has shader-f16.
    F16,
}

/// One kernel variant's result.
pub struct KernelRun {
    pub kernel: &'static str,
    pub c: Vec<f32>,
    pub seconds: f64,
}

/// The copy kernel's source values.
pub fn pattern(i: u64) -> u32 {
    (i as u32).wrapping_mul(2_654_435_761).rotate_left(7)
}

/// Matmul inputs whose products and sums are exact in fp32 (multiples of 1/4 in [-1, 1]).
pub fn inputs(n: u32) -> (Vec<f32>, Vec<f32>) {
    let n = n as usize;
    let a = (0..n * n)
        .map(|i| ((i * 7 + i / n * 3) % 9) as f32 * 0.25 - 1.0)
        .collect();
    let b = (0..n * n)
        .map(|i| ((i * 5 + i / n) % 7) as f32 * 0.25 - 0.75)
        .collect();
    (a, b)
}

/// Entry (i, j) of A x B on the CPU.
pub fn reference(n: u32, a: &[f32], b: &[f32], i: usize, j: usize) -> f32 {
    let n = n as usize;
    (0..n).map(|k| a[i * n + k] * b[k * n + j]).sum()
}

/// A FLOP rate for people: GFLOP/s below a TFLOP/s.
pub fn rate(flops: f64) -> String {
    if flops >= 1e12 {
        format!("{:.2} TFLOP/s", flops / 1e12)
    } else {
        format!("{:.1} GFLOP/s", flops / 1e9)
    }
}

/// IEEE half-precision bits of `x`, for values that are exact in f16 (the benchmark's inputs:
/// multiples of 1/4 in [-1, 1]) and zero.
pub fn f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    if x == 0.0 {
        return sign;
    }
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    let mantissa = ((bits >> 13) & 0x3ff) as u16;
    sign | ((exp.clamp(0, 31) as u16) << 10) | mantissa
}

/// Sizes and repetitions of one calibration run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub matmul_sizes: Vec<u32>,
    pub matmul_reps: u32,
    pub copy_bytes: u64,
    pub copy_reps: u32,
}

impl Settings {
    /// A real GPU: sizes up to 4096, a 256 MiB copy.
    pub fn full() -> Settings {
        Settings {
            matmul_sizes: vec![256, 512, 1024, 2048, 4096],
            matmul_reps: 10,
            copy_bytes: 256 << 20,
            copy_reps: 20,
        }
    }

    /// Software adapters and CI.
    pub fn quick() -> Settings {
        Settings {
            matmul_sizes: vec![64, 128],
            matmul_reps: 2,
            copy_bytes: 4 << 20,
            copy_reps: 2,
        }
    }
}

/// One matmul measurement at size `n`: the fastest verified kernel's rate and its seconds per
/// product, or `None` where the adapter lacks the element type.
fn measure_matmul(
    gpu: &mut dyn GpuBench,
    elem: Elem,
    n: u32,
    reps: u32,
) -> Result<Option<(&'static str, f64, f64)>> {
    if !n.is_multiple_of(64) {
        return Err(Error::Calibration(format!(
            "matmul size {n} is not a multiple of 64"
        )));
    }
    let (a, b) = inputs(n);
    let runs = gpu.matmul(elem, n, &a, &b, reps)?;
    let mut best: Option<(&'static str, f64, f64)> = None;
    for run in &runs {
        verify_matmul(n, &a, &b, &run.c)?;
        let flops = 2.0 * f64::from(n).powi(3) / run.seconds;
        if best.is_none_or(|(_, f, _)| flops > f) {
            best = Some((run.kernel, flops, run.seconds));
        }
    }
    Ok(best)
}

/// One verified copy of `bytes`: read+write bandwidth (bytes/s) and seconds per copy.
fn measure_copy(gpu: &mut dyn GpuBench, bytes: u64, reps: u32) -> Result<(f64, f64)> {
    let words = (bytes / 4).max(1);
    let probes: Vec<u64> = (0..64)
        .map(|i| (i * 1_000_003) % words)
        .chain([0, words - 1])
        .collect();
    let (values, seconds) = gpu.copy(words, reps, &probes)?;
    for (&p, &v) in probes.iter().zip(&values) {
        if v != pattern(p) {
            return Err(Error::Calibration(format!(
                "copy kernel wrote {v} at word {p}, expected {}",
                pattern(p)
            )));
        }
    }
    Ok((2.0 * (words * 4) as f64 / seconds, seconds))
}

fn finish(
    gpu: &dyn GpuBench,
    fp32: Vec<Point>,
    half: Vec<Point>,
    bandwidth: f64,
    limits: Vec<String>,
    budget: Option<f64>,
) -> Calibration {
    Calibration {
        adapter: gpu.info(),
        date: file::today(),
        timing: if gpu.timestamps() {
            "timestamp-query".into()
        } else {
            "wall-clock".into()
        },
        fp32_matmul: fp32,
        f16_matmul: half,
        bf16_matmul: Vec::new(),
        copy_gbps: bandwidth / 1e9,
        budget_seconds: budget,
        limits,
        host: None,
    }
}

/// Runs every kernel at fixed sizes (`Settings`), verifying each result against the CPU.
pub fn run(
    gpu: &mut dyn GpuBench,
    settings: &Settings,
    progress: &mut dyn FnMut(&str),
) -> Result<Calibration> {
    let mut fp32 = Vec::new();
    let mut half = Vec::new();
    for (elem, points) in [(Elem::F32, &mut fp32), (Elem::F16, &mut half)] {
        for &n in &settings.matmul_sizes {
            let Some((kernel, flops, _)) = measure_matmul(gpu, elem, n, settings.matmul_reps)?
            else {
                progress(&format!(
                    "matmul {elem:?}: not supported by this adapter; skipped"
                ));
                break;
            };
            progress(&format!(
                "matmul {elem:?} {n}x{n}x{n}: {} ({kernel}, checked)",
                rate(flops)
            ));
            points.push(Point {
                n: u64::from(n),
                flops,
            });
        }
    }
    let (bandwidth, _) = measure_copy(gpu, settings.copy_bytes, settings.copy_reps)?;
    progress(&format!(
        "copy {} MiB: {:.1} GB/s read+write (checked)",
        settings.copy_bytes >> 20,
        bandwidth / 1e9
    ));
    Ok(finish(gpu, fp32, half, bandwidth, Vec::new(), None))
}

/// A rate counts as still rising while each doubling of the size gains at least this much.
const RISING: f64 = 1.05;
/// The largest sizes tried: 8192^3 matmuls and 1 GiB copies are what datasheet rates assume.
const MAX_MATMUL: u32 = 8192;
const MAX_COPY: u64 = 1 << 30;
/// Copies of less than this per buffer can be served from a last-level cache rather than from
/// memory: the H100's and H200's L2 is 50-60 MB, the RTX 4090's 72 MB, the MI300X's Infinity
/// Cache 256 MB, and a copy's footprint is its source and destination together. On the H200 a
/// 16 MiB copy ran at 4,945 GB/s, above the HBM's 4,800, and a 32 MiB one at 3,482
/// (`ftplan calibrate`, 2026-12-04), so the bandwidth counts from this size on.
const MIN_COPY: u64 = 256 << 20;

/// Runs within `budget` seconds: sizes double from small while the predicted next measurement
/// fits the remaining share of the budget and the rate is still rising, so the rates written
/// are the device's (sizes stop where the rate plateaus) unless the budget ends first; the
/// file's `limits` says which. Time spent counts the wall clock (verification included) or the
/// kernels' reported time, whichever is larger.
pub fn run_within(
    gpu: &mut dyn GpuBench,
    budget: f64,
    progress: &mut dyn FnMut(&str),
) -> Result<Calibration> {
    let mut limits = Vec::new();
    let mut series: [Vec<Point>; 2] = [Vec::new(), Vec::new()];
    for (k, (elem, share)) in [(Elem::F32, 0.45), (Elem::F16, 0.35)]
        .into_iter()
        .enumerate()
    {
        let share = budget * share;
        // `last`: (rate, wall seconds the measurement took, verification included).
        let (mut spent, mut n, mut last) = (0.0f64, 64u32, None::<(f64, f64)>);
        let reason = loop {
            // The next size costs about 8x the last measurement (n^3 work).
            let (reps, predicted) = match last {
                None => (1, 0.0),
                Some((_, took)) => {
                    let reps = ((share - spent) / 4.0 / (took * 8.0)).clamp(1.0, 10.0) as u32;
                    (reps, took * 8.0 * f64::from(reps))
                }
            };
            if last.is_some() && spent + predicted > share {
                break format!("stopped by the budget after {}", n / 2);
            }
            let t0 = std::time::Instant::now();
            let Some((kernel, flops, single)) = measure_matmul(gpu, elem, n, reps)? else {
                break "not supported by this adapter".to_string();
            };
            let took = t0.elapsed().as_secs_f64().max(single * f64::from(reps + 1));
            spent += took;
            progress(&format!(
                "matmul {elem:?} {n}x{n}x{n}: {} ({kernel}, checked; {spent:.1} of {share:.1} s)",
                rate(flops)
            ));
            series[k].push(Point {
                n: u64::from(n),
                flops,
            });
            let plateau = last.is_some_and(|(prev, _)| flops < prev * RISING);
            last = Some((flops, took / f64::from(reps)));
            if plateau {
                break format!("rate plateaued at {n}");
            }
            if n >= MAX_MATMUL {
                break format!("largest size {n}");
            }
            n *= 2;
        };
        limits.push(format!("{elem:?} matmul: {reason}"));
    }
    let share = budget * 0.2;
    let (mut spent, mut bytes, mut last) = (0.0f64, 1u64 << 20, None::<(f64, f64)>);
    let largest = gpu.max_copy_bytes().min(MAX_COPY);
    let mut bandwidth = 0.0f64;
    // Sizes double until the rate is steady beyond any cache; the rate written is the largest
    // copy's (a smaller one can be a cache's, or launch-bound).
    let cached = |b: u64| {
        if b < MIN_COPY {
            format!(" (under {} MiB: may be a cache's rate)", MIN_COPY >> 20)
        } else {
            String::new()
        }
    };
    let reason = loop {
        // The next size costs about 2x the last measurement.
        let (reps, predicted) = match last {
            None => (2, 0.0),
            Some((_, took)) => {
                let reps = ((share - spent) / 4.0 / (took * 2.0)).clamp(2.0, 20.0) as u32;
                (reps, took * 2.0 * f64::from(reps))
            }
        };
        if last.is_some() && spent + predicted > share {
            break format!(
                "stopped by the budget after {} MiB{}",
                bytes >> 21,
                cached(bytes / 2)
            );
        }
        let t0 = std::time::Instant::now();
        let (bw, single) = measure_copy(gpu, bytes, reps)?;
        let took = t0.elapsed().as_secs_f64().max(single * f64::from(reps + 1));
        spent += took;
        progress(&format!(
            "copy {} MiB: {:.1} GB/s read+write (checked; {spent:.1} of {share:.1} s)",
            bytes >> 20,
            bw / 1e9
        ));
        let steady = bytes >= MIN_COPY
            && last.is_some_and(|(prev, _)| bw < prev * RISING && bw * RISING > prev);
        bandwidth = bw;
        last = Some((bw, took / f64::from(reps)));
        if steady {
            break format!("rate steady at {} MiB", bytes >> 20);
        }
        if bytes >= MAX_COPY {
            break format!("largest size {} MiB", bytes >> 20);
        }
        if bytes * 2 > largest {
            break format!(
                "largest copy the adapter binds, {} MiB{}",
                bytes >> 20,
                cached(bytes)
            );
        }
        bytes *= 2;
    };
    limits.push(format!("copy: {reason}"));
    let [fp32, half] = series;
    if fp32.is_empty() {
        return Err(Error::Calibration(format!(
            "no fp32 matmul fitted a {budget} s budget; give --budget more seconds"
        )));
    }
    Ok(finish(gpu, fp32, half, bandwidth, limits, Some(budget)))
}

fn verify_matmul(n: u32, a: &[f32], b: &[f32], c: &[f32]) -> Result<()> {
    let size = n as usize;
    if c.len() != size * size {
        return Err(Error::Calibration(format!(
            "matmul returned {} values, expected {}",
            c.len(),
            size * size
        )));
    }
    // Every entry for small sizes; a spread of rows and columns for large ones.
    let picks: Vec<(usize, usize)> = if size <= 128 {
        (0..size)
            .flat_map(|i| (0..size).map(move |j| (i, j)))
            .collect()
    } else {
        (0..256)
            .map(|t| ((t * 37) % size, (t * 101 + 13) % size))
            .chain([(size - 1, size - 1)])
            .collect()
    };
    for (i, j) in picks {
        let want = reference(n, a, b, i, j);
        let got = c[i * size + j];
        if (got - want).abs() > 1e-3 * want.abs().max(1.0) {
            return Err(Error::Calibration(format!(
                "matmul {n}: C[{i}][{j}] = {got}, CPU reference {want}"
            )));
        }
    }
    Ok(())
}
