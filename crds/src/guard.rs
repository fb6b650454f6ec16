//! Watch caches that survive objects they cannot decode.
//!
//! A typed watch fails its whole list when one object does not decode, and
//! retries that list forever: one CiliumNetworkPolicy stored under an older
//! or foreign schema would stall every policy, identity or endpoint cache
//! built on it. [`reflector`] decodes each object on its own
//! ([`DeserializeGuard`]): an object that does not decode is reported to the
//! caller (who counts and names it), kept out of the cache, and removes the
//! last good version of the same object from the cache, so a policy that
//! became unreadable is no longer enforced, exactly as an invalid one.

use std::fmt::Debug;

use futures::{Stream, StreamExt};
use kube::Api;
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;

/// Bounds of the kinds a guarded cache holds.
pub trait Cached: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static {}
impl<K> Cached for K where K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{}

/// A watch cache of `K` fed by a watch that decodes object by object.
/// `on_invalid` is called for every object that does not decode, each time
/// it is listed or changed. The stream must be polled to drive the cache;
/// its items are the watch's errors (it retries with backoff).
pub fn reflector<K: Cached>(
    api: Api<DeserializeGuard<K>>,
    cfg: watcher::Config,
    mut on_invalid: impl FnMut(&InvalidObject) + Send + 'static,
) -> (Store<K>, impl Stream<Item = Result<(), watcher::Error>> + Send) {
    let (reader, writer) = reflector::store::<K>();
    let cache = reader.clone();
    let events = watcher::watcher(api, cfg)
        .default_backoff()
        .filter_map(move |ev| futures::future::ready(translate(ev, &cache, &mut on_invalid)));
    let stream = reflector::reflector(writer, events).map(|r| r.map(|_| ()));
    (reader, stream)
}

/// The cache event for one guarded watch event, if any.
fn translate<K: Cached>(
    ev: Result<Event<DeserializeGuard<K>>, watcher::Error>,
    cache: &Store<K>,
    on_invalid: &mut impl FnMut(&InvalidObject),
) -> Option<Result<Event<K>, watcher::Error>> {
    let ev = match ev {
        Ok(ev) => ev,
        Err(e) => return Some(Err(e)),
    };
    let previous = |bad: &InvalidObject| cache.get(&key::<K>(bad)).map(|old| Event::Delete((*old).clone()));
    let out = match ev {
        Event::Init => Some(Event::Init),
        Event::InitDone => Some(Event::InitDone),
        Event::InitApply(DeserializeGuard(Ok(k))) => Some(Event::InitApply(k)),
        Event::Apply(DeserializeGuard(Ok(k))) => Some(Event::Apply(k)),
        Event::Delete(DeserializeGuard(Ok(k))) => Some(Event::Delete(k)),
        Event::InitApply(DeserializeGuard(Err(bad))) => {
            on_invalid(&bad);
            None
        }
        Event::Apply(DeserializeGuard(Err(bad))) => {
            on_invalid(&bad);
            previous(&bad)
        }
        Event::Delete(DeserializeGuard(Err(bad))) => previous(&bad),
    };
    out.map(Ok)
}

fn key<K: Cached>(bad: &InvalidObject) -> ObjectRef<K> {
    let r = ObjectRef::new(bad.metadata.name.as_deref().unwrap_or_default());
    match &bad.metadata.namespace {
        Some(ns) => r.within(ns),
        None => r,
    }
}

/// `namespace/name` (or `name`) of an object that did not decode, for logs.
pub fn name_of(bad: &InvalidObject) -> String {
    match (&bad.metadata.namespace, &bad.metadata.name) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (None, Some(n)) => n.clone(),
        _ => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CiliumNetworkPolicy;
    use kube::runtime::reflector::Lookup;

    fn guard(v: serde_json::Value) -> DeserializeGuard<CiliumNetworkPolicy> {
        serde_json::from_value(v).unwrap()
    }

    fn good(name: &str) -> DeserializeGuard<CiliumNetworkPolicy> {
        guard(serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": { "name": name, "namespace": "default" },
            "spec": { "endpointSelector": { "matchLabels": { "app": "web" } } }
        }))
    }

    fn bad(name: &str) -> DeserializeGuard<CiliumNetworkPolicy> {
        let g = guard(serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": { "name": name, "namespace": "default" },
            "spec": { "endpointSelector": "app=web" }
        }));
        assert!(g.0.is_err(), "the fixture must not decode");
        g
    }

    /// Drives a writer with translated events, as the reflector does.
    fn feed(events: Vec<Event<DeserializeGuard<CiliumNetworkPolicy>>>) -> (Store<CiliumNetworkPolicy>, Vec<String>) {
        let (reader, mut writer) = reflector::store::<CiliumNetworkPolicy>();
        let mut seen = Vec::new();
        for ev in events {
            if let Some(Ok(e)) = translate(Ok(ev), &reader, &mut |b: &InvalidObject| seen.push(name_of(b))) {
                writer.apply_watcher_event(&e);
            }
        }
        (reader, seen)
    }

    fn names(s: &Store<CiliumNetworkPolicy>) -> Vec<String> {
        let mut v: Vec<String> = s.state().iter().filter_map(|p| p.name().map(|n| n.to_string())).collect();
        v.sort();
        v
    }

    #[test]
    fn a_bad_object_in_the_list_does_not_stall_the_cache() {
        let (s, seen) = feed(vec![
            Event::Init,
            Event::InitApply(good("a")),
            Event::InitApply(bad("b")),
            Event::InitApply(good("c")),
            Event::InitDone,
        ]);
        assert_eq!(names(&s), ["a", "c"]);
        assert_eq!(seen, ["default/b"]);
    }

    #[test]
    fn an_object_that_stops_decoding_leaves_the_cache_and_comes_back_when_fixed() {
        let (s, seen) = feed(vec![Event::Init, Event::InitApply(good("a")), Event::InitDone, Event::Apply(bad("a"))]);
        assert!(names(&s).is_empty(), "the last good version must not stay enforced");
        assert_eq!(seen, ["default/a"]);
        let (s, _) = feed(vec![Event::Init, Event::InitDone, Event::Apply(bad("a")), Event::Apply(good("a"))]);
        assert_eq!(names(&s), ["a"]);
        let (s, _) = feed(vec![Event::Init, Event::InitApply(good("a")), Event::InitDone, Event::Delete(bad("a"))]);
        assert!(names(&s).is_empty());
    }
}
