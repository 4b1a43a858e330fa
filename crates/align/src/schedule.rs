//! Learning-rate schedules as transformers' `get_scheduler` computes them: a linear warmup from 0,
//! then constant, linear decay to 0, or a half-cosine to 0. The multiplier for optimizer step `k`
//! (counted from 0) is the schedule at `k`, so with warmup the very first step runs at lr 0,
//! exactly as in transformers.

/// The shape of the learning rate after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

/// A schedule over a known number of optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// Warmup given as a fraction of the total steps, rounded up as transformers does.
    pub fn warmup_from_ratio(ratio: f64, total_steps: usize) -> usize {
        (ratio * total_steps as f64).ceil() as usize
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        let (k, warmup, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        let factor = if step < self.warmup_steps {
            k / warmup.max(1.0)
        } else {
            let progress = (k - warmup) / (total - warmup).max(1.0);
            match self.kind {
                ScheduleKind::Constant => 1.0,
                ScheduleKind::Linear => ((total - k) / (total - warmup).max(1.0)).max(0.0),
                ScheduleKind::Cosine => {
                    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
                }
            }
        };
        self.peak_lr * factor
    }
}
