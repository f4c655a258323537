//! The two URI types of CloudEvents context attributes (RFC 3986): `source` is a
//! URI-reference (§4.1), `dataschema` an absolute URI (§4.3). The check is syntactic:
//! the characters a URI may hold, well-formed percent-encoding, a valid scheme where there
//! is one, brackets only around an IP literal host, and no colon in the first segment of a
//! relative reference (it would read as a scheme).

/// Why `s` is not a URI-reference, if it is not.
pub(crate) fn reference_problem(s: &str) -> Option<&'static str> {
    let (rest, fragment) = match s.split_once('#') {
        Some((r, f)) => (r, Some(f)),
        None => (s, None),
    };
    if let Some(f) = fragment {
        if let Some(p) = chars_problem(f) {
            return Some(p);
        }
    }
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    if let Some(q) = query {
        if let Some(p) = chars_problem(q) {
            return Some(p);
        }
    }
    // a colon before the first slash ends a scheme; a relative reference cannot have one
    let hier = match before_query.find([':', '/']) {
        Some(i) if before_query.as_bytes()[i] == b':' => {
            if !valid_scheme(&before_query[..i]) {
                return Some("has an invalid scheme (or a colon in its first path segment)");
            }
            &before_query[i + 1..]
        }
        _ => before_query,
    };
    let path = match hier.strip_prefix("//") {
        Some(after) => {
            let end = after.find('/').unwrap_or(after.len());
            let authority = &after[..end];
            if let Some(p) = authority_problem(authority) {
                return Some(p);
            }
            &after[end..]
        }
        None => hier,
    };
    chars_problem(path)
}

/// Why `s` is not an absolute URI (a scheme, no fragment), if it is not.
pub(crate) fn absolute_problem(s: &str) -> Option<&'static str> {
    if s.contains('#') {
        return Some("must not have a fragment");
    }
    match s.split_once(':') {
        Some((scheme, _)) if valid_scheme(scheme) => reference_problem(s),
        _ => Some("must be an absolute URI with a scheme"),
    }
}

/// scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
fn valid_scheme(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphabetic()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
}

fn authority_problem(a: &str) -> Option<&'static str> {
    // [ userinfo "@" ] host [ ":" port ]; an IP literal host is bracketed; userinfo holds
    // no "@", so there is at most one
    let (user, host_port) = match a.split_once('@') {
        Some((u, hp)) => (u, hp),
        None => ("", a),
    };
    if host_port.contains('@') {
        return Some("has more than one @ in its authority");
    }
    if let Some(p) = chars_problem(user) {
        return Some(p);
    }
    let (host, port) = match host_port.strip_prefix('[') {
        Some(inner) => {
            let Some((literal, rest)) = inner.split_once(']') else {
                return Some("has an unclosed IP literal");
            };
            if !ip_literal(literal) {
                return Some("has an invalid IP literal");
            }
            match rest {
                "" => ("", None),
                _ => match rest.strip_prefix(':') {
                    Some(port) => ("", Some(port)),
                    None => return Some("has characters after its IP literal"),
                },
            }
        }
        None => match host_port.split_once(':') {
            Some((h, port)) => (h, Some(port)),
            None => (host_port, None),
        },
    };
    if port.is_some_and(|p| !all_digits(p)) {
        return Some("has an invalid port");
    }
    chars_problem(host)
}

/// IP-literal = IPv6address / IPvFuture ("v" 1*HEXDIG "." 1*( unreserved / sub-delims / ":" ))
fn ip_literal(s: &str) -> bool {
    if let Some(rest) = s.strip_prefix(['v', 'V']) {
        let Some((version, tail)) = rest.split_once('.') else {
            return false;
        };
        return !version.is_empty()
            && version.bytes().all(|c| c.is_ascii_hexdigit())
            && !tail.is_empty()
            && chars_problem(tail).is_none()
            && !tail.contains(['/', '?', '@', '%']);
    }
    s.parse::<std::net::Ipv6Addr>().is_ok()
}

fn all_digits(s: &str) -> bool {
    s.bytes().all(|c| c.is_ascii_digit())
}

/// Only unreserved, sub-delims, ":", "@", "/", "?" and well-formed "%XX" (brackets are
/// for IP literals, which the authority checks itself).
fn chars_problem(s: &str) -> Option<&'static str> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            if i + 2 >= b.len() || !(b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit()) {
                return Some("has a malformed percent-encoding");
            }
            i += 3;
            continue;
        }
        let ok = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'@'
                    | b'/'
                    | b'?'
            );
        if !ok {
            return Some(
                "holds a character a URI may not (spaces and the like must be percent-encoded)",
            );
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_references_follow_rfc_3986() {
        for ok in [
            "router",
            "/mycontext/subcontext",
            "tokenledger/loadgen",
            "https://gw.example.com/v1?x=1#frag",
            "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66",
            "mailto:ops@example.com",
            "//host:8080/p",
            "http://[::1]:4222/x",
            "http://user@[fe80::1]/",
            "a%20b",
            "./a:b",
            "?q",
            "#f",
            "cid:abc",
            "http://[v1.fe80::a+en1]/",
            "http://user:pw@host:8080/p",
            "http://host:/p",
        ] {
            assert_eq!(reference_problem(ok), None, "{ok}");
        }
        for bad in [
            "a b",
            "a\"b",
            "%zz",
            "%2",
            "a%",
            "1http://x",
            ":x",
            "a#b#c",
            "http://[::1/x",
            "http://[zz]/",
            "http://h/[x]",
            "é",
            "a<b>",
            "a\\b",
            "a{b}",
            "http://host:abc/",
            "http://a:b:c/",
            "http://a@b@c/",
            "http://[vvvv]/",
            "http://[:::::::::]/",
            "http://[::1]x/",
        ] {
            assert!(reference_problem(bad).is_some(), "{bad}");
        }
        assert_eq!(
            absolute_problem("https://example.com/schema/usage.json"),
            None
        );
        assert_eq!(absolute_problem("urn:example:usage:v1"), None);
        for bad in ["/schema", "schema.json", "https://x/#f", "a b:c", "//h/p"] {
            assert!(absolute_problem(bad).is_some(), "{bad}");
        }
    }
}
