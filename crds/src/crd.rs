//! Building CustomResourceDefinitions from Rust types and rendering them as
//! YAML.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceDefinition, CustomResourceDefinitionNames,
    CustomResourceDefinitionSpec, CustomResourceDefinitionVersion, CustomResourceSubresourceStatus,
    CustomResourceSubresources, CustomResourceValidation, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use schemars::JsonSchema;
use serde_json::{Value, json};

/// The names and presentation of one CRD.
pub struct CrdInfo {
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub short_names: &'static [&'static str],
    pub namespaced: bool,
    pub status_subresource: bool,
    /// `(name, type, jsonPath, description)`
    pub printer_columns: &'static [(&'static str, &'static str, &'static str, &'static str)],
    /// Top-level properties that must be present.
    pub required: &'static [&'static str],
}

/// The OpenAPI v3 schema of `T`, inlined and rewritten into a Kubernetes
/// structural schema (the same settings `#[derive(CustomResource)]` uses).
pub fn schema_of<T: JsonSchema>() -> Value {
    let generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(kube::core::schema::StructuralSchemaRewriter)
        .with_transform(kube::core::schema::OptionalEnum)
        .into_generator();
    let mut schema = generator.into_root_schema_for::<T>().to_value();
    strip_annotations(&mut schema);
    schema
}

/// Removes schema keys the API server does not keep (`$schema`, `title`) and
/// the empty `default` values schemars derives from `#[serde(default)]`
/// (`null`, `{}`, `[]`, `false`, `0`, `""`): upstream's CRDs declare none, and
/// API-server defaulting would otherwise add fields to objects written by
/// other clients. Explicit defaults (`#[schemars(extend("default" = ..))]`)
/// stay.
fn strip_annotations(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.remove("$schema");
            map.remove("title");
            let empty = |d: &Value| match d {
                Value::Null => true,
                Value::Object(o) => o.is_empty(),
                Value::Array(a) => a.is_empty(),
                Value::Bool(b) => !b,
                Value::Number(n) => n.as_f64() == Some(0.0),
                Value::String(s) => s.is_empty(),
            };
            if map.get("default").is_some_and(empty) {
                map.remove("default");
            }
            // schemars marks every `Option` nullable and adds `null` to
            // enums; our types omit absent fields instead, and upstream's
            // CRDs accept no `null`.
            if map.get("nullable") == Some(&Value::Bool(true)) {
                map.remove("nullable");
            }
            if let Some(Value::Array(values)) = map.get_mut("enum") {
                values.retain(|e| !e.is_null());
            }
            for (_, child) in map.iter_mut() {
                strip_annotations(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strip_annotations),
        _ => {}
    }
}

/// A CRD for the object type `T` (whose schema must not contain `metadata`,
/// `apiVersion` or `kind`; they are added here).
pub fn build<T: JsonSchema>(info: &CrdInfo) -> CustomResourceDefinition {
    let mut schema = schema_of::<T>();
    let obj = schema.as_object_mut().expect("object schema");
    obj.remove("description");
    let props = obj.entry("properties").or_insert_with(|| json!({})).as_object_mut().expect("properties");
    props.insert(
        "apiVersion".into(),
        json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}),
    );
    props.insert(
        "kind".into(),
        json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}),
    );
    props.insert("metadata".into(), json!({"type": "object"}));
    let mut required: Vec<Value> = info.required.iter().map(|r| json!(r)).collect();
    if let Some(Value::Array(existing)) = obj.remove("required") {
        for r in existing {
            if !required.contains(&r) {
                required.push(r);
            }
        }
    }
    if !required.is_empty() {
        obj.insert("required".into(), Value::Array(required));
    }
    obj.insert("type".into(), json!("object"));
    let props: JSONSchemaProps = serde_json::from_value(schema).expect("schema converts to JSONSchemaProps");

    let columns: Vec<CustomResourceColumnDefinition> = info
        .printer_columns
        .iter()
        .map(|(name, ty, path, desc)| CustomResourceColumnDefinition {
            name: name.to_string(),
            type_: ty.to_string(),
            json_path: path.to_string(),
            description: (!desc.is_empty()).then(|| desc.to_string()),
            ..Default::default()
        })
        .collect();

    CustomResourceDefinition {
        metadata: ObjectMeta { name: Some(format!("{}.{}", info.plural, crate::GROUP)), ..Default::default() },
        spec: CustomResourceDefinitionSpec {
            group: crate::GROUP.into(),
            names: CustomResourceDefinitionNames {
                categories: Some(vec!["cilium".into()]),
                kind: info.kind.into(),
                list_kind: Some(format!("{}List", info.kind)),
                plural: info.plural.into(),
                short_names: Some(info.short_names.iter().map(|s| s.to_string()).collect()),
                singular: Some(info.singular.into()),
            },
            scope: if info.namespaced { "Namespaced" } else { "Cluster" }.into(),
            versions: vec![CustomResourceDefinitionVersion {
                name: crate::VERSION.into(),
                served: true,
                storage: true,
                additional_printer_columns: (!columns.is_empty()).then_some(columns),
                schema: Some(CustomResourceValidation { open_api_v3_schema: Some(props) }),
                subresources: info.status_subresource.then(|| CustomResourceSubresources {
                    status: Some(CustomResourceSubresourceStatus(json!({}))),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        },
        status: None,
    }
}

/// The file name a CRD is written to under `crds/`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.spec.names.plural)
}

/// A CRD rendered as the YAML committed under `crds/`.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    let mut value = serde_json::to_value(crd).expect("CRD serializes");
    if let Some(obj) = value.as_object_mut() {
        obj.insert("apiVersion".into(), json!("apiextensions.k8s.io/v1"));
        obj.insert("kind".into(), json!("CustomResourceDefinition"));
    }
    let body = serde_saphyr::to_string(&value).expect("CRD renders as YAML");
    format!("# Generated by `cilium-operator crdgen` from the types in crds/src. Do not edit.\n---\n{body}")
}
