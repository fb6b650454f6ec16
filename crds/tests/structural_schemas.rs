//! Every generated CRD must be a Kubernetes structural schema that every
//! supported API server (1.33 and later) accepts: a type on every node (or
//! an explicit preserve-unknown / int-or-string marker), no references, no
//! keywords the API server does not know, and logical junctors that only
//! require fields. CEL rules only at the root (upstream's policy rule).

use cilium_crds::all_crds;
use serde_json::Value;

const FORBIDDEN_KEYS: &[&str] = &["$ref", "$defs", "$schema", "definitions", "const", "title", "nullable", "examples"];

fn check(path: &str, schema: &Value, problems: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else {
        problems.push(format!("{path}: not an object"));
        return;
    };
    let root = path.matches('/').count() == 1;
    if obj.contains_key("x-kubernetes-validations") && !root {
        problems.push(format!("{path}: has `x-kubernetes-validations` below the root"));
    }
    for key in FORBIDDEN_KEYS {
        if obj.contains_key(*key) {
            problems.push(format!("{path}: has `{key}`"));
        }
    }
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    if !obj.contains_key("type") && !preserve && !int_or_string {
        problems.push(format!("{path}: no type"));
    }
    if let Some(Value::Array(values)) = obj.get("enum")
        && values.iter().any(Value::is_null)
    {
        problems.push(format!("{path}: null in enum"));
    }
    for junctor in ["oneOf", "anyOf", "allOf"] {
        for (i, branch) in obj.get(junctor).and_then(Value::as_array).into_iter().flatten().enumerate() {
            let keys: Vec<_> = branch.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
            if keys != ["required"] {
                problems.push(format!("{path}/{junctor}/{i}: may only list required fields, has {keys:?}"));
            }
            for field in branch["required"].as_array().into_iter().flatten() {
                let field = field.as_str().unwrap_or_default();
                if obj.get("properties").and_then(|p| p.get(field)).is_none() {
                    problems.push(format!("{path}/{junctor}/{i}: requires unknown field {field}"));
                }
            }
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            check(&format!("{path}/{name}"), child, problems);
        }
    }
    if let Some(items) = obj.get("items") {
        check(&format!("{path}/items"), items, problems);
    }
    if let Some(additional) = obj.get("additionalProperties").filter(|a| a.is_object()) {
        check(&format!("{path}/additionalProperties"), additional, problems);
    }
}

#[test]
fn every_crd_schema_is_structural() {
    let mut problems = Vec::new();
    for crd in all_crds() {
        for version in &crd.spec.versions {
            let schema =
                serde_json::to_value(version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
            check(&format!("{}/{}", crd.spec.names.plural, version.name), &schema, &mut problems);
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_crd_renders_as_yaml_that_parses_back() {
    for crd in all_crds() {
        let yaml = cilium_crds::crd::to_yaml(&crd);
        let body = yaml.split_once("---\n").expect("document marker").1;
        let parsed: Value = serde_saphyr::from_str(body).expect("valid YAML");
        let mut expected = serde_json::to_value(&crd).unwrap();
        expected["apiVersion"] = "apiextensions.k8s.io/v1".into();
        expected["kind"] = "CustomResourceDefinition".into();
        assert_eq!(parsed, expected, "{}", crd.spec.names.plural);
    }
}

#[test]
fn crds_are_the_six_upstream_kinds_in_group_cilium_io() {
    let crds = all_crds();
    let kinds: Vec<_> = crds.iter().map(|c| c.spec.names.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "CiliumIdentity",
            "CiliumEndpoint",
            "CiliumNode",
            "CiliumNetworkPolicy",
            "CiliumClusterwideNetworkPolicy",
            "CiliumCIDRGroup"
        ]
    );
    for crd in &crds {
        assert_eq!(crd.spec.group, "cilium.io");
        // v2 stored; CiliumCIDRGroup also serves the deprecated v2alpha1.
        let extra = if crd.spec.names.kind == "CiliumCIDRGroup" { 2 } else { 1 };
        assert_eq!(crd.spec.versions.len(), extra);
        assert_eq!(crd.spec.versions[0].name, "v2");
        assert!(crd.spec.versions[0].served && crd.spec.versions[0].storage);
        assert_eq!(crd.metadata.name.as_deref(), Some(format!("{}.cilium.io", crd.spec.names.plural).as_str()));
    }
}
