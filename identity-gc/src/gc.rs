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
}
