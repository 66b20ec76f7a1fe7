use super::*;

/// Records every event as text.
#[derive(Default)]
struct Record(Vec<String>);

impl Record {
    fn push(&mut self, what: &str, line: Line<'_>) {
        self.0.push(format!(
            "{} {what} {}",
            line.index,
            String::from_utf8_lossy(line.text)
        ));
    }
}

impl Sink for Record {
    fn login(&mut self, line: Line<'_>, login: &Login<'_>) {
        self.push(&format!("login {:?} {:?}", login.ip, login.time), line);
    }
    fn untimed(&mut self, line: Line<'_>, _: &Login<'_>) {
        self.push("untimed", line);
    }
    fn bad_address(&mut self, line: Line<'_>, _: &Login<'_>) {
        self.push("bad-address", line);
    }
    fn forged(&mut self, line: Line<'_>, _: &Login<'_>, why: &str) {
        self.push(&format!("forged({why})"), line);
    }
    fn too_long(&mut self, line: Line<'_>) {
        self.push("too-long", line);
    }
    fn near_miss(&mut self, line: Line<'_>, why: NearMiss) {
        self.push(why.name(), line);
    }
    fn other(&mut self, line: Line<'_>) {
        self.push("other", line);
    }
    fn session_end(&mut self, line: Line<'_>, end: &crate::session::SessionEnd) {
        self.push(
            &format!(
                "end({} {} {} {:?})",
                end.service,
                end.pid.map_or("-".into(), |p| p.to_string()),
                end.id.as_deref().unwrap_or("-"),
                end.time
            ),
            line,
        );
    }
}

fn scanner(visit: Visit) -> Scanner {
    test_scanner(visit, 200)
}

const OK: &str = "2026-11-21T09:56:55+00:00 vm dovecot: imap-login: Login: user=<a>, rip=203.0.113.5, lip=192.0.2.1";
const BUF: &str = "a\n\
2026-11-21T09:56:55+00:00 vm dovecot: imap-login: Login: user=<a>, rip=203.0.113.5, lip=192.0.2.1\n\
imap-login: Login: user=<b>, rip=203.0.113.6, lip=192.0.2.1\n\
2026-11-21T09:56:55+00:00 vm sshd: imap-login: Login: user=<c>, rip=203.0.113.7\n\
2026-11-21T09:56:55+00:00 vm dovecot: submission-login: Login: user=<d>, rip=203.0.113.8\n\
2026-11-21T09:56:55+00:00 vm dovecot: imap-login: Login: user=<e>, lip=192.0.2.1\n\
2026-11-21T09:56:55+00:00 vm dovecot: imap-login: Login: user=<f>, rip=300.1.1.1\n\
2026-11-21T09:56:55+00:00 vm dovecot: imap-login: Disconnected: user=<g>\n\
2026-11-21T09:56:55+00:00 vm dovecot: imap-login: Welcome! Login: user=<h>, rip=203.0.113.9\n\
z";

fn run(visit: Visit, buf: &str) -> (Vec<String>, Scanned) {
    let mut s = scanner(visit);
    let mut r = Record::default();
    let n = s.scan(buf.as_bytes(), 1_795_256_900, &mut r);
    (r.0, n)
}

#[test]
fn logins_mode_reports_logins_and_what_it_met_on_the_way() {
    let (events, n) = run(Visit::Logins, BUF);
    assert_eq!(
        n,
        Scanned {
            lines: 10,
            bytes: BUF.len() as u64
        }
    );
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e.split(' ').nth(1).unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "login",
            "untimed",
            "untrusted-frame",
            "service-not-enabled",
            "no-address",
            "bad-address",
            // The prefilter's literal is `Login: `: this line is a candidate too.
            "unknown-wording"
        ],
        "{events:#?}"
    );
    assert!(events[0].starts_with("1 login Valid(203.0.113.5) Some(1795255015)"));
}

#[test]
fn near_miss_mode_tells_unknown_wording() {
    let (events, _) = run(Visit::NearMisses, BUF);
    assert!(
        events.iter().any(|e| e.starts_with("8 unknown-wording")),
        "{events:#?}"
    );
    assert!(!events.iter().any(|e| e.starts_with("7 ")), "{events:#?}");
}

#[test]
fn every_line_mode_gives_each_line_one_event() {
    let (events, n) = run(Visit::EveryLine, BUF);
    assert_eq!(n.lines, 10);
    let idx: Vec<u64> = events
        .iter()
        .map(|e| e.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(idx, (0..10).collect::<Vec<_>>(), "{events:#?}");
    assert!(events[7].starts_with("7 other"), "{}", events[7]);
    assert!(events[9].starts_with("9 other z"));
}

#[test]
fn near_miss_mode_visits_login_process_lines_only() {
    let buf = "2026-11-21T09:56:55+00:00 vm dovecot: imap-login: Logged out: user=<a>\n\
               2026-11-21T09:56:55+00:00 vm dovecot: lmtp: Login: x\n\
               2026-11-21T09:56:55+00:00 vm dovecot: pop3-login: Info: Login: user=<a>, rip=1.2.3.4, lip=1.2.3.5\n";
    let (events, n) = run(Visit::NearMisses, buf);
    assert_eq!(n.lines, 3);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert!(events[0].starts_with("2 login"));
}

#[test]
fn over_long_lines_are_skipped() {
    let long = format!("{OK}, {}\n{OK}\n", "x".repeat(300));
    let (events, n) = run(Visit::Logins, &long);
    assert_eq!(n.lines, 2);
    assert!(events[0].starts_with("0 too-long"));
    assert!(events[1].starts_with("1 login"));
}

#[test]
fn journal_entries_take_the_entry_time_and_provenance() {
    let mut s = scanner(Visit::Logins);
    let mut r = Record::default();
    let msg = b"imap-login: Login: user=<a>, rip=203.0.113.5, lip=192.0.2.1";
    s.scan_message(0, msg, Some(42), Ok(()), 0, &mut r);
    s.scan_message(1, msg, Some(42), Err("_SYSTEMD_UNIT=x"), 0, &mut r);
    s.scan_message(2, msg, None, Ok(()), 0, &mut r);
    assert!(
        r.0[0].starts_with("0 login Valid(203.0.113.5) Some(42)"),
        "{:?}",
        r.0
    );
    assert!(r.0[1].starts_with("1 forged(_SYSTEMD_UNIT=x)"));
    assert!(r.0[2].starts_with("2 untimed"));
}

/// Session starts ride on login lines; ends are their own event (real 2.4.1 lines, the end
/// written before its login). `imap-login: Disconnected` is no session end.
#[test]
fn sessions_start_on_logins_and_end_on_their_own_lines() {
    let buf = "Nov 26 12:15:49 imap(alice)<7429><Cm5r5yxhtLN/AAAB>: Info: Disconnected: Logged out in=12 out=525\n\
Nov 26 12:15:49 imap-login: Info: Logged in: user=<alice>, method=PLAIN, rip=203.0.113.77, lip=127.0.0.1, mpid=7429, secured, session=<Cm5r5yxhtLN/AAAB>\n\
Nov 26 12:15:51 pop3(alice)<7443><GbKK5yxhhrN/AAAB>: Info: Disconnected: Logged out top=0/0, retr=0/0, del=0/0, size=0\n\
Nov 26 12:15:52 imap-login: Info: Disconnected (auth failed, 1 attempts in 2 secs): user=<x>, rip=198.51.100.1, session=<AAAA>\n\
Nov 26 12:15:53 mail sshd[1]: imap(bob)<1><BBBB>: Disconnected: Logged out\n";
    let (events, _) = run(Visit::Logins, buf);
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e.split(' ').nth(1).unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["end(imap", "login", "end(pop3", "untrusted-frame"],
        "{events:#?}"
    );
    assert!(
        events[0].contains("end(imap 7429 Cm5r5yxhtLN/AAAB"),
        "{events:#?}"
    );
    let mut s = scanner(Visit::Logins);
    #[derive(Default)]
    struct Starts(Vec<Option<crate::session::SessionStart>>);
    impl Sink for Starts {
        fn login(&mut self, _: Line<'_>, login: &Login<'_>) {
            self.0.push(login.session.clone());
        }
    }
    let mut starts = Starts::default();
    s.scan(buf.as_bytes(), 1_795_256_900, &mut starts);
    assert_eq!(
        starts.0,
        [crate::session::SessionStart::new(
            "Cm5r5yxhtLN/AAAB",
            Some(7429)
        )]
    );
}

/// Issue 19: a login by ANONYMOUS (grant.never_mechanisms' default) is a near miss, never
/// a login; another mechanism grants.
#[test]
fn anonymous_logins_never_grant() {
    let buf = "2026-11-21T09:56:55+00:00 vm dovecot: imap-login: Login: user=<anonymous>, method=ANONYMOUS, rip=203.0.113.5, lip=192.0.2.1, mpid=1, session=<a>\n\
2026-11-21T09:56:55+00:00 vm dovecot: imap-login: Login: user=<b>, method=PLAIN, rip=203.0.113.6, lip=192.0.2.1, mpid=2, session=<b>\n";
    let (events, _) = run(Visit::Logins, buf);
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e.split(' ').nth(1).unwrap())
        .collect();
    assert_eq!(kinds, ["never-mechanism", "login"], "{events:#?}");
}
