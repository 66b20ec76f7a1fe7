//! Logins and session ends from Dovecot's event exporter (`[events]`): Dovecot 2.3 posts
//! each event over HTTP (`transport = http-post`) to loopback with a secret path segment;
//! 2.4 can also write them to a unix socket (`driver = unix`), whose peer uid is checked.
//! Each event is answered at once and handed to the engine through a bounded queue: a
//! slow or stopped engine drops events (counted, warned) and never delays Dovecot.
//!
//! Logins become the same `Batch` as the push paths' (no checkpoint: a lost event is a
//! lost login unless a log source runs beside, and an equal grant from both is one grant);
//! session ends are exact (`SessionEnd::exact`).

mod listen;
pub mod pair;
pub mod parse;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use crate::config::events::{EventsSection, EventsSettings};
use crate::model::{Batch, LoginDetail, SeenLogin};
use crate::model::{SessionEnd, SessionStart};
use crate::net::background::{Background, Setup};
use crate::net::StartError;
use crate::telemetry::{Count, Level, Report, Reporter, StatsRegistry};
use parse::{Event, Ignored};

/// The `Batch::source` of exported events (no position; distinct from the others).
pub const EVENTS_SOURCE: usize = usize::MAX - 1;
/// The name of this source, in the sessions it opens and the ends it reports.
pub const ORIGIN: &str = "events";
/// Events waiting for the engine at most; beyond, new ones are dropped (and counted).
const QUEUE: usize = 4096;
/// Events sent to the engine in one batch at most.
const BATCH: usize = 256;

/// What successful authentications leave for the events after them (see `pair`).
#[derive(Default)]
struct Pairs {
    /// The session id, by connection (for the master login).
    sessions: pair::Pending<parse::Conn, String>,
    /// The client, by protocol and real peer (for a proxy's login).
    clients: pair::Pending<(String, (IpAddr, u16)), IpAddr>,
}

/// One queued event for the engine.
pub(crate) enum Item {
    Login(SeenLogin),
    End(SessionEnd),
}

/// Takes each event as it arrives: decides, counts, and queues it without waiting.
pub(crate) struct Intake {
    queue: mpsc::Sender<Item>,
    pending: Mutex<Pairs>,
    /// What it declines, each kind rate-limited on its own by the log: a misconfiguration
    /// must not hide behind malformed posts.
    reporter: Reporter,
    dropped: AtomicU64,
}

impl Intake {
    fn new(queue: mpsc::Sender<Item>, reporter: Reporter) -> Intake {
        Intake {
            queue,
            pending: Mutex::default(),
            reporter,
            dropped: AtomicU64::new(0),
        }
    }

    /// One event as Dovecot exported it. Never blocks.
    pub(crate) fn event(&self, body: &[u8]) {
        let item = match parse::parse(body) {
            Err(e) => {
                self.invalid(&format!("events: malformed event ({e}); nothing granted"));
                return;
            }
            Ok(Err(Ignored::Failed)) => {
                // Counted only: a failed authentication is Dovecot's to log.
                self.reporter.stats().count_near_miss("auth-failed");
                return;
            }
            Ok(Err(Ignored::Other)) => return,
            Ok(Ok(Event::Authenticated {
                conn,
                peer,
                session,
            })) => {
                let now = Instant::now();
                let mut pairs = self.pending();
                pairs
                    .clients
                    .authenticated((conn.protocol.clone(), peer), conn.remote.0, now);
                pairs.sessions.authenticated(conn, session, now);
                return;
            }
            Ok(Ok(Event::Login { conn, user })) => {
                let session = self.pending().sessions.take(&conn, Instant::now());
                self.reporter.stats().logins.fetch_add(1, Ordering::Relaxed);
                Item::Login(login(conn, user, session))
            }
            Ok(Ok(Event::Proxied {
                protocol,
                peer,
                user,
            })) => {
                let key = (protocol, peer);
                let Some(client) = self.pending().clients.take(&key, Instant::now()) else {
                    // The client is unknown: granting the peer could open the relay to a
                    // proxy in front.
                    self.reporter.decline(Count::NearMiss("proxy-unpaired"), "unpaired", format!(
                        "events: proxied login of {user:?} from {} without its authentication event (the auth_request_finished metric missing, or the event lost); nothing granted",
                        key.1 .0
                    ));
                    return;
                };
                self.reporter.stats().logins.fetch_add(1, Ordering::Relaxed);
                Item::Login(proxied(client, key.0, user))
            }
            Ok(Ok(Event::End {
                protocol,
                session,
                user,
            })) => {
                if !crate::model::ends_held(&protocol) {
                    return;
                }
                Item::End(end(protocol, session, user))
            }
        };
        if self.queue.try_send(item).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            self.reporter.report(Report::Fault {
                kind: "dropped",
                what: format!(
                    "events: the engine is not keeping up; event dropped ({n} so far); a login it carried grants only if a log source also sees it"
                ),
                level: Level::Warn,
            });
        }
    }

    /// A post or line that is not an event (too large, too slow, not JSON).
    pub(crate) fn invalid(&self, what: &str) {
        self.reporter.decline(
            Count::NearMiss("malformed-event"),
            "malformed",
            what.to_string(),
        );
    }

    /// A connection or post refused for its origin (secret, peer uid).
    pub(crate) fn refuse(&self, what: &str) {
        self.reporter
            .decline(Count::Forged, "refused", what.to_string());
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pairs> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The login of a mail session: a grant for the client, and a held session for IMAP (the
/// only protocol whose clients stay connected) when its session id is known. The session
/// is `exact`: this source also reports its end (`end`), so the hold has evidence while
/// the source is seen reporting ends (see `session`).
fn login(conn: parse::Conn, user: String, session: Option<String>) -> SeenLogin {
    let ip: IpAddr = conn.remote.0;
    let session = session
        .filter(|_| crate::model::holds(conn.protocol.as_bytes()))
        .and_then(|id| SessionStart::new(&id, None))
        .map(|s| SessionStart {
            user: Some(user.clone()),
            source: ORIGIN.into(),
            // Delivered over an authenticated channel (the secret, the peer's uid).
            trusted: true,
            exact: true,
            ..s
        });
    let session_id = session.as_ref().map(|s| s.id.clone());
    SeenLogin {
        ip,
        time: Some(crate::timefmt::now()),
        session,
        detail: Some(Box::new(LoginDetail {
            user: Some(user),
            protocol: conn.protocol,
            session: session_id,
            pattern: "auth_master_client_login_finished".into(),
            source: ORIGIN.into(),
        })),
    }
}

/// The exact end of a mail session, as Dovecot's mail process reports it: it names the
/// session but no pid (it closes the session whatever pid a log line gave it).
fn end(protocol: String, session: String, user: Option<String>) -> SessionEnd {
    SessionEnd {
        service: protocol,
        id: Some(session),
        pid: None,
        user,
        time: None,
        source: ORIGIN.into(),
        trusted: true,
        exact: true,
    }
}

/// A login a proxy passed on to its backend: a grant for the client (no session: it is
/// held on the backend).
fn proxied(client: IpAddr, protocol: String, user: String) -> SeenLogin {
    SeenLogin {
        ip: client,
        time: Some(crate::timefmt::now()),
        session: None,
        detail: Some(Box::new(LoginDetail {
            user: Some(user),
            protocol,
            session: None,
            pattern: "proxy_session_established".into(),
            source: ORIGIN.into(),
        })),
    }
}

/// Moves queued events to the engine in batches; only this task ever waits for it.
async fn forward(mut rx: mpsc::Receiver<Item>, tx: mpsc::Sender<Batch>) {
    while let Some(first) = rx.recv().await {
        let mut batch = Batch {
            source: EVENTS_SOURCE,
            logins: Vec::new(),
            ends: Vec::new(),
            position: None,
        };
        let mut next = Some(first);
        let mut n = 0;
        while let Some(item) = next {
            match item {
                Item::Login(l) => batch.logins.push(l),
                Item::End(e) => batch.ends.push(e),
            }
            n += 1;
            next = if n < BATCH { rx.try_recv().ok() } else { None };
        }
        if tx.send(batch).await.is_err() {
            return;
        }
    }
}

/// The running events listener; dropping it stops it (and removes its unix socket).
pub type Events = Background;

/// Starts the listener when configured (else an idle `Events`). Binding happens before
/// this returns, so an error names the socket or address at fault.
///
/// The task that hands queued events to the engine runs on `forward_on` (the daemon's own
/// runtime), not on the listener's: an event answered 200 is forwarded even after the
/// listener is dropped (a reload that changes `[events]`, shutdown). `stop`: cancelled,
/// it stops the listener too.
pub fn spawn(
    settings: &EventsSettings,
    tx: mpsc::Sender<Batch>,
    stats: &StatsRegistry,
    forward_on: &tokio::runtime::Handle,
    stop: &CancellationToken,
) -> Result<Events, StartError> {
    let Some(listen) = &settings.listen else {
        return Ok(Background::idle());
    };
    let mut setup = Setup::new(stop).map_err(StartError::runtime("events"))?;
    let (queue, rx) = mpsc::channel(QUEUE);
    let intake = Arc::new(Intake::new(queue, stats.reporter(ORIGIN)));
    setup
        .bind(listen::bind(listen, settings, intake))
        .map_err(|error| StartError::Listen {
            key: "events.listen",
            listen: listen.clone(),
            error,
        })?;
    forward_on.spawn(forward(rx, tx));
    setup.run("events").map_err(StartError::thread("events"))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(super) fn intake(cap: usize) -> (Intake, mpsc::Receiver<Item>) {
        let (queue, rx) = mpsc::channel(cap);
        (Intake::new(queue, Reporter::standalone(ORIGIN)), rx)
    }

    const AUTH: &str = r#"{"event":"auth_request_finished","categories":["service:auth","auth"],"fields":{"success":"yes","service":"imap","session":"WDkhNwViz5zLAHEt","local_ip":"127.0.0.1","remote_ip":"203.0.113.45","real_remote_ip":"127.0.0.9","local_port":143,"remote_port":40143}}"#;
    pub(super) const LOGIN: &str = r#"{"event":"auth_master_client_login_finished","categories":["auth-client","service:imap"],"fields":{"user":"alice","local_ip":"127.0.0.1","local_port":143,"remote_ip":"203.0.113.45","remote_port":40143}}"#;
    const END: &str = r#"{"event":"mail_user_session_finished","categories":["imap","storage","service:imap"],"fields":{"session":"WDkhNwViz5zLAHEt"}}"#;

    #[test]
    fn a_login_takes_its_session_from_the_authentication() {
        let (i, mut rx) = intake(8);
        i.event(AUTH.as_bytes());
        assert!(rx.try_recv().is_err(), "an authentication grants nothing");
        i.event(LOGIN.as_bytes());
        let Ok(Item::Login(l)) = rx.try_recv() else {
            panic!("a login")
        };
        assert_eq!(l.ip, "203.0.113.45".parse::<IpAddr>().unwrap());
        let s = l.session.expect("a held session");
        assert_eq!((s.id.as_str(), s.pid), ("WDkhNwViz5zLAHEt", None));
        assert!(s.exact && s.trusted && s.source == ORIGIN);
        assert_eq!(s.user.as_deref(), Some("alice"));
        // Unpaired (its authentication lost): still a login, without a session.
        i.event(LOGIN.as_bytes());
        let Ok(Item::Login(l)) = rx.try_recv() else {
            panic!("a login")
        };
        assert_eq!(l.session, None);
        i.event(END.as_bytes());
        let Ok(Item::End(e)) = rx.try_recv() else {
            panic!("an end")
        };
        assert!(e.exact && e.id.as_deref() == Some("WDkhNwViz5zLAHEt") && e.service == "imap");
        assert!(e.pid.is_none() && e.trusted && e.source == ORIGIN);
        // POP3 sessions are not held: neither a session nor an end.
        i.event(AUTH.replace("imap", "pop3").as_bytes());
        i.event(LOGIN.replace("imap", "pop3").as_bytes());
        let Ok(Item::Login(l)) = rx.try_recv() else {
            panic!("a login")
        };
        assert_eq!(l.session, None);
        i.event(END.replace("imap", "pop3").as_bytes());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_proxy_grants_the_client_its_authentication_named() {
        let (i, mut rx) = intake(8);
        let proxied = r#"{"event":"proxy_session_established","categories":["imap","service:imap-login"],"fields":{"local_ip":"127.0.0.1","local_port":143,"remote_ip":"127.0.0.9","remote_port":48937,"service":"imap","user":"erin"}}"#;
        // Without the authentication: nothing (127.0.0.9 is a proxy in front).
        i.event(proxied.as_bytes());
        assert!(rx.try_recv().is_err());
        i.event(
            AUTH.replace(
                r#""real_remote_ip":"127.0.0.9""#,
                r#""real_remote_ip":"127.0.0.9","real_remote_port":48937"#,
            )
            .as_bytes(),
        );
        i.event(proxied.as_bytes());
        let Ok(Item::Login(l)) = rx.try_recv() else {
            panic!("a login")
        };
        assert_eq!(l.ip, "203.0.113.45".parse::<IpAddr>().unwrap());
        assert_eq!(l.session, None);
    }

    #[test]
    fn a_full_queue_drops_and_counts_never_waits() {
        let (i, mut rx) = intake(2);
        for _ in 0..5 {
            i.event(LOGIN.as_bytes());
        }
        assert_eq!(i.dropped.load(Ordering::Relaxed), 3);
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok() && rx.try_recv().is_err());
        i.event(b"{nonsense");
        assert_eq!(
            i.reporter.stats().near_misses.lock().unwrap()["malformed-event"],
            1
        );
    }

    /// What the intake declines reaches every observer, typed: asserted without the log.
    #[test]
    fn declined_events_are_reported() {
        use crate::telemetry::observe::Recorder;
        let registry = StatsRegistry::default();
        let seen = Arc::new(Recorder::default());
        registry.observe_with(seen.clone());
        let (queue, _rx) = mpsc::channel(1);
        let i = Intake::new(queue, registry.reporter(ORIGIN));
        i.event(b"{nonsense");
        i.refuse("events: a post without the secret");
        i.event(LOGIN.as_bytes());
        i.event(LOGIN.as_bytes());
        let kinds: Vec<_> = seen
            .reports()
            .into_iter()
            .map(|(source, r)| match r {
                Report::Declined { count, .. } => format!("{source} {count:?}"),
                Report::Fault { kind, .. } => format!("{source} fault {kind}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "events NearMiss(\"malformed-event\")",
                "events Forged",
                "events fault dropped"
            ]
        );
    }
}
