//! snatgw-wire
#![forbid(unsafe_code)]
