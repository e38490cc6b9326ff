//! The learning rate per epoch: the config's base, warmup and min rates, each scaled by
//! batch / 256; linear warmup from the warmup rate over `warmup_epochs`, then cosine down to
//! the min rate at the last epoch.
//!
//! Difference from the reference: its warmup starts at 0 (not the configured warmup rate) and
//! its scheduler steps after the first batch of each epoch, so that batch runs at the previous
//! epoch's rate; here every batch of epoch e uses `lr_at(e)`.

use crate::model::config::LearningRateConfig;

/// Rate for epoch `epoch` (0-based) of `epochs`, for `batch` clips per step.
pub fn lr_at(lr: &LearningRateConfig, epoch: usize, epochs: usize, batch: usize) -> f64 {
    let s = batch as f64 / 256.0;
    let (base, warm, min) = (lr.base * s, lr.warmup * s, lr.min * s);
    let w = lr.warmup_epochs.min(epochs);
    if epoch < w {
        return warm + (base - warm) * epoch as f64 / w as f64;
    }
    let span = epochs.saturating_sub(w).max(1) as f64;
    let i = (epoch - w) as f64;
    min + 0.5 * (base - min) * (1.0 + (std::f64::consts::PI * i / span).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let c = LearningRateConfig {
            base: 1.5e-4,
            warmup: 1e-6,
            min: 1e-5,
            warmup_epochs: 40,
        };
        // batch 256: no scaling.
        assert!((lr_at(&c, 0, 2000, 256) - 1e-6).abs() < 1e-15);
        assert!((lr_at(&c, 20, 2000, 256) - (1e-6 + (1.5e-4 - 1e-6) / 2.0)).abs() < 1e-12);
        assert!((lr_at(&c, 40, 2000, 256) - 1.5e-4).abs() < 1e-12);
        assert!((lr_at(&c, 1020, 2000, 256) - (1e-5 + 0.5 * 1.4e-4)).abs() < 1e-9);
        assert!(lr_at(&c, 1999, 2000, 256) < 1.01e-5);
        // batch 64: a quarter.
        assert!((lr_at(&c, 40, 2000, 64) - 1.5e-4 / 4.0).abs() < 1e-12);
    }
}
