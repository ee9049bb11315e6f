//! The real wgpu kernels, on whatever adapter the machine has (CI installs Debian's lavapipe),
//! checked against the CPU reference inside `calibrate::run`.

use ftplan::calibrate::{self, Settings, wgpu_bench::WgpuBench};

#[test]
fn wgpu_kernels_compute_correct_results() {
    let mut gpu = match WgpuBench::open(wgpu::Backends::all()) {
        Ok(g) => g,
        // CI installs Debian's software Vulkan driver and sets this, so there it must run.
        Err(e) if std::env::var_os("FTPLAN_REQUIRE_ADAPTER").is_some() => {
            panic!("{e}: this test needs a wgpu adapter (`.ci/run` installs mesa-vulkan-drivers)")
        }
        Err(e) => {
            eprintln!(
                "skipped: wgpu_kernels_compute_correct_results: {e} \
                 (install mesa-vulkan-drivers to run the kernels on the CPU)"
            );
            return;
        }
    };
    let settings = Settings {
        matmul_sizes: vec![64, 128, 256],
        matmul_reps: 2,
        copy_bytes: 1 << 20,
        copy_reps: 2,
    };
    let cal = calibrate::run(&mut gpu, &settings, &mut |line| println!("{line}"))
        .expect("kernels verified");
    assert_eq!(cal.fp32_matmul.len(), 3);
    // Adapters with shader-f16 (lavapipe has it) also run and verify the f16-input kernel.
    assert!(cal.f16_matmul.is_empty() || cal.f16_matmul.len() == 3);
    assert!(cal.fp32_matmul.iter().all(|p| p.flops > 0.0) && cal.copy_gbps > 0.0);
}

#[test]
fn no_backend_means_no_adapter_not_a_panic() {
    let err = WgpuBench::open(wgpu::Backends::empty())
        .err()
        .expect("no adapter without backends");
    assert!(err.to_string().contains("no GPU adapter"), "{err}");
}
