//! Identity GC decisions, pure: what one CRD-mode GC run does with one
//! identity, given whether an endpoint uses it and its heartbeat mark. The
//! operator acts on it; the CLI's `identity gc --dry-run` shows it.

use std::time::Duration;

/// What a run does with one identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Keep,
    /// In use but marked: remove the mark.
    Unmark,
    /// Unused and unmarked (or the mark is unreadable): mark now.
    Mark,
    /// Unused, marked long enough ago: delete.
    Delete,
    /// Unused, marked recently: wait.
    Wait,
}

/// The GC rule: `mark` is the `io.cilium.heartbeat` annotation (RFC3339Nano).
pub fn decide(used: bool, mark: Option<&str>, now: jiff::Timestamp, timeout: Duration) -> Action {
    let marked_at = mark.and_then(|m| m.parse::<jiff::Timestamp>().ok());
    match (used, mark, marked_at) {
        (true, Some(_), _) => Action::Unmark,
        (true, None, _) => Action::Keep,
        (false, None, _) | (false, Some(_), None) => Action::Mark,
        (false, Some(_), Some(t)) => {
            let age = now.duration_since(t);
            if age >= jiff::SignedDuration::try_from(timeout).unwrap_or(jiff::SignedDuration::MAX) {
                Action::Delete
            } else {
                Action::Wait
            }
        }
    }
}

/// The time a mark records: when the last user of the identity was seen
/// going (`released`, from the operator's endpoint watch), so that the
/// heartbeat timeout counts from then rather than from the next run that
/// happens to see it; `now` when that is unknown. It is never earlier than
/// `now - min(interval, timeout / 2)`: at least half the timeout (with the
/// defaults, 15 of the 30 minutes, as upstream keeps between its mark and
/// its deletion) always lies between writing a mark and acting on it, even
/// when runs were missed.
pub fn mark_time(
    released: Option<jiff::Timestamp>,
    now: jiff::Timestamp,
    interval: Duration,
    timeout: Duration,
) -> jiff::Timestamp {
    let back = jiff::SignedDuration::try_from(interval.min(timeout / 2)).unwrap_or(jiff::SignedDuration::ZERO);
    let floor = now.checked_sub(back).unwrap_or(now);
    match released {
        Some(r) if r <= now => r.max(floor),
        _ => now,
    }
}

/// When an identity marked at `mark` becomes due for deletion, if it stays
/// unused: what a run after that time would decide `Delete` on.
pub fn due(mark: jiff::Timestamp, timeout: Duration) -> Option<jiff::Timestamp> {
    mark.checked_add(jiff::SignedDuration::try_from(timeout).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        let now: jiff::Timestamp = "2026-11-23T12:00:00Z".parse().unwrap();
        let t = Duration::from_secs(30 * 60);
        assert_eq!(decide(true, None, now, t), Action::Keep);
        assert_eq!(decide(true, Some("2026-11-23T11:00:00Z"), now, t), Action::Unmark);
        assert_eq!(decide(false, None, now, t), Action::Mark);
        assert_eq!(decide(false, Some("garbage"), now, t), Action::Mark);
        assert_eq!(decide(false, Some("2026-11-23T11:45:00.123456789Z"), now, t), Action::Wait);
        assert_eq!(decide(false, Some("2026-11-23T11:30:00Z"), now, t), Action::Delete);
        assert_eq!(decide(false, Some("2026-11-23T12:00:00Z"), now, Duration::ZERO), Action::Delete);
    }

    #[test]
    fn a_mark_records_when_the_last_user_went_within_bounds() {
        let now: jiff::Timestamp = "2026-11-23T12:00:00Z".parse().unwrap();
        let (interval, timeout) = (Duration::from_secs(15 * 60), Duration::from_secs(30 * 60));
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        // Unknown: now.
        assert_eq!(mark_time(None, now, interval, timeout), now);
        // Seen going 10 minutes ago: then.
        assert_eq!(mark_time(Some(at("2026-11-23T11:50:00Z")), now, interval, timeout), at("2026-11-23T11:50:00Z"));
        // Seen going an hour ago (runs missed): no earlier than one interval.
        assert_eq!(mark_time(Some(at("2026-11-23T11:00:00Z")), now, interval, timeout), at("2026-11-23T11:45:00Z"));
        // A short timeout: at most half of it back.
        let short = Duration::from_secs(60);
        assert_eq!(mark_time(Some(at("2026-11-23T11:50:00Z")), now, interval, short), at("2026-11-23T11:59:30Z"));
        // A clock that went back: never a mark in the future.
        assert_eq!(mark_time(Some(at("2026-11-23T12:05:00Z")), now, interval, timeout), now);
        // Whatever the time, what `due` says is what `decide` deletes at.
        for released in [None, Some(at("2026-11-23T11:50:00Z")), Some(at("2026-11-23T10:00:00Z"))] {
            let mark = mark_time(released, now, interval, timeout).to_string();
            let d = due(mark.parse().unwrap(), timeout).unwrap();
            assert_eq!(decide(false, Some(&mark), d, timeout), Action::Delete);
            let before = d.checked_sub(jiff::SignedDuration::from_millis(1)).unwrap();
            assert_eq!(decide(false, Some(&mark), before, timeout), Action::Wait);
            assert!(d.duration_since(now) >= jiff::SignedDuration::from_mins(15), "half the timeout stays");
        }
    }
}
