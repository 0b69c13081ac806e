//! Address ranges (`10.0.0.0/8`, `2001:db8::/32`, or one address) for IP rules and trusted
//! proxies. An IPv4-mapped IPv6 address (`::ffff:10.1.2.3`, what a dual-stack socket reports)
//! is matched as the IPv4 address it carries.

use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network, as IPv6 bits (IPv4 in the low 32 bits with `v4`).
    net: u128,
    /// The prefix's bits set, in the same layout.
    mask: u128,
    v4: bool,
}

impl Cidr {
    /// `ADDR` or `ADDR/BITS`; the address's host bits must be zero.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR range"))?;
        let (value, max, v4) = match canonical(ip) {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32, true),
            IpAddr::V6(a) => (u128::from(a), 128, false),
        };
        let bits = match bits {
            None => max,
            Some(b) => match b.parse::<u8>() {
                Ok(b) if b <= max => b,
                _ => return Err(format!("{s:?}: the prefix length must be 0-{max}")),
            },
        };
        let mask = mask(bits, max);
        let net = value & mask;
        if net != value {
            return Err(format!("{s:?} has bits set past its /{bits} prefix"));
        }
        Ok(Cidr { net, mask, v4 })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        any_contains(std::slice::from_ref(self), ip)
    }
}

/// Whether any range of `list` holds `ip` (the address is put in the ranges' layout once).
pub fn any_contains(list: &[Cidr], ip: IpAddr) -> bool {
    let (value, v4) = match canonical(ip) {
        IpAddr::V4(a) => (u128::from(u32::from(a)), true),
        IpAddr::V6(a) => (u128::from(a), false),
    };
    list.iter().any(|c| c.v4 == v4 && value & c.mask == c.net)
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The top `bits` of a `width`-bit address set.
fn mask(bits: u8, width: u8) -> u128 {
    if bits == 0 {
        return 0;
    }
    let all = if width == 32 {
        u128::from(u32::MAX)
    } else {
        u128::MAX
    };
    all & !((1u128 << (width - bits)) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_v6_and_mapped_addresses_match_their_ranges() {
        let net = Cidr::parse("203.0.113.0/24").unwrap();
        assert!(net.contains(ip("203.0.113.7")));
        assert!(net.contains(ip("::ffff:203.0.113.7")));
        assert!(!net.contains(ip("203.0.114.1")));
        assert!(!net.contains(ip("2001:db8::1")));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("203.0.113.7")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("::1")));
        let one = Cidr::parse("10.1.2.3").unwrap();
        assert!(one.contains(ip("10.1.2.3")) && !one.contains(ip("10.1.2.4")));
    }

    #[test]
    fn malformed_ranges_are_refused() {
        assert!(Cidr::parse("10.0.0.1/8").unwrap_err().contains("bits set"));
        assert!(Cidr::parse("10.0.0.0/33").unwrap_err().contains("0-32"));
        assert!(Cidr::parse("2001:db8::/129").unwrap_err().contains("0-128"));
        assert!(Cidr::parse("example.com").is_err());
    }
}
