//! `sealmesh edges`: pod-to-pod edges seen by the agents and whether they are
//! mTLS, like `linkerd viz edges`.

use std::{collections::BTreeMap, process::ExitCode};

use anyhow::bail;
use clap::Args;
use sealmesh_proto::admin::{Direction, Edge, GetConnectionsRequest, PodRef};
use serde::Serialize;

use crate::{
    agents::{AgentDirectory, AgentError, ClusterArgs, call, link_session},
    output::{OutputFormat, table},
};

/// The agents' reason for a same-node connection that never leaves the node
/// unencrypted (shown as secured).
pub const SECURED_LOCAL: &str = "secured_local";
/// Shown for a pod the agents could not name.
const UNKNOWN: &str = "-";
/// kubectl's default namespace.
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, Args)]
pub struct EdgesArgs {
    /// Namespace whose pods' edges (as source or destination) to show.
    #[arg(short, long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// Show edges of every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// `wide` adds the client and server identities.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// One pod pair, merged from the outbound and inbound agents' views.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MergedEdge {
    pub src: String,
    pub dst: String,
    pub src_ns: String,
    pub dst_ns: String,
    /// mTLS, or a same-node connection that never left the node.
    pub secured: bool,
    pub tls: bool,
    /// Why not mTLS (empty when tls).
    pub no_tls_reason: String,
    pub client_id: String,
    pub server_id: String,
    pub connections_total: u64,
    pub connections_open: u64,
    pub errors_total: u64,
    pub last_seen_unix_ms: i64,
}

impl MergedEdge {
    /// The SECURED column: `√`, `√ (local)`, or the reason.
    pub fn secured_column(&self) -> String {
        if self.tls {
            "√".to_owned()
        } else if self.no_tls_reason == SECURED_LOCAL {
            "√ (local)".to_owned()
        } else if self.no_tls_reason.is_empty() {
            "no".to_owned()
        } else {
            self.no_tls_reason.clone()
        }
    }
}

fn pod_parts(pod: Option<&PodRef>) -> (String, String) {
    match pod {
        Some(p) => (p.namespace.clone(), p.name.clone()),
        None => (UNKNOWN.to_owned(), UNKNOWN.to_owned()),
    }
}

fn or_else(first: &str, second: &str) -> String {
    if first.is_empty() { second } else { first }.to_owned()
}

/// Merges the agents' edges: one row per (source pod, destination pod). The
/// outbound (source-side) view wins, as it saw the connection from its start;
/// identities missing there are filled from the inbound view.
pub fn merge(edges: impl IntoIterator<Item = Edge>) -> Vec<MergedEdge> {
    type Key = (String, String, String, String);
    let mut views: BTreeMap<Key, (Option<Edge>, Option<Edge>)> = BTreeMap::new();
    for edge in edges {
        let (src_ns, src) = pod_parts(edge.src.as_ref());
        let (dst_ns, dst) = pod_parts(edge.dst.as_ref());
        let entry = views.entry((src_ns, src, dst_ns, dst)).or_default();
        let slot = if edge.direction() == Direction::Inbound {
            &mut entry.1
        } else {
            &mut entry.0
        };
        match slot {
            // Several agents (or restarts) may report the same direction: add up.
            Some(seen) => {
                seen.connections_total += edge.connections_total;
                seen.connections_open += edge.connections_open;
                seen.errors_total += edge.errors_total;
                seen.last_seen_unix_ms = seen.last_seen_unix_ms.max(edge.last_seen_unix_ms);
            }
            None => *slot = Some(edge),
        }
    }
    views
        .into_iter()
        .filter_map(|((src_ns, src, dst_ns, dst), (outbound, inbound))| {
            let other = inbound.clone().or_else(|| outbound.clone())?;
            let base = outbound.unwrap_or_else(|| other.clone());
            Some(MergedEdge {
                secured: base.tls || base.no_tls_reason == SECURED_LOCAL,
                tls: base.tls,
                no_tls_reason: base.no_tls_reason.clone(),
                client_id: or_else(&base.client_id, &other.client_id),
                server_id: or_else(&base.server_id, &other.server_id),
                connections_total: base.connections_total,
                connections_open: base.connections_open,
                errors_total: base.errors_total,
                last_seen_unix_ms: base.last_seen_unix_ms.max(other.last_seen_unix_ms),
                src,
                dst,
                src_ns,
                dst_ns,
            })
        })
        .collect()
}

/// Every agent's edges, merged; and the agents that could not be asked (an
/// agent that does not answer at once, e.g. while it restarts, is asked
/// again for a few seconds first).
pub fn fetch(directory: &AgentDirectory) -> (Vec<MergedEdge>, Vec<AgentError>) {
    let mut all = Vec::new();
    let mut failures = Vec::new();
    let results = directory.query_all_linked(|_| {
        link_session(|link| async move {
            let node = link.node();
            link.call_with_retries(|mut client| async move {
                call(
                    node,
                    "GetConnections",
                    client.get_connections(GetConnectionsRequest {}),
                )
                .await
            })
            .await
        })
    });
    for (_, result) in results {
        match result {
            Ok(response) => all.extend(response.edges),
            Err(e) => failures.push(e),
        }
    }
    (merge(all), failures)
}

pub fn run(args: EdgesArgs) -> anyhow::Result<ExitCode> {
    let directory = AgentDirectory::of(&args.cluster.source()?)?;
    let (edges, failures) = fetch(&directory);
    if failures.len() == directory.agents().len() {
        let reasons: Vec<String> = failures.iter().map(ToString::to_string).collect();
        bail!("no agent answered: {}", reasons.join("; "));
    }
    for failure in &failures {
        eprintln!("warning: edges are incomplete: {failure}");
    }
    let edges: Vec<MergedEdge> = edges
        .into_iter()
        .filter(|e| args.all_namespaces || e.src_ns == args.namespace || e.dst_ns == args.namespace)
        .collect();
    print!("{}", render(&edges, args.output));
    if edges.is_empty() && args.output != OutputFormat::Json {
        if args.all_namespaces {
            eprintln!("No edges found.");
        } else {
            eprintln!("No edges found in namespace {}.", args.namespace);
        }
    }
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn render(edges: &[MergedEdge], format: OutputFormat) -> String {
    if format == OutputFormat::Json {
        return serde_json::to_string_pretty(edges).expect("edges serialise") + "\n";
    }
    if edges.is_empty() {
        return String::new();
    }
    let wide = format == OutputFormat::Wide;
    let mut header = vec!["SRC", "DST", "SRC_NS", "DST_NS", "SECURED"];
    if wide {
        header.extend(["CLIENT_ID", "SERVER_ID"]);
    }
    let dash = |s: &str| or_else(s, UNKNOWN);
    let rows: Vec<Vec<String>> = edges
        .iter()
        .map(|e| {
            let mut row = vec![
                e.src.clone(),
                e.dst.clone(),
                e.src_ns.clone(),
                e.dst_ns.clone(),
                e.secured_column(),
            ];
            if wide {
                row.extend([dash(&e.client_id), dash(&e.server_id)]);
            }
            row
        })
        .collect();
    table(&header, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str) -> Option<PodRef> {
        Some(PodRef {
            namespace: ns.into(),
            name: name.into(),
        })
    }

    fn edge(src: &str, dst: &str, direction: Direction, tls: bool, reason: &str) -> Edge {
        Edge {
            src: pod("shop", src),
            dst: pod(if dst == "plain" { "legacy" } else { "shop" }, dst),
            direction: direction as i32,
            client_id: String::new(),
            server_id: String::new(),
            tls,
            no_tls_reason: reason.into(),
            connections_total: 1,
            connections_open: 0,
            errors_total: 0,
            last_seen_unix_ms: 1_000,
        }
    }

    #[test]
    fn one_row_per_pair_outbound_view_first_identities_from_both() {
        let mut out = edge("client", "server", Direction::Outbound, true, "");
        out.client_id = "spiffe://cluster.local/ns/shop/sa/client".into();
        let mut inb = edge("client", "server", Direction::Inbound, true, "");
        inb.client_id = "spiffe://cluster.local/ns/shop/sa/client".into();
        inb.server_id = "spiffe://cluster.local/ns/shop/sa/server".into();
        inb.last_seen_unix_ms = 2_000;
        let plain = edge("client", "plain", Direction::Outbound, false, "not_meshed");
        let local = edge(
            "client",
            "neighbour",
            Direction::Outbound,
            false,
            SECURED_LOCAL,
        );
        let merged = merge([inb, out, plain, local]);
        assert_eq!(merged.len(), 3);
        let rows = render(&merged, OutputFormat::Wide);
        assert_eq!(
            rows,
            "SRC      DST         SRC_NS   DST_NS   SECURED      CLIENT_ID                                  SERVER_ID\n\
             client   plain       shop     legacy   not_meshed   -                                          -\n\
             client   neighbour   shop     shop     √ (local)    -                                          -\n\
             client   server      shop     shop     √            spiffe://cluster.local/ns/shop/sa/client   spiffe://cluster.local/ns/shop/sa/server\n"
        );
        assert_eq!(merged[2].last_seen_unix_ms, 2_000);
        assert!(merged[1].secured && !merged[1].tls);
    }
}
