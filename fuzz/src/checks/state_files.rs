//! The state files read at start-up: a checkpoint, a journal cursor, the saved open
//! sessions. The first byte picks which; the rest is the file. Sessions are restored and
//! renewed over their hold: no renewal outlives the hold of a login that happened.

use std::collections::HashMap;

use super::super::{AllAlive, HOLD, NOW, TTL};
use dovegate::session::Sessions;
use dovegate::state::{parse_sessions, Checkpoint, JournalCursor};

pub fn check(data: &[u8]) {
    let Some((&kind, file)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            let _ = serde_json::from_slice::<Checkpoint>(file);
        }
        1 => {
            let _ = serde_json::from_slice::<JournalCursor>(file);
        }
        _ => {
            let Ok(saved) = parse_sessions(file) else {
                return;
            };
            // The latest login each address was saved with: a renewal is the address's,
            // and one session of it within its hold justifies it (found by fuzzing: two
            // sessions of one address, the older one long past its hold, the newer one
            // alive; checking against the older one's hold was the check's mistake).
            let mut login: HashMap<_, i64> = HashMap::new();
            for s in &saved {
                let l = login.entry(s.ip).or_insert(s.login);
                *l = (*l).max(s.login);
            }
            let sources: Vec<String> = saved.iter().map(|s| s.source.clone()).collect();
            let mut sessions = Sessions::new(TTL, HOLD);
            sessions.restore(saved, NOW, &sources);
            let mut now = NOW;
            while now < NOW + 2 * HOLD {
                for r in sessions.renewals(now, &mut AllAlive) {
                    let l = login[&r.ip];
                    assert!(r.time <= now, "a renewal in the future");
                    // A login saved with a future time counts as happening now at most.
                    assert!(
                        r.time < l.min(NOW).saturating_add(HOLD),
                        "renewal at {} of {} past the hold of its login at {l} (now {now})",
                        r.time,
                        r.ip
                    );
                }
                now += TTL / 3;
            }
        }
    }
}
