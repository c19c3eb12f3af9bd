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
    /// Of `connections_total`, those refused before they opened.
    pub refused_total: u64,
    /// Of `refused_total`, those an authorization policy denied, and the
    /// policy (`<namespace>/<name>`) that denied the latest (empty: none).
    pub denied_total: u64,
    pub denied_policy: String,
    /// The latest dry-run policy that would have denied one of the pair's
    /// connections (empty: none).
    pub dry_run_denied_policy: String,
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

    /// The AUTHZ column: `denied <policy>` when a policy denied connections
    /// of the pair, else `would-deny <policy>` when a dry-run policy would
    /// have, else `allowed`.
    pub fn authz_column(&self) -> String {
        if self.denied_total > 0 {
            format!("{DENIED} {}", or_else(&self.denied_policy, UNKNOWN))
        } else if !self.dry_run_denied_policy.is_empty() {
            format!("{WOULD_DENY} {}", self.dry_run_denied_policy)
        } else {
            ALLOWED.to_owned()
        }
    }
}

/// AUTHZ column words.
const DENIED: &str = "denied";
const WOULD_DENY: &str = "would-deny";
const ALLOWED: &str = "allowed";

fn pod_parts(pod: Option<&PodRef>) -> (String, String) {
    match pod {
        Some(p) => (p.namespace.clone(), p.name.clone()),
        None => (UNKNOWN.to_owned(), UNKNOWN.to_owned()),
    }
}

fn or_else(first: &str, second: &str) -> String {
    if first.is_empty() { second } else { first }.to_owned()
}

/// Shown for a pair whose every connection was refused before it opened.
pub const REFUSED: &str = "refused";

/// Connections of `edge` that opened (and so carried bytes).
fn opened(edge: &Edge) -> u64 {
    edge.connections_total.saturating_sub(edge.refused_total)
}

/// Whether what `edge` carried was secured: mTLS, or never left the node.
fn is_secured(edge: &Edge) -> bool {
    edge.tls || edge.no_tls_reason == SECURED_LOCAL
}

/// One pair's state as one direction's agent saw it, from every record it
/// (or an earlier run of it) reported: agents keep one record per pair and
/// outcome, so a pair whose connections were refused while an agent
/// restarted has a refused record beside its mTLS one.
struct View<'e> {
    edges: &'e [Edge],
}

impl View<'_> {
    fn carried_traffic(&self) -> bool {
        self.edges.iter().any(|e| opened(e) > 0)
    }

    /// `(tls, no_tls_reason)` for the pair: refused records carried nothing
    /// and do not count; of the rest, one unsecured record is enough to show
    /// the pair unsecured (its reason), else mTLS, else local.
    fn verdict(&self) -> (bool, String) {
        let carried: Vec<&Edge> = self.edges.iter().filter(|e| opened(e) > 0).collect();
        if carried.is_empty() {
            return (false, REFUSED.to_owned());
        }
        if let Some(plain) = carried.iter().find(|e| !is_secured(e)) {
            return (false, plain.no_tls_reason.clone());
        }
        if carried.iter().any(|e| e.tls) {
            (true, String::new())
        } else {
            (false, SECURED_LOCAL.to_owned())
        }
    }

    fn identity(&self, pick: impl Fn(&Edge) -> &str) -> String {
        self.edges
            .iter()
            .map(pick)
            .find(|id| !id.is_empty())
            .unwrap_or_default()
            .to_owned()
    }
}

/// The policy named by the latest of `edges` that names one.
fn latest_policy<'e>(
    edges: impl Iterator<Item = &'e Edge>,
    policy: impl Fn(&Edge) -> &str,
) -> String {
    edges
        .filter(|e| !policy(e).is_empty())
        .max_by_key(|e| e.last_seen_unix_ms)
        .map(|e| policy(e).to_owned())
        .unwrap_or_default()
}

/// Merges the agents' edges: one row per (source pod, destination pod). The
/// outbound (source-side) view wins when it saw traffic, as it saw the
/// connections from their start; identities missing there are filled from
/// the inbound view. Both agents may count one denial (the destination's
/// agent denies, the source's hears it refused), so a pair's denials are
/// the larger of the two views' counts.
pub fn merge(edges: impl IntoIterator<Item = Edge>) -> Vec<MergedEdge> {
    type Key = (String, String, String, String);
    let mut views: BTreeMap<Key, (Vec<Edge>, Vec<Edge>)> = BTreeMap::new();
    for edge in edges {
        let (src_ns, src) = pod_parts(edge.src.as_ref());
        let (dst_ns, dst) = pod_parts(edge.dst.as_ref());
        let entry = views.entry((src_ns, src, dst_ns, dst)).or_default();
        if edge.direction() == Direction::Inbound {
            entry.1.push(edge);
        } else {
            entry.0.push(edge);
        }
    }
    views
        .into_iter()
        .map(|((src_ns, src, dst_ns, dst), (outbound, inbound))| {
            // Records in a fixed order, whichever agent answered first.
            let sorted = |mut edges: Vec<Edge>| {
                edges.sort_by(|a, b| {
                    (a.no_tls_reason.as_str(), !a.tls).cmp(&(b.no_tls_reason.as_str(), !b.tls))
                });
                edges
            };
            let (outbound, inbound) = (sorted(outbound), sorted(inbound));
            let (outbound, inbound) = (View { edges: &outbound }, View { edges: &inbound });
            let (base, other) = if outbound.carried_traffic()
                || (!inbound.carried_traffic() && !outbound.edges.is_empty())
            {
                (&outbound, &inbound)
            } else {
                (&inbound, &outbound)
            };
            let (tls, no_tls_reason) = base.verdict();
            let sum = |count: fn(&Edge) -> u64| base.edges.iter().map(count).sum::<u64>();
            let identity =
                |pick: fn(&Edge) -> &str| or_else(&base.identity(pick), &other.identity(pick));
            let all = || outbound.edges.iter().chain(inbound.edges);
            let denied = |view: &View<'_>| view.edges.iter().map(|e| e.denied_total).sum::<u64>();
            MergedEdge {
                secured: tls || no_tls_reason == SECURED_LOCAL,
                tls,
                no_tls_reason,
                client_id: identity(|e| &e.client_id),
                server_id: identity(|e| &e.server_id),
                connections_total: sum(|e| e.connections_total),
                connections_open: sum(|e| e.connections_open),
                errors_total: sum(|e| e.errors_total),
                refused_total: sum(|e| e.refused_total),
                denied_total: denied(&outbound).max(denied(&inbound)),
                denied_policy: latest_policy(all().filter(|e| e.denied_total > 0), |e| {
                    &e.denied_policy
                }),
                dry_run_denied_policy: latest_policy(all(), |e| &e.dry_run_denied_policy),
                last_seen_unix_ms: all().map(|e| e.last_seen_unix_ms).max().unwrap_or_default(),
                src,
                dst,
                src_ns,
                dst_ns,
            }
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
    let mut header = vec!["SRC", "DST", "SRC_NS", "DST_NS", "SECURED", "AUTHZ"];
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
                e.authz_column(),
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
            refused_total: 0,
            denied_total: 0,
            denied_policy: String::new(),
            dry_run_denied_policy: String::new(),
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
            "SRC      DST         SRC_NS   DST_NS   SECURED      AUTHZ     CLIENT_ID                                  SERVER_ID\n\
             client   plain       shop     legacy   not_meshed   allowed   -                                          -\n\
             client   neighbour   shop     shop     √ (local)    allowed   -                                          -\n\
             client   server      shop     shop     √            allowed   spiffe://cluster.local/ns/shop/sa/client   spiffe://cluster.local/ns/shop/sa/server\n"
        );
        assert_eq!(merged[2].last_seen_unix_ms, 2_000);
        assert!(merged[1].secured && !merged[1].tls);
    }

    fn refused(src: &str, dst: &str, direction: Direction, count: u64) -> Edge {
        Edge {
            connections_total: count,
            refused_total: count,
            errors_total: count,
            ..edge(src, dst, direction, false, "")
        }
    }

    fn secured(merged: &[MergedEdge]) -> Vec<(String, String)> {
        merged
            .iter()
            .map(|e| (e.dst.clone(), e.secured_column()))
            .collect()
    }

    #[test]
    fn connections_refused_while_an_agent_restarted_do_not_unsecure_an_mtls_pair() {
        let mut out = edge("client", "server", Direction::Outbound, true, "");
        out.connections_total = 5;
        // Whichever record an agent lists first, the pair stays secured.
        for records in [
            vec![
                refused("client", "server", Direction::Outbound, 2),
                out.clone(),
            ],
            vec![
                out.clone(),
                refused("client", "server", Direction::Outbound, 2),
            ],
        ] {
            let merged = merge(records);
            assert_eq!(secured(&merged), [("server".to_owned(), "√".to_owned())]);
            assert_eq!(
                (
                    merged[0].connections_total,
                    merged[0].refused_total,
                    merged[0].errors_total
                ),
                (7, 2, 2)
            );
        }
        // The restarted source agent saw only refusals; the destination saw
        // the mTLS connections.
        let merged = merge([
            refused("client", "server", Direction::Outbound, 1),
            edge("client", "server", Direction::Inbound, true, ""),
        ]);
        assert_eq!(secured(&merged), [("server".to_owned(), "√".to_owned())]);
    }

    #[test]
    fn one_plaintext_connection_shows_the_pair_unsecured_and_refusals_alone_show_refused() {
        let merged = merge([
            edge("client", "server", Direction::Outbound, true, ""),
            edge("client", "server", Direction::Outbound, false, "not_meshed"),
            refused("client", "other", Direction::Outbound, 3),
        ]);
        assert_eq!(
            secured(&merged),
            [
                ("other".to_owned(), REFUSED.to_owned()),
                ("server".to_owned(), "not_meshed".to_owned()),
            ]
        );
        assert!(!merged[0].secured && !merged[1].secured && !merged[1].tls);
    }

    fn denied(
        src: &str,
        dst: &str,
        direction: Direction,
        count: u64,
        policy: &str,
        at: i64,
    ) -> Edge {
        Edge {
            denied_total: count,
            denied_policy: policy.into(),
            last_seen_unix_ms: at,
            ..refused(src, dst, direction, count)
        }
    }

    fn authz(merged: &[MergedEdge]) -> Vec<(String, String)> {
        merged
            .iter()
            .map(|e| (e.dst.clone(), e.authz_column()))
            .collect()
    }

    #[test]
    fn a_pair_shows_the_policy_that_denied_it_else_the_dry_run_policy_that_would() {
        // The destination's agent denied three connections, the source's
        // agent heard two of them refused: three denials, not five; the
        // latest denial names the policy.
        let mut mtls = edge("client", "server", Direction::Outbound, true, "");
        mtls.dry_run_denied_policy = "shop/only-frontend".into();
        let merged = merge([
            mtls,
            denied(
                "client",
                "server",
                Direction::Outbound,
                2,
                "shop/old",
                1_000,
            ),
            denied("client", "server", Direction::Inbound, 1, "shop/old", 1_500),
            denied(
                "client",
                "server",
                Direction::Inbound,
                2,
                "shop/web-allow",
                2_000,
            ),
        ]);
        assert_eq!(
            authz(&merged),
            [("server".to_owned(), "denied shop/web-allow".to_owned())]
        );
        assert_eq!(merged[0].denied_total, 3);
        assert_eq!(merged[0].dry_run_denied_policy, "shop/only-frontend");
        assert_eq!(secured(&merged), [("server".to_owned(), "√".to_owned())]);

        // Only a dry-run policy objected: the connections went through.
        let mut inbound = edge("client", "other", Direction::Inbound, true, "");
        inbound.dry_run_denied_policy = "shop/only-frontend".into();
        let merged = merge([
            edge("client", "other", Direction::Outbound, true, ""),
            inbound,
            edge("client", "plain", Direction::Outbound, false, "not_meshed"),
        ]);
        assert_eq!(
            authz(&merged),
            [
                ("plain".to_owned(), "allowed".to_owned()),
                (
                    "other".to_owned(),
                    "would-deny shop/only-frontend".to_owned()
                ),
            ]
        );
        let rows = render(&merged, OutputFormat::Table);
        assert_eq!(
            rows,
            "SRC      DST     SRC_NS   DST_NS   SECURED      AUTHZ\n\
             client   plain   shop     legacy   not_meshed   allowed\n\
             client   other   shop     shop     √            would-deny shop/only-frontend\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&render(&merged, OutputFormat::Json)).unwrap();
        assert_eq!(json[1]["dry_run_denied_policy"], "shop/only-frontend");
        assert_eq!(json[1]["denied_total"], 0);
        assert_eq!(json[1]["denied_policy"], "");
    }
}
