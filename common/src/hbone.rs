//! The HBONE CONNECT request agents exchange, both ends of it: what the
//! client's agent sends (`CONNECT <pod IPv4>:<port>` with a `forwarded`
//! header naming the source pod's address) and how the destination's agent
//! reads what a peer sent. Everything the inbound side takes from a peer's
//! request is read here, from `http` types only, so the parsing is the same
//! code the fuzz targets run.

use std::net::SocketAddrV4;

use http::{HeaderMap, HeaderValue, Method, Request, Uri};

/// Header carrying the source pod's address (`for="ip:port"`, RFC 7239) to
/// the destination's agent, for its access log and the `ipBlocks` of
/// authorization policies; that agent believes it only when the address is
/// a pod of the authenticated client identity.
pub const FORWARDED_HEADER: &str = "forwarded";

/// Header of the destination agent's 403 when an authorization policy
/// denied the CONNECT: `<namespace>/<name>` of the policy, then
/// `;rule=<index>` when one rule decided. Only for the client agent's
/// reports (tap, access log): both agents then name the same policy.
pub const DENIED_BY_HEADER: &str = "sealmesh-denied-by";
/// Longest `DENIED_BY_HEADER` value read back: a namespace (63), `/`, a
/// name (253) and the rule suffix; a longer one is not a policy name.
const MAX_DENIED_BY: usize = 63 + 1 + 253 + 16;

/// Why a peer's request is not a CONNECT this mesh carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRequestError {
    #[error("method {0} is not supported; HBONE streams are CONNECT")]
    NotConnect(Method),
    #[error("CONNECT authority {0:?} is not an IPv4 address:port")]
    BadAuthority(String),
}

/// The CONNECT request for `target`, telling the peer the source pod's
/// address.
pub fn connect_request(target: SocketAddrV4, source: SocketAddrV4) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header(FORWARDED_HEADER, forwarded_value(source))
        .body(())
        .expect("a CONNECT request to a socket address is well-formed")
}

/// The `forwarded` header's value naming `source`.
pub fn forwarded_value(source: SocketAddrV4) -> HeaderValue {
    HeaderValue::try_from(format!("for=\"{source}\""))
        .expect("a socket address is a valid header value")
}

/// The pod address a CONNECT asks for: the method must be CONNECT and the
/// authority an IPv4 `address:port` (no names: the client's agent resolved
/// the destination already).
pub fn requested_target(method: &Method, uri: &Uri) -> Result<SocketAddrV4, ConnectRequestError> {
    if method != Method::CONNECT {
        return Err(ConnectRequestError::NotConnect(method.clone()));
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
    authority
        .parse()
        .map_err(|_| ConnectRequestError::BadAuthority(authority.to_owned()))
}

/// The source address a `forwarded: for="ip:port"` header names; None when
/// the header is missing or is anything else (it only feeds the access log,
/// so a bad one is ignored, not refused).
pub fn forwarded_for(headers: &HeaderMap) -> Option<SocketAddrV4> {
    headers
        .get(FORWARDED_HEADER)?
        .to_str()
        .ok()?
        .strip_prefix("for=\"")?
        .strip_suffix('"')?
        .parse()
        .ok()
}

/// The `DENIED_BY_HEADER` value for a policy (`<namespace>/<name>`) and
/// the rule that decided, if one did.
pub fn denied_by_value(policy: &str, rule: Option<u32>) -> Option<HeaderValue> {
    let text = match rule {
        Some(rule) => format!("{policy};rule={rule}"),
        None => policy.to_owned(),
    };
    HeaderValue::try_from(text).ok()
}

/// The policy and rule a peer's 403 names; None when the header is
/// missing or not of that form (the refusal is then reported without them).
pub fn denied_by(headers: &HeaderMap) -> Option<(String, Option<u32>)> {
    let text = headers.get(DENIED_BY_HEADER)?.to_str().ok()?;
    if text.len() > MAX_DENIED_BY {
        return None;
    }
    let (policy, rule) = match text.split_once(";rule=") {
        Some((policy, rule)) => (policy, Some(rule.parse().ok()?)),
        None => (text, None),
    };
    let (namespace, name) = policy.split_once('/')?;
    let valid = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    (valid(namespace) && valid(name)).then(|| (policy.to_owned(), rule))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_denying_policy_travels_in_the_403_and_nothing_else_is_believed() {
        let read = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(DENIED_BY_HEADER, HeaderValue::from_str(value).unwrap());
            denied_by(&headers)
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            DENIED_BY_HEADER,
            denied_by_value("shop/deny-legacy", Some(2)).unwrap(),
        );
        assert_eq!(
            denied_by(&headers),
            Some(("shop/deny-legacy".into(), Some(2)))
        );
        headers.insert(DENIED_BY_HEADER, denied_by_value("shop/web", None).unwrap());
        assert_eq!(denied_by(&headers), Some(("shop/web".into(), None)));
        assert_eq!(denied_by(&HeaderMap::new()), None);
        for bad in [
            "shop",
            "/web",
            "shop/",
            "Shop/web",
            "shop/web;rule=x",
            "a/b c",
            &format!("a/{}", "b".repeat(400)),
        ] {
            assert_eq!(read(bad), None, "{bad}");
        }
    }

    fn target_of(method: &str, uri: &str) -> Result<SocketAddrV4, ConnectRequestError> {
        let request = Request::builder().method(method).uri(uri).body(()).unwrap();
        requested_target(request.method(), request.uri())
    }

    fn forwarded(values: &[&str]) -> Option<SocketAddrV4> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(FORWARDED_HEADER, HeaderValue::from_str(value).unwrap());
        }
        forwarded_for(&headers)
    }

    #[test]
    fn a_connect_to_an_ipv4_address_and_port_is_its_target() {
        assert_eq!(
            target_of("CONNECT", "10.244.1.5:8080"),
            Ok("10.244.1.5:8080".parse().unwrap())
        );
        assert_eq!(
            target_of("CONNECT", "0.0.0.0:0"),
            Ok("0.0.0.0:0".parse().unwrap())
        );
    }

    #[test]
    fn what_the_client_sends_is_what_the_peer_reads() {
        let target: SocketAddrV4 = "10.244.1.5:443".parse().unwrap();
        let source: SocketAddrV4 = "10.244.0.7:40123".parse().unwrap();
        let request = connect_request(target, source);
        assert_eq!(request.method(), Method::CONNECT);
        assert_eq!(
            requested_target(request.method(), request.uri()),
            Ok(target)
        );
        assert_eq!(forwarded_for(request.headers()), Some(source));
        assert_eq!(
            request.headers()[FORWARDED_HEADER],
            "for=\"10.244.0.7:40123\""
        );
    }

    #[test]
    fn other_methods_are_not_connect() {
        for method in ["GET", "POST", "connect", "PRI"] {
            assert_eq!(
                target_of(method, "http://10.244.1.5:80/"),
                Err(ConnectRequestError::NotConnect(
                    Method::from_bytes(method.as_bytes()).unwrap()
                )),
                "{method}"
            );
        }
        assert_eq!(
            ConnectRequestError::NotConnect(Method::GET).to_string(),
            "method GET is not supported; HBONE streams are CONNECT"
        );
    }

    #[test]
    fn authorities_that_are_not_an_ipv4_address_and_port_are_refused() {
        for (uri, authority) in [
            ("server.example:80", "server.example:80"),
            ("[::1]:80", "[::1]:80"),
            ("[::ffff:10.244.1.5]:80", "[::ffff:10.244.1.5]:80"),
            ("10.244.1.5", "10.244.1.5"),
            ("10.244.1.5:65536", "10.244.1.5:65536"),
            ("10.244.1.5:99999999999", "10.244.1.5:99999999999"),
            ("10.244.1.5:-1", "10.244.1.5:-1"),
            ("10.244.1.256:80", "10.244.1.256:80"),
            ("010.244.1.5:80", "010.244.1.5:80"),
            ("user@10.244.1.5:80", "user@10.244.1.5:80"),
            ("/path", ""),
        ] {
            assert_eq!(
                target_of("CONNECT", uri),
                Err(ConnectRequestError::BadAuthority(authority.into())),
                "{uri}"
            );
        }
        // An absolute URI (h2 with :scheme and :path) still names its
        // authority, which is all that is read.
        assert_eq!(
            target_of("CONNECT", "http://10.244.1.5:80/"),
            Ok("10.244.1.5:80".parse().unwrap())
        );
        assert_eq!(
            ConnectRequestError::BadAuthority("server.example:80".into()).to_string(),
            "CONNECT authority \"server.example:80\" is not an IPv4 address:port"
        );
    }

    #[test]
    fn forwarded_names_an_ipv4_source_or_nothing() {
        assert_eq!(
            forwarded(&["for=\"10.244.0.7:40123\""]),
            Some("10.244.0.7:40123".parse().unwrap())
        );
        for garbage in [
            "",
            "for=10.244.0.7:40123",
            "for=\"10.244.0.7:40123",
            "for=\"10.244.0.7\"",
            "for=\"[::1]:40123\"",
            "for=\"10.244.0.7:70000\"",
            "for=\"10.244.0.7:40123\"; proto=https",
            "by=\"10.244.0.7:40123\"",
            "FOR=\"10.244.0.7:40123\"",
            " for=\"10.244.0.7:40123\"",
            "for=\"\"",
        ] {
            assert_eq!(forwarded(&[garbage]), None, "{garbage:?}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            FORWARDED_HEADER,
            HeaderValue::from_bytes(b"for=\"10.244.0.7:\xff\"").unwrap(),
        );
        assert_eq!(forwarded_for(&headers), None, "not visible ASCII");
        assert_eq!(forwarded_for(&HeaderMap::new()), None);
        // Only the first of repeated headers counts, as for every peer.
        assert_eq!(
            forwarded(&["for=\"10.244.0.7:1\"", "for=\"10.244.0.8:2\""]),
            Some("10.244.0.7:1".parse().unwrap())
        );
    }
}
