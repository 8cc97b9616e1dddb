//! Which IP addresses are on the public internet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why `ip` is not a public internet address, or `None` when it is.
///
/// IPv4: refused are 0.0.0.0/8 (this network, incl. unspecified), 10/8, 172.16/12, 192.168/16
/// (private), 100.64/10 (shared/CGNAT), 127/8 (loopback), 169.254/16 (link-local, cloud metadata),
/// 192.0.0/24 (IETF protocol assignments), 192.0.2/24, 198.51.100/24, 203.0.113/24
/// (documentation), 192.88.99/24 (6to4 relay anycast), 198.18/15 (benchmarking), 224/4
/// (multicast), 240/4 (reserved) and 255.255.255.255 (broadcast).
///
/// IPv6: only global unicast 2000::/3 is allowed, minus 2001::/23 (IETF protocol assignments,
/// incl. Teredo), 2001:db8::/32 and 3fff::/20 (documentation), 5f00::/16 is outside 2000::/3
/// anyway. Forms that embed an IPv4 address are judged by it: IPv4-mapped `::ffff:a.b.c.d`,
/// NAT64 `64:ff9b::a.b.c.d` and 6to4 `2002:AABB:CCDD::/48`. Everything else outside 2000::/3 is
/// refused with a reason: `::`, `::1`, IPv4-compatible `::a.b.c.d` (deprecated), IPv4-translated
/// `::ffff:0:a.b.c.d`, local-use NAT64 64:ff9b:1::/48, discard 100::/64, unique-local fc00::/7,
/// link-local fe80::/10, site-local fec0::/10, multicast ff00::/8.
pub fn non_public_reason(ip: IpAddr) -> Option<String> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4).map(str::to_string),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    const TABLE: &[([u8; 4], u32, &str)] = &[
        ([0, 0, 0, 0], 32, "the unspecified address (0.0.0.0)"),
        ([0, 0, 0, 0], 8, "in 'this network' (0.0.0.0/8)"),
        ([10, 0, 0, 0], 8, "private (10.0.0.0/8)"),
        (
            [100, 64, 0, 0],
            10,
            "shared address space / carrier-grade NAT (100.64.0.0/10)",
        ),
        ([127, 0, 0, 0], 8, "loopback (127.0.0.0/8)"),
        (
            [169, 254, 0, 0],
            16,
            "link-local (169.254.0.0/16, cloud metadata services)",
        ),
        ([172, 16, 0, 0], 12, "private (172.16.0.0/12)"),
        (
            [192, 0, 0, 0],
            24,
            "reserved for IETF protocol assignments (192.0.0.0/24)",
        ),
        ([192, 0, 2, 0], 24, "reserved for documentation (192.0.2.0/24)"),
        (
            [192, 88, 99, 0],
            24,
            "the deprecated 6to4 relay anycast range (192.88.99.0/24)",
        ),
        ([192, 168, 0, 0], 16, "private (192.168.0.0/16)"),
        ([198, 18, 0, 0], 15, "reserved for benchmarking (198.18.0.0/15)"),
        ([198, 51, 100, 0], 24, "reserved for documentation (198.51.100.0/24)"),
        ([203, 0, 113, 0], 24, "reserved for documentation (203.0.113.0/24)"),
        ([224, 0, 0, 0], 4, "multicast (224.0.0.0/4)"),
        ([255, 255, 255, 255], 32, "the broadcast address (255.255.255.255)"),
        ([240, 0, 0, 0], 4, "reserved (240.0.0.0/4)"),
    ];
    TABLE
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map(|(_, _, why)| *why)
}

fn in_v6(ip: Ipv6Addr, net: Ipv6Addr, prefix: u32) -> bool {
    let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
    (u128::from(ip) & mask) == (u128::from(net) & mask)
}

fn v6_reason(ip: Ipv6Addr) -> Option<String> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from(bits as u32);
    let embedded = |form: &str, v4: Ipv4Addr| v4_reason(v4).map(|why| format!("{form} of {v4}, which is {why}"));

    if ip.is_unspecified() {
        return Some("the unspecified address (::)".into());
    }
    if ip.is_loopback() {
        return Some("loopback (::1)".into());
    }
    if in_v6(ip, Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96) {
        return embedded("the IPv4-mapped form", low32);
    }
    if in_v6(ip, Ipv6Addr::UNSPECIFIED, 96) {
        return Some(format!("an IPv4-compatible address (::/96, deprecated) of {low32}"));
    }
    if in_v6(ip, Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, 0, 0), 96) {
        return Some(format!("an IPv4-translated address (::ffff:0:0:0/96) of {low32}"));
    }
    if in_v6(ip, Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96) {
        return embedded("the NAT64 form (64:ff9b::/96)", low32);
    }
    if in_v6(ip, Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48) {
        return Some("local-use NAT64 (64:ff9b:1::/48)".into());
    }
    if in_v6(ip, Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16) {
        return embedded("the 6to4 form (2002::/16)", Ipv4Addr::from((bits >> 80) as u32));
    }
    const TABLE: &[(Ipv6Addr, u32, &str)] = &[
        (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64, "discard-only (100::/64)"),
        (
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
            32,
            "reserved for documentation (2001:db8::/32)",
        ),
        (
            Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0),
            23,
            "reserved for IETF protocol assignments, incl. Teredo (2001::/23)",
        ),
        (
            Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0),
            20,
            "reserved for documentation (3fff::/20)",
        ),
        (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7, "unique-local (fc00::/7)"),
        (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10, "link-local (fe80::/10)"),
        (
            Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0),
            10,
            "site-local (fec0::/10, deprecated)",
        ),
        (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8, "multicast (ff00::/8)"),
    ];
    if let Some((_, _, why)) = TABLE.iter().find(|(net, prefix, _)| in_v6(ip, *net, *prefix)) {
        return Some((*why).into());
    }
    if !in_v6(ip, Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3) {
        return Some("reserved (outside global unicast 2000::/3)".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (address, expected reason fragment or None for public)
    const CASES: &[(&str, Option<&str>)] = &[
        // IPv4 public
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("93.184.216.34", None),
        ("172.15.255.255", None),
        ("172.32.0.0", None),
        ("100.63.255.255", None),
        ("100.128.0.0", None),
        ("169.253.255.255", None),
        ("192.167.255.255", None),
        ("198.20.0.0", None),
        ("223.255.255.255", None),
        ("11.0.0.0", None),
        // IPv4 refused
        ("0.0.0.0", Some("unspecified")),
        ("0.1.2.3", Some("this network")),
        ("10.0.0.1", Some("private")),
        ("10.255.255.255", Some("private")),
        ("172.16.0.1", Some("private")),
        ("172.31.255.255", Some("private")),
        ("192.168.1.1", Some("private")),
        ("100.64.0.1", Some("carrier-grade NAT")),
        ("100.127.255.254", Some("carrier-grade NAT")),
        ("127.0.0.1", Some("loopback")),
        ("127.255.255.254", Some("loopback")),
        ("169.254.169.254", Some("link-local")),
        ("192.0.0.8", Some("IETF")),
        ("192.0.2.1", Some("documentation")),
        ("198.51.100.7", Some("documentation")),
        ("203.0.113.9", Some("documentation")),
        ("192.88.99.1", Some("6to4 relay")),
        ("198.18.0.1", Some("benchmarking")),
        ("198.19.255.255", Some("benchmarking")),
        ("224.0.0.1", Some("multicast")),
        ("239.255.255.250", Some("multicast")),
        ("240.0.0.1", Some("reserved")),
        ("255.255.255.254", Some("reserved")),
        ("255.255.255.255", Some("broadcast")),
        // IPv6 public
        ("2606:4700:4700::1111", None),
        ("2001:4860:4860::8888", None),
        ("2a00:1450:4001:80b::200e", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),
        ("2002:0808:0808::1", None),
        // IPv6 refused
        ("::", Some("unspecified")),
        ("::1", Some("loopback")),
        (
            "::ffff:127.0.0.1",
            Some("IPv4-mapped form of 127.0.0.1, which is loopback"),
        ),
        (
            "::ffff:10.1.2.3",
            Some("IPv4-mapped form of 10.1.2.3, which is private"),
        ),
        ("::ffff:169.254.169.254", Some("link-local")),
        ("::ffff:0.0.0.0", Some("unspecified")),
        ("::127.0.0.1", Some("IPv4-compatible")),
        ("::8.8.8.8", Some("IPv4-compatible")),
        ("::ffff:0:127.0.0.1", Some("IPv4-translated")),
        (
            "64:ff9b::7f00:1",
            Some("NAT64 form (64:ff9b::/96) of 127.0.0.1, which is loopback"),
        ),
        ("64:ff9b::a9fe:a9fe", Some("link-local")),
        ("64:ff9b:1::1", Some("local-use NAT64")),
        ("2002:7f00:0001::1", Some("6to4 form (2002::/16) of 127.0.0.1")),
        ("2002:c0a8:0101::1", Some("private")),
        ("100::1", Some("discard")),
        ("2001::1", Some("Teredo")),
        ("2001:db8::1", Some("documentation")),
        ("3fff::1", Some("documentation")),
        ("fc00::1", Some("unique-local")),
        ("fd12:3456:789a::1", Some("unique-local")),
        ("fe80::1", Some("link-local")),
        ("febf::1", Some("link-local")),
        ("fec0::1", Some("site-local")),
        ("ff02::1", Some("multicast")),
        ("ff0e::1", Some("multicast")),
        ("5f00::1", Some("outside global unicast")),
        ("4000::1", Some("outside global unicast")),
        ("e000::1", Some("outside global unicast")),
        ("1::1", Some("outside global unicast")),
    ];

    #[test]
    fn classifies_address_table() {
        let mut failures = Vec::new();
        for (text, expected) in CASES {
            let ip: IpAddr = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            let got = non_public_reason(ip);
            let ok = match (expected, &got) {
                (None, None) => true,
                (Some(fragment), Some(why)) => why.contains(fragment),
                _ => false,
            };
            if !ok {
                failures.push(format!("{text}: expected {expected:?}, got {got:?}"));
            }
        }
        assert!(failures.is_empty(), "misclassified:\n{}", failures.join("\n"));
    }
}
