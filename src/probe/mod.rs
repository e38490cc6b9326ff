//! Downstream adaptation: labelled datasets, linear probing on extracted features, fine-tuning
//! the encoder, evaluation (accuracy, AUROC) and prediction.

pub mod classifier;
pub mod data;
pub mod engine;
pub mod features;
pub mod inputs;
pub mod metrics;
pub mod plot;
pub mod run;
pub mod saved;
pub mod train;
