//! ESP header view (RFC 4303).
//!
//! What it does: validates and reads the clear-text part of an ESP packet: the Security
//! Parameters Index and the sequence number. A 1:1 NAT (SPEC R1.1) translates ESP by address
//! only; nothing in ESP is covered by an IP-level checksum, so nothing here needs rewriting.
//!
//! What it does not do: no decryption, no integrity check, no UDP encapsulation (RFC 3948
//! NAT-T is plain UDP to this crate), no PAT (ESP has no ports).

use crate::field::{esp, get_u32};
use crate::WireError;

/// A view of an ESP packet in a byte buffer.
///
/// Built with [`new_checked`](Self::new_checked) every accessor is in bounds. Built with
/// [`new_unchecked`](Self::new_unchecked) accessors may panic on a malformed buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EspPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> EspPacket<T> {
    /// Wrap a buffer without any validation.
    #[inline]
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wrap a buffer after [`check_len`](Self::check_len).
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Validate: buffer >= 8 bytes.
    #[inline]
    pub fn check_len(&self) -> Result<(), WireError> {
        if self.buffer.as_ref().len() < esp::HEADER_LEN {
            return Err(WireError::EspTruncated);
        }
        Ok(())
    }

    /// The underlying buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The Security Parameters Index.
    #[inline]
    pub fn spi(&self) -> u32 {
        get_u32(self.buffer.as_ref(), esp::SPI)
    }

    /// The sequence number.
    #[inline]
    pub fn seq(&self) -> u32 {
        get_u32(self.buffer.as_ref(), esp::SEQ)
    }

    /// The encrypted payload, ICV included (bytes after the 8-byte header).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[esp::HEADER_LEN..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self, Ipv4Spec};

    #[test]
    fn accessors() {
        let b = testutil::build_esp(&Ipv4Spec::default(), 0xdead_beef, 42, &[9; 12]);
        let p = EspPacket::new_checked(&b[20..]).unwrap();
        assert_eq!(p.spi(), 0xdead_beef);
        assert_eq!(p.seq(), 42);
        assert_eq!(p.payload(), &[9; 12]);
        assert_eq!(p.into_inner().len(), 20);
    }

    #[test]
    fn error_truncated() {
        assert_eq!(
            EspPacket::new_checked(&[0u8; 7][..]),
            Err(WireError::EspTruncated)
        );
    }
}
