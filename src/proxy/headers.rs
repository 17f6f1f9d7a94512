//! Header rewriting between client and upstream.
//!
//! Hop-by-hop headers describe one connection, not the message (RFC 9110 section 7.6.1), so a
//! proxy that forwards them confuses the next hop about framing and keep-alive. The
//! `Forwarded`-style headers tell the upstream who the client was, because the connection it
//! sees comes from the gateway.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::limit::identity::IpText;

/// Headers that never cross a proxy, whatever `Connection` says.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers, including every header named in `Connection`.
///
/// Runs twice per proxied request, so the common cases cost one pass over the names and no
/// allocation: nothing to remove, or only `Connection: keep-alive` itself.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = headers.keys().filter(|name| is_hop_by_hop(name)).count();
    // Headers named by `Connection` are dropped along with it, so a message without any
    // hop-by-hop header has nothing to strip.
    if present == 0 {
        return;
    }
    // What most upstreams send: `Connection: keep-alive` and no other hop-by-hop header.
    if present == 1 {
        let mut values = headers.get_all(header::CONNECTION).iter();
        if let (Some(value), None) = (values.next(), values.next())
            && value.as_bytes().eq_ignore_ascii_case(b"keep-alive")
        {
            headers.remove(header::CONNECTION);
            return;
        }
    }
    // Other headers the sender declared hop-by-hop. The usual tokens (`keep-alive`, `close`,
    // `upgrade`) name a header removed anyway or, mostly, none; they cost no allocation.
    let mut named: Vec<HeaderName> = Vec::new();
    let mut close_listed = false;
    let tokens = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim);
    for token in tokens {
        if token.eq_ignore_ascii_case("close") {
            close_listed = true;
        } else if !token.is_empty()
            && !HOP_BY_HOP
                .iter()
                .any(|name| token.eq_ignore_ascii_case(name.as_str()))
            && let Ok(name) = HeaderName::from_bytes(token.as_bytes())
        {
            named.push(name);
        }
    }
    for name in named {
        headers.remove(name);
    }
    if close_listed {
        headers.remove("close");
    }
    for name in HOP_BY_HOP.iter().chain([&PROXY_CONNECTION]) {
        if present == 0 {
            break;
        }
        if headers.remove(name).is_some() {
            present -= 1;
        }
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-connection"
    )
}

/// Appends the client to `X-Forwarded-For` and sets `X-Forwarded-Proto` and
/// `X-Forwarded-Host` (from the client's `Host`). Call before `Host` is rewritten.
pub fn add_forwarded(headers: &mut HeaderMap, client: IpAddr, proto: &'static str) {
    let mut text = IpText::default();
    let client_text = text.format(client);
    let value = if headers.contains_key(&X_FORWARDED_FOR) {
        let existing: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .collect();
        let chain = format!("{}, {client_text}", existing.join(", "));
        // The comma-joined visible-ASCII values already present are valid header text; if a
        // client sent bytes that are not, the old chain is replaced.
        HeaderValue::from_str(&chain).ok()
    } else {
        None
    };
    // An address printed is digits, dots, colons and hex: always a valid header value.
    let value = value.or_else(|| HeaderValue::from_str(client_text).ok());
    match value {
        Some(value) => headers.insert(X_FORWARDED_FOR.clone(), value),
        None => headers.insert(X_FORWARDED_FOR.clone(), HeaderValue::from_static("unknown")),
    };
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_standard_and_connection_named_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("proxy-connection", HeaderValue::from_static("close"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-kept"], "yes");
    }

    #[test]
    fn strips_a_lone_keep_alive_connection_header_and_its_companion() {
        for value in ["keep-alive", "Keep-Alive"] {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONNECTION, HeaderValue::from_static(value));
            headers.insert("x-kept", HeaderValue::from_static("yes"));
            strip_hop_by_hop(&mut headers);
            assert_eq!(headers.len(), 1, "{value}");
            assert_eq!(headers["x-kept"], "yes");
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        strip_hop_by_hop(&mut headers);
        assert!(headers.is_empty());
        // Two Connection values: the general path, which drops what they name.
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.append(header::CONNECTION, HeaderValue::from_static("x-secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert!(headers.is_empty());
    }

    #[test]
    fn keeps_messages_without_hop_by_hop_headers_as_they_are() {
        let mut headers = HeaderMap::new();
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        let before = headers.clone();
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, before);
    }

    #[test]
    fn connection_tokens_match_names_case_insensitively() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("X-One"));
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static(" x-TWO ,close"),
        );
        headers.insert("close", HeaderValue::from_static("named"));
        headers.insert("x-one", HeaderValue::from_static("1"));
        headers.insert("x-two", HeaderValue::from_static("2"));
        headers.insert("x-three", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-three"], "3");
    }

    #[test]
    fn sets_forwarded_for_from_any_address() {
        for (ip, text) in [
            ("10.0.0.9", "10.0.0.9"),
            ("0.0.0.0", "0.0.0.0"),
            ("255.100.10.1", "255.100.10.1"),
            ("203.0.113.250", "203.0.113.250"),
            ("::1", "::1"),
            ("::ffff:255.255.255.255", "::ffff:255.255.255.255"),
            (
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            ),
        ] {
            let mut headers = HeaderMap::new();
            add_forwarded(&mut headers, ip.parse().unwrap(), "http");
            assert_eq!(headers[&X_FORWARDED_FOR], text);
            assert!(!headers.contains_key(&X_FORWARDED_HOST));
        }
    }

    #[test]
    fn appends_to_existing_forwarded_for() {
        let mut headers = HeaderMap::new();
        headers.append(&X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        headers.append(&X_FORWARDED_FOR, HeaderValue::from_static("2.2.2.2"));
        headers.insert(header::HOST, HeaderValue::from_static("api.example.com"));
        add_forwarded(&mut headers, "10.0.0.9".parse().unwrap(), "http");
        assert_eq!(headers[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 10.0.0.9");
        assert_eq!(headers[&X_FORWARDED_PROTO], "http");
        assert_eq!(headers[&X_FORWARDED_HOST], "api.example.com");
    }
}
