//! The committed `crds/*.yaml` must be exactly what the Rust types generate.
//! Regenerate with `cargo run -p cilium-operator -- crdgen --output-dir crds`.

use std::path::Path;

#[test]
fn committed_crd_yaml_matches_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stale = Vec::new();
    let crds = cilium_crds::all_crds();
    for crd in &crds {
        let path = dir.join(cilium_crds::crd::file_name(crd));
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != cilium_crds::crd::to_yaml(crd) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale CRD manifests (run `cargo run -p cilium-operator -- crdgen --output-dir crds`): {stale:?}"
    );
    let yaml_files = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "yaml"))
        .count();
    assert_eq!(yaml_files, crds.len(), "crds/ holds a YAML file no type generates");
}
