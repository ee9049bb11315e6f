//! A validated model architecture: everything the memory and time models need, no `Option`s.
//!
//! Built from a Hugging Face `config.json` or from a `models/*.toml` file that uses the same field
//! names (see `spec::hf`), so a published config value pastes straight in.

use serde::Serialize;

/// The order an attention's forward builds q, k and v with their norms and rotary
/// ([`Family::qk_order`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkOrder {
    /// q, k and v projected, then q and k normed, then rotated (Llama, Gemma 3).
    ProjectionsFirst,
    /// Each of q and k normed as it is projected, v projected, then both rotated (Qwen3).
    NormedAsProjected,
    /// q projected, normed and rotated, then k, then v projected and normed (Gemma 4).
    EachRotatedAsProjected,
    /// q, k and v projected, q and k rotated, then normed (HunYuan).
    NormsAfterRotary,
}

/// Which Hugging Face implementation the architecture follows; decides the block's op sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `LlamaForCausalLM` (also TinyLlama): pre-RMSNorm, rotary, SwiGLU.
    Llama,
    /// `MistralForCausalLM`: the Llama block with sliding-window attention.
    Mistral,
    /// `Qwen2ForCausalLM`: the Llama block with q/k/v biases.
    Qwen2,
    /// `GemmaForCausalLM`: Llama-like, GeGLU, (1 + w) RMSNorm, scaled embeddings.
    Gemma,
    /// `GPT2LMHeadModel`: pre-LayerNorm, learned positions, fused qkv `Conv1D`, GELU (tanh).
    Gpt2,
    /// `OPTForCausalLM`: pre-LayerNorm, learned positions, ReLU.
    Opt,
    /// `PhiForCausalLM`: parallel attention and MLP, partial rotary, GELU (tanh).
    Phi,
    /// `FalconForCausalLM`: parallel attention and MLP, multi-query, fused qkv.
    Falcon,
    /// `T5ForConditionalGeneration`: encoder-decoder, T5 RMSNorm, relative position bias.
    T5,
    /// `GPTBigCodeForCausalLM` (StarCoder 1, SantaCoder, WizardCoder): GPT-2's block with
    /// `nn.Linear` layers and multi-query attention (one key/value head, `multi_query`).
    GptBigcode,
    /// `OlmoForCausalLM` (OLMo 1, Groeneveld et al. 2024): the Llama block with a LayerNorm
    /// that has no parameters, computed in fp32.
    Olmo,
    /// `MBartForConditionalGeneration` (Liu et al. 2020, "mBART"): BART's modules with the norms
    /// before each sub-layer, a final LayerNorm per stack and `sqrt(d_model)`-scaled embeddings.
    Mbart,
    /// `StableLmForCausalLM` (StableLM-3B-4E1T, StableLM-2): the Llama block with LayerNorm
    /// (weight and bias), rotary on a quarter of each head, optional q/k/v biases and an
    /// optional parallel residual over one norm.
    StableLm,
    /// `MT5ForConditionalGeneration` (Xue et al. 2021, "mT5"): T5 v1.1's modules (transformers
    /// copies them) under its own `model_type`, which peft's IA3 table keys differently.
    Mt5,
    /// `GPTNeoForCausalLM` (Black et al. 2021, GPT-Neo 125M-2.7B): GPT-2's block with
    /// `nn.Linear` layers, no q/k/v biases and unscaled scores, alternating global and local
    /// (256-token) layers whose window is a boolean mask buffer per layer; eager attention only.
    GptNeo,
    /// `GPTJForCausalLM` (Wang & Komatsuzaki 2021, GPT-J-6B): one LayerNorm feeding attention
    /// and the MLP in parallel, interleaved rotary on the first `rotary_dim` features of each
    /// head, no attention biases, a biased LM head; eager attention only.
    Gptj,
    /// `MarianMTModel` (Junczys-Dowmunt et al. 2018; the OPUS-MT translation models): BART's
    /// post-norm layers without an embedding norm, `sqrt(d_model)`-scaled embeddings, and a
    /// frozen sinusoidal position table per stack.
    Marian,
    /// `PegasusForConditionalGeneration` (Zhang et al. 2020): mBART's pre-norm layers and final
    /// norm per stack without an embedding norm, scaled embeddings, frozen sinusoidal positions.
    Pegasus,
    /// `PhimoeForCausalLM` (Phi-3.5-MoE): Mixtral's block with biased LayerNorms, q/k/v/o biases
    /// (`attention_bias`), a biased LM head, `sparsemixer` routing and input jitter.
    Phimoe,
    /// `CodeGenForCausalLM` (Nijkamp et al. 2023, CodeGen 350M-16B): GPT-J's block with one
    /// fused `qkv_proj` (no bias) split as four model-parallel shards.
    Codegen,
    /// `NemotronForCausalLM` (Nemotron-4, Minitron): the Llama attention with half-rotary heads,
    /// a non-gated squared-ReLU MLP and `NemotronLayerNorm1P`.
    Nemotron,
    /// `ArceeForCausalLM` (Arcee AFM-4.5B): the Llama block with a non-gated MLP, `relu2` by
    /// default.
    Arcee,
    /// `MiniMaxM2ForCausalLM` (MiniMax-M2, 230B-A10B): Mixtral's sparse block in every layer
    /// with a sigmoid router (plus a correction bias that only picks experts), q/k RMSNorms over
    /// the whole projections (FlexOlmo's attention) and rotary on `partial_rotary_factor` of
    /// each head.
    MinimaxM2,
    /// `Dots1ForCausalLM` (rednote dots.llm1, 142B-A14B): Qwen3's attention (per-head q/k norms,
    /// windows from `max_window_layers` up) over DeepSeek-V3's MoE layers (dense ones below
    /// `first_k_dense_replace`, shared experts, an fp32-operand router).
    Dots1,
    /// `Gemma4ForCausalLM` (Gemma 4's language model, `gemma4_text`): Gemma-3's sandwich-normed
    /// block with five local layers to a global one, the global layers with their own head
    /// width and KV heads and, with `attention_k_eq_v`, keys doubling as values; q, k and v
    /// per-head norms (v's without a scale) and an in-place `layer_scalar`.
    Gemma4,
    /// `ApertusForCausalLM` (Swiss AI Apertus 8B/70B): the Llama block with per-head q/k
    /// RMSNorms and a non-gated MLP whose activation is xIELU.
    Apertus,
    /// `Ernie4_5ForCausalLM` (Baidu ERNIE 4.5 dense): the Llama block with `use_bias` on every
    /// linear and GLM's interleaved rotary computed in fp32 ([`RotaryApply::InterleavedFp32`]).
    Ernie45,
    /// `Ministral3ForCausalLM` (Ministral 3, the language model inside Mistral's `mistral3`
    /// checkpoints): Mistral's block with Llama 4's position-dependent query scaling.
    Ministral3,
    /// `Ernie4_5_MoeForCausalLM` (ERNIE-4.5-21B-A3B, 300B-A47B): ERNIE 4.5's attention with
    /// sparse layers of fused experts and shared experts, routed by an fp32 router.
    Ernie45Moe,
    /// `HunYuanMoEV1ForCausalLM` (Hunyuan-A13B): HunYuan-dense's attention, and in every layer
    /// one shared MLP beside `num_experts` fused experts, all of `intermediate_size`.
    HunyuanMoe,
    /// `Qwen3_5ForCausalLM` (Qwen3.5's language model, `qwen3_5_text`): Gated DeltaNet
    /// linear-attention layers with a full-attention layer every `full_attention_interval`
    /// (3:1 by default), whose attention gates its output with a sigmoid of a second query
    /// half; per-head q/k norms, zero-centred RMSNorms, rotary on a quarter of each head.
    Qwen35,
    /// `Qwen3_5MoeForCausalLM` (`qwen3_5_moe_text`, Qwen3.5-35B-A3B and up): Qwen3.5's layers
    /// with Qwen2-MoE's sparse block in every layer (fused experts, a shared expert scaled by a
    /// sigmoid gate); peft does not move LoRA's FFN names onto its experts.
    Qwen35Moe,
    /// `Qwen3NextForCausalLM` (Qwen3-Next-80B-A3B): Qwen3.5-MoE's layers, its Gated DeltaNet
    /// projecting q, k, v and z in one `in_proj_qkvz` (and b, a in `in_proj_ba`) laid out per
    /// key head; Qwen3-MoE's sparse-layer rules (`decoder_sparse_step`); peft moves LoRA's FFN
    /// names onto its experts.
    Qwen3Next,
    /// `Lfm2ForCausalLM` (Liquid AI LFM2 350M-2.6B): gated short-convolution layers
    /// ([`Mixer::ShortConv`]) with GQA attention layers between them as `layer_types` lists,
    /// per-head q/k RMSNorms, a SwiGLU MLP (`w1`, `w3`, `w2`) in every layer, a tied head.
    Lfm2,
    /// `Lfm2MoeForCausalLM` (LFM2-8B-A1B): LFM2's layers with dense MLPs in the first
    /// `num_dense_layers` and then fused experts behind a sigmoid router; peft's conversion
    /// table has no pattern for it, so LoRA's FFN names reach the dense MLPs only.
    Lfm2Moe,
    /// `Llama4ForCausalLM` (Llama 4's language model, `llama4_text`: Scout 17B-16E, Maverick
    /// 17B-128E): GQA attention with rotary applied as a complex product in fp32, L2-normed q
    /// and k on the rotary layers, every fourth layer without rotary (NoPE) and with Llama 4's
    /// query temperature scaling, the others chunked; sparse layers every
    /// `interleave_moe_layer_step`, whose experts run on every token
    /// ([`Routing::EveryExpert`]) beside a shared expert.
    Llama4,
    /// `Mistral4ForCausalLM`: DeepSeek-V3's latent attention and layers (dense ones below
    /// `first_k_dense_replace`, routed and shared experts) with Llama 4's query scaling in
    /// every layer and a router in the model's dtype; peft's conversion table has no pattern
    /// for it, so LoRA's FFN names reach the dense and shared MLPs only.
    Mistral4,
    /// `MptForCausalLM` (MosaicML MPT-7B/30B, as transformers writes it): ALiBi on eager
    /// scores, one bias-free `Wqkv`, LayerNorms without bias, a 4x GELU MLP, a tied head.
    Mpt,
    /// `BartForConditionalGeneration`: encoder-decoder, post-LayerNorm, learned positions.
    Bart,
    /// `MixtralForCausalLM`: the Mistral block with a sparse mixture-of-experts FFN.
    Mixtral,
    /// `Phi3ForCausalLM`: the Llama block with fused `qkv_proj` and `gate_up_proj`.
    Phi3,
    /// `Qwen3ForCausalLM`: the Llama block with per-head q/k RMSNorm and explicit `head_dim`.
    Qwen3,
    /// `GPTNeoXForCausalLM` (Pythia, GPT-NeoX-20B): parallel attention and MLP, two norms.
    GptNeox,
    /// PaLM (Chowdhery et al. 2022, sec. 2; no transformers class): a parallel attention + FFN
    /// block, SwiGLU, multi-query attention, rotary, shared embeddings, LayerNorm, no biases.
    Palm,
    /// `Gemma2ForCausalLM`: Gemma with sandwich norms, alternating sliding-window and global
    /// layers (1:1) and tanh soft-capping of attention and final logits.
    Gemma2,
    /// `VaultGemmaForCausalLM` (VaultGemma 1B, Google 2025, trained with DP-SGD): Gemma-2 with
    /// only its two pre-norms (`VaultGemmaDecoderLayer` deletes `post_attention_layernorm` and
    /// `post_feedforward_layernorm`): the same alternating windows and soft-capping.
    VaultGemma,
    /// `Gemma3ForCausalLM` (text): Gemma-2's block with per-head q/k norms, five sliding-window
    /// layers to each global one, no soft-capping.
    Gemma3,
    /// `Olmo2ForCausalLM`: RMSNorm on each sub-layer's output (not its input) and on the whole
    /// q and k projections.
    Olmo2,
    /// `NanoChatForCausalLM` (nanochat, Karpathy 2025): the Llama block with weightless RMS
    /// norms (`NanoChatRMSNorm`, Llama 4's `Llama4TextL2Norm`) before each sub-layer, on the
    /// embeddings and at the end (the same module twice), the same norm on q and k per head
    /// after rotary, a non-gated `relu2` MLP (`fc1`, `fc2`), no biases by default, and Gemma-2's
    /// tanh soft-capping of the logits (15 by default).
    NanoChat,
    /// `Exaone4ForCausalLM`: RMSNorm on each sub-layer's output (as OLMo-2), per-head q/k
    /// norms, windowed layers with rotary and global layers without (NoPE) once a window is set.
    Exaone4,
    /// `ExaoneMoeForCausalLM` (K-EXAONE, LG AI Research 2025): EXAONE-4's attention (windows,
    /// per-head q/k norms, NoPE global layers) in OLMoE's pre-norm layer, with DeepSeek-V3's
    /// sparse block (`DeepseekV3MoE`: fp32-operand sigmoid router, shared experts) after
    /// `first_k_dense_replace` (or `mlp_layer_types`') dense layers.
    ExaoneMoe,
    /// `AfmoeForCausalLM` (Arcee's Trinity): Llama's attention with per-head q/k norms, a
    /// sigmoid output gate from its own `gate_proj`, rotary on the windowed layers only (global
    /// NoPE); `GptOssRMSNorm` before and after each sub-layer; dense MLPs below
    /// `num_dense_layers`, then Qwen2-MoE's experts under a sigmoid router with a frozen
    /// per-expert score bias and one ungated shared MLP.
    Afmoe,
    /// `GraniteForCausalLM`: the Llama block with scalar multipliers on the embeddings, each
    /// residual branch and the logits (`embedding_multiplier`, `residual_multiplier`,
    /// `logits_scaling`).
    Granite,
    /// `Starcoder2ForCausalLM`: LayerNorm, biases everywhere, GELU MLP, GQA, sliding window.
    Starcoder2,
    /// `BloomForCausalLM`: ALiBi positions, a LayerNorm after the embeddings, fused biased qkv.
    Bloom,
    /// `Qwen2MoeForCausalLM`: Qwen2 attention, routed experts beside a gated shared expert.
    Qwen2Moe,
    /// `Qwen3MoeForCausalLM`: Qwen3 attention (q/k norms), routed experts.
    Qwen3Moe,
    /// `DeepseekV2ForCausalLM` / `DeepseekV3ForCausalLM`: multi-head latent attention, shared
    /// plus routed experts after the first dense layers.
    Deepseek,
    /// `MiniCPM3ForCausalLM` (MiniCPM3-4B, OpenBMB 2024): DeepSeek-V2's latent attention
    /// (`MiniCPM3Attention` builds `DeepseekV2Attention`'s modules, with Llama's rotary) in
    /// Llama's layer and MLP, and muP-style scalars: token embeddings times `scale_emb`
    /// (`MiniCPM3ScaledWordEmbedding`), each sub-layer's output times `scale_depth /
    /// sqrt(layers)`, and the last hidden state divided by `hidden_size / dim_model_base`
    /// before the LM head.
    MiniCpm3,
    /// `MambaForCausalLM`: selective state-space blocks (Gu & Dao 2023), no attention.
    Mamba,
    /// `Mamba2ForCausalLM` (Dao & Gu 2024, "Transformers are SSMs", Mamba-2 and
    /// Mamba-Codestral): Mamba's block around the state-space-duality mixer ([`Mixer::Ssd`]).
    Mamba2,
    /// `GraniteMoeHybridForCausalLM` (IBM Granite 4.0, `granitemoehybrid`): Granite's block
    /// (its scalar multipliers) whose mixer is Mamba-2's ([`Mixer::Ssd`]) or attention by
    /// `layer_types` (no positions unless `position_embedding_type` is "rope"), and whose FFN
    /// is GraniteMoE's routed experts (top-k of the logits, then a softmax) followed by a
    /// shared MLP (`input_linear`, fused gate and up; `output_linear`) in every layer, or the
    /// shared MLP alone with no experts.
    GraniteMoeHybrid,
    /// `NemotronHForCausalLM` (NVIDIA Nemotron-H, Nemotron Nano 2, Nemotron 3 Nano): a layer
    /// per `layers_block_type` entry, each one sub-layer between an RMSNorm and a residual
    /// add: Mamba-2 ([`Mixer::Ssd`], its gated norm per group), attention without positions,
    /// a non-gated squared-ReLU MLP, or DeepSeek-V3-style routed experts (non-gated, a sigmoid
    /// router) with a shared MLP.
    NemotronH,
    /// `GraniteMoeForCausalLM` and `GraniteMoeSharedForCausalLM` (IBM Granite 3.0/3.1 MoE,
    /// 1B-A400M and 3B-A800M): Granite's multipliers and attention with fused experts in every
    /// layer behind Granite 4.0's router (top-k of the logits, then a softmax over the k), and
    /// with `shared_intermediate_size` a shared MLP added after them.
    GraniteMoe,
    /// `BambaForCausalLM` (IBM Bamba-9B v1/v2): Llama's two-norm blocks with a SwiGLU MLP in
    /// every layer, whose mixer is Granite 4.0's Mamba-2 layer except at `attn_layer_indices`,
    /// where it is GQA attention with rotary on half of each head.
    Bamba,
    /// `FalconMambaForCausalLM` (TII Falcon Mamba 7B): Mamba's blocks and mixer with weightless
    /// RMSNorms on the step size's input and on B and C ([`DtBcNorms::Weightless`]).
    FalconMamba,
    /// `JambaForCausalLM` (AI21 Jamba, Jamba 1.5/1.6/1.7 Mini and Large, Jamba Reasoning 3B):
    /// Llama-like two-norm blocks whose mixer is attention without positions every
    /// `attn_layer_period` layers and a Mamba mixer with weighted dt/B/C RMSNorms
    /// ([`DtBcNorms::Weighted`]) elsewhere, and whose FFN is a SwiGLU MLP or, every
    /// `expert_layer_period` layers, Mixtral-like fused experts behind a softmax router without
    /// renormalisation.
    Jamba,
    /// `FalconH1ForCausalLM` (TII Falcon-H1, 0.5B-34B): in every layer a Mamba-2 mixer and GQA
    /// attention side by side on one RMSNorm's output, their sum added to the residual, then a
    /// SwiGLU MLP; µP multipliers on the embeddings, each branch's input and output, the keys,
    /// the MLP's gate and output, the projections (`mup_vector`) and the logits.
    FalconH1,
    /// `GptOssForCausalLM` (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card"): the Llama
    /// block with biased q/k/v/o, a learned attention sink per head, alternating banded (128)
    /// and dense layers, and routed experts with biases and a clamped SwiGLU. The published
    /// checkpoints store the experts in MXFP4; training dequantizes them to bf16 first
    /// (transformers' `Mxfp4Config(dequantize=True)`), which is what is planned.
    GptOss,
    /// `Glm4MoeForCausalLM` (GLM-4.5, GLM-4.5-Air; Zhipu AI 2025): grouped-query attention with
    /// q/k/v biases, rotary on half of each head, optional per-head q/k norms, dense first
    /// layers, then DeepSeek-V3's routing (sigmoid scores, a shared expert). The checkpoint's
    /// multi-token-prediction layer is not built by transformers and is not counted.
    Glm4Moe,
    /// `SolarOpenForCausalLM` (Solar Open 100B, Upstage 2025): GLM-4.5's sparse block
    /// (`Glm4MoeMoE`: routed experts behind the fp32-operand sigmoid router, a shared expert) in
    /// every layer (`SolarOpenConfig` removes `first_k_dense_replace` and `use_qk_norm`), under
    /// Llama's attention and rotary over the whole head, with `attention_bias` on q, k and v.
    SolarOpen,
    /// `Glm4ForCausalLM` (GLM-4-0414): the Llama block with sandwich norms (after attention and
    /// after the MLP too), q/k/v biases, rotary on half of each head and a fused `gate_up_proj`.
    Glm4,
    /// `GlmForCausalLM` (GLM-4-9B-Chat, `glm-4-9b-chat-hf`; Zhipu AI 2024): GLM-4-0414's block
    /// without its two output norms (`GlmDecoderLayer` has only `input_layernorm` and
    /// `post_attention_layernorm`, the MLP's input norm); the rest is the same modules.
    Glm,
    /// `Jais2ForCausalLM` (Jais 2, Inception and MBZUAI 2025): the Llama block with
    /// `nn.LayerNorm`s (weight and bias) and a non-gated MLP (`down_proj(act(up_proj(x)))`,
    /// `relu2` by default, as Nemotron's), with `attention_bias` on q, k, v and o and `mlp_bias`
    /// on both MLP linears, each true by default (`Jais2Config`).
    Jais2,
    /// `SeedOssForCausalLM` (Seed-OSS-36B): the Llama block with q/k/v biases
    /// (`attention_bias`), an optional o bias (`attention_out_bias`), and dropout on the
    /// attention and MLP outputs (`residual_dropout`, 0.1 by default) and in attention.
    SeedOss,
    /// `HunYuanDenseV1ForCausalLM`: the Llama block with per-head q/k RMSNorms after rotary.
    HunyuanDense,
    /// `HeliumForCausalLM` (Kyutai): the Llama block whose RMSNorm multiplies by its weight in
    /// fp32 before casting back (OLMo-2's order); q/k/v biases only.
    Helium,
    /// `OlmoeForCausalLM` (OLMoE, Muennighoff et al. 2024): pre-norm, RMSNorm over the whole q
    /// and k projections (OLMo-2's), routed experts without a shared one.
    Olmoe,
    /// `FlexOlmoForCausalLM` (FlexOlmo, Shi et al. 2025): OLMoE's sparse block under OLMo-2's
    /// attention and norms (`FlexOlmoDecoderLayer` deletes `input_layernorm` and norms each
    /// sub-layer's output with `Olmo2RMSNorm`); no `clip_qkv`.
    FlexOlmo,
    /// `CohereForCausalLM` (Command R): one LayerNorm (no bias) feeding attention and the MLP
    /// in parallel, rotary, tied embeddings, logits times `logit_scale`.
    Cohere,
    /// `Cohere2ForCausalLM` (Command R7B, Command A): Cohere's block with three windowed layers
    /// (rotary) to one global layer (no positions).
    Cohere2,
    /// `Cohere2MoeForCausalLM` (Command A+, North): Cohere2's parallel block (RMSNorm where
    /// `rms_norm_eps` is set, Cohere's LayerNorm otherwise) with dense MLPs in the prefix layers
    /// (`mlp_layer_types`), Mixtral's experts elsewhere under a router that takes top-k of the
    /// logits before its softmax or sigmoid, and shared experts summed or averaged in; rotary
    /// on the windowed layers and on the dense prefix's when its window pattern is 1.
    Cohere2Moe,
    /// `CwmForCausalLM` (Meta's Code World Model, CWM 32B): Llama's block with bias-free
    /// projections and a sliding window on the layers `layer_types` names (without it, three
    /// windowed layers after each global one, starting with a global layer 0).
    Cwm,
    /// `HyperCLOVAXForCausalLM` (NAVER HyperCLOVA X SEED Think 14B): Granite's block and µP
    /// multipliers, with Peri-LN's RMSNorm on each sub-layer's output as well as its input
    /// (`use_post_norm`), and logits multiplied (not divided) by `logits_scaling`.
    HyperClovaX,
    /// `YoutuForCausalLM` (Tencent Youtu-LLM 2B): DeepSeek-V3's latent attention in Llama's
    /// layer with Qwen3's dense MLP in every layer; no experts.
    Youtu,
    /// `AXK1ForCausalLM` (SK Telecom A.X K1): DeepSeek-V3 with an RMSNorm on the sparse block's
    /// output (`post_mlp_layernorm`, after the shared experts are added); peft 0.21 does not
    /// move LoRA's FFN names onto its experts.
    Axk1,
    /// `MellumForCausalLM` (JetBrains Mellum 2): Qwen3-MoE's attention (per-head q/k norms)
    /// windowed on the layers `layer_types` names, with a rotary table pair per layer type;
    /// Qwen3-MoE's routed experts (no shared expert) on the layers `mlp_layer_types` calls
    /// sparse (all of them by default), dense MLPs elsewhere.
    Mellum,
    /// `HYV3ForCausalLM` (Tencent Hy3): Apertus's attention (per-head q/k norms) in Llama's
    /// layer, dense MLPs by `mlp_layer_types` (the first layer by default), and elsewhere
    /// routed experts under an fp32 sigmoid router with a score-correction buffer, plus shared
    /// experts added to them in fp32 (`enable_moe_fp32_combine`); peft 0.21 does not move
    /// LoRA's FFN names onto its experts.
    HyV3,
}

impl Family {
    /// The MLP module ends in its own `nn.Dropout` (GPT-2's block and the GPT-Neo/GPT-J
    /// modules modelled on it), so a hook on the module's output (an adapter) comes after it.
    pub fn dropout_in_mlp(self) -> bool {
        matches!(
            self,
            Family::Gpt2 | Family::GptBigcode | Family::GptNeo | Family::Gptj | Family::Codegen
        )
    }

    /// Where its attention's q/k norms and rotary run among the projections, in the order its
    /// forward builds them (transformers 5.17). The engine runs backward in reverse creation
    /// order, so this decides which gradients wait beside which ops (`Builder::await_grads`).
    pub fn qk_order(self) -> QkOrder {
        match self {
            // `q_norm(q_proj(x))`, `k_norm(k_proj(x))`, `v_proj(x)`, then rotary.
            Family::Qwen3
            | Family::Qwen3Moe
            | Family::Mellum
            | Family::Qwen35
            | Family::Qwen35Moe
            | Family::Qwen3Next
            | Family::Dots1
            | Family::Lfm2
            | Family::Lfm2Moe
            | Family::Olmo2
            | Family::Olmoe
            | Family::FlexOlmo
            | Family::MinimaxM2 => QkOrder::NormedAsProjected,
            // Gemma4TextAttention: q's projection, norm and rotary, then k's, then v's norm.
            Family::Gemma4 => QkOrder::EachRotatedAsProjected,
            // HunYuan: `query_layernorm` and `key_layernorm` on the rotated q and k.
            Family::HunyuanDense | Family::HunyuanMoe => QkOrder::NormsAfterRotary,
            _ => QkOrder::ProjectionsFirst,
        }
    }

    /// Its attention stores the keys and values of the last layer of each attention type (before
    /// any KV-sharing layers) in the `shared_kv_states` dict the model's forward hands every
    /// layer (`store_full_length_kv`, transformers 5.17 Gemma 4), whether or not any layer shares
    /// them.
    pub fn stores_full_length_kv(self) -> bool {
        self == Family::Gemma4
    }

    /// Its `apply_rotary_pos_emb` (or attention) rebuilds q and k as `torch.cat([rotated,
    /// pass], dim=-1)` whatever the rotary fraction, the pass-through part empty when it is 1
    /// (transformers 5.17: Phi-3, GPT-NeoX, GLM-4, GLM-4.5, Nemotron, MiniMax-M2, Qwen3.5,
    /// Qwen3-Next, and Phi and StableLM in their attention). `cat` writes a new tensor in the
    /// default (contiguous) format (`compute_output_memory_format` in aten's `TensorShape.cpp`),
    /// so q arrives at the attention head-major, as under partial rotary. Llama's form, `q * cos
    /// + rotate_half(q) * sin`, keeps q's token-major layout instead.
    pub fn rotary_concatenates(self) -> bool {
        matches!(
            self,
            Family::Phi
                | Family::Phi3
                | Family::GptNeox
                | Family::Glm4
                | Family::Glm
                | Family::Glm4Moe
                | Family::StableLm
                | Family::Nemotron
                | Family::MinimaxM2
                | Family::Qwen35
                | Family::Qwen35Moe
                | Family::Qwen3Next
                | Family::Bamba
        )
    }

    /// The dtype of the rotary tables q and k are multiplied by, given the embeddings' and the
    /// keys'. Llama's rotary embedding returns cos and sin in the embeddings' dtype
    /// (`cos.to(dtype=x.dtype)`); GPT-J and CodeGen index a per-layer fp32 buffer
    /// (`embed_positions`, built by `create_sinusoidal_positions` with `.float()`, and left fp32
    /// by loading in bf16): GPT-J casts the rows to the keys' dtype (`sincos.to(key.dtype)`),
    /// CodeGen multiplies by them as they are, so its rotated parts are fp32.
    pub fn rotary_table_dtype(
        self,
        embeddings: crate::units::DType,
        keys: crate::units::DType,
    ) -> crate::units::DType {
        match self {
            Family::Gptj => keys,
            Family::Codegen => crate::units::DType::F32,
            _ => embeddings,
        }
    }

    /// A parallel block with two norms computes both before its attention (Falcon's new decoder:
    /// `attention_layernorm_out = self.ln_attn(...)`, `mlp_layernorm_out = self.ln_mlp(...)`);
    /// GPT-NeoX normalises for the MLP after the attention returns.
    pub fn norms_both_before_attention(self) -> bool {
        matches!(self, Family::Falcon)
    }

    /// The attention's own forward splits partial rotary into locals and keeps them to its end
    /// (transformers 5.17, GPT-J and CodeGen: `q_rot = query[:, :, :, : self.rotary_dim]`,
    /// `q_pass = query[:, :, :, self.rotary_dim :]`, `q_rot = apply_rotary_pos_emb(q_rot, ...)`,
    /// `query = torch.cat([q_rot, q_pass], dim=-1)`, the same for the keys); the other families
    /// split inside `apply_rotary_pos_emb`, whose locals go when it returns.
    pub fn rotary_split_in_attention(self) -> bool {
        matches!(self, Family::Gptj | Family::Codegen)
    }

    /// The attention calls `F.scaled_dot_product_attention` itself, with its keys and values
    /// at their own head count and no `enable_gqa` (transformers 5.17's `FalconAttention`;
    /// the other families go through `sdpa_attention_forward`, which passes `enable_gqa` or
    /// repeats the keys first). For dense inputs every fused kernel then requires q, k and v
    /// to have the same number of heads (`check_batch_size_and_num_heads_dense`, aten's
    /// `sdp_utils_cpp.h`), so grouped keys (Falcon-7B's one) send SDPA to its math path.
    pub fn sdpa_without_gqa(self) -> bool {
        matches!(self, Family::Falcon)
    }

    /// The attention's output projection is the module named `out_proj` (transformers 5.17:
    /// BART and its kin, OPT, GPT-Neo, GPT-J, CodeGen, MPT, LFM2), which peft's `out_proj`
    /// targets; elsewhere it is `o_proj`, `o`, `dense` or `c_proj`, and `out_proj` names no
    /// attention module.
    pub fn attention_out_proj(self) -> bool {
        matches!(
            self,
            Family::Bart
                | Family::Mbart
                | Family::Marian
                | Family::Pegasus
                | Family::Opt
                | Family::GptNeo
                | Family::Gptj
                | Family::Codegen
                | Family::Mpt
                | Family::Lfm2
                | Family::Lfm2Moe
        )
    }

    /// The eager attention keeps its unmasked scores referenced while softmax runs on their
    /// masked sum (transformers 5.17: Falcon's `F.softmax(attention_scores + attention_mask,
    /// ...)`, BLOOM's `attention_scores` local beside `attn_weights = attn_weights +
    /// attention_mask`); the other families rebind one name, and the unmasked scores go.
    pub fn eager_scores_held_through_softmax(self) -> bool {
        matches!(self, Family::Falcon | Family::Bloom)
    }

    /// The eager attention's softmax runs in the scores' own dtype (`softmax(attn_weights,
    /// dim=-1)` in transformers 5.17's `eager_attention_forward` for GPT-2, T5, mT5, the BART
    /// family and Llama 4's text model), or in the block input's (Falcon's
    /// `softmax(scores + mask, dtype=hidden_states.dtype)`, `hidden_states` being the
    /// LayerNorm's output), where the other families ask for `dtype=torch.float32` and cast
    /// back. Under autocast all are fp32 (softmax is on autocast's fp32 list, and autocast's
    /// LayerNorm returns fp32); without it (pure bf16, FSDP's and DeepSpeed's bf16 modules) these
    /// keep bf16 probabilities and no cast copy.
    pub fn eager_softmax_in_input_dtype(self) -> bool {
        matches!(
            self,
            Family::Gpt2
                | Family::T5
                | Family::Mt5
                | Family::Bart
                | Family::Mbart
                | Family::Marian
                | Family::Pegasus
                | Family::Falcon
                | Family::Llama4
        )
    }

    /// Qwen3.5's and Qwen3-Next's layers: Gated DeltaNet beside gated attention.
    pub fn gated_delta_net(self) -> bool {
        matches!(self, Family::Qwen35 | Family::Qwen35Moe | Family::Qwen3Next)
    }

    /// The MoE router is an `nn.Linear` subclass whose forward returns a tuple (PhiMoE's
    /// `PhimoeTopKRouter`, Llama 4's `Llama4Router`): peft's `all-linear` wraps it and fails.
    pub fn router_returns_tuple(self) -> bool {
        matches!(self, Family::Phimoe | Family::Llama4)
    }

    /// The MoE router projects through a plain `nn.Linear` (Jamba's `router`, Gemma 4's
    /// `router.proj`, HunYuan-MoE's fp32 `wg`), which `all-linear` wraps although peft leaves
    /// the 3-D experts alone, and which bitsandbytes quantizes under QLoRA. The other routers
    /// are `nn.Parameter`s of their own modules (`*TopKRouter`) or `nn.Linear` subclasses
    /// (PhiMoE's, Llama 4's), neither of which it swaps (transformers 5.17).
    pub fn router_is_linear(self) -> bool {
        matches!(
            self,
            Family::Jamba | Family::Gemma4 | Family::HunyuanMoe | Family::Afmoe
        )
    }

    /// Whether the family's config has `num_key_value_heads`, which peft's prefix tuning
    /// sizes its keys and values by (the others' configs name their heads otherwise: GPT-2's
    /// `n_head`, Falcon's `num_kv_heads`, T5's `num_heads`, ...).
    pub fn config_names_kv_heads(self) -> bool {
        !matches!(
            self,
            Family::Gpt2
                | Family::Opt
                | Family::Bloom
                | Family::Falcon
                | Family::T5
                | Family::Mt5
                | Family::Bart
                | Family::Mbart
                | Family::Marian
                | Family::Pegasus
                | Family::GptNeo
                | Family::Gptj
                | Family::Codegen
                | Family::Mpt
                | Family::GptNeox
                | Family::Palm
                | Family::Mamba
                | Family::Mamba2
                | Family::FalconMamba
        )
    }

    /// Whether peft finds the attention heads in the family's config (`num_attention_heads`,
    /// `n_head`, `num_heads` or `encoder_attention_heads`), which prefix and prompt tuning
    /// read even where they do not use them. MPT's says `n_heads`, Mamba's and Falcon Mamba's
    /// have none: peft raises "Please specify `num_attention_heads` in `peft_config`" until the
    /// user passes it.
    pub fn config_names_attention_heads(self) -> bool {
        !matches!(self, Family::Mpt | Family::Mamba | Family::FalconMamba)
    }

    /// Whether bitsandbytes swaps a linear layer with this target role for a 4-bit
    /// `Linear4bit` when transformers 5.17 loads the model for QLoRA. `replace_with_bnb_linear`
    /// swaps a module only when `type(module) is nn.Linear` (or `Conv1D`), and
    /// `get_modules_to_not_convert` adds the model's `_keep_in_fp32_modules` to the output
    /// embedding it skips. So Falcon's `FalconLinear`, an `nn.Linear` subclass, is never
    /// swapped: a Falcon loaded in 4 bits has no 4-bit layer. T5 and mT5 keep `wo`
    /// (`_keep_in_fp32_modules = ["wo"]`, since their FFN casts its input to `wo`'s dtype).
    /// Checked by loading toy Falcon and T5 models with bitsandbytes 0.50.2 on CPU. What is not
    /// swapped stays 16-bit, and peft's `prepare_model_for_kbit_training` upcasts it to fp32.
    pub fn bnb_swaps(self, proj: Option<crate::spec::plan::Proj>) -> bool {
        match self {
            Family::Falcon => false,
            f if f.is_t5() => proj != Some(crate::spec::plan::Proj::Down),
            _ => true,
        }
    }

    /// LFM2's layers (dense and MoE): short convolutions beside attention, LFM2's config keys.
    pub fn is_lfm2(self) -> bool {
        matches!(self, Family::Lfm2 | Family::Lfm2Moe)
    }

    /// T5's block and stacks (T5 itself and mT5, whose modules are copies of T5's).
    pub fn is_t5(self) -> bool {
        matches!(self, Family::T5 | Family::Mt5)
    }

    /// transformers' `model_type` names; a later name for the same family reads the same way
    /// (OLMo-3 is OLMo-2 with `layer_types` windows, Ministral is Mistral with them, SmolLM3 is
    /// Llama with NoPE layers, DeepSeek-V3 is V2's layout, GLM-4.7-Flash's `glm4_moe_lite` is
    /// DeepSeek-V3's attention with GLM-4.5's MoE, which is DeepSeek's); the first name is the
    /// family's own.
    pub const ALL: [(&'static str, Family); 96] = [
        ("llama", Family::Llama),
        ("mistral", Family::Mistral),
        ("qwen2", Family::Qwen2),
        ("gemma", Family::Gemma),
        ("gpt2", Family::Gpt2),
        ("opt", Family::Opt),
        ("phi", Family::Phi),
        ("falcon", Family::Falcon),
        ("t5", Family::T5),
        ("bart", Family::Bart),
        ("palm", Family::Palm),
        ("mixtral", Family::Mixtral),
        ("phi3", Family::Phi3),
        ("qwen3", Family::Qwen3),
        ("gpt_neox", Family::GptNeox),
        ("gemma2", Family::Gemma2),
        ("gemma3_text", Family::Gemma3),
        ("vaultgemma", Family::VaultGemma),
        ("olmo2", Family::Olmo2),
        ("nanochat", Family::NanoChat),
        ("starcoder2", Family::Starcoder2),
        ("bloom", Family::Bloom),
        ("qwen2_moe", Family::Qwen2Moe),
        ("qwen3_moe", Family::Qwen3Moe),
        ("deepseek_v2", Family::Deepseek),
        ("deepseek_v3", Family::Deepseek),
        ("minicpm3", Family::MiniCpm3),
        ("mamba", Family::Mamba),
        ("granite", Family::Granite),
        ("smollm3", Family::Llama),
        ("exaone4", Family::Exaone4),
        ("exaone_moe", Family::ExaoneMoe),
        ("afmoe", Family::Afmoe),
        ("olmo3", Family::Olmo2),
        ("ministral", Family::Mistral),
        ("gpt_oss", Family::GptOss),
        ("glm4_moe", Family::Glm4Moe),
        ("solar_open", Family::SolarOpen),
        ("glm4", Family::Glm4),
        ("glm", Family::Glm),
        ("jais2", Family::Jais2),
        ("seed_oss", Family::SeedOss),
        ("hunyuan_v1_dense", Family::HunyuanDense),
        ("helium", Family::Helium),
        ("olmoe", Family::Olmoe),
        ("flex_olmo", Family::FlexOlmo),
        ("cohere", Family::Cohere),
        ("cohere2", Family::Cohere2),
        ("cohere2_moe", Family::Cohere2Moe),
        ("cwm", Family::Cwm),
        ("hyperclovax", Family::HyperClovaX),
        ("youtu", Family::Youtu),
        ("axk1", Family::Axk1),
        ("mellum", Family::Mellum),
        ("hy_v3", Family::HyV3),
        ("mt5", Family::Mt5),
        ("stablelm", Family::StableLm),
        ("mbart", Family::Mbart),
        ("gpt_bigcode", Family::GptBigcode),
        ("olmo", Family::Olmo),
        ("gpt_neo", Family::GptNeo),
        ("gptj", Family::Gptj),
        ("marian", Family::Marian),
        ("pegasus", Family::Pegasus),
        ("codegen", Family::Codegen),
        ("mpt", Family::Mpt),
        ("phimoe", Family::Phimoe),
        ("nemotron", Family::Nemotron),
        ("arcee", Family::Arcee),
        ("ernie4_5", Family::Ernie45),
        ("ministral3", Family::Ministral3),
        ("ernie4_5_moe", Family::Ernie45Moe),
        ("hunyuan_v1_moe", Family::HunyuanMoe),
        ("glm4_moe_lite", Family::Deepseek),
        ("deepseek_v32", Family::Deepseek),
        ("glm_moe_dsa", Family::Deepseek),
        ("qwen3_5_text", Family::Qwen35),
        ("qwen3_5_moe_text", Family::Qwen35Moe),
        ("qwen3_next", Family::Qwen3Next),
        ("apertus", Family::Apertus),
        ("minimax_m2", Family::MinimaxM2),
        ("dots1", Family::Dots1),
        ("gemma4_text", Family::Gemma4),
        ("lfm2", Family::Lfm2),
        ("lfm2_moe", Family::Lfm2Moe),
        ("llama4_text", Family::Llama4),
        ("mistral4", Family::Mistral4),
        ("mamba2", Family::Mamba2),
        ("granitemoehybrid", Family::GraniteMoeHybrid),
        ("nemotron_h", Family::NemotronH),
        ("falcon_h1", Family::FalconH1),
        ("falcon_mamba", Family::FalconMamba),
        ("jamba", Family::Jamba),
        ("bamba", Family::Bamba),
        ("granitemoe", Family::GraniteMoe),
        ("granitemoeshared", Family::GraniteMoe),
    ];

    pub fn model_type(self) -> &'static str {
        super::name_in(&Family::ALL, self).unwrap_or("llama")
    }

    /// Qwen's sparse MoE blocks (`Qwen2MoeSparseMoeBlock`, Qwen3-Next's and Qwen3.5-MoE's)
    /// call `self.shared_expert(...)` before the router and the routed experts, and gate it
    /// after them; HunYuan-MoE's (`HunYuanMoEV1Moe`) calls `self.shared_mlp` first too, with no
    /// gate; DeepSeek's, GLM's and Llama 4's call their shared experts after the routed ones
    /// (transformers 5.17).
    pub fn shared_expert_first(self) -> bool {
        matches!(
            self,
            Family::Qwen2Moe | Family::Qwen3Next | Family::Qwen35Moe | Family::HunyuanMoe
        )
    }

    /// Whether peft 0.21 moves LoRA's FFN target names onto transformers 5's fused experts
    /// (`convert_peft_config_for_transformers`): for the model types its
    /// `_MODEL_TO_CONVERSION_PATTERN` maps (transformers' v4-to-v5 conversion table plus
    /// Mixtral), `gate_proj`/`up_proj`/`down_proj` (Mixtral's `w1`/`w3`/`w2`) become the
    /// experts' `gate_up_proj`/`down_proj` parameters and `all-linear` adds the router's
    /// weight; the names leave `target_modules`, so dense FFNs sharing them (DeepSeek's first
    /// layers and shared experts) are no longer adapted. Qwen2-MoE is not in that table (it is
    /// a pattern key itself) and GPT-OSS had 3-D experts before v5: there, LoRA reaches only
    /// `nn.Linear` modules, never the experts. Checked by counting what peft wraps on each
    /// shipped MoE model.
    pub fn peft_converts_experts(self) -> bool {
        matches!(
            self,
            Family::Mixtral
                | Family::MinimaxM2
                | Family::Dots1
                | Family::Qwen3Moe
                | Family::Mellum
                | Family::Deepseek
                | Family::Glm4Moe
                | Family::SolarOpen
                | Family::ExaoneMoe
                | Family::Afmoe
                | Family::Cohere2Moe
                | Family::Olmoe
                | Family::FlexOlmo
                | Family::Ernie45Moe
                | Family::HunyuanMoe
                | Family::Qwen3Next
        )
    }
}

/// Element-wise activation of the feed-forward network, as the framework implements it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `F.silu` (one kernel; saves its input).
    Silu,
    /// `F.gelu` exact or `approximate="tanh"` (one kernel; saves its input).
    Gelu,
    /// transformers' `NewGELUActivation` (`gelu_new`): a chain of Python element-wise ops, each
    /// saving its own operands, with `pow` autocast to fp32. `gelu_accurate`
    /// (`AccurateGELUActivation`) and `gelu_python_tanh` (`GELUTanh(use_gelu_tanh_python=True)`)
    /// are the same chain of ops.
    GeluNewPython,
    /// transformers' `FastGELUActivation` (`gelu_fast`, GPT-NeoX-20B): `0.5 * x * (1.0 +
    /// tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))`, nine Python element-wise ops in x's
    /// dtype (none is on autocast's lists, and Python floats do not promote); the two
    /// products of tensors and the last keep both operands and `tanh` its output, so seven
    /// tensors of x's size are kept where `F.gelu` keeps one.
    GeluFastPython,
    /// transformers' `GELUActivation(use_gelu_python=True)` (`gelu_python`): `x * 0.5 * (1.0 +
    /// erf(x / sqrt(2)))`; `erf` keeps its input and the product both operands.
    GeluErfPython,
    /// transformers' `QuickGELUActivation` (`quick_gelu`, CLIP's): `x * sigmoid(1.702 * x)`;
    /// `sigmoid` keeps its output and the product both operands.
    QuickGelu,
    /// `F.relu` (saves its output).
    Relu,
    /// transformers' `ReLUSquaredActivation` (`relu2`; So et al. 2021, "Primer"): `relu`, then
    /// `torch.square`, which autocast runs as fp32 `pow`.
    Relu2,
    /// transformers' `XIELUActivation` (Huang 2024, "Deriving Activation Functions Using
    /// Integration", arXiv:2411.13010) in its Python form (the fused CUDA one is an optional
    /// wheel): two learnable scalars per layer and a chain of element-wise ops, each keeping
    /// its own operands.
    Xielu,
}

/// Normalisation layer implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// `nn.LayerNorm` (autocast runs it in fp32; saves its input, mean and rstd).
    LayerNorm,
    /// `nn.LayerNorm(bias=False)`: the same op with a scale only (PaLM).
    LayerNormWithoutBias,
    /// `NemotronLayerNorm1P`: `F.layer_norm` with `weight + 1`, its arguments cast to
    /// autocast's dtype by the module itself and run with autocast off (half precision under
    /// mixed precision, where `nn.LayerNorm` runs in fp32).
    LayerNorm1P,
    /// `LlamaRMSNorm`: upcast to fp32, normalise, cast back, multiply by the weight.
    RmsNorm,
    /// `GemmaRMSNorm`: fp32 throughout, `* (1 + weight)`, cast back.
    GemmaRmsNorm,
    /// `Olmo2RMSNorm`: fp32 throughout, `weight *` the fp32 normalised input, cast back (the
    /// weight multiply keeps the fp32 copy, as Gemma's does).
    Olmo2RmsNorm,
    /// `T5LayerNorm`: fp32 variance, input times rsqrt, cast to the weight dtype.
    T5RmsNorm,
    /// `CohereLayerNorm`: a LayerNorm written op by op, without a bias, fp32 throughout:
    /// the centred fp32 input kept as Olmo2RMSNorm keeps its fp32 input, the weight multiply
    /// in fp32, then the cast back.
    CohereLayerNorm,
    /// `OlmoLayerNorm` (OLMo 1): `F.layer_norm` of the fp32 upcast with no weight and no bias,
    /// cast back to the input's dtype. Nothing to train.
    OlmoLayerNorm,
    /// `Llama4TextL2Norm` (nanochat's `NanoChatRMSNorm`): `x.float() * rsqrt(mean(x^2) + eps)`,
    /// cast back with `type_as(x)`; no weight. Nothing to train.
    UnscaledRmsNorm,
}

/// How token positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Positions {
    /// Rotary embeddings on the first `fraction` of each head's dimensions.
    Rotary { fraction: f64 },
    /// A learned table of `rows` positions (`offset` extra rows, as OPT and BART keep 2).
    Learned { rows: u64 },
    /// A fixed sinusoidal table of `rows` positions (Vaswani et al. 2017, sec. 3.5) stored as an
    /// `nn.Embedding` weight the model freezes (`_freeze=True`, `requires_grad=False`: Marian,
    /// Pegasus): a parameter in each stack, counted with the weights, never trained, looked up
    /// under `no_grad`.
    Sinusoidal { rows: u64 },
    /// T5's learned relative-position bias: `buckets` x heads in the first layer of each stack.
    RelativeBias { buckets: u64 },
    /// ALiBi (Press et al. 2022): a fixed per-head linear bias on the scores, no parameters.
    Alibi,
    /// None (a recurrent mixer orders the tokens itself).
    None,
}

impl Positions {
    /// The rows of a position table (learned or fixed): a longer sequence indexes past it.
    pub fn table_rows(self) -> Option<u64> {
        match self {
            Positions::Learned { rows } | Positions::Sinusoidal { rows } => Some(rows),
            _ => None,
        }
    }
}

/// What mixes information across positions in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Mixer {
    /// Softmax attention over every key (causal in a decoder).
    Attention,
    /// Each query sees only the `window` most recent keys (sliding-window / locally banded
    /// attention: Mistral, Gemma-2/3 local layers, GPT-3's banded layers, Starcoder2).
    SlidingWindow { window: u64 },
    /// Mamba's selective state-space scan (Gu & Dao 2023): a recurrent state of
    /// `inner x state` per sequence, constant in its length.
    Ssm(Ssm),
    /// Gated DeltaNet linear attention (Yang et al. 2025, "Gated Delta Networks: Improving
    /// Mamba2 with Delta Rule"): a `key_dim x value_dim` state per value head, updated by the
    /// gated delta rule and read by each query (Qwen3.5's and Qwen3-Next's linear layers).
    GatedDeltaNet(DeltaNet),
    /// LFM2's gated short convolution (Liquid AI 2025): `C * conv(B * x)` over B, C and x
    /// projected from the input, a causal depthwise filter of a few taps, no state beyond them.
    ShortConv(ShortConv),
    /// Mamba-2's state-space-duality mixer (Dao & Gu 2024, "Transformers are SSMs: Generalized
    /// Models and Efficient Algorithms Through Structured State Space Duality"): a scalar decay
    /// per head, B and C shared by groups of heads, computed chunk by chunk as a masked
    /// attention-like product within chunks and a recurrence over chunk states between them.
    Ssd(Ssd),
    /// No token mixer: the layer is its FFN alone (Nemotron-H's MLP and MoE layers).
    None,
}

/// Mamba-2's mixer sizes (`Mamba2Config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Ssd {
    /// `num_heads`.
    pub heads: u64,
    /// `head_dim`: heads x head_dim is the inner width (`expand x hidden_size`).
    pub head_dim: u64,
    /// `state_size` (N).
    pub state: u64,
    /// `n_groups`: B and C are `n_groups x state` wide, each group shared by its heads.
    pub groups: u64,
    /// `conv_kernel`.
    pub conv: u64,
    /// `chunk_size`: the sequence is padded to whole chunks.
    pub chunk: u64,
    /// `use_bias` (on `in_proj` and `out_proj`) and `use_conv_bias`.
    pub bias: bool,
    pub conv_bias: bool,
    /// The gated norm's groups: 1 where it normalises the whole inner width
    /// (`MambaRMSNormGated`), `n_groups` where each group of `inner / n_groups` channels is
    /// normalised on its own (Nemotron-H's `Zamba2RMSNormGated` with `group_size`).
    pub norm_groups: u64,
    /// How the scan's output meets the gate z.
    pub gated_norm: GatedNorm,
    /// `out_proj`'s bias where it differs from `in_proj`'s (Falcon-H1's `projectors_bias`).
    pub out_bias: bool,
    /// Falcon-H1's µP: the input scaled by `ssm_in_multiplier` before `in_proj`, and the
    /// projection times a per-channel buffer (`mup_vector`, in the model's dtype: over fp32
    /// weights it promotes the 16-bit projection to fp32).
    pub mup: bool,
}

/// How a Mamba-2 mixer gates and normalises the scan's output y with z.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GatedNorm {
    /// `MambaRMSNormGated` / `Zamba2RMSNormGated` (and `FalconH1RMSNormGated` without
    /// `norm_before_gate`, the same ops on the fp32 scan output): y times silu(z) in fp32,
    /// normalised, cast back to y's dtype, times the weight.
    GateThenNorm,
    /// `FalconH1RMSNormGated` with `norm_before_gate`: y in fp32 normalised and times the
    /// weight in fp32, then times silu(z) in fp32, cast back.
    NormThenGate,
    /// No norm (Falcon-H1's `mamba_rms_norm` false): `y * silu(z)`.
    GateOnly,
}

impl Ssd {
    /// `expand x hidden_size`, the width of x, z and the scan's output.
    pub fn inner(&self) -> u64 {
        self.heads * self.head_dim
    }

    /// The convolution's channels: x, B and C.
    pub fn conv_dim(&self) -> u64 {
        self.inner() + 2 * self.groups * self.state
    }
}

/// LFM2's short-convolution mixer (`Lfm2ShortConv`), hidden-size wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct ShortConv {
    /// `conv_L_cache`: the filter's taps.
    pub taps: u64,
    /// `conv_bias`: biases on `in_proj`, the filter and `out_proj`.
    pub bias: bool,
}

/// Gated DeltaNet's sizes (`linear_*` keys of Qwen3.5's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct DeltaNet {
    /// `linear_num_key_heads`: query and key heads (repeated to the value heads' count).
    pub key_heads: u64,
    /// `linear_num_value_heads`.
    pub value_heads: u64,
    /// `linear_key_head_dim`.
    pub key_dim: u64,
    /// `linear_value_head_dim`.
    pub value_dim: u64,
    /// `linear_conv_kernel_dim`: the causal depthwise convolution over q, k and v.
    pub conv: u64,
    /// Qwen3-Next's `in_proj_qkvz` and `in_proj_ba`: one projection for q, k, v and z and one
    /// for b and a, interleaved per key head, whose parts are copied out and concatenated
    /// again (Qwen3.5 has four projections).
    pub fused: bool,
}

impl DeltaNet {
    /// Query plus key width (`2 x key_heads x key_dim`) and value width.
    pub fn widths(self) -> (u64, u64) {
        (
            2 * self.key_heads * self.key_dim,
            self.value_heads * self.value_dim,
        )
    }
}

/// Mamba's mixer sizes (`MambaConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Ssm {
    /// `expand x hidden_size`.
    pub inner: u64,
    /// `state_size` (N).
    pub state: u64,
    /// `conv_kernel`.
    pub conv: u64,
    /// `time_step_rank` (ceil(hidden / 16) by default).
    pub dt_rank: u64,
    /// RMSNorms on the step size's low-rank input and on B and C after `x_proj`.
    pub dt_bc_norms: DtBcNorms,
}

/// The norms some Mamba variants put on `x_proj`'s three outputs (dt, B and C) before the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DtBcNorms {
    /// None (Mamba).
    None,
    /// `FalconMambaWeightlessRMSNorm`: `x.float() * rsqrt(mean(x^2) + eps)`, cast back with
    /// `type_as`; no parameters (Falcon Mamba).
    Weightless,
    /// `JambaRMSNorm` (Llama's RMSNorm, a weight each): Jamba's `dt_layernorm`,
    /// `b_layernorm` and `c_layernorm`.
    Weighted,
}

/// Gemma 4's per-layer embeddings (PLE): `width` channels per layer from a table of `vocab`
/// rows of `layers x width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct PerLayerInput {
    pub width: u64,
    pub vocab: u64,
}

/// The attention geometry of a model's global layers where it differs from its local ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct GlobalAttention {
    pub head_dim: u64,
    pub kv_heads: u64,
    /// No `v_proj`: the key projection's output is the values too (before the key norm and
    /// rotary, which apply to the keys only).
    pub keys_as_values: bool,
}

/// The FFN of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FfnKind {
    Dense,
    /// The model's mixture-of-experts FFN.
    Moe,
    /// No FFN (Mamba's block is norm, mixer, residual).
    None,
}

impl BlockKind {
    /// A block of one sub-layer, a mixer or an FFN: norm, sub-layer, residual (Mamba's blocks,
    /// Nemotron-H's layers).
    pub fn single(self) -> bool {
        self.ffn == FfnKind::None || self.mixer == Mixer::None
    }
}

/// What one block is made of; blocks of one kind are built once and repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct BlockKind {
    pub mixer: Mixer,
    pub ffn: FfnKind,
    /// Whether its attention applies rotary positions (SmolLM3's NoPE layers do not).
    pub rope: bool,
    /// Whether its attention reads the keys and values of an earlier layer of its type
    /// (Gemma 4's last `num_kv_shared_layers`): no key or value projections of its own.
    pub kv_shared: bool,
    /// Whether its sparse attention reuses the previous layer's top-k instead of running an
    /// indexer of its own (GLM-5's `"shared"` entries of `indexer_types`).
    pub topk_shared: bool,
}

/// Where a block normalises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NormPlacement {
    /// On each sub-layer's input (Llama, GPT-2, T5).
    Pre,
    /// After each residual add (BART).
    Post,
    /// Both on the input and on the output of each sub-layer before the residual add
    /// (Gemma-2/3's `pre_`/`post_feedforward_layernorm`).
    Sandwich,
    /// On each sub-layer's output before the residual add only (OLMo-2).
    Output,
}

/// Multi-head latent attention (DeepSeek-V2, sec. 2.1): keys and values from one compressed
/// latent of `kv_rank` plus a shared rotary key of `rope_dim`, queries optionally through their
/// own low-rank bottleneck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Mla {
    pub q_rank: Option<u64>,
    pub kv_rank: u64,
    pub rope_dim: u64,
    pub nope_dim: u64,
    pub v_dim: u64,
    /// DeepSeek Sparse Attention's lightning indexer beside the latent attention.
    pub indexer: Option<Indexer>,
}

/// DeepSeek Sparse Attention's lightning indexer (DeepSeek-AI 2025, "DeepSeek-V3.2-Exp:
/// Boosting Long-Context Efficiency with DeepSeek Sparse Attention", sec. 2.1), as
/// transformers 5.17 runs it without the FlashMLA kernels (`DeepseekV32Indexer`, GLM-5's
/// `GlmMoeDsaIndexer`): `wq_b` from the query bottleneck to `heads` x `head_dim`, `wk` from the
/// hidden states to one key of `head_dim` with a LayerNorm (`k_norm`), `weights_proj` to one
/// weight per head; under `torch.no_grad()` the relu of every query head's scores against
/// every key, weighted and summed over the heads, picks each query's `topk` keys, which become
/// a boolean mask ANDed onto the causal one before SDPA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Indexer {
    pub heads: u64,
    pub head_dim: u64,
    pub topk: u64,
    /// Each layer returns its top-k indices to the model's loop, which hands them to the next
    /// layer (GLM-5's `prev_topk_indices`, reused by its `"shared"` layers).
    pub returns_topk: bool,
}

impl Mla {
    /// The query projections' module names, as a message lists them: `q_a_proj` and
    /// `q_b_proj` behind a query bottleneck, else `q_proj`.
    pub fn query_modules(&self) -> &'static str {
        match self.q_rank {
            Some(_) => "`q_a_proj`, `q_b_proj`",
            None => "`q_proj`",
        }
    }
}

/// Dropout probabilities; a non-zero one stores a mask for backward.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Dropouts {
    /// After the embeddings.
    pub embedding: f64,
    /// On attention probabilities.
    pub attention: f64,
    /// On each sub-layer's output before the residual add.
    pub residual: f64,
    /// Whether `residual` drops the FFN's output only, the attention's output passing through
    /// undropped (StableLM's layer has one `nn.Dropout`, after its MLP).
    pub residual_ffn_only: bool,
    /// Inside the FFN, after the activation.
    pub activation: f64,
}

/// One stack of identical blocks (a decoder-only model has one; encoder-decoder has two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stack {
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub intermediate_size: u64,
}

impl Stack {
    /// A stack whose every head has its own keys and values (no grouping).
    pub fn multi_head(layers: u64, heads: u64, head_dim: u64, intermediate: u64) -> Stack {
        Stack::new(layers, heads, heads, head_dim, intermediate)
    }

    pub fn new(layers: u64, heads: u64, kv_heads: u64, head_dim: u64, intermediate: u64) -> Stack {
        Stack {
            layers,
            heads,
            kv_heads,
            head_dim,
            intermediate_size: intermediate,
        }
    }
}

/// A validated model description.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    pub name: String,
    pub family: Family,
    /// transformers' `model_type` as the config gave it (one of `Family::ALL`'s names).
    pub model_type: &'static str,
    pub hidden_size: u64,
    pub vocab_size: u64,
    /// The decoder (or the only) stack.
    pub decoder: Stack,
    /// The encoder stack of an encoder-decoder model.
    pub encoder: Option<Stack>,
    pub gated_ffn: bool,
    pub activation: Activation,
    pub norm: Norm,
    pub norm_placement: NormPlacement,
    pub positions: Positions,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections.
    pub qkv_bias: bool,
    /// Biases on the attention output projection, the FFN linears and the norms.
    pub linear_bias: bool,
    /// A bias on the attention output projection where it differs from `linear_bias` (the
    /// Llama family's `attention_bias` covers q, k, v and o; `mlp_bias` the FFN).
    pub out_bias: Option<bool>,
    /// Attention and FFN read the same norm output and add to the residual together.
    pub parallel_block: bool,
    /// q, k and v come from one projection (GPT-2 `c_attn`, Falcon `query_key_value`).
    pub fused_qkv: bool,
    /// The fused q/k/v output is split by reshapes that copy each part (CodeGen's four-shard
    /// layout: a reshape of a non-contiguous split view), so attention keeps the parts, not
    /// the fused output as GPT-2's views do.
    pub qkv_split_copies: bool,
    /// The gated FFN's gate and up projections are one module (`gate_up_proj`: Phi-3, GLM-4),
    /// chunked after it: one LoRA pair spans both.
    pub fused_gate_up: bool,
    /// Phi-2's LM head has a bias.
    pub lm_head_bias: bool,
    /// A vocabulary-sized buffer is added to the LM head's output (`lm_logits +
    /// self.final_logits_bias`: BART, mBART, Marian, Pegasus). A buffer keeps the dtype the
    /// model is stored in, so over fp32 storage the add promotes 16-bit logits to fp32.
    pub logits_buffer: bool,
    pub dropout: Dropouts,
    /// Published total parameter count, when the file states one (checked by the tests).
    pub published_params: Option<u64>,
    /// The context the model was trained for (`max_position_embeddings`, `n_positions`), where
    /// the config states one: longer sequences run but are out of distribution.
    pub context: Option<u64>,
    /// A mixture-of-experts FFN in every block (Mixtral), in place of the dense one.
    pub moe: Option<Moe>,
    /// RMSNorm on q and k before rotary: per head (Qwen3, Gemma-3) or over the whole
    /// projection (OLMo-2).
    pub qk_norm: QkNorm,
    /// How the attention applies rotary positions (with `positions` rotary).
    pub rotary_apply: RotaryApply,
    /// Which layers multiply q by `1 + beta * log(1 + floor(position / original context))`
    /// per position after rotary (Llama 4's attention temperature scaling).
    pub query_scale: QueryScale,
    /// A sigmoid gate on the attention output before `o_proj`.
    pub attention_output_gate: AttentionGate,
    /// The global (full-attention) layers' own attention geometry, where the model has local
    /// layers beside them (Gemma 4's `global_head_dim`, `num_global_key_value_heads` and
    /// `attention_k_eq_v`).
    pub global_attention: Option<GlobalAttention>,
    /// A scale-less RMSNorm over each value head (Gemma 4's `v_norm`).
    pub value_norm: bool,
    /// Per-layer input embeddings (Gemma 4 E2B/E4B): a second token embedding and a
    /// projection of the first, `width` channels for every layer, which each block gates into
    /// its residual stream.
    pub per_layer_input: Option<PerLayerInput>,
    /// The last this many decoder layers reuse an earlier layer's keys and values (Gemma 4's
    /// `num_kv_shared_layers`).
    pub kv_shared_layers: u64,
    /// Those layers' MLPs are twice as wide (Gemma 4's `use_double_wide_mlp`).
    pub double_wide_shared_mlp: bool,
    /// Attention mixers by layer, repeated with this period (Gemma-2: local, global).
    pub mixers: Vec<Mixer>,
    /// A Mamba-2 mixer beside every layer's attention, on the same normed input, the two
    /// outputs summed (Falcon-H1).
    pub parallel_ssd: Option<Ssd>,
    /// The FFN of each layer, repeated with this period, where the config lists it per layer
    /// (Nemotron-H's `layers_block_type`); empty: from `moe` and the mixer.
    pub ffns: Vec<FfnKind>,
    /// tanh soft-capping `cap * tanh(x / cap)` of the attention scores and of the final logits
    /// (Gemma-2).
    pub softcap: Softcap,
    /// Scalar multipliers on embeddings, residual branches and logits (Granite).
    pub multipliers: Multipliers,
    /// Which layers apply rotary positions, repeated with this period; empty: all of them
    /// (SmolLM3's `no_rope_layers` leaves every fourth layer without: NoPE).
    pub rope_layers: Vec<bool>,
    /// A norm right after the token embeddings (BLOOM's `word_embeddings_layernorm`, BART's
    /// `layernorm_embedding`).
    pub embedding_norm: bool,
    /// Multi-head latent attention in place of q/k/v projections (DeepSeek).
    pub mla: Option<Mla>,
    /// Layers whose sparse attention reuses the previous layer's top-k (GLM-5's
    /// `indexer_types`), one entry per layer; empty: none.
    pub topk_shared_layers: Vec<bool>,
    /// The keys and values are broadcast from the KV heads to every query head before the
    /// cache sees them (Falcon's new decoder, `FalconAttention._split_heads`).
    pub kv_broadcast: bool,
    /// A parallel block whose attention and MLP each normalise the input with their own norm
    /// (GPT-NeoX), rather than sharing one (Phi, Falcon).
    pub parallel_two_norms: bool,
    /// A learned logit per head that joins every query's softmax and is then dropped
    /// (GPT-OSS's `sinks`; Xiao et al. 2024, "Efficient Streaming Language Models with
    /// Attention Sinks").
    pub attention_sinks: bool,
    /// transformers has an SDPA path for the model (`_supports_sdpa`); without one it runs the
    /// model's eager attention when SDPA is asked for (GPT-OSS, GPT-Neo, GPT-J).
    pub sdpa: bool,
    /// transformers has a flash_attention_2 path for the model (`_supports_flash_attn`);
    /// without one `from_pretrained` refuses it (T5 and mT5, BLOOM, CodeGen, MPT).
    pub flash_attention: bool,
    /// The eager attention casts q and k to fp32 before the scores (GPT-Neo's and GPT-J's
    /// `_attn`: `query.to(torch.float32)`): without autocast the scores are fp32 and the
    /// matmul keeps the fp32 copies.
    pub attention_upcast: bool,
    /// What each block returns to the model's layer loop besides its hidden states: the loop
    /// holds it (`outputs = block(...)`) until the next block returns.
    pub returned_weights: ReturnedWeights,
    /// Non-parameter module buffers moved to the GPU with the model and kept there for the
    /// whole run (GPTBigCode's causal-mask table).
    pub buffers: crate::units::Bytes,
    /// A multimodal checkpoint's vision tower (Gemma 3's SigLIP), loaded with the language
    /// model and never run by text-only training.
    pub vision: Option<VisionTower>,
}

/// The vision tower and projector of a multimodal checkpoint (`Gemma3ForConditionalGeneration`,
/// which `AutoModelForCausalLM` builds from a `gemma3` config). Text-only fine-tuning loads them
/// and never runs them: `Gemma3Model.forward` calls the tower only for `pixel_values`. They hold
/// memory as weights, and LoRA's target names reach the tower's linears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VisionTower {
    /// transformers' `model_type` of the vision config.
    pub model_type: &'static str,
    /// Parameters of the tower and of the projector into the language model.
    pub params: u64,
    /// Patches per image, `(image_size / patch_size)^2`: the rows of the position table.
    pub patches: u64,
    /// The tower's encoder layers, each with `q_proj`, `k_proj`, `v_proj` and `out_proj`
    /// (hidden to hidden) and an MLP of `fc1` (hidden to intermediate) and `fc2`.
    pub layers: u64,
    pub hidden: u64,
    pub intermediate: u64,
    /// SigLIP's attention-pooling head (`vision_use_head`): one more `out_proj` (inside
    /// `nn.MultiheadAttention`), `fc1` and `fc2`.
    pub head: bool,
}

/// A sparse mixture-of-experts FFN (Shazeer et al. 2017; Mixtral, Jiang et al. 2024): `experts`
/// gated FFNs of `expert_intermediate` each, a linear router, each token sent to `top_k` of them;
/// optionally shared experts every token passes through (Qwen2-MoE, DeepSeekMoE, Dai et al.
/// 2024) and dense layers below or between the sparse ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Moe {
    pub experts: u64,
    pub top_k: u64,
    pub expert_intermediate: u64,
    /// Width of the shared expert FFN (0: none).
    pub shared_intermediate: u64,
    /// A sigmoid gate on the shared expert's output (Qwen2-MoE's `shared_expert_gate`).
    pub shared_gate: bool,
    /// Dense layers before the first sparse one (DeepSeek's `first_k_dense_replace`).
    pub first_dense: u64,
    /// Every `every`-th layer is sparse (Qwen2-MoE's `decoder_sparse_step`).
    pub every: u64,
    /// Biases on the router and on every expert's projections (GPT-OSS).
    pub bias: bool,
    /// How an expert combines its gate and up projections.
    pub gate: ExpertGate,
    /// How the router picks experts from its logits.
    pub routing: Routing,
    /// In-place multiplies of the block's input by fresh uniform noise in training
    /// (`hidden_states *= torch.empty_like(hidden_states).uniform_(1 - e, 1 + e)`): Mixtral's
    /// `router_jitter_noise` once, PhiMoE's `input_jitter_noise` twice (in the block and again
    /// in its router, on the same storage). Each keeps its noise tensor for backward.
    pub input_jitter: u32,
    /// The precision the router's matmul runs in.
    pub router: RouterPrecision,
    /// The dtype of the top-k weights the experts' outputs are scaled by.
    pub weights: RoutingWeights,
    /// The sparse block runs beside a dense MLP rather than in its place (Gemma 4 26B-A4B's
    /// `enable_moe_block`): router and experts read the block's residual input through norms of
    /// their own, and the experts' output, normed, is added to the MLP's.
    pub beside_mlp: bool,
    /// The shared experts' output is averaged with the routed experts' (`(routed + shared) / 2`,
    /// Command A+'s `shared_expert_combination_strategy = "average"`) rather than summed.
    pub shared_average: bool,
    /// A per-expert score bias the router adds before top-k, stored as a frozen parameter
    /// (`requires_grad=False`): counted with the weights, never trained (AFMoE's
    /// `expert_bias`, ERNIE 4.5's `moe_statics`). DeepSeek-V3's is a buffer, not a parameter.
    pub frozen_score_bias: bool,
    /// An RMSNorm on the block's output, after the shared experts are added (A.X K1's
    /// `post_mlp_layernorm`): one more weight of the hidden width per sparse layer.
    pub output_norm: bool,
    /// The shared experts' output and the routed experts' are each cast to fp32, added, and
    /// the sum cast back (Hy3's `enable_moe_fp32_combine`): three more tensors of the block's
    /// size, none kept for backward.
    pub fp32_combine: bool,
    /// The routed experts work on a narrower width (Nemotron 3 Super's LatentMoE,
    /// `moe_latent_size`): `fc1_latent_proj` projects the block's input down to it before the
    /// experts and `fc2_latent_proj` their sum back up; router and shared experts read the
    /// full width.
    pub latent: Option<u64>,
}

/// The precision of a MoE router's matmul.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterPrecision {
    /// A linear in the model's dtype, autocast like the others (Mixtral, Qwen-MoE).
    Model,
    /// `F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))` with
    /// autocast left as it is (DeepSeek-V2/V3's and GLM-4.5's `TopkRouter`): under autocast it
    /// runs in bf16 as `Model` does; without (pure bf16) it is an fp32 matmul that keeps fp32
    /// copies of its input (for the weight's gradient) and of its weight (for the input's).
    Fp32Operands,
    /// An fp32 weight in any model (HunYuan-MoE's `wg`, built with `dtype=torch.float32`) and
    /// the input cast to fp32 when the weight is, autocast left on: under autocast the bf16
    /// matmul on autocast's copies; without, an fp32 matmul keeping the input's fp32 copy.
    Fp32Weight,
    /// An fp32 module run with autocast off (ERNIE 4.5's `Ernie4_5_MoeTopKRouter`: an fp32
    /// weight `_keep_in_fp32_modules_strict` keeps even in a bf16 model, `F.linear(
    /// hidden_states.float(), weight.float())`, fp32 logits).
    Fp32Module,
}

/// The dtype of a router's top-k weights, as each family's router leaves them. The experts'
/// outputs times these weights (an (S, hidden) product over every routed row, put back in token
/// order and summed) are in the wider of the two dtypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingWeights {
    /// fp32 whatever the logits: Mixtral's `softmax(router_logits.float())`, DeepSeek-V2's and
    /// Gemma 4's `softmax(..., dtype=torch.float32)`, MiniMax-M2's
    /// `sigmoid(router_logits.float())`.
    Fp32,
    /// The logits' dtype: Qwen-MoE's, OLMoE's and HunYuan's `.to(router_logits.dtype)` after
    /// an fp32 softmax, GPT-OSS's softmax in the logits' dtype, LFM2's
    /// `type_as(router_logits)`, the sigmoid of DeepSeek-V3's, GLM-4.5's and dots.llm1's logits.
    Logits,
    /// A softmax given no dtype (Mistral 4's `router_logits.softmax(-1)`, PhiMoE's
    /// sparsemixer): autocast runs it in fp32 (`softmax` is on its fp32 list); without autocast,
    /// the logits' dtype.
    Softmax,
    /// ERNIE 4.5's `routing_weights.to(hidden_states.dtype)`.
    Hidden,
}

/// How a router turns logits into experts and weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// Softmax over the experts, then top-k (Mixtral, Qwen-MoE, DeepSeek, ...).
    TopK,
    /// Softmax over the experts, then top-k kept as they are, not divided by their sum
    /// (Jamba's `JambaSparseMoeBlock.route_tokens_to_experts`; Qwen-MoE's and OLMoE's
    /// routers with `norm_topk_prob` false).
    TopKUnnormalised,
    /// Top-k of the logits, then a softmax over the k (GPT-OSS's `GptOssTopKRouter`, Command
    /// A+'s `expert_selection_fn = "softmax"`).
    SoftmaxOfTopK,
    /// Top-k of the logits, then a sigmoid of the k (`Cohere2MoeTopKRouter` with
    /// `expert_selection_fn = "sigmoid"`), divided by their sum when `normalised`
    /// (`norm_topk_prob`).
    SigmoidOfTopK { normalised: bool },
    /// Llama 4's `Llama4TextMoe`: top-k of the logits, a sigmoid of those (the others are
    /// -inf, so zero), and every token through every expert: the input is repeated once per
    /// expert and scaled by its score before the experts' batched matmuls, whose outputs are
    /// summed. Compute and activations grow with the expert count, not with top-k.
    EveryExpert,
    /// PhiMoE's `sparsemixer` (Liu et al. 2024, "GRIN: GRadient-INformed MoE"): per choice a
    /// masked softmax, a Gumbel sample and Heun's midpoint mask, with a custom backward.
    SparseMixer,
}

/// How an expert combines its gate and up projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertGate {
    /// `act(gate) * up` from two projections (Mixtral, Qwen-MoE, DeepSeek).
    Activation,
    /// GPT-OSS (`GptOssExperts._apply_gate`): gate and up interleaved in one projection, each
    /// clamped to the SwiGLU limit, then `(up + 1) * gate * sigmoid(1.702 gate)`.
    ClampedSwiglu,
    /// No gate: `act(up)` from one projection (Nemotron-H's `NemotronHExperts`, transformers'
    /// experts with `has_gate=False`).
    None,
}

/// The eager attention probabilities a block returns with its hidden states (transformers 5.17:
/// `return output, attn_weights` in the decoder layers of GPT-Neo, GPT-J, CodeGen, BLOOM, MPT and
/// Falcon; the newer families return hidden states only). The model's loop keeps them while the
/// next block runs, where nothing else may (a checkpointed block saves nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReturnedWeights {
    None,
    /// Softmax's own output, which its backward keeps (Falcon's `F.softmax(..., dtype=
    /// hidden_states.dtype)`: fp32 under autocast, which computes the LayerNorm before in fp32).
    Softmax,
    /// The probabilities cast to the values' dtype (or dropout's output), which the product
    /// with v keeps (GPT-Neo, GPT-J, CodeGen, BLOOM, MPT).
    Cast,
}

/// How the attention applies the model's rotary cos/sin tables to q and k (transformers'
/// `apply_rotary_pos_emb` of each family).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RotaryApply {
    /// `q * cos + rotate_half(q) * sin` on the tables the model computed once (Llama): the
    /// multiplies keep those shared tables, nothing per layer.
    Shared,
    /// GLM's: every layer first `repeat_interleave`s the tables' halves, two new tensors of
    /// (1, 1, seq, rotary width) (position ids of batch 1) in the tables' dtype that the
    /// multiplies keep for backward.
    Interleaved,
    /// ERNIE 4.5's: GLM's interleaved tables from fp32 cos/sin (its rotary embedding skips the
    /// cast to the activations' dtype), `q.float()` and `rotate_half(q).float()` multiplied in
    /// fp32, the sum cast back to q's dtype.
    InterleavedFp32,
    /// Llama 4's `apply_rotary_emb`: `q.float()` viewed as complex pairs, multiplied by the
    /// model's complex64 `freqs_cis` (which the product keeps, once for all layers), viewed back
    /// and cast to q's dtype: two fp32 tensors of q's size in flight, nothing per layer kept.
    ComplexFp32,
}

/// How q and k are normalised before the scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    None,
    PerHead,
    Full,
    /// Llama 4's `Llama4TextL2Norm` on the rotary layers only, after rotary: a scale-less
    /// RMSNorm over each head of fp32 copies of q and k.
    L2AfterRotary,
}

/// Where the gate that multiplies the attention output (`attn * sigmoid(gate)`, before
/// `o_proj`) comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionGate {
    None,
    /// The query projection is twice as wide and its second half is the gate, copied out of
    /// the strided view (Qwen3.5's and Qwen3-Next's gated attention).
    QueryHalf,
    /// A projection of its own, `gate_proj` (hidden to heads x head width, no bias), run after
    /// q, k and v (AFMoE's `AfmoeAttention`).
    Projection,
}

/// Where Llama 4's per-position query temperature scaling applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryScale {
    None,
    /// Every layer (Ministral 3's `get_llama_4_attn_scale`).
    Every,
    /// The layers without rotary (Llama 4's `attn_temperature_tuning`).
    NopeLayers,
}

/// Scalar multipliers a model applies as separate multiplies (Granite); 1 means none.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Multipliers {
    /// The embedding module's own scale (`MiniCPM3ScaledWordEmbedding`: the lookup times an
    /// `embed_scale` buffer), on the token embeddings before peft's virtual tokens join them.
    pub token_embedding: f64,
    /// `inputs_embeds * embedding_multiplier`, after the token embeddings.
    pub embedding: f64,
    /// `residual + branch * residual_multiplier`, on each sub-layer's output.
    pub residual: f64,
    /// `hidden_states / logits_scaling` before the LM head (MiniCPM3): a new tensor of the
    /// last hidden state's size, while the model's output still holds the undivided one.
    pub head_input_divisor: f64,
    /// `logits / logits_scaling`, after the LM head.
    pub logits_divisor: f64,
}

impl Default for Multipliers {
    fn default() -> Multipliers {
        Multipliers {
            token_embedding: 1.0,
            embedding: 1.0,
            residual: 1.0,
            head_input_divisor: 1.0,
            logits_divisor: 1.0,
        }
    }
}

/// tanh soft-capping (Gemma-2); 0 means none.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Softcap {
    pub attention: f64,
    pub logits: f64,
}

impl ModelSpec {
    /// A decoder-only model of `family` with the common defaults (pre-norm RMSNorm, rotary, no
    /// biases, dense attention); each family's reader changes what differs.
    pub fn decoder_only(family: Family, hidden: u64, vocab: u64, decoder: Stack) -> ModelSpec {
        ModelSpec {
            hidden_size: hidden,
            vocab_size: vocab,
            decoder,
            ..ModelSpec::of_family(family)
        }
    }

    /// Every field at the common default for `family`; its sizes (hidden, vocabulary, stacks)
    /// are zero until the reader sets them from the config.
    pub fn of_family(family: Family) -> ModelSpec {
        ModelSpec {
            name: String::new(),
            family,
            model_type: family.model_type(),
            hidden_size: 0,
            vocab_size: 0,
            decoder: Stack::new(0, 0, 0, 0, 0),
            encoder: None,
            gated_ffn: true,
            activation: Activation::Silu,
            norm: Norm::RmsNorm,
            norm_placement: NormPlacement::Pre,
            positions: Positions::Rotary { fraction: 1.0 },
            tie_word_embeddings: false,
            qkv_bias: false,
            linear_bias: false,
            out_bias: None,
            parallel_block: false,
            fused_qkv: false,
            qkv_split_copies: false,
            fused_gate_up: false,
            lm_head_bias: false,
            logits_buffer: false,
            dropout: Dropouts::default(),
            published_params: None,
            context: None,
            moe: None,
            qk_norm: QkNorm::None,
            rotary_apply: RotaryApply::Shared,
            query_scale: QueryScale::None,
            attention_output_gate: AttentionGate::None,
            global_attention: None,
            value_norm: false,
            per_layer_input: None,
            kv_shared_layers: 0,
            double_wide_shared_mlp: false,
            parallel_two_norms: false,
            mixers: vec![Mixer::Attention],
            ffns: Vec::new(),
            parallel_ssd: None,
            softcap: Softcap::default(),
            multipliers: Multipliers::default(),
            rope_layers: Vec::new(),
            embedding_norm: false,
            mla: None,
            topk_shared_layers: Vec::new(),
            kv_broadcast: false,
            attention_sinks: false,
            sdpa: true,
            flash_attention: true,
            attention_upcast: false,
            returned_weights: ReturnedWeights::None,
            buffers: crate::units::Bytes::ZERO,
            vision: None,
        }
    }

    /// What block `layer` (0-based within its stack) is made of.
    pub fn block_kind(&self, layer: u64) -> BlockKind {
        let period = self.mixers.len().max(1) as u64;
        let mixer = self
            .mixers
            .get((layer % period) as usize)
            .copied()
            .unwrap_or(Mixer::Attention);
        let listed = self
            .ffns
            .get((layer % self.ffns.len().max(1) as u64) as usize)
            .copied();
        let ffn = match (mixer, self.moe) {
            _ if let Some(ffn) = listed => ffn,
            // Mamba's and Mamba-2's blocks are norm, mixer, residual; a hybrid's Mamba-2
            // layers (Granite 4.0) have the FFN every layer has.
            (Mixer::Ssm(_), _) => FfnKind::None,
            (Mixer::Ssd(_), _) if self.family == Family::Mamba2 => FfnKind::None,
            (_, Some(m))
                if layer >= m.first_dense && (layer + 1).is_multiple_of(m.every.max(1)) =>
            {
                FfnKind::Moe
            }
            _ => FfnKind::Dense,
        };
        let rope = self
            .rope_layers
            .get((layer % self.rope_layers.len().max(1) as u64) as usize)
            .copied()
            .unwrap_or(true);
        let kv_shared = self.kv_shared_layers > 0
            && layer >= self.decoder.layers.saturating_sub(self.kv_shared_layers);
        BlockKind {
            mixer,
            ffn,
            rope,
            kv_shared,
            topk_shared: self.reuses_topk(layer),
        }
    }

    /// Whether layer `layer`'s sparse attention reuses the previous layer's top-k.
    pub fn reuses_topk(&self, layer: u64) -> bool {
        usize::try_from(layer)
            .ok()
            .and_then(|l| self.topk_shared_layers.get(l))
            .copied()
            .unwrap_or(false)
    }

    /// The lightning indexer of DeepSeek Sparse Attention, if the model has one.
    pub fn indexer(&self) -> Option<Indexer> {
        self.mla.and_then(|m| m.indexer)
    }

    /// Whether any block is a linear-attention (Gated DeltaNet) layer.
    pub fn has_linear_attention(&self) -> bool {
        self.mixers
            .iter()
            .any(|m| matches!(m, Mixer::GatedDeltaNet(_)))
    }

    /// Whether any block is a Mamba-2 (state-space-duality) layer.
    pub fn has_ssd(&self) -> bool {
        self.parallel_ssd.is_some() || self.mixers.iter().any(|m| matches!(m, Mixer::Ssd(_)))
    }

    /// Whether any block is a short-convolution layer (LFM2).
    pub fn has_short_conv(&self) -> bool {
        self.mixers.iter().any(|m| matches!(m, Mixer::ShortConv(_)))
    }

    /// Whether any block runs a Mamba or Mamba-2 mixer.
    pub fn has_state_space_layers(&self) -> bool {
        self.has_ssd() || self.has_mamba_layers()
    }

    /// Whether any block is a Mamba-1 selective-scan layer (Mamba, Falcon Mamba, Jamba).
    pub fn has_mamba_layers(&self) -> bool {
        self.mixers.iter().any(|m| matches!(m, Mixer::Ssm(_)))
    }

    /// Whether some layer keeps a recurrent state it asks the cache for (`has_previous_state`):
    /// Gated DeltaNet, short-convolution, Mamba and Mamba-2 layers beside attention.
    pub fn has_recurrent_layers(&self) -> bool {
        self.has_linear_attention() || self.has_short_conv() || self.has_state_space_layers()
    }

    /// Heads of the keys (and of the values) one attention layer hands its cache: its KV
    /// heads, or every query head where they are broadcast first.
    fn cached_kv_heads(&self, stack: &Stack) -> u64 {
        if self.kv_broadcast {
            stack.heads
        } else {
            stack.kv_heads
        }
    }

    /// Whether peft 0.21 has default IA3 targets for the model type
    /// (`TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`); for the others it raises
    /// "Please specify `target_modules` in `peft_config`" until the user names them.
    pub fn peft_ia3_defaults(&self) -> bool {
        const TABLE: [&str; 20] = [
            "t5",
            "mt5",
            "gpt2",
            "bloom",
            "opt",
            "gptj",
            "gpt_neox",
            "gpt_neo",
            "bart",
            "gpt_bigcode",
            "llama",
            "mistral",
            "mixtral",
            "falcon",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi",
            "qwen2",
            "qwen3",
        ];
        TABLE.contains(&self.model_type)
    }

    /// Whether peft 0.21 has default LN-tuning targets for the model type
    /// (`TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING`); as for IA3, the others need
    /// `target_modules`.
    pub fn peft_ln_tuning_defaults(&self) -> bool {
        const TABLE: [&str; 15] = [
            "t5",
            "mt5",
            "gpt2",
            "bloom",
            "gptj",
            "bart",
            "llama",
            "mistral",
            "falcon",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi",
            "qwen2",
            "qwen3",
        ];
        TABLE.contains(&self.model_type)
    }

    /// Width of the keys (and of the values) one attention layer hands its cache per token.
    pub fn cached_kv_width(&self, stack: &Stack) -> u64 {
        self.cached_kv_heads(stack).saturating_mul(stack.head_dim)
    }

    /// The keys (and values) per token and layer that peft's prefix tuning builds
    /// (`_prepare_prompt_learning_config`, peft 0.21): `head_dim x num_key_value_heads` where
    /// the config has `num_key_value_heads` (the largest of Gemma 4's two layer kinds, whose
    /// other layers peft then skips), else `hidden_size` split over `num_attention_heads`.
    /// Each layer concatenates them with its own keys and values, so a layer whose cache has
    /// another head count or width fails: refused with the reason. Checked on toys of each
    /// case with a forward and backward on CPU (transformers 5.17): latent attention (DeepSeek,
    /// GLM-4.7-Flash, Mistral 4), Falcon-7B's multi-query cache and a T5 whose `d_model` is not
    /// `num_heads x d_kv` fail; Falcon-40B's new decoder and Gemma 4 run.
    pub fn peft_prefix_width(&self) -> std::result::Result<u64, String> {
        let stack = &self.decoder;
        if let Some(mla) = self.mla {
            return Err(format!(
                "its latent attention caches keys of {} and values of {} per head, which the \
                 prefix peft sizes from the config's `head_dim` and `num_key_value_heads` does \
                 not match, so the concatenation fails",
                mla.nope_dim + mla.rope_dim,
                mla.v_dim,
            ));
        }
        let cached = self.cached_kv_width(stack);
        if self.family.config_names_kv_heads() {
            let local = stack.kv_heads.saturating_mul(stack.head_dim);
            return Ok(match self.global_attention {
                Some(g) if g.head_dim > stack.head_dim => g.kv_heads.saturating_mul(g.head_dim),
                _ => local,
            });
        }
        let heads = stack.heads.max(1);
        let cached_heads = self.cached_kv_heads(stack);
        if cached_heads != heads || cached != self.hidden_size {
            return Err(format!(
                "peft splits the prefix's `hidden_size` ({}) over {heads} heads, but each layer \
                 caches {cached_heads} x {} keys and values, so the concatenation fails",
                self.hidden_size, stack.head_dim
            ));
        }
        Ok(self.hidden_size)
    }

    /// Whether any block attends (Mamba's do not).
    pub fn has_attention(&self) -> bool {
        self.mixers
            .iter()
            .any(|m| !matches!(m, Mixer::Ssm(_) | Mixer::Ssd(_) | Mixer::None))
    }

    /// Which kinds of softmax attention its layers have: (some attend to every key, some to a
    /// window). transformers builds one mask (and, for Gemma 3/4 and OLMo 3, one rotary table
    /// pair) per kind.
    pub fn attention_kinds(&self) -> (bool, bool) {
        let full = self.mixers.iter().any(|m| matches!(m, Mixer::Attention));
        let windowed = self
            .mixers
            .iter()
            .any(|m| matches!(m, Mixer::SlidingWindow { .. }));
        (full, windowed)
    }

    /// The number of sparse (mixture-of-experts) blocks.
    pub fn moe_layers(&self) -> u64 {
        (0..self.decoder.layers)
            .filter(|&l| self.block_kind(l).ffn == FfnKind::Moe)
            .count() as u64
    }

    pub fn is_encoder_decoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// What one of `tp` tensor-parallel ranks holds (Shoeybi et al. 2019, sec. 3): attention
    /// split by heads (q/k/v column-parallel, output row-parallel), the FFN by its intermediate
    /// width, the embedding, LM head and cross-entropy by vocabulary (vocab-parallel). The hidden
    /// width, norms and the residual stream stay whole on every rank (without sequence
    /// parallelism their activations are replicated). Gated DeltaNet layers split by head too
    /// (key and value heads; each head's state is its own).
    pub fn tensor_parallel_rank(&self, tp: u64) -> ModelSpec {
        let tp = tp.max(1);
        let mixers = self
            .mixers
            .iter()
            .map(|&m| match m {
                Mixer::GatedDeltaNet(d) => Mixer::GatedDeltaNet(DeltaNet {
                    key_heads: d.key_heads.div_ceil(tp),
                    value_heads: d.value_heads.div_ceil(tp),
                    ..d
                }),
                // Megatron's Mamba layers split heads and B/C groups across the ranks (one
                // group is replicated).
                Mixer::Ssd(s) => Mixer::Ssd(Ssd {
                    heads: s.heads.div_ceil(tp),
                    groups: s.groups.div_ceil(tp),
                    norm_groups: s.norm_groups.div_ceil(tp),
                    ..s
                }),
                other => other,
            })
            .collect();
        let parallel_ssd = self.parallel_ssd.map(|s| Ssd {
            heads: s.heads.div_ceil(tp),
            groups: s.groups.div_ceil(tp),
            norm_groups: s.norm_groups.div_ceil(tp),
            ..s
        });
        let moe = self.moe.map(|m| Moe {
            expert_intermediate: m.expert_intermediate.div_ceil(tp),
            shared_intermediate: m.shared_intermediate.div_ceil(tp),
            ..m
        });
        let split = |s: Stack| Stack {
            heads: s.heads / tp,
            kv_heads: s.kv_heads / tp,
            intermediate_size: s.intermediate_size.div_ceil(tp),
            ..s
        };
        let global_attention = self.global_attention.map(|g| GlobalAttention {
            kv_heads: g.kv_heads / tp,
            ..g
        });
        ModelSpec {
            vocab_size: self.vocab_size.div_ceil(tp),
            decoder: split(self.decoder),
            global_attention,
            encoder: self.encoder.map(split),
            moe,
            mixers,
            parallel_ssd,
            ..self.clone()
        }
    }

    /// Parameters a token runs through: all, less the experts it is not routed to.
    pub fn active_params(&self, total: u64) -> u64 {
        match self.moe {
            Some(m) if m.experts > 0 => {
                let projections = if m.gate == ExpertGate::None { 2 } else { 3 };
                let per_expert = projections * self.hidden_size * m.expert_intermediate;
                let idle = self.moe_layers() * per_expert * m.experts.saturating_sub(m.top_k);
                total.saturating_sub(idle)
            }
            _ => total,
        }
    }

    /// The largest of `pp` pipeline stages: `ceil(layers / pp)` decoder layers.
    pub fn pipeline_stage(&self, pp: u64) -> ModelSpec {
        ModelSpec {
            decoder: Stack {
                layers: self.decoder.layers.div_ceil(pp.max(1)),
                ..self.decoder
            },
            ..self.clone()
        }
    }
}

/// What a parameter is, for parameter counting and the optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamRole {
    /// Token or position embedding table.
    Embedding,
    /// A linear layer's weight.
    Linear,
    /// A bias vector.
    Bias,
    /// A norm's scale.
    Norm,
    /// A norm's shift (LayerNorm's bias): a bias to BitFit, a norm parameter to LN tuning.
    NormBias,
    /// A parameter a PEFT method adds (LoRA A/B, adapters, prefixes, prompts, IA3 vectors).
    Adapter,
}
