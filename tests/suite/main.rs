//! The integration tests, as one test binary: every test binary links and monomorphises burn
//! and candle, so one binary builds in a fraction of the time of one per file. Each module is
//! one area (`cargo test --release cli_extract::` runs one).

mod common;

mod bf16;
mod cli_extract;
mod cli_face;
mod data_parallel;
mod download;
mod engine;
mod extract_parity;
mod face_detect;
mod face_nets;
mod face_parse_eval;
mod face_parser;
mod face_samples;
mod finetune_engine;
#[cfg(any(feature = "cuda", feature = "vulkan"))]
mod gpu;
mod masking;
mod model_parity;
mod pretrain_run;
mod pretrain_step;
mod probe_metrics;
mod probe_train;
mod scale;
mod train_engine;
