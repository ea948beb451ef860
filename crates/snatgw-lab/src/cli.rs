//! The command line of the lab's servers and clients, shared by the `snatgw-lab-server`
//! binary and the hidden `snatgw-lab lab-server` subcommand (so the one lab tool binary can
//! serve the whole lab). `serve` runs every server until killed; `client ...` runs one client
//! and prints its [`ClientReport`] as one JSON line (exit 0 when nothing failed, 1 otherwise).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use crate::{client, dns, server, ClientReport};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "snatgw-lab-server", about = "snatgw lab servers and clients")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every server on every --addr until killed.
    Serve(ServeArgs),
    /// Run one client command and print its report as one JSON line.
    #[command(subcommand)]
    Client(ClientCmd),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (repeatable; must be local).
    #[arg(long = "addr", required = true)]
    addrs: Vec<Ipv4Addr>,
    /// DNS zone: answers myip.ZONE.
    #[arg(long, default_value = "snatgw.test")]
    zone: String,
    /// TCP/UDP echo port.
    #[arg(long, default_value_t = 7)]
    echo_port: u16,
    /// HTTP port.
    #[arg(long, default_value_t = 80)]
    http_port: u16,
    /// DNS port.
    #[arg(long, default_value_t = 53)]
    dns_port: u16,
    /// Hold port.
    #[arg(long, default_value_t = 9000)]
    hold_port: u16,
    /// Log every request to stderr.
    #[arg(long)]
    verbose: bool,
}

#[derive(Args)]
struct Common {
    /// Target `ip:port` (or `ip`, for the command's default port).
    target: String,
    /// Number of operations.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Limit per operation, in seconds.
    #[arg(long, default_value_t = 3.0)]
    timeout: f64,
}

#[derive(Subcommand)]
enum ClientCmd {
    /// `GET /myip` (default port 80).
    MyipHttp(#[command(flatten)] Common),
    /// TCP echo, one connection per --count (default port 7).
    TcpEcho {
        #[command(flatten)]
        common: Common,
        /// Bytes per connection.
        #[arg(long, default_value_t = 1000)]
        size: usize,
    },
    /// UDP echo, --count datagrams from one socket (default port 7).
    UdpEcho {
        #[command(flatten)]
        common: Common,
        /// Bytes per datagram.
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
    /// DNS query for myip.ZONE (default port 53).
    Dns {
        #[command(flatten)]
        common: Common,
        /// Name to query.
        #[arg(long, default_value = "myip.snatgw.test")]
        name: String,
        /// Query type.
        #[arg(long, value_enum, default_value_t = QType::A)]
        qtype: QType,
    },
    /// Open --count concurrent connections to the hold server (default port 9000), report,
    /// keep them open for --hold seconds, close.
    Hold {
        #[command(flatten)]
        common: Common,
        /// Seconds to keep the connections open after reporting.
        #[arg(long, default_value_t = 0.0)]
        hold: f64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum QType {
    A,
    Txt,
    Any,
}

/// `ip:port`, or `ip` with `default_port`.
fn target(s: &str, default_port: u16) -> Result<SocketAddr, std::net::AddrParseError> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 86_400.0))
}

fn print(r: &ClientReport) {
    let line = serde_json::to_string(r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs the servers/clients command line with `args` (the first item is the program name),
/// as the `snatgw-lab-server` binary and `snatgw-lab lab-server` do.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    match cli.cmd {
        Cmd::Serve(a) => {
            let cfg = server::ServerConfig {
                zone: a.zone,
                ports: server::Ports {
                    echo: a.echo_port,
                    http: a.http_port,
                    dns: a.dns_port,
                    hold: a.hold_port,
                },
                verbose: a.verbose,
                ..server::ServerConfig::new(a.addrs.clone())
            };
            let addrs: Vec<String> = a.addrs.iter().map(|a| format!("\"{a}\"")).collect();
            let res = server::serve(&cfg, || {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(
                    out,
                    "{{\"event\":\"ready\",\"addrs\":[{}]}}",
                    addrs.join(",")
                );
                let _ = out.flush();
            });
            match res {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("snatgw-lab-server: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Client(c) => {
            crate::raise_nofile_limit();
            let (common, default_port) = match &c {
                ClientCmd::MyipHttp(c) => (c, 80),
                ClientCmd::TcpEcho { common, .. } | ClientCmd::UdpEcho { common, .. } => {
                    (common, 7)
                }
                ClientCmd::Dns { common, .. } => (common, 53),
                ClientCmd::Hold { common, .. } => (common, 9000),
            };
            let addr = match target(&common.target, default_port) {
                Ok(a) => a,
                Err(_) => {
                    eprintln!(
                        "snatgw-lab-server: bad target {:?}: want ip or ip:port",
                        common.target
                    );
                    return ExitCode::from(2);
                }
            };
            let (count, t) = (common.count, secs(common.timeout));
            let report = match &c {
                ClientCmd::MyipHttp(_) => client::myip_http(addr, count, t),
                ClientCmd::TcpEcho { size, .. } => client::tcp_echo(addr, count, *size, t),
                ClientCmd::UdpEcho { size, .. } => client::udp_echo(addr, count, *size, t),
                ClientCmd::Dns { name, qtype, .. } => {
                    let q = match qtype {
                        QType::A => dns::TYPE_A,
                        QType::Txt => dns::TYPE_TXT,
                        QType::Any => dns::TYPE_ANY,
                    };
                    client::dns_myip(addr, name, q, count, t)
                }
                ClientCmd::Hold { hold, .. } => client::hold(addr, count, t, secs(*hold), print),
            };
            if !matches!(c, ClientCmd::Hold { .. }) {
                print(&report);
            }
            if report.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}
