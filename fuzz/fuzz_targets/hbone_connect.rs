//! HBONE CONNECT requests as a peer agent may send them: any method, URI
//! and headers `http` accepts (what it rejects never reaches the agent: h2
//! builds the request with it), read as the destination's agent reads them,
//! and the request the client's agent formats for any addresses.
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use libfuzzer_sys::fuzz_target;
use sealmesh_common::hbone::{
    FORWARDED_HEADER, connect_request, forwarded_for, forwarded_value, requested_target,
};

type Address = ([u8; 4], u16);
type Header = (Vec<u8>, Vec<u8>);

fuzz_target!(|input: (Vec<u8>, Vec<u8>, Vec<Header>, Address, Address)| {
    let (method, uri, headers, (target_ip, target_port), (source_ip, source_port)) = input;

    // What the client's agent sends, the peer reads back exactly.
    let target = SocketAddrV4::new(Ipv4Addr::from(target_ip), target_port);
    let source = SocketAddrV4::new(Ipv4Addr::from(source_ip), source_port);
    let sent = connect_request(target, source);
    assert_eq!(requested_target(sent.method(), sent.uri()), Ok(target));
    assert_eq!(forwarded_for(sent.headers()), Some(source));

    let (Ok(method), Ok(uri)) = (Method::from_bytes(&method), Uri::try_from(uri)) else {
        return;
    };
    let mut request = Request::builder().method(method).uri(uri);
    for (name, value) in &headers {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            request = request.header(name, value);
        }
    }
    let Ok(request) = request.body(()) else {
        return;
    };
    let (parts, ()) = request.into_parts();

    if let Ok(accepted) = requested_target(&parts.method, &parts.uri) {
        assert_eq!(parts.method, Method::CONNECT);
        // An accepted target is one the client side asks for the same way.
        let again = connect_request(accepted, source);
        assert_eq!(requested_target(again.method(), again.uri()), Ok(accepted));
    }
    if let Some(forwarded) = forwarded_for(&parts.headers) {
        // A source read from a peer formats back to a header naming it.
        let mut formatted = HeaderMap::new();
        formatted.insert(FORWARDED_HEADER, forwarded_value(forwarded));
        assert_eq!(forwarded_for(&formatted), Some(forwarded));
    }
});
