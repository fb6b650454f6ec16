//! IP prefixes and the checks a cluster-pool configuration must pass.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Address family of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// An IP prefix in canonical form (host bits zero). Addresses are kept as
/// `u128` (IPv4 in the low 32 bits) so both families share the arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    family: Family,
    addr: u128,
    prefix: u8,
}

/// Why a configuration or a CIDR string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not a CIDR (expected address/prefix, e.g. 10.0.0.0/8)")]
    Malformed(String),
    #[error("{input:?} has host bits set (did you mean {canonical}?)")]
    HostBits { input: String, canonical: Cidr },
    #[error("{cidr} is not an {family} CIDR")]
    WrongFamily { cidr: Cidr, family: Family },
    #[error("{a} overlaps {b}")]
    Overlap { a: Cidr, b: Cidr },
    #[error("mask size {mask} must be between the pool prefix length {prefix} of {cidr} and {max}")]
    MaskSize { mask: u8, prefix: u8, cidr: Cidr, max: u8 },
}

impl CidrError {
    /// A stable label for metrics and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            CidrError::Malformed(_) => "malformed",
            CidrError::HostBits { .. } => "host-bits",
            CidrError::WrongFamily { .. } => "wrong-family",
            CidrError::Overlap { .. } => "overlap",
            CidrError::MaskSize { .. } => "mask-size",
        }
    }
}

impl Cidr {
    pub fn new(ip: IpAddr, prefix: u8) -> Result<Cidr, CidrError> {
        let (family, addr) = match ip {
            IpAddr::V4(a) => (Family::V4, u32::from(a) as u128),
            IpAddr::V6(a) => (Family::V6, u128::from(a)),
        };
        if prefix > family.bits() {
            return Err(CidrError::Malformed(format!("{ip}/{prefix}")));
        }
        let c = Cidr { family, addr: addr & mask(family, prefix), prefix };
        if c.addr != addr {
            return Err(CidrError::HostBits { input: format!("{ip}/{prefix}"), canonical: c });
        }
        Ok(c)
    }

    pub fn family(&self) -> Family {
        self.family
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// First address, as an integer (IPv4 in the low 32 bits).
    pub fn first(&self) -> u128 {
        self.addr
    }

    /// Last address, as an integer.
    pub fn last(&self) -> u128 {
        self.addr | !mask(self.family, self.prefix) & family_all(self.family)
    }

    pub fn ip(&self) -> IpAddr {
        match self.family {
            Family::V4 => IpAddr::V4((self.addr as u32).into()),
            Family::V6 => IpAddr::V6(self.addr.into()),
        }
    }

    pub fn contains(&self, other: &Cidr) -> bool {
        self.family == other.family
            && self.prefix <= other.prefix
            && self.first() <= other.first()
            && other.last() <= self.last()
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.family == other.family && self.first() <= other.last() && other.first() <= self.last()
    }
}

fn family_all(f: Family) -> u128 {
    match f {
        Family::V4 => u32::MAX as u128,
        Family::V6 => u128::MAX,
    }
}

fn mask(f: Family, prefix: u8) -> u128 {
    let bits = f.bits();
    if prefix == 0 { 0 } else { (family_all(f) << (bits - prefix)) & family_all(f) }
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let t = s.trim();
        let (ip, prefix) = t.split_once('/').ok_or_else(|| CidrError::Malformed(s.to_string()))?;
        let ip: IpAddr = ip.parse().map_err(|_| CidrError::Malformed(s.to_string()))?;
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.len() > 3 {
            return Err(CidrError::Malformed(s.to_string()));
        }
        let prefix: u8 = prefix.parse().map_err(|_| CidrError::Malformed(s.to_string()))?;
        Cidr::new(ip, prefix).map_err(|e| match e {
            CidrError::Malformed(_) => CidrError::Malformed(s.to_string()),
            other => other,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip(), self.prefix)
    }
}

/// Checks one family's pool list: every CIDR of that family, no two
/// overlapping, and each pool at least as large as the per-node mask.
pub fn validate_pools(family: Family, pools: &[Cidr], mask_size: u8) -> Result<(), CidrError> {
    for (i, c) in pools.iter().enumerate() {
        if c.family != family {
            return Err(CidrError::WrongFamily { cidr: *c, family });
        }
        if mask_size < c.prefix || mask_size > family.bits() {
            return Err(CidrError::MaskSize { mask: mask_size, prefix: c.prefix, cidr: *c, max: family.bits() });
        }
        if let Some(b) = pools[..i].iter().find(|b| b.overlaps(c)) {
            return Err(CidrError::Overlap { a: *c, b: *b });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_both_families() {
        assert_eq!(c("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(c("fd00::/104").to_string(), "fd00::/104");
        assert_eq!(c("10.1.2.0/24").last(), u32::from(std::net::Ipv4Addr::new(10, 1, 2, 255)) as u128);
        assert_eq!(c("0.0.0.0/0").last(), u32::MAX as u128);
    }

    #[test]
    fn refuses_malformed() {
        for bad in ["10.0.0.0", "10.0.0.0/33", "10.0.0/8", "fd00::/129", "x/8", "10.0.0.0/", "10.0.0.0/-1"] {
            assert!(matches!(bad.parse::<Cidr>(), Err(CidrError::Malformed(_))), "{bad}");
        }
        assert!(matches!("10.0.0.1/8".parse::<Cidr>(), Err(CidrError::HostBits { .. })));
    }

    #[test]
    fn overlap_and_containment() {
        assert!(c("10.0.0.0/8").overlaps(&c("10.1.0.0/16")));
        assert!(c("10.1.0.0/16").overlaps(&c("10.0.0.0/8")));
        assert!(!c("10.0.0.0/16").overlaps(&c("10.1.0.0/16")));
        assert!(c("10.0.0.0/8").contains(&c("10.1.0.0/16")));
        assert!(!c("10.1.0.0/16").contains(&c("10.0.0.0/8")));
        assert!(!c("10.0.0.0/8").overlaps(&c("::/0")));
    }

    #[test]
    fn validates_pools() {
        assert_eq!(validate_pools(Family::V4, &[c("10.0.0.0/8"), c("11.0.0.0/16")], 24), Ok(()));
        assert!(matches!(
            validate_pools(Family::V4, &[c("10.0.0.0/8"), c("10.1.0.0/16")], 24),
            Err(CidrError::Overlap { .. })
        ));
        assert!(matches!(validate_pools(Family::V4, &[c("fd00::/104")], 24), Err(CidrError::WrongFamily { .. })));
        assert!(matches!(validate_pools(Family::V4, &[c("10.0.0.0/24")], 16), Err(CidrError::MaskSize { .. })));
        assert!(matches!(validate_pools(Family::V4, &[c("10.0.0.0/8")], 33), Err(CidrError::MaskSize { .. })));
        assert_eq!(validate_pools(Family::V6, &[c("fd00::/104")], 120), Ok(()));
    }
}
