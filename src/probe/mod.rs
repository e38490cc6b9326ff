//! Downstream adaptation: labelled datasets, linear probing on extracted features, fine-tuning
//! the encoder, evaluation (accuracy, AUROC) and prediction.

pub mod data;
pub mod metrics;
pub mod plot;
pub mod saved;
pub mod train;
