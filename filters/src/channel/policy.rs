//! Which addresses a channel's host may resolve to: link-local and cloud-metadata
//! addresses are refused in every spelling, private ones per `security.private_upstreams`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::Deserialize;

/// `security.private_upstreams`: whether a channel may resolve to a loopback or private
/// (RFC 1918, CGNAT, unique-local) address. Allowed by default (local and LAN models are
/// common), with a `check-config` warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivateUpstreams {
    #[default]
    Allow,
    Deny,
}

/// The kind of network an upstream address is on, judged on the address itself (an
/// IPv4-mapped, IPv4-compatible, NAT64 or 6to4 IPv6 address as the IPv4 address it carries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrClass {
    Public,
    /// 127.0.0.0/8, ::1, and the unspecified 0.0.0.0/8 and :: (which reach this host).
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7, fec0::/10.
    Private,
    /// 169.254.0.0/16 and fe80::/10.
    LinkLocal,
    /// A cloud instance-metadata endpoint: 169.254.169.254, 169.254.170.2,
    /// 100.100.100.200, fd00:ec2::254.
    Metadata,
}

/// Host names of cloud instance-metadata services, refused like their addresses.
const METADATA_HOSTS: &[&str] = &[
    "metadata.google.internal",
    "metadata.goog",
    "metadata",
    "instance-data",
    "instance-data.ec2.internal",
];

/// The class of `ip`; see [`AddrClass`].
pub fn classify(ip: IpAddr) -> AddrClass {
    let v4 = match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => match embedded_v4(&v6) {
            Some(v4) => v4,
            None => return classify_v6(&v6),
        },
    };
    let o = v4.octets();
    match o {
        [169, 254, 169, 254] | [169, 254, 170, 2] | [100, 100, 100, 200] => AddrClass::Metadata,
        [169, 254, ..] => AddrClass::LinkLocal,
        [127, ..] | [0, ..] => AddrClass::Loopback,
        [10, ..] | [192, 168, ..] => AddrClass::Private,
        [172, b, ..] if (16..32).contains(&b) => AddrClass::Private,
        [100, b, ..] if (64..128).contains(&b) => AddrClass::Private,
        _ => AddrClass::Public,
    }
}

/// The IPv4 address an IPv6 address stands for: mapped (`::ffff:a.b.c.d`), compatible
/// (`::a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`) or 6to4 (`2002:AABB:CCDD::`).
fn embedded_v4(v6: &Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail),
        // `::` and `::1` are themselves, not 0.0.0.0 and 0.0.0.1.
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        [0, 0, 0, 0, 0, 0, _, _] | [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail),
        [0x2002, a, b, ..] => Some(Ipv4Addr::new(
            (a >> 8) as u8,
            a as u8,
            (b >> 8) as u8,
            b as u8,
        )),
        _ => None,
    }
}

fn classify_v6(v6: &Ipv6Addr) -> AddrClass {
    let s = v6.segments();
    if s == [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254] {
        AddrClass::Metadata
    } else if v6.is_loopback() || v6.is_unspecified() {
        AddrClass::Loopback
    } else if s[0] & 0xffc0 == 0xfe80 {
        AddrClass::LinkLocal
    } else if s[0] & 0xfe00 == 0xfc00 || s[0] & 0xffc0 == 0xfec0 {
        AddrClass::Private
    } else {
        AddrClass::Public
    }
}

/// Which upstream addresses a channel may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpstreamPolicy {
    /// `channels[].allow_link_local`.
    pub allow_link_local: bool,
    /// `security.private_upstreams`.
    pub private: PrivateUpstreams,
}

impl UpstreamPolicy {
    /// Refuses a cloud-metadata host name (unless link-local is allowed).
    pub fn check_name(&self, host: &str) -> Result<(), String> {
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        if !self.allow_link_local && METADATA_HOSTS.contains(&name.as_str()) {
            return Err(format!(
                "names a cloud metadata service (`{name}`); set allow_link_local: true on the channel if that is meant"
            ));
        }
        Ok(())
    }

    /// Refuses an address the policy does not allow; `Ok(Some(class))` for an allowed
    /// loopback or private address (worth a warning), `Ok(None)` for a public one.
    pub fn check_addr(&self, ip: IpAddr) -> Result<Option<AddrClass>, String> {
        match classify(ip) {
            AddrClass::Public => Ok(None),
            c @ (AddrClass::LinkLocal | AddrClass::Metadata) if self.allow_link_local => {
                Ok(Some(c))
            }
            AddrClass::LinkLocal => Err(format!(
                "resolves to the link-local address {ip}; set allow_link_local: true on the channel if that is meant"
            )),
            AddrClass::Metadata => Err(format!(
                "resolves to {ip}, a cloud metadata address; set allow_link_local: true on the channel if that is meant"
            )),
            c @ (AddrClass::Loopback | AddrClass::Private) => match self.private {
                PrivateUpstreams::Allow => Ok(Some(c)),
                PrivateUpstreams::Deny => Err(format!(
                    "resolves to the {} address {ip}, and security.private_upstreams is deny",
                    if c == AddrClass::Loopback { "loopback" } else { "private" }
                )),
            },
        }
    }

    /// Checks a host and every address it resolved to. Returns the allowed loopback or
    /// private addresses (for a warning), or why the host is refused.
    pub fn check_resolved(
        &self,
        host: &str,
        addrs: &[SocketAddr],
    ) -> Result<Vec<(IpAddr, AddrClass)>, String> {
        self.check_name(host)?;
        let mut notable = Vec::new();
        for a in addrs {
            if let Some(c) = self.check_addr(a.ip())? {
                notable.push((a.ip(), c));
            }
        }
        Ok(notable)
    }
}

/// Whether `host` is an IPv4 address in one of the spellings `inet_aton` accepts (decimal
/// `2852039166`, octal `0251.0376.0251.0376`, hex `0xa9fea9fe`, short forms `169.254.43518`):
/// the OS turns these into an address without asking DNS.
pub fn is_numeric_host(host: &str) -> bool {
    let parts: Vec<&str> = host.split('.').collect();
    parts.len() <= 4
        && parts.iter().all(|l| {
            let hex = l.len() > 2 && l[..2].eq_ignore_ascii_case("0x");
            (!l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
                || (hex && l[2..].bytes().all(|b| b.is_ascii_hexdigit()))
        })
}
