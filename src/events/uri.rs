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
    // [ userinfo "@" ] host [ ":" port ]; an IP literal host is bracketed
    let (user, host_port) = match a.rsplit_once('@') {
        Some((u, hp)) => (u, hp),
        None => ("", a),
    };
    if let Some(p) = chars_problem(user) {
        return Some(p);
    }
    if let Some(inner) = host_port.strip_prefix('[') {
        let Some((literal, port)) = inner.split_once(']') else {
            return Some("has an unclosed IP literal");
        };
        if literal.is_empty()
            || !literal
                .bytes()
                .all(|c| c.is_ascii_hexdigit() || matches!(c, b':' | b'.' | b'v' | b'V'))
        {
            return Some("has an invalid IP literal");
        }
        if !(port.is_empty() || port.strip_prefix(':').is_some_and(all_digits)) {
            return Some("has an invalid port");
        }
        return None;
    }
    chars_problem(host_port)
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
