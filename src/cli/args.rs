//! Command-line flags (clap). Parsing only: `cli::plan` turns them into a validated plan.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "ftplan",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("FTPLAN_COMMIT"), ")"),
    about = "Will fine-tuning this model with this method fit on this GPU, and how fast will it run?",
    after_help = "Exit codes: 0 fits, 1 does not fit, 2 error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Estimate memory and step time for one plan.
    Estimate(EstimateArgs),
    /// Check plan files (or one plan given by flags) against their GPUs; for CI.
    Check(CheckArgs),
    /// Largest batch and sequence that fit, and the changes (one, or two together) that make a plan fit.
    Fit(FitArgs),
    /// Several methods (and/or GPUs) side by side for one model, with a chart.
    Compare(CompareArgs),
    /// Memory and step time against sequence length or batch size; or a models x GPUs fit matrix.
    Sweep(SweepArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Run the plan for real (Python with torch, transformers, peft) and print estimate and
    /// measurement side by side.
    Measure(MeasureArgs),
    /// Write the plan as the engine's own config: `--deepspeed FILE` and/or `--accelerate FILE`.
    Export(ExportArgs),
    /// List shipped models or GPUs.
    List {
        #[arg(value_enum)]
        what: ListWhat,
        /// Output: a table for people or JSON for programs.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Compare estimates with the measured H200 runs in validation/ (the headline error table).
    Validate(ValidateArgs),
    /// Measure this machine's GPU with a wgpu micro-benchmark and write a calibration file.
    Calibrate(CalibrateArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListWhat {
    Models,
    Gpus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// Every parameter trains.
    Full,
    /// LoRA adapters beside chosen projections (peft).
    Lora,
    /// LoRA over an NF4 4-bit base (peft + bitsandbytes).
    Qlora,
    /// A bottleneck adapter after each block's FFN.
    Adapter,
    /// Prefix tuning (peft).
    Prefix,
    /// Prompt tuning (peft).
    Prompt,
    /// IA3 scaling vectors (peft).
    Ia3,
    /// Bias terms only (BitFit).
    #[value(name = "bitfit")]
    BitFit,
    /// Norm scales and shifts only (LN tuning).
    LnTuning,
    /// The top --train-layers blocks train, the rest is frozen.
    Freeze,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    #[value(name = "mixed-bf16")]
    MixedBf16,
    /// fp16 autocast with a loss scaler (GPUs without bf16: V100, T4).
    #[value(name = "mixed-fp16")]
    MixedFp16,
    Bf16,
    Fp32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    Adamw,
    #[value(name = "adamw-foreach")]
    AdamwForeach,
    #[value(name = "adamw-8bit")]
    Adamw8bit,
    #[value(name = "paged-adamw-8bit")]
    PagedAdamw8bit,
    #[value(name = "paged-adamw-32bit")]
    PagedAdamw32bit,
    Sgd,
    Adafactor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LinearKernelArg {
    Torch,
    Fla,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttentionArg {
    Sdpa,
    #[value(name = "flash2")]
    Flash2,
    Eager,
}

/// The flags that describe one plan (shared by estimate, check and fit).
#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// Model name or alias (`ftplan list models`), a path to a config.json, a model folder or a
    /// model TOML, or `-` for a config.json on standard input. A Hub id (`org/name`) that is
    /// not a path here names its shipped copy, if one ships.
    #[arg(long)]
    pub model: Option<String>,
    /// Fine-tuning method.
    #[arg(long, value_enum, default_value_t = MethodArg::Full)]
    pub method: MethodArg,
    /// GPU name or alias (`ftplan list gpus`), or a path to a hardware TOML.
    #[arg(long)]
    pub gpu: Option<String>,
    /// Dtype regime of the weights [default: mixed-bf16 for full, bf16 for PEFT methods].
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// Optimizer and its implementation (fused AdamW is Hugging Face Trainer's default).
    #[arg(long, value_enum, default_value_t = OptimizerArg::Adamw)]
    pub optimizer: OptimizerArg,
    /// Micro-batch per GPU.
    #[arg(long, default_value_t = 1)]
    pub batch: u64,
    /// Tokens per sample (encoder-decoder: source length).
    #[arg(long, default_value_t = 1024)]
    pub seq: u64,
    /// Target length of an encoder-decoder model.
    #[arg(long, default_value_t = 128)]
    pub target_seq: u64,
    /// Gradient checkpointing (one checkpoint per block, non-reentrant).
    #[arg(long)]
    pub grad_ckpt: bool,
    /// Attention kernel: SDPA (flash / memory-efficient), flash2 (flash_attention_2) or eager.
    #[arg(long, value_enum, default_value_t = AttentionArg::Sdpa)]
    pub attention: AttentionArg,
    /// LoRA rank r.
    #[arg(long, default_value_t = 16)]
    pub lora_rank: u64,
    /// LoRA alpha [default: 2 x rank].
    #[arg(long, allow_negative_numbers = true)]
    pub lora_alpha: Option<f64>,
    /// `qv`, `all`, or a comma list of q,k,v,o,gate,up,down.
    #[arg(long, default_value = "qv")]
    pub lora_targets: String,
    /// Virtual tokens for prefix and prompt tuning.
    #[arg(long, default_value_t = 20)]
    pub virtual_tokens: u64,
    /// Weight-decomposed LoRA (DoRA, peft's `use_dora=True`) with --method lora or qlora.
    #[arg(long)]
    pub lora_dora: bool,
    /// With --method freeze: the blocks that train, `top:N` (or `N`) [default: top:1].
    #[arg(long)]
    pub train_layers: Option<String>,
    /// With --method freeze: the token embeddings train too.
    #[arg(long)]
    pub train_embeddings: bool,
    /// With --method freeze on an encoder-decoder: only this side trains (encoder, decoder).
    #[arg(long)]
    pub train_side: Option<String>,
    /// Mixture-of-experts: the busiest expert's tokens over the mean (1 = uniform routing).
    /// Accepted for old plans; on one GPU it changes nothing (transformers 5 runs every routed
    /// row through one grouped matmul, whatever the routing).
    #[arg(long, allow_negative_numbers = true)]
    pub expert_load: Option<f64>,
    /// Linear-attention and convolution layers (Qwen3.5, Qwen3-Next, LFM2): transformers'
    /// PyTorch code (torch) or the flash-linear-attention and causal-conv1d kernels (fla),
    /// when installed.
    #[arg(long, value_enum, default_value_t = LinearKernelArg::Torch)]
    pub linear_kernel: LinearKernelArg,
    /// Bottleneck size of the adapter method.
    #[arg(long, default_value_t = 64)]
    pub adapter_size: u64,
    /// GPUs in the job (data x tensor x pipeline parallel) [default: 1].
    #[arg(long)]
    pub gpus: Option<u64>,
    /// GPUs per node (default: 8, or --gpus when fewer).
    #[arg(long)]
    pub gpus_per_node: Option<u64>,
    /// Data-parallel engine: ddp, zero1, zero2, zero3, fsdp, fsdp-grad-op, fsdp-hybrid.
    #[arg(long)]
    pub engine: Option<String>,
    /// What lives on the host: none, optimizer, params.
    #[arg(long)]
    pub offload: Option<String>,
    /// Tensor-parallel degree [default: 1].
    #[arg(long)]
    pub tp: Option<u64>,
    /// Sequence parallelism beside tensor parallelism.
    #[arg(long)]
    pub sp: bool,
    /// Pipeline-parallel stages (1F1B schedule) [default: 1].
    #[arg(long)]
    pub pp: Option<u64>,
    /// Micro-batches per step through the pipeline (default: 2 x --pp with a pipeline).
    #[arg(long)]
    pub micro_batches: Option<u64>,
    /// Gradient-accumulation steps per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: u64,
    /// Memory to keep free, in percent of the device.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    pub headroom: f64,
    /// Calibration file from `ftplan calibrate` (replaces the datasheet rate curves).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// A DeepSpeed ds_config.json: ZeRO stage, offload, micro-batch, accumulation, bf16 (with
    /// `export`: the file to write).
    #[arg(long)]
    pub deepspeed: Option<PathBuf>,
    /// An Accelerate config YAML: distributed type, processes, machines, FSDP/DeepSpeed keys.
    #[arg(long)]
    pub accelerate_config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EstimateArgs {
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Output: a table for people or JSON for programs.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Training tokens, for wall time and cost.
    #[arg(long, allow_negative_numbers = true)]
    pub tokens: Option<f64>,
    /// Epochs over --dataset-tokens, for wall time and cost.
    #[arg(long, allow_negative_numbers = true)]
    pub epochs: Option<f64>,
    /// Tokens in the dataset (with --epochs: wall time and cost for the whole run).
    #[arg(long, allow_negative_numbers = true)]
    pub dataset_tokens: Option<f64>,
    /// Price per GPU-hour in USD (overrides the hardware profile's).
    #[arg(long, allow_negative_numbers = true)]
    pub price: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cuda,
    Cpu,
}

#[derive(Debug, Args)]
pub struct MeasureArgs {
    /// A plan file (TOML) instead of the plan flags.
    pub plan_file: Option<PathBuf>,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// The Python that has torch, transformers and peft.
    #[arg(long, default_value = "python3")]
    pub python: PathBuf,
    /// Where the harness runs: the GPU (cuda) or, without one, the CPU.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cuda)]
    pub device: DeviceArg,
    /// The same structure at toy size (2 layers, width 64, vocabulary 512): seconds anywhere.
    #[arg(long)]
    pub tiny: bool,
    /// Training steps (the first, which creates the optimizer states, is not timed).
    #[arg(long, default_value_t = 4)]
    pub steps: u32,
    /// Append the run to this JSON-lines file, in the format `ftplan validate --file` reads.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Instead of a plan: time this machine's per-op dispatch, per-module call and gradient
    /// checkpointing's per-block and per-saved-tensor hooks with PyTorch, and write them into
    /// the --calibration file (made by `ftplan calibrate`).
    #[arg(long)]
    pub calibrate_host: bool,
    /// Output: a table for people or JSON for programs.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Plan files (TOML) or folders of them; none: the plan given by flags.
    pub plans: Vec<PathBuf>,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Output: a table for people or JSON for programs.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct FitArgs {
    /// A plan file; without one, the plan given by flags.
    pub plan_file: Option<PathBuf>,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Most GPUs the layout search may use (layout flags given are kept fixed).
    #[arg(long, default_value_t = 1024)]
    pub max_gpus: u64,
    /// What the best layout minimises: gpus, time or cost.
    #[arg(long, value_enum, default_value_t = ObjectiveArg::Gpus)]
    pub objective: ObjectiveArg,
    /// Host memory per node for offload, GiB (default: the GPU's usual server).
    #[arg(long, allow_negative_numbers = true)]
    pub host_memory: Option<f64>,
    /// Layouts to show (0: no layout search).
    #[arg(long, default_value_t = 5)]
    pub layouts: usize,
    /// More GPU types to search layouts on, comma-separated: the layouts of all are ranked
    /// together by --objective (the cheapest GPU type and layout, with --objective cost).
    #[arg(long)]
    pub gpus_list: Option<String>,
    /// Output: a table for people or JSON for programs.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub plan: PlanArgs,
    /// The Accelerate config YAML to write.
    #[arg(long)]
    pub accelerate: Option<PathBuf>,
}

/// `ftplan fit --objective`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ObjectiveArg {
    /// Fewest GPUs, then fastest step.
    Gpus,
    /// Most tokens per second.
    Time,
    /// Lowest cost per million tokens.
    Cost,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Methods to compare, comma-separated.
    #[arg(long, default_value = "full,lora,qlora,adapter,prefix,prompt,ia3")]
    pub methods: String,
    /// Extra GPUs to compare on, comma-separated (default: --gpu alone).
    #[arg(long)]
    pub gpus_list: Option<String>,
    /// Folder for the charts and the Markdown report.
    #[arg(long, default_value = "reports")]
    pub out: PathBuf,
    /// Output: a table for people or JSON for programs.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SweepAxis {
    Seq,
    Batch,
    /// Fit matrix of --models x --gpus-list for --method.
    Matrix,
    /// Fewest GPUs of --gpu each of --methods needs, for each of --models (layouts searched).
    Gpus,
    /// Which parameters each of --methods updates in --model, by part and block.
    Updates,
    /// Trainable parameters and peak memory of each of --methods across --models ("why PEFT").
    Scale,
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub plan: PlanArgs,
    /// What to sweep: seq, batch, matrix (models x GPUs), gpus (fewest GPUs per method),
    /// updates (which parameters each method trains) or scale (methods across model sizes).
    #[arg(long, value_enum, default_value_t = SweepAxis::Seq)]
    pub over: SweepAxis,
    /// Methods, one curve each [default: full,lora,qlora; every method for updates and scale].
    #[arg(long)]
    pub methods: Option<String>,
    /// Models for the fit matrix and the GPUs-needed chart, comma-separated.
    #[arg(long)]
    pub models: Option<String>,
    /// GPUs for the fit matrix, comma-separated.
    #[arg(long)]
    pub gpus_list: Option<String>,
    /// Folder for the chart (SVG + PNG) and the Markdown report.
    #[arg(long, default_value = "reports")]
    pub out: PathBuf,
    /// Output: a table for people or JSON for programs.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Measured runs (JSON lines, the ground-truth format) [default: the H200 runs built in].
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Output: a table for people or JSON for programs.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Calibration file for the step-time column [default: validation/calib-h200.json's rates].
    #[arg(long)]
    pub calibration: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Where to write the calibration TOML.
    #[arg(long, default_value = "calibration.toml")]
    pub out: PathBuf,
    /// Seconds the calibration may take: sizes grow until the rate stops rising or the
    /// budget ends (0.5 to 3600).
    #[arg(long, default_value_t = 10.0, allow_negative_numbers = true)]
    pub budget: f64,
    /// Fixed small sizes and few repetitions instead of a budget (software adapters, CI).
    #[arg(long)]
    pub quick: bool,
    /// Use a deterministic mock GPU instead of a real adapter (tests).
    #[arg(long, hide = true)]
    pub mock: bool,
    /// Which graphics API to look for an adapter on.
    #[arg(long, value_enum, default_value_t = BackendArg::All)]
    pub backend: BackendArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    All,
    Vulkan,
    Metal,
    Dx12,
    Gl,
    /// No backend: always "no adapter" (for testing the error path).
    None,
}
