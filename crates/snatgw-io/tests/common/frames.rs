//! Frames for the fast path's netns tests: sending an Ethernet frame out of an interface (it
//! arrives at its veth peer's ingress, where a program is attached), capturing what arrives on
//! one, and building or checking IPv4/TCP packets. Included with `#[path]` by the tests that
//! use it (tests/fastpath_stash.rs).

#![allow(dead_code)]

/// Sends `frame` (an Ethernet frame) out of interface `ifindex` with a packet socket: it
/// arrives at the veth peer's ingress. Opens and closes a socket, which takes an RCU grace
/// period (some 10 ms): many frames go through a [`Sender`].
pub fn send_frame(ifindex: u32, frame: &[u8]) {
    Sender::open(ifindex).send(frame);
}

/// A packet socket sending frames out of one interface.
pub struct Sender {
    fd: i32,
    ifindex: u32,
}

impl Sender {
    pub fn open(ifindex: u32) -> Sender {
        // SAFETY: a plain libc call; the descriptor is owned by the returned value.
        #[allow(unsafe_code)]
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        Sender { fd, ifindex }
    }

    /// Sends `frame` (an Ethernet frame, to the MAC address it starts with).
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: `sll` is a fully initialised sockaddr_ll and `frame` a valid buffer, both
        // outliving the call, on the socket this value owns.
        #[allow(unsafe_code)]
        unsafe {
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = self.ifindex as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&frame[..6]);
            let r = libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::addr_of!(sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            let e = std::io::Error::last_os_error();
            assert_eq!(r, frame.len() as isize, "sendto: {e}");
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        // SAFETY: closes the descriptor this value owns, once.
        #[allow(unsafe_code)]
        unsafe {
            libc::close(self.fd);
        }
    }
}

/// The one's-complement sum of `b` (big-endian 16-bit words, an odd byte padded), folded.
pub fn ones_sum(b: &[u8], mut s: u32) -> u32 {
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s
}

/// The one's-complement sum check of an IPv4 header: 0 when its checksum is right.
pub fn ip_header_sum(h: &[u8]) -> u16 {
    !(ones_sum(h, 0) as u16)
}

/// The TCP checksum sum of IPv4 packet `ip` (header without options), pseudo-header
/// included: 0xffff when the checksum field is right.
pub fn tcp_sum(ip: &[u8]) -> u16 {
    let len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let seg = &ip[20..len];
    let mut pseudo = ip[12..20].to_vec();
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((len - 20) as u16).to_be_bytes());
    ones_sum(seg, ones_sum(&pseudo, 0)) as u16
}

/// A unicast Ethernet + IPv4 + TCP frame (no payload, TTL 64) with TCP flags byte `flags`,
/// both checksums right. Unicast: `bpf_redirect_neigh` drops a broadcast frame.
pub fn tcp_frame(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let sum = ip_header_sum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&sport.to_be_bytes());
    ip.extend_from_slice(&dport.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    let c = !tcp_sum(&ip);
    ip[36..38].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f
}

/// A packet socket on `ifname` that sees every frame arriving there (a capture).
pub struct Capture(i32);

impl Capture {
    pub fn open(ifname: &str) -> Capture {
        let ifindex = snatgw_io::fastpath::ifindex(ifname).expect("ifindex");
        // SAFETY: plain libc calls on a socket this struct owns (closed on drop); `sll` and
        // `tv` are fully initialised and outlive the calls.
        #[allow(unsafe_code)]
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            );
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = ifindex as i32;
            let r = libc::bind(
                fd,
                std::ptr::addr_of!(sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 300_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            Capture(fd)
        }
    }

    /// The next frame `want` accepts (other frames skipped), or `None` after a quiet 300 ms.
    pub fn next_where(&self, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 4096];
        loop {
            // SAFETY: `buf` is a writable buffer of the length passed, alive for the call.
            #[allow(unsafe_code)]
            let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return None;
            }
            let f = &buf[..n as usize];
            if want(f) {
                return Some(f.to_vec());
            }
        }
    }

    /// The IPv4 packet (without its Ethernet header) of the next IPv4/TCP frame, or `None`
    /// after a quiet 300 ms.
    pub fn next_tcp(&self) -> Option<Vec<u8>> {
        self.next_where(|f| f.len() >= 54 && f[12..14] == [0x08, 0x00] && f[23] == 6)
            .map(|f| f[14..].to_vec())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // SAFETY: closes the descriptor this struct owns, once.
        #[allow(unsafe_code)]
        unsafe {
            libc::close(self.0);
        }
    }
}

/// The MAC address of `ifname` (from `ip`: /sys is the host's).
pub fn mac_of(ifname: &str) -> [u8; 6] {
    let l = crate::common::ip(&["-o", "link", "show", ifname]);
    let m = l
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("MAC address");
    let v: Vec<u8> = m
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("hex"))
        .collect();
    v.try_into().expect("6 bytes")
}

/// `aa:bb:..` of a MAC address.
pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
