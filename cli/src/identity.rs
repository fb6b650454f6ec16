//! `identity list|get|delete|gc`.

use std::time::Duration;

use anyhow::{anyhow, bail};
use cilium_crds::CiliumIdentity;
use cilium_identity::gc::{Action, decide};
use cilium_operator::gc_request;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use serde::Serialize;

use crate::ctx::{Ctx, one_line, parse_id};
use crate::output::{Style, Table, age};
use crate::snapshot::{self, EndpointInfo, IdentityInfo};

/// `--label source:key=value` filters: every one must match.
pub fn matches_labels(i: &IdentityInfo, filters: &[String]) -> anyhow::Result<bool> {
    for f in filters {
        let (k, v) = f
            .split_once('=')
            .ok_or_else(|| anyhow!("invalid --label {f:?}: expected source:key=value, e.g. k8s:app=web"))?;
        let key = if k.contains(':') { k.to_string() } else { format!("k8s:{k}") };
        if i.labels.get(&key).map(String::as_str) != Some(v) {
            return Ok(false);
        }
    }
    Ok(true)
}

pub async fn list(
    ctx: &Ctx,
    source: Option<&str>,
    selector: Option<&str>,
    labels: &[String],
    unused: bool,
) -> anyhow::Result<()> {
    let endpoints = snapshot::endpoints(ctx, None).await?;
    let mut ids = snapshot::identities(ctx, source, selector, &endpoints).await?;
    let mut kept = Vec::with_capacity(ids.len());
    for i in ids.drain(..) {
        if matches_labels(&i, labels)? && (!unused || i.users == 0) {
            kept.push(i);
        }
    }
    if !ctx.out.is_table() {
        return ctx.out.machine(&kept);
    }
    let now = jiff::Timestamp::now();
    let users = if kept.first().is_some_and(|i| i.source == "kvstore") { "NODES" } else { "ENDPOINTS" };
    let mut t = Table::new(&["ID", users, "MARKED", "AGE", "LABELS"]);
    for i in &kept {
        let mark = i
            .marked_at
            .as_deref()
            .and_then(|m| m.parse::<jiff::Timestamp>().ok())
            .map(|m| format!("{} ago", age(now.duration_since(m))))
            .unwrap_or_else(|| "-".into());
        let users = if i.users == 0 { ctx.out.paint("0", Style::Warn) } else { i.users.to_string() };
        let created = i.created.map(|c| age(now.duration_since(c))).unwrap_or_else(|| "-".into());
        t.row(vec![i.id.to_string(), users, mark, created, i.key_string()]);
    }
    print!("{}", t.render());
    eprintln!("{} identities", kept.len());
    Ok(())
}

#[derive(Serialize)]
struct Detail<'a> {
    #[serde(flatten)]
    identity: &'a IdentityInfo,
    key: String,
    endpoints: Vec<String>,
}

async fn find(ctx: &Ctx, id_arg: &str, source: Option<&str>) -> anyhow::Result<(IdentityInfo, Vec<EndpointInfo>)> {
    let id = parse_id(id_arg)?;
    let endpoints = snapshot::endpoints(ctx, None).await?;
    let src = source.unwrap_or(if snapshot::reads_kvstore(ctx) { "kvstore" } else { "crd" });
    let found = if src == "crd" {
        snapshot::crd_identity(ctx, id, &endpoints).await?
    } else {
        snapshot::identities(ctx, Some(src), None, &endpoints).await?.into_iter().find(|i| i.id == id)
    };
    let Some(found) = found else {
        bail!("identity {id} not found ({src})");
    };
    let using = endpoints.into_iter().filter(|e| e.identity == Some(id)).collect();
    Ok((found, using))
}

pub async fn get(ctx: &Ctx, id_arg: &str, source: Option<&str>) -> anyhow::Result<()> {
    let (i, using) = find(ctx, id_arg, source).await?;
    let names: Vec<String> = using.iter().map(|e| format!("{}/{}", e.namespace, e.name)).collect();
    if !ctx.out.is_table() {
        return ctx.out.machine(&Detail { identity: &i, key: i.key_string(), endpoints: names });
    }
    println!("{:<12}{}", "ID:", ctx.out.paint(&i.id.to_string(), Style::Bold));
    println!("{:<12}{}", "Source:", i.source);
    if let Some(c) = i.created {
        println!("{:<12}{c}", "Created:");
    }
    println!("{:<12}{}", "Marked:", i.marked_at.as_deref().unwrap_or("-"));
    println!("{:<12}{}", "Users:", i.users);
    println!("Labels:");
    for (k, v) in &i.labels {
        println!("  {k}={v}");
    }
    if !names.is_empty() {
        println!("Endpoints:");
        for n in names {
            println!("  {n}");
        }
    }
    Ok(())
}

pub async fn delete(ctx: &Ctx, id_arg: &str, source: Option<&str>, force: bool) -> anyhow::Result<()> {
    let (i, _) = find(ctx, id_arg, source).await?;
    if i.users > 0 && !force {
        let what = if i.source == "kvstore" { "node(s) hold value keys for it" } else { "endpoint(s) use it" };
        bail!("identity {} is in use: {} {what}; pass --force to delete it anyway", i.id, i.users);
    }
    if i.source == "kvstore" {
        use cilium_identity_alloc::kvstore::{id_key, value_prefix};
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let mut etcd = ctx.etcd().await?;
        let key = i.key_string();
        let mut txn = Txn::new();
        if !force {
            txn = txn.when([Compare::create_revision(value_prefix(&key), CompareOp::Equal, 0).with_prefix()]);
        }
        let r = etcd
            .txn(txn.and_then([TxnOp::delete(id_key(i.id), None)]))
            .await
            .map_err(|e| anyhow!("deleting kvstore identity {}: {}", i.id, one_line(&e.to_string())))?;
        if !r.succeeded() {
            bail!("identity {} gained a user while deleting; not deleted", i.id);
        }
    } else {
        let api: Api<CiliumIdentity> = Api::all(ctx.client.clone());
        let current = api.get(&i.id.to_string()).await.map_err(|e| ctx.kube_error(e, "reading the identity"))?;
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: current.metadata.uid.clone(),
                resource_version: current.metadata.resource_version.clone(),
            }),
            ..Default::default()
        };
        api.delete(&i.id.to_string(), &dp)
            .await
            .map_err(|e| ctx.kube_error(e, &format!("deleting identity {}", i.id)))?;
    }
    println!("identity {} deleted ({})", i.id, i.source);
    Ok(())
}

#[derive(Serialize)]
struct Planned {
    id: u32,
    action: &'static str,
    when: String,
    labels: String,
}

/// `identity gc --dry-run`: what the next CRD GC runs would do, by the
/// operator's own rule. kvstore: unused IDs (deleted on the second round).
pub async fn gc_dry_run(ctx: &Ctx, source: Option<&str>) -> anyhow::Result<()> {
    let endpoints = snapshot::endpoints(ctx, None).await?;
    let ids = snapshot::identities(ctx, source, None, &endpoints).await?;
    let range = ctx.range();
    let now = jiff::Timestamp::now();
    let timeout = ctx.config.identity_heartbeat_timeout;
    let mut plan = Vec::new();
    for i in ids.iter().filter(|i| range.contains(&i.id)) {
        let (action, when) = if i.source == "kvstore" {
            if i.users > 0 {
                continue;
            }
            ("delete", "after two GC rounds with no user".to_string())
        } else {
            match decide(i.users > 0, i.marked_at.as_deref(), now, timeout) {
                Action::Keep => continue,
                Action::Unmark => ("unmark", "next run (in use again)".into()),
                Action::Mark => (
                    "mark",
                    format!("next run; deleted {} later if still unused", cilium_operator::duration::format(timeout)),
                ),
                Action::Delete => ("delete", "next run".into()),
                Action::Wait => {
                    let at = i.marked_at.as_deref().and_then(|m| m.parse::<jiff::Timestamp>().ok());
                    let due = at.and_then(|t| t.checked_add(jiff::SignedDuration::try_from(timeout).ok()?).ok());
                    ("delete", due.map(|d| format!("first run after {d}")).unwrap_or_default())
                }
            }
        };
        plan.push(Planned { id: i.id, action, when, labels: i.key_string() });
    }
    if !ctx.out.is_table() {
        return ctx.out.machine(&plan);
    }
    let mut t = Table::new(&["ID", "ACTION", "WHEN", "LABELS"]);
    for p in &plan {
        let action = match p.action {
            "delete" => ctx.out.paint(p.action, Style::Bad),
            "mark" => ctx.out.paint(p.action, Style::Warn),
            _ => p.action.to_string(),
        };
        t.row(vec![p.id.to_string(), action, p.when.clone(), p.labels.clone()]);
    }
    if t.is_empty() {
        println!("nothing to collect: every identity in {}..={} is in use", range.start(), range.end());
    } else {
        print!("{}", t.render());
    }
    let deletes = plan.iter().filter(|p| p.action == "delete").count();
    eprintln!(
        "dry run: {deletes} to delete, {} to mark, nothing changed",
        plan.iter().filter(|p| p.action == "mark").count()
    );
    Ok(())
}

/// `identity gc`: asks the operator leader to run a pass now and prints
/// what it did.
pub async fn gc_now(ctx: &Ctx, timeout: Duration) -> anyhow::Result<()> {
    let lease = snapshot::lease(ctx).await?;
    let holder = lease
        .as_ref()
        .and_then(|l| {
            l.holder.clone().filter(|_| {
                l.renewed.is_some_and(|r| jiff::Timestamp::now().duration_since(r).as_secs() <= l.duration_seconds)
            })
        })
        .ok_or_else(|| {
            anyhow!(
                "no operator leader holds {}/{}: nobody would run the GC (see ciliumctl status)",
                ctx.namespace,
                cilium_operator::leader::LEASE_NAME
            )
        })?;
    let request_id = format!("{:016x}", rand::random::<u64>());
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let body = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": gc_request::CONFIG_MAP },
        "data": {
            gc_request::REQUEST_ID: request_id,
            gc_request::REQUESTED_AT: jiff::Timestamp::now().to_string(),
        },
    });
    let pp = PatchParams::apply("ciliumctl").force();
    api.patch(gc_request::CONFIG_MAP, &pp, &Patch::Apply(&body)).await.map_err(|e| {
        ctx.kube_error(e, &format!("writing the GC request to ConfigMap {}/{}", ctx.namespace, gc_request::CONFIG_MAP))
    })?;
    ctx.out.step(&format!("waiting for {holder} to run identity GC"));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let cm = api.get_opt(gc_request::CONFIG_MAP).await.map_err(|e| ctx.kube_error(e, "reading the GC answer"))?;
        let data = cm.and_then(|c| c.data).unwrap_or_default();
        if data.get(gc_request::COMPLETED_ID) == Some(&request_id) {
            ctx.out.done();
            let result = data.get(gc_request::RESULT).cloned().unwrap_or_default();
            if !ctx.out.is_table() {
                return ctx
                    .out
                    .machine(&serde_json::json!({ "leader": holder, "request": request_id, "result": result }));
            }
            println!("identity GC pass run by {holder}: {result}");
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            ctx.out.done();
            bail!("the operator leader {holder} did not answer within {}s (its logs say why)", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_filters() {
        let i = IdentityInfo {
            id: 300,
            labels: [
                ("k8s:app".to_string(), "web".to_string()),
                ("k8s:io.kubernetes.pod.namespace".into(), "prod".into()),
            ]
            .into(),
            users: 0,
            marked_at: None,
            created: None,
            source: "crd",
        };
        assert!(matches_labels(&i, &["k8s:app=web".into()]).unwrap());
        assert!(matches_labels(&i, &["app=web".into(), "io.kubernetes.pod.namespace=prod".into()]).unwrap());
        assert!(!matches_labels(&i, &["app=db".into()]).unwrap());
        assert!(matches_labels(&i, &["app".into()]).unwrap_err().to_string().contains("source:key=value"));
    }
}
