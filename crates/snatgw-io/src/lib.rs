//! snatgw-io: packet I/O (TUN, later AF_XDP). The one crate allowed `unsafe`.
