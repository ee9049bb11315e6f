//! The real benchmark on a wgpu adapter (Vulkan, Metal, DX12 or GL).

use super::{AdapterInfo, Elem, GpuBench, KernelRun, pattern};
use crate::error::{Error, Result};
use std::time::Instant;
use wgpu::util::DeviceExt;

const COMMON: &str = include_str!("kernels_common.wgsl");
const MATMUL: &str = include_str!("matmul.wgsl");
const MATMUL8: &str = include_str!("matmul8.wgsl");
const COPY: &str = include_str!("copy.wgsl");
const COPY_GROUPS: u32 = 4096;

/// An opened adapter with both pipelines built.
pub struct WgpuBench {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: AdapterInfo,
    /// (element type, kernel name, C tile edge, pipeline) for every matmul variant built.
    matmuls: Vec<(Elem, &'static str, u32, wgpu::ComputePipeline)>,
    copy: wgpu::ComputePipeline,
    timestamps: bool,
    max_binding: u64,
}

fn hint() -> String {
    "install a Vulkan driver; on a CPU-only Debian machine `apt-get install mesa-vulkan-drivers` gives a software one".into()
}

impl WgpuBench {
    /// Opens the default high-performance adapter of `backends`.
    pub fn open(backends: wgpu::Backends) -> Result<WgpuBench> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = backends;
        let instance = wgpu::Instance::new(desc);
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .map_err(|e| Error::NoAdapter {
            reason: super::super::spec::registry::one_line(&e.to_string()),
            hint: hint(),
        })?;
        let ai = adapter.get_info();
        let timestamps = adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        let shader_f16 = adapter.features().contains(wgpu::Features::SHADER_F16);
        let mut features = wgpu::Features::empty();
        if timestamps {
            features |= wgpu::Features::TIMESTAMP_QUERY;
        }
        if shader_f16 {
            features |= wgpu::Features::SHADER_F16;
        }
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("ftplan-calibrate"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| Error::NoAdapter {
            reason: format!("{} could not open a device: {e}", ai.name),
            hint: hint(),
        })?;
        // One matmul source for both element types (a WGSL type alias).
        let compile = |label: &str, source: String, entry: &str| {
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let copy = compile("copy", format!("alias Elem = f32;\n{COMMON}{COPY}"), "copy");
        let mut matmuls = Vec::new();
        for (elem, prelude) in [
            (Elem::F32, "alias Elem = f32;\n"),
            (Elem::F16, "enable f16;\nalias Elem = f16;\n"),
        ] {
            if elem == Elem::F16 && !shader_f16 {
                continue;
            }
            for (name, tile, source) in [("tiled-4x4", 64, MATMUL), ("tiled-8x8", 128, MATMUL8)] {
                let pipeline = compile(name, format!("{prelude}{COMMON}{source}"), "matmul");
                matmuls.push((elem, name, tile, pipeline));
            }
        }
        Ok(WgpuBench {
            info: AdapterInfo {
                name: ai.name.clone(),
                backend: format!("{:?}", ai.backend).to_lowercase(),
                device_type: format!("{:?}", ai.device_type).to_lowercase(),
                driver: format!("{} {}", ai.driver, ai.driver_info)
                    .trim()
                    .to_string(),
            },
            device,
            queue,
            matmuls,
            copy,
            timestamps,
            max_binding: limits
                .max_storage_buffer_binding_size
                .min(limits.max_buffer_size),
        })
    }

    fn storage(&self, label: &str, bytes: &[u8]) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            })
    }

    fn empty(&self, label: &str, size: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    fn uniform(&self, values: [u32; 4]) -> wgpu::Buffer {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("dims"),
                contents: &bytes,
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }

    fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Calibration(format!("device poll failed: {e}")))
    }

    /// Runs `dispatch` (x, y) `warmup + reps` times with `bind`; returns seconds per repetition.
    fn time(
        &self,
        pipeline: &wgpu::ComputePipeline,
        bind: &wgpu::BindGroup,
        groups: (u32, u32),
        reps: u32,
    ) -> Result<f64> {
        let run = |count: u32, query: Option<&wgpu::QuerySet>| {
            let mut enc = self.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: query.map(|q| wgpu::ComputePassTimestampWrites {
                        query_set: q,
                        beginning_of_pass_write_index: Some(0),
                        end_of_pass_write_index: Some(1),
                    }),
                });
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, bind, &[]);
                for _ in 0..count {
                    pass.dispatch_workgroups(groups.0, groups.1, 1);
                }
            }
            enc
        };
        // Warm-up (pipeline compilation, clocks).
        self.queue.submit([run(2, None).finish()]);
        self.wait()?;
        if self.timestamps {
            let qs = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: None,
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 16,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let mut enc = run(reps, Some(&qs));
            enc.resolve_query_set(&qs, 0..2, &resolve, 0);
            self.queue.submit([enc.finish()]);
            let ticks = self.read_u64(&resolve)?;
            let ns = (ticks[1].saturating_sub(ticks[0])) as f64
                * f64::from(self.queue.get_timestamp_period());
            if ns > 0.0 {
                return Ok(ns * 1e-9 / f64::from(reps));
            }
        }
        let start = Instant::now();
        self.queue.submit([run(reps, None).finish()]);
        self.wait()?;
        Ok(start.elapsed().as_secs_f64() / f64::from(reps))
    }

    fn read_u64(&self, buf: &wgpu::Buffer) -> Result<Vec<u64>> {
        let bytes = self.read(buf, 0, buf.size())?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    /// Copies `len` bytes at `offset` of `src` back to the host.
    fn read(&self, src: &wgpu::Buffer, offset: u64, len: u64) -> Result<Vec<u8>> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size: len,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(src, offset, &staging, 0, len);
        self.queue.submit([enc.finish()]);
        let slice = staging.slice(..);
        slice.map_async(wgpu::MapMode::Read, |_| {});
        self.wait()?;
        let view = slice
            .get_mapped_range()
            .map_err(|e| Error::Calibration(format!("mapping a buffer failed: {e}")))?;
        let out = view.to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }

    /// Runs a matmul pipeline on inputs already in its storage format; the output is f32.
    fn product(
        &self,
        pipeline: &wgpu::ComputePipeline,
        tile: u32,
        n: u32,
        a: &[u8],
        b: &[u8],
        reps: u32,
    ) -> Result<(Vec<f32>, f64)> {
        let bytes = u64::from(n) * u64::from(n) * 4;
        if bytes > self.max_binding {
            return Err(Error::Calibration(format!(
                "a {n}x{n} matrix exceeds the adapter's storage binding limit"
            )));
        }
        let ab = self.storage("a", a);
        let bb = self.storage("b", b);
        let cb = self.empty("c", bytes);
        let dims = self.uniform([n, 0, 0, 0]);
        let bind = self.bind(pipeline, &[(0, &ab), (1, &bb), (2, &cb), (3, &dims)]);
        let seconds = self.time(pipeline, &bind, (n / tile, n / tile), reps.max(1))?;
        let out = self.read(&cb, 0, bytes)?;
        let c = out
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
            .collect();
        Ok((c, seconds))
    }

    /// A bind group for the bindings the entry point uses (its derived layout has only those).
    fn bind(
        &self,
        pipeline: &wgpu::ComputePipeline,
        buffers: &[(u32, &wgpu::Buffer)],
    ) -> wgpu::BindGroup {
        let layout = pipeline.get_bind_group_layout(0);
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .map(|&(i, b)| wgpu::BindGroupEntry {
                binding: i,
                resource: b.as_entire_binding(),
            })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &entries,
        })
    }
}

impl GpuBench for WgpuBench {
    fn info(&self) -> AdapterInfo {
        self.info.clone()
    }

    fn timestamps(&self) -> bool {
        self.timestamps
    }

    fn matmul(
        &mut self,
        elem: Elem,
        n: u32,
        a: &[f32],
        b: &[f32],
        reps: u32,
    ) -> Result<Vec<KernelRun>> {
        let to_bytes = |v: &[f32]| -> Vec<u8> {
            match elem {
                Elem::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Elem::F16 => v
                    .iter()
                    .flat_map(|&x| super::f16_bits(x).to_le_bytes())
                    .collect(),
            }
        };
        let (a, b) = (to_bytes(a), to_bytes(b));
        let mut runs = Vec::new();
        for (e, name, tile, pipeline) in &self.matmuls {
            if *e == elem && n.is_multiple_of(*tile) {
                let (c, seconds) = self.product(pipeline, *tile, n, &a, &b, reps)?;
                runs.push(KernelRun {
                    kernel: name,
                    c,
                    seconds,
                });
            }
        }
        Ok(runs)
    }

    fn max_copy_bytes(&self) -> u64 {
        // Whole vec4s.
        self.max_binding / 16 * 16
    }

    fn copy(&mut self, words: u64, reps: u32, probes: &[u64]) -> Result<(Vec<u32>, f64)> {
        let bytes = words * 4;
        if bytes > self.max_binding || !words.is_multiple_of(4) {
            return Err(Error::Calibration(format!(
                "copy of {bytes} bytes exceeds the adapter's binding limit or is not vec4-sized"
            )));
        }
        let src: Vec<u8> = (0..words).flat_map(|i| pattern(i).to_le_bytes()).collect();
        let ab = self.storage("src", &src);
        drop(src);
        let dst = self.empty("dst", bytes);
        let dims = self.uniform([0, (words / 4) as u32, COPY_GROUPS, 0]);
        let bind = self.bind(&self.copy, &[(0, &ab), (2, &dst), (3, &dims)]);
        let seconds = self.time(&self.copy, &bind, (COPY_GROUPS, 1), reps.max(1))?;
        let mut values = Vec::with_capacity(probes.len());
        for &p in probes {
            let word = self.read(&dst, (p / 4) * 16, 16)?;
            let lane = (p % 4) as usize;
            values.push(u32::from_le_bytes(
                word[lane * 4..lane * 4 + 4].try_into().unwrap_or([0; 4]),
            ));
        }
        Ok((values, seconds))
    }
}
