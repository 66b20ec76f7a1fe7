//! Dovecot's exported events, as any local process that reaches the events listener could
//! shape them (2.3's http-post body, 2.4's unix driver lines): every line of the input is
//! one event. A parsed event names only valid session ids and bounded text.

use dovegate::events::parse::{parse, Event};

pub fn check(data: &[u8]) {
    for body in std::iter::once(data).chain(data.split(|&b| b == b'\n')) {
        let Ok(Ok(event)) = parse(body) else {
            continue;
        };
        match event {
            Event::Authenticated { session, conn, .. } => {
                assert!(dovegate::model::valid_id(&session), "session {session:?}");
                assert!(conn.protocol.len() <= 256);
            }
            Event::Login { conn, user } => {
                assert!(conn.protocol.len() <= 256 && user.len() <= 256);
            }
            Event::Proxied { protocol, user, .. } => {
                assert!(protocol.len() <= 256 && user.len() <= 256);
            }
            Event::End {
                session, protocol, ..
            } => {
                assert!(dovegate::model::valid_id(&session), "session {session:?}");
                assert!(protocol.len() <= 256);
            }
        }
    }
}
