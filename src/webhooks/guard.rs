//! The address guard: a webhook URL makes our servers connect where a tenant says, so
//! every URL is vetted when it is registered and again at every attempt (its host resolved
//! once, the connection made only to the addresses vetted — DNS rebinding gets nowhere).
//! Loopback, private, link-local (cloud metadata), shared (CGNAT), multicast, unspecified,
//! reserved and documentation ranges are refused, and so are IPv6 forms that embed an IPv4
//! address (mapped, compatible, NAT64, 6to4, Teredo). The operator's allow-list is the only
//! way around it, and the only destinations that may use plain http.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use url::{Host, Url};

/// One allow-list entry: a network (`10.1.0.0/16`, a bare address is a /32 or /128) or one
/// address and port (`127.0.0.1:9000`, `[::1]:9000`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allow {
    Net(IpAddr, u8),
    Addr(SocketAddr),
}

impl FromStr for Allow {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Allow::Addr(a));
        }
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| "expected an IP address, a network (ip/prefix) or ip:port".to_string())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Allow::Net(ip, len))
    }
}

impl Allow {
    pub fn permits(&self, a: SocketAddr) -> bool {
        match self {
            Allow::Addr(x) => *x == a,
            Allow::Net(net, len) => in_net(a.ip(), *net, *len),
        }
    }
}

fn in_net(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().expect("constant"))
}

/// The class an address belongs to when webhooks may not go there, else `None`.
pub fn refused_class(ip: IpAddr) -> Option<&'static str> {
    let ranges: [(IpAddr, u8, &'static str); 27] = [
        (v4(0, 0, 0, 0), 8, "unspecified (this network)"),
        (v4(10, 0, 0, 0), 8, "private"),
        (v4(100, 64, 0, 0), 10, "shared address space (CGNAT)"),
        (v4(127, 0, 0, 0), 8, "loopback"),
        (v4(169, 254, 0, 0), 16, "link-local (cloud metadata)"),
        (v4(172, 16, 0, 0), 12, "private"),
        (v4(192, 0, 0, 0), 24, "IETF protocol assignments"),
        (v4(192, 0, 2, 0), 24, "documentation"),
        (v4(192, 88, 99, 0), 24, "6to4 relay anycast"),
        (v4(192, 168, 0, 0), 16, "private"),
        (v4(198, 18, 0, 0), 15, "benchmarking"),
        (v4(198, 51, 100, 0), 24, "documentation"),
        (v4(203, 0, 113, 0), 24, "documentation"),
        (v4(224, 0, 0, 0), 4, "multicast"),
        (v4(240, 0, 0, 0), 4, "reserved (broadcast included)"),
        (v6("::"), 128, "unspecified"),
        (v6("::1"), 128, "loopback"),
        (v6("::ffff:0:0"), 96, "IPv4-mapped IPv6"),
        (v6("::"), 96, "IPv4-compatible IPv6"),
        (v6("64:ff9b::"), 96, "NAT64 (embeds an IPv4 address)"),
        (v6("64:ff9b:1::"), 48, "NAT64 (embeds an IPv4 address)"),
        (v6("100::"), 64, "discard-only"),
        (v6("2001::"), 32, "Teredo (embeds an IPv4 address)"),
        (v6("2001:db8::"), 32, "documentation"),
        (v6("2002::"), 16, "6to4 (embeds an IPv4 address)"),
        (v6("fc00::"), 7, "unique local (private)"),
        (v6("fe80::"), 10, "link-local"),
    ];
    let more: [(IpAddr, u8, &'static str); 2] = [
        (v6("fec0::"), 10, "site-local"),
        (v6("ff00::"), 8, "multicast"),
    ];
    ranges
        .iter()
        .chain(more.iter())
        .find(|(net, len, _)| in_net(ip, *net, *len))
        .map(|(_, _, c)| *c)
        // of IPv6, only global unicast (2000::/3) is reachable on the internet
        .or_else(|| {
            (ip.is_ipv6() && !in_net(ip, v6("2000::"), 3)).then_some("not global unicast IPv6")
        })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuardError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unresolved(String),
}

/// A vetted destination: the URL, its host, and the only addresses it may be reached at.
#[derive(Clone, Debug)]
pub struct Target {
    pub url: Url,
    /// The host as written when it is a name (the connection is pinned to `addrs`).
    pub domain: Option<String>,
    pub addrs: Vec<SocketAddr>,
}

/// The URL's shape, without resolving: absolute http(s), a host, no credentials, no
/// fragment, at most 2,048 bytes.
pub fn parse(raw: &str) -> Result<Url, GuardError> {
    if raw.len() > 2048 {
        return Err(GuardError::Invalid("url is longer than 2048 bytes".into()));
    }
    let url = Url::parse(raw).map_err(|e| GuardError::Invalid(format!("url: {e}")))?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(GuardError::Invalid(format!(
            "url scheme must be https, not {:?}",
            url.scheme()
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(GuardError::Invalid(
            "url must not carry credentials (user:password@)".into(),
        ));
    }
    if url.fragment().is_some() {
        return Err(GuardError::Invalid("url must not have a fragment".into()));
    }
    if url.host().is_none() {
        return Err(GuardError::Invalid("url needs a host".into()));
    }
    Ok(url)
}

/// Vet a URL: resolve its host once and check every address it resolves to. A refused
/// address anywhere in the answer refuses the URL (a name that resolves to a public and a
/// private address is not half-trusted).
pub async fn vet(raw: &str, allow: &[Allow]) -> Result<Target, GuardError> {
    let url = parse(raw)?;
    let port = url
        .port_or_known_default()
        .ok_or_else(|| GuardError::Invalid("url needs a port".into()))?;
    let (domain, addrs) = match url.host() {
        Some(Host::Ipv4(ip)) => (None, vec![SocketAddr::new(IpAddr::V4(ip), port)]),
        Some(Host::Ipv6(ip)) => (None, vec![SocketAddr::new(IpAddr::V6(ip), port)]),
        Some(Host::Domain(d)) => {
            let d = d.to_string();
            let found = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::lookup_host((d.as_str(), port)),
            )
            .await
            .map_err(|_| GuardError::Unresolved(format!("resolving {d:?} timed out")))?
            .map_err(|e| GuardError::Unresolved(format!("{d:?} does not resolve: {e}")))?;
            let mut addrs: Vec<SocketAddr> = found.collect();
            addrs.sort();
            addrs.dedup();
            if addrs.is_empty() {
                return Err(GuardError::Unresolved(format!("{d:?} has no addresses")));
            }
            (Some(d), addrs)
        }
        None => return Err(GuardError::Invalid("url needs a host".into())),
    };
    check_addrs(&url, &addrs, allow)?;
    Ok(Target { url, domain, addrs })
}

/// Every address must be allow-listed or outside the refused classes; plain http only to
/// allow-listed destinations.
pub fn check_addrs(url: &Url, addrs: &[SocketAddr], allow: &[Allow]) -> Result<(), GuardError> {
    let mut all_allowed = true;
    for a in addrs {
        if allow.iter().any(|x| x.permits(*a)) {
            continue;
        }
        all_allowed = false;
        if let Some(class) = refused_class(a.ip()) {
            return Err(GuardError::Refused(format!(
                "webhooks may not be sent to {} ({class})",
                a.ip()
            )));
        }
    }
    if url.scheme() != "https" && !all_allowed {
        return Err(GuardError::Refused(
            "url must use https (plain http only to destinations on the operator's allow-list)"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        for (ip, refused) in [
            ("127.0.0.1", true),
            ("127.8.9.10", true),
            ("10.0.0.1", true),
            ("172.16.5.4", true),
            ("172.32.0.1", false),
            ("192.168.1.1", true),
            ("169.254.169.254", true),
            ("100.64.0.1", true),
            ("100.128.0.1", false),
            ("0.0.0.0", true),
            ("224.0.0.1", true),
            ("255.255.255.255", true),
            ("8.8.8.8", false),
            ("::", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:8.8.8.8", true),
            ("::ffff:0:8.8.8.8", true),
            ("5f00::1", true),
            ("::127.0.0.1", true),
            ("64:ff9b::a00:1", true),
            ("2002:7f00:1::", true),
            ("fd00::1", true),
            ("fe80::1", true),
            ("ff02::1", true),
            ("2606:4700::1111", false),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(refused_class(ip).is_some(), refused, "{ip}");
        }
    }

    #[tokio::test]
    async fn spellings_of_loopback_are_refused() {
        for u in [
            "http://127.0.0.1/",
            "https://127.0.0.1/",
            "https://2130706433/",
            "https://0x7f000001/",
            "https://0x7f.0.0.1/",
            "https://0177.0.0.1/",
            "https://127.1/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::ffff:7f00:1]/",
            "https://[::1]/",
            "https://[0:0:0:0:0:0:0:1]/",
            "https://localhost/",
            "https://0.0.0.0/",
            "https://169.254.169.254/latest/meta-data/",
        ] {
            let e = vet(u, &[]).await.unwrap_err();
            assert!(matches!(e, GuardError::Refused(_)), "{u}: {e:?}");
        }
    }

    #[tokio::test]
    async fn shape_and_allow_list() {
        assert!(matches!(
            vet("ftp://8.8.8.8/", &[]).await,
            Err(GuardError::Invalid(_))
        ));
        assert!(matches!(
            vet("https://u:p@8.8.8.8/", &[]).await,
            Err(GuardError::Invalid(_))
        ));
        assert!(matches!(
            vet("not a url", &[]).await,
            Err(GuardError::Invalid(_))
        ));
        // public, https: fine; public, http: refused
        assert!(vet("https://8.8.8.8/hook", &[]).await.is_ok());
        assert!(matches!(
            vet("http://8.8.8.8/hook", &[]).await,
            Err(GuardError::Refused(_))
        ));
        let allow: Vec<Allow> = vec!["127.0.0.1:9999".parse().unwrap()];
        assert!(vet("http://127.0.0.1:9999/x", &allow).await.is_ok());
        assert!(vet("http://127.0.0.1:9998/x", &allow).await.is_err());
        assert!(vet("http://[::ffff:127.0.0.1]:9999/x", &allow)
            .await
            .is_err());
        let net: Allow = "10.1.0.0/16".parse().unwrap();
        assert!(net.permits("10.1.200.3:443".parse().unwrap()));
        assert!(!net.permits("10.2.0.1:443".parse().unwrap()));
        assert!("10.1.0.0/33".parse::<Allow>().is_err());
        assert!("[::1]:80".parse::<Allow>().is_ok());
    }
}
