//! Dynamic loss scaling for f16 training (Micikevicius et al. 2018, "Mixed Precision Training",
//! §3.2): the loss is multiplied by a scale before backward so that small gradients stay above
//! f16's smallest normal number; the gradients are divided by it again before the optimizer step.
//! A step whose gradients overflowed (an infinity or NaN anywhere) is skipped and the scale halved;
//! after a run of steps without overflow it doubles, so it stays near the largest value that does
//! not overflow. The defaults are the ones PyTorch's `GradScaler` and Megatron-LM use: start at
//! 2¹⁶, double after 2,000 clean steps, halve on overflow.
//!
//! Overflow is found in the pass that sums the gradients' squares for the gradient norm, however
//! a training strategy splits it over ranks: a non-finite gradient makes the norm non-finite. The
//! gradients are then unscaled in the same pass that clips them.

use crate::error::{invalid, Result};

/// How the scale moves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaleConfig {
    /// The first scale.
    pub initial: f32,
    /// Clean steps after which the scale doubles.
    pub growth_interval: u32,
    /// The smallest scale: a run whose scale would fall below it stops instead of spinning.
    pub min_scale: f32,
    /// Overflowing steps in a row after which the run stops.
    pub max_skipped_in_a_row: u32,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        LossScaleConfig {
            initial: 65536.0,
            growth_interval: 2000,
            min_scale: 1.0,
            max_skipped_in_a_row: 50,
        }
    }
}

/// The scale's state: what a checkpoint keeps to resume exactly.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaler {
    config: LossScaleConfig,
    scale: f32,
    /// Clean steps since the scale last changed.
    clean: u32,
    /// Overflowing steps in a row.
    skipped_in_a_row: u32,
    /// Overflowing steps in all.
    skipped: u64,
}

impl LossScaler {
    /// A scaler at `config.initial`; fails on a scale that is not a positive finite number or a
    /// zero interval, naming the setting.
    pub fn new(config: LossScaleConfig) -> Result<LossScaler> {
        if !(config.initial.is_finite() && config.initial >= config.min_scale) {
            return Err(invalid(
                "LossScaler",
                format!(
                    "initial scale {} must be finite and at least the minimum {}",
                    config.initial, config.min_scale
                ),
            ));
        }
        if config.min_scale.is_nan() || config.min_scale <= 0.0 || config.growth_interval == 0 {
            return Err(invalid(
                "LossScaler",
                format!(
                    "min_scale {} must be positive and growth_interval {} at least 1",
                    config.min_scale, config.growth_interval
                ),
            ));
        }
        Ok(LossScaler {
            config,
            scale: config.initial,
            clean: 0,
            skipped_in_a_row: 0,
            skipped: 0,
        })
    }

    /// Its settings.
    pub fn config(&self) -> LossScaleConfig {
        self.config
    }

    /// The scale the loss is multiplied by this step.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Overflowing (skipped) steps so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Records a step's outcome: `finite` when no gradient overflowed. Returns whether the
    /// optimizer steps (false: skip it, the scale was halved). Fails, leaving the state as it
    /// was, when the scale would fall below its minimum or too many steps overflowed in a row:
    /// the gradients are not finite at any usable scale (a diverged run).
    pub fn update(&mut self, finite: bool) -> Result<bool> {
        if finite {
            self.skipped_in_a_row = 0;
            self.clean += 1;
            if self.clean == self.config.growth_interval {
                self.clean = 0;
                let grown = self.scale * 2.0;
                if grown.is_finite() {
                    self.scale = grown;
                }
            }
            return Ok(true);
        }
        let halved = self.scale / 2.0;
        if halved < self.config.min_scale {
            return Err(invalid(
                "loss scaling",
                format!(
                    "the gradients overflow even at the minimum loss scale {}: the run has \
                     diverged; resume from an earlier checkpoint with a lower learning rate",
                    self.config.min_scale
                ),
            ));
        }
        if self.skipped_in_a_row + 1 > self.config.max_skipped_in_a_row {
            return Err(invalid(
                "loss scaling",
                format!(
                    "{} steps in a row overflowed (loss scale now {}): the run has diverged; \
                     resume from an earlier checkpoint with a lower learning rate",
                    self.skipped_in_a_row + 1,
                    self.scale
                ),
            ));
        }
        self.scale = halved;
        self.clean = 0;
        self.skipped_in_a_row += 1;
        self.skipped += 1;
        Ok(false)
    }

    /// The state as numbers, for a checkpoint: scale, clean steps, skipped in a row, skipped.
    pub fn to_state(&self) -> [f64; 4] {
        [
            self.scale as f64,
            self.clean as f64,
            self.skipped_in_a_row as f64,
            self.skipped as f64,
        ]
    }

    /// A scaler resumed from [`LossScaler::to_state`]'s numbers.
    pub fn from_state(config: LossScaleConfig, state: [f64; 4]) -> Result<LossScaler> {
        let mut s = LossScaler::new(config)?;
        s.scale = state[0] as f32;
        s.clean = state[1] as u32;
        s.skipped_in_a_row = state[2] as u32;
        s.skipped = state[3] as u64;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaler() -> LossScaler {
        LossScaler::new(LossScaleConfig::default()).unwrap()
    }

    #[test]
    fn the_scale_starts_at_two_to_the_sixteen_and_doubles_after_2000_clean_steps() {
        let mut s = scaler();
        assert_eq!(s.scale(), 65536.0);
        for _ in 0..1999 {
            assert!(s.update(true).unwrap());
        }
        assert_eq!(s.scale(), 65536.0);
        assert!(s.update(true).unwrap());
        assert_eq!(s.scale(), 131072.0);
    }

    #[test]
    fn an_overflow_halves_the_scale_skips_the_step_and_restarts_the_count() {
        let mut s = scaler();
        for _ in 0..1500 {
            s.update(true).unwrap();
        }
        assert!(!s.update(false).unwrap());
        assert_eq!((s.scale(), s.skipped()), (32768.0, 1));
        for _ in 0..1999 {
            s.update(true).unwrap();
        }
        assert_eq!(s.scale(), 32768.0, "the count restarted at the overflow");
        s.update(true).unwrap();
        assert_eq!(s.scale(), 65536.0);
    }

    #[test]
    fn a_run_that_keeps_overflowing_stops_with_an_error_instead_of_spinning() {
        let mut s = LossScaler::new(LossScaleConfig {
            initial: 8.0,
            ..LossScaleConfig::default()
        })
        .unwrap();
        for want in [4.0, 2.0, 1.0] {
            assert!(!s.update(false).unwrap());
            assert_eq!(s.scale(), want);
        }
        let e = s.update(false).unwrap_err().to_string();
        assert!(e.contains("minimum loss scale 1"), "{e}");
        assert_eq!(s.scale(), 1.0, "the state is left as it was");
        let mut s = LossScaler::new(LossScaleConfig {
            max_skipped_in_a_row: 3,
            ..LossScaleConfig::default()
        })
        .unwrap();
        for _ in 0..3 {
            s.update(false).unwrap();
        }
        let e = s.update(false).unwrap_err().to_string();
        assert!(e.contains("4 steps in a row overflowed"), "{e}");
    }

    #[test]
    fn the_state_resumes_exactly_and_bad_settings_are_refused() {
        let mut s = scaler();
        for i in 0..777 {
            s.update(i % 300 != 299).unwrap();
        }
        let back = LossScaler::from_state(LossScaleConfig::default(), s.to_state()).unwrap();
        assert_eq!(back, s);
        for bad in [
            LossScaleConfig {
                initial: f32::INFINITY,
                ..LossScaleConfig::default()
            },
            LossScaleConfig {
                growth_interval: 0,
                ..LossScaleConfig::default()
            },
            LossScaleConfig {
                min_scale: 0.0,
                ..LossScaleConfig::default()
            },
        ] {
            assert!(LossScaler::new(bad).is_err(), "{bad:?}");
        }
    }
}
