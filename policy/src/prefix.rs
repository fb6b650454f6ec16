//! IP prefixes of either family, as policies and the ipcache use them.
//!
//! Both families live in one 128-bit space (IPv4 as `::ffff:a.b.c.d`, its
//! length plus 96), which is also how the datapath's ipcache is keyed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A masked prefix (host bits cleared).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

const V4_MAPPED: u128 = 0xffff << 32;

fn mask128(len: u8) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) }
}

impl Prefix {
    /// The prefix of `addr` with `len` bits; host bits are cleared. None
    /// when `len` is longer than the family allows.
    pub fn new(addr: IpAddr, len: u8) -> Option<Prefix> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return None;
        }
        let (bits, mapped_len) = match addr {
            IpAddr::V4(a) => (V4_MAPPED | u128::from(u32::from(a)), len + 96),
            IpAddr::V6(a) => (u128::from(a), len),
        };
        let masked = bits & mask128(mapped_len);
        let addr = match addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(masked as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(masked)),
        };
        Some(Prefix { addr, len })
    }

    /// One address as a full-length prefix.
    pub fn host(addr: IpAddr) -> Prefix {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Prefix { addr, len }
    }

    /// `a.b.c.d/n`, `x::y/n`, or (`bare_address_ok`) a plain address.
    /// Host bits are accepted and cleared, as upstream reads them.
    pub fn parse(s: &str, bare_address_ok: bool) -> Result<Prefix, String> {
        match s.split_once('/') {
            Some((ip, len)) => {
                let ip: IpAddr = ip.parse().map_err(|_| format!("{s:?} is not a CIDR"))?;
                let len: u8 = len
                    .parse()
                    .ok()
                    .filter(|_: &u8| !len.starts_with('+'))
                    .ok_or_else(|| format!("{s:?} is not a CIDR"))?;
                Prefix::new(ip, len).ok_or_else(|| format!("{s:?}: prefix length {len} is too long"))
            }
            None if bare_address_ok => {
                let ip: IpAddr = s.parse().map_err(|_| format!("{s:?} is neither an IP address nor a CIDR"))?;
                Ok(Prefix::host(ip))
            }
            None => Err(format!("{s:?} is not a CIDR (address/length)")),
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in its own family.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Address and length in the shared 128-bit space.
    pub fn mapped(&self) -> (u128, u8) {
        match self.addr {
            IpAddr::V4(a) => (V4_MAPPED | u128::from(u32::from(a)), self.len + 96),
            IpAddr::V6(a) => (u128::from(a), self.len),
        }
    }

    /// Whether `other` lies inside this prefix (same family, equal or longer).
    pub fn contains(&self, other: &Prefix) -> bool {
        if self.is_ipv4() != other.is_ipv4() || other.len < self.len {
            return false;
        }
        let (a, l) = self.mapped();
        let (b, _) = other.mapped();
        b & mask128(l) == a
    }

    pub fn contains_addr(&self, addr: IpAddr) -> bool {
        self.contains(&Prefix::host(addr))
    }

    /// The key of upstream's CIDR label (`cidr:<key>`): the prefix, with
    /// IPv6 colons written as dashes.
    pub fn label_key(&self) -> String {
        self.to_string().replace(':', "-")
    }

    /// Reads a CIDR label key back (`10.0.0.0/8`, `2001-db8--/32`).
    pub fn from_label_key(key: &str) -> Option<Prefix> {
        Prefix::parse(&key.replace('-', ":"), false).ok()
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        Prefix::parse(s, true).unwrap()
    }

    #[test]
    fn parse_masks_host_bits_and_reads_bare_addresses() {
        assert_eq!(p("10.200.13.9/24").to_string(), "10.200.13.0/24");
        assert_eq!(p("10.0.0.1").to_string(), "10.0.0.1/32");
        assert_eq!(p("2001:db8::1/32").to_string(), "2001:db8::/32");
        assert!(Prefix::parse("10.0.0.1", false).is_err());
        assert!(Prefix::parse("10.0.0.0/33", true).is_err());
        assert!(Prefix::parse("10.0.0.0/+8", true).is_err());
        assert!(Prefix::parse("banana/8", true).is_err());
    }

    #[test]
    fn containment_is_per_family() {
        assert!(p("10.0.0.0/8").contains(&p("10.1.0.0/16")));
        assert!(!p("10.1.0.0/16").contains(&p("10.0.0.0/8")));
        assert!(p("0.0.0.0/0").contains(&p("192.0.2.1")));
        assert!(!p("::/0").contains(&p("192.0.2.1")), "families never contain each other");
        assert!(p("::/0").contains(&p("2001:db8::1")));
    }

    #[test]
    fn label_keys_round_trip() {
        assert_eq!(p("2001:db8::/32").label_key(), "2001-db8--/32");
        assert_eq!(Prefix::from_label_key("2001-db8--/32"), Some(p("2001:db8::/32")));
        assert_eq!(Prefix::from_label_key("10.0.0.0/8"), Some(p("10.0.0.0/8")));
    }
}
