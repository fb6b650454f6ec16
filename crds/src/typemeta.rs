//! `apiVersion` and `kind` as zero-sized fields: every resource of this
//! crate serializes them (the API server needs them on create and apply)
//! while code constructs objects with `..Default::default()` and never
//! spells them out. Any value is accepted when deserializing.

use std::fmt;
use std::marker::PhantomData;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Serializes as `cilium.io/v2`.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiVersion;

impl fmt::Debug for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(crate::API_VERSION)
    }
}

impl Serialize for ApiVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(crate::API_VERSION)
    }
}

impl<'de> Deserialize<'de> for ApiVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d)?;
        Ok(ApiVersion)
    }
}

/// Serializes as the kind of `K`.
pub struct Kind<K>(PhantomData<fn() -> K>);

impl<K> Clone for Kind<K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K> Copy for Kind<K> {}
impl<K> Default for Kind<K> {
    fn default() -> Self {
        Kind(PhantomData)
    }
}
impl<K> PartialEq for Kind<K> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<K: kube::Resource<DynamicType = ()>> fmt::Debug for Kind<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&K::kind(&()))
    }
}

impl<K: kube::Resource<DynamicType = ()>> Serialize for Kind<K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&K::kind(&()))
    }
}

impl<'de, K> Deserialize<'de> for Kind<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d)?;
        Ok(Kind(PhantomData))
    }
}
