//! A GPU profile: memory, peak rates per dtype, bandwidth and interconnect (vendor datasheets).

use crate::error::{Error, Result};
use crate::units::{Bytes, DType};
use serde::{Deserialize, Serialize};

/// `hardware/*.toml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareWire {
    pub name: String,
    /// Other names people type (`a100` for `a100-80gb`).
    #[serde(default)]
    pub aliases: Vec<String>,
    pub display_name: String,
    pub vendor: String,
    pub source: String,
    /// Device memory as the CUDA/ROCm runtime reports it (`torch.cuda.mem_get_info` total).
    pub memory_gib: f64,
    pub fp32_tflops: f64,
    pub tf32_tflops: f64,
    pub bf16_tflops: f64,
    pub fp16_tflops: f64,
    pub int8_tops: f64,
    pub hbm_gbps: f64,
    pub interconnect: String,
    pub interconnect_gbps: f64,
    /// Memory the CUDA context and libraries take before PyTorch allocates anything.
    pub context_mib: f64,
    /// cuBLAS workspace per handle, allocated through PyTorch's caching allocator (PyTorch's
    /// `getChosenWorkspaceSize`: 32 MiB on Hopper, 4 MiB x 2 + 16 KiB x 8 before).
    pub cublas_workspace_mib: f64,
    /// Kernel launch plus framework dispatch per op, as measured on this class of GPU.
    #[serde(default = "default_launch_us")]
    pub launch_overhead_us: f64,
    /// Python-side cost of one `nn.Module` call on the host that drives this GPU.
    #[serde(default = "default_module_us")]
    pub module_overhead_us: f64,
    /// Host cost of one block under non-reentrant gradient checkpointing, beyond its ops.
    #[serde(default = "default_checkpoint_block_us")]
    pub checkpoint_block_us: f64,
    /// Host cost of one saved tensor under non-reentrant gradient checkpointing.
    #[serde(default = "default_checkpoint_tensor_us")]
    pub checkpoint_tensor_us: f64,
    pub price_per_hour_usd: Option<f64>,
    /// Inter-node network per GPU, Gb/s (one NIC per GPU in GPU servers).
    #[serde(default = "default_network_gbps")]
    pub network_gbps: f64,
    /// GPUs in the usual server for this card.
    #[serde(default = "default_gpus_per_node")]
    pub gpus_per_node: u64,
    /// Host memory of that server, GiB (what CPU offload can use).
    #[serde(default = "default_host_memory_gib")]
    pub host_memory_gib: f64,
    /// Host-to-device link per GPU, GB/s in each direction (what offload transfers pay).
    #[serde(default = "default_host_link_gbps")]
    pub host_link_gbps: f64,
}

/// 100 Gb/s Ethernet: the common NIC where a profile names none.
fn default_network_gbps() -> f64 {
    100.0
}

fn default_gpus_per_node() -> u64 {
    8
}

/// A common 2-socket server's memory where a profile names none.
fn default_host_memory_gib() -> f64 {
    512.0
}

/// PCIe 4.0 x16: 32 GB/s per direction (PCI-SIG), where a profile names none.
fn default_host_link_gbps() -> f64 {
    32.0
}

fn default_launch_us() -> f64 {
    15.0
}

fn default_module_us() -> f64 {
    90.0
}

/// `torch.utils.checkpoint` (non-reentrant, torch 2.11) is Python on the host: per block it
/// stashes and restores the RNG states, enters autocast and saved-tensor-hook contexts, and runs
/// the recomputation through a dynamo-disabled wrapper; per saved tensor its pack hook makes a
/// holder and records shape/dtype/device, the recomputation's pack hook files the new tensor,
/// the unpack hook hands it back, and `check_recomputed_tensors_match` compares the two.
/// Timed with `harness/measure.py`'s `--calibrate-host` loop (a chain of 1 and of 256 `tanh`s,
/// each saving one tensor, checkpointed or not; the difference, less the recomputed forward, the
/// fastest of nine loops) on the host of the H200 that measured `validation/` (16-core Xeon VM,
/// Python 3.12, torch 2.11+cu130, on `cuda`, 2026-12-04): 752 us per block and 15.0 us per saved
/// tensor. On a CUDA tensor the block also stashes the CUDA generator's state and the
/// recomputation forks and restores it (PyTorch's checkpoint notes: "saves and restores the RNG
/// state for CPU and another device type"), which a CPU-only timing misses: the same loop on a
/// 2-core VM's CPU gave 180-250 us and 10-12 us. `ftplan measure --calibrate-host` measures a
/// machine's own.
fn default_checkpoint_block_us() -> f64 {
    750.0
}

fn default_checkpoint_tensor_us() -> f64 {
    15.0
}

/// A validated GPU profile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hardware {
    pub name: String,
    pub display_name: String,
    pub vendor: String,
    pub memory: Bytes,
    pub fp32_tflops: f64,
    pub tf32_tflops: f64,
    pub bf16_tflops: f64,
    pub fp16_tflops: f64,
    pub int8_tops: f64,
    pub hbm_gbps: f64,
    pub interconnect: String,
    pub interconnect_gbps: f64,
    pub context: Bytes,
    pub cublas_workspace: Bytes,
    pub launch_overhead_us: f64,
    pub module_overhead_us: f64,
    pub checkpoint_block_us: f64,
    pub checkpoint_tensor_us: f64,
    pub price_per_hour_usd: Option<f64>,
    /// Inter-node network per GPU, Gb/s.
    pub network_gbps: f64,
    pub gpus_per_node: u64,
    /// Host memory per node.
    pub host_memory: Bytes,
    /// Host-to-device link per GPU, GB/s per direction.
    pub host_link_gbps: f64,
}

impl Hardware {
    /// This GPU as a CPU replay of a plan sees it: the same plan run on the CPU (`ftplan measure
    /// --device cpu`, or PyTorch's memory trackers over fake tensors) calls no cuBLAS, so it has
    /// none of the workspaces cuBLAS keeps per thread and stream on a GPU.
    pub fn as_cpu_replay(&self) -> Hardware {
        Hardware {
            cublas_workspace: Bytes::ZERO,
            ..self.clone()
        }
    }

    /// Whether bf16 runs on tensor cores (not on V100 or T4, whose datasheets give bf16 no
    /// rate above fp32's).
    pub fn has_bf16_tensor_cores(&self) -> bool {
        self.bf16_tflops > self.fp32_tflops * 1.01
    }

    /// Peak dense matmul rate for a dtype, FLOP/s.
    pub fn peak_flops(&self, dtype: DType) -> f64 {
        1e12 * match dtype {
            DType::Bf16 => self.bf16_tflops,
            DType::F16 => self.fp16_tflops,
            DType::F32 => self.fp32_tflops,
            DType::U8 | DType::Nf4 | DType::I64 => self.bf16_tflops,
        }
    }

    pub fn from_wire(path: &str, w: HardwareWire) -> Result<Hardware> {
        // The one place hardware numbers get their ranges: finite, at least a thousandth of the
        // unit (a rate of 1e-300 would print 300-digit step times), at most `max`.
        let positive = |field: &str, v: f64, max: f64| -> Result<f64> {
            if !(v.is_finite() && v >= 1e-3) {
                Err(Error::field(
                    path,
                    field,
                    format!("must be a number from 0.001 to {max}, found {v}"),
                ))
            } else if v > max {
                Err(Error::field(
                    path,
                    field,
                    format!("is absurdly large ({v}); the most accepted is {max}"),
                ))
            } else {
                Ok(v)
            }
        };
        Ok(Hardware {
            memory: Bytes::from_gib(positive("memory_gib", w.memory_gib, 1e5)?),
            fp32_tflops: positive("fp32_tflops", w.fp32_tflops, 1e6)?,
            tf32_tflops: positive("tf32_tflops", w.tf32_tflops, 1e6)?,
            bf16_tflops: positive("bf16_tflops", w.bf16_tflops, 1e6)?,
            fp16_tflops: positive("fp16_tflops", w.fp16_tflops, 1e6)?,
            int8_tops: positive("int8_tops", w.int8_tops, 1e6)?,
            hbm_gbps: positive("hbm_gbps", w.hbm_gbps, 1e6)?,
            interconnect_gbps: positive("interconnect_gbps", w.interconnect_gbps, 1e6)?,
            context: Bytes::from_mib(positive("context_mib", w.context_mib, 1e6)?),
            cublas_workspace: Bytes::from_mib(positive(
                "cublas_workspace_mib",
                w.cublas_workspace_mib,
                1e5,
            )?),
            launch_overhead_us: positive("launch_overhead_us", w.launch_overhead_us, 1e5)?,
            module_overhead_us: positive("module_overhead_us", w.module_overhead_us, 1e5)?,
            checkpoint_block_us: positive("checkpoint_block_us", w.checkpoint_block_us, 1e5)?,
            checkpoint_tensor_us: positive("checkpoint_tensor_us", w.checkpoint_tensor_us, 1e5)?,
            price_per_hour_usd: match w.price_per_hour_usd {
                Some(p) => Some(positive("price_per_hour_usd", p, 1e6)?),
                None => None,
            },
            network_gbps: positive("network_gbps", w.network_gbps, 1e5)?,
            gpus_per_node: match w.gpus_per_node {
                1..=1024 => w.gpus_per_node,
                n => {
                    return Err(Error::field(
                        path,
                        "gpus_per_node",
                        format!("must be 1 to 1024, found {n}"),
                    ));
                }
            },
            host_memory: Bytes::from_gib(positive("host_memory_gib", w.host_memory_gib, 1e6)?),
            host_link_gbps: positive("host_link_gbps", w.host_link_gbps, 1e5)?,
            name: w.name,
            display_name: w.display_name,
            vendor: w.vendor,
            interconnect: w.interconnect,
        })
    }
}
