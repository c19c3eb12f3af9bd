//! `sealmesh certs inspect FILE | --agent NODE`: a certificate chain for
//! people, and whether it chains to the trust anchors.

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use clap::Args;
use rustls_pki_types::CertificateDer;
use sealmesh_common::{
    consts::{DEFAULT_TRUST_DOMAIN, kube::TRUST_ROOTS_CONFIGMAP},
    identity::TrustDomain,
};
use sealmesh_pki::parse_pem_certs;
use sealmesh_proto::admin::{CertificateStatus, GetCertificatesRequest, GetConfigRequest};
use time::OffsetDateTime;

use crate::{
    agent_config::ConfigDumpView,
    agents::{AgentDirectory, ClusterArgs, ClusterSource, call, session},
    certview::{self, CertFacts},
};

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["file", "agent"]))]
pub struct InspectArgs {
    /// A PEM bundle (leaf first) or one DER certificate.
    file: Option<PathBuf>,
    /// Inspect the live certificates of the agent on this node.
    #[arg(long)]
    agent: Option<String>,
    /// With --agent: only this identity (SPIFFE URI or identity DNS name).
    #[arg(long, requires = "agent")]
    identity: Option<String>,
    /// Trust anchors to verify against. Default: the cluster file's
    /// `identity.trustAnchorsFile`, on Kubernetes the trust-roots ConfigMap;
    /// with --agent and no cluster anchors, the anchors the agent trusts.
    #[arg(long)]
    trust_anchors: Option<PathBuf>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// Anchors and where they came from.
struct Anchors {
    certificates: Vec<CertificateDer<'static>>,
    source: String,
}

fn read_anchors(path: &PathBuf) -> anyhow::Result<Anchors> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read trust anchors {}", path.display()))?;
    Ok(Anchors {
        certificates: parse_pem_certs(&pem, &format!("trust anchors {}", path.display()))?,
        source: path.display().to_string(),
    })
}

pub fn run(args: InspectArgs) -> anyhow::Result<ExitCode> {
    // An agent is found in the cluster; a file needs one only for anchors.
    let source = if args.agent.is_some() || args.cluster.path().is_some() {
        Some(args.cluster.source()?)
    } else {
        None
    };
    let anchors = match (&args.trust_anchors, &source) {
        (Some(path), _) => Some(read_anchors(path)?),
        (None, Some(ClusterSource::Local(cluster))) => cluster
            .identity
            .as_ref()
            .map(|identity| read_anchors(&identity.trust_anchors_file))
            .transpose()?,
        (None, Some(ClusterSource::Kubernetes(cluster))) => {
            let source = format!("ConfigMap {}/{TRUST_ROOTS_CONFIGMAP}", cluster.namespace());
            Some(Anchors {
                certificates: parse_pem_certs(
                    &cluster.trust_anchors_pem()?,
                    &format!("trust anchors of {source}"),
                )?,
                source,
            })
        }
        (None, None) => None,
    };
    let now = OffsetDateTime::now_utc();

    if let Some(file) = &args.file {
        let bytes =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let chain = certview::read_certificates(&bytes, &file.display().to_string())?;
        let (text, chained) = describe_chain(&chain, anchors.as_ref(), now)?;
        print!("{text}");
        return Ok(exit(chained));
    }

    let node = args
        .agent
        .as_deref()
        .expect("clap requires FILE or --agent");
    let source = source.expect("--agent makes the cluster source");
    let directory = AgentDirectory::of(&source)?;
    let agent = directory
        .agent(node)
        .with_context(|| format!("node {node} runs no agent sealmesh knows of"))?
        .clone();
    let agent_node = agent.node.clone();
    let (response, config) = directory.query(
        &agent,
        session(move |mut client| async move {
            let certificates = call(
                &agent_node,
                "GetCertificates",
                client.get_certificates(GetCertificatesRequest {}),
            )
            .await?;
            let config = call(
                &agent_node,
                "GetConfig",
                client.get_config(GetConfigRequest {}),
            )
            .await?;
            Ok((certificates, config))
        }),
    )?;
    // `NAMESPACE/SA` is named in the trust domain the agent uses.
    let (domain, control_namespace) = match &source {
        ClusterSource::Local(cluster) => (
            cluster.trust_domain.clone(),
            cluster.control_namespace.clone(),
        ),
        ClusterSource::Kubernetes(cluster) => (
            DEFAULT_TRUST_DOMAIN.to_owned(),
            cluster.namespace().to_owned(),
        ),
    };
    let domain = ConfigDumpView::parse(&config.yaml)
        .trust_domain
        .unwrap_or(domain);
    let trust_domain = TrustDomain::new(&domain, &control_namespace)?;
    let wanted_identity = args
        .identity
        .as_deref()
        .map(|text| anyhow::Ok(trust_domain.parse(text)?.spiffe_uri()))
        .transpose()?;
    let agent_anchors = Anchors {
        certificates: parse_pem_certs(
            response.trust_anchors_pem.as_bytes(),
            &format!("trust anchors of the agent on {node}"),
        )?,
        source: format!("the anchors the agent on {node} trusts"),
    };
    let anchors = anchors.unwrap_or(agent_anchors);
    let certificates: Vec<&CertificateStatus> = response
        .certificates
        .iter()
        .filter(|c| wanted_identity.as_ref().is_none_or(|id| &c.identity == id))
        .collect();
    if certificates.is_empty() {
        match wanted_identity {
            Some(id) => bail!(
                "the agent on {node} holds no certificate for {id}; its identities: {}",
                response
                    .certificates
                    .iter()
                    .map(|c| c.identity.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => bail!("the agent on {node} holds no certificates"),
        }
    }
    let mut all_chained = true;
    for status in certificates {
        print!("{}", describe_status(status, now));
        if status.chain.is_empty() {
            all_chained = false;
            println!();
            continue;
        }
        let chain: Vec<CertificateDer<'_>> = status
            .chain
            .iter()
            .map(|der| CertificateDer::from(der.as_slice()))
            .collect();
        let (text, chained) = describe_chain(&chain, Some(&anchors), now)?;
        all_chained &= chained;
        println!("{text}");
    }
    Ok(exit(all_chained))
}

fn exit(chained: bool) -> ExitCode {
    if chained {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn describe_status(status: &CertificateStatus, now: OffsetDateTime) -> String {
    let mut out = format!("Identity: {}\n", status.identity);
    let at = |unix: i64| {
        let when = SystemTime::UNIX_EPOCH + Duration::from_secs(unix.max(0).unsigned_abs());
        let ago = (now - OffsetDateTime::from(when))
            .try_into()
            .unwrap_or_default();
        format!(
            "{} ({} ago)",
            humantime::format_rfc3339_seconds(when),
            certview::approx(ago)
        )
    };
    let _ = writeln!(
        out,
        "  {:<15}{}",
        "Status:",
        if status.valid { "valid" } else { "NOT VALID" }
    );
    let _ = writeln!(
        out,
        "  {:<15}{}",
        "Last refresh:",
        if status.last_refresh_unix == 0 {
            "never".to_owned()
        } else {
            at(status.last_refresh_unix)
        }
    );
    let _ = writeln!(
        out,
        "  {:<15}{}",
        "Last error:",
        if status.last_error.is_empty() {
            "-"
        } else {
            &status.last_error
        }
    );
    if status.chain.is_empty() {
        let _ = writeln!(out, "  no certificate held");
    }
    out
}

/// Every certificate of `chain`, then the verdict on it. Returns the text and
/// whether the chain verifies (true when no anchors were given to check).
fn describe_chain(
    chain: &[CertificateDer<'_>],
    anchors: Option<&Anchors>,
    now: OffsetDateTime,
) -> anyhow::Result<(String, bool)> {
    let mut out = String::new();
    for (index, der) in chain.iter().enumerate() {
        let facts = CertFacts::parse(der, "chain", index)?;
        let role = if index == 0 && !facts.is_ca {
            "leaf"
        } else if facts.subject == facts.issuer {
            "root"
        } else {
            "CA"
        };
        let _ = writeln!(out, "Certificate {} of {} ({role})", index + 1, chain.len());
        out.push_str(&facts.render(now));
    }
    let chained = match anchors {
        None => {
            out.push_str(
                "Chain: not verified (pass --trust-anchors FILE or --cluster-file FILE)\n",
            );
            true
        }
        Some(anchors) => match certview::verify_chain(chain, &anchors.certificates, now) {
            Ok(anchor) => {
                let _ = writeln!(
                    out,
                    "Chain: √ verifies to trust anchor {anchor} ({})",
                    anchors.source
                );
                true
            }
            Err(why) => {
                let _ = writeln!(out, "Chain: × does not chain to {}: {why}", anchors.source);
                false
            }
        },
    };
    Ok((out, chained))
}
