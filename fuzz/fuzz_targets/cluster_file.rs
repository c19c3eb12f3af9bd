//! The cluster file (local mode's source of nodes, pods, Services and tokens).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealmesh_common::cluster::ClusterFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = ClusterFile::from_yaml(text) {
        let _ = file.trust_domain();
        // What the testbed writes back must read again.
        ClusterFile::from_yaml(&file.to_yaml()).expect("a parsed cluster file re-reads");
    }
});
