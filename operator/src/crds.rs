//! Registering the CRDs at start-up (server-side apply) and waiting until
//! the API server reports them Established.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};

/// The field manager of CRD writes.
pub const FIELD_MANAGER: &str = "cilium-operator-crds";

/// Applies every CRD and waits (up to `timeout`) until each is Established.
pub async fn register(client: &kube::Client, timeout: Duration) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let crds = cilium_crds::all_crds();
    for crd in &crds {
        let name = crd.metadata.name.clone().expect("CRDs are named");
        let mut body = serde_json::to_value(crd)?;
        body["apiVersion"] = "apiextensions.k8s.io/v1".into();
        body["kind"] = "CustomResourceDefinition".into();
        api.patch(&name, &pp, &Patch::Apply(&body))
            .await
            .map_err(|e| anyhow::anyhow!("registering CRD {name}: {e}"))?;
    }
    let deadline = tokio::time::Instant::now() + timeout;
    for crd in &crds {
        let name = crd.metadata.name.clone().expect("CRDs are named");
        loop {
            let current = api.get(&name).await?;
            if is_established(&current) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("CRD {name} not Established after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tracing::info!(count = crds.len(), "CRDs registered and Established");
    Ok(())
}

fn is_established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
}

/// Writes `crds/<plural>.yaml` for every CRD; returns the paths written.
pub fn generate(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for crd in cilium_crds::all_crds() {
        let path = dir.join(cilium_crds::crd::file_name(&crd));
        std::fs::write(&path, cilium_crds::crd::to_yaml(&crd))?;
        written.push(path);
    }
    Ok(written)
}
