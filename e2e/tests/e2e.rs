//! End-to-end tests through the real binaries against one real control plane
//! (etcd + kube-apiserver) shared by every test of this process.
//!
//! Run with `cargo build --workspace --bins && cargo test -p e2e` after
//! `scripts/setup.sh` (or just `scripts/test.sh`).

use std::sync::Arc;

use e2e::{ControlPlane, Options};
use libtest_mimic::{Arguments, Failed, Trial};

mod chaos;
mod chart;
mod cli;
mod cni;
mod connectivity;
mod datapath;
mod endpoint_gc;
mod identity;
mod ipam;
mod nodes;
mod observe;
mod policy;
mod processes;
mod realnodes;
mod skeleton;

/// A test body: gets the shared control plane.
type TestFn = fn(&ControlPlane) -> anyhow::Result<()>;

fn trial(cp: &Arc<ControlPlane>, name: &str, f: TestFn) -> Trial {
    let cp = cp.clone();
    Trial::test(name, move || f(&cp).map_err(|e| Failed::from(format!("{e:#}"))))
}

fn main() {
    e2e::shutdown::install();
    let args = Arguments::from_args();
    let tests: &[(&str, TestFn)] = &[
        ("skeleton::crds_and_policy_fixtures_against_api_server", skeleton::crds_and_policy_fixtures),
        ("skeleton::bad_config_exits_with_one_line", skeleton::bad_config_exits_with_one_line),
        ("skeleton::leader_election_failover_and_release", skeleton::leader_election_failover_and_release),
        ("skeleton::prometheus_scrapes_operator", skeleton::prometheus_scrapes_operator),
        ("ipam::allocation_exhaustion_extension_and_gc", ipam::allocation_exhaustion_extension_and_gc),
        ("ipam::failover_chaos_burst", ipam::failover_chaos_burst),
        ("ipam::odd_nodes_never_get_overlapping_cidrs", ipam::odd_nodes_never_get_overlapping_cidrs),
        ("endpoint_gc::orphans_end_as_specified", endpoint_gc::orphans_end_as_specified),
        ("endpoint_gc::survives_apiserver_restart", endpoint_gc::survives_apiserver_restart),
        ("endpoint_gc::interval_zero_runs_once", endpoint_gc::interval_zero_runs_once),
        ("nodes::agent_readiness_drives_taints_and_condition", nodes::agent_readiness_drives_taints_and_condition),
        ("cni::plugin_through_libcni", cni::plugin_through_libcni),
        (
            "realnodes::kubelets_run_a_deployment_through_cilium_cni",
            realnodes::kubelets_run_a_deployment_through_cilium_cni,
        ),
        ("realnodes::helm_install_on_real_nodes", realnodes::helm_install_on_real_nodes),
        ("identity::crd_allocation_races_and_gc", identity::crd_allocation_races_and_gc),
        ("identity::gc_clock_survives_operator_restart", identity::gc_clock_survives_operator_restart),
        ("identity::reclaimed_a_timeout_after_the_last_user", identity::reclaimed_a_timeout_after_the_last_user),
        ("identity::rate_limit_holds_in_every_window", identity::rate_limit_holds_in_every_window),
        ("identity::kvstore_heartbeat_layout_and_etcd_restart", identity::kvstore_heartbeat_layout_and_etcd_restart),
        ("identity::kvstore_allocation_layout_and_races", identity::kvstore_allocation_layout_and_races),
        ("identity::kvstore_gc_two_rounds", identity::kvstore_gc_two_rounds),
        ("identity::kvstore_local_id_taken_by_other_labels", identity::kvstore_local_id_taken_by_other_labels),
        ("identity::kvstore_gc_past_the_grpc_limit", identity::kvstore_gc_past_the_grpc_limit),
        ("identity::space_pressure_and_label_explosion", identity::space_pressure_and_label_explosion),
        ("identity::migration_kvstore_to_crd", identity::migration_kvstore_to_crd),
        ("identity::churn_never_deletes_a_used_identity", identity::churn_never_deletes_a_used_identity),
        ("cli::doctor_and_commands_on_seeded_faults", cli::doctor_and_commands_on_seeded_faults),
        ("chart::helm_install_upgrade_uninstall", chart::helm_install_upgrade_uninstall),
        ("chart::rbac_least_privilege", chart::rbac_least_privilege),
        ("datapath::star_wars_policy_with_real_packets", datapath::star_wars_policy_with_real_packets),
        ("datapath::egress_deny_cidr_entities_expressions", datapath::egress_deny_cidr_entities_expressions),
        ("datapath::cidr_groups_select_external_hosts", datapath::cidr_groups_select_external_hosts),
        ("datapath::to_services_select_service_backends", datapath::to_services_select_service_backends),
        ("datapath::from_nodes_selects_nodes_by_label", datapath::from_nodes_selects_nodes_by_label),
        ("datapath::dual_stack_pods_enforce_both_families", datapath::dual_stack_pods_enforce_both_families),
        ("datapath::kvstore_mode_identities", datapath::kvstore_mode_identities),
        ("observe::monitor_shows_drops_and_verdicts", observe::monitor_shows_drops_and_verdicts),
        ("observe::health_doctor_and_map_pressure", observe::health_doctor_and_map_pressure),
        ("datapath::doublewrite_mode_identities", datapath::doublewrite_mode_identities),
        ("policy::upstream_forms_through_the_agents", policy::upstream_forms_through_the_agents),
        ("policy::kubernetes_network_policies", policy::kubernetes_network_policies),
        ("connectivity::upstream_connectivity_scenarios", connectivity::upstream_connectivity_scenarios),
        ("chaos::etcd_blackhole_longer_than_the_lease", chaos::etcd_blackhole_longer_than_the_lease),
        ("chaos::deleted_endpoints_of_running_pods_come_back", chaos::deleted_endpoints_of_running_pods_come_back),
        ("chaos::statefulset_name_reused_on_another_node", chaos::statefulset_name_reused_on_another_node),
        ("chaos::malformed_objects_are_skipped_and_named", chaos::malformed_objects_are_skipped_and_named),
        ("processes::demo_ends_cleanly_on_sigint_and_sigterm", processes::demo_ends_cleanly_on_sigint_and_sigterm),
    ];
    if args.list {
        let trials = tests.iter().map(|(n, _)| Trial::test(*n, || Ok(()))).collect();
        libtest_mimic::run(&args, trials).exit();
    }
    let cp = match ControlPlane::start(Options { controller_manager: true, ..Default::default() }) {
        Ok(cp) => Arc::new(cp),
        Err(e) => {
            eprintln!("cannot start the test control plane: {e:#}");
            std::process::exit(101);
        }
    };
    let trials = tests.iter().map(|(n, f)| trial(&cp, n, *f)).collect();
    let conclusion = libtest_mimic::run(&args, trials);
    drop(cp);
    conclusion.exit();
}
