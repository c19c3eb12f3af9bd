//! Process and build-info series every sealmesh binary serves, named as
//! Prometheus client libraries name them (`process_*`), so the usual
//! dashboards and alerts (restarts, memory, file descriptors) work as is.
//! Read from `/proc/self` at each scrape: nothing runs between scrapes.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

/// Name of the build-info series; its value is always 1.
pub const BUILD_INFO_METRIC: &str = "sealmesh_build_info";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    version: &'static str,
}

/// Registers the process series and `sealmesh_build_info{component,version}`
/// on `root`, which must carry no prefix (the names are the conventional ones).
pub fn register(root: &mut Registry, component: &'static str, version: &'static str) {
    root.register_collector(Box::new(ProcessCollector {
        build: BuildLabels { component, version },
    }));
}

#[derive(Debug)]
struct ProcessCollector {
    build: BuildLabels,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut info = encoder.encode_descriptor(
            BUILD_INFO_METRIC,
            "The running binary: component and version (value 1)",
            None,
            ConstGauge::new(1i64).metric_type(),
        )?;
        ConstGauge::new(1i64).encode(info.encode_family(&self.build)?)?;

        // A scrape must not fail because /proc is unreadable (e.g. hidepid):
        // the process series are then left out.
        let Ok(me) = procfs::process::Process::myself() else {
            return Ok(());
        };
        if let Ok(stat) = me.stat() {
            let ticks = procfs::ticks_per_second() as f64;
            let cpu = encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                ConstCounter::new(0f64).metric_type(),
            )?;
            ConstCounter::new((stat.utime + stat.stime) as f64 / ticks).encode(cpu)?;
            let page_size = procfs::page_size();
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size, in bytes",
                i64::try_from(stat.rss.saturating_mul(page_size)).unwrap_or(i64::MAX),
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size, in bytes",
                i64::try_from(stat.vsize).unwrap_or(i64::MAX),
            )?;
            gauge(
                &mut encoder,
                "process_threads",
                "OS threads of the process",
                stat.num_threads,
            )?;
            if let Ok(boot) = procfs::boot_time_secs() {
                let started = boot as f64 + stat.starttime as f64 / ticks;
                let metric = encoder.encode_descriptor(
                    "process_start_time_seconds",
                    "Start time of the process since the Unix epoch, in seconds",
                    None,
                    ConstGauge::new(0f64).metric_type(),
                )?;
                ConstGauge::new(started).encode(metric)?;
            }
        }
        if let Ok(open) = me.fd_count() {
            let metric = encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            ConstGauge::new(i64::try_from(open).unwrap_or(i64::MAX)).encode(metric)?;
        }
        if let Ok(limits) = me.limits()
            && let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit
        {
            let metric = encoder.encode_descriptor(
                "process_max_fds",
                "Limit of open file descriptors",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            ConstGauge::new(i64::try_from(max).unwrap_or(i64::MAX)).encode(metric)?;
        }
        Ok(())
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let metric =
        encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    ConstGauge::new(value).encode(metric)
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    }

    #[test]
    fn serves_this_process_figures_and_build_info() {
        let mut root = Registry::default();
        register(&mut root, "test", "1.2.3");
        let _held = std::fs::File::open("/proc/self/stat").unwrap();
        let mut text = String::new();
        encode(&mut text, &root).unwrap();

        assert_eq!(
            value(
                &text,
                "sealmesh_build_info{component=\"test\",version=\"1.2.3\"}"
            ),
            1.0
        );
        let rss = value(&text, "process_resident_memory_bytes");
        assert!(rss > 1e6, "a test binary holds more than 1 MB: {rss}");
        assert!(value(&text, "process_virtual_memory_bytes") >= rss);
        assert!(
            value(&text, "process_open_fds") >= 4.0,
            "stdio + the file held"
        );
        assert!(value(&text, "process_max_fds") >= value(&text, "process_open_fds"));
        assert!(value(&text, "process_threads") >= 1.0);
        assert!(value(&text, "process_cpu_seconds_total") >= 0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value(&text, "process_start_time_seconds");
        assert!(
            started <= now + 1.0 && started > now - 3600.0,
            "started {started}, now {now}"
        );
    }
}
