//! Lease settings and a node's local view of its own lease (R10.1, R10.2).
//!
//! A node holds a lease at the store (etcd) and renews it. The store expires the lease TTL
//! after the *last renewal it received*. The node cannot know when that was, only when it
//! *sent* its last successful renewal, which is earlier; so it takes
//! `valid_until = sent_at + TTL − margin` ([`LocalLease`]) and stops translating for all its
//! blocks when that passes (self-fencing). Because the store's expiry is at least
//! `sent_at + TTL`, the node has stopped before the store can let another node take its blocks
//! over. The margin absorbs the difference between the node's and the store's clock *rates*
//! (a node clock running slow by a fraction `f` needs `margin ≥ f · TTL`) and scheduling delay
//! between the check and the last packet translated.
//!
//! Time is an argument everywhere (like the engine's `now`): a [`Duration`] since an origin of
//! the caller's choosing on a monotonic clock ([`MonotonicClock`] for real processes). There
//! is no wall clock in this module; it does no I/O.

use std::time::{Duration, Instant};

use crate::error::FleetError;

/// Default lease TTL (R10.2, issue #19).
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Smallest lease TTL accepted.
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// A lease id as the store gives it (etcd's `int64`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct LeaseId(pub i64);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// How long leases live and how early a node fences itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    ttl: Duration,
    margin: Duration,
}

impl Default for LeaseConfig {
    fn default() -> LeaseConfig {
        LeaseConfig::new(DEFAULT_TTL).expect("the default TTL is valid")
    }
}

impl LeaseConfig {
    /// A TTL (at least [`MIN_TTL`], whole seconds are what etcd keeps) with the default
    /// margin, a fifth of the TTL (2 s at 10 s: a node clock may run up to 20 % slow).
    pub fn new(ttl: Duration) -> Result<LeaseConfig, FleetError> {
        LeaseConfig::with_margin(ttl, ttl / 5)
    }

    /// A TTL and an explicit self-fencing margin (above zero, below the TTL).
    pub fn with_margin(ttl: Duration, margin: Duration) -> Result<LeaseConfig, FleetError> {
        if ttl < MIN_TTL {
            return Err(FleetError::LeaseTooShort { ttl, min: MIN_TTL });
        }
        if margin.is_zero() || margin >= ttl {
            return Err(FleetError::BadMargin { margin, ttl });
        }
        Ok(LeaseConfig { ttl, margin })
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The self-fencing margin.
    pub fn margin(&self) -> Duration {
        self.margin
    }

    /// How often a node should renew: a third of the local validity, so two renewals in a
    /// row may fail before the node fences itself.
    pub fn renew_interval(&self) -> Duration {
        (self.ttl - self.margin) / 3
    }

    /// The TTL in whole seconds, rounded up (what is asked of etcd; rounding up only makes
    /// the store's lease longer than the local view assumes).
    pub fn ttl_secs(&self) -> i64 {
        let s = self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0);
        i64::try_from(s).unwrap_or(i64::MAX)
    }

    /// The local view after a renewal *sent* at `sent_at` succeeded, the store having granted
    /// `granted` (the smaller of it and the configured TTL counts).
    pub fn local_lease(&self, id: LeaseId, sent_at: Duration, granted: Duration) -> LocalLease {
        let ttl = self.ttl.min(granted);
        LocalLease {
            id,
            sent_at,
            valid_until: (sent_at + ttl).saturating_sub(self.margin),
        }
    }
}

/// A node's own view of its lease: valid until `valid_until` on its clock, never longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalLease {
    /// The lease.
    pub id: LeaseId,
    /// When the last successful renewal (or the grant) was sent.
    pub sent_at: Duration,
    /// `sent_at + TTL − margin`: from then on the node must not translate.
    pub valid_until: Duration,
}

impl LocalLease {
    /// Whether the node may still act on this lease at `now` (self-fencing when false).
    pub fn is_valid(&self, now: Duration) -> bool {
        now < self.valid_until
    }
}

/// A monotonic clock as a [`Duration`] since its creation, for callers that run in real time.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl Default for MonotonicClock {
    fn default() -> MonotonicClock {
        MonotonicClock::new()
    }
}

impl MonotonicClock {
    /// A clock starting at zero now.
    pub fn new() -> MonotonicClock {
        MonotonicClock {
            origin: Instant::now(),
        }
    }

    /// Time since the clock was created.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r10_2_lease_ttl_minimum_and_margin_are_enforced() {
        assert_eq!(LeaseConfig::default().ttl(), Duration::from_secs(10));
        assert_eq!(LeaseConfig::default().margin(), Duration::from_secs(2));
        assert!(matches!(
            LeaseConfig::new(Duration::from_millis(1999)),
            Err(FleetError::LeaseTooShort { .. })
        ));
        assert!(LeaseConfig::new(MIN_TTL).is_ok());
        assert!(matches!(
            LeaseConfig::with_margin(MIN_TTL, Duration::ZERO),
            Err(FleetError::BadMargin { .. })
        ));
        assert!(matches!(
            LeaseConfig::with_margin(MIN_TTL, MIN_TTL),
            Err(FleetError::BadMargin { .. })
        ));
    }

    #[test]
    fn r10_2_local_validity_is_send_time_plus_ttl_minus_margin() {
        let c = LeaseConfig::default();
        let l = c.local_lease(
            LeaseId(1),
            Duration::from_secs(100),
            Duration::from_secs(10),
        );
        assert_eq!(l.valid_until, Duration::from_secs(108));
        assert!(l.is_valid(Duration::from_millis(107_999)));
        assert!(!l.is_valid(Duration::from_secs(108)));
        // A store granting less than asked shortens the local view, never the other way.
        let short = c.local_lease(LeaseId(1), Duration::from_secs(100), Duration::from_secs(5));
        assert_eq!(short.valid_until, Duration::from_secs(103));
        let long = c.local_lease(
            LeaseId(1),
            Duration::from_secs(100),
            Duration::from_secs(60),
        );
        assert_eq!(long.valid_until, Duration::from_secs(108));
        assert!(c.renew_interval() < c.ttl() - c.margin());
        assert_eq!(
            LeaseConfig::with_margin(Duration::from_millis(2500), Duration::from_millis(500))
                .expect("cfg")
                .ttl_secs(),
            3
        );
    }
}
