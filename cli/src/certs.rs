//! `sealmesh certs`: create the root (trust anchor) and the issuer the
//! identity service signs with (ECDSA P-256), in place of `step certificate
//! create`, and inspect certificates. The certificate work lives in
//! `sealmesh_pki`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use sealmesh_pki::{
    self as pki, CaMaterial, CaSpec, DEFAULT_ISSUER_COMMON_NAME, DEFAULT_ROOT_COMMON_NAME, Layout,
};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a self-signed root CA: the trust anchor every agent and peer trusts.
    CreateRoot(CreateRoot),
    /// Create the issuer (intermediate CA) the identity service signs leaves with.
    CreateIssuer(CreateIssuer),
    /// Show a certificate chain (a file, or an agent's live certificates) and
    /// whether it chains to the trust anchors. Exits 1 when it does not.
    Inspect(crate::certs_inspect::InspectArgs),
}

#[derive(Debug, Args)]
pub struct Output {
    /// Directory to write the CA into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// `pem`: crt.pem + key.pem; `tls`: tls.crt + tls.key + ca.crt (a kubernetes.io/tls Secret's keys).
    #[arg(long, value_enum, default_value_t = Layout::Pem)]
    layout: Layout,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct CreateRoot {
    #[command(flatten)]
    output: Output,
    /// How long the root is valid (at least 1h).
    #[arg(long, value_parser = ca_validity, default_value = "87600h")]
    validity: Duration,
    /// Subject common name (1 to 64 characters, RFC 5280).
    #[arg(long, value_parser = common_name, default_value = DEFAULT_ROOT_COMMON_NAME)]
    common_name: String,
}

#[derive(Debug, Args)]
pub struct CreateIssuer {
    /// Directory of the root that signs the issuer (either layout).
    #[arg(long)]
    root: PathBuf,
    #[command(flatten)]
    output: Output,
    /// How long the issuer is valid (at least 1h; never beyond the root).
    #[arg(long, value_parser = ca_validity, default_value = "8760h")]
    validity: Duration,
    /// Subject common name (1 to 64 characters, RFC 5280).
    #[arg(long, value_parser = common_name, default_value = DEFAULT_ISSUER_COMMON_NAME)]
    common_name: String,
}

/// The shortest CA validity accepted: a shorter-lived CA would expire
/// before (or clamp) the leaves it signs, which live 24h by default.
const MIN_CA_VALIDITY: Duration = Duration::from_secs(3600);
/// RFC 5280's upper bound on a common name (`ub-common-name`).
const MAX_COMMON_NAME: usize = 64;

fn ca_validity(text: &str) -> Result<Duration, String> {
    let validity = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if validity < MIN_CA_VALIDITY {
        return Err(format!(
            "a CA must be valid for at least {} (it signs 24h leaves); use e.g. 8760h",
            humantime::format_duration(MIN_CA_VALIDITY)
        ));
    }
    Ok(validity)
}

fn common_name(text: &str) -> Result<String, String> {
    let length = text.chars().count();
    if length == 0 || length > MAX_COMMON_NAME {
        return Err(format!(
            "a common name has 1 to {MAX_COMMON_NAME} characters (RFC 5280); this one has {length}"
        ));
    }
    if text.chars().any(char::is_control) {
        return Err("a common name cannot hold control characters".into());
    }
    Ok(text.to_owned())
}

pub fn run(command: CertsCommand) -> anyhow::Result<ExitCode> {
    match command {
        CertsCommand::Inspect(args) => return crate::certs_inspect::run(args),
        CertsCommand::CreateRoot(args) => {
            let root = pki::generate_root(&CaSpec::valid_for(&args.common_name, args.validity))?;
            let files = write(&root, &args.output)?;
            println!(
                "trust anchor: {} (pass it to sealmesh-identity --trust-anchors and to the agents)",
                files[0].display()
            );
        }
        CertsCommand::CreateIssuer(args) => {
            let root = CaMaterial::read_dir(&args.root)
                .with_context(|| format!("cannot read the root from {}", args.root.display()))?;
            let spec = CaSpec::valid_for(&args.common_name, args.validity);
            let (issuer, clamped) = pki::generate_issuer(&root, &spec).with_context(|| {
                format!(
                    "cannot sign an issuer with the root in {}",
                    args.root.display()
                )
            })?;
            if clamped {
                eprintln!(
                    "warning: --validity {} reaches past the root's expiry; the issuer expires with the root",
                    humantime::format_duration(args.validity)
                );
            }
            write(&issuer, &args.output)?;
            println!(
                "issuer: {} (pass it to sealmesh-identity --issuer-dir)",
                args.output.out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write(ca: &pki::GeneratedCa, output: &Output) -> anyhow::Result<Vec<PathBuf>> {
    let files = ca
        .write_dir(&output.out, output.layout, output.force)
        .with_context(|| format!("cannot write the CA to {}", output.out.display()))?;
    for file in &files {
        println!("wrote {}", file.display());
    }
    Ok(files)
}
