//! The global rate cap on event log lines (SPEC R9.3).
//!
//! What it does: a token bucket (`rate` lines per second, bursts up to `burst`) in front of
//! the event log lines `snatgw run` writes. A line over the cap is not written but counted;
//! once per `report_every` while lines are being suppressed, one line says how many were
//! (that line bypasses the bucket, so the count itself is never lost). The engine already
//! aggregates repeated events per (instance, public IP, protocol, destination); this cap is
//! the last guard when a storm spans many keys.
//!
//! What it does not do: touch counters (the stats snapshot and metrics stay exact) or the
//! event ring of the stats snapshot. Time is an argument (milliseconds), so it is testable.

/// Token bucket over log lines; see the module documentation.
#[derive(Debug, Clone)]
pub struct LogCap {
    rate: f64,
    burst: f64,
    tokens: f64,
    last_ms: u64,
    report_every_ms: u64,
    last_report_ms: u64,
    /// Suppressed since the last report line.
    pending: u64,
    /// Suppressed in all.
    pub suppressed_total: u64,
}

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Write it.
    Write,
    /// Drop it (counted).
    Suppress,
}

impl LogCap {
    /// `rate` lines per second (0 = no cap), bursts up to `burst` lines, a report line at
    /// most every `report_every_ms`.
    pub fn new(rate: u32, burst: u32, report_every_ms: u64) -> LogCap {
        LogCap {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last_ms: 0,
            report_every_ms,
            last_report_ms: 0,
            pending: 0,
            suppressed_total: 0,
        }
    }

    /// Decides one line at `now_ms`.
    pub fn admit(&mut self, now_ms: u64) -> Admit {
        if self.rate == 0.0 {
            return Admit::Write;
        }
        let dt = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Admit::Write
        } else {
            self.pending += 1;
            self.suppressed_total += 1;
            Admit::Suppress
        }
    }

    /// The number of lines suppressed since the last report, when a report line is due at
    /// `now_ms` (at most once per `report_every_ms`, and only if something was suppressed).
    pub fn report_due(&mut self, now_ms: u64) -> Option<u64> {
        if self.pending == 0 || now_ms.saturating_sub(self.last_report_ms) < self.report_every_ms {
            return None;
        }
        self.last_report_ms = now_ms;
        Some(std::mem::take(&mut self.pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r9_3_log_rate_cap_bounds_lines_and_counts_the_rest() {
        // 100k lines offered over 10 s at 20 lines/s, bursts of 50.
        let mut c = LogCap::new(20, 50, 1000);
        let (mut written, mut reports, mut reported) = (0u64, 0u64, 0u64);
        for i in 0..100_000u64 {
            let now = i / 10; // 10 lines per millisecond
            if c.admit(now) == Admit::Write {
                written += 1;
            }
            if let Some(n) = c.report_due(now) {
                reports += 1;
                reported += n;
            }
        }
        if let Some(n) = c.report_due(20_000) {
            reports += 1;
            reported += n;
        }
        // 50 burst + 20/s for 10 s, and one report line per second.
        assert!(written <= 50 + 20 * 10 + 1, "{written}");
        assert!(reports <= 11, "{reports}");
        assert_eq!(
            written + reported,
            100_000,
            "every line is written or counted"
        );
        assert_eq!(c.suppressed_total, reported);
        assert!((written + reports) as f64 / 10.0 <= 100.0);
    }

    #[test]
    fn no_cap_writes_everything() {
        let mut c = LogCap::new(0, 0, 1000);
        assert!((0..1000).all(|_| c.admit(0) == Admit::Write));
        assert_eq!(c.report_due(5000), None);
    }
}
