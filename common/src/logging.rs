//! How every sealmesh binary logs: one variable for the level
//! ([`LOG_LEVEL_ENV`], or `--log-level`), `--log-format text|json`, to
//! stderr, with colours only on a terminal (a kubelet's container log shows
//! text, not escape codes).
//!
//! The level is a word or tracing directives. `error`, `warn` and `info`
//! apply to everything; `debug` and `trace` apply to sealmesh's own crates
//! only (their dependencies stay at `info`), so `--log-level debug` shows
//! the mesh's decisions rather than every HTTP/2 frame. Directives
//! (`sealmesh_agent=debug,h2=trace`) are taken as written.

use std::io::IsTerminal;

use serde::Serialize;
use tracing_subscriber::EnvFilter;

/// The one environment variable of the log level, in every binary.
pub const LOG_LEVEL_ENV: &str = "SEALMESH_LOG";

/// Target prefixes of sealmesh's crates (`sealmesh_agent`, `sealmesh_identity`,
/// ..., and the build tool): tracing directives match targets by prefix.
const OWN_TARGETS: [&str; 2] = ["sealmesh", "xtask"];

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, fields flattened (for log pipelines).
    Json,
}

/// The logging flags, shared by every binary's command line.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct LogArgs {
    /// Log level: error, warn, info, debug, trace (debug and trace apply to
    /// sealmesh's own modules), or tracing directives
    /// (sealmesh_agent=debug,h2=info).
    #[arg(long, env = LOG_LEVEL_ENV, default_value = "info", value_parser = parse_level)]
    pub log_level: String,
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid log level {level:?}: {reason} (use error, warn, info, debug, trace, or tracing directives such as sealmesh_agent=debug,h2=info)"
)]
pub struct LogLevelError {
    level: String,
    reason: String,
}

/// The filter a `--log-level` value stands for.
pub fn filter(level: &str) -> Result<EnvFilter, LogLevelError> {
    let directives = match level.trim() {
        word @ ("debug" | "trace") => OWN_TARGETS
            .iter()
            .fold("info".to_owned(), |filter, target| {
                format!("{filter},{target}={word}")
            }),
        other => other.to_owned(),
    };
    EnvFilter::try_new(&directives).map_err(|e| LogLevelError {
        level: level.to_owned(),
        reason: e.to_string(),
    })
}

/// For clap: rejects a level that is no filter when the flags are parsed.
fn parse_level(level: &str) -> Result<String, LogLevelError> {
    filter(level).map(|_| level.to_owned())
}

/// Installs the global subscriber: stderr, colours only on a terminal.
pub fn init(level: &str, format: LogFormat) -> Result<(), LogLevelError> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(level)?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn debug_and_trace_words_apply_to_sealmesh_crates_only() {
        assert_eq!(
            filter("debug").unwrap().to_string(),
            "sealmesh=debug,xtask=debug,info"
        );
        assert_eq!(
            filter("trace").unwrap().to_string(),
            "sealmesh=trace,xtask=trace,info"
        );
        assert_eq!(filter("warn").unwrap().to_string(), "warn");
    }

    #[test]
    fn directives_are_taken_as_written() {
        assert_eq!(
            filter("sealmesh_agent=debug,h2=info").unwrap().to_string(),
            "sealmesh_agent=debug,h2=info"
        );
    }

    #[test]
    fn a_bad_level_is_refused_at_parse_time_with_what_to_write() {
        let e = Flags::try_parse_from(["x", "--log-level", "loud=["]).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("invalid log level \"loud=[\""), "{text}");
        assert!(
            text.contains("use error, warn, info, debug, trace"),
            "{text}"
        );
    }

    #[test]
    fn flags_default_to_info_text() {
        let flags = Flags::try_parse_from(["x"]).unwrap();
        assert_eq!(
            flags.log,
            LogArgs {
                log_level: "info".to_owned(),
                log_format: LogFormat::Text
            }
        );
        let flags = Flags::try_parse_from(["x", "--log-format", "json"]).unwrap();
        assert_eq!(flags.log.log_format, LogFormat::Json);
    }
}
