//! Learning-rate schedule: linear warm-up, then cosine decay to a floor (Loshchilov & Hutter
//! 2017, "SGDR", without restarts), in nanoGPT's form:
//!
//! ```text
//! lr(s) = lr_max · (s + 1) / (W + 1)                                   s < W
//!       = lr_min + ½ (1 + cos(π · (s − W) / (D − W))) · (lr_max − lr_min)   W ≤ s ≤ D
//!       = lr_min                                                       s > D
//! ```

/// Warm-up then cosine decay.
#[derive(Clone, Copy, Debug)]
pub struct CosineSchedule {
    /// Peak rate, reached at the end of warm-up.
    pub max_lr: f64,
    /// Floor, reached at `decay_steps`.
    pub min_lr: f64,
    /// Warm-up steps W.
    pub warmup_steps: u64,
    /// Step D where the decay ends.
    pub decay_steps: u64,
}

impl CosineSchedule {
    /// The rate for optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.max_lr * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        if step > self.decay_steps || self.decay_steps <= self.warmup_steps {
            return self.min_lr;
        }
        let ratio =
            (step - self.warmup_steps) as f64 / (self.decay_steps - self.warmup_steps) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.max_lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_peaks_and_decays_to_the_floor() {
        let s = CosineSchedule {
            max_lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            decay_steps: 2000,
        };
        assert!((s.lr(0) - 1e-3 / 101.0).abs() < 1e-12);
        assert!((s.lr(99) - 1e-3 * 100.0 / 101.0).abs() < 1e-12);
        assert!((s.lr(100) - 1e-3).abs() < 1e-12);
        assert!((s.lr(1050) - 5.5e-4).abs() < 1e-12, "half-way is the mean");
        assert!((s.lr(2000) - 1e-4).abs() < 1e-12);
        assert_eq!(s.lr(5000), 1e-4);
        for step in 100..2000 {
            assert!(s.lr(step + 1) <= s.lr(step));
        }
    }
}
