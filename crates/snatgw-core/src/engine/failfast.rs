//! Fail fast (SPEC R9.5): whether a refused new flow is answered to its instance.
//!
//! With `gateway.on_exhaustion = "reset"`, a new flow of an instance that the engine refuses
//! for want of a port (R2.6, `ports_exhausted`) or over a flow limit (R9.2, `flow_limit`) is
//! answered at once, so the application fails in milliseconds instead of waiting for its
//! timeout: a TCP SYN with a RST, a UDP datagram with ICMP destination unreachable, code 13
//! (administratively prohibited). The refusal itself is unchanged and counted as before
//! (drop reason, `conn_fail`, event, journal), answered or not.
//!
//! The engine decides and counts here; it never sees bytes. The data plane asks
//! [`Engine::fail_fast`] what a refusal deserves, checks that it can write that answer over
//! the refused packet (room in its buffer, a TCP segment it can compute the acknowledgement
//! for), then takes a token with [`Engine::fail_fast_admit`], which counts the answer or its
//! suppression, and writes the bytes. So the counters say exactly what was sent.
//!
//! Not answered: anything with `on_exhaustion = "drop"` (the default); other drop reasons;
//! inbound traffic (answers go to instances only, never to the internet); a TCP segment
//! that is not a SYN (only a SYN starts a flow, R3.1); an ICMP error (never answered with
//! another, RFC 1122 §3.2.2); a packet to a multicast or broadcast address (RFC 1122
//! §3.2.2, §4.2.3.10).
//!
//! Rate limit: one token bucket per instance, refilled with [`FAIL_FAST_PER_SEC`] tokens per
//! second of engine time up to [`FAIL_FAST_BURST`]; a refusal finding it empty is dropped
//! unanswered and counted as suppressed. It bounds what a client retrying in a tight loop
//! makes the gateway send back, like the kernel's own ICMP rate limit. The bucket is the
//! instance's: one busy instance cannot use up another's answers.

use super::stats::stats_bucket;
use super::Engine;
use crate::config::OnExhaustion;
use crate::packet::{proto, tcp_flags, Answer, DropReason, Packet};
use crate::units::Time;

/// Fail-fast answers one instance gets per second (SPEC R9.5 decision).
pub const FAIL_FAST_PER_SEC: u32 = 100;
/// Most fail-fast answers one instance gets in a burst (a full bucket).
pub const FAIL_FAST_BURST: u32 = 100;

/// A token bucket in whole seconds of engine time.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bucket {
    tokens: u32,
    at: Time,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            tokens: FAIL_FAST_BURST,
            at: 0,
        }
    }
}

impl Bucket {
    /// Refills for the seconds since the last take and takes one token if there is one.
    fn take(&mut self, now: Time) -> bool {
        let elapsed = now.saturating_sub(self.at);
        if elapsed > 0 {
            let refill = elapsed.saturating_mul(FAIL_FAST_PER_SEC);
            self.tokens = self.tokens.saturating_add(refill).min(FAIL_FAST_BURST);
            self.at = now;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// ICMP types that are errors (RFC 792, RFC 1812): never answered with another error.
fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 4 | 5 | 11 | 12)
}

/// Multicast (224.0.0.0/4) or limited broadcast.
fn is_group_address(a: u32) -> bool {
    a >> 28 == 0xe || a == u32::MAX
}

impl Engine {
    /// What the refusal of outbound packet `p` for `reason` deserves (SPEC R9.5): `None`
    /// when it is only dropped (`on_exhaustion = "drop"`, another reason, not an instance's
    /// packet, a TCP segment that is not a SYN, an ICMP error, a multicast or broadcast
    /// destination). Changes nothing; call [`Engine::fail_fast_admit`] before sending.
    pub fn fail_fast(&self, p: &Packet, reason: DropReason) -> Option<Answer> {
        if self.topo.params.on_exhaustion != OnExhaustion::Reset
            || !matches!(reason, DropReason::PortsExhausted | DropReason::FlowLimit)
            || !self.by_private.contains_key(&p.src)
            || is_group_address(p.dst)
        {
            return None;
        }
        match p.proto {
            proto::TCP => (p.flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST)
                == tcp_flags::SYN)
                .then_some(Answer::TcpReset),
            proto::ICMP if is_icmp_error(p.flags) => None,
            _ => Some(Answer::IcmpAdminProhibited),
        }
    }

    /// Takes a token of the instance at `p.src` for `answer` at `now` (SPEC R9.5 rate
    /// limit) and counts the answer (`fail_fast_answered`, `fail_fast_rst` /
    /// `fail_fast_icmp`) or its suppression (`fail_fast_suppressed`). Returns whether to
    /// send it. `false` also when `p.src` is no instance.
    pub fn fail_fast_admit(&mut self, now: Time, p: &Packet, answer: Answer) -> bool {
        let now = now.max(self.now);
        let Some(&slot) = self.by_private.get(&p.src) else {
            return false;
        };
        let Some(inst) = self.insts[slot as usize].as_mut() else {
            return false;
        };
        let st = &mut inst.stats[stats_bucket(p.proto)];
        if !inst.answers.take(now) {
            st.fail_fast_suppressed += 1;
            self.global.fail_fast_suppressed += 1;
            return false;
        }
        st.fail_fast_answered += 1;
        match answer {
            Answer::TcpReset => self.global.fail_fast_rst += 1,
            Answer::IcmpAdminProhibited => self.global.fail_fast_icmp += 1,
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_gives_a_burst_then_the_rate_per_second() {
        let mut b = Bucket::default();
        let n = (0..FAIL_FAST_BURST + 10).filter(|_| b.take(5)).count() as u32;
        assert_eq!(n, FAIL_FAST_BURST);
        assert!(!b.take(5));
        let n = (0..FAIL_FAST_BURST + 10).filter(|_| b.take(6)).count() as u32;
        assert_eq!(n, FAIL_FAST_PER_SEC.min(FAIL_FAST_BURST));
        // A long pause refills to the burst, never beyond.
        let n = (0..FAIL_FAST_BURST * 3)
            .filter(|_| b.take(u32::MAX))
            .count() as u32;
        assert_eq!(n, FAIL_FAST_BURST);
    }

    #[test]
    fn group_addresses() {
        assert!(is_group_address(0xe000_0001));
        assert!(is_group_address(0xefff_fffa));
        assert!(is_group_address(u32::MAX));
        assert!(!is_group_address(0xc633_6407));
    }
}
