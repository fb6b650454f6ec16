//! ciliumctl: one tool for what the identity-exhaustion troubleshooting
//! guide does by hand: operator and allocation health, identities,
//! endpoints, IPAM pools, the kvstore, and `doctor`, which runs every check
//! and names each problem with its evidence and fix.
//!
//! `policy trace` says whether a flow passes and which rule decides.
//!
//! Exit status: 0 success; 1 error (one line on stderr); `doctor` 2 with
//! warnings, 3 with a critical finding; `policy trace` 2 when the flow is
//! denied.

mod agent_api;
mod agents;
mod commands;
mod ctx;
mod doctor;
mod identity;
mod monitor;
mod output;
mod policy;
mod snapshot;
mod sysdump;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::ctx::{Ctx, Global};
use crate::output::{ColorChoice, Format, Output};

#[derive(Parser)]
#[command(
    name = "ciliumctl",
    version,
    about = "Troubleshoot a Cilium control plane: status, identities, endpoints, IPAM, kvstore, policy trace, doctor"
)]
struct Cli {
    /// Kubeconfig to use (default: $KUBECONFIG, ~/.kube/config or in-cluster).
    #[arg(long, global = true, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the operator, its Lease and the cilium-config ConfigMap.
    #[arg(long, global = true, env = "CILIUM_NAMESPACE", default_value = "kube-system")]
    cilium_namespace: String,
    /// etcd endpoints (comma-separated URLs), overriding kvstore-opt of cilium-config.
    #[arg(long, global = true, env = "CILIUM_KVSTORE_ENDPOINT")]
    kvstore_endpoint: Option<String>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Format,
    /// Colour: auto (only on a terminal), always, never.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    color: ColorChoice,
    /// Node agent API socket(s) for monitor, health and doctor's node
    /// checks, repeatable (default: unix:///var/run/cilium/cilium.sock
    /// when it exists).
    #[arg(short = 'H', long = "host", global = true)]
    hosts: Vec<String>,
    /// Timeout of one API request, in seconds.
    #[arg(long, global = true, default_value = "30")]
    request_timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Operator leader, identity use, IPAM pools, endpoints, pods, kvstore.
    Status,
    /// Security identities.
    #[command(subcommand)]
    Identity(IdentityCmd),
    /// CiliumEndpoints.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Cluster-pool IPAM.
    #[command(subcommand)]
    Ipam(IpamCmd),
    /// The kvstore (etcd).
    #[command(subcommand)]
    Kvstore(KvstoreCmd),
    /// Run every check and report each problem with its evidence and fix.
    Doctor,
    /// Network policy as the agents enforce it.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Stream the datapath's drops (or every verdict) from node agents,
    /// with pods, identities and the reason, until Ctrl-C.
    Monitor {
        /// drop (default) or verdict (every policy verdict, drops included).
        #[arg(short, long = "type", default_value = "drop")]
        kind: String,
        /// Only flows from NAMESPACE/POD, POD (any namespace) or an IP.
        #[arg(long)]
        from: Option<String>,
        /// Only flows to NAMESPACE/POD, POD (any namespace) or an IP.
        #[arg(long)]
        to: Option<String>,
    },
    /// Node-to-node and health endpoint reachability (ICMP, TCP) as each
    /// agent last probed it, with latencies. Exit code 2 when something is
    /// unreachable.
    Health,
    /// Collect objects, config, Events, logs and every report into one
    /// .tar.gz for a bug report (no Secrets).
    Sysdump {
        /// Archive to write (default: cilium-sysdump-<time>.tar.gz here).
        #[arg(long)]
        output_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Would a flow pass, and which rule decides? Exit code 2 when denied.
    Trace {
        /// Source: NAMESPACE/POD (a Cilium endpoint) or an IP address.
        #[arg(long)]
        src: String,
        /// Destination: NAMESPACE/POD or an IP address.
        #[arg(long)]
        dst: String,
        /// Destination port and protocol: 80, 80/tcp, 53/udp, 8/icmp (ICMP: the type).
        #[arg(long)]
        dport: String,
    },
    /// Every peer selector in force, the identities it selects and the
    /// policies using it.
    Selectors,
}

#[derive(Subcommand)]
enum IdentityCmd {
    /// List identities (from the backend the allocation mode reads).
    List {
        /// Kubernetes label selector on CiliumIdentity labels (e.g. app=web).
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Only identities carrying source:key=value (repeatable; k8s: assumed).
        #[arg(long)]
        label: Vec<String>,
        /// crd or kvstore (default: what identity-allocation-mode reads).
        #[arg(long)]
        source: Option<String>,
        /// Only identities without users.
        #[arg(long)]
        unused: bool,
    },
    /// Show one identity and the endpoints using it.
    Get {
        id: String,
        #[arg(long)]
        source: Option<String>,
    },
    /// Delete one identity (refused while in use unless --force).
    Delete {
        id: String,
        #[arg(long)]
        source: Option<String>,
        #[arg(long)]
        force: bool,
    },
    /// Ask the operator leader to run identity GC now, or show what would go.
    Gc {
        /// Only list what the GC would mark and delete; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        source: Option<String>,
        /// Seconds to wait for the leader's answer.
        #[arg(long, default_value = "120")]
        timeout: u64,
    },
}

#[derive(Subcommand)]
enum EndpointCmd {
    /// List endpoints (all namespaces unless -n).
    List {
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// Show one endpoint: NAMESPACE/NAME, or NAME with -n.
    Get {
        name: String,
        #[arg(short, long)]
        namespace: Option<String>,
    },
}

#[derive(Subcommand)]
enum IpamCmd {
    /// Pools used/free and each node's pod CIDRs and errors.
    Status,
}

#[derive(Subcommand)]
enum KvstoreCmd {
    /// Reachability, version, heartbeat age, identity keys and locks.
    Status,
    /// Read a key (or every key under a prefix).
    Get {
        key: String,
        #[arg(long)]
        prefix: bool,
    },
    /// Identity locks and whether any is stuck.
    Locks,
}

/// The connection flags, for the ciliumctl runs `sysdump` makes.
fn connection_flags(cli: &Cli) -> Vec<String> {
    let mut v = vec![
        format!("--cilium-namespace={}", cli.cilium_namespace),
        format!("--request-timeout={}", cli.request_timeout),
    ];
    if let Some(k) = &cli.kubeconfig {
        v.push(format!("--kubeconfig={}", k.display()));
    }
    if let Some(e) = &cli.kvstore_endpoint {
        v.push(format!("--kvstore-endpoint={e}"));
    }
    v.extend(cli.hosts.iter().map(|h| format!("--host={h}")));
    v
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    // The monitor talks to agents only: no Kubernetes connection needed.
    if let Command::Monitor { kind, from, to } = &cli.command {
        let filter = monitor::Filter { from: from.clone(), to: to.clone() };
        return monitor::monitor(&cli.hosts, kind, filter, cli.output).await;
    }
    if let Command::Health = &cli.command {
        return agents::health(&agents::hosts(&cli.hosts), &Output::new(cli.output, cli.color)).await;
    }
    let hosts = agents::hosts(&cli.hosts);
    let forward = connection_flags(&cli);
    let out = Output::new(cli.output, cli.color);
    let ctx = Ctx::connect(Global {
        kubeconfig: cli.kubeconfig,
        namespace: cli.cilium_namespace,
        kvstore_endpoint: cli.kvstore_endpoint,
        timeout: Duration::from_secs(cli.request_timeout.max(1)),
        out,
    })
    .await?;
    if let Some(e) = &ctx.config_error
        && !matches!(cli.command, Command::Doctor)
    {
        eprintln!("warning: {e}; using defaults");
    }
    match cli.command {
        Command::Status => commands::status(&ctx).await?,
        Command::Doctor => return commands::doctor(&ctx, &hosts).await,
        Command::Identity(c) => match c {
            IdentityCmd::List { selector, label, source, unused } => {
                identity::list(&ctx, source.as_deref(), selector.as_deref(), &label, unused).await?
            }
            IdentityCmd::Get { id, source } => identity::get(&ctx, &id, source.as_deref()).await?,
            IdentityCmd::Delete { id, source, force } => identity::delete(&ctx, &id, source.as_deref(), force).await?,
            IdentityCmd::Gc { dry_run: true, source, .. } => identity::gc_dry_run(&ctx, source.as_deref()).await?,
            IdentityCmd::Gc { dry_run: false, timeout, .. } => {
                identity::gc_now(&ctx, Duration::from_secs(timeout)).await?
            }
        },
        Command::Endpoint(EndpointCmd::List { namespace }) => {
            commands::endpoint_list(&ctx, namespace.as_deref()).await?
        }
        Command::Endpoint(EndpointCmd::Get { name, namespace }) => {
            commands::endpoint_get(&ctx, namespace.as_deref(), &name).await?
        }
        Command::Ipam(IpamCmd::Status) => commands::ipam_status(&ctx).await?,
        Command::Kvstore(KvstoreCmd::Status) => commands::kvstore_status(&ctx).await?,
        Command::Kvstore(KvstoreCmd::Get { key, prefix }) => commands::kvstore_get(&ctx, &key, prefix).await?,
        Command::Kvstore(KvstoreCmd::Locks) => commands::kvstore_locks(&ctx).await?,
        Command::Policy(PolicyCmd::Trace { src, dst, dport }) => {
            return policy::policy_trace(&ctx, &src, &dst, &dport).await;
        }
        Command::Policy(PolicyCmd::Selectors) => policy::policy_selectors(&ctx).await?,
        Command::Sysdump { output_file } => sysdump::sysdump(&ctx, output_file, &forward, &hosts).await?,
        Command::Monitor { .. } | Command::Health => unreachable!("handled before connecting"),
    }
    Ok(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ciliumctl: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ciliumctl: error: {}", ctx::one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
