//! The error type of this crate.
//!
//! Every variant names one malformation, so the data plane can count drops by reason
//! (see [`WireError::reason`]). Errors carry no allocation.

/// Why a packet (or a rewrite request) was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The buffer is shorter than the 20-byte minimum IPv4 header.
    #[error("buffer too short for an IPv4 header ({len} < 20 bytes)")]
    Ipv4TooShort {
        /// Length of the buffer.
        len: usize,
    },
    /// The IP version field is not 4.
    #[error("IP version {0} is not 4")]
    BadVersion(u8),
    /// The IHL field is below 5 (the header would be shorter than 20 bytes).
    #[error("IPv4 IHL {0} is below 5")]
    BadIhl(u8),
    /// The IPv4 header length (IHL * 4) is larger than the total length field.
    #[error("IPv4 header length {header_len} exceeds total length {total_len}")]
    HeaderLenExceedsTotalLen {
        /// IHL * 4.
        header_len: usize,
        /// The total length field.
        total_len: usize,
    },
    /// The IPv4 total length field is larger than the buffer.
    #[error("IPv4 total length {total_len} exceeds buffer length {buffer_len}")]
    TotalLenExceedsBuffer {
        /// The total length field.
        total_len: usize,
        /// Length of the buffer.
        buffer_len: usize,
    },
    /// Fewer bytes than the TCP header needs (20 bytes, or the data offset) in an unfragmented
    /// packet or a first fragment.
    #[error("TCP header truncated")]
    TcpTruncated,
    /// The TCP data offset is below 5 words.
    #[error("TCP data offset {0} is below 5")]
    BadTcpDataOffset(u8),
    /// Fewer than 8 bytes for the UDP header.
    #[error("UDP header truncated")]
    UdpTruncated,
    /// The UDP length field is below 8 or larger than the available bytes.
    #[error("UDP length {len} inconsistent with {available} available bytes")]
    BadUdpLength {
        /// The UDP length field.
        len: u16,
        /// Bytes available for the datagram (IP payload or view buffer).
        available: usize,
    },
    /// Fewer than 8 bytes for the ICMP header.
    #[error("ICMP header truncated")]
    IcmpTruncated,
    /// An ICMP error message does not carry the quoted IPv4 header (IHL respected) plus the
    /// 8 bytes of its transport header that the NAT needs.
    #[error("ICMP error quotes a truncated packet")]
    IcmpInnerTruncated,
    /// The IPv4 header quoted by an ICMP error has a version other than 4 or an IHL below 5.
    #[error("ICMP error quotes a malformed IPv4 header")]
    IcmpInnerBadHeader,
    /// Fewer than 8 bytes for the ESP header (SPI and sequence number).
    #[error("ESP header truncated")]
    EspTruncated,
    /// A rewrite was asked with a [`Summary`](crate::Summary) that does not describe the buffer
    /// (lengths, protocol or offsets disagree). The buffer was not modified.
    #[error("summary does not match the packet bytes")]
    SummaryMismatch,
    /// An ICMP error rewrite was asked for a packet that is not an ICMP error message.
    #[error("packet is not an ICMP error message")]
    NotIcmpError,
}

impl WireError {
    /// A short, stable, snake_case label for counters and structured logs.
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::Ipv4TooShort { .. } => "ipv4_too_short",
            Self::BadVersion(_) => "bad_ip_version",
            Self::BadIhl(_) => "bad_ihl",
            Self::HeaderLenExceedsTotalLen { .. } => "header_len_exceeds_total_len",
            Self::TotalLenExceedsBuffer { .. } => "total_len_exceeds_buffer",
            Self::TcpTruncated => "tcp_truncated",
            Self::BadTcpDataOffset(_) => "bad_tcp_data_offset",
            Self::UdpTruncated => "udp_truncated",
            Self::BadUdpLength { .. } => "bad_udp_length",
            Self::IcmpTruncated => "icmp_truncated",
            Self::IcmpInnerTruncated => "icmp_inner_truncated",
            Self::IcmpInnerBadHeader => "icmp_inner_bad_header",
            Self::EspTruncated => "esp_truncated",
            Self::SummaryMismatch => "summary_mismatch",
            Self::NotIcmpError => "not_icmp_error",
        }
    }
}
