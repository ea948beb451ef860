//! Minimal DNS message encoding and parsing (RFC 1035), just enough for the "which IP am I"
//! responder (R6.4) and its client.
//!
//! What it does: parses a query with one question; builds responses with A and TXT records
//! (names compressed to the question); builds queries; parses responses into their A and
//! TXT records (following compression pointers).
//!
//! What it does not do: EDNS, TCP, recursion, other record types, multiple questions.

use std::net::Ipv4Addr;

/// Record type A.
pub const TYPE_A: u16 = 1;
/// Record type TXT.
pub const TYPE_TXT: u16 = 16;
/// Query type ANY.
pub const TYPE_ANY: u16 = 255;
/// Class IN.
pub const CLASS_IN: u16 = 1;
/// Response code: no error.
pub const RCODE_NOERROR: u8 = 0;
/// Response code: malformed query.
pub const RCODE_FORMERR: u8 = 1;
/// Response code: name does not exist.
pub const RCODE_NXDOMAIN: u8 = 3;
/// Response code: not implemented (e.g. not a standard query).
pub const RCODE_NOTIMP: u8 = 4;
/// Response code: refused (name outside the zone).
pub const RCODE_REFUSED: u8 = 5;

/// Errors parsing a DNS message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// The message ended before a field it announced.
    #[error("DNS message truncated")]
    Truncated,
    /// A name is malformed (label too long, bad pointer, pointer loop, not UTF-8).
    #[error("bad DNS name")]
    BadName,
    /// The message is not what was expected (not a query, no question, wrong ID...).
    #[error("unexpected DNS message: {0}")]
    Unexpected(&'static str),
}

/// The question of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Message ID.
    pub id: u16,
    /// Header flags of the query.
    pub flags: u16,
    /// Name in lower case, without the trailing dot.
    pub name: String,
    /// Query type.
    pub qtype: u16,
    /// Query class.
    pub qclass: u16,
    /// End offset of the question in the query (the question is `query[12..qend]`).
    pub qend: usize,
}

/// Record data the responder produces.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RData {
    /// An IPv4 address.
    A(Ipv4Addr),
    /// One TXT character-string (at most 255 bytes).
    Txt(String),
}

impl RData {
    fn rtype(&self) -> u16 {
        match self {
            RData::A(_) => TYPE_A,
            RData::Txt(_) => TYPE_TXT,
        }
    }
}

/// A parsed response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Response {
    /// Message ID.
    pub id: u16,
    /// Response code.
    pub rcode: u8,
    /// A and TXT records from the answer and additional sections (other types skipped).
    pub records: Vec<RData>,
}

fn u16_at(b: &[u8], i: usize) -> Result<u16, DnsError> {
    b.get(i..i + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or(DnsError::Truncated)
}

/// Reads a (possibly compressed) name at `pos`; returns it and the offset after it.
fn read_name(msg: &[u8], mut pos: usize) -> Result<(String, usize), DnsError> {
    let mut name = String::new();
    let mut end = None;
    let mut jumps = 0;
    loop {
        let len = *msg.get(pos).ok_or(DnsError::Truncated)?;
        match len {
            0 => {
                return Ok((name, end.unwrap_or(pos + 1)));
            }
            l if l & 0xc0 == 0xc0 => {
                let ptr = usize::from(u16_at(msg, pos)? & 0x3fff);
                end.get_or_insert(pos + 2);
                jumps += 1;
                if jumps > 16 || ptr >= msg.len() {
                    return Err(DnsError::BadName);
                }
                pos = ptr;
            }
            l if l & 0xc0 != 0 => return Err(DnsError::BadName),
            l => {
                let l = usize::from(l);
                let label = msg.get(pos + 1..pos + 1 + l).ok_or(DnsError::Truncated)?;
                let label = std::str::from_utf8(label).map_err(|_| DnsError::BadName)?;
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(&label.to_ascii_lowercase());
                if name.len() > 253 {
                    return Err(DnsError::BadName);
                }
                pos += 1 + l;
            }
        }
    }
}

fn write_name(out: &mut Vec<u8>, name: &str) -> Result<(), DnsError> {
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        if label.len() > 63 {
            return Err(DnsError::BadName);
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    Ok(())
}

/// Parses a standard query with exactly one question.
pub fn parse_query(msg: &[u8]) -> Result<Question, DnsError> {
    if msg.len() < 12 {
        return Err(DnsError::Truncated);
    }
    let id = u16_at(msg, 0)?;
    let flags = u16_at(msg, 2)?;
    if flags & 0x8000 != 0 {
        return Err(DnsError::Unexpected("not a query"));
    }
    if u16_at(msg, 4)? != 1 {
        return Err(DnsError::Unexpected("question count is not 1"));
    }
    let (name, p) = read_name(msg, 12)?;
    let qtype = u16_at(msg, p)?;
    let qclass = u16_at(msg, p + 2)?;
    Ok(Question {
        id,
        flags,
        name,
        qtype,
        qclass,
        qend: p + 4,
    })
}

/// Builds a query for `name`/`qtype` (class IN, recursion desired) into `out`.
pub fn build_query(id: u16, name: &str, qtype: u16, out: &mut Vec<u8>) -> Result<(), DnsError> {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    write_name(out, name)?;
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(())
}

/// Builds the response to `q` (whose raw bytes are `query`): `answers` in the answer section
/// and `additional` in the additional section, all owned by the question's name (TTL 0).
pub fn build_response(
    q: &Question,
    query: &[u8],
    rcode: u8,
    answers: &[RData],
    additional: &[RData],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR=1, opcode copied, AA=1, RD copied, RA=0.
    let flags = 0x8000 | (q.flags & 0x7800) | 0x0400 | (q.flags & 0x0100) | u16::from(rcode & 0xf);
    out.extend_from_slice(&flags.to_be_bytes());
    let has_q = q.qend <= query.len();
    out.extend_from_slice(&u16::from(has_q).to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&(additional.len() as u16).to_be_bytes());
    if has_q {
        out.extend_from_slice(&query[12..q.qend]);
    }
    for rr in answers.iter().chain(additional) {
        out.extend_from_slice(&[0xc0, 12]); // pointer to the question's name
        out.extend_from_slice(&rr.rtype().to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes()); // TTL 0: never cache "my IP"
        match rr {
            RData::A(ip) => {
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&ip.octets());
            }
            RData::Txt(s) => {
                let b = &s.as_bytes()[..s.len().min(255)];
                out.extend_from_slice(&(b.len() as u16 + 1).to_be_bytes());
                out.push(b.len() as u8);
                out.extend_from_slice(b);
            }
        }
    }
    out
}

/// A minimal error response (header only) for a message that could not be parsed as a
/// query; `None` if not even the ID is there.
pub fn build_error(msg: &[u8], rcode: u8) -> Option<Vec<u8>> {
    let id = msg.get(..2)?;
    let mut out = id.to_vec();
    out.extend_from_slice(&(0x8000u16 | u16::from(rcode & 0xf)).to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    Some(out)
}

/// Parses a response, collecting its A and TXT records.
pub fn parse_response(msg: &[u8]) -> Result<Response, DnsError> {
    if msg.len() < 12 {
        return Err(DnsError::Truncated);
    }
    let id = u16_at(msg, 0)?;
    let flags = u16_at(msg, 2)?;
    if flags & 0x8000 == 0 {
        return Err(DnsError::Unexpected("not a response"));
    }
    let qd = u16_at(msg, 4)?;
    let rr_count =
        usize::from(u16_at(msg, 6)?) + usize::from(u16_at(msg, 8)?) + usize::from(u16_at(msg, 10)?);
    let mut p = 12;
    for _ in 0..qd {
        p = read_name(msg, p)?.1 + 4;
    }
    let mut records = Vec::new();
    for _ in 0..rr_count {
        p = read_name(msg, p)?.1;
        let rtype = u16_at(msg, p)?;
        let rdlen = usize::from(u16_at(msg, p + 8)?);
        let rdata = msg.get(p + 10..p + 10 + rdlen).ok_or(DnsError::Truncated)?;
        match rtype {
            TYPE_A if rdlen == 4 => records.push(RData::A(Ipv4Addr::new(
                rdata[0], rdata[1], rdata[2], rdata[3],
            ))),
            TYPE_TXT => {
                let mut s = String::new();
                let mut i = 0;
                while i < rdata.len() {
                    let l = usize::from(rdata[i]);
                    let part = rdata.get(i + 1..i + 1 + l).ok_or(DnsError::Truncated)?;
                    s.push_str(&String::from_utf8_lossy(part));
                    i += 1 + l;
                }
                records.push(RData::Txt(s));
            }
            _ => {}
        }
        p += 10 + rdlen;
    }
    Ok(Response {
        id,
        rcode: (flags & 0xf) as u8,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_response_roundtrip() {
        let mut q = Vec::new();
        build_query(0x1234, "MyIP.snatgw.test.", TYPE_A, &mut q).unwrap();
        let parsed = parse_query(&q).unwrap();
        assert_eq!(parsed.id, 0x1234);
        assert_eq!(parsed.name, "myip.snatgw.test");
        assert_eq!(parsed.qtype, TYPE_A);
        assert_eq!(parsed.qclass, CLASS_IN);
        assert_eq!(parsed.qend, q.len());
        let ip = Ipv4Addr::new(203, 0, 113, 10);
        let resp = build_response(
            &parsed,
            &q,
            RCODE_NOERROR,
            &[RData::A(ip)],
            &[RData::Txt("203.0.113.10:40000".into())],
        );
        let r = parse_response(&resp).unwrap();
        assert_eq!(r.id, 0x1234);
        assert_eq!(r.rcode, 0);
        assert_eq!(
            r.records,
            vec![RData::A(ip), RData::Txt("203.0.113.10:40000".into())]
        );
        // The header says: response, authoritative, RD copied.
        assert_eq!(u16::from_be_bytes([resp[2], resp[3]]) & 0x8500, 0x8500);
    }

    #[test]
    fn malformed_inputs() {
        assert_eq!(parse_query(&[0; 5]), Err(DnsError::Truncated));
        let mut q = Vec::new();
        build_query(1, "a.b", TYPE_A, &mut q).unwrap();
        assert!(parse_query(&q[..q.len() - 3]).is_err());
        // Pointer loop.
        let mut bad = q[..12].to_vec();
        bad.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_query(&bad), Err(DnsError::BadName));
        assert!(build_query(1, &"x".repeat(64), TYPE_A, &mut q).is_err());
        let e = build_error(&[0xab, 0xcd, 1], RCODE_FORMERR).unwrap();
        assert_eq!(&e[..4], &[0xab, 0xcd, 0x80, 0x01]);
        assert!(build_error(&[1], RCODE_FORMERR).is_none());
    }
}
