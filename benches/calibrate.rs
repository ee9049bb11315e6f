//! How long `ftplan calibrate` takes on this machine's adapter (target: under 10 s on a GPU).
//! A software adapter (lavapipe, llvmpipe) runs the quick settings; a GPU runs the full ones.
//!
//! Run with `cargo bench --bench calibrate`.

use ftplan::calibrate::{self, GpuBench, Settings, wgpu_bench::WgpuBench};
use std::time::Instant;

fn main() {
    let start = Instant::now();
    let mut gpu = match WgpuBench::open(wgpu::Backends::all()) {
        Ok(g) => g,
        Err(e) => {
            println!("calibrate: no adapter ({e}); nothing to time");
            return;
        }
    };
    let info = gpu.info();
    let software = info.device_type == "cpu";
    let settings = if software {
        Settings::quick()
    } else {
        Settings::full()
    };
    let opened = start.elapsed().as_secs_f64();
    let cal = calibrate::run(&mut gpu, &settings, &mut |line| println!("  {line}"))
        .expect("calibration runs and verifies");
    let total = start.elapsed().as_secs_f64();
    let best = cal.fp32_matmul.iter().map(|p| p.flops).fold(0.0, f64::max);
    println!(
        "calibrate on {} ({}, {}; {} settings, {} timing): {:.2} s in all ({:.2} s opening the device); fp32 matmul {:.3} TFLOP/s, copy {:.1} GB/s",
        info.name,
        info.backend,
        info.device_type,
        if software { "quick" } else { "full" },
        cal.timing,
        total,
        opened,
        best / 1e12,
        cal.copy_gbps
    );
}
