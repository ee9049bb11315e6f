//! The calibration file: what `ftplan calibrate` measured, and how the time model uses it.
//!
//! Two formats load: ftplan's own TOML, and the JSON that the ground-truth harness
//! (`measure.py`, `validation/calib-h200.json`) writes from PyTorch's cuBLAS and copy timings.

use crate::error::{Error, Result};
use crate::spec::hardware::Hardware;
use crate::time::Rates;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The adapter that was measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterInfo {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    #[serde(default)]
    pub driver: String,
}

/// One measured matmul size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Point {
    /// n of an n x n x n product.
    pub n: u64,
    /// Achieved FLOP/s.
    pub flops: f64,
}

/// A calibration as saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    pub adapter: AdapterInfo,
    /// UTC date of the run (YYYY-MM-DD).
    pub date: String,
    /// "timestamp-query" or "wall-clock".
    pub timing: String,
    pub fp32_matmul: Vec<Point>,
    /// f16-input, f32-accumulate WGSL rates, where the adapter supports shader-f16.
    #[serde(default)]
    pub f16_matmul: Vec<Point>,
    /// bf16 rates when the source measured them (PyTorch); wgpu has no bf16 tensor-core path.
    #[serde(default)]
    pub bf16_matmul: Vec<Point>,
    /// Device-to-device copy bandwidth, read + write, GB/s.
    pub copy_gbps: f64,
    /// The time budget the run had (`ftplan calibrate --budget`), if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_seconds: Option<f64>,
    /// Why each measurement stopped growing: "rate plateaued" (the device's rate), "budget",
    /// or "largest size".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<String>,
    /// This machine's host costs, from `ftplan measure --calibrate-host` (PyTorch timed on it);
    /// without them the time model uses the constants fitted on the H200 host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostCosts>,
}

/// Host-side costs of eager PyTorch on one machine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostCosts {
    /// One op on a tensor that requires grad: ATen dispatch, autograd node, kernel launch (us).
    pub dispatch_us: f64,
    /// One `nn.Module` call without kernels: Python hooks and argument handling (us).
    pub module_us: f64,
    /// One block under non-reentrant gradient checkpointing, beyond its ops (us); absent in
    /// files written before it was timed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_block_us: Option<f64>,
    /// One tensor saved under non-reentrant gradient checkpointing (us).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_tensor_us: Option<f64>,
}

/// `measure.py`'s calib.json.
#[derive(Debug, Deserialize)]
struct HarnessCalib {
    gpu: String,
    matmul_tflops_8192: HarnessRates,
    #[serde(rename = "d2d_copy_GBps_read_plus_write")]
    copy_gbps: f64,
    #[serde(default)]
    driver: Option<String>,
}

#[derive(Debug, Deserialize)]
struct HarnessRates {
    fp32: f64,
    bf16: f64,
}

impl Calibration {
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string_pretty(self).map_err(|e| Error::Write {
            path: path.into(),
            message: e.to_string(),
        })?;
        crate::report::write_atomic(path, text.as_bytes())
    }

    pub fn load(path: &Path) -> Result<Calibration> {
        let text = crate::io::read_text(path)?;
        Calibration::parse(&path.display().to_string(), &text)
    }

    /// Parses a calibration: the harness's JSON (`shown` ends in `.json`) or ftplan's TOML.
    pub fn parse(shown: &str, text: &str) -> Result<Calibration> {
        let shown = shown.to_string();
        let text = text.to_string();
        let cal = if shown.ends_with(".json") {
            let h: HarnessCalib = serde_json::from_str(&text).map_err(|e| Error::Parse {
                path: shown.clone(),
                message: e.to_string(),
            })?;
            Calibration {
                adapter: AdapterInfo {
                    name: h.gpu,
                    backend: "cuda (PyTorch)".into(),
                    device_type: "discrete".into(),
                    driver: h.driver.unwrap_or_default(),
                },
                date: String::new(),
                timing: "cuda-events".into(),
                fp32_matmul: vec![Point {
                    n: 8192,
                    flops: h.matmul_tflops_8192.fp32 * 1e12,
                }],
                f16_matmul: Vec::new(),
                bf16_matmul: vec![Point {
                    n: 8192,
                    flops: h.matmul_tflops_8192.bf16 * 1e12,
                }],
                copy_gbps: h.copy_gbps,
                budget_seconds: None,
                limits: Vec::new(),
                host: None,
            }
        } else {
            toml::from_str(&text)
                .map_err(|e| crate::spec::registry::toml_error(&shown, &text, &e))?
        };
        let bad_rate = cal
            .fp32_matmul
            .iter()
            .chain(&cal.bf16_matmul)
            // At least a MFLOP/s: a rate of 1e-300 would print 300-digit step times.
            .any(|p| !(p.flops.is_finite() && p.flops >= 1e6 && p.flops <= 1e18) || p.n == 0);
        if bad_rate || cal.fp32_matmul.is_empty() {
            return Err(Error::field(
                shown,
                "fp32_matmul",
                "needs at least one point with positive n and flops from 1e6 to 1e18",
            ));
        }
        if let Some(h) = cal.host {
            let within = |v: f64, low: f64| v.is_finite() && (low..=1e5).contains(&v);
            if !(within(h.dispatch_us, 0.01) && within(h.module_us, 0.0)) {
                return Err(Error::field(
                    shown,
                    "host",
                    "dispatch_us must be from 0.01 to 1e5 and module_us from 0 to 1e5 microseconds",
                ));
            }
            let checkpoint = [h.checkpoint_block_us, h.checkpoint_tensor_us];
            if checkpoint.into_iter().flatten().any(|v| !within(v, 0.0)) {
                return Err(Error::field(
                    shown,
                    "host",
                    "checkpoint_block_us and checkpoint_tensor_us must be from 0 to 1e5 microseconds",
                ));
            }
        }
        if !(cal.copy_gbps.is_finite() && (1e-3..=1e6).contains(&cal.copy_gbps)) {
            return Err(Error::field(
                shown,
                "copy_gbps",
                format!("must be from 0.001 to 1e6, found {}", cal.copy_gbps),
            ));
        }
        Ok(cal)
    }

    /// Whether the measured adapter looks like this GPU profile.
    pub fn device_matches(&self, hw: &Hardware) -> bool {
        let name = self.adapter.name.to_lowercase();
        let key = hw.name.split('-').next().unwrap_or(&hw.name).to_lowercase();
        name.contains(&key)
    }

    /// Rates for the time model: measured curves where there are any, the datasheet's otherwise.
    pub fn rates(&self, hw: &Hardware) -> Rates {
        let datasheet = Rates::from_datasheet(hw);
        let curve = |points: &[Point]| {
            let mut v: Vec<(u64, f64)> = points.iter().map(|p| (p.n, p.flops)).collect();
            v.sort_by_key(|p| p.0);
            v
        };
        Rates {
            source: format!(
                "calibration of {} ({})",
                self.adapter.name,
                if self.date.is_empty() {
                    "harness"
                } else {
                    &self.date
                }
            ),
            bf16_matmul: if self.bf16_matmul.is_empty() {
                datasheet.bf16_matmul
            } else {
                curve(&self.bf16_matmul)
            },
            fp32_matmul: curve(&self.fp32_matmul),
            // Calibration measures bf16; fp16 follows it by the datasheet's fp16/bf16 ratio.
            fp16_matmul: {
                let bf16 = if self.bf16_matmul.is_empty() {
                    Rates::from_datasheet(hw).bf16_matmul
                } else {
                    curve(&self.bf16_matmul)
                };
                let ratio = hw.fp16_tflops / hw.bf16_tflops.max(1e-9);
                bf16.into_iter().map(|(n, r)| (n, r * ratio)).collect()
            },
            copy_bandwidth: self.copy_gbps * 1e9,
            launch_overhead: self
                .host
                .map_or(datasheet.launch_overhead, |h| h.dispatch_us * 1e-6),
            module_overhead: self
                .host
                .map_or(datasheet.module_overhead, |h| h.module_us * 1e-6),
            checkpoint_block: self
                .host
                .and_then(|h| h.checkpoint_block_us)
                .map_or(datasheet.checkpoint_block, |us| us * 1e-6),
            checkpoint_tensor: self
                .host
                .and_then(|h| h.checkpoint_tensor_us)
                .map_or(datasheet.checkpoint_tensor, |us| us * 1e-6),
        }
    }
}

/// Today's UTC date, from the system clock (days since 1970 to a civil date, H. Hinnant's
/// `civil_from_days`).
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
