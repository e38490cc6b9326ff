//! The CUDA engine: the encoder's schedule ([`crate::engine::schedule`]) on an NVIDIA GPU.
//!
//! - Products: cuBLASLt, bias and residual in the epilogue ([`lt`]).
//! - Attention: cuDNN's fused flash attention (`SDPA_FWD`, [`sdpa`]) in bf16 where cuDNN is
//!   new enough; otherwise, and in fp32/tf32 (cuDNN has no f32 attention), the flash kernels of
//!   `attention_mma.cu` (tensor cores: bf16, tf32) and `attention_simt.cu` (f32, any head size).
//! - Patchify, LayerNorm (with the positions of block 0 and the cast to the next product's
//!   type), exact GELU, mean pooling with the final LayerNorm: `encoder.cu`.
//! - Kernels compiled by NVRTC once per GPU and cached on disk ([`nvrtc`]); every library
//!   opened at run time ([`libs`]): the binary starts on machines without CUDA.
//! - Weights on the device once, in the engine's precision; activations sized once per batch
//!   size; the forward captured as one CUDA graph per batch size and replayed; clips uploaded
//!   from pinned memory on a second stream while the previous batch computes; features
//!   downloaded asynchronously.

pub mod libs;
pub mod lt;
pub mod nvrtc;
pub mod sdpa;

#[cfg(feature = "cuda-engine")]
mod engine;
#[cfg(feature = "cuda-engine")]
pub use engine::{CudaEngine, OpTime};
#[cfg(feature = "cuda-engine")]
mod train_ops;
#[cfg(feature = "cuda-engine")]
pub use train_ops::CudaTrainOps;

/// How attention runs on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// cuDNN's fused flash attention (bf16).
    Cudnn,
    /// `attention_mma_bf16` / `attention_mma_tf32`: tensor cores, head sizes 16..=128 in steps
    /// of 16, sm_80 and newer.
    Mma,
    /// `attention_simt_f32` / `attention_simt_bf16`: CUDA cores, any head size.
    Simt,
}

impl AttentionKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cudnn => "cuDNN flash attention",
            Self::Mma => "marlin's tensor-core flash attention",
            Self::Simt => "marlin's f32 flash attention",
        }
    }
}

/// The attention kernel for a precision, head size and GPU architecture (e.g. 90), when cuDNN
/// is usable (`cudnn`) or not. `MARLIN_ATTENTION=cudnn|mma|simt` asks for one (where it can
/// run).
pub fn attention_kind(
    precision: crate::kernels::Precision,
    head_dim: usize,
    arch: u32,
    cudnn: bool,
) -> AttentionKind {
    use crate::kernels::Precision;
    let mma_ok = arch >= 80 && head_dim.is_multiple_of(16) && (16..=128).contains(&head_dim);
    // cuDNN's SDPA takes head sizes that are multiples of 8 up to 128 (256 on Hopper).
    let cudnn_ok =
        cudnn && precision == Precision::Bf16 && head_dim.is_multiple_of(8) && head_dim <= 128;
    let asked = std::env::var("MARLIN_ATTENTION").ok();
    match asked.as_deref() {
        Some("simt") => return AttentionKind::Simt,
        Some("mma") if mma_ok && precision != Precision::F32 => return AttentionKind::Mma,
        Some("cudnn") if cudnn_ok => return AttentionKind::Cudnn,
        _ => {}
    }
    match precision {
        Precision::Bf16 if cudnn_ok => AttentionKind::Cudnn,
        Precision::Bf16 | Precision::Tf32 if mma_ok => AttentionKind::Mma,
        _ => AttentionKind::Simt,
    }
}

/// Threads per block and query rows per block of the attention kernels (fixed by the `.cu`
/// files).
pub const ATTENTION_THREADS: u32 = 128;
pub const ATTENTION_ROWS: u32 = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Precision;

    #[test]
    fn attention_kernels_by_precision_head_size_and_gpu() {
        // The released models: head size 64.
        assert_eq!(
            attention_kind(Precision::Bf16, 64, 90, true),
            AttentionKind::Cudnn
        );
        assert_eq!(
            attention_kind(Precision::Bf16, 64, 90, false),
            AttentionKind::Mma
        );
        assert_eq!(
            attention_kind(Precision::Tf32, 64, 90, true),
            AttentionKind::Mma
        );
        assert_eq!(
            attention_kind(Precision::F32, 64, 90, true),
            AttentionKind::Simt
        );
        // Head sizes the tensor-core kernels do not take, and GPUs without bf16 mma.
        assert_eq!(
            attention_kind(Precision::Bf16, 4, 90, true),
            AttentionKind::Simt
        );
        assert_eq!(
            attention_kind(Precision::Bf16, 8, 90, false),
            AttentionKind::Simt
        );
        assert_eq!(
            attention_kind(Precision::Tf32, 64, 75, false),
            AttentionKind::Simt
        );
        assert_eq!(
            attention_kind(Precision::Bf16, 256, 90, true),
            AttentionKind::Simt
        );
    }
}
