//! Generated gRPC code for sealmesh's APIs.

pub mod identity {
    //! sealmesh.identity.v1: the CA's Certify API.
    tonic::include_proto!("sealmesh.identity.v1");
}

pub mod linkerd_identity {
    //! io.linkerd.proxy.identity: the same API under Linkerd's package name.
    tonic::include_proto!("io.linkerd.proxy.identity");
}

pub mod admin {
    //! sealmesh.admin.v1: each node agent's admin API (status, connections,
    //! tap, certificates, config, eBPF).
    tonic::include_proto!("sealmesh.admin.v1");
}
