//! One exported Dovecot event (`format = json`: `{"event", "hostname", "start_time",
//! "end_time", "categories": [...], "fields": {...}}`, one per HTTP post on 2.3, one per
//! line on 2.4's unix driver) turned into what it means for the relay, without I/O.
//!
//! Which event is the login: `auth_master_client_login_finished`. The mail process (imap,
//! pop3) sends it once the auth master handed it the user, i.e. when the mail session
//! really starts. `auth_request_finished` with `success=yes` is too early and too broad:
//! Dovecot sends it, identical, for a passdb that proxies the user elsewhere or refuses
//! them with `nologin` (measured on 2.3.19.1 and 2.4.1: carol with proxy=y, dave with
//! nologin), and those never log in here. Proxied connections never reach a local mail
//! process, so the master login also excludes a proxy's own connections, and its
//! `remote_ip` is the client a trusted proxy forwarded (ID `x-originating-ip`, XCLIENT),
//! never the proxy's address. The successful `auth_request_finished` is still used, for
//! the one thing the master login lacks: the session id (paired on the connection's
//! addresses and ports, see `pair`). `mail_user_session_finished` ends the session.
//!
//! On a Dovecot proxy no mail session starts; `proxy_session_established` (the backend
//! accepted the user) is the login there, as the proxy log patterns' "Started proxying".
//! Its `remote_ip` is the connection's real peer (measured on 2.3.19.1: a trusted proxy in
//! front, not the client it forwarded), so the client is taken from the authentication of
//! that same connection (its `real_remote_ip` and port): never the proxy's address.

use std::fmt;
use std::net::IpAddr;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::model::address::parse_any_ip;

/// The largest event accepted (a post body or a line): Dovecot's are about 1 KiB.
pub const MAX_EVENT: usize = 16 * 1024;
/// Fields per event: Dovecot's carry at most a few dozen.
const MAX_FIELDS: usize = 128;
const MAX_CATEGORIES: usize = 32;
/// The longest value kept (event names, protocols, users, addresses).
const MAX_TEXT: usize = 256;

/// A mail connection as Dovecot names it on both sides of a login.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Conn {
    pub protocol: String,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
}

/// What an event means here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `auth_request_finished`, `success=yes`: the connection's session id and real
    /// peer (`real_remote_ip`, port); grants nothing (the passdb may still proxy the user
    /// or refuse them).
    Authenticated {
        conn: Conn,
        peer: (IpAddr, u16),
        session: String,
    },
    /// `proxy_session_established`: the user proxied to a backend, for the connection
    /// from `peer` (the real one).
    Proxied {
        protocol: String,
        peer: (IpAddr, u16),
        user: String,
    },
    /// `auth_master_client_login_finished`: a mail session started for `conn.remote.0`.
    Login { conn: Conn, user: String },
    /// `mail_user_session_finished`.
    End {
        protocol: String,
        session: String,
        user: Option<String>,
    },
}

/// Why an event grants nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// An event this source does not use (proxy events, other metrics sharing the exporter).
    Other,
    /// A failed authentication.
    Failed,
}

/// Why an event is refused as malformed (counted; never grants).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Deserialize)]
struct Raw {
    event: String,
    #[serde(default)]
    categories: Vec<String>,
    #[serde(default)]
    fields: Fields,
}

/// The fields used; every other one is skipped unread. Numbers and strings are both taken
/// as text (ports are numbers in 2.3's JSON; a forwarded one could be either).
#[derive(Default)]
struct Fields {
    count: usize,
    success: Option<String>,
    service: Option<String>,
    protocol: Option<String>,
    session: Option<String>,
    user: Option<String>,
    local_ip: Option<String>,
    local_port: Option<String>,
    remote_ip: Option<String>,
    remote_port: Option<String>,
    real_remote_ip: Option<String>,
    real_remote_port: Option<String>,
}

/// A field value as text: strings and numbers; anything else is malformed.
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                if v.len() > MAX_TEXT {
                    return Err(E::custom("a field value too long"));
                }
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Fields, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of event fields")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut f = Fields::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    f.count += 1;
                    if f.count > MAX_FIELDS {
                        return Err(de::Error::custom("too many fields"));
                    }
                    let slot = match &*key {
                        "success" => &mut f.success,
                        "service" => &mut f.service,
                        "protocol" => &mut f.protocol,
                        "session" => &mut f.session,
                        "user" => &mut f.user,
                        "local_ip" => &mut f.local_ip,
                        "local_port" => &mut f.local_port,
                        "remote_ip" => &mut f.remote_ip,
                        "remote_port" => &mut f.remote_port,
                        "real_remote_ip" => &mut f.real_remote_ip,
                        "real_remote_port" => &mut f.real_remote_port,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    // A repeated field could say one thing to us and another to a reader.
                    if slot.is_some() {
                        return Err(de::Error::custom(format!("field `{key}` repeated")));
                    }
                    *slot = Some(map.next_value::<Text>()?.0);
                }
                Ok(f)
            }
        }
        d.deserialize_map(V)
    }
}

/// Reads one exported event. `Ok(Err(_))`: a genuine event that means nothing here.
pub fn parse(body: &[u8]) -> Result<Result<Event, Ignored>, Invalid> {
    if body.len() > MAX_EVENT {
        return Err(Invalid(format!("an event of {} bytes", body.len())));
    }
    let raw: Raw =
        serde_json::from_slice(body).map_err(|e| Invalid(format!("not an exported event: {e}")))?;
    if raw.event.len() > MAX_TEXT
        || raw.categories.len() > MAX_CATEGORIES
        || raw.categories.iter().any(|c| c.len() > MAX_TEXT)
    {
        return Err(Invalid("an event name or categories too long".into()));
    }
    let f = raw.fields;
    match raw.event.as_str() {
        "auth_request_finished" => {
            // Dovecot sets success=yes only on success (absent otherwise).
            if f.success.as_deref() != Some("yes") {
                return Ok(Err(Ignored::Failed));
            }
            // 2.3 names it `service`, 2.4 `protocol`.
            let protocol = protocol(f.protocol.as_deref().or(f.service.as_deref()))?;
            let session = session(f.session.as_deref())?;
            let conn = conn(protocol, &f)?;
            let peer = match f.real_remote_ip {
                Some(_) => (
                    ip(&f.real_remote_ip, "real_remote_ip")?,
                    port(&f.real_remote_port),
                ),
                None => conn.remote,
            };
            Ok(Ok(Event::Authenticated {
                conn,
                peer,
                session,
            }))
        }
        "auth_master_client_login_finished" => {
            // The mail process's own event: its protocol is its service category.
            let protocol = protocol(category_service(&raw.categories))?;
            let user = f.user.clone().unwrap_or_default();
            let conn = conn(protocol, &f)?;
            Ok(Ok(Event::Login { conn, user }))
        }
        "proxy_session_established" => {
            // The login process's event: `service` (2.3), or its category `imap-login`.
            let service = f.protocol.as_deref().or(f.service.as_deref()).or_else(|| {
                category_service(&raw.categories).map(|s| s.trim_end_matches("-login"))
            });
            Ok(Ok(Event::Proxied {
                protocol: protocol(service)?,
                peer: (ip(&f.remote_ip, "remote_ip")?, port(&f.remote_port)),
                user: f.user.clone().unwrap_or_default(),
            }))
        }
        "mail_user_session_finished" => {
            // 2.4 has `service`; 2.3 only the category.
            let protocol = protocol(
                f.service
                    .as_deref()
                    .or_else(|| category_service(&raw.categories)),
            )?;
            let session = session(f.session.as_deref())?;
            Ok(Ok(Event::End {
                protocol,
                session,
                user: f.user,
            }))
        }
        _ => Ok(Err(Ignored::Other)),
    }
}

/// `service:imap` among the categories.
fn category_service(categories: &[String]) -> Option<&str> {
    categories.iter().find_map(|c| c.strip_prefix("service:"))
}

fn protocol(p: Option<&str>) -> Result<String, Invalid> {
    match p {
        Some(p)
            if !p.is_empty()
                && p.len() <= 32
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
        {
            Ok(p.to_string())
        }
        _ => Err(Invalid(format!(
            "no valid protocol ({:?})",
            p.unwrap_or("")
        ))),
    }
}

fn session(s: Option<&str>) -> Result<String, Invalid> {
    match s {
        Some(s) if crate::model::valid_id(s) => Ok(s.to_string()),
        _ => Err(Invalid(format!(
            "no valid session id ({:?})",
            s.unwrap_or("")
        ))),
    }
}

fn ip(v: &Option<String>, name: &str) -> Result<IpAddr, Invalid> {
    v.as_deref().and_then(parse_any_ip).ok_or_else(|| {
        Invalid(format!(
            "no valid {name} ({:?})",
            v.as_deref().unwrap_or("")
        ))
    })
}

/// A port as Dovecot writes it; 0 when absent (part of a pairing key only).
fn port(v: &Option<String>) -> u16 {
    v.as_deref()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(0)
}

fn conn(protocol: String, f: &Fields) -> Result<Conn, Invalid> {
    Ok(Conn {
        protocol,
        local: (ip(&f.local_ip, "local_ip")?, port(&f.local_port)),
        remote: (ip(&f.remote_ip, "remote_ip")?, port(&f.remote_port)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from the real Dovecot 2.3.19.1 on this host (tests/support/dovecot.sh with
    // the README's exporter), a login forwarded by a trusted proxy with ID.
    const AUTH_23: &str = r#"{"event":"auth_request_finished","hostname":"vm","start_time":"2026-12-07T06:19:59.546741Z","end_time":"2026-12-07T06:19:59.546919Z","categories":["service:auth","auth"],"fields":{"duration":79,"success":"yes","policy_result":"ok","mechanism":"PLAIN","transport":"trusted","service":"imap","session":"WDkhNwViz5zLAHEt","local_ip":"127.0.0.1","real_local_ip":"127.0.0.1","remote_ip":"203.0.113.45","real_remote_ip":"127.0.0.9","local_port":18143,"real_local_port":18143,"remote_port":40143,"real_remote_port":48937,"original_user":"alice","user":"alice","translated_user":"alice"}}"#;
    const LOGIN_23: &str = r#"{"event":"auth_master_client_login_finished","hostname":"vm","start_time":"2026-12-07T06:19:59.570469Z","end_time":"2026-12-07T06:19:59.570568Z","categories":["auth-client","service:imap"],"fields":{"duration":67,"user":"alice","id":1211891713,"local_ip":"127.0.0.1","local_port":18143,"remote_ip":"203.0.113.45","remote_port":40143}}"#;
    const END_23: &str = r#"{"event":"mail_user_session_finished","hostname":"vm","start_time":"2026-12-07T06:19:59.586124Z","end_time":"2026-12-07T06:19:59.586909Z","categories":["imap","storage","service:imap"],"fields":{"minor_faults":13,"rss":5033984,"vsz":6782976,"user":"alice","local_ip":"127.0.0.1","local_port":18143,"remote_ip":"203.0.113.45","remote_port":40143,"session":"WDkhNwViz5zLAHEt","duration":768}}"#;
    const END_POP3_23: &str = r#"{"event":"mail_user_session_finished","hostname":"vm","start_time":"2026-12-07T06:19:59.806071Z","end_time":"2026-12-07T06:19:59.826278Z","categories":["storage","service:pop3"],"fields":{"minor_faults":96,"rss":5033984,"vsz":6676480,"user":"bob","session":"T84kNwVirpzGM2QX","duration":20175}}"#;
    const FAILED_23: &str = r#"{"event":"auth_request_finished","hostname":"vm","start_time":"2026-12-07T06:19:59.970081Z","end_time":"2026-12-07T06:19:59.972808Z","categories":["service:auth","auth"],"fields":{"duration":497,"mechanism":"PLAIN","transport":"trusted","service":"imap","session":"BK8nNwViz5zLAHFC","local_ip":"127.0.0.1","real_local_ip":"127.0.0.1","remote_ip":"203.0.113.66","real_remote_ip":"127.0.0.9","local_port":18143,"real_local_port":18143,"remote_port":40143,"real_remote_port":37725,"original_user":"alice","user":"alice","translated_user":"alice"}}"#;
    const PROXY_23: &str = r#"{"event":"proxy_session_finished","hostname":"vm","start_time":"2026-12-07T06:20:17.202059Z","end_time":"2026-12-07T06:20:20.205570Z","categories":["imap","service:imap-login"],"fields":{"local_ip":"127.0.0.1","local_port":18143,"remote_ip":"127.0.0.1","remote_port":58290,"service":"imap","user":"carol","duration":3003417,"disconnect_reason":"","disconnect_side":"proxy","source_ip":"","dest_ip":"127.0.0.1","dest_port":9,"dest_host":"127.0.0.1","source_port":35974,"reconnect_attempts":3}}"#;
    // A proxy (erin: proxy=y to a backend), the connection from the trusted 127.0.0.9 that
    // forwarded 203.0.113.77 (its port here as in AUTH_23, to pair them).
    const PROXIED_23: &str = r#"{"event":"proxy_session_established","hostname":"vm","start_time":"2026-12-07T06:40:54.426674Z","end_time":"2026-12-07T06:40:54.474630Z","categories":["imap","service:imap-login"],"fields":{"local_ip":"127.0.0.1","local_port":18143,"remote_ip":"127.0.0.9","remote_port":48937,"service":"imap","user":"erin","duration":47857,"source_ip":"","dest_ip":"127.0.0.1","dest_port":18143,"dest_host":"127.0.0.1","source_port":34366}}"#;
    // Dovecot 2.4.1 (Debian 13): `protocol` in auth, `service` in the session end.
    const AUTH_24: &str = r#"{"event":"auth_request_finished","hostname":"vm","start_time":"2026-12-07T06:21:07.363654Z","end_time":"2026-12-07T06:21:07.369296Z","categories":["auth","service:auth"],"fields":{"duration":153,"remote_pid":24122,"remote_uid":102,"remote_gid":105,"success":"yes","policy_result":"ok","mechanism":"PLAIN","transport":"secured","protocol":"pop3","session":"/QMsOwViOO0AAAAAAAAAAAAAAAAAAAAB","local_ip":"::1","real_local_ip":"::1","remote_ip":"::1","real_remote_ip":"::1","local_port":18245,"real_local_port":18245,"remote_port":60728,"real_remote_port":60728,"original_user":"alice","user":"alice","translated_user":"alice"}}"#;
    const LOGIN_24: &str = r#"{"event":"auth_master_client_login_finished","hostname":"vm","start_time":"2026-12-07T06:21:07.394183Z","end_time":"2026-12-07T06:21:07.394313Z","categories":["auth-client","service:pop3"],"fields":{"duration":76,"user":"alice","id":3461480449,"local_ip":"::1","local_port":18245,"remote_ip":"::1","remote_port":60728}}"#;
    const END_24: &str = r#"{"event":"mail_user_session_finished","hostname":"vm","start_time":"2026-12-07T06:21:07.325442Z","end_time":"2026-12-07T06:21:07.333904Z","categories":["service:imap","storage","imap"],"fields":{"minor_faults":21,"rss":10522624,"vsz":51613696,"user":"alice","local_ip":"127.0.0.1","local_port":18243,"remote_ip":"203.0.113.45","remote_port":40143,"session":"9O0qOwViZ9N/AAAJ","net_in_bytes":12,"net_out_bytes":525,"service":"imap","duration":8432}}"#;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ok(body: &str) -> Event {
        parse(body.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn dovecot_23_events() {
        let conn = Conn {
            protocol: "imap".into(),
            local: (ip("127.0.0.1"), 18143),
            remote: (ip("203.0.113.45"), 40143),
        };
        assert_eq!(
            ok(AUTH_23),
            Event::Authenticated {
                conn: conn.clone(),
                peer: (ip("127.0.0.9"), 48937),
                session: "WDkhNwViz5zLAHEt".into()
            }
        );
        // A proxy's: the real peer (127.0.0.9, a trusted proxy in front), which the
        // authentication above ties to its client.
        assert_eq!(
            ok(PROXIED_23),
            Event::Proxied {
                protocol: "imap".into(),
                peer: (ip("127.0.0.9"), 48937),
                user: "erin".into()
            }
        );
        assert_eq!(
            ok(&PROXIED_23.replace(r#""service":"imap","#, "")),
            Event::Proxied {
                protocol: "imap".into(),
                peer: (ip("127.0.0.9"), 48937),
                user: "erin".into()
            }
        );
        // The forwarded client, never the proxy (real_remote_ip 127.0.0.9).
        assert_eq!(
            ok(LOGIN_23),
            Event::Login {
                conn,
                user: "alice".into()
            }
        );
        assert_eq!(
            ok(END_23),
            Event::End {
                protocol: "imap".into(),
                session: "WDkhNwViz5zLAHEt".into(),
                user: Some("alice".into())
            }
        );
        assert_eq!(
            ok(END_POP3_23),
            Event::End {
                protocol: "pop3".into(),
                session: "T84kNwVirpzGM2QX".into(),
                user: Some("bob".into())
            }
        );
        assert_eq!(parse(FAILED_23.as_bytes()).unwrap(), Err(Ignored::Failed));
        assert_eq!(parse(PROXY_23.as_bytes()).unwrap(), Err(Ignored::Other));
    }

    #[test]
    fn dovecot_24_events() {
        let conn = Conn {
            protocol: "pop3".into(),
            local: (ip("::1"), 18245),
            remote: (ip("::1"), 60728),
        };
        assert_eq!(
            ok(AUTH_24),
            Event::Authenticated {
                conn: conn.clone(),
                peer: (ip("::1"), 60728),
                session: "/QMsOwViOO0AAAAAAAAAAAAAAAAAAAAB".into()
            }
        );
        assert_eq!(
            ok(LOGIN_24),
            Event::Login {
                conn,
                user: "alice".into()
            }
        );
        assert_eq!(
            ok(END_24),
            Event::End {
                protocol: "imap".into(),
                session: "9O0qOwViZ9N/AAAJ".into(),
                user: Some("alice".into())
            }
        );
    }

    #[test]
    fn odd_events_are_refused_and_bounded() {
        let bad = |b: &str| assert!(parse(b.as_bytes()).is_err(), "{b}");
        bad("");
        bad("{");
        bad("[]");
        bad(r#"{"fields":{}}"#);
        // A login without a valid client address or service.
        bad(&LOGIN_23.replace("203.0.113.45", "203.0.113.450"));
        bad(&LOGIN_23.replace(r#""remote_ip":"203.0.113.45","#, ""));
        bad(&LOGIN_23.replace("service:imap", "service:im ap"));
        bad(&LOGIN_23.replace(r#""service:imap""#, r#""x""#));
        // Repeated fields, fields of another type.
        bad(&LOGIN_23.replace(
            r#""remote_ip":"203.0.113.45""#,
            r#""remote_ip":"203.0.113.45","remote_ip":"192.0.2.1""#,
        ));
        bad(&LOGIN_23.replace(r#""remote_ip":"203.0.113.45""#, r#""remote_ip":["x"]"#));
        // Session ids as the session hold takes them.
        bad(&END_23.replace("WDkhNwViz5zLAHEt", "a b"));
        bad(&END_23.replace("WDkhNwViz5zLAHEt", &"x".repeat(65)));
        // Bounds: body, fields, values, categories.
        bad(&format!("{}{}", LOGIN_23, " ".repeat(MAX_EVENT)));
        let many: String = (0..=MAX_FIELDS).map(|i| format!(r#""f{i}":1,"#)).collect();
        bad(&LOGIN_23.replace(r#""fields":{"#, &format!(r#""fields":{{{many}"#)));
        bad(&LOGIN_23.replace("alice", &"a".repeat(MAX_TEXT + 1)));
        let cats: String = (0..=MAX_CATEGORIES)
            .map(|i| format!(r#""c{i}","#))
            .collect();
        bad(&LOGIN_23.replace(r#""categories":["#, &format!(r#""categories":[{cats}"#)));
        // Success only as Dovecot writes it.
        assert_eq!(
            parse(AUTH_23.replace(r#""yes""#, r#""no""#).as_bytes()).unwrap(),
            Err(Ignored::Failed)
        );
        // An unknown event is ignored even when its fields are odd, but still bounded.
        assert_eq!(
            parse(br#"{"event":"x","fields":{"a":{"b":[1,2]}}}"#).unwrap(),
            Err(Ignored::Other)
        );
    }

    /// What every event that parses must hold, whatever the input: the values a grant or
    /// a session hold takes are valid and bounded.
    fn sound(r: Result<Result<Event, Ignored>, Invalid>) {
        let proto = |p: &str| {
            assert!(!p.is_empty() && p.len() <= 32);
            assert!(p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        };
        match r {
            Ok(Ok(Event::Authenticated { conn, session, .. })) => {
                proto(&conn.protocol);
                assert!(crate::model::valid_id(&session));
            }
            Ok(Ok(Event::Login { conn, user })) => {
                proto(&conn.protocol);
                assert!(user.len() <= MAX_TEXT);
            }
            Ok(Ok(Event::Proxied { protocol, user, .. })) => {
                proto(&protocol);
                assert!(user.len() <= MAX_TEXT);
            }
            Ok(Ok(Event::End {
                protocol, session, ..
            })) => {
                proto(&protocol);
                assert!(crate::model::valid_id(&session));
            }
            Ok(Err(_)) | Err(_) => {}
        }
    }

    use proptest::prelude::*;

    /// A genuine event with a few bytes replaced, cut short or repeated: what a broken or
    /// hostile peer could send.
    fn mangled() -> impl Strategy<Value = Vec<u8>> {
        let genuine = prop::sample::select(vec![
            AUTH_23,
            LOGIN_23,
            END_23,
            END_POP3_23,
            FAILED_23,
            PROXY_23,
            PROXIED_23,
            AUTH_24,
            LOGIN_24,
            END_24,
        ]);
        let edits = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6);
        (genuine, edits, any::<prop::sample::Index>(), 0usize..3).prop_map(
            |(text, edits, cut, mode)| {
                let mut b = text.as_bytes().to_vec();
                for (at, byte) in edits {
                    let i = at.index(b.len());
                    b[i] = byte;
                }
                match mode {
                    0 => b.truncate(cut.index(b.len() + 1)),
                    1 => {
                        let tail = b[cut.index(b.len())..].to_vec();
                        b.extend_from_slice(&tail);
                    }
                    _ => {}
                }
                b
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        // Stands in for a cargo-fuzz target (the project has no fuzz/ set-up).
        #[test]
        fn any_bytes_parse_soundly(body in prop::collection::vec(any::<u8>(), 0..512)) {
            sound(parse(&body));
        }

        #[test]
        fn mangled_events_parse_soundly(body in mangled()) {
            sound(parse(&body));
        }
    }
}
