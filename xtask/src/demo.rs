//! `cargo xtask demo`: the main job, shown on a local testbed. Each step is a
//! function so later data-path work can add steps (identity service, agents)
//! between bringing the testbed up and running traffic.

use std::{net::SocketAddr, path::Path};

use anyhow::Context as _;

use crate::{
    testapp,
    testbed::{Testbed, TestbedSpec, require_root},
};

const ECHO_PORT: u16 = 8080;

pub fn run() -> anyhow::Result<()> {
    require_root()?;
    let testapp = testapp::build().context("building testapp")?;
    let testbed = Testbed::up(&TestbedSpec::meshed(2, 2))?;
    show_cluster(&testbed);
    cross_node_echo(&testbed, &testapp)?;
    testbed.down()?;
    println!("testbed torn down");
    Ok(())
}

fn show_cluster(testbed: &Testbed) {
    let cluster = testbed.cluster();
    println!(
        "testbed {} (cluster file {})",
        testbed.id(),
        testbed.cluster_file_path().display()
    );
    println!("  control plane: {}", testbed.control_plane_ip());
    for node in &cluster.nodes {
        println!("  {:<8} {:<12} pods {}", node.name, node.ip, node.pod_cidr);
        for pod in cluster.pods_on(&node.name) {
            let meshed = if cluster.is_meshed(pod) {
                "meshed"
            } else {
                "not meshed"
            };
            println!(
                "    {:<24} {:<12} sa={} ({meshed})",
                format!("{}/{}", pod.namespace, pod.name),
                pod.ip,
                pod.service_account
            );
        }
    }
}

/// Echo from the first pod of node-0 to the first pod of node-1.
fn cross_node_echo(testbed: &Testbed, testapp: &Path) -> anyhow::Result<()> {
    let cluster = testbed.cluster();
    let client = cluster
        .pods_on("node-0")
        .next()
        .context("node-0 has no pod")?;
    let server = cluster
        .pods_on("node-1")
        .next()
        .context("node-1 has no pod")?;
    let server_addr = SocketAddr::from((server.ip, ECHO_PORT));
    let mut echo = testbed.spawn_in_pod(
        &server.namespace,
        &server.name,
        testapp::echo_server(testapp, server_addr),
    )?;
    testapp::wait_listening(&mut echo)?;
    let output = testbed
        .spawn_in_pod(
            &client.namespace,
            &client.name,
            testapp::client(testapp, server_addr, "hello from node-0", 3),
        )?
        .wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "echo {} -> {} failed: {}",
        client.name,
        server.name,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    println!(
        "echo {} ({}) -> {} ({}): {}",
        client.name,
        client.node,
        server.name,
        server.node,
        String::from_utf8_lossy(&output.stdout).trim()
    );
    Ok(())
}
